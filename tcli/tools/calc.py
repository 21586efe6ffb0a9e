"""``calc``: exact arithmetic on integers and fractions, parsed with ``ast`` and never evaluated.

Only numbers, ``+ - * / // % **``, unary ``+``/``-`` and parentheses are accepted; every value is a
``Fraction``, so ``1/3 + 1/6`` is exactly ``1/2`` and ``0.1 + 0.2`` is exactly ``0.3`` (a decimal
literal is read from its digits, not through a float). Sizes are checked *before* each operation:
an exponent above ``MAX_EXPONENT`` or a result above ``MAX_BITS`` bits is refused, so
``9**9**9`` is an error in microseconds, not a hang.

The answer is printed as an integer when it is one, as an exact decimal when the reduced
denominator is 2^a·5^b (at most ``MAX_DECIMALS`` places), else as a reduced fraction ``p/q``.
"""

from __future__ import annotations

import ast
import operator
from fractions import Fraction

MAX_CHARS = 1000          # the expression's length
MAX_BITS = 10_000         # numerator and denominator of every intermediate value (~3,000 digits)
MAX_EXPONENT = 10_000     # |exponent| of **
MAX_DECIMALS = 50         # places shown for a terminating decimal; beyond that p/q


class CalcError(ValueError):
    """An expression calc refuses or cannot evaluate; the message is shown to the model."""


def _bits(x: Fraction) -> int:
    return max(x.numerator.bit_length(), x.denominator.bit_length())


def _checked(x: Fraction) -> Fraction:
    if _bits(x) > MAX_BITS:
        raise CalcError(f"result too large (over {MAX_BITS} bits)")
    return x


def _div(a: Fraction, b: Fraction) -> Fraction:
    if b == 0:
        raise CalcError("division by zero")
    return a / b


def _floordiv(a: Fraction, b: Fraction) -> Fraction:
    if b == 0:
        raise CalcError("division by zero")
    return Fraction(a // b)


def _mod(a: Fraction, b: Fraction) -> Fraction:
    if b == 0:
        raise CalcError("modulo by zero")
    return a % b


def _pow(a: Fraction, b: Fraction) -> Fraction:
    if b.denominator != 1:
        raise CalcError("only integer exponents are exact")
    e = b.numerator
    if abs(e) > MAX_EXPONENT:
        raise CalcError(f"exponent too large (|exponent| over {MAX_EXPONENT})")
    if a == 0 and e < 0:
        raise CalcError("division by zero")
    if abs(e) * _bits(a) > MAX_BITS + abs(e):  # a conservative bound on the result's bits
        if a not in (1, -1):
            raise CalcError(f"result too large (over {MAX_BITS} bits)")
    return a ** e


BINARY = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: _div,
          ast.FloorDiv: _floordiv, ast.Mod: _mod, ast.Pow: _pow}
UNARY = {ast.USub: operator.neg, ast.UAdd: operator.pos}
HINTS = {ast.BitXor: "use ** for powers", ast.MatMult: "use * to multiply"}


def _number(node: ast.Constant, source: str) -> Fraction:
    v = node.value
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise CalcError(f"not a number: {ast.get_source_segment(source, node) or v!r}")
    if isinstance(v, int):
        return _checked(Fraction(v))
    text = (ast.get_source_segment(source, node) or repr(v)).replace("_", "")
    try:
        return _checked(Fraction(text))  # the literal's digits, exactly
    except (ValueError, ZeroDivisionError):
        raise CalcError(f"not a number: {text}") from None


def _eval(node: ast.AST, source: str) -> Fraction:
    if isinstance(node, ast.Expression):
        return _eval(node.body, source)
    if isinstance(node, ast.Constant):
        return _number(node, source)
    if isinstance(node, ast.UnaryOp) and type(node.op) in UNARY:
        return UNARY[type(node.op)](_eval(node.operand, source))
    if isinstance(node, ast.BinOp) and type(node.op) in BINARY:
        a, b = _eval(node.left, source), _eval(node.right, source)
        return _checked(BINARY[type(node.op)](a, b))
    what = type(getattr(node, "op", node))
    hint = HINTS.get(what)
    raise CalcError(f"not allowed: {what.__name__}" + (f" ({hint})" if hint else "")
                    + "; only numbers, + - * / // % ** and parentheses")


def evaluate(expression: str) -> Fraction:
    """The exact value of ``expression``; CalcError says why not."""
    if not isinstance(expression, str):
        raise CalcError("the expression must be a string")
    text = expression.strip()
    if not text:
        raise CalcError("empty expression")
    if len(text) > MAX_CHARS:
        raise CalcError(f"expression too long (over {MAX_CHARS} characters)")
    try:
        tree = ast.parse(text, mode="eval")
    except (SyntaxError, ValueError, RecursionError, MemoryError) as e:
        raise CalcError(f"cannot parse: {type(e).__name__}: {getattr(e, 'msg', e)}") from None
    try:
        return _eval(tree, text)
    except RecursionError:
        raise CalcError("expression nested too deeply") from None


def format_value(x: Fraction) -> str:
    """An integer, an exact terminating decimal, or a reduced fraction p/q."""
    if x.denominator == 1:
        return str(x.numerator)
    d, twos, fives = x.denominator, 0, 0
    while d % 2 == 0:
        d, twos = d // 2, twos + 1
    while d % 5 == 0:
        d, fives = d // 5, fives + 1
    places = max(twos, fives)
    if d != 1 or places > MAX_DECIMALS:
        return f"{x.numerator}/{x.denominator}"
    scaled = abs(x.numerator) * (10 ** places // x.denominator)
    digits = str(scaled).rjust(places + 1, "0")
    sign = "-" if x < 0 else ""
    return f"{sign}{digits[:-places]}.{digits[-places:]}"


def calc(expression: str) -> str:
    """The formatted exact value of ``expression`` (raises CalcError)."""
    return format_value(evaluate(expression))
