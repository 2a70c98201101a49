"""Checkpoints in the standard Hugging Face layout, written atomically, with what an exact resume needs.

    <dir>/config.json, model.safetensors, tokenizer files   full fine-tuning (plain from_pretrained)
    <dir>/adapter_config.json, adapter_model.safetensors    LoRA (peft; from_pretrained loads it too)
    <dir>/merged/                                           LoRA merged into full weights, on request
    <dir>/grouprl.yaml                                      the resolved run config
    <dir>/trainer_state.json                                step, data position, metrics so far
    <dir>/optimizer.pt, rng.pt                              optimizer/scheduler and RNG states (tensors only)
    <dir>/critic/ or value_head.safetensors                 PPO's critic (see critic.py)

Everything is written into '<dir>.tmp' and renamed into place, so a crash never leaves a half checkpoint
where a complete one was.
"""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path
from typing import Callable

import torch

from grouprl.config import TrainConfig, save_config


def save_checkpoint(
    path: Path,
    model: torch.nn.Module,
    tokenizer,
    cfg: TrainConfig,
    state: dict,
    optim_state: dict | None = None,
    merged: bool = False,
    extra: Callable[[Path], None] | None = None,
) -> Path:
    """optim_state: optimizer and scheduler state dicts by name; extra(folder) writes what else the
    algorithm keeps (PPO's critic)."""
    tmp = path.with_name(path.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    if merged and hasattr(model, "merge_and_unload"):
        full = copy.deepcopy(model).merge_and_unload()
        full.save_pretrained(tmp / "merged", safe_serialization=True)
        tokenizer.save_pretrained(tmp / "merged")
    save_config(cfg, tmp / "grouprl.yaml")
    (tmp / "trainer_state.json").write_text(json.dumps(state, indent=1))
    if optim_state is not None:
        torch.save(optim_state, tmp / "optimizer.pt")
    if extra is not None:
        extra(tmp)
    rng = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state_all()
    torch.save(rng, tmp / "rng.pt")
    old = path.with_name(path.name + ".old")
    if path.exists():
        path.rename(old)
    tmp.rename(path)
    shutil.rmtree(old, ignore_errors=True)
    return path


def latest_checkpoint(out_dir: Path) -> Path | None:
    """The checkpoint of `out_dir` (checkpoints/step-N or final) with the highest step, or None."""
    found = [p for p in [out_dir / "final", *(out_dir / "checkpoints").glob("step-*")]
             if (p / "trainer_state.json").is_file()]
    return max(found, key=lambda p: json.loads((p / "trainer_state.json").read_text())["step"], default=None)


def load_weights(model: torch.nn.Module, folder: Path) -> None:
    """Put the weights that save_pretrained wrote in `folder` back into `model`: a peft adapter into a peft
    model, or a full (possibly sharded) safetensors checkpoint."""
    from safetensors.torch import load_file

    if (folder / "adapter_model.safetensors").is_file():
        from peft import set_peft_model_state_dict

        set_peft_model_state_dict(model, load_file(folder / "adapter_model.safetensors"))
        return
    index = folder / "model.safetensors.index.json"
    if index.is_file():  # sharded: every file the index names
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        state = {k: v for shard in shards for k, v in load_file(folder / shard).items()}
    else:
        state = load_file(folder / "model.safetensors")
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected, unexpected
    assert not missing or getattr(model.config, "tie_word_embeddings", False), missing  # only tied weights


def load_trainer_state(path: Path) -> tuple[dict, dict | None, dict]:
    """(trainer_state, optimizer and scheduler states or None, rng state) of a checkpoint; tensors only."""
    state = json.loads((path / "trainer_state.json").read_text())
    opt = torch.load(path / "optimizer.pt", map_location="cpu", weights_only=True) \
        if (path / "optimizer.pt").exists() else None  # optimizers move their state to the parameters' device
    rng = torch.load(path / "rng.pt", map_location="cpu", weights_only=True)
    return state, opt, rng
