"""CUDA path check: dtype/device placement, grouped-prompt logprobs in bf16, and GRPO step timings.

Runs on a GPU machine without network: the models are random-weight Llamas (a tiny one for the loop,
and one with SmolLM2-135M's shape for timings), built locally. Usage:
    python benchmarks/cuda_check.py [--steps 5]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from conftest import make_tiny_model  # noqa: E402

from grouprl.config import load_config  # noqa: E402
from grouprl.logprobs import completion_logprobs, grouped_completion_logprobs  # noqa: E402
from grouprl.loop import train  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=5)
    args = ap.parse_args()
    assert torch.cuda.is_available(), "needs CUDA"
    report: dict = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__}
    tmp = Path(tempfile.mkdtemp())
    (tmp / "r.py").write_text("def frac_a(prompts, completions, **kw):\n"
                              "    return [c.count('a') / max(len(c), 1) for c in completions]\n")
    for name, layers, hidden in (("tiny", 2, 64), ("smollm2-trunk", 30, 576)):
        model_dir = make_tiny_model(tmp / name, layers=layers, hidden=hidden)
        for lora in (False, True):
            sets = {
                "model.name_or_path": str(model_dir), "task.name": "arithmetic",
                "task.prefill": "", "rewards": f"[{{name: '{tmp / 'r.py'}:frac_a'}}]", "steps": args.steps,
                "rollout.group_size": 8, "rollout.prompts_per_step": 8, "rollout.max_new_tokens": 64,
                "grpo.beta": 0.04, "optim.lr": 1e-3 if name == "tiny" else 1e-5, "model.lora.enabled": lora,
                "output_dir": str(tmp / f"run-{name}-{lora}"), "grpo.micro_batch_size": 64,
            }
            cfg = load_config(None, [f"{k}={v}" for k, v in sets.items()])
            torch.cuda.reset_peak_memory_stats()
            result = train(cfg)
            h = result.history
            key = f"{name}{'-lora' if lora else ''}"
            report[key] = {
                "reward_first": h[0]["reward"], "reward_last": h[-1]["reward"],
                "median_step_s": statistics.median(r["step_time"] for r in h[1:] or h),
                "median_gen_s": statistics.median(r["gen_time"] for r in h[1:] or h),
                "median_update_s": statistics.median(r["update_time"] for r in h[1:] or h),
                "gen_tokens_per_s": statistics.median(r["gen_tokens_per_s"] for r in h[1:] or h),
                "max_allocated_gib": torch.cuda.max_memory_allocated() / 2**30,
            }
    # bf16 placement and grouped-vs-plain log-probs on the GPU
    from grouprl.config import ModelConfig
    from grouprl.models import load_causal_lm

    m = load_causal_lm(str(tmp / "smollm2-trunk"), ModelConfig(name_or_path=str(tmp / "smollm2-trunk")))
    p = next(m.parameters())
    report["auto_dtype"], report["auto_device"] = str(p.dtype), str(p.device)
    g, b, plen, clen = 8, 4, 40, 32
    prompt = torch.randint(10, 50, (b, plen), device=p.device)
    pm = torch.ones_like(prompt)
    pm[0, :7] = 0
    comp = torch.randint(10, 50, (b * g, clen), device=p.device)
    cm = torch.ones_like(comp)
    ids = torch.cat([prompt.repeat_interleave(g, 0), comp], 1)
    att = torch.cat([pm.repeat_interleave(g, 0), cm], 1)
    with torch.no_grad():
        full = completion_logprobs(m, ids, att, clen).logp
        grouped = grouped_completion_logprobs(m, prompt, pm, comp, cm, g).logp
    report["grouped_vs_full_max_abs_diff_bf16"] = (full - grouped).abs().max().item()
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
