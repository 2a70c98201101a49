"""The cb engine: transformers' continuous batching (`ContinuousBatchingManager`, the machinery behind
`generate_batch`). The KV cache is paged; each prompt is prefilled once and its G completions are forked
from it (`num_return_sequences`, sharing the prompt's pages); a finished completion frees its pages and
its slot at once, so the batch stays full whatever the spread of completion lengths.

Prompts go in unpadded. The cache is sized from the workload (every prompt and completion at full length)
rather than from the device's free memory, which on the CPU would reserve most of the RAM; the tokens of
one forward are capped (MAX_BATCH_TOKENS: the scheduler splits longer prefills), since without flash
attention their mask grows with that number times the cache. One manager per call, its requests all queued
before its thread starts, so the batches it forms do not depend on thread timing. It draws from torch's
global generator, seeded for the call from the prompts' seeds (or from the global generator) inside
`torch.random.fork_rng`, so the call is reproducible and leaves the process's generators as they were.
Its attention kernel is the model's own (no switch to flash), put back if the manager changed it.
"""

from __future__ import annotations

import math
import random

import torch
from torch import Tensor
from transformers.generation import ContinuousBatchingConfig

from grouprl.distributed import unwrap
from grouprl.engines import SamplingParams, Sampled, pad_after_eos
from grouprl.engines.hf import generation_config
from grouprl.errors import UserError

PAGE = 64  # tokens per page
MAX_BATCH_TOKENS = 4096


def _base(model):
    """The transformers model that owns `init_continuous_batching` (under peft, the LoRA layers are in it)."""
    model = unwrap(model)
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def cache_config(prompt_lengths: list[int], params: SamplingParams, forks: int, device: torch.device,
                 seed: int) -> ContinuousBatchingConfig:
    g, c, requests = forks, params.max_new_tokens, len(prompt_lengths) * forks
    # each prompt's pages once (shared by its G forks) plus each completion's own pages, with one page of slack
    pages = sum(math.ceil(p / PAGE) + g * (math.ceil((p % PAGE + c) / PAGE) + 1) for p in prompt_lengths)
    return ContinuousBatchingConfig(page_size=PAGE, num_blocks=pages, return_logprobs=params.with_logprobs,
                                    max_batch_tokens=max(min(sum(prompt_lengths), MAX_BATCH_TOKENS), requests),
                                    max_requests_per_batch=requests, scheduler_type="fifo", seed=seed,
                                    auto_switch_to_flash=False,
                                    use_cuda_graph=None if device.type == "cuda" else False)  # None: its own choice


def _seed(params: SamplingParams) -> int:
    if params.seeds is not None:
        return random.Random("/".join(map(str, params.seeds))).getrandbits(31)
    return int(torch.randint(0, 2**31 - 1, ()).item())


@torch.no_grad()
def sample(model, prompt_ids: Tensor, prompt_mask: Tensor, params: SamplingParams) -> Sampled:
    g, device = params.group_size, prompt_ids.device
    inputs = [ids[m.bool()].tolist() for ids, m in zip(prompt_ids, prompt_mask)]
    # sampling forks G completions from each prompt; greedy ones are all the same, so G requests per prompt
    forks = 1 if params.greedy else g
    if params.greedy:
        inputs = [x for x in inputs for _ in range(g)]
    gen = generation_config(params, num_return_sequences=forks)
    model = _base(model)
    kernel = model.config._attn_implementation
    results = {}
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        try:
            manager = model.init_continuous_batching(generation_config=gen, continuous_batching_config=cache_config(
                [len(i) for i in inputs], params, forks, device, _seed(params)))
        except (ValueError, NotImplementedError, AttributeError, TypeError) as e:
            raise UserError(f"rollout.engine=cb cannot run {type(model).__name__}: {str(e).splitlines()[0]}; use "
                            "rollout.engine=hf or grouprl") from None
        try:
            request_ids = manager.add_requests(inputs=inputs, max_new_tokens=params.max_new_tokens)
            manager.start()
            while len(results) < len(inputs) * forks:
                out = manager.get_result(timeout=1)
                if out is not None and out.is_finished():
                    if out.error is not None:
                        raise RuntimeError(f"continuous batching: request {out.request_id} failed: {out.error}")
                    results[out.request_id] = out
                elif out is None and not manager.is_running():
                    raise RuntimeError("continuous batching: its thread stopped before every request finished")
        finally:
            manager.stop(block=True, timeout=10)
            manager.destroy()
            if model.config._attn_implementation != kernel:
                model.set_attn_implementation(kernel)
    # a request's completions: its forks __child#0 .. #G-2, then the parent
    rows = [x for r in request_ids for x in [*(results[f"{r}__child#{i}"] for i in range(forks - 1)), results[r]]]
    width = max(len(r.generated_tokens) for r in rows)
    ids = torch.full((len(rows), width), params.pad_token_id, dtype=torch.long)
    logprobs = torch.zeros(len(rows), width) if params.with_logprobs else None
    for i, r in enumerate(rows):
        ids[i, :len(r.generated_tokens)] = torch.tensor(r.generated_tokens)
        if logprobs is not None:
            logprobs[i, :len(r.logprobs)] = torch.tensor(r.logprobs)
    return pad_after_eos(ids.to(device), None if logprobs is None else logprobs.to(device), params,
                         prefills=g // forks)  # greedy: G requests, each with its own prefill
