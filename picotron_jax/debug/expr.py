"""The breakpoint language (`debug.break_when`): names, numbers, arithmetic, comparisons, and/or/not.

Parsed with the `ast` module and checked against a whitelist of node types; evaluated by walking the
checked tree here. Nothing of the user's string is ever handed to `eval`/`exec`/`compile`-and-run:
calls, attributes, subscripts, lambdas, comprehensions, strings and names other than the step's
metrics are refused when the expression is parsed, with the column of the offending part.

    loss > 5 and step > 100
    grad_norm > 10 * grad_norm_median
    not (lr < 1e-5) or loss != loss          # loss != loss: the loss is NaN

Values are floats. `NAME_median` / `NAME_mean` / `NAME_max` are the median / mean / max of metric NAME
over the steps seen so far (this step included). Exponents must be number literals of magnitude at
most `MAX_EXPONENT` (no `10 ** 10 ** 10`).
"""

from __future__ import annotations

import ast
import math
import operator
from dataclasses import dataclass

from picotron_jax.errors import UserError

MAX_EXPONENT = 64
MAX_LENGTH = 500
AGGREGATES = ("median", "mean", "max")

_BIN = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
        ast.Mod: operator.mod, ast.Pow: operator.pow}
_CMP = {ast.Lt: operator.lt, ast.LtE: operator.le, ast.Gt: operator.gt, ast.GtE: operator.ge,
        ast.Eq: operator.eq, ast.NotEq: operator.ne}
_UNARY = {ast.USub: operator.neg, ast.UAdd: operator.pos, ast.Not: operator.not_}
_OP_NODES = tuple(_BIN) + tuple(_CMP) + tuple(_UNARY) + (ast.And, ast.Or)


def _describe(node: ast.AST) -> str:
    names = {ast.Call: "a function call", ast.Attribute: "attribute access", ast.Subscript: "a subscript",
             ast.Lambda: "a lambda", ast.ListComp: "a comprehension", ast.SetComp: "a comprehension",
             ast.DictComp: "a comprehension", ast.GeneratorExp: "a comprehension", ast.NamedExpr: "an assignment",
             ast.IfExp: "a conditional expression", ast.JoinedStr: "a string", ast.List: "a list",
             ast.Tuple: "a tuple", ast.Dict: "a dict", ast.Set: "a set", ast.Starred: "unpacking"}
    for typ, text in names.items():
        if isinstance(node, typ):
            return text
    if isinstance(node, ast.Constant):
        return f"the constant {node.value!r} (only numbers are allowed)"
    return f"{type(node).__name__}"


@dataclass(frozen=True)
class Expression:
    """A checked `debug.break_when` expression; `evaluate(values)` with a dict of floats."""

    text: str
    tree: ast.Expression
    names: frozenset[str]

    def evaluate(self, values: dict[str, float]) -> bool:
        return bool(_eval(self.tree.body, values))


def parse(text: str, known: set[str] | frozenset[str], field: str = "debug.break_when") -> Expression:
    """Check `text` against the language; `known`: the metric names it may use (plus their aggregates)."""
    def fail(why: str, col: int | None) -> UserError:
        where = f" at column {col + 1}" if col is not None else ""
        pointer = f"\n    {text}\n    {' ' * col}^" if col is not None else ""
        return UserError(f"config field '{field}' = {text!r}: {why}{where}{pointer}; the language has metric "
                         f"names, numbers, + - * / % **, comparisons, and/or/not and parentheses")

    if len(text) > MAX_LENGTH:
        raise fail(f"longer than {MAX_LENGTH} characters", None)
    try:
        tree = ast.parse(text.strip(), mode="eval")
    except SyntaxError as exc:
        raise fail(f"not an expression ({exc.msg})", (exc.offset or 1) - 1) from None
    allowed = set(known) | {f"{n}_{a}" for n in known for a in AGGREGATES if n != "step"}
    names: set[str] = set()
    for node in ast.walk(tree):
        col = getattr(node, "col_offset", None)
        if isinstance(node, (ast.Expression, ast.Load) + _OP_NODES):
            continue
        if isinstance(node, (ast.BoolOp, ast.BinOp, ast.UnaryOp, ast.Compare)):
            ops = node.ops if isinstance(node, ast.Compare) else [node.op]
            bad = [o for o in ops if not isinstance(o, _OP_NODES)]
            if bad:
                raise fail(f"the operator {type(bad[0]).__name__} is not allowed", col)
            if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Pow):
                exp = _literal(node.right)
                if exp is None or abs(exp) > MAX_EXPONENT:
                    raise fail(f"an exponent must be a number literal between -{MAX_EXPONENT} and {MAX_EXPONENT}",
                               getattr(node.right, "col_offset", col))
            continue
        if isinstance(node, ast.Name):
            if node.id not in allowed:
                raise fail(f"unknown name {node.id!r} (known: {', '.join(sorted(known))}, and NAME_median, "
                           f"NAME_mean, NAME_max)", col)
            names.add(node.id)
            continue
        if isinstance(node, ast.Constant) and type(node.value) in (int, float):
            value = node.value
            if (isinstance(value, float) and not math.isfinite(value)) or abs(value) > 1e30:
                raise fail("a number literal out of range (at most 1e30)", col)
            continue
        raise fail(f"{_describe(node)} is not allowed", col)
    return Expression(text, tree, frozenset(names))


def _literal(node: ast.AST) -> float | None:
    """The value of a number literal, possibly signed; None for anything else."""
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
        inner = _literal(node.operand)
        return None if inner is None else (-inner if isinstance(node.op, ast.USub) else inner)
    if isinstance(node, ast.Constant) and type(node.value) in (int, float):
        return float(node.value)
    return None


def _eval(node: ast.AST, values: dict[str, float]):
    if isinstance(node, ast.Constant):
        return float(node.value)
    if isinstance(node, ast.Name):
        return float(values[node.id])
    if isinstance(node, ast.UnaryOp):
        return _UNARY[type(node.op)](_eval(node.operand, values))
    if isinstance(node, ast.BinOp):
        left, right = _eval(node.left, values), _eval(node.right, values)
        try:
            return _BIN[type(node.op)](left, right)
        except ZeroDivisionError:
            return math.nan if left == 0 or math.isnan(left) else math.copysign(math.inf, left)
        except OverflowError:
            return math.inf
    if isinstance(node, ast.BoolOp):
        if isinstance(node.op, ast.And):
            return all(_eval(v, values) for v in node.values)
        return any(_eval(v, values) for v in node.values)
    if isinstance(node, ast.Compare):
        left = _eval(node.left, values)
        for op, comparator in zip(node.ops, node.comparators):
            right = _eval(comparator, values)
            if not _CMP[type(op)](left, right):
                return False
            left = right
        return True
    raise TypeError(f"unchecked node {type(node).__name__}")  # parse() admits nothing else
