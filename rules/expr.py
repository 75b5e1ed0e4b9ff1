"""A small, safe expression language for rule conditions, compiled once, evaluated on whole batches.

Grammar (lowest to highest precedence)::

    expr    := or
    or      := and ("or" and)*
    and     := not ("and" not)*
    not     := "not" not | compare
    compare := sum (("<" | "<=" | ">" | ">=" | "==" | "!=") sum)?
    sum     := product (("+" | "-") product)*
    product := unary (("*" | "/" | "%") unary)*
    unary   := "-" unary | power
    power   := atom ("**" unary)?
    atom    := NUMBER | STRING | "true" | "false" | NAME | NAME "(" args ")" | "(" expr ")"

Names are the columns of the stream's rows; calls are a fixed table of functions and named
helpers (``FUNCTIONS``, ``HELPERS``). User text is tokenized and parsed here, never given to
Python's ``eval``. ``compile_expr`` type-checks the tree against the stream's columns and
returns a ``Compiled`` with a vectorized numpy evaluator and a row-by-row one (the baseline the
benchmark compares against). NaN compares false, as in IEEE arithmetic.

Whatever the text, the result is a ``Compiled`` or an ``ExprError`` with a column: nesting
(parentheses, calls, ``not``, ``-``) is limited to ``MAX_NESTING`` levels and operator chains to a
tree ``MAX_DEPTH`` deep, so neither parsing nor evaluation can exhaust the stack; string escapes
are a fixed set; number literals must be finite. Every number is a float at evaluation (integer
columns included), so arithmetic cannot overflow or raise, only give inf or NaN.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any, Callable, Mapping

import numpy as np

NUM, BOOL, STR = "number", "boolean", "string"


MAX_NESTING = 32   # parentheses, calls, 'not' and unary '-' inside one another
MAX_DEPTH = 100    # operators in one chain (a + b + ...), nested levels included


class ExprError(ValueError):
    """An expression is malformed or ill-typed; ``offset`` is the 0-based column in its text."""

    def __init__(self, message: str, offset: int):
        super().__init__(message)
        self.message = message
        self.offset = offset


# --- tokens ---------------------------------------------------------------------------

_TOKEN = re.compile(r"""
    (?P<ws>\s+)
  | (?P<num>(?:\d+\.\d*|\.\d+|\d+)(?:[eE][+-]?\d+)?)
  | (?P<str>"(?:[^"\\]|\\.)*"|'(?:[^'\\]|\\.)*')
  | (?P<name>[A-Za-z_][A-Za-z_0-9]*)
  | (?P<op>\*\*|<=|>=|==|!=|[-+*/%<>(),])
""", re.VERBOSE)

KEYWORDS = {"and", "or", "not", "true", "false"}


@dataclass(frozen=True)
class Token:
    kind: str  # num | str | name | op | kw | end
    text: str
    pos: int


def tokenize(text: str) -> list[Token]:
    """Split ``text`` into tokens; raises ``ExprError`` at the first character it cannot read."""
    tokens, pos = [], 0
    while pos < len(text):
        m = _TOKEN.match(text, pos)
        if not m:
            raise ExprError(f"unexpected character {text[pos]!r}", pos)
        kind = m.lastgroup
        if kind != "ws":
            word = m.group()
            if kind == "name" and word in KEYWORDS:
                kind = "kw"
            tokens.append(Token(kind, word, pos))
        pos = m.end()
    tokens.append(Token("end", "", len(text)))
    return tokens


# --- syntax tree ----------------------------------------------------------------------

@dataclass(frozen=True)
class Node:
    pos: int


@dataclass(frozen=True)
class Const(Node):
    value: Any


@dataclass(frozen=True)
class Field(Node):
    name: str


@dataclass(frozen=True)
class Unary(Node):
    op: str  # "-" | "not"
    operand: Node


@dataclass(frozen=True)
class Binary(Node):
    op: str  # arithmetic, comparison, "and", "or"
    left: Node
    right: Node


@dataclass(frozen=True)
class Call(Node):
    name: str
    args: tuple[Node, ...]


class _Parser:
    """Recursive descent over the token list; each method parses one grammar rule."""

    def __init__(self, text: str):
        self.tokens = tokenize(text)
        self.i = 0
        self.nesting = 0

    def nested(self, parse_one: Callable[[], Node]) -> Node:
        """``parse_one()`` one nesting level deeper; ``ExprError`` past ``MAX_NESTING``."""
        if self.nesting >= MAX_NESTING:
            raise ExprError(f"nested more than {MAX_NESTING} levels deep; split the condition", self.peek().pos)
        self.nesting += 1
        try:
            return parse_one()
        finally:
            self.nesting -= 1

    def peek(self) -> Token:
        return self.tokens[self.i]

    def take(self) -> Token:
        tok = self.tokens[self.i]
        self.i += 1
        return tok

    def accept(self, *texts: str) -> Token | None:
        tok = self.peek()
        if tok.kind in ("op", "kw") and tok.text in texts:
            return self.take()
        return None

    def expect(self, text: str) -> Token:
        tok = self.accept(text)
        if tok is None:
            found = self.peek()
            raise ExprError(f"expected {text!r}, found {found.text or 'end of expression'!r}", found.pos)
        return tok

    def parse(self) -> Node:
        node = self.or_()
        tok = self.peek()
        if tok.kind != "end":
            raise ExprError(f"unexpected {tok.text!r} after a complete expression", tok.pos)
        return node

    def _left_assoc(self, ops: tuple[str, ...], operand: Callable[[], Node]) -> Node:
        node = operand()
        while (tok := self.accept(*ops)) is not None:
            node = Binary(tok.pos, tok.text, node, operand())
        return node

    def or_(self) -> Node:
        return self._left_assoc(("or",), self.and_)

    def and_(self) -> Node:
        return self._left_assoc(("and",), self.not_)

    def not_(self) -> Node:
        if (tok := self.accept("not")) is not None:
            return Unary(tok.pos, "not", self.nested(self.not_))
        return self.compare()

    def compare(self) -> Node:
        node = self.sum_()
        if (tok := self.accept("<", "<=", ">", ">=", "==", "!=")) is not None:
            node = Binary(tok.pos, tok.text, node, self.sum_())
            if (extra := self.accept("<", "<=", ">", ">=", "==", "!=")) is not None:
                raise ExprError("chained comparisons are not supported; join them with 'and'", extra.pos)
        return node

    def sum_(self) -> Node:
        return self._left_assoc(("+", "-"), self.product)

    def product(self) -> Node:
        return self._left_assoc(("*", "/", "%"), self.unary)

    def unary(self) -> Node:
        if (tok := self.accept("-")) is not None:
            return Unary(tok.pos, "-", self.nested(self.unary))
        return self.power()

    def power(self) -> Node:
        node = self.atom()
        if (tok := self.accept("**")) is not None:
            node = Binary(tok.pos, "**", node, self.nested(self.unary))
        return node

    def atom(self) -> Node:
        tok = self.take()
        if tok.kind == "num":
            value = float(tok.text)
            if math.isinf(value):
                raise ExprError(f"number {tok.text[:24]!r} is too large (the largest is about 1.8e308)", tok.pos)
            return Const(tok.pos, value)
        if tok.kind == "str":
            return Const(tok.pos, unescape(tok))
        if tok.kind == "kw" and tok.text in ("true", "false"):
            return Const(tok.pos, tok.text == "true")
        if tok.kind == "name":
            if self.accept("("):
                args: list[Node] = []
                if not self.accept(")"):
                    args.append(self.nested(self.or_))
                    while self.accept(","):
                        args.append(self.nested(self.or_))
                    self.expect(")")
                return Call(tok.pos, tok.text, tuple(args))
            return Field(tok.pos, tok.text)
        if tok.kind == "op" and tok.text == "(":
            node = self.nested(self.or_)
            self.expect(")")
            return node
        raise ExprError(f"expected a value, found {tok.text or 'end of expression'!r}", tok.pos)


_ESCAPE = re.compile(r"\\(x[0-9a-fA-F]{2}|u[0-9a-fA-F]{4}|.)", re.DOTALL)
_ESCAPES = {"n": "\n", "t": "\t", "r": "\r", "0": "\0", "\\": "\\", '"': '"', "'": "'"}


def unescape(tok: Token) -> str:
    """The value of a string token; ``ExprError`` at an escape that is not one of ``_ESCAPES``, \\xHH, \\uHHHH."""
    def one(m: re.Match) -> str:
        code = m.group(1)
        if len(code) > 1:
            return chr(int(code[1:], 16))
        if code not in _ESCAPES:
            raise ExprError(f"bad escape '\\{code}' in a string: use \\n \\t \\r \\0 \\\\ \\\" \\' \\xHH or "
                            "\\uHHHH", tok.pos + 1 + m.start())
        return _ESCAPES[code]
    return _ESCAPE.sub(one, tok.text[1:-1])


def parse(text: str) -> Node:
    """The syntax tree of ``text``; raises ``ExprError`` with the offending column."""
    tree = _Parser(text).parse()
    _check_depth(tree)
    return tree


def _children(node: Node) -> tuple[Node, ...]:
    if isinstance(node, Unary):
        return (node.operand,)
    if isinstance(node, Binary):
        return (node.left, node.right)
    if isinstance(node, Call):
        return node.args
    return ()


def _check_depth(tree: Node) -> None:
    """``ExprError`` at the first node deeper than ``MAX_DEPTH`` (walked without recursion)."""
    stack = [(tree, 1)]
    while stack:
        node, depth = stack.pop()
        if depth > MAX_DEPTH:
            raise ExprError(f"more than {MAX_DEPTH} operators deep; split the condition or use a selector",
                            node.pos)
        stack += [(child, depth + 1) for child in _children(node)]


# --- functions and helpers ------------------------------------------------------------

def _safe_div(a: float, b: float) -> float:
    if b == 0:
        return math.nan if a == 0 or a != a else math.copysign(math.inf, a) * math.copysign(1, b)
    return a / b


def _nan_min(*xs: float) -> float:
    return math.nan if any(x != x for x in xs) else min(xs)


def _nan_max(*xs: float) -> float:
    return math.nan if any(x != x for x in xs) else max(xs)


# name -> (arity or -1 for 2+, vectorized function, row function)
FUNCTIONS: dict[str, tuple[int, Callable, Callable]] = {
    "abs": (1, np.abs, abs),
    "min": (-1, lambda *a: _reduce(np.minimum, a), _nan_min),
    "max": (-1, lambda *a: _reduce(np.maximum, a), _nan_max),
    "sqrt": (1, lambda x: np.sqrt(np.where(x < 0, np.nan, x)), lambda x: math.sqrt(x) if x >= 0 else math.nan),
    "log": (1, lambda x: np.log(np.where(x <= 0, np.nan, x)), lambda x: math.log(x) if x > 0 else math.nan),
    "isnan": (1, np.isnan, lambda x: x != x),
    "coalesce": (2, lambda x, d: np.where(np.isnan(x), d, x), lambda x, d: d if x != x else x),
}


def _reduce(fn: Callable, arrays: tuple) -> np.ndarray:
    out = arrays[0]
    for a in arrays[1:]:
        out = fn(out, a)
    return out


# Named helpers: zero-argument macros expanded to an expression over the stream's columns.
HELPERS: dict[str, str] = {
    "forecast_residual": "actual - forecast",                 # outcomes
    "abs_residual": "abs(actual - forecast)",                 # outcomes
    "band_width": "band_high - band_low",                     # predictions
    "outside_band": "observed_mean < band_low or observed_mean > band_high",  # predictions
    "spread": "max - min",                                    # windows
}


# --- type checking and compilation ----------------------------------------------------

_ARITH = {"+": np.add, "-": np.subtract, "*": np.multiply, "/": np.divide, "%": np.fmod, "**": np.power}
_ROW_ARITH: dict[str, Callable[[Any, Any], Any]] = {
    "+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b, "/": _safe_div,
    "%": lambda a, b: math.fmod(a, b) if b != 0 else math.nan,
    "**": lambda a, b: _pow(a, b),
}
_COMPARE = {"<": np.less, "<=": np.less_equal, ">": np.greater, ">=": np.greater_equal,
            "==": np.equal, "!=": np.not_equal}
_ROW_COMPARE: dict[str, Callable[[Any, Any], bool]] = {
    "<": lambda a, b: a < b, "<=": lambda a, b: a <= b, ">": lambda a, b: a > b,
    ">=": lambda a, b: a >= b, "==": lambda a, b: a == b, "!=": lambda a, b: a != b,
}


def _pow(a: float, b: float) -> float:
    try:
        return math.pow(a, b)
    except (OverflowError, ValueError):
        return math.inf if abs(a) > 1 else math.nan


Vector = Callable[[Mapping[str, np.ndarray]], Any]
Row = Callable[[Mapping[str, Any]], Any]


@dataclass(frozen=True)
class Compiled:
    """A type-checked expression: its source, result type, the fields it reads and evaluators."""

    source: str
    type: str
    fields: frozenset[str]
    vector: Vector   # columns (numpy arrays of one batch) -> array or scalar
    row: Row         # one row (field -> Python value) -> value

    def evaluate(self, columns: Mapping[str, np.ndarray], n: int) -> np.ndarray:
        """The value for each of the ``n`` rows (scalar results broadcast).

        Division by zero and the like give inf/NaN; callers evaluating many expressions wrap them
        in one ``np.errstate(all="ignore")`` to silence the warnings (it costs more than the math).
        """
        out = self.vector(columns)
        if np.ndim(out) == 0:
            return np.full(n, out)
        return out


def compile_expr(text: str, columns: Mapping[str, str], want: str | None = None) -> Compiled:
    """Parse, type-check (``columns``: name -> NUM/BOOL/STR) and compile ``text``."""
    tree = parse(text)
    fields: set[str] = set()
    typ, vector, row = _compile(tree, columns, fields, text)
    if want is not None and typ != want:
        raise ExprError(f"the expression is a {typ}, a {want} is needed here", 0)
    return Compiled(text, typ, frozenset(fields), vector, row)


def _compile(node: Node, columns: Mapping[str, str], fields: set[str],
             text: str) -> tuple[str, Vector, Row]:
    """(type, vectorized closure, row closure) of a node, or ``ExprError`` at its position."""
    if isinstance(node, Const):
        value = node.value
        typ = BOOL if isinstance(value, bool) else STR if isinstance(value, str) else NUM
        return typ, (lambda c: value), (lambda r: value)
    if isinstance(node, Field):
        if node.name not in columns:
            known = ", ".join(sorted(columns))
            raise ExprError(f"unknown field {node.name!r}; this stream has: {known}", node.pos)
        fields.add(node.name)
        name = node.name
        if columns[name] == NUM:  # integer columns too: float arithmetic cannot overflow or raise
            return NUM, (lambda c: np.asarray(c[name], dtype=np.float64)), (lambda r: float(r[name]))
        return columns[name], (lambda c: c[name]), (lambda r: r[name])
    if isinstance(node, Unary):
        typ, vec, row = _compile(node.operand, columns, fields, text)
        if node.op == "not":
            _need(typ, BOOL, node, "'not'")
            return BOOL, (lambda c: np.logical_not(vec(c))), (lambda r: not row(r))
        _need(typ, NUM, node, "'-'")
        return NUM, (lambda c: np.negative(vec(c))), (lambda r: -row(r))
    if isinstance(node, Binary):
        lt, lv, lr = _compile(node.left, columns, fields, text)
        rt, rv, rr = _compile(node.right, columns, fields, text)
        op = node.op
        if op in ("and", "or"):
            _need(lt, BOOL, node, f"'{op}'")
            _need(rt, BOOL, node, f"'{op}'")
            if op == "and":
                return BOOL, (lambda c: np.logical_and(lv(c), rv(c))), (lambda r: bool(lr(r)) and bool(rr(r)))
            return BOOL, (lambda c: np.logical_or(lv(c), rv(c))), (lambda r: bool(lr(r)) or bool(rr(r)))
        if op in _COMPARE:
            if lt != rt:
                raise ExprError(f"cannot compare a {lt} with a {rt}", node.pos)
            if lt != NUM and op not in ("==", "!="):
                raise ExprError(f"{lt}s can only be compared with == and !=", node.pos)
            vf, rf = _COMPARE[op], _ROW_COMPARE[op]
            return BOOL, (lambda c: vf(lv(c), rv(c))), (lambda r: rf(lr(r), rr(r)))
        _need(lt, NUM, node, f"'{op}'")
        _need(rt, NUM, node, f"'{op}'")
        vf, rf = _ARITH[op], _ROW_ARITH[op]
        return NUM, (lambda c: vf(lv(c), rv(c))), (lambda r: rf(lr(r), rr(r)))
    if isinstance(node, Call):
        return _compile_call(node, columns, fields, text)
    raise AssertionError(f"unknown node {node!r}")


def _compile_call(node: Call, columns: Mapping[str, str], fields: set[str], text: str) -> tuple[str, Vector, Row]:
    if node.name in HELPERS:
        if node.args:
            raise ExprError(f"{node.name}() takes no arguments", node.pos)
        try:
            return _compile(parse(HELPERS[node.name]), columns, fields, text)
        except ExprError as exc:
            raise ExprError(f"{node.name}() is not available on this stream ({exc.message})", node.pos) from None
    if node.name not in FUNCTIONS:
        known = ", ".join(sorted(FUNCTIONS) + [f"{h}()" for h in sorted(HELPERS)])
        raise ExprError(f"unknown function {node.name!r}; known: {known}", node.pos)
    arity, vf, rf = FUNCTIONS[node.name]
    if (arity >= 0 and len(node.args) != arity) or (arity < 0 and len(node.args) < 2):
        wanted = f"{arity}" if arity >= 0 else "2 or more"
        raise ExprError(f"{node.name}() takes {wanted} arguments, got {len(node.args)}", node.pos)
    compiled = [_compile(a, columns, fields, text) for a in node.args]
    for typ, _, _ in compiled:
        _need(typ, NUM, node, f"{node.name}()")
    vecs = [v for _, v, _ in compiled]
    rows = [r for _, _, r in compiled]
    typ = BOOL if node.name == "isnan" else NUM
    return typ, (lambda c: vf(*[v(c) for v in vecs])), (lambda r: rf(*[f(r) for f in rows]))


def _need(typ: str, want: str, node: Node, what: str) -> None:
    if typ != want:
        raise ExprError(f"{what} needs a {want}, got a {typ}", node.pos)
