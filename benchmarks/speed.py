"""The two speed-ups of a GRPO step, each against the plain way, on the embedded model:

1. sampling: our loop (one prefill per prompt, finished rows leave the batch) vs transformers' generate;
2. the training forward + backward: the prompt once per group vs every row carrying its prompt.

    python benchmarks/speed.py [--prompts 4] [--group-size 8] [--max-new-tokens 48] [--repeats 3]

Same prompts (the default task's chat prompts), temperature 1.0; medians over repeats, the two ways run
alternately in one process so that machine noise hits both.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from grouprl.config import ModelConfig, TaskConfig
from grouprl.logprobs import completion_logprobs, grouped_completion_logprobs
from grouprl.models import load_policy
from grouprl.engines import SamplingParams
from grouprl.engines.loop import sample
from grouprl.rollout import completion_mask_from_ids, eos_ids
from grouprl.tasks import build_task


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--prompts", type=int, default=4)
    ap.add_argument("--group-size", type=int, default=8)
    ap.add_argument("--max-new-tokens", type=int, default=48)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(2)
    model, tok = load_policy(ModelConfig())
    model.eval()
    task = build_task(TaskConfig())
    prompts = [task.chat_prompt(tok, r, "<reasoning>\n") for r in task.train[: args.prompts]]
    enc = tok(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    eos = eos_ids(model, tok)
    g = args.group_size
    times: dict[str, list[float]] = {"transformers generate": [], "grouprl sample": []}
    tokens: dict[str, list[float]] = {k: [] for k in times}
    for r in range(args.repeats):
        for name in times:
            torch.manual_seed(r)
            t0 = time.perf_counter()
            with torch.no_grad():
                if name == "grouprl sample":
                    ids = sample(model, enc.input_ids, enc.attention_mask, SamplingParams(
                        group_size=g, max_new_tokens=args.max_new_tokens, eos=tuple(eos),
                        pad_token_id=tok.pad_token_id)).completion_ids
                else:
                    out = model.generate(input_ids=enc.input_ids.repeat_interleave(g, 0),
                                         attention_mask=enc.attention_mask.repeat_interleave(g, 0),
                                         max_new_tokens=args.max_new_tokens, do_sample=True, temperature=1.0,
                                         top_k=None, eos_token_id=eos, pad_token_id=tok.pad_token_id)
                    ids = out[:, enc.input_ids.shape[1]:]
            times[name].append(time.perf_counter() - t0)
            tokens[name].append(completion_mask_from_ids(ids, eos)[0].sum().item())
    base = statistics.median(times["transformers generate"])
    for name in times:
        t = statistics.median(times[name])
        print(f"{name:22s} median {t:6.2f} s  {statistics.median(tokens[name]) / t:6.1f} completion tokens/s  "
              f"speed-up x{base / t:.2f}")

    # training forward + backward over the last sampled batch
    mask = completion_mask_from_ids(ids, eos)[0].long()
    full_ids = torch.cat([enc.input_ids.repeat_interleave(g, 0), ids], 1)
    full_att = torch.cat([enc.attention_mask.repeat_interleave(g, 0), mask], 1)
    model.train()
    fb: dict[str, list[float]] = {"every row carries its prompt": [], "prompt once per group": []}
    for _ in range(args.repeats):
        for name in fb:
            t0 = time.perf_counter()
            if name == "prompt once per group":
                logp = grouped_completion_logprobs(model, enc.input_ids, enc.attention_mask, ids, mask, g).logp
            else:
                logp = completion_logprobs(model, full_ids, full_att, ids.shape[1]).logp
            (logp * mask).sum().backward()
            model.zero_grad(set_to_none=True)
            fb[name].append(time.perf_counter() - t0)
    base = statistics.median(fb["every row carries its prompt"])
    print(f"forward + backward, {ids.shape[0]} sequences of {enc.input_ids.shape[1]} prompt + {ids.shape[1]} "
          f"completion tokens (full fine-tuning):")
    for name, ts in fb.items():
        print(f"  {name:30s} median {statistics.median(ts):6.2f} s  speed-up x{base / statistics.median(ts):.2f}")


if __name__ == "__main__":
    main()
