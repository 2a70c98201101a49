"""The calculator environment: one tool that evaluates an arithmetic expression. The expression is parsed
(Python's `ast`), never passed to eval: only numbers, + - * / // % ** and parentheses, with bounds on the
expression's length, its number of operations, the size of every number and the exponent, so no expression
can take long or much memory. It runs over the arithmetic and gsm8k-format tasks, whose correctness reward
scores the final answer."""

from __future__ import annotations

import ast
import math
import operator

from grouprl.envs import Environment

MAX_CHARS = 200
MAX_NODES = 64
MAX_EXPONENT = 64
MAX_ABS = 10.0**30

BINARY = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
          ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod, ast.Pow: operator.pow}
UNARY = {ast.UAdd: operator.pos, ast.USub: operator.neg}


def evaluate(expression: str) -> int | float:
    """The value of an arithmetic expression; ValueError (with what is wrong) otherwise."""
    if len(expression) > MAX_CHARS:
        raise ValueError(f"the expression is longer than {MAX_CHARS} characters")
    try:
        tree = ast.parse(expression.strip().replace("^", "**").replace("×", "*").replace("÷", "/"), mode="eval")
    except SyntaxError:
        raise ValueError(f"cannot parse {expression!r}: expected numbers, + - * / // % ** and parentheses") from None
    if sum(1 for _ in ast.walk(tree)) > MAX_NODES:
        raise ValueError(f"the expression has more than {MAX_NODES} parts")
    return _value(tree.body)


def _value(node: ast.AST) -> int | float:
    if isinstance(node, ast.Constant) and type(node.value) in (int, float):
        return _bounded(node.value)
    if isinstance(node, ast.UnaryOp) and type(node.op) in UNARY:
        return UNARY[type(node.op)](_value(node.operand))
    if isinstance(node, ast.BinOp) and type(node.op) in BINARY:
        left, right = _value(node.left), _value(node.right)
        if isinstance(node.op, ast.Pow) and abs(right) > MAX_EXPONENT:
            raise ValueError(f"exponent {right} is larger than {MAX_EXPONENT}")
        if isinstance(node.op, (ast.Div, ast.FloorDiv, ast.Mod)) and right == 0:
            raise ValueError("division by zero")
        if isinstance(node.op, ast.Pow) and left == 0 and right < 0:
            raise ValueError("zero to a negative power")
        try:
            value = BINARY[type(node.op)](left, right)
        except (OverflowError, ValueError) as e:
            raise ValueError(str(e)) from None
        if isinstance(value, complex):
            raise ValueError("the result is not a real number")
        return _bounded(value)
    raise ValueError(f"{ast.unparse(node)!r} is not arithmetic: expected numbers, + - * / // % ** and parentheses")


def _bounded(x: int | float) -> int | float:
    if abs(x) > MAX_ABS or not math.isfinite(x):  # (an int past float's range makes isfinite raise)
        raise ValueError(f"a number is larger than {MAX_ABS:.0e}")
    return x


def show(x: int | float) -> str:
    """A result as the model should read it: whole numbers without '.0', others to 10 significant digits."""
    if isinstance(x, float) and x.is_integer():
        return str(int(x))
    return str(x) if isinstance(x, int) else f"{x:.10g}"


class Calculator(Environment):
    """Arithmetic as a tool."""

    def calculate(self, expression: str) -> str:
        """Evaluate an arithmetic expression.

        Args:
            expression: numbers with + - * / and parentheses, for example "(12 + 7) * 3"
        """
        return show(evaluate(expression))

    def demonstrate(self, row: dict) -> list[dict] | None:
        """A row with an `expression` (word_problems' rows have one), worked one operation per call: each call
        is an operation on numbers the story gives or an earlier call returned, innermost first ("(4+8)*3":
        4 + 8, then 12 * 3), then the answer. None for a row without an expression."""
        expression = row.get("expression")
        if not isinstance(expression, str):
            return None
        messages: list[dict] = []
        result = ""
        for step in steps(expression):
            result = self.calculate(step)
            call = {"type": "function", "function": {"name": "calculate", "arguments": {"expression": step}}}
            messages += [{"role": "assistant", "content": "", "tool_calls": [call]}, {"role": "tool", "content": result}]
        return messages + [{"role": "assistant", "content": f"<answer>\n{result}\n</answer>"}]


def steps(expression: str) -> list[str]:
    """The operations of an expression one at a time, innermost first (left before right), each on numbers:
    "12+5*3" -> ["5 * 3", "12 + 15"]. A bare number is one step, itself."""
    tree = ast.parse(expression, mode="eval")
    out: list[str] = []

    def reduce(node: ast.AST) -> ast.AST:
        if not isinstance(node, ast.BinOp):
            return node
        node = ast.BinOp(reduce(node.left), node.op, reduce(node.right))
        out.append(ast.unparse(node))
        return ast.parse(show(evaluate(out[-1])), mode="eval").body  # as the model reads it back

    reduce(tree.body)
    return out or [expression]
