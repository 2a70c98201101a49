"""Seeded word problems with all four operations, one and two steps, in many phrasings.

Each problem is a phrasing of one of thirteen expression forms (a+b, a-b, a*b, a/b; a+b*c, (a+b)/c, ...),
with numbers drawn so that every intermediate result is a positive whole number. The held-out split differs
from the training split twice over: its problems use phrasings that training never shows (HELD_OUT), and
no computation (the expression with its numbers) appears in both. So held-out accuracy measures whether a
model learned to turn a story into arithmetic, not whether it learned the training sentences.

Each row carries its `expression` (what a calculator should be asked) and `steps`, for demonstrations
(the calculator environment's `demonstrate`) and for accuracy by number of steps.
"""

from __future__ import annotations

import ast
import functools
import itertools
import random
import re
from fractions import Fraction

from grouprl.errors import UserError
from grouprl.tasks.arithmetic import NAMES, OBJECTS

# form -> (training phrasings, held-out phrasings); {n} a name, {o} objects (plural), {a} {b} {c} the numbers
PHRASINGS: dict[str, tuple[list[str], list[str]]] = {
    "{a}+{b}": ([
        "{n} has {a} {o}. {n} buys {b} more. How many {o} does {n} have now?",
        "There are {a} {o} in a box and {b} {o} on the table. How many {o} are there in all?",
        "{n} collected {a} {o} on Monday and {b} on Tuesday. How many {o} did {n} collect?",
        "On a walk {n} finds {a} {o}, and on the way back {b} more. How many {o} does {n} find on the walk?",
        "{n} earns {a} coins on Saturday and {b} coins on Sunday. How many coins does {n} earn over the weekend?",
        "{a} {o} were in a bag, and {n} put in another {b}. How many {o} are in the bag now?",
    ], [
        "A shop had {a} {o}. A delivery brought {b} more. How many {o} does the shop have?",
        "{n} is given {b} {o} and already owned {a}. What is the total number of {o} {n} owns?",
    ]),
    "{a}-{b}": ([
        "{n} has {a} {o} and gives {b} to a friend. How many {o} are left?",
        "A jar holds {a} {o}. {b} are taken out. How many {o} remain in the jar?",
        "{n} had {a} {o} and lost {b} of them. How many {o} does {n} have now?",
        "{n} baked {a} cookies and ate {b}. How many cookies are left?",
        "{n} had {a} coins and spent {b} of them. How many coins does {n} have left?",
        "There were {a} {o} on the shelf until {n} took {b} away. How many {o} are on the shelf now?",
    ], [
        "Of the {a} {o} in a basket, {b} are sold. How many {o} are still in the basket?",
        "{n} needs {a} {o} and has found {b} so far. How many more {o} does {n} need?",
    ]),
    "{a}*{b}": ([
        "{n} buys {a} packs of {o} with {b} in each pack. How many {o} does {n} buy?",
        "There are {a} shelves with {b} {o} on each shelf. How many {o} are on the shelves?",
        "{n} saves {b} {o} every day for {a} days. How many {o} does {n} save?",
        "{n} has {a} bags, and each bag holds {b} {o}. How many {o} are in all the bags?",
        "{n} earns {b} coins an hour and works for {a} hours. How many coins does {n} earn?",
        "{a} plates are on the table, with {b} {o} on every plate. How many {o} are there on the plates?",
    ], [
        "A box has {a} rows of {b} {o}. How many {o} are in the box?",
        "Each of {a} children brings {b} {o}. How many {o} do the children bring altogether?",
    ]),
    "{a}/{b}": ([
        "{n} shares {a} {o} equally among {b} friends. How many {o} does each friend get?",
        "{a} {o} are packed into bags of {b}. How many bags are filled?",
        "{n} splits {a} {o} into {b} equal groups. How many {o} are in each group?",
        "{a} {o} are shared equally by {b} children. How many {o} does each child get?",
        "{n} fills {b} boxes equally with {a} {o}. How many {o} go in each box?",
        "A rope {a} meters long is cut into pieces {b} meters long. How many pieces are there?",
    ], [
        "A teacher hands out {a} {o} so that each of {b} students gets the same number. How many {o} does "
        "each student get?",
        "{n} uses {b} {o} a day. How many days do {a} {o} last?",
    ]),
    "{a}+{b}*{c}": ([
        "{n} has {a} {o} and buys {b} packs of {c} {o}. How many {o} does {n} have now?",
        "A shelf holds {a} loose {o} and {b} boxes with {c} {o} each. How many {o} are on the shelf?",
        "{n} had {a} {o}, then bought {b} boxes with {c} {o} in each box. How many {o} does {n} have in all?",
        "A jar holds {a} coins. For {b} weeks, {n} adds {c} coins a week. How many coins are in the jar at the end?",
        "There are {a} {o} on a table and {b} bowls of {c} {o} beside it. How many {o} are there altogether?",
    ], [
        "{n} starts with {a} {o}, then gets {c} {o} from each of {b} friends. How many {o} does {n} have?",
    ]),
    "{a}*{b}-{c}": ([
        "{n} buys {a} packs of {b} {o} and gives away {c}. How many {o} does {n} keep?",
        "There are {a} bags with {b} {o} in each. {c} {o} are eaten. How many {o} are left?",
        "{n} fills {a} boxes with {b} {o} each, then {c} {o} go missing. How many {o} are left?",
        "Over {a} weeks {n} is paid {b} coins a week, and {n} has spent {c} of them. How many coins does {n} "
        "have left?",
        "A crate holds {a} trays of {b} {o}, and {c} of the {o} are broken. How many {o} are not broken?",
    ], [
        "A farm gathers {b} {o} a day for {a} days, then sells {c} of them. How many {o} does the farm still "
        "have?",
    ]),
    "({a}+{b})*{c}": ([
        "Each of {c} boxes holds {a} red {o} and {b} blue {o}. How many {o} are in the boxes?",
        "{n} reads {a} pages in the morning and {b} pages at night, every day for {c} days. How many pages "
        "does {n} read?",
        "{n} buys {c} bags of {o}. In every bag there are {a} green ones and {b} yellow ones. How many {o} "
        "does {n} buy?",
        "{n} walks {a} km to school and {b} km back home each day. How many km does {n} walk in {c} days?",
        "For {c} weeks, {n} earns {a} coins for chores and {b} coins for homework every week. How many coins "
        "does {n} earn in all?",
    ], [
        "A class has {c} tables, with {a} girls and {b} boys at each table. How many children are in the class?",
    ]),
    "({a}-{b})*{c}": ([
        "Each of {c} bags starts with {a} {o}, and {b} {o} are taken out of every bag. How many {o} are left in "
        "the bags?",
        "A ticket costs {a} coins, and {n} gets {b} coins off each one. How many coins does {n} pay for {c} "
        "tickets?",
        "In each of {c} weeks {n} is paid {a} coins and spends {b}. How many coins has {n} saved by the end?",
        "Each of {c} shelves had {a} {o}, and {n} took {b} {o} from every shelf. How many {o} are left on the shelves?",
        "A pack has {a} cookies, and {b} in each pack are broken. How many whole cookies are in {c} packs?",
    ], [
        "Every day {n} picks {a} {o} and drops {b} of them. How many {o} does {n} keep after {c} days?",
    ]),
    "({a}+{b})/{c}": ([
        "{n} has {a} {o} and buys {b} more, then shares them all equally among {c} friends. How many {o} does "
        "each friend get?",
        "{a} red {o} and {b} blue {o} are packed into bags of {c}. How many bags are filled?",
        "A coach has {a} balls in one bag and {b} in another, and puts them all in piles of {c}. How many "
        "piles does the coach make?",
        "{n} earns {a} coins and finds {b} coins, then splits them evenly into {c} jars. How many coins go in "
        "each jar?",
        "A farmer picks {a} apples in the morning and {b} in the afternoon and packs them in boxes of {c}. "
        "How many boxes are filled?",
    ], [
        "Two classes with {a} and {b} students are split into teams of {c}. How many teams are there?",
    ]),
    "({a}-{b})/{c}": ([
        "{n} has {a} {o}, keeps {b} for later, and shares the rest equally among {c} friends. How many {o} does "
        "each friend get?",
        "Of {a} {o}, {b} are broken. The rest are packed into boxes of {c}. How many boxes are filled?",
        "{n} spends {b} of {a} coins. The coins left are shared equally by {c} friends. How many coins does "
        "each friend get?",
        "{b} of {a} {o} are set aside. The others fill {c} bags, the same number in each. How many {o} are in one bag?",
        "A box has {a} cookies. After {b} are eaten, the rest are put in groups of {c}. How many groups are there?",
    ], [
        "A baker makes {a} {o}, sells {b}, and puts the rest in {c} equal rows. How many {o} are in each row?",
    ]),
    "{a}/{b}+{c}": ([
        "{n} shares {a} {o} equally among {b} friends, and one friend already had {c}. How many {o} does that "
        "friend have now?",
        "{a} {o} are split into {b} equal piles, and {c} more are added to one pile. How many {o} are in that "
        "pile?",
        "{n} splits {a} {o} evenly into {b} boxes and then adds {c} {o} to one box. How many {o} are in that box?",
        "{a} coins are shared equally by {b} children, and one child also has {c} coins of her own. How many "
        "coins does that child have?",
        "{n} puts {a} {o} into bags of {b} and already has {c} full bags. How many bags does {n} have now?",
    ], [
        "{n} gets one of {b} equal shares of {a} {o}, then finds {c} more. How many {o} does {n} have?",
    ]),
    "{a}*{b}/{c}": ([
        "{n} buys {a} packs of {b} {o} and shares them equally among {c} friends. How many {o} does each friend "
        "get?",
        "There are {a} boxes of {b} {o}. They are repacked into bags of {c}. How many bags are filled?",
        "{a} bags hold {b} {o} each, and the {o} are shared equally by {c} children. How many {o} does each child get?",
        "{n} bakes {a} trays of {b} cookies and puts them into boxes of {c}. How many boxes does {n} fill?",
        "{c} friends pick {a} baskets in all, with {b} apples in each basket, and split the apples evenly. How "
        "many apples does each friend get?",
    ], [
        "A garden has {a} rows of {b} plants, shared evenly among {c} gardeners. How many plants does each "
        "gardener look after?",
    ]),
    "{a}+{b}-{c}": ([
        "{n} has {a} {o}, buys {b} more, and then gives away {c}. How many {o} does {n} have now?",
        "A bus has {a} people. At a stop {b} get on and {c} get off. How many people are on the bus?",
        "On Monday {n} had {a} {o}. By Tuesday {n} had gained {b} and lost {c}. How many {o} does {n} have on Tuesday?",
        "There are {a} {o} in a jar. {n} adds {b} and later takes out {c}. How many {o} are in the jar?",
        "{c} of a library's {a} books are thrown away, and {b} new books arrive. How many books does it have now?",
    ], [
        "{n} scored {a} points, won {b} more, and then lost {c}. How many points does {n} have?",
    ]),
}

MAX_ANSWER = 1000


def steps_of(form: str) -> int:
    return form.count("{") - 1


def value(expression: str) -> Fraction | None:
    """The exact value of a + - * / expression when every intermediate result (and the value) is a positive
    whole number, else None."""
    ops = {ast.Add: Fraction.__add__, ast.Sub: Fraction.__sub__, ast.Mult: Fraction.__mul__,
           ast.Div: Fraction.__truediv__}

    def walk(node) -> Fraction | None:
        if isinstance(node, ast.Constant):
            return Fraction(node.value)
        left, right = walk(node.left), walk(node.right)
        if left is None or right is None:
            return None
        got = ops[type(node.op)](left, right)
        return got if got.denominator == 1 and got > 0 else None

    return walk(ast.parse(expression, mode="eval").body)


@functools.cache
def computations(form: str, max_operand: int) -> tuple[tuple[str, int], ...]:
    """Every (expression, answer) of a form with numbers from 2 to max_operand whose steps are all whole and
    positive and whose answer is at most MAX_ANSWER, in a fixed order."""
    letters = [f for f in "abc" if f"{{{f}}}" in form]
    out = []
    for numbers in itertools.product(range(2, max_operand + 1), repeat=len(letters)):
        expression = form.format(**dict(zip(letters, numbers)))
        got = value(expression)
        if got is not None and got <= MAX_ANSWER:
            out.append((expression, int(got)))
    return tuple(out)


def word_problem_splits(num_train: int, num_eval: int, max_operand: int, min_steps: int, max_steps: int,
                        seed: int) -> tuple[list[dict], list[dict]]:
    """Rows {prompt, answer, steps, expression} for training (its phrasings) and held-out (the others), with
    no expression in both. Forms of min_steps..max_steps operations, drawn uniformly while each has new
    computations. Each split has its own seeded stream, so the held-out rows do not depend on num_train, and
    more training rows extend fewer. Asking for more problems than there are is a UserError."""
    forms = [f for f in PHRASINGS if min_steps <= steps_of(f) <= max_steps]
    held = _draw(random.Random(f"{seed}/eval"), num_eval, forms, 1, max_operand, set())
    train = _draw(random.Random(f"{seed}/train"), num_train, forms, 0, max_operand, {r["expression"] for r in held})
    if len(held) < num_eval or len(train) < num_train:
        total = sum(len(computations(f, max_operand)) for f in forms)
        raise UserError(f"word_problems: {total} distinct problems have {min_steps}..{max_steps} steps and numbers up "
                        f"to task.max_operand={max_operand}, fewer than task.num_train + task.num_eval = "
                        f"{num_train + num_eval}: lower those, or raise task.max_operand or task.max_steps")
    return train, held


def _draw(rng: random.Random, n: int, forms: list[str], split: int, max_operand: int, taken: set[str]) -> list[dict]:
    """n problems in the phrasings of `split` (0 training, 1 held-out), none with an expression in `taken`
    (which grows): each a uniformly drawn form that still has computations left, in a seeded order of its
    computations; fewer when every form has run out."""
    order = {f: rng.sample(computations(f, max_operand), len(computations(f, max_operand))) for f in forms}
    out: list[dict] = []
    while len(out) < n and order:
        form = rng.choice(sorted(order))
        while order[form] and order[form][-1][0] in taken:
            order[form].pop()
        if not order[form]:
            del order[form]
            continue
        expression, answer = order[form].pop()
        taken.add(expression)
        numbers = dict(zip([f for f in "abc" if f"{{{f}}}" in form], re.findall(r"\d+", expression)))
        text = rng.choice(PHRASINGS[form][split]).format(n=rng.choice(NAMES), o=rng.choice(OBJECTS), **numbers)
        out.append({"prompt": text, "answer": str(answer), "steps": steps_of(form), "expression": expression})
    return out
