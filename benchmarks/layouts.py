"""Forward + backward of one update over a sampled batch in each layout, on the same rows.

    python benchmarks/layouts.py [--prompts 4] [--group-size 8] [--max-new-tokens 48] [--repeats 3] [--lora] [--smoke]

shared: each prompt once per group, its cache repeated G times; packed: every row's real tokens in one
sequence (position ids restart per sequence, no padding); padded: every row whole, padded to the longest.
The batch is sampled once from the embedded model on the default task's prompts (real completion lengths),
the layouts run alternately (medians over --repeats), and the log-probs are checked to agree.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from grouprl.config import LoraConfig, ModelConfig, TaskConfig
from grouprl.logprobs import LAYOUTS, forward_groups
from grouprl.models import load_policy
from grouprl.rollout import generate
from grouprl.tasks import build_task


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="embedded:smollm2-135m-instruct")
    ap.add_argument("--prompts", type=int, default=4)
    ap.add_argument("--group-size", type=int, default=8)
    ap.add_argument("--max-new-tokens", type=int, default=48)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--lora", action="store_true")
    ap.add_argument("--smoke", action="store_true", help="the tiny test model, 2 prompts x G 4 x 8 tokens, once")
    a = ap.parse_args()
    tmp = tempfile.TemporaryDirectory()
    if a.smoke:
        sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
        from conftest import make_tiny_model
        a.model = str(make_tiny_model(Path(tmp.name) / "tiny"))
        a.prompts, a.group_size, a.max_new_tokens, a.repeats = 2, 4, 8, 1
    model, tok = load_policy(ModelConfig(name_or_path=a.model, lora=LoraConfig(enabled=a.lora, r=16, alpha=32)))
    task = build_task(TaskConfig())
    prompts = [task.chat_prompt(tok, r, "<reasoning>\n") for r in task.train[:a.prompts]]
    torch.manual_seed(0)
    ro = generate(model, tok, prompts, group_size=a.group_size, max_new_tokens=a.max_new_tokens)
    rows = torch.arange(len(ro.completions))
    real = ro.attention_mask.sum().item()
    print(f"{len(rows)} rows, prompt {ro.prompt_len} + completion {ro.completion_len} columns, {real} real tokens "
          f"({real / ro.attention_mask.numel():.0%} of the padded batch); {'LoRA' if a.lora else 'full fine-tuning'}")
    model.train()
    times: dict[str, list[float]] = {k: [] for k in LAYOUTS}
    logps = {}
    for r in range(a.repeats + 1):
        for layout in LAYOUTS:
            t = time.perf_counter()
            logp = forward_groups(model, ro, rows, layout=layout).logp
            (logp * ro.completion_mask).sum().backward()
            model.zero_grad(set_to_none=True)
            if r:
                times[layout].append(time.perf_counter() - t)
            logps[layout] = logp.detach() * ro.completion_mask
    for layout in LAYOUTS:
        err = (logps[layout] - logps["padded"]).abs().max().item()
        assert err < 1e-3, f"{layout} disagrees with padded by {err}"
        print(f"{layout:7s} median {statistics.median(times[layout]):6.2f} s  "
              f"x{statistics.median(times['padded']) / statistics.median(times[layout]):.2f} vs padded  "
              f"max |logp - padded| {err:.1e}")


if __name__ == "__main__":
    main()
