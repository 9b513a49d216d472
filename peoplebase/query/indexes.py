"""Indexed property equality: which parts of a `where` an index can answer.

SQLite can index an expression such as `json_extract(props, '$."$email"')` only when the
query spells the very same expression, with the path as a literal. For every property named
in the `indexed_properties` setting the store keeps such an index, and for each top-level
`properties["x"] == "value"` conjunct of a query it adds the literal-path comparison as an
extra condition. The extra condition is implied by the compiled expression, so results never
change; the planner just gets a way to use the index.
"""

from __future__ import annotations

import hashlib
from typing import Any

from .where import BoolOp, Compare, Literal, Node, Prop


class BadIndexedProperty(ValueError):
    pass


def check_name(name: str) -> str:
    """A property name that can be spelled as a SQLite JSON path literal."""
    if not name or any(c in name for c in "\"\\'") or any(ord(c) < 0x20 for c in name):
        raise BadIndexedProperty(
            f"indexed property {name!r}: names with quotes, backslashes or control characters "
            "cannot be indexed"
        )
    return name


def parse_names(setting: str) -> tuple[str, ...]:
    return tuple(dict.fromkeys(check_name(n.strip()) for n in setting.split(",") if n.strip()))


def sqlite_expression(name: str) -> str:
    """The indexed expression; `name` has passed check_name, so the literal is safe."""
    return "json_extract(props, '$.\"" + check_name(name) + "\"')"


def sqlite_present(name: str) -> str:
    """A condition that holds for every profile having the property: its name, quoted as a
    JSON key, occurs in the props text (props are written without escapes in names, and a
    name has no quote or backslash: check_name). It is the first half of the SQLite indexes'
    WHERE: SQLite evaluates it on every row it writes, and for a profile without the
    property (most, for most properties) it costs a substring search instead of parsing the
    whole props JSON for the second half."""
    return "instr(props, '\"" + check_name(name) + "\"') > 0"


def sqlite_equals(name: str) -> str:
    """`name` equals a parameter, in the terms the SQLite index of `name` is used for."""
    return f"{sqlite_present(name)} AND {sqlite_expression(name)} = ?"


def sqlite_indexed(name: str) -> str:
    """The WHERE of the SQLite index of `name` (a query must name both terms to use it)."""
    return f"{sqlite_present(name)} AND {sqlite_expression(name)} IS NOT NULL"


def postgres_expression(name: str) -> str:
    """The indexed JSONB expression; `name` has passed check_name, so the literal is safe."""
    return "(props -> '" + check_name(name) + "')"


def sqlite_index_name(name: str) -> str:
    # "_in": partial indexes whose WHERE begins with sqlite_present; full ones ("") and those
    # with only `IS NOT NULL` ("_nn") of earlier versions are replaced at start
    return postgres_index_name(name) + "_in"


def postgres_index_name(name: str) -> str:
    return "profiles_prop_" + hashlib.sha1(name.encode()).hexdigest()[:16]


def equality_terms(
    node: Node | None, indexed: tuple[str, ...] | frozenset[str]
) -> list[tuple[str, Any]]:
    """(property, value) for each top-level `properties[x] == literal` with x indexed."""
    out: list[tuple[str, Any]] = []

    def walk(n: Node) -> None:
        if isinstance(n, BoolOp) and n.op == "and":
            walk(n.left)
            walk(n.right)
        elif isinstance(n, Compare) and n.op == "==":
            for a, b in ((n.left, n.right), (n.right, n.left)):
                if (
                    isinstance(a, Prop)
                    and isinstance(b, Literal)
                    and a.name in indexed
                    and isinstance(b.value, str | int | float)
                    and not isinstance(b.value, bool)
                ):
                    out.append((a.name, b.value))

    if node is not None:
        walk(node)
    return out


def sqlite_hints(node: Node | None, indexed: tuple[str, ...]) -> tuple[str, tuple[Any, ...]]:
    """Extra SQL conditions (AND-ed, with a leading ' AND ') and their parameters."""
    terms = equality_terms(node, indexed)
    sql = "".join(f" AND {sqlite_equals(name)}" for name, _ in terms)
    return sql, tuple(value for _, value in terms)


def postgres_hints(node: Node | None, indexed: tuple[str, ...]) -> tuple[str, tuple[Any, ...]]:
    """Like sqlite_hints: JSONB equality (3 == 3.0 there too) that an expression index answers."""
    import orjson

    terms = equality_terms(node, indexed)
    sql = "".join(f" AND {postgres_expression(name)} = %s::jsonb" for name, _ in terms)
    return sql, tuple(orjson.dumps(value).decode() for _, value in terms)
