"""eval_every: held-out evaluation inside training, logged per step, best/ by held-out accuracy, and a run
that trains exactly as it would without the evaluations."""

from __future__ import annotations

import io
import json

import pytest
from rich.console import Console

from grouprl.checkpoint import checkpoint_step, clean_leftovers, is_complete
from grouprl.config import load_config
from grouprl.evaluate import combine
from grouprl.loop import best_eval, train
from grouprl.metrics import read_metrics
from tests.test_learning import toy_config


def test_combine_weights_each_share_by_its_problems():
    parts = [{"problems": 3, "accuracy": 1 / 3, "format_rate": 1.0, "seconds": 2.0},
             {"problems": 1, "accuracy": 1.0, "format_rate": 0.0, "seconds": 5.0}]
    out = combine(parts)
    assert out == {"problems": 4, "accuracy": pytest.approx(0.5), "format_rate": pytest.approx(0.75), "seconds": 5.0}


def test_best_eval_takes_the_later_of_equals():
    h = [{"step": 1}, {"step": 2, "eval/accuracy": 0.5}, {"step": 4, "eval/accuracy": 0.25},
         {"step": 6, "eval/accuracy": 0.5}, {"step": 7}]
    assert best_eval(h) == (0.5, 6)
    assert best_eval([{"step": 1}]) is None


def test_eval_every_logs_held_out_accuracy_writes_best_and_leaves_training_unchanged(
        tiny_model, toy_data, toy_reward, tmp_path):
    common = {"steps": 5, "eval.num_problems": 6, "eval.k": 2, "eval.batch_size": 4, "rollout.max_new_tokens": 6}
    plain = train(load_config(None, toy_config(tiny_model, toy_data, toy_reward, tmp_path / "plain", **common)),
                  console=Console(quiet=True))
    text = io.StringIO()
    cfg = load_config(None, toy_config(tiny_model, toy_data, toy_reward, tmp_path / "ev", eval_every=2, **common))
    result = train(cfg, console=Console(file=text, width=200))
    rows = read_metrics(tmp_path / "ev" / "metrics.jsonl")
    evaluated = [r["step"] for r in rows if "eval/accuracy" in r]
    assert evaluated == [2, 4, 5]  # every 2 steps and after the last
    for r in rows:
        if r["step"] in evaluated:
            assert {"eval/format_rate", "eval/pass@2", "eval/maj@2", "eval_time"} <= set(r)
            assert 0.0 <= r["eval/accuracy"] <= 1.0
    # the tiny model gets none right: equal accuracies, so best/ is the latest evaluated step
    best = tmp_path / "ev" / "best"
    assert is_complete(best) and checkpoint_step(best) == 5 == best_eval(rows)[1]
    assert result.best_checkpoint == best
    out = text.getvalue()
    assert "eval    2  held-out accuracy" in out and "-> best/" in out and "best checkpoint (held-out)" in out
    # sampling for pass@k ran in a forked RNG: the training is the one without evaluations, bit for bit
    assert [r["reward"] for r in plain.history] == [r["reward"] for r in result.history]
    for name in ("model.safetensors",):
        a = (plain.final_checkpoint / name).read_bytes()
        assert a == (result.final_checkpoint / name).read_bytes()
    # a kill while best/ was being replaced leaves best.tmp: a resume tidies it
    (tmp_path / "ev" / "best.tmp").mkdir()
    assert clean_leftovers(tmp_path / "ev") == [tmp_path / "ev" / "best.tmp"]


def test_eval_every_is_a_resumable_change():
    from grouprl.config import config_changes
    a = load_config(None, ["eval_every=0"])
    b = load_config(None, ["eval_every=10", "eval.num_problems=50"])
    assert config_changes(a, b) == []


def test_plot_draws_reward_and_held_out_accuracy_on_one_panel(tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    from grouprl import plots

    rows = [{"step": s, "reward": 0.1 * s, "reward/f": 0.1 * s} | ({"eval/accuracy": 0.2 * s} if s % 2 == 0 else {})
            for s in range(1, 5)]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    seen = {}
    real_savefig = plt.Figure.savefig

    def spy(fig, *a, **k):
        seen["axes"] = fig.axes
        return real_savefig(fig, *a, **k)

    plt.Figure.savefig = spy
    try:
        out = plots.plot_rewards(tmp_path, tmp_path / "p.png")
    finally:
        plt.Figure.savefig = real_savefig
    assert out.is_file()
    twin = [a for a in seen["axes"] if a.get_ylabel().startswith("held-out accuracy")]
    assert len(twin) == 1
    xs, ys = twin[0].lines[0].get_data()
    assert list(xs) == [2, 4] and list(ys) == pytest.approx([0.4, 0.8])
