"""Choose the PPO critic's settings by measurement, without sampling again: replay a run's logged completions
(completions.jsonl: prompt, completion, reward) step by step through PPO's own update with the policy held
still (`ppo_update(train_policy=False)`), so each step first measures the explained variance of V_old on
a batch the critic has not seen, then fits it, exactly as in training. The policy that wrote the log (a
GRPO run, say) moved on step by step, so the targets drift as they do online; its learning differs from a
PPO policy's, so the figures rank critic settings rather than predict a PPO run's.

    python benchmarks/critic_fit.py --run runs/compare/main/runs/grpo/seed-0 --config configs/compare.yaml \
        --variant "now:" --variant "lr3e-3:ppo.critic.lr=3e-3 ppo.eps_value=1000"

Prints, per variant, the explained variance averaged over the last 10 steps (and over all), and writes
the per-step figures to --out (JSON). The completions are re-tokenised from their text (an EOS token is
appended unless the completion filled max_new_tokens), so token boundaries can differ from the sampled ones.
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import time
from pathlib import Path

import torch


def rollout_from_log(rows: list[dict], tokenizer, task, cfg):
    """A Rollout of logged completions (whole groups, in log order), re-tokenised."""
    from grouprl.rollout import Rollout

    g, prefill = cfg.rollout.group_size, cfg.task.prefill
    prompts = [task.chat_prompt(tokenizer, {"prompt": r["prompt"], "answer": r.get("answer")}, prefill)
               for r in rows[::g]]
    enc = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    eos = tokenizer.eos_token_id
    seqs = []
    for r in rows:
        ids = tokenizer(r["completion"].removeprefix(prefill), add_special_tokens=False).input_ids
        ids = ids[:cfg.rollout.max_new_tokens]
        seqs.append(ids + [eos] if len(ids) < cfg.rollout.max_new_tokens else ids)
    c = max(len(s) for s in seqs)
    comp = torch.full((len(seqs), c), tokenizer.pad_token_id)
    mask = torch.zeros(len(seqs), c)
    for i, s in enumerate(seqs):
        comp[i, :len(s)] = torch.tensor(s)
        mask[i, :len(s)] = 1.0
    return Rollout(
        input_ids=torch.cat([enc.input_ids.repeat_interleave(g, 0), comp], 1),
        attention_mask=torch.cat([enc.attention_mask.repeat_interleave(g, 0), mask.long()], 1),
        completion_mask=mask, truncated=mask.sum(1) >= cfg.rollout.max_new_tokens,
        completions=[r["completion"] for r in rows], prompt_index=[i // g for i in range(len(rows))],
        group_size=g, temperature=cfg.rollout.temperature)


def logged_batch(logged: list[dict], step: int, tokenizer, task, cfg):
    """(Rollout, scores (N,)) of one logged step of a completions.jsonl (its rows parsed: `logged`)."""
    rows = [r for r in logged if r["step"] == step]
    if not rows:
        raise SystemExit(f"error: the completions log has no step {step}")
    return rollout_from_log(rows, tokenizer, task, cfg), torch.tensor([r["reward"] for r in rows],
                                                                        dtype=torch.float32)


def fit(config: Path, overrides: list[str], run: Path, steps: int) -> list[dict]:
    from grouprl.config import load_config
    from grouprl.critic import load_critic
    from grouprl.learner import shuffle_seed
    from grouprl.models import load_policy
    from grouprl.optim import make_optimizer
    from grouprl.ppo import critic_optimizer, ppo_update
    from grouprl.tasks import build_task

    cfg = load_config(config, ["algo=ppo", "ppo.kl_coef=0", *overrides])
    torch.manual_seed(cfg.seed)
    task = build_task(cfg.task)
    policy, tok = load_policy(cfg.model)
    critic = load_critic(cfg, policy)
    own = {id(p) for p in critic.parameters()}
    policy_optim = make_optimizer([p for p in policy.parameters() if p.requires_grad and id(p) not in own],
                                  cfg.optim.lr, cfg.optim)  # never stepped: the policy is held still
    critic_optim = critic_optimizer(cfg, critic)
    logged = [json.loads(x) for x in (run / "completions.jsonl").read_text().splitlines() if x.strip()]
    out = []
    for step in range(1, steps + 1):
        ro, score = logged_batch(logged, step, tok, task, cfg)
        t0 = time.perf_counter()
        s, _ = ppo_update(policy, critic, None, policy_optim, critic_optim, ro, score, cfg.ppo, kl_coef=0.0,
                          max_new_tokens=cfg.rollout.max_new_tokens, train_policy=False,
                          seed=shuffle_seed(cfg.seed, step))
        out.append({"step": step, "explained_var": s.explained_var, "value_loss": s.value_loss,
                    "values": s.values, "returns": s.returns, "seconds": time.perf_counter() - t0})
        print(f"  step {step:>3}  ev {s.explained_var:6.2f}  vloss {s.value_loss:.3f}  V {s.values:.2f}  "
              f"R {s.returns:.2f}", flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run", type=Path, required=True, help="a run's output_dir (its completions.jsonl is replayed)")
    ap.add_argument("--config", type=Path, default=Path("configs/compare.yaml"))
    ap.add_argument("--variant", action="append", required=True, help="'name:key=value ...' (repeatable)")
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--out", type=Path, default=None)
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    results = {}
    for text in a.variant:
        name, _, rest = text.partition(":")
        print(f"{name}: {rest}", flush=True)
        per_step = fit(a.config, shlex.split(rest), a.run, a.steps)
        ev = [r["explained_var"] for r in per_step]
        results[name] = {"overrides": rest, "ev_last10": statistics.mean(ev[-10:]), "ev_all": statistics.mean(ev),
                         "steps": per_step}
        print(f"{name}: explained variance, last 10 steps {results[name]['ev_last10']:.3f}, "
              f"all {results[name]['ev_all']:.3f}", flush=True)
    if a.out:
        a.out.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
