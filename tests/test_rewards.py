"""Reward functions, their checked call boundary, loading user rewards, and the weighted RewardSet."""

import pytest
import torch
from torch.testing import assert_close

from grouprl.errors import UserError
from grouprl.rewards import (
    BUILTIN,
    RewardSet,
    answers_match,
    call_reward,
    correctness,
    countdown,
    extract_answer,
    load_reward,
    number,
    soft_format,
    strict_format,
    tag_count,
)

GOOD = "<reasoning>\n2 + 3 = 5\n</reasoning>\n<answer>\n5\n</answer>"
# a prompt that shows placeholders, as the gsm8k/dataset system prompt does
PLACEHOLDER_PROMPT = (
    "Answer in this format:\n<reasoning>\nyour working\n</reasoning>\n<answer>\nthe final number\n</answer>\n"
    "What is 2 + 3?\n<reasoning>\n"
)
# a prompt that shows a worked example, as the arithmetic system prompt does
EXAMPLE_PROMPT = (
    "Example:\n<reasoning>\n7 + 4 = 11\n</reasoning>\n<answer>\n11\n</answer>\nWhat is 2 + 3?\n<reasoning>\n"
)


def one(fn, completion, prompt="What is 2 + 3?", **columns):
    return fn([prompt], [completion], **{k: [v] for k, v in columns.items()})[0]


# ---------------------------------------------------------------- extract_answer


def test_extract_answer():
    assert extract_answer(GOOD) == "5"
    assert extract_answer("<answer> 42 </answer>") == "42"
    assert extract_answer("<answer>1</answer> then <answer>\n2\n</answer>") == "2"  # the last one
    assert extract_answer("<answer>\nmulti\nline\n</answer>") == "multi\nline"
    assert extract_answer("<answer></answer>") == ""
    assert extract_answer("no tags, 5") is None
    assert extract_answer("<answer>5") is None  # never closed


# ---------------------------------------------------------------- strict_format


def test_strict_format_accepts_the_exact_layout():
    assert one(strict_format, GOOD) == 1.0
    assert one(strict_format, GOOD + "\n  \n") == 1.0  # trailing whitespace allowed
    assert one(strict_format, "<reasoning>\nline 1\nline 2\n</reasoning>\n<answer>\n5\n</answer>") == 1.0


@pytest.mark.parametrize(
    "completion",
    [
        "<reasoning>2 + 3 = 5</reasoning>\n<answer>\n5\n</answer>",  # newlines missing inside reasoning
        "<reasoning>\n2 + 3 = 5\n</reasoning><answer>\n5\n</answer>",  # no newline between the blocks
        "Sure! " + GOOD,  # text before
        GOOD + "\nHope this helps.",  # text after
        "<answer>\n5\n</answer>\n<reasoning>\n2 + 3 = 5\n</reasoning>",  # wrong order
        "<reasoning>\n2 + 3 = 5\n</reasoning>\n",  # no answer
        "5",
        "",
    ],
)
def test_strict_format_rejects(completion):
    assert one(strict_format, completion) == 0.0


def test_strict_format_refuses_copied_placeholder():
    # the reasoning is the placeholder shown in the prompt: no format credit even though the layout is right
    copied = "<reasoning>\nyour working\n</reasoning>\n<answer>\n5\n</answer>"
    assert one(strict_format, copied, prompt=PLACEHOLDER_PROMPT) == 0.0
    # the answer placeholder copied
    copied_answer = "<reasoning>\n2 + 3 = 5\n</reasoning>\n<answer>\nthe final number\n</answer>"
    assert one(strict_format, copied_answer, prompt=PLACEHOLDER_PROMPT) == 0.0
    # the whole example copied from the prompt
    copied_example = "<reasoning>\n7 + 4 = 11\n</reasoning>\n<answer>\n11\n</answer>"
    assert one(strict_format, copied_example, prompt=EXAMPLE_PROMPT) == 0.0
    # the same completion is fine under a prompt that does not show it (the example's reasoning is real work)
    assert one(strict_format, copied_example, prompt="What is 2 + 3?") == 1.0
    # 'your working' is a known placeholder: refused under any prompt
    assert one(strict_format, copied, prompt="What is 2 + 3?") == 0.0
    # real content under the placeholder prompt is fine
    assert one(strict_format, GOOD, prompt=PLACEHOLDER_PROMPT) == 1.0


def test_format_credit_for_genuine_answer_equal_to_example_answer():
    # the arithmetic system prompt shows '<answer>\n11\n</answer>'; about 3% of the default training problems
    # have the answer 11. A completion with its own reasoning and the right answer 11 is not a copy.
    prompt = EXAMPLE_PROMPT.replace("What is 2 + 3?", "What is 5 + 6?")
    genuine = "<reasoning>\n5 + 6 = 11\n</reasoning>\n<answer>\n11\n</answer>"
    assert one(strict_format, genuine, prompt=prompt) == 1.0
    assert one(soft_format, genuine, prompt=prompt) == 1.0


@pytest.mark.parametrize("reasoning", ["...", ". . .", "..\n..", " "])
def test_strict_format_refuses_dots_as_reasoning(reasoning):
    completion = f"<reasoning>\n{reasoning}\n</reasoning>\n<answer>\n5\n</answer>"
    assert one(strict_format, completion) == 0.0
    assert one(strict_format, f"<reasoning>\n2 + 3 = 5\n</reasoning>\n<answer>\n{reasoning}\n</answer>") == 0.0


def test_strict_format_per_completion():
    prompts = ["q1", "q2", "q3"]
    assert strict_format(prompts, [GOOD, "nope", GOOD]) == [1.0, 0.0, 1.0]


# ---------------------------------------------------------------- soft_format


@pytest.mark.parametrize(
    "completion",
    [
        GOOD,
        "<reasoning>2 + 3 = 5</reasoning><answer>5</answer>",  # no whitespace at all
        "<reasoning> 2 + 3 = 5 </reasoning>   \n\n <answer> 5 </answer>",
        "Let me think. <reasoning>2 + 3 = 5</reasoning>\n<answer>5</answer> Done.",  # text around is allowed
    ],
)
def test_soft_format_accepts(completion):
    assert one(soft_format, completion) == 1.0


@pytest.mark.parametrize(
    "completion",
    [
        "<answer>5</answer><reasoning>2 + 3 = 5</reasoning>",  # wrong order
        "<reasoning>2 + 3 = 5</reasoning>",  # no answer
        "<reasoning>2 + 3 = 5</reasoning> so <answer>5</answer>",  # text between the blocks
        "<reasoning>...</reasoning><answer>5</answer>",  # dots as reasoning
        "<reasoning>2 + 3 = 5</reasoning><answer>...</answer>",
        "the answer is 5",
    ],
)
def test_soft_format_rejects(completion):
    assert one(soft_format, completion) == 0.0


def test_soft_format_refuses_copied_placeholder():
    assert one(soft_format, "<reasoning>\nyour working\n</reasoning>\n<answer>\n5\n</answer>",
               prompt=PLACEHOLDER_PROMPT) == 0.0
    assert one(soft_format, "<reasoning>your working</reasoning><answer>5</answer>", prompt=PLACEHOLDER_PROMPT) == 0.0
    inline_prompt = "Format: <reasoning>...</reasoning><answer>your answer</answer>"
    assert one(soft_format, "<reasoning>2+3=5</reasoning><answer>your answer</answer>", prompt=inline_prompt) == 0.0
    assert one(soft_format, "<reasoning>2+3=5</reasoning><answer>5</answer>", prompt=inline_prompt) == 1.0


# ---------------------------------------------------------------- tag_count


def test_tag_count_hand_worked():
    # all four tags once with their newlines: 4 * .25 = 1
    assert one(tag_count, GOOD) == pytest.approx(1.0, abs=1e-12)
    # trailing whitespace after </answer> is not penalised
    assert one(tag_count, GOOD + "\n\n") == pytest.approx(1.0, abs=1e-12)
    # "extra" after </answer>: 5 characters (after strip) -> 1 - .005 = .995
    assert one(tag_count, GOOD + "\nextra") == pytest.approx(0.995, abs=1e-12)
    # only the answer block, not preceded by a newline: '\n<answer>\n' absent, '\n</answer>' present -> .25
    assert one(tag_count, "<answer>\n5\n</answer>") == pytest.approx(0.25, abs=1e-12)
    # '<reasoning>\n' twice -> that tag earns nothing: 3 * .25 = .75
    assert one(tag_count, "<reasoning>\n<reasoning>\nx\n</reasoning>\n<answer>\n5\n</answer>") == pytest.approx(
        0.75, abs=1e-12
    )
    # no newlines anywhere: no tag matches its form -> 0, and the empty completion -> 0
    assert one(tag_count, "<reasoning>x</reasoning><answer>5</answer>") == 0.0
    assert one(tag_count, "") == 0.0


def test_tag_count_penalty_for_text_after_answer():
    # '\n</answer>' present once and 'abc' follows: .25 - .003 = .247 for the answer block alone
    assert one(tag_count, "<answer>\n5\n</answer>abc") == pytest.approx(0.247, abs=1e-12)


def test_tag_count_refuses_copied_placeholder():
    copied = "<reasoning>\nyour working\n</reasoning>\n<answer>\n5\n</answer>"
    assert one(tag_count, copied, prompt=PLACEHOLDER_PROMPT) < one(tag_count, GOOD, prompt=PLACEHOLDER_PROMPT)
    dots = "<reasoning>\n...\n</reasoning>\n<answer>\n5\n</answer>"
    assert one(tag_count, dots) < one(tag_count, GOOD)


# ---------------------------------------------------------------- correctness


@pytest.mark.parametrize(
    "completion, answer",
    [
        ("<reasoning>\nx\n</reasoning>\n<answer>\n5\n</answer>", "5"),
        ("<answer>1,200</answer>", "1200"),  # thousands separator
        ("<answer>1200</answer>", "1,200"),
        ("<answer>$1,200</answer>", "1200"),  # dollar sign
        ("<answer>1200.</answer>", "1200"),  # trailing full stop
        ("<answer>-3</answer>", "-3"),
        ("<answer>2.50</answer>", "2.5"),
        ("<answer>0.5</answer>", "1/2"),  # symbolic, via math-verify
        ("<answer>\\frac{1}{2}</answer>", "0.5"),
        ("<answer>1</answer><answer>5</answer>", "5"),  # the last answer counts
    ],
)
def test_correctness_right(completion, answer):
    assert one(correctness, completion, answer=answer) == 1.0


@pytest.mark.parametrize(
    "completion, answer",
    [
        ("<answer>6</answer>", "5"),  # wrong
        ("<answer>1,201</answer>", "1200"),
        ("<answer>0.51</answer>", "1/2"),
        ("the answer is 5", "5"),  # no tags
        ("<answer></answer>", "5"),  # empty
        ("<answer>   </answer>", "5"),
        ("<answer>5</answer><answer>6</answer>", "5"),  # the last answer is wrong
    ],
)
def test_correctness_wrong(completion, answer):
    assert one(correctness, completion, answer=answer) == 0.0


def test_correctness_batch_and_non_string_reference():
    out = correctness(["q"] * 3, ["<answer>7</answer>", "<answer>8</answer>", "7"], answer=[7, 7, 7])
    assert out == [1.0, 0.0, 0.0]


def test_answers_match():
    assert answers_match("1,200", "1200")
    assert answers_match("0.5", "1/2") and answers_match("1/2", "0.5")
    assert not answers_match("7", "8")
    assert not answers_match("", "8")


# ---------------------------------------------------------------- number


@pytest.mark.parametrize(
    "completion, expected",
    [
        ("<answer>42</answer>", 1.0),
        ("<answer>\n-3.5\n</answer>", 1.0),
        ("<answer>1,200</answer>", 1.0),
        ("<answer>42 apples</answer>", 0.0),
        ("<answer>1/2</answer>", 0.0),
        ("<answer>x = 4</answer>", 0.0),
        ("42", 0.0),  # no tags
    ],
)
def test_number(completion, expected):
    assert one(number, completion) == expected


# ---------------------------------------------------------------- countdown reward


@pytest.mark.parametrize(
    "expr, numbers, target, expected",
    [
        ("3 * 4 + 2", [2, 3, 4], 14, 1.0),  # valid
        ("(4 + 3) * 2", [2, 3, 4], 14, 1.0),  # parentheses
        ("3 * 4 + 2 = 14", [2, 3, 4], 14, 1.0),  # '= target' after the expression is allowed
        ("3 * 4", [2, 3, 4], 12, 1.0),  # not every number has to be used
        ("3 * 4 + 2", [2, 3, 4], 15, 0.0),  # wrong value
        ("4 * 4 - 2", [2, 3, 4], 14, 0.0),  # uses 4 twice
        ("3 * 5 - 1", [2, 3, 4], 14, 0.0),  # uses 5 and 1, not given
        ("6 / 3 + 5", [3, 5, 6], 7, 1.0),  # division: 6/3 = 2, + 5 = 7
        ("(1 / 3) * 6", [1, 3, 6], 2, 1.0),  # exact fractions: 1/3 * 6 = 2 exactly
        ("6 / 4", [4, 6], 1, 0.0),  # 3/2 is not 1 (no integer division)
        ("3 / (2 - 2)", [2, 2, 3], 3, 0.0),  # division by zero
        ("fourteen", [2, 3, 4], 14, 0.0),  # not an expression
        ("3 * 4 + 2 is the answer", [2, 3, 4], 14, 0.0),
        ("2 ** 3 + 6", [2, 3, 6], 14, 0.0),  # power is not an allowed operation
    ],
)
def test_countdown_reward(expr, numbers, target, expected):
    assert one(countdown, f"<reasoning>\nx\n</reasoning>\n<answer>\n{expr}\n</answer>",
               numbers=numbers, target=target) == expected


def test_countdown_reward_without_answer_tags():
    assert one(countdown, "3 * 4 + 2", numbers=[2, 3, 4], target=14) == 0.0


# ---------------------------------------------------------------- call_reward


def test_call_reward_ok_and_columns_forwarded():
    def lengths(prompts, completions, answer, **_):
        return [len(c) + int(a) for c, a in zip(completions, answer)]  # ints are fine

    out = call_reward("lengths", lengths, ["p", "p"], ["ab", "abcd"], {"answer": ["1", "2"]})
    assert out == [3.0, 6.0] and all(type(v) is float for v in out)


@pytest.mark.parametrize(
    "fn, message",
    [
        (lambda prompts, completions, **_: 1 / 0, "ZeroDivisionError"),  # raises
        (lambda prompts, completions, **_: [1.0], "returned 1 values for 2"),  # wrong length
        (lambda prompts, completions, **_: [1.0, 2.0, 3.0], "returned 3 values for 2"),
        (lambda prompts, completions, **_: [1.0, float("nan")], r"returned nan at index 1: expected a finite"),
        (lambda prompts, completions, **_: [float("inf"), 1.0], r"returned inf at index 0: expected a finite"),
        (lambda prompts, completions, **_: ["good", "bad"], r"returned a str \('good'\) at index 0"),
        (lambda prompts, completions, **_: [None, None], "returned None at index 0: expected a number"),
        (lambda prompts, completions, **_: None, "must return a list of numbers.*got a NoneType"),
        (lambda prompts, completions, **_: 1.0, "must return a list of numbers.*got a float"),
    ],
)
def test_call_reward_rejects(fn, message):
    with pytest.raises(UserError, match=message) as info:
        call_reward("my_reward", fn, ["p", "p"], ["a", "b"], {})
    assert "my_reward" in str(info.value)
    assert "\n" not in str(info.value)


def test_call_reward_unexpected_column_is_user_error():
    # a function that does not accept the task's columns raises TypeError -> reported with its name
    def strict(prompts, completions):
        return [0.0] * len(completions)

    with pytest.raises(UserError, match="strict.*TypeError"):
        call_reward("strict", strict, ["p"], ["a"], {"answer": ["1"]})


# ---------------------------------------------------------------- load_reward


def test_load_reward_builtin():
    for name, fn in BUILTIN.items():
        assert load_reward(name) is fn
    assert set(BUILTIN) == {"strict_format", "soft_format", "tag_count", "correctness", "answer_anywhere", "number",
                            "countdown", "env"}


def test_load_reward_from_file(tmp_path):
    f = tmp_path / "my_rewards.py"
    f.write_text("def length_reward(prompts, completions, **kw):\n    return [float(len(c)) for c in completions]\n")
    fn = load_reward(f"{f}:length_reward")
    assert fn(prompts=["p", "p"], completions=["ab", "abc"]) == [2.0, 3.0]


def test_load_reward_errors(tmp_path):
    f = tmp_path / "my_rewards.py"
    f.write_text("def length_reward(prompts, completions, **kw):\n    return [1.0] * len(completions)\nNOT_FN = 3\n")
    with pytest.raises(UserError, match="not found") as info:
        load_reward(f"{tmp_path / 'missing.py'}:length_reward")
    assert "missing.py" in str(info.value)
    with pytest.raises(UserError, match="no function 'nope'"):
        load_reward(f"{f}:nope")
    with pytest.raises(UserError, match="no function 'NOT_FN'"):
        load_reward(f"{f}:NOT_FN")
    for bad in ["not_a_reward", f"{f}", f"{tmp_path / 'rewards.txt'}:fn", ":fn"]:
        with pytest.raises(UserError, match="path/to/file.py:function"):
            load_reward(bad)


def test_load_reward_import_error(tmp_path):
    f = tmp_path / "broken.py"
    f.write_text("import this_module_does_not_exist_xyz\n")
    with pytest.raises(UserError, match="failed to import.*ModuleNotFoundError") as info:
        load_reward(f"{f}:fn")
    assert "broken.py" in str(info.value)


# ---------------------------------------------------------------- RewardSet


def test_reward_set_score_hand_worked():
    # weights tag_count .5, strict_format .5, correctness 2 (the defaults)
    # completion 0 = GOOD, answer 5: [1, 1, 1]          -> .5 + .5 + 2 = 3
    # completion 1 = '<answer>\n7\n</answer>', answer 5: tag_count .25 ('\n</answer>' only), strict 0, wrong 0
    #                                                    -> .5 * .25 = .125
    # completion 2 = GOOD, answer 6: [1, 1, 0]          -> 1
    rs = RewardSet([("tag_count", 0.5), ("strict_format", 0.5), ("correctness", 2.0)])
    per_fn, total = rs.score(["q"] * 3, [GOOD, "<answer>\n7\n</answer>", GOOD], {"answer": ["5", "5", "6"]})
    assert per_fn.shape == (3, 3) and total.shape == (3,)
    assert_close(per_fn, torch.tensor([[1.0, 1.0, 1.0], [0.25, 0.0, 0.0], [1.0, 1.0, 0.0]]), atol=1e-6, rtol=0)
    assert_close(total, torch.tensor([3.0, 0.125, 1.0]), atol=1e-6, rtol=0)


def test_reward_set_with_user_function(tmp_path):
    # K = 2: correctness (weight 1) and a user length reward (weight -.1)
    # completions 'ab' (wrong, len 2) -> 0 - .2 = -.2;  '<answer>5</answer>' (right, len 8 + 1 + 9 = 18) -> 1 - 1.8 = -.8
    f = tmp_path / "r.py"
    f.write_text("def length(prompts, completions, **kw):\n    return [len(c) for c in completions]\n")
    rs = RewardSet([("correctness", 1.0), (f"{f}:length", -0.1)])
    per_fn, total = rs.score(["q", "q"], ["ab", "<answer>5</answer>"], {"answer": ["5", "5"]})
    assert per_fn.shape == (2, 2)
    assert_close(per_fn, torch.tensor([[0.0, 2.0], [1.0, 18.0]]), atol=1e-6, rtol=0)
    assert_close(total, torch.tensor([-0.2, -0.8]), atol=1e-6, rtol=0)


def test_reward_set_single_function_shape():
    rs = RewardSet([("number", 2.0)])
    per_fn, total = rs.score(["q", "q"], ["<answer>3</answer>", "x"], {})
    assert per_fn.shape == (2, 1)
    assert total.tolist() == [2.0, 0.0]


def test_reward_set_bad_user_function_named(tmp_path):
    f = tmp_path / "bad.py"
    f.write_text("def nan_reward(prompts, completions, **kw):\n    return [float('nan')] * len(completions)\n")
    rs = RewardSet([("tag_count", 1.0), (f"{f}:nan_reward", 1.0)])
    with pytest.raises(UserError, match="nan_reward"):
        rs.score(["q"], ["x"], {})


def test_reward_set_unknown_name():
    with pytest.raises(UserError, match="no_such_reward"):
        RewardSet([("no_such_reward", 1.0)])


def test_answer_anywhere_takes_the_last_number_tags_or_not():
    from grouprl.rewards import answer_anywhere

    completions = [
        "7 + 5 = 12",  # last number 12: right
        "The answer is 12, not 13",  # last number 13: wrong
        "<reasoning>\n1,200 - 0 = 1,200\n</reasoning>",  # commas removed: 1200
        "no number at all",
        "<answer>\n12\n</answer>",
    ]
    answers = ["12", "12", "1200", "12", "12"]
    assert answer_anywhere(["p"] * 5, completions, answer=answers) == [1.0, 0.0, 1.0, 0.0, 1.0]


def test_copied_answer_placeholder_refused_but_a_number_is_not():
    prompt = "Example:\n<reasoning>\n7 + 4 = 11\n</reasoning>\n<answer>\n11\n</answer>\nWhat is 5 + 6?"
    own = "<reasoning>\n5 + 6 = 11\n</reasoning>\n<answer>\n11\n</answer>"
    assert strict_format([prompt], [own]) == [1.0]  # 11 is 11, whoever wrote it first
    placeholder = "Answer as:\n<reasoning>\nwork\n</reasoning>\n<answer>\nthe number\n</answer>"
    copied = "<reasoning>\n5 + 6 = 11\n</reasoning>\n<answer>\nthe number\n</answer>"
    assert strict_format([placeholder], [copied]) == [0.0]


# ---------------------------------------------------------------- placeholders and copies (format credit)

WORK = "<reasoning>\n2 + 3 = 5\n</reasoning>\n"


@pytest.mark.parametrize("answer", ["the final number", "The final number", "the final number.", "THE FINAL NUMBER",
                                    "the  final\nnumber", "your answer", "Your answer:", "final answer", "Answer",
                                    "...", "<your answer>", "the answer"])
@pytest.mark.parametrize("prompt", [PLACEHOLDER_PROMPT, "What is 2 + 3?"])
def test_placeholder_answer_earns_no_format_credit(prompt, answer):
    # a trained model answered literally 'the final number' (the old system prompt's placeholder): no
    # credit from any format reward, whether or not the prompt shows the placeholder
    completion = f"{WORK}<answer>\n{answer}\n</answer>"
    assert one(strict_format, completion, prompt=prompt) == 0.0
    assert one(soft_format, completion, prompt=prompt) == 0.0
    assert one(soft_format, f"<reasoning>2 + 3 = 5</reasoning> <answer>{answer}</answer>", prompt=prompt) == 0.0
    assert one(tag_count, completion, prompt=prompt) == 0.0


@pytest.mark.parametrize("reasoning", ["your working", "Your working.", "YOUR WORKING", "your reasoning", "reasoning"])
def test_placeholder_reasoning_earns_no_format_credit(reasoning):
    completion = f"<reasoning>\n{reasoning}\n</reasoning>\n<answer>\n5\n</answer>"
    for fn in (strict_format, soft_format, tag_count):
        assert one(fn, completion) == 0.0, fn.__name__


def test_copied_tag_text_refused_in_any_case_or_spacing():
    # text shown inside the prompt's tags (not a known placeholder): a copy, however it is spaced or cased
    prompt = "Format:\n<reasoning>\nAdd the numbers up\n</reasoning>\n<answer>\nthe sum\n</answer>\nWhat is 2 + 3?"
    copied_answer = f"{WORK}<answer>\nThe  Sum\n</answer>"
    copied_reasoning = "<reasoning>\nadd the numbers\nup.\n</reasoning>\n<answer>\n5\n</answer>"
    for fn in (strict_format, soft_format, tag_count):
        assert one(fn, copied_answer, prompt=prompt) == 0.0, fn.__name__
        assert one(fn, copied_reasoning, prompt=prompt) == 0.0, fn.__name__
        # the same completions under a prompt that does not show that text are the model's own
        assert one(fn, copied_answer) == 1.0, fn.__name__
        assert one(fn, copied_reasoning) == 1.0, fn.__name__


def test_copied_number_answer_keeps_format_credit():
    # 11 is 11: a number shown in the prompt's example may be the right answer, in any format reward
    prompt = EXAMPLE_PROMPT.replace("What is 2 + 3?", "What is 5 + 6?")
    genuine = "<reasoning>\n5 + 6 = 11\n</reasoning>\n<answer>\n11\n</answer>"
    for fn in (strict_format, soft_format, tag_count):
        assert one(fn, genuine, prompt=prompt) == 1.0, fn.__name__


def test_tag_count_voids_credit_for_a_copied_or_empty_answer():
    assert one(tag_count, f"{WORK}<answer>\n5\n</answer>") == 1.0
    assert one(tag_count, f"{WORK}<answer>\nthe final number\n</answer>") == 0.0  # would be 1.0 by tags alone
    assert one(tag_count, f"{WORK}<answer>\n\n</answer>") == 0.0
    assert one(tag_count, "<answer>\nyour answer\n</answer>") == 0.0  # would be .25


# ---------------------------------------------------------------- neutral text


@pytest.mark.parametrize("completion", ["ok", ""])
def test_builtins_give_nothing_for_neutral_text(completion):
    # the loop probes every reward with neutral text before training: no built-in may reward it
    columns = {"answer": ["5"], "numbers": [[2, 3, 4]], "target": [14],
               "episode": [{"reward": 0.0}]}  # (the probe's empty episode, with an environment)
    for name, fn in BUILTIN.items():
        assert fn(["What is 2 + 3?"], [completion], **columns) == [0.0], name
