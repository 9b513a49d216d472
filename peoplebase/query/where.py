"""Mixpanel segmentation expressions (the `where` of /api/query/engage): text → AST.

    expr     := or
    or       := and ("or" and)*
    and      := not ("and" not)*
    not      := "not" not | compare
    compare  := sum (("==" | "!=" | "<" | "<=" | ">" | ">=" | "in" | "not" "in") sum)?
    sum      := product (("+" | "-") product)*
    product  := unary (("*" | "/" | "%") unary)*
    unary    := "-" unary | primary
    primary  := literal | "[" literals "]" | ("properties" | "user") "[" STRING "]"
              | FUNC "(" expr ")" | "(" expr ")"
    FUNC     := "defined" | "number" | "string" | "boolean" | "datetime"

Every node keeps the position (0-based character offset) where it starts, so errors can
point at it. `parse` also types the tree: a comparison with a `datetime(...)` on one side
reads the other side as a datetime too (`datetime(p) > "2024-01-01"`, `> 1700000000`).
The meaning of each node is defined once, by the reference evaluator in `evaluate.py`;
`compile.py` turns the same tree into SQL with the same meaning.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Union

MAX_EXPRESSION_CHARS = 10_000
MAX_DEPTH = 64

FUNCTIONS = frozenset({"defined", "number", "string", "boolean", "datetime"})
COMPARISONS = frozenset({"==", "!=", "<", "<=", ">", ">="})
ARITHMETIC = frozenset({"+", "-", "*", "/", "%"})


class WhereSyntaxError(ValueError):
    """A `where` expression that cannot be parsed; `position` is a 0-based offset."""

    def __init__(self, message: str, position: int, text: str = "") -> None:
        self.message = message
        self.position = position
        self.text = text
        super().__init__(self.describe())

    def describe(self) -> str:
        out = f"where, {self.message} at position {self.position}"
        if self.text:
            start = max(0, self.position - 20)
            excerpt = self.text[start : self.position + 20]
            out += f": {excerpt!r} (near {self.text[self.position : self.position + 10]!r})"
        return out


# --- AST ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Literal:
    value: None | bool | float | str
    pos: int = 0


@dataclass(frozen=True)
class ListLiteral:
    items: tuple[Literal, ...]
    pos: int = 0


@dataclass(frozen=True)
class Prop:
    name: str
    pos: int = 0


@dataclass(frozen=True)
class Call:
    fn: str  # one of FUNCTIONS
    arg: Node
    pos: int = 0


@dataclass(frozen=True)
class Not:
    operand: Node
    pos: int = 0


@dataclass(frozen=True)
class BoolOp:
    op: str  # "and" | "or"
    left: Node
    right: Node
    pos: int = 0


@dataclass(frozen=True)
class Compare:
    op: str  # one of COMPARISONS
    left: Node
    right: Node
    pos: int = 0


@dataclass(frozen=True)
class In:
    left: Node
    right: Node
    pos: int = 0


@dataclass(frozen=True)
class Arith:
    op: str  # one of ARITHMETIC
    left: Node
    right: Node
    pos: int = 0


Node = Union[Literal, ListLiteral, Prop, Call, Not, BoolOp, Compare, In, Arith]  # noqa: UP007


def kind_of(node: Node) -> str:
    """The static kind of a node: bool, number, string, datetime, list, null or any."""
    if isinstance(node, Literal):
        v = node.value
        if v is None:
            return "null"
        if isinstance(v, bool):
            return "bool"
        return "number" if isinstance(v, float) else "string"
    if isinstance(node, ListLiteral):
        return "list"
    if isinstance(node, Prop):
        return "any"
    if isinstance(node, Call):
        return {
            "defined": "bool",
            "boolean": "bool",
            "number": "number",
            "string": "string",
            "datetime": "datetime",
        }[node.fn]
    if isinstance(node, Arith):
        return "number"
    return "bool"  # Not, BoolOp, Compare, In


# --- tokenizer ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Token:
    kind: str  # "str", "num", "name", "op", "end"
    text: str
    value: object
    pos: int


_NUMBER = re.compile(r"[0-9]+(\.[0-9]+)?([eE][+-]?[0-9]+)?|\.[0-9]+([eE][+-]?[0-9]+)?")
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_OPS = ("==", "!=", "<=", ">=", "<", ">", "+", "-", "*", "/", "%", "(", ")", "[", "]", ",")
_ESCAPES = {
    '"': '"',
    "'": "'",
    "\\": "\\",
    "/": "/",
    "b": "\b",
    "f": "\f",
    "n": "\n",
    "r": "\r",
    "t": "\t",
}


def tokenize(text: str) -> list[Token]:
    tokens: list[Token] = []
    i, n = 0, len(text)
    while i < n:
        c = text[i]
        if c in " \t\r\n":
            i += 1
            continue
        if c in "\"'":
            start = i
            i, value = _string(text, i)
            tokens.append(Token("str", text[start:i], value, start))
            continue
        m = _NUMBER.match(text, i)
        if m:
            number = float(m.group())
            if not math.isfinite(number):
                raise WhereSyntaxError("number out of range", i, text)
            tokens.append(Token("num", m.group(), number, i))
            i = m.end()
            continue
        m = _NAME.match(text, i)
        if m:
            tokens.append(Token("name", m.group(), m.group(), i))
            i = m.end()
            continue
        for op in _OPS:
            if text.startswith(op, i):
                tokens.append(Token("op", op, op, i))
                i += len(op)
                break
        else:
            if c == "=":
                raise WhereSyntaxError("unexpected '=' (use '==' to compare)", i, text)
            raise WhereSyntaxError(f"unexpected character {c!r}", i, text)
    tokens.append(Token("end", "", None, n))
    return tokens


def _string(text: str, start: int) -> tuple[int, str]:
    """Read a quoted string starting at `start`; returns (index after it, value)."""
    quote = text[start]
    out: list[str] = []
    i = start + 1
    n = len(text)
    while i < n:
        c = text[i]
        if c == quote:
            return i + 1, "".join(out)
        if c == "\\":
            if i + 1 >= n:
                break
            e = text[i + 1]
            if e == "u":
                digits = text[i + 2 : i + 6]
                if len(digits) != 4 or not all(d in "0123456789abcdefABCDEF" for d in digits):
                    raise WhereSyntaxError("invalid \\u escape in string", i, text)
                code = int(digits, 16)
                if 0xD800 <= code <= 0xDFFF:
                    raise WhereSyntaxError("surrogate \\u escape in string", i, text)
                out.append(chr(code))
                i += 6
                continue
            if e not in _ESCAPES:
                raise WhereSyntaxError(f"invalid escape \\{e} in string", i, text)
            out.append(_ESCAPES[e])
            i += 2
            continue
        if c == "\x00":
            raise WhereSyntaxError("NUL character in string", i, text)
        out.append(c)
        i += 1
    raise WhereSyntaxError("unterminated string", start, text)


# --- parser ------------------------------------------------------------------------------


class _Parser:
    def __init__(self, text: str) -> None:
        self.text = text
        self.tokens = tokenize(text)
        self.i = 0
        self.depth = 0

    @property
    def tok(self) -> Token:
        return self.tokens[self.i]

    def error(self, message: str, token: Token | None = None) -> WhereSyntaxError:
        token = token or self.tok
        return WhereSyntaxError(message, token.pos, self.text)

    def at(self, kind: str, text: str | None = None) -> bool:
        t = self.tok
        return t.kind == kind and (text is None or t.text == text)

    def take(self) -> Token:
        t = self.tok
        self.i += 1
        return t

    def expect(self, kind: str, text: str, what: str) -> Token:
        if not self.at(kind, text):
            raise self.error(f"expected {what}, found {_describe(self.tok)}")
        return self.take()

    def enter(self) -> None:
        self.depth += 1
        if self.depth > MAX_DEPTH:
            raise self.error(f"expression nested deeper than {MAX_DEPTH} levels")

    def parse(self) -> Node:
        if self.at("end"):
            raise self.error("empty expression")
        node = self.or_()
        if not self.at("end"):
            raise self.error(f"unexpected {_describe(self.tok)}")
        return node

    def or_(self) -> Node:
        node = self.and_()
        while self.at("name", "or"):
            pos = self.take().pos
            node = BoolOp("or", node, self.and_(), pos)
        return node

    def and_(self) -> Node:
        node = self.not_()
        while self.at("name", "and"):
            pos = self.take().pos
            node = BoolOp("and", node, self.not_(), pos)
        return node

    def not_(self) -> Node:
        if self.at("name", "not"):
            pos = self.take().pos
            self.enter()
            node = Not(self.not_(), pos)
            self.depth -= 1
            return node
        return self.compare()

    def compare(self) -> Node:
        left = self.sum()
        t = self.tok
        if t.kind == "op" and t.text in COMPARISONS:
            self.take()
            right = self.sum()
            return _typed_compare(t.text, left, right, t.pos, self.text)
        if t.kind == "name" and t.text == "in":
            self.take()
            return self._in(left, self.sum(), t.pos)
        if (
            t.kind == "name"
            and t.text == "not"
            and self.tokens[self.i + 1].kind == "name"
            and self.tokens[self.i + 1].text == "in"
        ):
            self.i += 2
            return Not(self._in(left, self.sum(), t.pos), t.pos)
        return left

    def _in(self, left: Node, right: Node, pos: int) -> Node:
        if isinstance(left, ListLiteral):
            raise WhereSyntaxError(
                "a list can only stand on the right of 'in'", left.pos, self.text
            )
        return In(left, right, pos)

    def sum(self) -> Node:
        node = self.product()
        while self.tok.kind == "op" and self.tok.text in ("+", "-"):
            t = self.take()
            node = Arith(t.text, node, self.product(), t.pos)
            self._check_arith(node)
        return node

    def product(self) -> Node:
        node = self.unary()
        while self.tok.kind == "op" and self.tok.text in ("*", "/", "%"):
            t = self.take()
            node = Arith(t.text, node, self.unary(), t.pos)
            self._check_arith(node)
        return node

    def _check_arith(self, node: Arith) -> None:
        for side in (node.left, node.right):
            if isinstance(side, ListLiteral):
                raise WhereSyntaxError("arithmetic on a list", side.pos, self.text)

    def unary(self) -> Node:
        if self.at("op", "-"):
            t = self.take()
            self.enter()
            operand = self.unary()
            self.depth -= 1
            if isinstance(operand, Literal) and isinstance(operand.value, float):
                return Literal(-operand.value, t.pos)
            return Arith("-", Literal(0.0, t.pos), operand, t.pos)
        return self.primary()

    def primary(self) -> Node:
        t = self.tok
        if t.kind == "str":
            self.take()
            return Literal(str(t.value), t.pos)
        if t.kind == "num":
            self.take()
            return Literal(float(t.value), t.pos)  # type: ignore[arg-type]
        if t.kind == "op" and t.text == "(":
            self.take()
            self.enter()
            node = self.or_()
            self.depth -= 1
            self.expect("op", ")", "')'")
            return node
        if t.kind == "op" and t.text == "[":
            return self.list_literal()
        if t.kind == "name":
            word = t.text
            if word == "true" or word == "false":
                self.take()
                return Literal(word == "true", t.pos)
            if word == "null" or word == "undefined":
                self.take()
                return Literal(None, t.pos)
            if word in ("properties", "user"):
                self.take()
                self.expect("op", "[", "'[' after properties")
                name = self.tok
                if name.kind != "str":
                    raise self.error(
                        f'expected a quoted property name, as in properties["plan"], found {_describe(name)}'
                    )
                self.take()
                self.expect("op", "]", "']'")
                return Prop(str(name.value), t.pos)
            if word in FUNCTIONS:
                self.take()
                self.expect("op", "(", f"'(' after {word}")
                self.enter()
                arg = self.or_()
                self.depth -= 1
                self.expect("op", ")", "')'")
                if isinstance(arg, ListLiteral):
                    raise WhereSyntaxError(f"{word}() of a list", arg.pos, self.text)
                return Call(word, arg, t.pos)
            raise self.error(f"unknown name {word!r}")
        raise self.error(f"unexpected {_describe(t)}")

    def list_literal(self) -> ListLiteral:
        start = self.take().pos
        items: list[Literal] = []
        while not self.at("op", "]"):
            if items:
                self.expect("op", ",", "',' or ']'")
            node = self.unary()
            if not isinstance(node, Literal):
                raise WhereSyntaxError(
                    "lists may hold only strings, numbers, true, false and null",
                    node.pos,
                    self.text,
                )
            items.append(node)
        self.take()
        return ListLiteral(tuple(items), start)


def _typed_compare(op: str, left: Node, right: Node, pos: int, text: str) -> Node:
    for side in (left, right):
        if isinstance(side, ListLiteral):
            raise WhereSyntaxError("a list can only stand on the right of 'in'", side.pos, text)
    lk, rk = kind_of(left), kind_of(right)
    if lk == "datetime" and rk != "datetime":
        right = Call("datetime", right, right.pos)
    elif rk == "datetime" and lk != "datetime":
        left = Call("datetime", left, left.pos)
    return Compare(op, left, right, pos)


def _describe(t: Token) -> str:
    if t.kind == "end":
        return "end of expression"
    if t.kind == "str":
        return "a string"
    return repr(t.text)


def parse(text: str) -> Node:
    """Parse a `where` expression; raises WhereSyntaxError with the position of the fault."""
    if len(text) > MAX_EXPRESSION_CHARS:
        raise WhereSyntaxError(
            f"longer than {MAX_EXPRESSION_CHARS} characters", MAX_EXPRESSION_CHARS
        )
    return _Parser(text).parse()


def compile_expression(
    text: str, dialect: str = "sqlite", column: str = "props"
) -> tuple[str, tuple[object, ...]]:
    """Parse and compile in one step: (SQL condition over `column`, parameters)."""
    from .compile import compile_where

    return compile_where(parse(text), dialect, column)
