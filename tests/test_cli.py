"""The CLI end to end on the tiny model: train, eval, and the one-line errors users see."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from grouprl.cli import app

runner = CliRunner()


def base_sets(tiny_model, toy_data, out) -> list[str]:
    sets = {
        "model.name_or_path": str(tiny_model), "task.name": "dataset", "task.source": str(toy_data),
        "task.num_eval": 6, "steps": 2, "rollout.group_size": 4, "rollout.prompts_per_step": 2,
        "rollout.max_new_tokens": 6, "output_dir": str(out), "eval.num_problems": 4, "eval.batch_size": 4,
        "rewards": "[{name: soft_format}, {name: correctness, weight: 2}]",
    }
    return [a for k, v in sets.items() for a in ("--set", f"{k}={v}")]


def run(*args):
    return runner.invoke(app, list(args), catch_exceptions=False)


def test_train_writes_metrics_completions_and_a_loadable_checkpoint(tiny_model, toy_data, tmp_path):
    out = tmp_path / "run"
    res = run("train", *base_sets(tiny_model, toy_data, out), "--set", "save_every=1")
    assert res.exit_code == 0, res.output
    assert "rollout engine: grouprl (auto)" in " ".join(res.output.split())  # the choice, logged
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in lines] == [1, 2]
    for key in ("reward", "reward/soft_format", "reward_std/correctness", "zero_std_frac", "kl", "clip_frac",
                "entropy", "completion_len", "step_time", "gen_tokens_per_s"):
        assert key in lines[0], key
    completions = (out / "completions.jsonl").read_text().splitlines()
    assert len(completions) == 2 * 2 * 4  # steps * prompts * G
    assert (out / "checkpoints" / "step-000001" / "model.safetensors").is_file()
    assert not (out / "checkpoints" / "step-000002").exists()  # the last step is the final checkpoint
    final = out / "final"
    for f in ("model.safetensors", "config.json", "grouprl.yaml", "trainer_state.json", "dcp/.metadata", "rng.pt"):
        assert (final / f).is_file(), f
    assert json.loads((final / "trainer_state.json").read_text())["step"] == 2
    assert any(p.name.startswith("events") for p in (out / "tensorboard").iterdir())

    from transformers import AutoModelForCausalLM, AutoTokenizer

    model, tok = AutoModelForCausalLM.from_pretrained(final), AutoTokenizer.from_pretrained(final)
    ids = tok("say a", return_tensors="pt").input_ids
    assert model.generate(ids, max_new_tokens=3, do_sample=False).shape[1] >= ids.shape[1]

    # eval reads the run's config from the checkpoint
    res = run("eval", "--model", str(final), "--k", "2", "-o", str(tmp_path / "eval.json"))
    assert res.exit_code == 0, res.output
    report = json.loads((tmp_path / "eval.json").read_text())
    for key in ("format_rate", "accuracy", "answer_anywhere", "pass@2", "maj@2"):
        assert 0.0 <= report["metrics"][key] <= 1.0, key
    assert report["metrics"]["problems"] == 4 and len(report["samples"]) == 4

    # a finished run is never overwritten, nor is a run in progress
    res = run("train", *base_sets(tiny_model, toy_data, out))
    assert res.exit_code == 2 and "already holds a run" in res.output and "--resume" in res.output
    (out / "final").rename(out / "kept")
    res = run("train", *base_sets(tiny_model, toy_data, out))
    assert res.exit_code == 2 and "already holds a run" in res.output
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 2

    # eval errors are caught before the work: a folder as output, a baseline that is not an eval JSON
    res = run("eval", "--model", str(out / "kept"), "-o", str(tmp_path))
    assert res.exit_code == 2 and "is a folder" in res.output
    (tmp_path / "notes.txt").write_text("hello")
    res = run("eval", "--model", str(out / "kept"), "--baseline", str(tmp_path / "notes.txt"))
    assert res.exit_code == 2 and "expected a JSON file written by" in " ".join(res.output.split())


def test_lora_checkpoint_is_an_adapter_with_merged_weights(tiny_model, toy_data, tmp_path):
    out = tmp_path / "lora"
    res = run("train", *base_sets(tiny_model, toy_data, out), "--set", "model.lora.enabled=true",
              "--set", "model.lora.target_modules=[q_proj, v_proj]", "--set", "save_merged=true",
              "--set", "grpo.beta=0.1", "--set", "steps=1")
    assert res.exit_code == 0, res.output
    final = out / "final"
    assert (final / "adapter_model.safetensors").is_file() and (final / "adapter_config.json").is_file()
    assert (final / "merged" / "model.safetensors").is_file()
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(final / "merged")
    AutoModelForCausalLM.from_pretrained(final)  # peft adapter, loaded through transformers' peft integration


@pytest.mark.parametrize(
    "sets, message",
    [
        (["rollout.group_size=1"], "rollout.group_size"),
        (["rollout.nonsense=3"], "rollout.nonsense"),
        (["grpo.advantage=best"], "grpo.advantage"),
        (["task.source=/nowhere/data.jsonl"], "not found"),
        (["model.name_or_path=/nowhere/model"], "not found"),
        (["rewards=[{name: /nowhere/r.py:f}]"], "/nowhere/r.py"),
        (["rewards=[{name: no_such_reward}]"], "no_such_reward"),
        (["task.prompt_column=question"], "question"),
    ],
)
def test_user_errors_are_one_clear_line(tiny_model, toy_data, tmp_path, sets, message):
    args = base_sets(tiny_model, toy_data, tmp_path / "err")
    for s in sets:
        args += ["--set", s]
    res = run("train", *args)
    assert res.exit_code == 2, res.output
    text = " ".join(res.output.split())
    assert text.startswith("error:") and message in text, res.output
    assert not (tmp_path / "err" / "final").exists()


@pytest.mark.parametrize("fn, message", [("raises", "raised RuntimeError: boom"), ("nan", "returned nan at index 0"),
                                         ("short", "returned 1 values")])
def test_broken_reward_functions_are_named(tiny_model, toy_data, toy_reward, tmp_path, fn, message):
    args = base_sets(tiny_model, toy_data, tmp_path / "bad") + ["--set", f"rewards=[{{name: '{toy_reward}:{fn}'}}]"]
    res = run("train", *args)
    assert res.exit_code == 2, res.output
    text = " ".join(res.output.split())
    assert f"{toy_reward}:{fn}" in text and message in text, res.output


def test_missing_config_file_and_bad_override(tmp_path):
    res = run("train", "--config", str(tmp_path / "none.yaml"))
    assert res.exit_code == 2 and "not found" in res.output
    res = run("train", "--set", "steps")
    assert res.exit_code == 2 and "key.path=value" in res.output


def test_rewards_lists_builtins():
    res = run("rewards")
    assert res.exit_code == 0 and "strict_format" in res.output and "countdown" in res.output
