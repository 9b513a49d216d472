# ruff: noqa: S608  (this module joins fixed SQL fragments; values are always parameters)
"""`where` AST → a parameterized SQL condition, for SQLite and for PostgreSQL.

The condition reads one JSON column (`props`: TEXT JSON in SQLite, JSONB in PostgreSQL) and
is never NULL, so it can be used as is in `WHERE`, and it means exactly what
`evaluate.matches` means. Every value from the expression (property names, strings,
numbers) travels as a bound parameter; the SQL text holds only fixed fragments.

A value compiles to a set of *slots*, one SQL expression per kind it may have at run time
(number, string, boolean, list, object, plus a never-NULL "is null" test). At most one slot
is non-NULL for a given row, which lets every operator be written as an OR of the cases
where both sides have the same kind.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .where import (
    Arith,
    BoolOp,
    Call,
    Compare,
    In,
    ListLiteral,
    Literal,
    Node,
    Not,
    Prop,
    kind_of,
)

MAX_SQL_CHARS = 2_000_000
DIALECTS = ("sqlite", "postgres")


class ExpressionTooComplex(ValueError):
    pass


@dataclass(frozen=True)
class Frag:
    sql: str
    params: tuple[Any, ...] = ()


def f(template: str, *parts: Frag) -> Frag:
    """Fill each `{}` of the template with a fragment, keeping the parameters in order."""
    pieces = template.split("{}")
    if len(pieces) != len(parts) + 1:
        raise AssertionError(f"template {template!r} wants {len(pieces) - 1} parts")
    sql = [pieces[0]]
    params: list[Any] = []
    for part, piece in zip(parts, pieces[1:], strict=True):
        sql.append(part.sql)
        params.extend(part.params)
        sql.append(piece)
    return Frag("".join(sql), tuple(params))


TRUE = Frag("TRUE")
FALSE = Frag("FALSE")


@dataclass(frozen=True)
class Val:
    """The run-time value of an expression as per-kind SQL slots (None: never that kind)."""

    num: Frag | None = None
    text: Frag | None = None
    flag: Frag | None = None
    lst: Frag | None = None
    obj: Frag | None = None
    null: Frag | None = None  # never-NULL test "the value is null"; None: never null
    pred: bool = False  # `flag` is a never-NULL condition (and the only slot)


def _any(terms: list[Frag]) -> Frag:
    if not terms:
        return FALSE
    body = Frag(" OR ".join("(" + t.sql + ")" for t in terms), sum((t.params for t in terms), ()))
    return f("COALESCE({}, FALSE)", body)


class Dialect:
    name = ""
    placeholder = "?"

    def __init__(self, column: str = "props") -> None:
        self.column = column
        self._alias = 0

    def alias(self) -> str:
        self._alias += 1
        return f"pb_e{self._alias}"

    # literals
    def lit(self, value: Any) -> Frag:
        return Frag(self.placeholder, (value,))

    # dialect hooks
    def prop(self, name: str) -> Val:
        raise NotImplementedError

    def exists_element(self, lst: Frag, test: Any) -> Frag:
        raise NotImplementedError

    def truth_of_bool(self, b: Frag) -> Frag:
        raise NotImplementedError

    def str_less(self, op: str, a: Frag, b: Frag) -> Frag:
        return f("{} " + op + " {}", a, b)

    def substring(self, needle: Frag, hay: Frag) -> Frag:
        raise NotImplementedError

    def list_nonempty(self, lst: Frag) -> Frag:
        raise NotImplementedError

    def obj_nonempty(self, obj: Frag) -> Frag:
        raise NotImplementedError

    def bool_to_num(self, b: Frag) -> Frag:
        raise NotImplementedError

    def bool_to_str(self, b: Frag) -> Frag:
        raise NotImplementedError

    def int_to_str(self, n: Frag) -> Frag:
        raise NotImplementedError

    def parse_number(self, s: Frag) -> Frag:
        raise NotImplementedError

    def parse_date(self, s: Frag) -> Frag:
        raise NotImplementedError


class SqliteDialect(Dialect):
    name = "sqlite"
    placeholder = "?"

    def _json(self, t: Frag, v: Frag) -> Val:
        return Val(
            num=f("CASE WHEN {} IN ('integer', 'real') THEN CAST({} AS REAL) END", t, v),
            text=f("CASE WHEN {} = 'text' THEN {} END", t, v),
            flag=f("CASE {} WHEN 'true' THEN 1 WHEN 'false' THEN 0 END", t),
            lst=f("CASE WHEN {} = 'array' THEN {} END", t, v),
            obj=f("CASE WHEN {} = 'object' THEN {} END", t, v),
            null=f("COALESCE({}, 'null') = 'null'", t),
        )

    def prop(self, name: str) -> Val:
        col = Frag(self.column)
        if any(c in name for c in '"\\') or any(ord(c) < 0x20 for c in name):
            # SQLite's JSON paths cannot spell these names: look the key up instead
            key = self.lit(name)
            t = f("(SELECT type FROM json_each({}) WHERE key = {})", col, key)
            v = f("(SELECT value FROM json_each({}) WHERE key = {})", col, key)
        else:
            path = self.lit('$."' + name + '"')
            t = f("json_type({}, {})", col, path)
            v = f("json_extract({}, {})", col, path)
        return self._json(t, v)

    def exists_element(self, lst: Frag, test: Any) -> Frag:
        a = self.alias()
        element = self._json(Frag(f"{a}.type"), Frag(f"{a}.value"))
        sql = "EXISTS (SELECT 1 FROM json_each({}) AS " + a + " WHERE {})"
        return f(sql, lst, test(element))

    def truth_of_bool(self, b: Frag) -> Frag:
        return f("{} <> 0", b)

    def substring(self, needle: Frag, hay: Frag) -> Frag:
        return f("instr({}, {}) > 0", hay, needle)

    def list_nonempty(self, lst: Frag) -> Frag:
        return f("json_array_length({}) > 0", lst)

    def obj_nonempty(self, obj: Frag) -> Frag:
        return Frag(obj.sql + " <> '{}'", obj.params)  # json_extract gives minified JSON

    def bool_to_num(self, b: Frag) -> Frag:
        return f("CAST({} AS REAL)", b)

    def bool_to_str(self, b: Frag) -> Frag:
        return f("CASE {} WHEN 1 THEN 'true' WHEN 0 THEN 'false' END", b)

    def int_to_str(self, n: Frag) -> Frag:
        return f(
            "(SELECT CASE WHEN abs(pb_n) < 1e15 AND pb_n = CAST(pb_n AS INTEGER) "
            "THEN CAST(CAST(pb_n AS INTEGER) AS TEXT) END FROM (SELECT {} AS pb_n))",
            n,
        )

    def parse_number(self, s: Frag) -> Frag:
        return f(
            "(SELECT CASE WHEN length(pb_s) BETWEEN 1 AND 300 "
            "AND pb_s NOT GLOB '*[^0-9.-]*' AND pb_s NOT GLOB '?*-*' "
            "AND pb_s NOT GLOB '*.*.*' AND (pb_s GLOB '[0-9]*' OR pb_s GLOB '-[0-9]*') "
            "AND pb_s GLOB '*[0-9]' AND pb_s NOT GLOB '*.' AND pb_s NOT GLOB '-.*' "
            "THEN CAST(pb_s AS REAL) END FROM (SELECT {} AS pb_s))",
            s,
        )

    def parse_date(self, s: Frag) -> Frag:
        d = "[0-9][0-9][0-9][0-9]-[0-9][0-9]-[0-9][0-9]"
        hm = d + "[T ][0-9][0-9]:[0-9][0-9]"
        hms = hm + ":[0-9][0-9]"
        globs = " OR ".join(f"pb_s GLOB '{p}'" for p in (d, hm, hm + "Z", hms, hms + "Z"))
        fields = (
            "SELECT CAST(substr(pb_s, 1, 4) AS INTEGER) AS y, "
            "CAST(substr(pb_s, 6, 2) AS INTEGER) AS m, CAST(substr(pb_s, 9, 2) AS INTEGER) AS d, "
            "CASE WHEN length(pb_s) > 10 THEN CAST(substr(pb_s, 12, 2) AS INTEGER) ELSE 0 END AS hh, "
            "CASE WHEN length(pb_s) > 10 THEN CAST(substr(pb_s, 15, 2) AS INTEGER) ELSE 0 END AS mi, "
            "CASE WHEN substr(pb_s, 17, 1) = ':' THEN CAST(substr(pb_s, 18, 2) AS INTEGER) ELSE 0 END AS ss "
            f"FROM (SELECT {_MARK} AS pb_s) WHERE {globs}"
        )
        return _splice(_civil_sql(fields, "CAST({} AS REAL)"), s)


class PostgresDialect(Dialect):
    name = "postgres"
    placeholder = "%s"

    def lit(self, value: Any) -> Frag:
        if isinstance(value, bool):
            return Frag("%s::boolean", (value,))
        if isinstance(value, float):
            return Frag("%s::float8", (value,))
        return Frag("%s::text", (value,))

    def _json(self, j: Frag) -> Val:
        t = f("jsonb_typeof({})", j)
        return Val(
            num=f("CASE WHEN {} = 'number' THEN ({})::float8 END", t, j),
            text=Frag(
                "CASE WHEN " + t.sql + " = 'string' THEN " + j.sql + " #>> '{}' END",
                t.params + j.params,
            ),
            flag=f("CASE WHEN {} = 'boolean' THEN ({})::boolean END", t, j),
            lst=f("CASE WHEN {} = 'array' THEN {} END", t, j),
            obj=f("CASE WHEN {} = 'object' THEN {} END", t, j),
            null=f("COALESCE({}, 'null') = 'null'", t),
        )

    def prop(self, name: str) -> Val:
        return self._json(f("(" + self.column + " -> {})", self.lit(name)))

    def exists_element(self, lst: Frag, test: Any) -> Frag:
        a = self.alias()
        element = self._json(Frag(f"{a}.v"))
        sql = "EXISTS (SELECT 1 FROM jsonb_array_elements({}) AS " + a + "(v) WHERE {})"
        return f(sql, lst, test(element))

    def truth_of_bool(self, b: Frag) -> Frag:
        return b

    def str_less(self, op: str, a: Frag, b: Frag) -> Frag:
        return f('({} COLLATE "C") ' + op + ' ({} COLLATE "C")', a, b)

    def substring(self, needle: Frag, hay: Frag) -> Frag:
        return f("strpos({}, {}) > 0", hay, needle)

    def list_nonempty(self, lst: Frag) -> Frag:
        return f("jsonb_array_length({}) > 0", lst)

    def obj_nonempty(self, obj: Frag) -> Frag:
        return Frag(obj.sql + " <> '{}'::jsonb", obj.params)

    def bool_to_num(self, b: Frag) -> Frag:
        return f("(({})::int)::float8", b)

    def bool_to_str(self, b: Frag) -> Frag:
        return f("CASE WHEN {} THEN 'true' WHEN NOT {} THEN 'false' END", b, b)

    def int_to_str(self, n: Frag) -> Frag:
        return f(
            "(SELECT CASE WHEN abs(pb_n) < 1e15 AND pb_n = trunc(pb_n) "
            "THEN (pb_n::bigint)::text END FROM (SELECT {} AS pb_n) AS pb_t)",
            n,
        )

    def parse_number(self, s: Frag) -> Frag:
        return f(
            "(SELECT CASE WHEN length(pb_s) <= 300 AND pb_s ~ '^-?[0-9]+(\\.[0-9]+)?$' "
            "THEN pb_s::float8 END FROM (SELECT {} AS pb_s) AS pb_t)",
            s,
        )

    def parse_date(self, s: Frag) -> Frag:
        # CASE, not WHERE: PostgreSQL may evaluate a cast before a filter, and a cast of
        # text that is not a number raises
        fields = (
            "SELECT CASE WHEN ok THEN substr(pb_s, 1, 4)::int END AS y, "
            "CASE WHEN ok THEN substr(pb_s, 6, 2)::int END AS m, "
            "CASE WHEN ok THEN substr(pb_s, 9, 2)::int END AS d, "
            "CASE WHEN ok AND length(pb_s) > 10 THEN substr(pb_s, 12, 2)::int ELSE 0 END AS hh, "
            "CASE WHEN ok AND length(pb_s) > 10 THEN substr(pb_s, 15, 2)::int ELSE 0 END AS mi, "
            "CASE WHEN ok AND substr(pb_s, 17, 1) = ':' THEN substr(pb_s, 18, 2)::int ELSE 0 END AS ss "
            "FROM (SELECT pb_s, COALESCE(pb_s ~ "
            "'^[0-9]{4}-[0-9]{2}-[0-9]{2}([T ][0-9]{2}:[0-9]{2}(:[0-9]{2})?Z?)?$', FALSE) AS ok "
            f"FROM (SELECT {_MARK} AS pb_s) AS pb_t0) AS pb_t1"
        )
        return _splice(_civil_sql(fields, "({})::float8"), s)


_MARK = "\x00value\x00"


def _splice(sql: str, value: Frag) -> Frag:
    """Put `value` where `_MARK` stands (once) in SQL that has literal braces."""
    head, tail = sql.split(_MARK)
    return Frag(head + value.sql + tail, value.params)


def _civil_sql(fields: str, to_float: str) -> str:
    """Seconds since the epoch from (y, m, d, hh, mi, ss), as `evaluate.days_from_civil`.

    Only fixed text is put together here; integer division truncates in both dialects and
    every operand is non-negative, so it matches Python's `//`.
    """
    stage1 = (
        "SELECT y, m, d, hh, mi, ss, y - CASE WHEN m <= 2 THEN 1 ELSE 0 END AS yy "
        "FROM (" + fields + ") AS pb_f"
    )
    stage2 = (
        "SELECT y, m, d, hh, mi, ss, yy / 400 AS era, yy - (yy / 400) * 400 AS yoe, "
        "(153 * (CASE WHEN m > 2 THEN m - 3 ELSE m + 9 END) + 2) / 5 + d - 1 AS doy "
        "FROM (" + stage1 + ") AS pb_g"
    )
    seconds = (
        "(CAST(era AS BIGINT) * 146097 + yoe * 365 + yoe / 4 - yoe / 100 + doy - 719468) "
        "* 86400 + hh * 3600 + mi * 60 + ss"
    )
    return (
        "(SELECT CASE WHEN y >= 1 AND m BETWEEN 1 AND 12 AND d BETWEEN 1 AND 31 "
        "AND hh <= 23 AND mi <= 59 AND ss <= 59 THEN " + to_float.replace("{}", seconds) + " "
        "END FROM (" + stage2 + ") AS pb_h)"
    )


def dialect(name: str, column: str = "props") -> Dialect:
    if name == "sqlite":
        return SqliteDialect(column)
    if name == "postgres":
        return PostgresDialect(column)
    raise ValueError(f"unknown SQL dialect {name!r}: expected one of {', '.join(DIALECTS)}")


class _Compiler:
    def __init__(self, d: Dialect) -> None:
        self.d = d

    def cond(self, node: Node) -> Frag:
        """A never-NULL condition: the node read as a truth value."""
        return self.truth(self.val(node))

    def truth(self, v: Val) -> Frag:
        if v.pred and v.flag is not None:
            return v.flag
        d = self.d
        terms = []
        if v.num is not None:
            terms.append(f("{} <> 0", v.num))
        if v.text is not None:
            terms.append(f("{} <> ''", v.text))
        if v.flag is not None:
            terms.append(d.truth_of_bool(v.flag))
        if v.lst is not None:
            terms.append(d.list_nonempty(v.lst))
        if v.obj is not None:
            terms.append(d.obj_nonempty(v.obj))
        return _any(terms)

    def pred(self, frag: Frag) -> Val:
        return Val(flag=frag, pred=True)

    def number(self, frag: Frag) -> Val:
        return Val(num=frag, null=f("{} IS NULL", frag))

    def string(self, frag: Frag) -> Val:
        return Val(text=frag, null=f("{} IS NULL", frag))

    def val(self, node: Node) -> Val:
        d = self.d
        if isinstance(node, Literal):
            lv = node.value
            if lv is None:
                return Val(null=TRUE)
            if isinstance(lv, bool):
                return Val(flag=d.lit(lv), pred=False)
            if isinstance(lv, float):
                return Val(num=d.lit(lv))
            return Val(text=d.lit(lv))
        if isinstance(node, ListLiteral):
            raise ExpressionTooComplex("a list can only stand on the right of 'in'")
        if isinstance(node, Prop):
            return d.prop(node.name)
        if isinstance(node, Not):
            return self.pred(f("NOT ({})", self.cond(node.operand)))
        if isinstance(node, BoolOp):
            op = " AND " if node.op == "and" else " OR "
            return self.pred(f("({})" + op + "({})", self.cond(node.left), self.cond(node.right)))
        if isinstance(node, Compare):
            a, b = self.val(node.left), self.val(node.right)
            if node.op == "==":
                return self.pred(self.equal(a, b))
            if node.op == "!=":
                return self.pred(f("NOT ({})", self.equal(a, b)))
            terms = []
            if a.num is not None and b.num is not None:
                terms.append(f("{} " + node.op + " {}", a.num, b.num))
            if a.text is not None and b.text is not None:
                terms.append(d.str_less(node.op, a.text, b.text))
            return self.pred(_any(terms))
        if isinstance(node, In):
            a = self.val(node.left)
            if isinstance(node.right, ListLiteral):
                return self.pred(_any([self.equal(a, self.val(item)) for item in node.right.items]))
            b = self.val(node.right)
            terms = []
            if b.lst is not None:
                terms.append(d.exists_element(b.lst, lambda element: self.equal(a, element)))
            if b.text is not None and a.text is not None:
                terms.append(d.substring(a.text, b.text))
            return self.pred(_any(terms))
        if isinstance(node, Arith):
            a, b = self.val(node.left), self.val(node.right)
            if a.num is None or b.num is None:
                return Val(null=TRUE)
            if node.op in ("+", "-", "*"):
                return self.number(f("({} " + node.op + " {})", a.num, b.num))
            if node.op == "/":
                return self.number(f("CASE WHEN {} <> 0 THEN {} / {} END", b.num, a.num, b.num))
            return self.number(
                f(
                    "CASE WHEN {} <> 0 THEN {} - {} * trunc({} / {}) END",
                    b.num,
                    a.num,
                    b.num,
                    a.num,
                    b.num,
                )
            )
        if isinstance(node, Call):
            arg = node.arg
            if node.fn == "datetime" and kind_of(arg) == "datetime":
                return self.val(arg)
            v = self.val(arg)
            if node.fn == "defined":
                return self.pred(f("NOT ({})", v.null) if v.null is not None else TRUE)
            if node.fn == "boolean":
                return self.pred(self.truth(v))
            if node.fn == "number":
                parts = [v.num] if v.num is not None else []
                if v.flag is not None:
                    parts.append(d.bool_to_num(v.flag))
                if v.text is not None:
                    parts.append(d.parse_number(v.text))
                return self.number(_coalesce(parts))
            if node.fn == "string":
                parts = [v.text] if v.text is not None else []
                if v.flag is not None:
                    parts.append(d.bool_to_str(v.flag))
                if v.num is not None:
                    parts.append(d.int_to_str(v.num))
                return self.string(_coalesce(parts))
            # datetime
            parts = []
            if v.num is not None:
                parts.append(
                    f("CASE WHEN abs({}) >= 1e11 THEN {} / 1000.0 ELSE {} END", v.num, v.num, v.num)
                )
            if v.text is not None:
                parts.append(d.parse_date(v.text))
            return self.number(_coalesce(parts))
        raise TypeError(f"not a where node: {node!r}")

    def equal(self, a: Val, b: Val) -> Frag:
        terms = []
        if a.num is not None and b.num is not None:
            terms.append(f("{} = {}", a.num, b.num))
        if a.text is not None and b.text is not None:
            terms.append(f("{} = {}", a.text, b.text))
        if a.flag is not None and b.flag is not None:
            terms.append(f("{} = {}", a.flag, b.flag))
        if a.null is not None and b.null is not None:
            terms.append(f("({}) AND ({})", a.null, b.null))
        return _any(terms)


def _coalesce(parts: list[Frag]) -> Frag:
    if not parts:
        return Frag("NULL")
    if len(parts) == 1:
        return parts[0]
    return f("COALESCE(" + ", ".join(["{}"] * len(parts)) + ")", *parts)


def compile_where(
    node: Node, dialect_name: str, column: str = "props"
) -> tuple[str, tuple[Any, ...]]:
    """A never-NULL SQL condition over `column` with its parameters, for the dialect."""
    frag = _Compiler(dialect(dialect_name, column)).cond(node)
    if len(frag.sql) > MAX_SQL_CHARS:
        raise ExpressionTooComplex("where, expression too complex")
    return frag.sql, frag.params


__all__ = ["DIALECTS", "ExpressionTooComplex", "Frag", "compile_where", "dialect"]
