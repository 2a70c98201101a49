"""Chat-messages prompts and verl-style rows (with a verl compute_score as the reward), each training a step on
the tiny model; rewards that take completion_ids."""

from __future__ import annotations

import json

import pytest
from rich.console import Console

from grouprl.config import TaskConfig, load_config
from grouprl.errors import UserError
from grouprl.loop import train
from grouprl.metrics import read_metrics
from grouprl.rewards import RewardSet, verl_reward
from grouprl.tasks import build_task
from tests.test_learning import toy_config


def messages_rows(n: int = 16) -> list[dict]:
    rows = []
    for i in range(n):
        turns = [{"role": "user", "content": f"say a {i}"}]
        if i % 2:
            turns = [{"role": "system", "content": "be brief"}] + turns
        rows.append({"prompt": turns, "answer": str(i)})
    return rows


def test_messages_prompt_goes_through_the_chat_template(tiny_model, tmp_path):
    from transformers import AutoTokenizer

    f = tmp_path / "m.jsonl"
    f.write_text("".join(json.dumps(r) + "\n" for r in messages_rows()))
    tok = AutoTokenizer.from_pretrained(tiny_model)
    task = build_task(TaskConfig(name="dataset", source=str(f), num_eval=2))
    with_system = next(r for r in task.train if len(r["prompt"]) == 2)
    without = next(r for r in task.train if len(r["prompt"]) == 1)
    assert task.chat_prompt(tok, with_system, "<r>") == (
        f"<|system|>be brief<|end|><|user|>{with_system['prompt'][1]['content']}<|end|><|assistant|><r>")
    # no system turn of their own and no task.system_prompt: the messages as they are
    assert task.chat_prompt(tok, without, "") == f"<|user|>{without['prompt'][0]['content']}<|end|><|assistant|>"
    # task.system_prompt set: put first where the messages have no system turn, never over theirs
    task2 = build_task(TaskConfig(name="dataset", source=str(f), num_eval=2, system_prompt="S"))
    assert task2.chat_prompt(tok, without, "").startswith("<|system|>S<|end|><|user|>")
    assert task2.chat_prompt(tok, with_system, "").startswith("<|system|>be brief<|end|>")


@pytest.mark.parametrize("prompt, needle", [
    (["a", "b"], "message 1 is not"),
    ([], "is an empty list"),
    ([{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}], "the last message is 'assistant'"),
    ([{"role": "robot", "content": "q"}], "message 1 is not"),
])
def test_bad_messages_name_the_row(tmp_path, prompt, needle):
    f = tmp_path / "bad.jsonl"
    f.write_text(json.dumps({"prompt": "fine", "answer": 1}) + "\n" + json.dumps({"prompt": prompt, "answer": 2}) + "\n")
    with pytest.raises(UserError) as e:
        build_task(TaskConfig(name="dataset", source=str(f)))
    assert str(e.value).startswith(f"dataset file '{f}' line 2: 'prompt'") and needle in str(e.value)


def test_messages_dataset_trains_a_step(tiny_model, toy_reward, tmp_path):
    f = tmp_path / "m.jsonl"
    f.write_text("".join(json.dumps(r) + "\n" for r in messages_rows(32)))
    sets = toy_config(tiny_model, f, toy_reward, tmp_path / "run", steps=1, **{"rollout.max_new_tokens": 6})
    result = train(load_config(None, sets), console=Console(quiet=True))
    assert len(result.history) == 1 and "loss" in result.history[0]
    logged = [json.loads(x) for x in (tmp_path / "run" / "completions.jsonl").read_text().splitlines()]
    assert isinstance(logged[0]["prompt"], list) and logged[0]["prompt"][-1]["role"] == "user"


VERL_SCORE = '''
calls = []

def compute_score(data_source, solution_str, ground_truth, extra_info=None):
    assert data_source == "toy/verl" and isinstance(extra_info, dict) and extra_info["split"] == "train"
    return {"score": float(str(ground_truth) in solution_str), "acc": 0.0}

async def compute_score_async(data_source, solution_str, ground_truth, extra_info=None):
    return float(solution_str.count("a") > 0)
'''


def write_verl_parquet(path, n: int = 24) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [{"data_source": "toy/verl",
             "prompt": [{"role": "user", "content": f"say a {i}"}],
             "ability": "toy",
             "reward_model": {"style": "rule", "ground_truth": str(i % 3)},
             "extra_info": {"split": "train", "index": i}} for i in range(n)]
    pq.write_table(pa.Table.from_pylist(rows), path)


def test_verl_rows_and_compute_score_train_a_step(tiny_model, tmp_path):
    data, score = tmp_path / "verl.parquet", tmp_path / "score.py"
    write_verl_parquet(data)
    score.write_text(VERL_SCORE)
    sets = toy_config(tiny_model, data, "unused", tmp_path / "run", steps=1, **{
        "rollout.max_new_tokens": 6, "task.answer_column": "null",
        "rewards": f"[{{name: 'verl:{score}:compute_score'}}, {{name: 'verl:{score}:compute_score_async'}}]"})
    result = train(load_config(None, sets), console=Console(quiet=True))
    m = read_metrics(tmp_path / "run" / "metrics.jsonl")[0]
    assert f"reward/verl:{score}:compute_score" in m and f"reward/verl:{score}:compute_score_async" in m
    logged = [json.loads(x) for x in (tmp_path / "run" / "completions.jsonl").read_text().splitlines()]
    for row in logged:  # each completion scored by compute_score against its own row's ground truth
        assert row[f"verl:{score}:compute_score"] == float(row["answer"] in row["completion"])
        assert row[f"verl:{score}:compute_score_async"] == float("a" in row["completion"])
    assert len(result.history) == 1
    # the rows: ground_truth as stored, its text as the answer, every verl column kept for rewards
    task = build_task(TaskConfig(name="dataset", source=str(data), num_eval=4))
    row = task.train[0]
    assert row["ground_truth"] == row["answer"] and row["data_source"] == "toy/verl"
    assert row["extra_info"]["split"] == "train" and row["prompt"][0]["role"] == "user"


def test_verl_reward_hand_worked():
    seen = []

    def compute_score(data_source, solution_str, ground_truth, extra_info):
        seen.append((data_source, solution_str, ground_truth, extra_info))
        return {"score": 0.5} if ground_truth == "x" else 2

    fn = verl_reward(compute_score, "verl:f.py:compute_score")
    assert fn(["p", "q"], ["s1", "s2"], data_source=["d", "e"], ground_truth=["x", "y"], extra_info=None) == [0.5, 2]
    assert seen == [("d", "s1", "x", None), ("e", "s2", "y", None)]
    with pytest.raises(ValueError, match="needs the columns data_source and ground_truth"):
        fn(["p"], ["s"])


def test_verl_rows_without_ground_truth_name_the_row(tmp_path):
    f = tmp_path / "v.jsonl"
    rows = [{"data_source": "d", "prompt": [{"role": "user", "content": "q"}], "reward_model": {"ground_truth": "1"}},
            {"data_source": "d", "prompt": [{"role": "user", "content": "q"}], "reward_model": {"style": "rule"}}]
    f.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(UserError, match=r"v.jsonl' line 2: 'reward_model' has no ground_truth"):
        build_task(TaskConfig(name="dataset", source=str(f)))


def test_completion_ids_reach_the_functions_that_take_them(tmp_path):
    f = tmp_path / "ids.py"
    f.write_text("def count(prompts, completions, completion_ids):\n    return [len(i) for i in completion_ids]\n"
                 "def plain(prompts, completions):\n    return [1.0] * len(completions)\n")
    rs = RewardSet([(f"{f}:count", 1.0), (f"{f}:plain", 1.0)])
    per_fn, total = rs.score(["p", "p"], ["ab", "c"], {}, completion_ids=[[5, 6, 1], [7]])
    assert per_fn.tolist() == [[3.0, 1.0], [1.0, 1.0]] and total.tolist() == [4.0, 2.0]


def test_training_passes_the_sampled_ids_through_the_worker_pool(tiny_model, toy_data, tmp_path):
    f = tmp_path / "ids.py"
    f.write_text("def n_ids(prompts, completions, completion_ids, **kw):\n    return [len(i) for i in completion_ids]\n")
    sets = toy_config(tiny_model, toy_data, "unused", tmp_path / "run", steps=1, **{
        "rollout.max_new_tokens": 6, "rewards": f"[{{name: '{f}:n_ids'}}]", "reward_workers": 2})
    result = train(load_config(None, sets), console=Console(quiet=True))  # scored in 2 worker processes
    h = result.history[0]
    assert h[f"reward/{f}:n_ids"] == pytest.approx(h["completion_len"])  # tokens through EOS, per completion


def test_held_out_accuracy_by_the_verl_reward(tiny_model, tmp_path):
    """eval.reward: on verl-style data the held-out accuracy is the verl scorer's, not <answer>-tag correctness."""
    from grouprl.evaluate import evaluate
    from grouprl.models import load_policy
    from grouprl.config import ModelConfig

    data, score = tmp_path / "verl.parquet", tmp_path / "score.py"
    write_verl_parquet(data)
    score.write_text("def always(data_source, solution_str, ground_truth, extra_info=None):\n    return 1.0\n")
    task = build_task(TaskConfig(name="dataset", source=str(data), num_eval=4, prefill=""))
    policy, tok = load_policy(ModelConfig(name_or_path=str(tiny_model), device="cpu"))
    kw = dict(prefill="", max_new_tokens=4, batch_size=4)
    by_tags, _ = evaluate(policy, tok, task, task.eval, **kw)
    by_verl, _ = evaluate(policy, tok, task, task.eval, correctness=f"verl:{score}:always", **kw)
    assert by_tags["accuracy"] == 0.0 and by_verl["accuracy"] == 1.0
