"""Where the grouprl engine's decode time goes, and whether its draw is unbiased, on the embedded model.

    python benchmarks/sampler.py profile [--prompts 4] [--group-size 8] [--tokens 48]
    python benchmarks/sampler.py draw [--draws 400000]

profile: one warm-up call, then torch.profiler over one call of the grouprl engine (the default task's
prompts, EOS off so every row runs to --tokens), its operators by CPU time.
draw: the embedded model's next-token distribution after the default task's first prompt (49k tokens);
--draws tokens drawn by engines.loop.draw and by torch.multinomial, and each empirical distribution's total
variation from the true one (the two should be alike: both are sampling noise).
"""

from __future__ import annotations

import argparse
import time

import torch

from grouprl.config import ModelConfig, TaskConfig
from grouprl.engines import SamplingParams
from grouprl.engines.loop import draw, sample
from grouprl.models import load_policy
from grouprl.tasks import build_task


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("what", choices=["profile", "draw"])
    ap.add_argument("--prompts", type=int, default=4)
    ap.add_argument("--group-size", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=48)
    ap.add_argument("--draws", type=int, default=400_000)
    a = ap.parse_args()
    model, tok = load_policy(ModelConfig())
    model.eval()
    task = build_task(TaskConfig())
    prompts = [task.chat_prompt(tok, r, "<reasoning>\n") for r in task.train[:a.prompts]]
    enc = tok(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    if a.what == "profile":
        from torch.profiler import ProfilerActivity, profile

        params = SamplingParams(group_size=a.group_size, max_new_tokens=a.tokens, eos=(model.config.vocab_size + 7,),
                                pad_token_id=tok.pad_token_id, seeds=tuple(range(a.prompts)))
        sample(model, enc.input_ids, enc.attention_mask, params)  # warm-up
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            t = time.perf_counter()
            sample(model, enc.input_ids, enc.attention_mask, params)
            print(f"one call: {time.perf_counter() - t:.2f} s")
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12))
        return
    with torch.no_grad():
        first = tok(prompts[0], return_tensors="pt", add_special_tokens=False).input_ids  # alone: no padding
        probs = torch.softmax(model(first).logits[0, -1].float(), -1)
    n, chunk = a.draws, 2000
    g = torch.Generator().manual_seed(0)
    ours = torch.cat([draw(probs.expand(chunk, -1), g) for _ in range(n // chunk)])
    theirs = torch.multinomial(probs, n // chunk * chunk, replacement=True, generator=torch.Generator().manual_seed(1))
    for name, x in (("engines.loop.draw", ours), ("torch.multinomial", theirs)):
        freq = torch.bincount(x, minlength=probs.numel()).float() / len(x)
        print(f"{name:18s} total variation from the true distribution over {len(x):,} draws: "
              f"{0.5 * (freq - probs).abs().sum().item():.4f}")


if __name__ == "__main__":
    main()
