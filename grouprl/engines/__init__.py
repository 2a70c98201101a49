"""Rollout engines: what samples the completions. One module per engine, each with one function,

    sample(model, prompt_ids, prompt_mask, params) -> Sampled | None

prompt_ids, prompt_mask: (B, P) left-padded, one row per prompt. It returns G completions per prompt, rows
b*G .. b*G + G - 1 for prompt b, as token ids (N, C) padded with params.pad_token_id after each row's EOS,
and, when params.with_logprobs, the engine's own log-probability of every sampled token under the
distribution it sampled from. The grouprl loop returns None for a model whose cache it cannot re-index,
and the caller falls back to hf; cb raises a one-line UserError for a model it cannot run.

The trainer recomputes every log-prob it trains on, so an engine only has to sample from the right
distribution; the log-probs it returns are for checking that (tests/test_engines.py) and nothing else.
A vLLM or SGLang engine would be one more module here (docs/engines.md says how).

    grouprl  grouprl's KV-cached loop: one prefill per prompt, finished rows leave the batch, seeded per prompt;
             an episode's cache kept across its turns (`resume` reads only the new tokens)
    hf       transformers' generate (a static cache and torch.compile on request)
    cb       transformers' continuous batching: paged attention, the G completions forked from one prefill
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor

ENGINES = ("grouprl", "hf", "cb")


@dataclass(frozen=True)
class SamplingParams:
    group_size: int
    max_new_tokens: int
    eos: tuple[int, ...]
    pad_token_id: int
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    greedy: bool = False
    seeds: tuple[int, ...] | None = None  # one per prompt: grouprl seeds each group with its own; cb seeds the call
    with_logprobs: bool = False
    static_cache: bool = False  # hf: a static KV cache
    compile: bool = False  # hf: torch.compile the decoding step (with the static cache)
    keep_cache: bool = False  # grouprl: return each row's KV cache (Sampled.kept), for the episode's next turn


class Sampled(NamedTuple):
    completion_ids: Tensor  # (N, C) long, pad after each row's EOS, C <= max_new_tokens
    logprobs: Tensor | None  # (N, C) float32: log-prob of each sampled token as the engine drew it; 0 on padding
    prefills: int  # forwards of each prompt the engine ran (1: its G completions fork from one prefill)
    kept: list | None = None  # with params.keep_cache (grouprl engine): each row's KV cache at its end (Kept)


def pick(engine: str, device: torch.device) -> str:
    """rollout.engine 'auto': the fastest engine measured on the device (benchmarks/engines.py): grouprl's loop
    on the CPU; transformers' generate on CUDA, where the loop's per-token Python overhead measured 2-4x
    slower (launch-bound decoding)."""
    if engine == "auto":
        return "grouprl" if device.type == "cpu" else "hf"
    if engine not in ENGINES:
        raise ValueError(f"rollout.engine={engine!r}: expected auto or one of {', '.join(ENGINES)}")
    return engine


def sample(engine: str, model, prompt_ids: Tensor, prompt_mask: Tensor, params: SamplingParams) -> Sampled:
    """Run `engine` (a name from ENGINES); an engine that cannot run this model hands over to hf."""
    module = importlib.import_module(f"grouprl.engines.{'loop' if engine == 'grouprl' else engine}")
    out = module.sample(model, prompt_ids, prompt_mask, params)
    if out is None:  # (after its prefill: that one counts too)
        from grouprl.engines import hf
        out = hf.sample(model, prompt_ids, prompt_mask, params)
        out = out._replace(prefills=out.prefills + 1)
    return out


def resume(model, kept: list, chunks: list[list[int]], params: SamplingParams) -> Sampled:
    """The next turn of episodes whose last turn the grouprl engine sampled with params.keep_cache: each row
    reads only its new tokens (`chunks`) after its kept cache (Sampled.kept)."""
    from grouprl.engines import loop

    return loop.resume(model, kept, chunks, params)


def completion_mask_from_ids(completion_ids: Tensor, eos: list[int]) -> tuple[Tensor, Tensor]:
    """(N, C) ids -> (mask (N, C) float: 1 through the first EOS, truncated (N,) bool: no EOS at all)."""
    is_eos = torch.isin(completion_ids, torch.tensor(eos, device=completion_ids.device))
    after_eos = (is_eos.long().cumsum(1) - is_eos.long()) > 0  # strictly after the first EOS
    return (~after_eos).float(), ~is_eos.any(1)


def pad_after_eos(ids: Tensor, logprobs: Tensor | None, params: SamplingParams, prefills: int) -> Sampled:
    """Pad ids (and zero log-probs) after each row's first EOS."""
    after = completion_mask_from_ids(ids, list(params.eos))[0] == 0
    ids = ids.masked_fill(after, params.pad_token_id)
    return Sampled(ids, None if logprobs is None else logprobs.masked_fill(after, 0.0), prefills)
