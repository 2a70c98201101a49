"""Checkpoints in the standard Hugging Face layout, written so that a kill at any moment loses nothing saved.

    <dir>/config.json, model.safetensors, tokenizer files   full fine-tuning (plain from_pretrained)
    <dir>/adapter_config.json, adapter_model.safetensors    LoRA (peft; from_pretrained loads it too)
    <dir>/merged/                                           LoRA merged into full weights, on request
    <dir>/grouprl.yaml                                      the resolved run config
    <dir>/trainer_state.json                                step, data position, reward-file hashes, schedulers
    <dir>/dcp/                                              trained weights + optimizer states, sharded (DCP)
    <dir>/rng.pt, rng-1.pt, ...                             each rank's RNG state
    <dir>/optimizer.pt                                      (checkpoints written before dcp/: read, never written)
    <dir>/critic/ or value_head.safetensors                 PPO's critic (see critic.py)
    <dir>/COMPLETE                                          the commit marker, written last

A run folder holds checkpoints/step-NNNNNN/, final/ and, with eval_every, best/ (the step with the best
held-out accuracy; written like the others, never resumed from: a resume re-runs the evaluations).

How a write commits: everything goes into '<dir>.tmp'; every file and folder in it is flushed to disk
(fsync), then the marker is written and flushed, then '<dir>.tmp' is renamed to '<dir>' (an existing
'<dir>' is first renamed to '<dir>.old' and removed afterwards). A checkpoint is a folder named
`step-NNNNNN` or `final` that holds the marker (or, written by grouprl before markers, one under its
final name); `complete_checkpoints` is the one function that lists them, and every reader (resume,
compare, eval of a run folder) goes through it. Leftovers of a kill (`.tmp`, `.old`) are never read, and
`clean_leftovers` tidies them on resume.

Under torchrun every rank calls `save_checkpoint`: rank 0 writes the Hugging Face layout (the weights
gathered from the shards under FSDP2) and commits; each rank writes its shards of dcp/ and its RNG state.
The HF layout is for users (`from_pretrained`, eval); a resume reads dcp/, at any world size.
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
from grouprl.distributed import (agree, first_line, full_state_dict, is_main, rank, save_trained, stepped_optimizers,
                                 unwrap, world_size)
from grouprl.errors import UserError

MARKER = "COMPLETE"
STEP_DIR = re.compile(r"step-(\d{6,})")
LEFTOVER = re.compile(r"(step-\d{6,}|final|best)(\.tmp|\.old)?")


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


def export_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The whole state dict of a (possibly wrapped or sharded) module: a collective under FSDP2, so every
    rank calls it; only rank 0's result is complete."""
    full = full_state_dict(model)
    return full if full is not None else unwrap(model).state_dict()


def export_pretrained(model: torch.nn.Module, folder: Path) -> None:
    """save_pretrained of a (possibly wrapped or sharded) model: every rank calls it, rank 0 writes (a peft
    model writes its adapter only)."""
    full = full_state_dict(model)
    on_main(lambda: unwrap(model).save_pretrained(folder, safe_serialization=True,
                                                  **({"state_dict": full} if full else {})))


def save_checkpoint(
    path: Path,
    model: torch.nn.Module,
    tokenizer,
    cfg: TrainConfig,
    state: dict,
    trained: dict | None = None,
    merged: bool = False,
    extra: Callable[[Path], None] | None = None,
) -> Path:
    """Write a checkpoint at `path` (see the module docstring for how it commits). Every rank calls it.
    trained: name -> (module, Optim) whose weights and optimizer states are saved sharded (dcp/), their
    schedulers in trainer_state.json; extra(folder) writes what else the learner keeps (PPO's critic).
    A write that fails (a full disk: safetensors, torch.save, DCP and the OS each say it their own way)
    is one UserError on every rank; the half-written '<path>.tmp' is never read and is removed on resume."""
    from torch.distributed.checkpoint import CheckpointException  # (a BaseException)

    try:
        return _save(path, model, tokenizer, cfg, state, trained or {}, merged, extra)
    except UserError as e:  # a write that failed on some rank, raised on every rank by agree()
        err = UserError(f"cannot write checkpoint {str(path)!r}: {e}; the checkpoints written before it are intact "
                        "(free some space and resume)")
        err.everywhere = True
        raise err from None
    except (OSError, RuntimeError, SafetensorError, CheckpointException) as e:
        why = first_line(e)
        if "No space left" not in why and _disk_full(path):  # torch.save under DCP loses the errno
            why = f"No space left on device ({why})"
        raise UserError(f"cannot write checkpoint {str(path)!r}: {why}; the checkpoints written before it "
                        "are intact (free some space and resume)") from None


def _disk_full(path: Path) -> bool:
    """Less than 1 MiB left on the disk that holds `path` (or its nearest existing parent)."""
    while not path.exists() and path != path.parent:
        path = path.parent
    try:
        return shutil.disk_usage(path).free < 2**20
    except OSError:
        return False


def on_main(fn: Callable[[], None]) -> None:
    """Run fn on rank 0 and let every rank learn whether it failed (so none waits at the next collective)."""
    _write(fn, here=is_main())


def _write(fn: Callable[[], None], here: bool) -> None:
    """Run the write fn where `here` is true; a failure on any rank is raised on every rank (agree). One
    process: the error itself, for save_checkpoint to word."""
    error = None
    if here:
        try:
            fn()
        except (OSError, RuntimeError, SafetensorError) as e:
            if world_size() == 1:
                raise
            error = first_line(e)
    agree(error)


def _save(path: Path, model: torch.nn.Module, tokenizer, cfg: TrainConfig, state: dict, trained: dict,
          merged: bool, extra: Callable[[Path], None] | None) -> Path:
    tmp = path.with_name(path.name + ".tmp")

    def start() -> None:
        if tmp.is_symlink() or tmp.is_file():  # a stray file (or link) where the write goes
            tmp.unlink()
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    on_main(start)
    export_pretrained(model, tmp)  # the weights gathered from the shards under FSDP2 (a collective)
    optims = {name: (m, o.optimizer) for name, (m, o) in trained.items()}
    stepped = stepped_optimizers(optims)

    def hf_layout() -> None:
        plain = unwrap(model)
        tokenizer.save_pretrained(tmp)
        fault_point("checkpoint:weights")
        if merged and hasattr(plain, "merge_and_unload"):
            whole = copy.deepcopy(plain).merge_and_unload()
            whole.save_pretrained(tmp / "merged", safe_serialization=True)
            tokenizer.save_pretrained(tmp / "merged")
        save_config(cfg, tmp / "grouprl.yaml")
        schedulers = {name: o.scheduler.state_dict() for name, (_, o) in trained.items()}
        (tmp / "trainer_state.json").write_text(json.dumps(state | {"schedulers": schedulers,
                                                                    "optimizers_stepped": stepped}, indent=1))
    on_main(hf_layout)
    if trained:
        save_trained(optims, tmp / "dcp", stepped)
    fault_point("checkpoint:optimizer")
    if extra is not None:
        extra(tmp)
        fault_point("checkpoint:extra")

    def rng_state() -> None:
        rng = {"torch": torch.get_rng_state()}
        if torch.cuda.is_available():  # one process: every device's; a rank: its own device's
            rng["cuda"] = torch.cuda.get_rng_state_all() if world_size() == 1 else torch.cuda.get_rng_state()
        torch.save(rng, tmp / rng_file(rank()))
    _write(rng_state, here=True)  # each rank its own

    def commit() -> None:
        _fsync_tree(tmp)
        fault_point("checkpoint:before-marker")
        (tmp / MARKER).write_text(json.dumps({"step": state["step"], "world_size": world_size()}))
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
    on_main(commit)
    return path


def rng_file(r: int) -> str:
    """Each rank's RNG state: rng.pt for rank 0 (the name one-process checkpoints have always used)."""
    return "rng.pt" if r == 0 else f"rng-{r}.pt"


def is_complete(folder: Path) -> bool:
    """The marker is there; or the folder has its final name and was written before markers existed (then
    renamed into place whole, with rng.pt last), which no kill of the current writer can leave behind."""
    if (folder / MARKER).is_file():
        return True
    return LEFTOVER.fullmatch(folder.name) is not None and "." not in folder.name \
        and (folder / "trainer_state.json").is_file() and (folder / "rng.pt").is_file()


def checkpoint_step(folder: Path) -> int:
    """The step a complete checkpoint holds, by its marker (or trainer_state.json, before markers); a step
    that is not a whole number >= 0, or not the one in a step folder's name, is a damaged checkpoint."""
    marker = folder / MARKER if (folder / MARKER).is_file() else folder / "trainer_state.json"
    try:
        step = json.loads(marker.read_text())["step"]
    except (OSError, ValueError, KeyError, TypeError, RecursionError) as e:
        step = f"unreadable: {type(e).__name__}"
    named = STEP_DIR.fullmatch(folder.name)
    if type(step) is not int or step < 0 or (named is not None and int(named[1]) != step):
        raise UserError(f"checkpoint {str(folder)!r} is damaged (its {marker.name} says step {step!r}"
                        f"{', its name ' + folder.name if named else ''}): move it aside to resume from the one "
                        "before it")
    return step


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
    candidates = [*(out_dir / "checkpoints").glob("*"), *out_dir.glob("final*"), *out_dir.glob("best*")]
    # '.tmp' before '.old': a kill between the two renames leaves both complete, and '.tmp' is the newer
    for p in sorted(candidates, key=lambda p: (p.name.endswith(".old"), p.name)):
        if not LEFTOVER.fullmatch(p.name) or "." not in p.name:
            continue  # not ours, or a checkpoint under its final name (only ever renamed there complete)
        if p.is_symlink() or not p.is_dir():  # a stray file where a write goes: never a checkpoint
            p.unlink()
            removed.append(p)
            continue
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
    """(trainer_state, the optimizer states of a checkpoint written before dcp/ (optimizer.pt) or None, this
    rank's RNG state: its own file when there is one, else rank 0's (a checkpoint written by fewer ranks: a
    resume at another world size is not bit-exact anyway)); tensors only."""
    state = json.loads((path / "trainer_state.json").read_text())
    opt = torch.load(path / "optimizer.pt", map_location="cpu", weights_only=True) \
        if (path / "optimizer.pt").exists() and not (path / "dcp").exists() else None
    own = path / rng_file(rank())
    rng = torch.load(own if own.exists() else path / rng_file(0), map_location="cpu", weights_only=True)
    return state, opt, rng
