"""Seeded synthetic arithmetic word problems (the default task).

Each problem chains 1..max_steps operations (+, -, x) on numbers up to max_operand, in a short story,
and its answer is a non-negative integer. The held-out split is chosen by a hash of the *computation*
(operations and numbers), not of the wording, so no sum seen in training is ever asked in evaluation.
"""

from __future__ import annotations

import hashlib
import random

OBJECTS = ["apples", "pens", "coins", "books", "stickers", "marbles", "cards", "shells", "stamps", "cookies"]
NAMES = ["Ann", "Ben", "Cara", "Dev", "Eli", "Fay", "Gus", "Hana", "Ivan", "Jo", "Kim", "Leo", "Mia", "Noor"]

# (opening, step templates by op); {n} name, {o} objects, {a} {b} numbers
START = "{n} has {a} {o}."
STEPS = {
    "+": ["{n} gets {b} more.", "{n} finds {b} more.", "A friend gives {n} {b} more."],
    "-": ["{n} gives away {b}.", "{n} loses {b}.", "{n} uses {b} of them."],
    "*": ["Then {n} ends up with {b} times as many.", "The number of {o} is multiplied by {b}."],
}
QUESTION = "How many {o} does {n} have now?"


def _split_of(key: str, eval_fraction: float) -> str:
    h = int(hashlib.sha256(key.encode()).hexdigest()[:8], 16) / 0xFFFFFFFF
    return "eval" if h < eval_fraction else "train"


def make_problem(rng: random.Random, steps: int, max_operand: int) -> tuple[str, int, str]:
    """One problem: (question text, integer answer, computation key such as '7+5-3')."""
    n, o = rng.choice(NAMES), rng.choice(OBJECTS)
    value = rng.randint(2, max_operand)
    text, key = [START.format(n=n, o=o, a=value)], str(value)
    for _ in range(steps):
        ops = "+-*" if value <= max_operand else "+-"
        op = rng.choice(ops.replace("-", "") if value == 0 else ops)  # nothing left to take away from 0
        if op == "+":
            b = rng.randint(1, max_operand)
            value += b
        elif op == "-":
            b = rng.randint(1, value)
            value -= b
        else:
            b = rng.randint(2, min(5, max_operand))
            value *= b
        text.append(rng.choice(STEPS[op]).format(n=n, o=o, b=b))
        key += f"{op}{b}"
    text.append(QUESTION.format(n=n, o=o))
    return " ".join(text), value, key


def arithmetic_splits(
    num_train: int, num_eval: int, max_operand: int, max_steps: int, seed: int, curriculum: bool = True,
    min_steps: int = 1,
) -> tuple[list[dict], list[dict]]:
    """Rows {'prompt', 'answer', 'steps'} for train and held-out; disjoint by computation key."""
    rng = random.Random(seed)
    train: list[dict] = []
    held: list[dict] = []
    seen: set[str] = set()
    attempts = 0
    while len(train) < num_train or len(held) < num_eval:
        attempts += 1
        if attempts > 50 * (num_train + num_eval):
            break  # the space of distinct computations is smaller than asked for
        steps = rng.randint(min_steps, max_steps)
        question, answer, key = make_problem(rng, steps, max_operand)
        if key in seen:
            continue
        seen.add(key)
        target = held if _split_of(key, 0.2) == "eval" else train
        limit = num_eval if target is held else num_train
        if len(target) < limit:
            target.append({"prompt": question, "answer": str(answer), "steps": steps})
    if curriculum:
        train.sort(key=lambda r: r["steps"])  # stable: one-step problems first, then two-step, ...
    return train, held
