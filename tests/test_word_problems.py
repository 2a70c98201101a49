"""The word-problem task (four operations, one and two steps, held-out phrasings) and the demonstrations an
environment writes for a supervised warm-up (`grouprl demos`), which `grouprl sft` trains on with the
prompt that RL will show."""

from __future__ import annotations

import json
import re
from fractions import Fraction

import pytest

from grouprl.config import load_config
from grouprl.envs.calculator import Calculator, steps
from grouprl.envs.guess import secret_of
from grouprl.episodes import setup
from grouprl.sft import conversation, end_of_turn, tokenize
from grouprl.tasks import build_task
from grouprl.tasks.word_problems import PHRASINGS, steps_of, value, word_problem_splits
from test_bad_inputs import one_error_line, write
from test_cli import run


@pytest.mark.parametrize("expression, expected", [
    ("12+5*3", Fraction(27)), ("(12-4)/2", Fraction(4)), ("(7+5)*3", Fraction(36)), ("18*6-11", Fraction(97)),
    ("3-5", None), ("7/2", None), ("4-4", None), ("(9-3)/4", None),  # negative, fractional or zero steps
])
def test_value_is_exact_and_whole_at_every_step(expression, expected):
    assert value(expression) == expected


def pattern(phrasing: str) -> re.Pattern:
    """A phrasing as a regular expression: its fields match any word or number."""
    return re.compile(re.sub(r"\\\{[a-z]\\\}", r"\\w+", re.escape(phrasing)) + "$")


def test_every_phrasing_shows_every_number_of_its_form():
    for form, (train, held) in PHRASINGS.items():
        assert train and held, form
        for phrasing in train + held:
            assert {f for f in "abc" if f"{{{f}}}" in phrasing} == {f for f in "abc" if f"{{{f}}}" in form}, phrasing
    assert sorted({steps_of(f) for f in PHRASINGS}) == [1, 2]
    assert {op for f in PHRASINGS for op in "+-*/" if op in f} == set("+-*/")


def test_held_out_problems_use_phrasings_and_computations_training_never_shows():
    train, held = word_problem_splits(300, 100, 20, 1, 2, seed=7)
    assert (len(train), len(held)) == (300, 100)
    assert not {r["expression"] for r in train} & {r["expression"] for r in held}
    train_p = [pattern(p) for t, _ in PHRASINGS.values() for p in t]
    held_p = [pattern(p) for _, h in PHRASINGS.values() for p in h]
    for r in held:
        assert any(p.match(r["prompt"]) for p in held_p) and not any(p.match(r["prompt"]) for p in train_p)
    for r in train:
        assert any(p.match(r["prompt"]) for p in train_p) and not any(p.match(r["prompt"]) for p in held_p)
    for r in train + held:
        assert str(value(r["expression"])) == r["answer"] and r["steps"] == len(re.findall(r"[-+*/]", r["expression"]))
    assert {r["steps"] for r in held} == {1, 2}
    two = word_problem_splits(50, 50, 20, 2, 2, seed=7)
    assert all(r["steps"] == 2 for r in two[0] + two[1])
    assert word_problem_splits(50, 50, 20, 1, 2, seed=7) == word_problem_splits(50, 50, 20, 1, 2, seed=7)


def test_asking_for_more_problems_than_there_are_is_one_error():
    from grouprl.errors import UserError

    with pytest.raises(UserError, match="939 distinct problems"):  # one-step forms, numbers 2..20
        word_problem_splits(2000, 200, 20, 1, 1, seed=0)


def test_the_calculator_demonstrates_a_row_one_operation_per_call():
    row = {"prompt": "q", "answer": "27", "expression": "12+5*3"}
    call, result, call2, result2, answer = Calculator().demonstrate(row)
    assert call["tool_calls"][0]["function"] == {"name": "calculate", "arguments": {"expression": "5 * 3"}}
    assert result == {"role": "tool", "content": "15"}
    assert call2["tool_calls"][0]["function"]["arguments"] == {"expression": "12 + 15"} and call2["content"] == ""
    assert result2 == {"role": "tool", "content": "27"}
    assert answer == {"role": "assistant", "content": "<answer>\n27\n</answer>"}
    assert Calculator().demonstrate({"prompt": "q", "answer": "3"}) is None  # nothing to call


@pytest.mark.parametrize("expression, expected", [
    ("7+5", ["7 + 5"]),
    ("(4+8)*3", ["4 + 8", "12 * 3"]),  # the parenthesis first
    ("12+5*3", ["5 * 3", "12 + 15"]),  # precedence: the product first
    ("12/4+5", ["12 / 4", "3 + 5"]),  # a whole quotient reads back as the calculator shows it, not 3.0
    ("6*4/3", ["6 * 4", "24 / 3"]),  # left to right
    ("(9-3)/(1+2)", ["9 - 3", "1 + 2", "6 / 3"]),  # left before right
    ("7", ["7"]),
])
def test_an_expression_is_worked_one_operation_at_a_time(expression, expected):
    assert steps(expression) == expected


def demo_sets(tool_model, out, **extra) -> list[str]:
    sets = {"model.name_or_path": str(tool_model), "task.name": "word_problems", "task.num_train": 12,
            "task.num_eval": 4, "env.name": "calculator", "task.prefill": "", "output_dir": str(out), **extra}
    return [a for k, v in sets.items() for a in ("--set", f"{k}={v}")]


def test_demonstrations_are_trained_with_the_prompt_rl_shows(tool_model, tool_tok, tmp_path):
    data = tmp_path / "demos.jsonl"
    res = run("demos", *demo_sets(tool_model, tmp_path / "run"), "--out", str(data))
    assert res.exit_code == 0, res.output
    rows = [json.loads(x) for x in data.read_text().splitlines()]
    assert len(rows) == 12 and all(r["messages"][-1]["content"] == f"<answer>\n{r['answer']}\n</answer>" for r in rows)
    cfg = load_config(None, [a for a in demo_sets(tool_model, tmp_path / "run") if a != "--set"])
    task = build_task(cfg.task)
    env, task = setup(cfg.env, tool_tok, task)
    ex = tokenize(conversation(rows[0], "messages", "r"), task, env.chat, tool_tok, "",
                  end_of_turn(tool_tok, env.chat), "r")
    rl_prompt = task.chat_prompt(tool_tok, task.train[0], "")  # what an RL episode of this row starts from
    assert ex.prompt == tool_tok(rl_prompt, add_special_tokens=False)["input_ids"]
    res = run("sft", *demo_sets(tool_model, tmp_path / "sft"), "--set", f"sft.source={data}", "--set", "steps=2",
              "--set", "sft.batch_size=4")
    assert res.exit_code == 0, res.output


def test_the_guessing_game_demonstrates_whole_games_that_sft_trains_on(tool_model, tmp_path):
    data = tmp_path / "games.jsonl"
    sets = demo_sets(tool_model, tmp_path / "run", **{"env.name": "guess"})
    assert run("demos", *sets, "--out", str(data)).exit_code == 0
    rows = [json.loads(x) for x in data.read_text().splitlines()]
    assert len(rows) == 12
    for row in rows:
        opening, *game = row["messages"][1:]  # after the system prompt: the game's opening replaces the question
        assert "1 to 100" in opening["content"] and opening["role"] == "user"
        assert game[-1]["content"] == str(secret_of({"prompt": row_prompt(row, sets)}))
        assert all(m["content"] in ("higher", "lower") for m in game[1::2])  # the replies, as the user's turns
    res = run("sft", *demo_sets(tool_model, tmp_path / "sft", **{"env.name": "guess"}), "--set", f"sft.source={data}",
              "--set", "steps=1", "--set", "sft.batch_size=4")
    assert res.exit_code == 0, res.output


def row_prompt(row: dict, sets: list[str]) -> str:
    """The task row's own prompt (the game's secret is drawn from it), found by its expression."""
    task = build_task(load_config(None, [a for a in sets if a != "--set"]).task)
    return next(r["prompt"] for r in task.train if r["expression"] == row["expression"])


def test_demonstrations_need_an_environment_that_writes_them(tool_model, tmp_path):
    res = run("demos", *demo_sets(tool_model, tmp_path / "run", **{"env.name": "null"}), "--out",
              str(tmp_path / "d.jsonl"))
    one_error_line(res, "demonstrations need env.name")
    env = write(tmp_path / "env.py", "from grouprl.envs import Environment\n\nclass Quiet(Environment):\n"
                "    def step(self, text: str):\n        return None\n")
    res = run("demos", *demo_sets(tool_model, tmp_path / "run", **{"env.name": f"{env}:Quiet"}), "--out",
              str(tmp_path / "d.jsonl"))
    one_error_line(res, "demonstrate")
