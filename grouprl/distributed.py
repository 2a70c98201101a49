"""Everything that knows about ranks: the process group, reductions, DDP / FSDP2 wrapping, sampling with
sharded weights, and the state dicts that checkpoints write. Outside this module, code asks `rank()`,
`is_main()`, `world_size()` and calls the helpers below; nothing else branches on the rank.

Launched by torchrun (one process per device), the job splits each step's prompts into contiguous slices of
whole groups, one per rank; each rank samples and scores its slice, and every rank then gathers the whole
scored batch (token ids and rewards: small beside the model). From there all ranks hold identical batches,
so advantages, normalisers, batch std, dynamic-sampling counts, PPO whitening and the adaptive KL are
computed from the whole batch exactly as in one process. The forward/backward of each minibatch is split
by whole groups across ranks; DDP or FSDP2 sum the gradients (the loss is scaled by the world size because
both average), and statistics are all-reduced. Without a process group every helper is the identity, so
one process runs the same code.
"""

from __future__ import annotations

import gc
import os
import traceback
from contextlib import contextmanager
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import Tensor, nn

from grouprl.config import DistributedConfig
from grouprl.errors import UserError


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def is_main() -> bool:
    return rank() == 0


def launched_world_size() -> int:
    """WORLD_SIZE set by torchrun (1 when run as a plain process)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def init(timeout_s: float) -> None:
    """Join the torchrun job (once): nccl with one GPU per process (LOCAL_RANK) when CUDA is there, else gloo.
    A collective that waits longer than timeout_s (a rank that died or hangs) raises instead of hanging."""
    if dist.is_initialized() or launched_world_size() == 1:
        return
    from grouprl.guard import die_with_parent

    # a SIGKILL of the launcher (torchrun, or grouprl train --nproc) must not leave its workers training
    die_with_parent(int(os.environ["GROUPRL_LAUNCHER_PID"]) if "GROUPRL_LAUNCHER_PID" in os.environ else None)
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    dist.init_process_group(backend, timeout=timedelta(seconds=timeout_s))


def shutdown(err: BaseException | None = None) -> None:
    """Leave the process group, after releasing what still holds a DDP reducer: the models, reachable from
    the finished frames of `err`'s traceback (and of the exceptions it chains) or only through a reference
    cycle. A reducer that outlives the group frees gloo's process group itself, later (at exit, say), while
    holding the GIL, and joins gloo's worker threads; one of them that is freeing a finished collective's
    tensors waits for the GIL, so the process never exits (seen about once in ten Ctrl-C stops on two busy
    cores). Released here, the group is freed by its own Python object, which lets go of the GIL first."""
    if not dist.is_initialized():
        return
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        traceback.clear_frames(err.__traceback__)
        err = err.__cause__ or err.__context__
    gc.collect()
    dist.destroy_process_group()


def shard(n: int) -> tuple[int, int]:
    """[start, stop) of this rank's contiguous slice of n items (sizes differ by at most one)."""
    w, r = world_size(), rank()
    return r * n // w, (r + 1) * n // w


def all_reduce_sum(t: Tensor) -> Tensor:
    """The elementwise sum over ranks, in place (gloo and nccl both take the tensor's own device)."""
    if world_size() > 1:
        dist.all_reduce(t)
    return t


def sum_floats(values: dict[str, float], device: torch.device) -> dict[str, float]:
    """Sum a dict of floats over ranks; every rank passes the same keys."""
    if world_size() == 1 or not values:
        return values
    keys = sorted(values)
    t = all_reduce_sum(torch.tensor([values[k] for k in keys], dtype=torch.float64, device=device))
    return dict(zip(keys, t.tolist()))


def any_rank(flag: bool, device: torch.device) -> bool:
    """True on every rank when it is true on at least one."""
    if world_size() == 1:
        return flag
    return bool(all_reduce_sum(torch.tensor([float(flag)], device=device)).item() > 0)


def gather_objects(obj) -> list:
    """[obj of rank 0, obj of rank 1, ...] on every rank (picklable objects: tensors are moved to the CPU
    by the caller)."""
    if world_size() == 1:
        return [obj]
    out = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def agree(error: str | None) -> None:
    """A collective check: every rank passes its problem (or None); when any rank found one, every rank
    raises the same UserError, so no rank is left waiting in a collective."""
    agree_errors([e for e in gather_objects(error)])


def agree_errors(errors: list[str | None]) -> None:
    """Raise the first rank's error of an already gathered list (prefixed with its rank when not rank 0)."""
    found = [(r, e) for r, e in enumerate(errors) if e]
    if found:
        r, e = found[0]
        err = UserError(e if r == 0 or e.startswith("rank ") else f"rank {r}: {e}")
        err.everywhere = True  # every rank raises it: rank 0 alone says it
        raise err


def gather_results(fn) -> list:
    """fn() on every rank, its results gathered in rank order (one process: [fn()]). An exception on any rank
    (out of memory too) becomes the same UserError on every rank, raised after the gather, so no rank is left
    waiting in it; an unexpected one's traceback is printed by its own rank first."""
    if world_size() == 1:
        return [fn()]
    result, error = None, None
    try:
        result = fn()
    except Exception as e:  # noqa: BLE001  (one rank's fault must not leave the others in the gather below)
        if not isinstance(e, UserError):
            import traceback

            traceback.print_exc()
        error = first_line(e) if isinstance(e, UserError) else f"{type(e).__name__}: {first_line(e)} (traceback above)"
    pieces = gather_objects((result, error))
    agree_errors([e for _, e in pieces])
    return [r for r, _ in pieces]


def first_line(err: BaseException) -> str:
    """The gist of an error in one line; for DCP's CheckpointException, the first failing rank's own error
    (its message is otherwise a list of ranks and tracebacks)."""
    failures = getattr(err, "failures", None)
    if isinstance(failures, dict) and failures:
        r, (inner, _) = sorted(failures.items())[0]
        return (f"rank {r}: " if world_size() > 1 else "") + first_line(inner)
    if isinstance(err, OSError) and err.strerror:
        return f"{err.strerror}" + (f": {str(err.filename)!r}" if err.filename else "")
    if str(err).startswith("Weights only load failed"):  # not torch's advice to load it unrestricted
        return "it holds objects other than tensors and plain values, which a weights_only load refuses"
    lines = [line for line in str(err).strip().splitlines() if line.strip()]
    return lines[0] if lines else type(err).__name__


# ---- wrapping -------------------------------------------------------------------------------------------

def is_fsdp(model: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return any(isinstance(m, FSDPModule) for m in model.modules())


def unwrap(model: nn.Module) -> nn.Module:
    """The module under a DDP wrapper (FSDP2 shards in place and keeps the module's own class and methods)."""
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def pick_strategy(strategy: str, model: nn.Module, device: torch.device) -> str:
    """'auto': DDP when the parameters, gradients and AdamW's two moments of this model take under half
    of one device's memory (the rest is for activations and the KV cache), else FSDP2."""
    if strategy != "auto":
        return strategy
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    trained = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    need = total + trained + 2 * 4 * sum(p.numel() for p in model.parameters() if p.requires_grad)
    if device.type == "cuda":
        capacity = torch.cuda.get_device_properties(device).total_memory
    else:
        capacity = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // max(1, int(
            os.environ.get("LOCAL_WORLD_SIZE", "1")))
    return "ddp" if need < capacity / 2 else "fsdp2"


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The transformer blocks, found by the class names the model lists in `_no_split_modules` (every
    transformers causal LM does), under any peft wrapping."""
    base = unwrap(model)
    inner = base.get_base_model() if hasattr(base, "get_base_model") else base
    names = set(getattr(inner, "_no_split_modules", None) or [])
    return [m for m in base.modules() if type(m).__name__ in names]


def wrap(model: nn.Module, cfg: DistributedConfig, trainable: bool = True, mixed: bool = True) -> nn.Module:
    """Make `model` data parallel across the job: DDP (a replica per rank, gradients all-reduced) or FSDP2
    (`fully_shard` per decoder layer, then the root: parameters, gradients and optimizer state sharded).
    A frozen model (the reference) is sharded under FSDP2 and left as is under DDP. One process: unchanged.
    cfg.strategy is already resolved (not 'auto'); mixed=False keeps FSDP2's compute in the weights' dtype
    (the float32 value head)."""
    strategy = cfg.strategy
    if world_size() == 1 or (strategy == "ddp" and not trainable):
        return model
    assert strategy != "auto", "resolve it with pick_strategy first"
    if strategy == "ddp":
        device = next(model.parameters()).device
        import inspect

        params = inspect.signature(nn.parallel.DistributedDataParallel).parameters  # buffers (rotary tables) match
        no_sync = {"forward_sync_buffers": False} if "forward_sync_buffers" in params else {"broadcast_buffers": False}
        return nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None, **no_sync)
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard

    kwargs = {}
    if cfg.cpu_offload:
        kwargs["offload_policy"] = CPUOffloadPolicy()
    on_cuda = next(model.parameters()).device.type == "cuda"
    if mixed and (cfg.mixed_precision == "bf16" or (cfg.mixed_precision == "auto" and on_cuda)):
        # compute in bf16, reduce gradients in float32; the weights and AdamW stay in the model's dtype
        kwargs["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    for layer in decoder_layers(model):
        fully_shard(layer, **kwargs)
    fully_shard(model, **kwargs)
    return model


@contextmanager
def gathered(model: nn.Module):
    """Run no-grad forwards of a different number per rank (sampling: each rank stops at its own last EOS)
    on whole weights. FSDP2: every sharded module is all-gathered once, kept whole while inside (one full
    copy of the weights per rank), and resharded after. DDP or one process: the module itself."""
    from torch.distributed.fsdp import FSDPModule

    model = unwrap(model)
    sharded = [m for m in model.modules() if isinstance(m, FSDPModule)]
    for m in sharded:
        m.unshard()
        m.set_reshard_after_forward(False)
    try:
        yield model
    finally:
        for m in sharded:
            m.set_reshard_after_forward(True)
            m.reshard()


@contextmanager
def no_grad_sync(models: list[nn.Module], sync: bool):
    """Gradient accumulation without an all-reduce per micro-batch under DDP (`no_sync` unless this is the
    last micro-batch of an optimizer step). FSDP2 reduce-scatters every micro-batch, which keeps only
    sharded gradients in memory."""
    from contextlib import ExitStack

    with ExitStack() as stack:
        if not sync:
            for m in models:
                if isinstance(m, nn.parallel.DistributedDataParallel):
                    stack.enter_context(m.no_sync())
        yield


# ---- state for checkpoints ------------------------------------------------------------------------------

def full_state_dict(model: nn.Module) -> dict[str, Tensor] | None:
    """The whole state dict on rank 0's CPU for the Hugging Face export (a collective under FSDP2: every
    rank calls it); None when the module's own state_dict() is already whole (DDP or one process)."""
    if not is_fsdp(model):
        return None
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    # a tied weight (lm_head = embed_tokens) once, under the name that named_parameters() keeps, as
    # save_pretrained writes it
    own = {n for n, _ in model.named_parameters()} | {n for n, _ in model.named_buffers()}
    return {k: v for k, v in full.items() if k in own}


def trained_state(parts: dict[str, tuple[nn.Module, torch.optim.Optimizer]], stepped: set[str]) -> dict:
    """{name: {"model": trainable weights, "optim": optimizer state}} keyed by parameter name (FQN), sharded
    as the job holds them: what DCP saves and loads, at any world size. Only the optimizers named in
    `stepped` have an "optim" entry: asking torch for the state of an optimizer that has never stepped
    makes it take a step with lr 0 (zero moments, step 1), which would change the first real step."""
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                         get_optimizer_state_dict)

    options = StateDictOptions(ignore_frozen_params=True)
    out = {}
    for name, (module, optimizer) in parts.items():
        out[name] = {"model": get_model_state_dict(module, options=options)}
        if name in stepped:
            out[name]["optim"] = get_optimizer_state_dict(module, optimizer, options=options)
    return out


def stepped_optimizers(parts: dict[str, tuple[nn.Module, torch.optim.Optimizer]]) -> list[str]:
    """The names of the optimizers that have state (have taken a step)."""
    return sorted(name for name, (_, optimizer) in parts.items() if optimizer.state)


def save_trained(parts: dict[str, tuple[nn.Module, torch.optim.Optimizer]], folder, stepped: list[str]) -> None:
    """Write the trained weights, and the states of the optimizers in `stepped`, with
    torch.distributed.checkpoint (each rank its shards)."""
    import warnings

    import torch.distributed.checkpoint as dcp

    with warnings.catch_warnings():  # "assuming the intent is to save in a single process": it is
        warnings.filterwarnings("ignore", message=".*single process.*")
        dcp.save(trained_state(parts, set(stepped)), checkpoint_id=str(folder))


def _fqn(name: str) -> str:
    """A parameter's name without DDP's `module.` segments."""
    return ".".join(p for p in name.split(".") if p != "module")


def load_trained(parts: dict[str, tuple[nn.Module, torch.optim.Optimizer]], folder, stepped: list[str]) -> None:
    """Read what save_trained wrote, resharded to this job's world size and strategy; the optimizers not in
    `stepped` (they had not stepped when saved) are left without state, as they were."""
    import warnings

    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, set_model_state_dict,
                                                         set_optimizer_state_dict)

    from grouprl.safe_dcp import SafePlanner, SafeReader

    state = trained_state(parts, set(stepped))
    with warnings.catch_warnings():  # "assuming the intent is to load in a single process": it is
        warnings.filterwarnings("ignore", message=".*single process.*")
        dcp.load(state, storage_reader=SafeReader(str(folder)), planner=SafePlanner())  # runs no code from it
    # not strict: the frozen weights (a LoRA base) are not in the checkpoint; everything else must be
    options = StateDictOptions(ignore_frozen_params=True, strict=False)
    for name, (module, optimizer) in parts.items():
        frozen = {_fqn(n) for n, p in module.named_parameters() if not p.requires_grad}
        missing, unexpected = set_model_state_dict(module, state[name]["model"], options=options)
        missing = [k for k in missing if _fqn(k) not in frozen]
        assert not missing and not unexpected, (name, missing[:3], unexpected[:3])
        if "optim" in state[name]:
            set_optimizer_state_dict(module, optimizer, state[name]["optim"], options=options)
