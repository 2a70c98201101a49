"""Countdown: reach a target from given numbers with + - * / (each number used at most once).

The reference answer is the target; the `countdown` reward checks the expression in <answer> by
evaluating it (a small AST walk, never eval) and checking the numbers it uses.
"""

from __future__ import annotations

import ast
import random
from collections import Counter
from fractions import Fraction

OPS = {ast.Add: lambda a, b: a + b, ast.Sub: lambda a, b: a - b, ast.Mult: lambda a, b: a * b,
       ast.Div: lambda a, b: a / b}


def evaluate(expr: str) -> tuple[Fraction, list[int]]:
    """Exact value of an arithmetic expression and the integer literals it uses. Raises ValueError."""
    try:
        tree = ast.parse(expr.strip(), mode="eval")
    except SyntaxError:
        raise ValueError("not an expression") from None
    used: list[int] = []

    def walk(node: ast.AST) -> Fraction:
        if isinstance(node, ast.BinOp) and type(node.op) in OPS:
            left, right = walk(node.left), walk(node.right)
            if isinstance(node.op, ast.Div) and right == 0:
                raise ValueError("division by zero")
            return OPS[type(node.op)](left, right)
        if isinstance(node, ast.Constant) and isinstance(node.value, int) and not isinstance(node.value, bool):
            used.append(node.value)
            return Fraction(node.value)
        raise ValueError(f"unsupported element {type(node).__name__}")

    return walk(tree.body), used


def check(expr: str, numbers: list[int], target: int) -> bool:
    """True when expr evaluates exactly to target using only the given numbers, each at most once."""
    try:
        value, used = evaluate(expr)
    except (ValueError, RecursionError):
        return False
    return value == target and not (Counter(used) - Counter(numbers))


def countdown_splits(num_train: int, num_eval: int, seed: int, count: int = 3, max_number: int = 20):
    """Rows {'prompt', 'answer', 'numbers', 'target'}: a solvable target made from `count` numbers."""
    rng = random.Random(seed)
    rows, seen = [], set()
    while len(rows) < num_train + num_eval and len(seen) < 50 * (num_train + num_eval):
        numbers = [rng.randint(1, max_number) for _ in range(count)]
        a, b, c = numbers[0], numbers[1], numbers[2] if count > 2 else 0
        op1, op2 = rng.choice("+-*"), rng.choice("+-*")
        value, _ = evaluate(f"({a} {op1} {b}) {op2} {c}" if count > 2 else f"{a} {op1} {b}")
        target = int(value)
        key = (tuple(sorted(numbers)), target)
        if target <= 0 or key in seen:
            seen.add(key)
            continue
        seen.add(key)
        shown = sorted(numbers)
        rows.append({
            "prompt": f"Using the numbers {shown}, each at most once, with + - * / and parentheses, "
            f"write an expression equal to {target}.",
            "answer": str(target), "numbers": shown, "target": target,
        })
    rng.shuffle(rows)
    return rows[num_eval:], rows[:num_eval]
