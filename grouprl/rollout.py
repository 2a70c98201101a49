"""Sampling completions into a typed Rollout; the engine that samples is chosen in grouprl/engines.

Layout of one batch of N = B * G sequences: row i answers prompt i // G. Prompts are left-padded to P
tokens, completions right-padded to C tokens, so every completion starts at column P. In an episode of
several turns (episodes.py) the completion holds the model's turns and the environment's replies between
them: attention_mask is 1 on all of them, completion_mask (the loss mask) only on the tokens the model sampled.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import NamedTuple

import torch
from torch import Tensor
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from grouprl import engines
from grouprl.engines import completion_mask_from_ids  # noqa: F401  (also imported from here)
from grouprl.distributed import is_fsdp


class Rollout(NamedTuple):
    input_ids: Tensor  # (N, P + C) prompt tokens (left-padded) then completion tokens (right-padded)
    attention_mask: Tensor  # (N, P + C) 1 on real prompt tokens and on completion tokens through the end
    completion_mask: Tensor  # (N, C) float, the loss mask: 1.0 on the tokens the model sampled, through its EOS
    truncated: Tensor  # (N,) bool: no EOS within max_new_tokens (episodes: stopped by a limit)
    completions: list[str]  # N completion texts (episodes: the last model turn's), prefill included, no special tokens
    prompt_index: list[int]  # N: index of the prompt (in the list given) each row answers
    group_size: int  # G: rows i*G .. i*G + G - 1 answer the same prompt
    temperature: float  # the sampling temperature, which the trainer's logprobs apply too
    logprobs: Tensor | None = None  # (N, C) the engine's own log-prob of each sampled token, when asked for
    prefills: int = 1  # forwards of each prompt that sampling ran (G when every completion prefilled its own)
    turn_rewards: Tensor | None = None  # (N, C) episodes: each turn's reward on the turn's last model token

    @property
    def prompt_len(self) -> int:
        return self.input_ids.shape[1] - self.completion_mask.shape[1]

    @property
    def completion_len(self) -> int:
        return self.completion_mask.shape[1]

    @property
    def lengths(self) -> Tensor:
        """(N,) tokens the model sampled per completion, through EOS."""
        return self.completion_mask.sum(1)

    @property
    def spans(self) -> Tensor:
        """(N,) tokens per completion through its end, the environment's replies included."""
        return self.attention_mask[:, self.prompt_len:].sum(1)


def eos_ids(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> list[int]:
    ids = model.generation_config.eos_token_id
    ids = [ids] if isinstance(ids, int) else list(ids or [])
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in ids:
        ids.append(tokenizer.eos_token_id)
    return ids


@contextmanager
def lora_merged(model: PreTrainedModel):
    """On the CPU, fold a LoRA adapter into the base weights while generating (one matmul per linear layer
    instead of three). The merged weights are new tensors swapped in, with the adapter switched off, and the
    originals are swapped back after: unlike merge/unmerge, the frozen base never drifts by rounding, so a
    resumed run matches an uninterrupted one bit for bit. Costs one copy of the adapted weights while
    sampling; on CUDA (where sampling is bound by kernel launches) and under FSDP2 (whose weights are
    gathered views for the duration) nothing is merged."""
    from peft import PeftModel
    from peft.tuners.lora import LoraLayer, Linear as LoraLinear

    layers = [m for m in model.modules() if isinstance(m, LoraLayer)]
    trainable = isinstance(model, PeftModel) and not model.peft_config[model.active_adapter].inference_mode
    on_cpu = next(model.parameters()).device.type == "cpu"
    enabled = not any(m.disable_adapters for m in layers)  # not inside disable_adapter(): sample the base then
    if not (layers and trainable and enabled and on_cpu and not is_fsdp(model)
            and all(isinstance(m, LoraLinear) for m in layers)):
        yield
        return
    swapped = []
    with torch.no_grad():
        for layer in layers:
            base = layer.get_base_layer()
            delta = sum(layer.get_delta_weight(a) for a in layer.active_adapters if a in layer.lora_A)
            swapped.append((base, base.weight.data))
            base.weight.data = base.weight.data + delta.to(base.weight.dtype)
    try:
        with model.disable_adapter():
            yield
    finally:
        for base, original in swapped:
            base.weight.data = original


@contextmanager
def sampling(model: PreTrainedModel):
    """The model as it samples: in eval mode, with a LoRA adapter merged on the CPU (lora_merged)."""
    was_training = model.training
    model.eval()
    try:
        with lora_merged(model):
            yield
    finally:
        model.train(was_training)


@torch.no_grad()
def generate(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: list[str],
    *,
    group_size: int,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_p: float = 1.0,
    top_k: int = 0,
    greedy: bool = False,
    prefill: str = "",
    seeds: list[int] | None = None,
    device: torch.device | None = None,
    engine: str = "auto",
    with_logprobs: bool = False,
    static_cache: bool = False,
    compile: bool = False,
    envs: list | None = None,
    chat=None,
    limits=None,
) -> Rollout | tuple[Rollout, list]:
    """Sample `group_size` completions for each chat-formatted prompt (which ends with `prefill`); with
    `seeds` (one per prompt), each group's draws come from its own generator (grouprl engine). device: where
    the model computes (default: where its first parameter is). engine: a name from engines.ENGINES or
    'auto' (see engines.pick); with_logprobs keeps the engine's own log-probs in Rollout.logprobs;
    static_cache and compile are the hf engine's options.

    Every completion is an episode (episodes.run); without `envs` each ends after its first turn. With
    `envs` (one environment per row, N = len(prompts) * group_size), `chat` (an episodes.ChatFormat) and
    `limits` (episodes.Limits), episodes go on over several turns, max_new_tokens bounds all of their
    tokens, and (rollout, episodes) is returned."""
    device = device or next(model.parameters()).device
    enc = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
    params = engines.SamplingParams(
        group_size=group_size, max_new_tokens=max_new_tokens, eos=tuple(eos_ids(model, tokenizer)),
        pad_token_id=tokenizer.pad_token_id, temperature=temperature, top_p=top_p, top_k=top_k, greedy=greedy,
        seeds=None if seeds is None else tuple(seeds), with_logprobs=with_logprobs, static_cache=static_cache,
        compile=compile, keep_cache=envs is not None)
    engine = engines.pick(engine, device)
    from grouprl import episodes

    with sampling(model):  # the first turn, then (with environments) the next ones: one loop for both
        first = engines.sample(engine, model, enc.input_ids, enc.attention_mask, params)
        cols, eps = episodes.run(model, tokenizer, enc.input_ids, enc.attention_mask, first, params, engine,
                                 envs or [None] * (len(prompts) * group_size), chat, limits, prefill)
    rollout = Rollout(
        input_ids=torch.cat([enc.input_ids.repeat_interleave(group_size, 0), cols["ids"]], 1),
        attention_mask=torch.cat([enc.attention_mask.repeat_interleave(group_size, 0), cols["attention"]], 1),
        completion_mask=cols["mask"],
        truncated=cols["truncated"],
        completions=[next(m["content"] for m in reversed(e.messages) if m["role"] == "assistant") for e in eps],
        prompt_index=[i // group_size for i in range(len(prompts) * group_size)],
        group_size=group_size,
        temperature=temperature,
        logprobs=cols["logp"] if with_logprobs else None,
        prefills=first.prefills,
        turn_rewards=cols["turn_rewards"] if envs is not None else None,
    )
    return (rollout, eps) if envs is not None else rollout


def concat(rollouts: list[Rollout], pad_token_id: int) -> Rollout:
    """Join rollouts of different P and C into one (used by dynamic sampling's refill)."""
    assert len({(r.group_size, r.temperature, r.prefills) for r in rollouts}) == 1
    if len(rollouts) == 1:
        return rollouts[0]
    p = max(r.input_ids.shape[1] - r.completion_len for r in rollouts)
    c = max(r.completion_len for r in rollouts)
    ids, att, cm = [], [], []
    offset, index = 0, []
    for r in rollouts:
        rp, rc = r.input_ids.shape[1] - r.completion_len, r.completion_len
        lp, rpad = p - rp, c - rc
        ids.append(torch.nn.functional.pad(r.input_ids, (lp, rpad), value=pad_token_id))
        att.append(torch.nn.functional.pad(r.attention_mask, (lp, rpad), value=0))
        cm.append(torch.nn.functional.pad(r.completion_mask, (0, rpad), value=0.0))
        index += [offset + i for i in r.prompt_index]
        offset += max(r.prompt_index) + 1
    return Rollout(
        input_ids=torch.cat(ids),
        attention_mask=torch.cat(att),
        completion_mask=torch.cat(cm),
        truncated=torch.cat([r.truncated for r in rollouts]),
        completions=[t for r in rollouts for t in r.completions],
        prompt_index=index,
        group_size=rollouts[0].group_size,
        temperature=rollouts[0].temperature,
        logprobs=None if any(r.logprobs is None for r in rollouts) else torch.cat(
            [torch.nn.functional.pad(r.logprobs, (0, c - r.completion_len)) for r in rollouts]),
        prefills=rollouts[0].prefills,
        turn_rewards=None if any(r.turn_rewards is None for r in rollouts) else torch.cat(
            [torch.nn.functional.pad(r.turn_rewards, (0, c - r.completion_len)) for r in rollouts]),
    )


def select(r: Rollout, rows: Tensor) -> Rollout:
    """Keep the rows given by a (N,) bool mask or an index tensor."""
    idx = rows.nonzero().flatten() if rows.dtype == torch.bool else rows
    keep = idx.tolist()
    return Rollout(
        input_ids=r.input_ids[idx],
        attention_mask=r.attention_mask[idx],
        completion_mask=r.completion_mask[idx],
        truncated=r.truncated[idx],
        completions=[r.completions[i] for i in keep],
        prompt_index=[r.prompt_index[i] for i in keep],
        group_size=r.group_size,
        temperature=r.temperature,
        logprobs=None if r.logprobs is None else r.logprobs[idx],
        prefills=r.prefills,
        turn_rewards=None if r.turn_rewards is None else r.turn_rewards[idx],
    )
