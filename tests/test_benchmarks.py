"""benchmarks/vs_trl.py --smoke: both systems (grouprl alone when TRL is not installed) run and report."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FIELDS = {"median_step_s", "sampling_s", "update_s", "tokens_per_s", "completion_len", "peak_mem_gib", "steps_measured"}


def test_vs_trl_smoke(tmp_path):
    out = tmp_path / "vs_trl.json"
    res = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "vs_trl.py"), "--smoke", "--device", "cpu",
                          "--out", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    data = json.loads(out.read_text())
    have_trl = importlib.util.find_spec("trl") is not None
    systems = {"grouprl", "trl"} if have_trl else {"grouprl"}
    assert set(data["summary"]) == systems and data["trl_missing"] == (not have_trl)
    for name in systems:
        summary = data["summary"][name]
        assert FIELDS <= set(summary), (name, summary)
        assert summary["steps_measured"] == 2 * len(data["raw"][name]) and summary["peak_mem_gib"] > 0
        assert summary["completions_per_step"] == 8  # 2 prompts x G 4
        for run in data["raw"][name]:
            assert len(run["steps"]) == 3 and all(s["step_s"] > 0 for s in run["steps"])  # 1 warm-up + 2
    if have_trl:
        assert data["order"] == ["grouprl", "trl", "trl", "grouprl"] and data["trl"]
        assert set(data["ratio_trl_over_grouprl"]) >= {"median_step_s", "peak_mem_gib"}
        assert all(s["longest"] <= 8 and s["optimizer_steps"] == 1 for r in data["raw"]["trl"] for s in r["steps"])
    else:
        assert "TRL is not installed" in res.stdout


def test_engines_and_layouts_benchmarks_smoke(tmp_path):
    """benchmarks/engines.py: every engine's tokens/s beside the roofline; benchmarks/layouts.py: the three
    layouts agree and are timed."""
    out = tmp_path / "engines.json"
    res = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "engines.py"), "--smoke", "--device", "cpu",
                          "--engines", "grouprl,hf,hf-static,cb", "--out", str(out)],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    data = json.loads(out.read_text())
    assert set(data["engines"]) == {"grouprl", "hf", "hf-static", "cb"}
    assert data["roofline"]["tokens_per_s"] > 0 and data["bandwidth_gb_s"] > 0
    assert all(e["tokens_per_s"] > 0 and e["x_from_roofline"] > 0 for e in data["engines"].values())
    res = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "layouts.py"), "--smoke"],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert all(f"{name} " in res.stdout for name in ("shared", "packed", "padded"))


def test_accuracy_by_steps(tmp_path):
    """benchmarks/accuracy_by_steps.py splits cached held-out results by the problems' number of steps."""
    from grouprl.config import load_config, save_config
    from grouprl.tasks import build_task

    cfg = load_config(overrides=["task.max_steps=2", "task.curriculum=false"])
    rows = build_task(cfg.task).eval[:6]
    run = tmp_path / "runs" / "grpo" / "seed-0"
    run.mkdir(parents=True)
    save_config(cfg, run / "config.yaml")
    right = [1, 0, 1, 1, 0, 1]
    (tmp_path / "eval-base.json").write_text(json.dumps({"correct": [0] * 6}))
    (run / "eval-step-40.json").write_text(json.dumps({"correct": right}))
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "accuracy_by_steps.py"), str(tmp_path),
                          "--arms", "grpo", "--seeds", "0"], capture_output=True, text=True, check=True).stdout
    assert [r["steps"] for r in rows] == [1, 1, 1, 2, 1, 2]
    # one-step problems 0, 1, 2, 4: right 1 + 0 + 1 + 0 of 4 = 50%; two-step 3, 5: 1 + 1 of 2 = 100%
    assert "held-out problems: 6; 1-step 4, 2-step 2" in out and "base model: 1-step 0.0%, 2-step 0.0%" in out
    assert "grpo at step 40: 1-step 50.0% (seeds 50.0); 2-step 100.0% (seeds 100.0)" in out, out


def test_learning_margins_smoke():
    """benchmarks/learning_margins.py runs the learning tests' settings over seeds and reports the worst."""
    res = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "learning_margins.py"), "--cases", "grpo,ppo",
                          "--seeds", "0,1", "--steps", "3"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    rows = [json.loads(line) for line in res.stdout.splitlines() if line.startswith("{")]
    assert [(r["case"], r["seed"], r["steps"]) for r in rows] == [("grpo", 0, 3), ("grpo", 1, 3), ("ppo", 0, 3),
                                                                   ("ppo", 1, 3)]
    assert "explained_var_peak" in rows[2] and "explained_var_peak" not in rows[0]
    for case, mine in (("grpo", rows[:2]), ("ppo", rows[2:])):
        worst = next(line for line in res.stdout.splitlines() if line.startswith(f"{case} "))
        assert f"first {max(r['first'] for r in mine)}  rise {min(r['rise'] for r in mine)}" in worst, worst


def test_entropy_control_report_hand_worked(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import entropy_control

    for name, ent in (("none", 0.5), ("clip_cov", 1.0)):
        rows = [{"step": s, "reward": 0.1 * s, "entropy": ent + (1.0 if s <= 10 else 0.0),
                 "zero_std_frac": 0.0 if s <= 10 else 0.5} | ({"eval/accuracy": s / 40} if s % 10 == 0 else {})
                for s in range(1, 21)]
        (tmp_path / name).mkdir()
        (tmp_path / name / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    text = entropy_control.report(tmp_path, tmp_path / "f.png", ["none", "bonus", "clip_cov"])
    lines = text.splitlines()
    assert len(lines) == 4  # the header, its rule, and the two runs that exist
    # first 10 steps: entropy ent + 1, flat 0%, reward mean 0.55; last 10: ent, 50%, 1.55; evals at 10 and 20
    assert "| none (default) | 20 | 1.50 / 0.50 | 0% / 50% | 0.55 / 1.55 | 25.0% @10, 50.0% @20 | 50.0% @20 |" in lines
    assert lines[3].startswith("| clip_cov (entropy.remedy=clip_cov entropy.cov_ratio=0.02) | 20 | 2.00 / 1.00")
    assert (tmp_path / "f.png").stat().st_size > 10_000


def test_reward_isolation_smoke():
    """benchmarks/reward_isolation.py times both reward sets in the training process and in a worker."""
    res = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "reward_isolation.py"), "--completions", "4",
                          "--steps", "2"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    lines = [line for line in res.stdout.splitlines() if "ms per step" in line]
    assert len(lines) == 4 and sum("reward_workers=1" in line for line in lines) == 2, res.stdout
