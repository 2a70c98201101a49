"""A rule-based proxy for self-verification: does a completion check its result before answering?

DeepSeek-R1-style claims say RL teaches a model to verify itself; these rules make that measurable on the
arithmetic task. Only the reasoning counts: the text before `</reasoning>` (all of it if the tag is
missing). Equations are `a op b = c` with non-negative integer operands, op one of + - * x × / ÷ (x × * are
one op, / ÷ another), a lone operator on its left side (a chain such as `1 + 5 x 1 = 11` is skipped) and an
integer result; they need not be true, since the proxy measures the behaviour, not the arithmetic. The
final answer is the integer in `<answer>`, else the result of the last equation.

- `check_words`: checking language, whole words, case-insensitive: check/checked/checking, double-check,
  verify/verified/verification, confirm/confirmed, make sure, to be sure, re-calculate/recompute/recount/
  recheck/redo (hyphen optional), "let me re-..."/"let's re-..." (hyphen required: "let me reason" is
  not a check), and a question "is that/this/it correct/right?" (seen in real data: "If 8 - 4 = 2, total
  there must be 16, is that correct?"). Not "correct" alone: "The correct answer is 11" asserts, it
  does not check.
- `inverse_operation`: a later equation undoes an earlier one: after `a + b = c`, `c - b = a` or
  `c - a = b`; after `a - b = c`, `c + b = a` or `a - c = b`; after `a * b = c`, `c / b = a` or
  `c / a = b`; after `a / b = c`, `c * b = a` or `a / c = b`. Not when the later result is the final
  answer and the earlier one is not: that is the next step of the problem ("gets 3 more, then loses 3").
- `recomputed`: the same equation stated twice (`19 + 5 = 24` and `5 + 19 = 24` are the same), or two
  different equations give the final answer, neither taking as an operand the answer or a number computed
  from it (`5 + 3 = 8`, `8 x 2 = 16`, `8 + 8 = 16` fires; `4 + 4 = 8`, `8 x 1 = 8` is a chain of steps,
  and so is `2 + 2 = 4`, `4 x 2 = 8`, `8 - 2 = 4`).

A single equation followed by the answer, two chained steps of a two-step problem, or the question
restated fire nothing.

    >>> self_checks("<reasoning>\\n5 + 3 = 8\\nCheck: 8 - 3 = 5\\n</reasoning>\\n<answer>\\n8\\n</answer>")
    ['check_words', 'inverse_operation']
"""

from __future__ import annotations

import re
from collections.abc import Iterable

RULES = ("check_words", "inverse_operation", "recomputed")

CHECK_WORDS = re.compile(
    r"\b(?:(?:double-?)?check(?:s|ed|ing)?|verif(?:y|ies|ied|ying|ication)|confirm(?:s|ed|ing)?"
    r"|make sure|to be sure|re-?(?:calculat|comput|count|check)\w*|re-?do(?:ing|ne)?"
    r"|(?:let me|let's|let us) re-\w+)\b|\bis (?:that|this|it) (?:correct|right)\s*\?",
    re.IGNORECASE,
)
# a whole chain left of '=' so that `1 + 5 x 1 = 11` is seen as a chain and skipped, not as `5 x 1 = 11`
EQUATION = re.compile(r"(?<!\w)(?<!\d\.)(\d+(?:\s*[-+*x×/÷]\s*\d+)+)\s*=\s*(-?\d+)(?!\.?\d)")
TERM = re.compile(r"(\d+)\s*([-+*x×/÷])\s*(\d+)")
OP = {"+": "+", "-": "-", "*": "*", "x": "*", "×": "*", "/": "/", "÷": "/"}
ANSWER_INT = re.compile(r"<answer>\s*(-?\d+)\s*</answer>")

Equation = tuple[int, str, int, int]  # (a, op, b, c) for `a op b = c`, op in + - * /


def _eq(a: int, op: str, b: int, c: int) -> Equation:
    """Commutative ops with sorted operands, so that `19 + 5 = 24` equals `5 + 19 = 24`."""
    return (min(a, b), op, max(a, b), c) if op in "+*" else (a, op, b, c)


def equations(reasoning: str) -> list[Equation]:
    """The simple `a op b = c` equations of a text, in order."""
    found = []
    for m in EQUATION.finditer(reasoning):
        term = TERM.fullmatch(m.group(1))
        if term:  # a lone operator; chains are skipped
            found.append(_eq(int(term[1]), OP[term[2]], int(term[3]), int(m.group(2))))
    return found


def _inverses(a: int, op: str, b: int, c: int) -> set[Equation]:
    undo = {"+": "-", "-": "+", "*": "/", "/": "*"}[op]
    if op in "+*":  # a + b = c is undone by c - b = a and by c - a = b
        return {(c, undo, b, a), (c, undo, a, b)}
    return {_eq(c, undo, b, a), (a, op, c, b)}  # a - b = c is undone by c + b = a and by a - c = b


def self_checks(completion: str) -> list[str]:
    """Names of the rules (in RULES order) that fire on one completion; empty when none does."""
    reasoning = completion.split("</reasoning>")[0]
    eqs = equations(reasoning)
    answer = ANSWER_INT.search(completion)
    final = int(answer[1]) if answer else (eqs[-1][3] if eqs else None)
    fired = []
    if CHECK_WORDS.search(reasoning):
        fired.append("check_words")
    if any(
        later in _inverses(*earlier) and not (later[3] == final != earlier[3])
        for i, earlier in enumerate(eqs)
        for later in eqs[i + 1 :]
    ):
        fired.append("inverse_operation")
    derivations, from_final = set(), {final}  # from_final: the answer and what was computed from it
    for a, op, b, c in eqs:
        if a in from_final or b in from_final:
            from_final.add(c)  # a step that starts from the answer (4 + 4 = 8, 8 x 1 = 8) re-derives nothing
        elif c == final:
            derivations.add((a, op, b, c))
    if len(set(eqs)) < len(eqs) or len(derivations) > 1:
        fired.append("recomputed")
    return fired


def verification_rate(completions: Iterable[str]) -> tuple[float, dict[str, int]]:
    """(fraction of completions where any rule fires, {rule: completions where it fires}); 0.0 if none."""
    fired = [self_checks(completion) for completion in completions]
    counts = {rule: sum(rule in names for names in fired) for rule in RULES}
    return (sum(map(bool, fired)) / len(fired) if fired else 0.0), counts


# ---------------------------------------------------------------- the tool form: a further call before answering
TOOL_RESPONSE = re.compile(r"^\s*<tool_response>\s*(.*?)\s*</tool_response>\s*$", re.DOTALL)


def _number(text: str) -> float | None:
    try:
        return float(text.strip())
    except ValueError:
        return None


def tool_checked(messages: list[dict]) -> bool:
    """An episode that checks its result with the tool: after a tool result equal to its final answer (the
    whole number in `<answer>` of its last turn) it calls the tool again in a later turn, and then answers.
    A chain of steps that reaches the answer with its last call is not a check, nor are two calls in one
    turn, nor an episode without an answer. Tool results are `tool` messages, or `user` messages in
    <tool_response> tags (templates without a tool role)."""
    turns = [m for m in messages if m.get("role") == "assistant"]
    answer = ANSWER_INT.search(turns[-1].get("content") or "") if turns else None
    if answer is None:
        return False
    final, state = float(answer[1]), 0  # 0: the answer not yet read back, 1: read back, 2: and a turn since
    for m in messages:
        if m.get("role") == "assistant":
            state = 2 if state else 0
            continue
        if m.get("role") == "tool":
            result = m.get("content") or ""
        elif m.get("role") == "user" and (wrapped := TOOL_RESPONSE.match(m.get("content") or "")):
            result = wrapped[1]
        else:
            continue
        if state == 2:
            return True  # a call made in a later turn than the one whose result was the answer
        if _number(str(result)) == final:
            state = 1
    return False
