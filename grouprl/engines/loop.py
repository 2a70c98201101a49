"""The grouprl engine: a KV-cached decoding loop with two savings over `model.generate` for GRPO's batches.
Each prompt is prefilled once and its cache repeated for its G completions, and rows that have emitted EOS
leave the batch (their cache rows are dropped), so the cost follows the mean completion length rather than
the longest. The logits warpers (temperature, top-k, top-p) are transformers' own.

With seeds (one per prompt), each group draws its tokens from its own generator, so a prompt's G
completions do not depend on which other prompts share the batch: the same in one process or split
across eight ranks (up to rounding in the logits). Without seeds, torch's global generator is used.
"""

from __future__ import annotations

import torch
from torch import Tensor
from transformers.generation import LogitsProcessorList, TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

from grouprl.engines import SamplingParams, Sampled
from grouprl.logprobs import prefill_groups


def warpers(temperature: float, top_k: int, top_p: float) -> LogitsProcessorList:
    out = LogitsProcessorList()
    if temperature != 1.0:
        out.append(TemperatureLogitsWarper(temperature))
    if top_k:
        out.append(TopKLogitsWarper(top_k))
    if top_p < 1.0:
        out.append(TopPLogitsWarper(top_p))
    return out


def draw(probs: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """One token per row of probs (n, V) by inverse CDF: one uniform per row, located in the cumulative
    probabilities (float64, so a token's interval is its probability to 1e-16). `torch.multinomial` draws one
    exponential per vocabulary entry instead, which was 16% of a CPU decode step at a 49k vocabulary. A
    token of probability 0 has an empty interval and is never drawn."""
    cdf = probs.double().cumsum(-1)  # (n, V)
    if not torch.isfinite(cdf[:, -1]).all():
        raise FloatingPointError("the model's next-token probabilities are not finite (NaN or inf in its logits)")
    u = torch.rand(probs.shape[0], 1, generator=generator, dtype=torch.float64, device=probs.device) * cdf[:, -1:]
    return torch.searchsorted(cdf, u, right=True).squeeze(1).clamp_(max=probs.shape[-1] - 1)


@torch.no_grad()
def sample(model, prompt_ids: Tensor, prompt_mask: Tensor, params: SamplingParams) -> Sampled | None:
    """None when the model's cache cannot be re-indexed (the caller then uses generate)."""
    b, g, c_max = prompt_ids.shape[0], params.group_size, params.max_new_tokens
    device = prompt_ids.device
    cache, logits, key, _ = prefill_groups(model, prompt_ids, prompt_mask, g)  # one prefill per prompt
    if not (hasattr(cache, "batch_repeat_interleave") and hasattr(cache, "batch_select_indices")):
        return None
    logits = logits.float()  # (N, V)
    attention = prompt_mask.repeat_interleave(g, 0)  # (n, P + t) for the rows still active
    position = attention.sum(-1, keepdim=True)  # (n, 1) position of the next token
    active = torch.arange(b * g, device=device)  # (n,) rows still generating
    tokens = torch.full((b * g, c_max), params.pad_token_id, dtype=torch.long, device=device)
    logprobs = torch.zeros(b * g, c_max, device=device) if params.with_logprobs else None
    eos_t = torch.tensor(params.eos, device=device)
    warp = warpers(params.temperature, params.top_k, params.top_p)
    gens = None
    if params.seeds is not None and not params.greedy:
        gens = [torch.Generator(device).manual_seed(s) for s in params.seeds]
    steps = 0
    for t in range(c_max):
        scores = logits if params.greedy else warp(tokens[active, :t], logits)
        if params.greedy:
            nxt = logits.argmax(-1)
        else:
            probs = torch.softmax(scores, dim=-1)
            if gens is None:
                nxt = draw(probs)
            else:  # group by group (rows are ordered by group): (n,)
                group = active // g
                nxt = torch.cat([draw(probs[group == k], gens[k]) for k in group.unique().tolist()])
        tokens[active, t] = nxt
        if logprobs is not None:
            logprobs[active, t] = torch.log_softmax(scores, -1).gather(1, nxt.unsqueeze(1)).squeeze(1)
        steps = t + 1
        keep = ~torch.isin(nxt, eos_t)
        if t == c_max - 1 or not keep.any():
            break
        if not keep.all():  # finished rows leave the batch
            idx = keep.nonzero().flatten()
            cache.batch_select_indices(idx)
            active, nxt, attention, position = active[idx], nxt[idx], attention[idx], position[idx]
        attention = torch.cat([attention, attention.new_ones(len(active), 1)], 1)
        out = model(input_ids=nxt.unsqueeze(1), attention_mask=attention, position_ids=position, use_cache=True,
                    **{key: cache})
        cache = out.cache if key == "cache" else out.past_key_values
        position = position + 1
        logits = out.logits[:, -1].float()
    return Sampled(tokens[:, :steps], None if logprobs is None else logprobs[:, :steps], prefills=1)
