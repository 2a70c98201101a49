"""The self-verification proxy: each rule on hand-written positives and tricky negatives, and the rate."""

import pytest

from grouprl.verification import equations, self_checks, verification_rate, tool_checked


def done(reasoning: str, answer: str) -> str:
    return f"<reasoning>\n{reasoning}\n</reasoning>\n<answer>\n{answer}\n</answer>"


# ---------------------------------------------------------------- equations


def test_equations_parse_ops_and_skip_chains_and_decimals():
    text = "5 + 3 = 8. Then 8 x 2 = 16, 16 ÷ 4 = 4 and 9 × 3=27; 1 + 5 x 1 = 11; 2.5 + 1 = 3.5; 7 - 9 = -2"
    expected = [(3, "+", 5, 8), (2, "*", 8, 16), (16, "/", 4, 4), (3, "*", 9, 27), (7, "-", 9, -2)]
    assert equations(text) == expected


# ---------------------------------------------------------------- check_words


@pytest.mark.parametrize(
    "reasoning",
    [
        "5 + 3 = 8\nLet me check: Ann had 5 and got 3.",
        "5 + 3 = 8\nDouble-check the sum.",
        "5 + 3 = 8, I VERIFY this.",
        "5 + 3 = 8, which confirms it.",
        "5 + 3 = 8\nTo make sure, count again.",
        "5 + 3 = 8\nLet me re-read the problem.",
        "5 + 3 = 8\nRecalculating gives 8.",
        "5 + 3 = 8\nre-count: 8",
        "If 8 - 4 = 2, total there must be 16, is that correct?",  # from runs/issue8, step 6
    ],
)
def test_check_words_fire(reasoning):
    assert self_checks(done(reasoning, "8")) == ["check_words"]


@pytest.mark.parametrize(
    "reasoning",
    [
        "5 + 3 = 8\nThe correct answer is 8.",  # asserting, not checking
        "5 + 3 = 8\nLet me reason: Ann has 5 apples.",  # 'let me re...' without the hyphen
        "Ann has 5 checkers.\n5 + 3 = 8",  # not a whole word
        "Ann gets 3 more. How many apples does Ann have now?\n5 + 3 = 8",  # the question restated
        "Ann has 5 reds and gets 3 more.\n5 + 3 = 8",  # 're' + 'd' is not redo
    ],
)
def test_check_words_negatives(reasoning):
    assert self_checks(done(reasoning, "8")) == []


def test_only_the_reasoning_counts():
    checked_in_answer = "<reasoning>\n5 + 3 = 8\n</reasoning>\n<answer>\n8, checked: 8 - 3 = 5\n</answer>"
    assert self_checks(checked_in_answer) == []
    # without </reasoning> everything is reasoning
    truncated = "<reasoning>\n5 + 3 = 8\nchecked: 8 - 3 = 5\n8 x 2 = 16"
    assert self_checks(truncated) == ["check_words", "inverse_operation"]


# ---------------------------------------------------------------- inverse_operation


@pytest.mark.parametrize(
    "reasoning, answer",
    [
        ("5 + 3 = 8\n8 - 3 = 5", "8"),
        ("5 + 3 = 8\n8 - 5 = 3", "8"),
        ("12 - 5 = 7\n7 + 5 = 12", "7"),
        ("12 - 5 = 7\n5 + 7 = 12", "7"),  # operands in either order
        ("12 - 5 = 7\n12 - 7 = 5", "7"),
        ("6 x 4 = 24\n24 / 4 = 6", "24"),
        ("6 * 4 = 24\n24 ÷ 6 = 4", "24"),
        ("24 / 4 = 6\n6 × 4 = 24", "6"),
        # two-step problem (5 + 3 = 8, then x 2) whose first step is checked before the second
        ("5 + 3 = 8\n8 - 3 = 5\n8 x 2 = 16", "16"),
    ],
)
def test_inverse_operation_fires(reasoning, answer):
    assert self_checks(done(reasoning, answer)) == ["inverse_operation"]


@pytest.mark.parametrize(
    "reasoning, answer",
    [
        ("5 + 3 = 8", "8"),  # a single equation, then the answer
        ("5 + 3 = 8\n8 - 2 = 6", "6"),  # two steps of a two-step problem
        ("5 + 3 = 8\n8 x 2 = 16", "16"),
        ("5 + 3 = 8\n8 - 3 = 5", "5"),  # 'gets 3 more, then loses 3': the second step gives the answer
        ("5 + 3 = 8\n8 - 3 = 4", "8"),  # wrong arithmetic does not undo the first equation
        ("6 x 4 = 24\n24 - 4 = 20", "20"),  # the wrong inverse op is a next step
        ("8 - 3 = 5\n5 + 3 = 8", "8"),  # 'loses 3, then gets 3' likewise
    ],
)
def test_inverse_operation_negatives(reasoning, answer):
    assert self_checks(done(reasoning, answer)) == []


def test_inverse_without_answer_uses_last_equation():
    # no <answer>: the final answer is 5, the later result, so this is read as a two-step problem
    assert self_checks("<reasoning>\n5 + 3 = 8\n8 - 3 = 5\n</reasoning>") == []


# ---------------------------------------------------------------- recomputed


@pytest.mark.parametrize(
    "reasoning, answer",
    [
        ("5 + 3 = 8\nSo again 5 + 3 = 8", "8"),
        ("19 + 5 = 24\nThat is 5 + 19 = 24", "24"),  # commuted
        ("5 + 3 = 8\n2 x 4 = 8", "8"),  # two independent derivations of the answer
        ("5 + 3 = 8\n8 x 2 = 16\nAlso 8 + 8 = 16", "16"),  # both start from the step before, not the answer
    ],
)
def test_recomputed_fires(reasoning, answer):
    assert self_checks(done(reasoning, answer)) == ["recomputed"]


@pytest.mark.parametrize(
    "reasoning, answer",
    [
        ("5 + 3 = 8\nAnn has 8 apples.", "8"),  # the result restated in words
        ("4 + 4 = 8\n8 x 1 = 8", "8"),  # a chain whose second step starts from the answer
        ("2 + 2 = 4\n4 x 2 = 8\n8 - 2 = 4", "4"),  # a chain back to the answer through 8
        ("5 + 3 = 8\n10 - 2 = 8", "6"),  # two equations with one result, but not the final answer
        ("5 - 3 = 2\n8 - 3 = 5", "5"),  # same operator and operand, different equations
    ],
)
def test_recomputed_negatives(reasoning, answer):
    assert self_checks(done(reasoning, answer)) == []


def test_rules_combine():
    text = done("5 + 3 = 8\nLet me verify: 8 - 3 = 5, and 5 + 3 = 8 again.", "8")
    assert self_checks(text) == ["check_words", "inverse_operation", "recomputed"]


# ---------------------------------------------------------------- verification_rate


def test_verification_rate_counts_per_rule():
    completions = [
        done("5 + 3 = 8", "8"),  # none
        done("5 + 3 = 8\nCheck: 8 - 3 = 5", "8"),  # check_words, inverse_operation
        done("5 + 3 = 8\n8 x 2 = 16", "16"),  # none
        done("6 x 4 = 24\n4 x 6 = 24", "24"),  # recomputed
        "<reasoning>\nThe answer is 7",  # none (truncated)
    ]
    rate, counts = verification_rate(iter(completions))  # any iterable
    assert rate == 2 / 5
    assert counts == {"check_words": 1, "inverse_operation": 1, "recomputed": 1}


def test_verification_rate_empty():
    assert verification_rate([]) == (0.0, {"check_words": 0, "inverse_operation": 0, "recomputed": 0})


def _episode(*results: str, answer: str = "<answer>\n36\n</answer>", role: str = "tool") -> list[dict]:
    """A calculator episode: a call turn before each result, then the answer turn."""
    out = [{"role": "system", "content": "s"}, {"role": "user", "content": "q"}]
    for r in results:
        reply = {"role": "tool", "content": r} if role == "tool" else {
            "role": "user", "content": f"<tool_response>\n{r}\n</tool_response>"}
        out += [{"role": "assistant", "content": "<tool_call>...</tool_call>"}, reply]
    return out + [{"role": "assistant", "content": answer}]


@pytest.mark.parametrize("results, role", [
    (("36", "12"), "tool"),  # 36 in hand, then 36 / 3 = 12 checked: the answer 36
    (("12", "36", "36"), "tool"),  # 4 + 8, 12 * 3, then 3 * 12 again
    (("36", "3"), "user"),  # a template without a tool role: results in <tool_response> tags
    (("36.0", "12"), "tool"),  # results compare as numbers
])
def test_a_further_call_after_the_answer_is_a_check(results, role):
    assert tool_checked(_episode(*results, role=role))


@pytest.mark.parametrize("messages", [
    _episode("12", "36"),  # two chained steps whose last call reaches the answer
    _episode("36"),  # one call, then the answer
    _episode(),  # no call
    _episode("36", "12", answer="I think 36"),  # no answer in tags
    _episode("12", "7", answer="<answer>\n12\n</answer>")[:-1] + [  # the last turn calls instead of answering
        {"role": "assistant", "content": "<tool_call>...</tool_call>"}],
    _episode("5", "36", answer="<answer>\n40\n</answer>"),  # the answer never came back from the tool
    [{"role": "assistant", "content": "two calls"}, {"role": "tool", "content": "36"},  # two calls in one turn:
     {"role": "tool", "content": "12"}, {"role": "assistant", "content": "<answer>\n36\n</answer>"}],  # no check
])
def test_no_check_without_a_call_after_the_answer_came_back(messages):
    assert not tool_checked(messages)
