"""Checkpoints in the standard Hugging Face layout, written so that a kill at any moment loses nothing saved.

    <dir>/config.json, model.safetensors, tokenizer files   full fine-tuning (plain from_pretrained)
    <dir>/adapter_config.json, adapter_model.safetensors    LoRA (peft; from_pretrained loads it too)
    <dir>/merged/                                           LoRA merged into full weights, on request
    <dir>/grouprl.yaml                                      the resolved run config
    <dir>/trainer_state.json                                step, data position, reward-file hashes
    <dir>/optimizer.pt, rng.pt                              optimizer/scheduler and RNG states (tensors only)
    <dir>/critic/ or value_head.safetensors                 PPO's critic (see critic.py)
    <dir>/COMPLETE                                          the commit marker, written last

How a write commits: everything goes into '<dir>.tmp'; every file and folder in it is flushed to disk
(fsync), then the marker is written and flushed, then '<dir>.tmp' is renamed to '<dir>' (an existing
'<dir>' is first renamed to '<dir>.old' and removed afterwards). A checkpoint is a folder named
`step-NNNNNN` or `final` that holds the marker (or, written by grouprl before markers, one under its
final name); `complete_checkpoints` is the one function that lists them, and every reader (resume,
compare, eval of a run folder) goes through it. Leftovers of a kill (`.tmp`, `.old`) are never read, and
`clean_leftovers` tidies them on resume.
"""

from __future__ import annotations

import copy
import json
import os
import re
import shutil
import signal
from pathlib import Path
from typing import Callable

import torch
from safetensors import SafetensorError

from grouprl.config import TrainConfig, save_config
from grouprl.errors import UserError

MARKER = "COMPLETE"
STEP_DIR = re.compile(r"step-(\d{6,})")
LEFTOVER = re.compile(r"(step-\d{6,}|final)(\.tmp|\.old)?")


def fault_point(name: str) -> None:
    """Test hook for the fault-injection tests: with GROUPRL_FAULT='name@k' in the environment, the k-th
    time the code passes `name` the process kills itself with SIGKILL (a power cut at that spot)."""
    want = os.environ.get("GROUPRL_FAULT")
    if not want or want.partition("@")[0] != name:
        return
    count = fault_point.counts.get(name, 0) + 1  # type: ignore[attr-defined]
    fault_point.counts[name] = count  # type: ignore[attr-defined]
    if count == int(want.partition("@")[2] or 1):
        os.kill(os.getpid(), signal.SIGKILL)


fault_point.counts = {}  # type: ignore[attr-defined]


def _fsync(path: Path) -> None:
    """Flush a file, or a folder's entries, to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(folder: Path) -> None:
    """Flush every file and folder under `folder` (itself included) to disk."""
    for root, _, files in os.walk(folder):
        for name in files:
            _fsync(Path(root) / name)
        _fsync(Path(root))


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
    """Write a checkpoint at `path` (see the module docstring for how it commits). optim_state: optimizer
    and scheduler state dicts by name; extra(folder) writes what else the learner keeps (PPO's critic).
    A write that fails (a full disk: safetensors, torch.save and the OS each say it their own way) is one
    UserError; the half-written '<path>.tmp' is never read and is removed on resume."""
    try:
        return _save(path, model, tokenizer, cfg, state, optim_state, merged, extra)
    except (OSError, RuntimeError, SafetensorError) as e:
        lines = str(e).strip().splitlines()
        raise UserError(f"cannot write checkpoint {str(path)!r}: {lines[0] if lines else type(e).__name__}; the "
                        "checkpoints written before it are intact (free some space and resume)") from None


def _save(path: Path, model: torch.nn.Module, tokenizer, cfg: TrainConfig, state: dict, optim_state: dict | None,
          merged: bool, extra: Callable[[Path], None] | None) -> Path:
    tmp = path.with_name(path.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    fault_point("checkpoint:weights")
    if merged and hasattr(model, "merge_and_unload"):
        full = copy.deepcopy(model).merge_and_unload()
        full.save_pretrained(tmp / "merged", safe_serialization=True)
        tokenizer.save_pretrained(tmp / "merged")
    save_config(cfg, tmp / "grouprl.yaml")
    (tmp / "trainer_state.json").write_text(json.dumps(state, indent=1))
    if optim_state is not None:
        torch.save(optim_state, tmp / "optimizer.pt")
    fault_point("checkpoint:optimizer")
    if extra is not None:
        extra(tmp)
        fault_point("checkpoint:extra")
    rng = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state_all()
    torch.save(rng, tmp / "rng.pt")
    _fsync_tree(tmp)
    fault_point("checkpoint:before-marker")
    (tmp / MARKER).write_text(json.dumps({"step": state["step"]}))
    _fsync(tmp / MARKER)  # the rest is on disk already
    _fsync(tmp)
    old = path.with_name(path.name + ".old")
    if path.exists():
        shutil.rmtree(old, ignore_errors=True)
        path.rename(old)
        fault_point("checkpoint:swap")
    tmp.rename(path)
    _fsync(path.parent)
    _fsync(path.parent.parent)  # checkpoints/ itself may be new
    shutil.rmtree(old, ignore_errors=True)
    return path


def is_complete(folder: Path) -> bool:
    """The marker is there; or the folder has its final name and was written before markers existed (then
    renamed into place whole, with rng.pt last), which no kill of the current writer can leave behind."""
    if (folder / MARKER).is_file():
        return True
    return LEFTOVER.fullmatch(folder.name) is not None and "." not in folder.name \
        and (folder / "trainer_state.json").is_file() and (folder / "rng.pt").is_file()


def checkpoint_step(folder: Path) -> int:
    marker = folder / MARKER
    return int(json.loads((marker if marker.is_file() else folder / "trainer_state.json").read_text())["step"])


def complete_checkpoints(out_dir: Path) -> list[tuple[int, Path]]:
    """Every complete checkpoint of a run folder, (step, folder) sorted by step; `final` sorts after a step
    checkpoint of the same step. Only `checkpoints/step-NNNNNN` and `final` holding the marker count."""
    found = [(checkpoint_step(p), 0, p) for p in sorted((out_dir / "checkpoints").glob("step-*"))
             if STEP_DIR.fullmatch(p.name) and p.is_dir() and is_complete(p)]
    if is_complete(out_dir / "final"):
        found.append((checkpoint_step(out_dir / "final"), 1, out_dir / "final"))
    return [(step, p) for step, _, p in sorted(found)]


def latest_checkpoint(out_dir: Path) -> Path | None:
    """The complete checkpoint of `out_dir` with the highest step (final on a tie), or None."""
    found = complete_checkpoints(out_dir)
    return found[-1][1] if found else None


def clean_leftovers(out_dir: Path) -> list[Path]:
    """Tidy what a kill mid-write left behind; returns what was removed. A '<dir>.tmp' or '<dir>.old' that
    is complete while '<dir>' is missing (a kill between the two renames) is put back in place."""
    removed = []
    candidates = [*(out_dir / "checkpoints").glob("*"), *out_dir.glob("final*")]
    # '.tmp' before '.old': a kill between the two renames leaves both complete, and '.tmp' is the newer
    for p in sorted(candidates, key=lambda p: (p.name.endswith(".old"), p.name)):
        if not p.is_dir() or not LEFTOVER.fullmatch(p.name) or "." not in p.name:
            continue  # not ours, or a checkpoint under its final name (only ever renamed there complete)
        base = p.with_name(p.name.rpartition(".")[0])
        if not base.exists() and is_complete(p):
            p.rename(base)
        else:
            shutil.rmtree(p, ignore_errors=True)
            removed.append(p)
    return removed


def prune_checkpoints(out_dir: Path, keep: int | None) -> None:
    """save_total_limit: keep the newest `keep` step checkpoints (final/ is never removed)."""
    if keep is None:
        return
    steps = [p for _, p in complete_checkpoints(out_dir) if p.name != "final"]
    for p in steps[:-keep]:
        shutil.rmtree(p, ignore_errors=True)


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
