"""Tasks: the synthetic arithmetic and countdown generators, GSM8K / generic dataset loading, build_task."""

import itertools
import json
import random
import re
from fractions import Fraction

import pytest

from grouprl.config import TaskConfig
from grouprl.errors import UserError
from grouprl.tasks import ARITHMETIC_PROMPT, COUNTDOWN_PROMPT, FORMAT_PROMPT, Task, build_task
from grouprl.tasks.arithmetic import arithmetic_splits, make_problem
from grouprl.tasks.countdown import check, countdown_splits, evaluate
from grouprl.tasks.data import dataset_rows, gsm8k_answer, gsm8k_rows


@pytest.fixture(autouse=True)
def _datasets_cache(tmp_path, monkeypatch):
    """Keep `datasets`' Arrow cache inside the test's temporary folder."""
    import datasets.config

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf_cache")


# ---------------------------------------------------------------- arithmetic

# Each story sentence, read independently of the generator's templates: (pattern, operation)
SENTENCES = [
    (r"\w+ gets (\d+) more\.", "+"),
    (r"\w+ finds (\d+) more\.", "+"),
    (r"A friend gives \w+ (\d+) more\.", "+"),
    (r"\w+ gives away (\d+)\.", "-"),
    (r"\w+ loses (\d+)\.", "-"),
    (r"\w+ uses (\d+) of them\.", "-"),
    (r"Then \w+ ends up with (\d+) times as many\.", "*"),
    (r"The number of \w+ is multiplied by (\d+)\.", "*"),
]


def solve_story(text: str) -> tuple[int, str, int]:
    """Recompute (answer, computation key, number of steps) from a problem's wording alone."""
    sentences = re.split(r"(?<=[.?])\s+", text)
    m = re.fullmatch(r"(\w+) has (\d+) (\w+)\.", sentences[0])
    assert m, sentences[0]
    name, value, obj = m.group(1), int(m.group(2)), m.group(3)
    key = str(value)
    assert sentences[-1] == f"How many {obj} does {name} have now?"
    for s in sentences[1:-1]:
        hits = [(op, int(mm.group(1))) for pat, op in SENTENCES if (mm := re.fullmatch(pat, s))]
        assert len(hits) == 1, s
        op, b = hits[0]
        value = value + b if op == "+" else value - b if op == "-" else value * b
        key += f"{op}{b}"
    return value, key, len(sentences) - 2


def test_solve_story_on_a_hand_written_problem():
    # the reader itself: 7 + 5 = 12, 12 - 3 = 9, 9 * 2 = 18
    text = "Ann has 7 pens. Ann gets 5 more. Ann loses 3. The number of pens is multiplied by 2. " \
           "How many pens does Ann have now?"
    assert solve_story(text) == (18, "7+5-3*2", 3)


@pytest.mark.parametrize("seed, steps", [(0, 1), (1, 1), (5, 2), (4, 3)])
def test_make_problem_answer_matches_its_text(seed, steps):
    rng = random.Random(seed)
    question, answer, key = make_problem(rng, steps, 20)
    assert solve_story(question) == (answer, key, steps)
    assert answer >= 0
    # the same seed gives the same problem
    assert make_problem(random.Random(seed), steps, 20) == (question, answer, key)


def test_make_problem_numbers_bounded():
    rng = random.Random(3)
    for _ in range(200):
        question, answer, key = make_problem(rng, 1, 9)
        start = int(re.match(r"\w+ has (\d+) ", question).group(1))
        assert 2 <= start <= 9
        assert all(int(n) <= 9 for n in re.findall(r"\d+", key))


def test_multi_step_problems_never_crash():
    # random.Random(16) with 2 steps and max_operand 2: 2 - 2 = 0, then '-' again
    make_problem(random.Random(16), 2, 2)
    for seed in range(20):
        arithmetic_splits(200, 20, 20, 3, seed)


def test_arithmetic_splits_deterministic_and_seeded():
    a = arithmetic_splits(60, 15, 20, 1, seed=7)
    b = arithmetic_splits(60, 15, 20, 1, seed=7)
    c = arithmetic_splits(60, 15, 20, 1, seed=8)
    assert a == b
    assert a != c
    train, held = a
    assert len(train) == 60 and len(held) == 15
    assert all(set(r) == {"prompt", "answer", "steps"} for r in train + held)


def test_arithmetic_splits_answers_are_right_and_disjoint_by_computation():
    train, held = arithmetic_splits(300, 60, 20, 1, seed=1234)
    train_keys, held_keys = set(), set()
    for rows, keys in ((train, train_keys), (held, held_keys)):
        for r in rows:
            answer, key, steps = solve_story(r["prompt"])
            assert r["answer"] == str(answer)  # the stored answer is what the text computes
            assert r["steps"] == steps
            keys.add(key)
    assert len(train_keys) == len(train) and len(held_keys) == len(held)  # no computation twice
    assert not train_keys & held_keys  # no computation in both splits
    assert not {r["prompt"] for r in train} & {r["prompt"] for r in held}  # nor any question text


def test_arithmetic_curriculum_orders_by_steps():
    train, held = arithmetic_splits(40, 10, 20, 3, seed=4, curriculum=True)
    steps = [r["steps"] for r in train]
    assert steps == sorted(steps) and len(set(steps)) > 1
    for r in train + held:
        answer, _, n = solve_story(r["prompt"])
        assert r["answer"] == str(answer) and r["steps"] == n
    # without the curriculum the same problems come in generation order, not sorted
    unsorted, held2 = arithmetic_splits(40, 10, 20, 3, seed=4, curriculum=False)
    assert held2 == held
    assert sorted(unsorted, key=lambda r: r["steps"]) == train
    assert [r["steps"] for r in unsorted] != steps


# ---------------------------------------------------------------- countdown


@pytest.mark.parametrize(
    "expr, value, used",
    [
        ("3 * 4 + 2", Fraction(14), [3, 4, 2]),
        ("(4 + 3) * 2", Fraction(14), [4, 3, 2]),
        ("(1 + 2) / 4", Fraction(3, 4), [1, 2, 4]),  # exact: 3/4, not 0.75
        ("10 - 12", Fraction(-2), [10, 12]),
        ("  7  ", Fraction(7), [7]),
        ("6 / 4 * 2", Fraction(3), [6, 4, 2]),
    ],
)
def test_countdown_evaluate(expr, value, used):
    assert evaluate(expr) == (value, used)


@pytest.mark.parametrize(
    "expr",
    ["", "3 +", "abc", "1.5 + 1", "-3 + 5", "2 ** 3", "7 // 2", "7 % 2", "True + 1", "__import__('os')",
     "1 / 0", "4 / (2 - 2)", "[1, 2]", "'1' + '2'"],
)
def test_countdown_evaluate_rejects(expr):
    with pytest.raises(ValueError):
        evaluate(expr)


def test_countdown_check():
    assert check("3 * 4 + 2", [2, 3, 4], 14)
    assert not check("3 * 4 + 2", [2, 3, 4], 13)  # wrong value
    assert not check("4 * 4 - 2", [2, 3, 4], 14)  # 4 used twice
    assert check("4 * 4 - 2", [2, 4, 4], 14)  # ...unless it is given twice
    assert not check("3 * 5 - 1", [2, 3, 4], 14)  # numbers not given
    assert check("12 / 4 + 1", [1, 4, 12], 4)
    assert not check("not math", [1, 2], 3)
    # pathological input returns False instead of raising (RecursionError is caught)
    assert check("(" * 50 + "1" + ")" * 50, [1], 1)
    assert not check("+".join(["1"] * 100_000), [1], 1)


def _solve_countdown(numbers: list[int], target: int) -> str | None:
    """Brute force over (a op b) op c and a op (b op c) with + - * /; returns an expression or None."""
    for a, b, c in itertools.permutations(numbers):
        for o1, o2 in itertools.product("+-*/", repeat=2):
            for expr in (f"({a} {o1} {b}) {o2} {c}", f"{a} {o1} ({b} {o2} {c})"):
                try:
                    if evaluate(expr)[0] == target:
                        return expr
                except ValueError:
                    pass
    return None


def test_countdown_splits_rows_are_solvable():
    train, held = countdown_splits(40, 10, seed=0)
    assert len(train) == 40 and len(held) == 10
    for r in train + held:
        assert set(r) == {"prompt", "answer", "numbers", "target"}
        nums, target = r["numbers"], r["target"]
        assert len(nums) == 3 and nums == sorted(nums) and all(1 <= n <= 20 for n in nums)
        assert isinstance(target, int) and target > 0 and r["answer"] == str(target)
        assert str(nums) in r["prompt"] and str(target) in r["prompt"]
        expr = _solve_countdown(nums, target)
        assert expr is not None, r
        assert check(expr, nums, target)


def test_countdown_splits_deterministic_and_disjoint():
    a = countdown_splits(40, 10, seed=3)
    assert a == countdown_splits(40, 10, seed=3)
    assert a != countdown_splits(40, 10, seed=4)
    train, held = a
    keys = lambda rows: {(tuple(r["numbers"]), r["target"]) for r in rows}  # noqa: E731
    assert len(keys(train)) == len(train) and len(keys(held)) == len(held)
    assert not keys(train) & keys(held)


# ---------------------------------------------------------------- GSM8K / dataset files


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


GSM = [
    {"question": "Tom buys 3 boxes of 400 pens. How many pens?", "answer": "3 * 400 = 1200\n#### 1,200"},
    {"question": "Ann has 5 apples and eats 2. How many are left?", "answer": "5 - 2 = 3\n#### 3"},
]


@pytest.mark.parametrize(
    "solution, expected",
    [
        ("3 * 400 = 1200\n#### 1,200", "1200"),
        ("#### 72", "72"),
        ("work\n####1000000", "1000000"),
        ("lost money\n#### -5", "-5"),
        ("#### 1,234,567  \n", "1234567"),
        ("#### 2.5", "2.5"),
    ],
)
def test_gsm8k_answer(solution, expected):
    assert gsm8k_answer(solution) == expected


def test_gsm8k_answer_missing_marker():
    with pytest.raises(ValueError):
        gsm8k_answer("The answer is 5.")


def test_gsm8k_rows(tmp_path):
    rows = gsm8k_rows(write_jsonl(tmp_path / "gsm.jsonl", GSM))
    assert rows == [
        {"prompt": GSM[0]["question"], "answer": "1200", "solution": GSM[0]["answer"]},
        {"prompt": GSM[1]["question"], "answer": "3", "solution": GSM[1]["answer"]},
    ]


def test_gsm8k_rows_missing_column(tmp_path):
    src = write_jsonl(tmp_path / "gsm.jsonl", [{"question": "q", "solution": "#### 1"}])
    with pytest.raises(UserError, match=r"lacks column\(s\) \['answer'\]") as info:
        gsm8k_rows(src)
    assert "gsm.jsonl" in str(info.value)


def test_gsm8k_rows_answer_without_marker(tmp_path):
    src = write_jsonl(tmp_path / "gsm.jsonl", GSM + [{"question": "q", "answer": "just 4"}])
    with pytest.raises(UserError, match="gsm.jsonl' line 3: answer must end with '#### <number>'"):  # 1-based
        gsm8k_rows(src)


def test_missing_file_is_user_error(tmp_path):
    for fn in (lambda s: gsm8k_rows(s), lambda s: dataset_rows(s, "prompt", "answer")):
        with pytest.raises(UserError, match="not found") as info:
            fn(str(tmp_path / "nope.jsonl"))
        assert "nope.jsonl" in str(info.value)


def test_unsupported_extension_is_user_error(tmp_path):
    f = tmp_path / "data.txt"
    f.write_text("hello\n")
    with pytest.raises(UserError, match="data.txt"):
        dataset_rows(str(f), "prompt", "answer")


def test_dataset_rows(tmp_path):
    src = write_jsonl(tmp_path / "d.jsonl", [
        {"text": "What is 2 + 2?", "target": 4, "level": "easy"},
        {"text": "What is 3 * 3?", "target": 9, "level": "hard"},
    ])
    rows = dataset_rows(src, "text", "target")
    # prompt and answer renamed (answer as text), every other column kept for the rewards
    assert rows == [
        {"prompt": "What is 2 + 2?", "answer": "4", "level": "easy"},
        {"prompt": "What is 3 * 3?", "answer": "9", "level": "hard"},
    ]
    assert dataset_rows(src, "text", None) == [
        {"prompt": "What is 2 + 2?", "target": 4, "level": "easy"},
        {"prompt": "What is 3 * 3?", "target": 9, "level": "hard"},
    ]


def test_dataset_rows_missing_column(tmp_path):
    src = write_jsonl(tmp_path / "d.jsonl", [{"text": "q", "target": 1}])
    with pytest.raises(UserError, match=r"\['question'\]"):
        dataset_rows(src, "question", "target")
    with pytest.raises(UserError, match=r"\['answer'\]") as info:
        dataset_rows(src, "text", "answer")
    assert "'target'" in str(info.value)  # what is there is listed too


# ---------------------------------------------------------------- build_task


def test_build_task_arithmetic():
    task = build_task(TaskConfig(name="arithmetic", num_train=30, num_eval=8, seed=1))
    assert isinstance(task, Task)
    assert task.name == "arithmetic" and task.correctness == "correctness"
    assert len(task.train) == 30 and len(task.eval) == 8
    assert task.system_prompt == ARITHMETIC_PROMPT
    assert (task.train, task.eval) == arithmetic_splits(30, 8, 20, 1, 1, True)


def test_build_task_countdown():
    task = build_task(TaskConfig(name="countdown", num_train=12, num_eval=4, seed=2, system_prompt="custom"))
    assert task.name == "countdown" and task.correctness == "countdown"
    assert len(task.train) == 12 and len(task.eval) == 4
    assert task.system_prompt == "custom"
    assert "numbers" in task.train[0] and "target" in task.train[0]


def _gsm_rows(n):
    return [{"question": f"What is {i} + {i}?", "answer": f"{i} + {i} = {2 * i}\n#### {2 * i}"} for i in range(n)]


def test_build_task_gsm8k_split_off(tmp_path):
    src = write_jsonl(tmp_path / "train.jsonl", _gsm_rows(10))
    task = build_task(TaskConfig(name="gsm8k", source=src, num_eval=3))
    # held-out size min(num_eval 3, 10 // 5 = 2) = 2; the rest is training; no row in both
    assert task.name == "gsm8k" and task.correctness == "correctness" and task.system_prompt == FORMAT_PROMPT
    assert len(task.eval) == 2 and len(task.train) == 8
    prompts = [r["prompt"] for r in task.train + task.eval]
    assert sorted(prompts) == sorted(r["question"] for r in _gsm_rows(10))
    for r in task.train + task.eval:
        i = int(re.search(r"\d+", r["prompt"]).group())
        assert r["answer"] == str(2 * i)


def test_build_task_gsm8k_eval_source(tmp_path):
    src = write_jsonl(tmp_path / "train.jsonl", _gsm_rows(6))
    held = write_jsonl(tmp_path / "test.jsonl", _gsm_rows(20)[10:])
    task = build_task(TaskConfig(name="gsm8k", source=src, eval_source=held, num_eval=4))
    assert len(task.train) == 6 and len(task.eval) == 4
    assert [r["answer"] for r in task.eval] == ["20", "22", "24", "26"]


def test_build_task_dataset(tmp_path):
    rows = [{"q": f"Say {i}", "a": i} for i in range(5)]
    src = write_jsonl(tmp_path / "d.jsonl", rows)
    task = build_task(TaskConfig(name="dataset", source=src, prompt_column="q", answer_column="a", num_eval=1))
    assert task.name == "dataset" and task.correctness == "correctness"
    assert len(task.eval) == 1 and len(task.train) == 4
    assert sorted(r["prompt"] for r in task.train + task.eval) == [f"Say {i}" for i in range(5)]
    assert all(r["answer"] == r["prompt"].split()[1] for r in task.train + task.eval)


def test_build_task_dataset_too_small(tmp_path):
    src = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "only one", "answer": "1"}])
    with pytest.raises(UserError, match="at least 2"):
        build_task(TaskConfig(name="dataset", source=src))


def test_chat_prompt_appends_prefill():
    class FakeTokenizer:
        def apply_chat_template(self, messages, tokenize, add_generation_prompt):
            assert tokenize is False and add_generation_prompt is True
            return "".join(f"<{m['role']}>{m['content']}" for m in messages) + "<assistant>"

    task = Task("t", [], [], "SYS", "correctness")
    text = task.chat_prompt(FakeTokenizer(), {"prompt": "Q?", "answer": "1"}, prefill="<reasoning>\n")
    assert text == "<system>SYS<user>Q?<assistant><reasoning>\n"


def test_system_prompts_show_the_format():
    for p in (ARITHMETIC_PROMPT, COUNTDOWN_PROMPT, FORMAT_PROMPT):
        assert "<reasoning>\n" in p and "\n</reasoning>\n<answer>\n" in p and "\n</answer>" in p


@pytest.mark.parametrize("prompt", [ARITHMETIC_PROMPT, FORMAT_PROMPT, COUNTDOWN_PROMPT])
def test_system_prompts_show_a_worked_example_not_placeholders(prompt):
    m = re.search(r"Example.*?<reasoning>\n(.+?)\n</reasoning>\n<answer>\n(.+?)\n</answer>$", prompt, re.DOTALL)
    assert m, prompt
    reasoning, answer = m.groups()
    for placeholder in ("your working", "final number", "the answer", "...", "reasoning here", "answer here"):
        assert placeholder not in reasoning and placeholder not in answer
    # the working ends in the value the answer gives: the example is worked, not a template to fill in
    value, _ = evaluate(answer)
    assert re.search(rf"= {value}$", reasoning), (reasoning, answer)
    equations = re.findall(r"([\d +\-*/()]+) = (\d+)", reasoning)
    assert equations and all(evaluate(lhs)[0] == int(rhs) for lhs, rhs in equations)  # its arithmetic is right


def test_build_task_gsm8k_uses_the_worked_example(tmp_path):
    task = build_task(TaskConfig(name="gsm8k", source=write_jsonl(tmp_path / "g.jsonl", _gsm_rows(5))))
    assert task.system_prompt == FORMAT_PROMPT and "3 * 6 = 18" in FORMAT_PROMPT


# ---------------------------------------------------------------- where a bad row is


def lines_with(bad: dict, good=lambda i: {"prompt": f"say a {i}", "answer": str(i)}, n: int = 20) -> str:
    """n JSON Lines rows good(i), line 3 blank and `bad` on line 6: the file's 5th row, so that its row number
    and its line number differ."""
    lines = [json.dumps(good(i)) for i in range(n)]
    lines.insert(2, "")
    lines[5] = json.dumps(bad)
    return "\n".join(lines) + "\n"


def test_an_over_long_prompt_is_named_by_its_line_after_the_shuffle(tiny_model, tmp_path):
    from transformers import AutoTokenizer

    from grouprl.tasks import fit_prompts, token_lengths

    f = tmp_path / "d.jsonl"
    long = "say " + "b" * 100
    f.write_text(lines_with({"prompt": long, "answer": "1"}))
    tok = AutoTokenizer.from_pretrained(tiny_model)
    task = build_task(TaskConfig(name="dataset", source=str(f), num_eval=4, system_prompt="x"))
    split = task.train if any(r["prompt"] == long for r in task.train) else task.eval
    assert [r["prompt"] for r in split].index(long) + 1 not in (5, 6)  # moved: only its origin can name line 6
    limit = max(token_lengths(tok, [task.chat_prompt(tok, r, "") for r in task.train + task.eval
                                    if r["prompt"] != long]))
    with pytest.raises(UserError) as e:
        fit_prompts(task, tok, "", limit, "error")
    assert str(e.value).startswith(f"dataset file '{f}' line 6 (starts 'say bbbb"), str(e.value)
    # the rows that are kept, cut or not, still know their lines
    dropped = fit_prompts(task, tok, "", limit, "drop")
    assert sorted(r.origin for r in dropped.train + dropped.eval) == sorted(
        f"dataset file '{f}' line {n}" for n in [1, 2, 4, 5] + list(range(7, 22)))
    cut = fit_prompts(task, tok, "", limit, "truncate_left")
    row = next(r for r in cut.train + cut.eval if r.origin == f"dataset file '{f}' line 6")
    assert row["prompt"] != long and row["prompt"].endswith("bbb")


def test_a_row_origin_never_reaches_the_rewards(tmp_path):
    import pickle

    from grouprl.batch import columns_of

    f = tmp_path / "d.jsonl"
    f.write_text(lines_with({"prompt": "q", "answer": "1", "level": 2}))
    task = build_task(TaskConfig(name="dataset", source=str(f), num_eval=4))
    assert set(columns_of(task.train)) == {"answer", "level"}  # the reward keyword arguments
    assert all(set(r) == {"prompt", "answer", "level"} for r in task.train + task.eval)
    row = pickle.loads(pickle.dumps(task.train[0]))  # as rows are gathered from the other ranks
    assert row == task.train[0] and row.origin == task.train[0].origin


def _csv(path, rows):
    import csv

    with path.open("w", newline="") as out:
        w = csv.DictWriter(out, fieldnames=["prompt", "answer"])
        w.writeheader()
        w.writerows(rows)


def _parquet(path, rows):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(rows), path)


def _rows_with(bad: dict, at: int, n: int = 8) -> list[dict]:
    """n rows {"prompt", "answer"}, the at-th (1-based) replaced by `bad`."""
    rows = [{"prompt": f"say a {i}", "answer": str(i)} for i in range(n)]
    rows[at - 1] = bad
    return rows


ROW_ERRORS = {  # case -> (file name, task name, write the file, the start of the error after the file's name)
    "jsonl null prompt": ("d.jsonl", "dataset", lambda f: f.write_text(lines_with({"prompt": None, "answer": "1"})),
                          "line 6: 'prompt' is null"),
    "jsonl no answer": ("d.jsonl", "dataset", lambda f: f.write_text(lines_with({"prompt": "q"})),
                        "line 6: 'answer' is null"),
    "JSON Lines named .json": ("d.json", "dataset", lambda f: f.write_text(lines_with({"prompt": 7, "answer": "1"})),
                               "line 6: 'prompt' is not text"),
    "JSON array": ("d.json", "dataset",
                   lambda f: f.write_text(json.dumps(_rows_with({"prompt": 7, "answer": "1"}, at=3))),
                   "item 3: 'prompt' is not text"),
    "csv": ("d.csv", "dataset", lambda f: _csv(f, _rows_with({"prompt": "q", "answer": ""}, at=4)),
            "record 4: 'answer' is null"),  # the header is not a record
    "parquet": ("d.parquet", "dataset", lambda f: _parquet(f, _rows_with({"prompt": None, "answer": "1"}, at=5)),
                "record 5: 'prompt' is null"),
    "GSM8K without ####": ("g.jsonl", "gsm8k", lambda f: f.write_text(lines_with(
        {"question": "q", "answer": "just 4"}, good=lambda i: {"question": f"say {i}", "answer": f"#### {i}"})),
        "line 6: answer must end with '#### <number>'"),
    "verl without ground_truth": ("v.jsonl", "dataset", lambda f: f.write_text(lines_with(
        {"prompt": [{"role": "user", "content": "q"}], "reward_model": {"style": "rule"}},
        good=lambda i: {"prompt": [{"role": "user", "content": f"say {i}"}], "reward_model": {"ground_truth": i}})),
        "line 6: 'reward_model' has no ground_truth"),
}


@pytest.mark.parametrize("case", list(ROW_ERRORS))
def test_a_bad_row_is_named_where_the_user_finds_it(case, tmp_path):
    name, task, write, needle = ROW_ERRORS[case]
    f = tmp_path / name
    write(f)
    with pytest.raises(UserError) as e:
        build_task(TaskConfig(name=task, source=str(f), answer_column=None if "verl" in case else "answer"))
    assert str(e.value).startswith(f"dataset file '{f}' {needle}"), str(e.value)


def test_a_bad_row_of_a_datasets_split_is_named_by_split_and_row(monkeypatch):
    import datasets

    asked = []

    def load_dataset(name, config, split):
        asked.append((name, config, split))
        return datasets.Dataset.from_list(_rows_with({"prompt": None, "answer": "1"}, at=3))

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    for source, where in [("org/data:main@test", "dataset 'org/data:main' split 'test' row 3"),
                          ("org/data", "dataset 'org/data' split 'train' row 3")]:
        with pytest.raises(UserError) as e:
            dataset_rows(source, "prompt", "answer")
        assert str(e.value) == f"{where}: 'prompt' is null: expected the prompt text"  # row 3 is ds[2]
    assert asked == [("org/data", "main", "test"), ("org/data", None, "train")]


def test_a_built_in_task_row_is_named_by_its_split_and_place(tiny_model):
    from transformers import AutoTokenizer

    from grouprl.tasks import fit_prompts

    tok = AutoTokenizer.from_pretrained(tiny_model)
    task = build_task(TaskConfig(name="arithmetic", num_train=4, num_eval=2, seed=1))
    with pytest.raises(UserError) as e:  # no file to name: the row's place in the generated train split
        fit_prompts(task, tok, "", 10, "error")
    assert str(e.value).startswith("train row 1 (starts "), str(e.value)
