"""The hf engine: transformers' `generate`. On request, a static KV cache (`rollout.static_cache`) and
torch.compile of the decoding step (`rollout.compile`, which needs the static cache): the shapes are then
fixed, so prompts are left-padded to a multiple of 64 tokens to keep the compiled graphs few.
"""

from __future__ import annotations

import torch
from torch import Tensor
from transformers import GenerationConfig
from transformers.generation import CompileConfig

from grouprl.engines import SamplingParams, Sampled, pad_after_eos

PROMPT_BUCKET = 64


def generation_config(params: SamplingParams, **extra) -> GenerationConfig:
    """A GenerationConfig that sets the distribution-changing fields transformers would otherwise fill from
    the model's own generation_config (a repetition penalty or Qwen's top_k 20, say), so that the sampling
    distribution is the one the log-probs and the KL assume: temperature, top-k and top-p as asked; typical-p,
    epsilon / eta cutoffs, repetition penalties, n-gram blocking and a minimum length neutral. (min_p is left
    unset: a neutral MinP warper would still cost a softmax per token, and continuous batching warns on it.)
    Greedy sets the library's neutral values (no warning about unused sampling flags)."""
    if params.greedy:
        warp = {"temperature": 1.0, "top_p": 1.0, "top_k": 50}
    else:
        warp = {"temperature": params.temperature, "top_p": params.top_p, "top_k": params.top_k}
    return GenerationConfig(do_sample=not params.greedy, **warp, typical_p=1.0, epsilon_cutoff=0.0, eta_cutoff=0.0,
                            repetition_penalty=1.0, encoder_repetition_penalty=1.0, no_repeat_ngram_size=0,
                            min_new_tokens=0, max_new_tokens=params.max_new_tokens, eos_token_id=list(params.eos),
                            pad_token_id=params.pad_token_id, use_cache=True, **extra)


def _left_pad(ids: Tensor, mask: Tensor, multiple: int, pad: int) -> tuple[Tensor, Tensor]:
    extra = -ids.shape[1] % multiple
    return (torch.nn.functional.pad(ids, (extra, 0), value=pad), torch.nn.functional.pad(mask, (extra, 0), value=0))


@torch.no_grad()
def sample(model, prompt_ids: Tensor, prompt_mask: Tensor, params: SamplingParams) -> Sampled:
    g = params.group_size
    if params.static_cache:
        prompt_ids, prompt_mask = _left_pad(prompt_ids, prompt_mask, PROMPT_BUCKET, params.pad_token_id)
    extra = {}
    if params.static_cache:
        extra["cache_implementation"] = "static"
    extra["disable_compile"] = not params.compile
    if params.compile and prompt_ids.device.type == "cpu":
        extra["compile_config"] = CompileConfig()
        extra["compile_config"]._compile_all_devices = True  # transformers compiles on accelerators only otherwise
    gen = generation_config(params, output_scores=params.with_logprobs, return_dict_in_generate=True, **extra)
    out = model.generate(input_ids=prompt_ids.repeat_interleave(g, 0), attention_mask=prompt_mask.repeat_interleave(g, 0),
                         generation_config=gen)
    ids = out.sequences[:, prompt_ids.shape[1]:]  # (N, C)
    logprobs = None
    if params.with_logprobs:  # scores: C tensors (N, V), the processed logits each token was drawn from
        logprobs = torch.stack([torch.log_softmax(s.float(), -1).gather(1, ids[:, t:t + 1]).squeeze(1)
                                for t, s in enumerate(out.scores)], 1)
    return pad_after_eos(ids, logprobs, params, prefills=g)  # every row prefills its own copy of the prompt
