"""`grouprl compare` on the tiny model: the report's files and fields, continuing an interrupted comparison,
the one-line errors, and the HTML page in a real headless browser (Debian's chromium, driven by playwright)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from rich.console import Console
from typer.testing import CliRunner

from grouprl.cli import app
from grouprl.compare import PRESETS, RunSpec, compare
from grouprl.errors import UserError
from test_learning import toy_config

RUNS = ["grpo", "ppo", "rank"]
TOOL_FIGURES = {"tool_calls", "turns", "tool_checked"}


def base_sets(tiny_model, toy_data, toy_reward) -> list[str]:
    return [s for s in toy_config(tiny_model, toy_data, toy_reward, "unused", **{
        "steps": 3, "rollout.group_size": 4, "rollout.prompts_per_step": 2, "rollout.max_new_tokens": 6,
        "ppo.epochs": 1, "eval.batch_size": 8}) if not s.startswith("output_dir=")]


SEEDS = [0, 1]


@pytest.fixture(scope="module")
def report_dir(tmp_path_factory, tiny_model, toy_data, toy_reward):
    out = tmp_path_factory.mktemp("compare") / "report"
    compare(None, base_sets(tiny_model, toy_data, toy_reward), RUNS, out, eval_num=4, save_every=1, seeds=SEEDS,
            console=Console(quiet=True))
    return out


def test_report_has_every_figure_for_every_arm_and_seed(report_dir):
    from grouprl.report import FIGURES, PAIRED, SIGNED

    report = json.loads((report_dir / "report.json").read_text())
    arms = {a["name"]: a for a in report["arms"]}
    assert list(arms) == RUNS and report["seeds"] == SEEDS
    assert (arms["grpo"]["models_trained"], arms["ppo"]["models_trained"]) == (1, 2)
    # PPO: policy, critic and a frozen reference for its KL penalty (kl_coef 0.05, full fine-tuning);
    # GRPO here has beta 0: the policy alone
    assert arms["ppo"]["models_in_memory"] == 3 and arms["grpo"]["models_in_memory"] == 1
    assert arms["ppo"]["trainable_parameters"] > arms["grpo"]["trainable_parameters"]
    assert arms["rank"]["overrides"] == PRESETS["rank"]
    for name, arm in arms.items():
        assert [r["seed"] for r in arm["runs"]] == SEEDS
        for key, _, spec in FIGURES:  # mean and interval over the 2 seeds; the critic's only where there is one,
            # the accuracy by steps where problems have steps, the tool's figures where there is a tool
            if (key.startswith("explained_var") and arm["algo"] != "ppo") or "by_steps" in key or key in TOOL_FIGURES:
                assert key not in arm["figures"]
                continue
            fig = arm["figures"][key]
            assert fig["n"] == 2 and fig["lo"] <= fig["mean"] <= fig["hi"], (name, key, fig)
            assert spec != "%" or 0 <= fig["lo"] <= fig["hi"] <= 1, (name, key, fig)  # a rate's, cut to 0-100%
            assert key in SIGNED or fig["lo"] >= 0, (name, key, fig)  # a count, size or time: cut at 0
            assert not key.endswith(".step") or fig["hi"] <= 3, (name, key, fig)  # a checkpoint's: at most 3
        b = arm["accuracy_bootstrap"]
        assert b["lo"] <= b["mean"] <= b["hi"] and b["mean"] == pytest.approx(arm["figures"]["accuracy"]["mean"])
        assert set(arm["paired"]) == (set() if name == "grpo" else set(PAIRED) - {"accuracy_by_steps.2", "tool_checked"}
                                      | {"accuracy_t"})
        for r in arm["runs"]:
            assert r["peak_memory_gib"] > 0.1 and r["steps"] == 3 and len(r["correct"]) == report["eval_problems"]
            for key in ("median_step_s", "median_generation_s", "median_update_s", "generated_tokens_per_s",
                        "train_time_s", "passes_sample_per_step", "passes_forward_per_step",
                        "passes_backward_per_step"):
                assert r[key] > 0, key
            assert r["passes_total"] == pytest.approx(3 * (r["passes_sample_per_step"] + r["passes_forward_per_step"]
                                                          + r["passes_backward_per_step"]))
            assert [c["step"] for c in r["curve"]] == [0, 1, 2, 3]  # the base model, then every checkpoint
            assert r["curve"][-1]["accuracy"] == r["accuracy"] and 0 <= r["self_verification"] <= 1
            for when, budget, axis in [("eval_at_equal_time", "equal_time_s", "time_s"),
                                       ("eval_at_equal_compute", "equal_passes", "passes")]:
                point = next(c for c in r["curve"] if c["step"] == r[when]["step"])
                assert point[axis] <= r[budget] * (1 + 1e-9) and point["accuracy"] == r[when]["accuracy"]
    for k, seed in enumerate(SEEDS):  # each seed's budget is its cheapest arm's whole run
        runs = [a["runs"][k] for a in arms.values()]
        assert min(r["train_time_s"] for r in runs) == pytest.approx(runs[0]["equal_time_s"])
        assert min(r["passes_total"] for r in runs) == pytest.approx(runs[0]["equal_passes"])
        assert max(r["eval_at_equal_compute"]["step"] for r in runs) == 3
    # PPO runs pi_old and critic forwards without gradient, and its critic's backward: more passes per step
    ppo, grpo = arms["ppo"]["runs"][0], arms["grpo"]["runs"][0]
    assert ppo["passes_forward_per_step"] > ppo["passes_backward_per_step"] > grpo["passes_backward_per_step"]
    assert grpo["passes_forward_per_step"] == grpo["passes_backward_per_step"]  # mu = 1: no pi_old forward
    assert ppo["median_nograd_forward_s"] > 0  # pi_old, reference and critic forwards, counted apart
    md = (report_dir / "report.md").read_text()
    assert "|  | grpo | ppo | rank |" in md and "models held in memory" in md and "peak memory" in md
    assert "| ppo - grpo | rank - grpo |" in md and "bootstrap over problems" in md
    for png in ("reward_vs_step.png", "reward_vs_time.png", "accuracy.png", "critic.png"):
        assert (report_dir / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (report_dir / "eval-base.json").is_file()


def test_an_interrupted_comparison_continues_where_it_stopped(report_dir, tiny_model, toy_data, toy_reward):
    grpo_log = (report_dir / "runs" / "grpo" / "seed-1" / "metrics.jsonl").read_text()
    ppo = report_dir / "runs" / "ppo" / "seed-1"
    shutil.rmtree(ppo / "final")  # as if stopped during step 3: its latest checkpoint is step 2
    for cache in ppo.glob("eval-step-*.json"):
        cache.unlink()
    console = Console(record=True, width=200)
    compare(None, base_sets(tiny_model, toy_data, toy_reward), RUNS, report_dir, eval_num=4, save_every=1,
            seeds=SEEDS, console=console)
    text = console.export_text()
    assert "grpo seed 1: finished earlier, kept" in text and "ppo seed 1: resuming" in text
    assert "ppo seed 0: finished earlier, kept" in text
    assert (report_dir / "runs" / "grpo" / "seed-1" / "metrics.jsonl").read_text() == grpo_log
    steps = [json.loads(x)["step"] for x in (ppo / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3]
    assert "resumed after step 2" in " ".join((ppo / "train.log").read_text().split())


def test_an_arm_starts_from_another_arms_last_checkpoint(tool_model, tmp_path):
    """The tool demonstration's shape: a supervised warm-up, GRPO with the calculator from its last checkpoint
    of the same seed, and GRPO without the tool from the base model. The RL arm's step 0 is the warm-up's
    last checkpoint (its evaluation reused, not made again); the table has accuracy by steps and the tool's
    figures where there is a tool; the supervised arm has no reward or token-passes."""
    from grouprl.config import load_config
    from grouprl.sft import write_demonstrations

    sets = [f"model.name_or_path={tool_model}", "task.name=word_problems", "task.num_train=16", "task.num_eval=6",
            "task.max_operand=9", "task.max_steps=2", "env.name=calculator", "env.max_turns=3", "task.prefill=",
            "steps=2", "rollout.group_size=2", "rollout.prompts_per_step=2", "rollout.max_new_tokens=40",
            "eval.batch_size=6", "grpo.beta=0", "threads=1"]
    demos = tmp_path / "demos.jsonl"
    write_demonstrations(load_config(None, sets), demos)
    arms = [f"warm:algo=sft steps=3 sft.batch_size=4 sft.micro_batch_size=4 sft.source={demos} optim.lr=3e-3",
            "rl:algo=grpo model.name_or_path=@warm", "plain:algo=grpo env.name=null"]
    out = tmp_path / "report"
    report = compare(None, sets, arms, out, eval_num=6, save_every=1, seeds=[3], console=Console(quiet=True))
    runs = {a["name"]: a["runs"][0] for a in report["arms"]}
    figures = {a["name"]: a["figures"] for a in report["arms"]}
    warm_final = out / "runs" / "warm" / "seed-3" / "final"
    assert load_config(out / "runs" / "rl" / "seed-3" / "config.yaml").model.name_or_path == str(warm_final)
    assert runs["rl"]["curve"][0]["accuracy"] == runs["warm"]["accuracy"]  # step 0 of rl: the warm-up's end
    assert not (out / "evals" / "start-rl-seed-3.json").exists()  # ... whose evaluation was reused
    assert report["base_eval"]["accuracy"] == runs["warm"]["curve"][0]["accuracy"]  # the base with the tool
    assert (out / "eval-base.json").is_file() and (out / "evals" / "start-plain.json").is_file()  # and without
    assert [c["step"] for c in runs["warm"]["curve"]] == [0, 1, 2, 3] and runs["warm"]["passes_total"] is None
    assert "reward_last" not in figures["warm"] and "reward_last" in figures["rl"]
    assert runs["warm"]["eval_at_equal_time"] is None and runs["rl"]["eval_at_equal_time"]["step"] <= 2
    for name, run in runs.items():
        steps = {1: sum(r["steps"] == 1 for r in _held(sets)), 2: sum(r["steps"] == 2 for r in _held(sets))}
        by = run["accuracy_by_steps"]
        assert set(by) == {str(k) for k, n in steps.items() if n}
        assert sum(by[str(k)] * n for k, n in steps.items() if n) == pytest.approx(run["accuracy"] * 6)
        assert ("tool_calls" in figures[name]) == (name != "plain")
    assert "accuracy" in report["arms"][1]["paired"] and "reward_last" not in report["arms"][1]["paired"]
    for png in ("episodes.png", "accuracy.png", "reward_vs_step.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = (out / "report.md").read_text()
    assert "rl starts from another arm's last checkpoint" in md and "![tool use over training](episodes.png)" in md
    import os

    adapter = next(warm_final.glob("*.safetensors"))
    os.utime(adapter, ns=(adapter.stat().st_atime_ns, adapter.stat().st_mtime_ns + 10**9))  # trained again
    with pytest.raises(UserError, match=r"run 'rl' seed 3 started from .*trained again since: delete"):
        compare(None, sets, arms, out, eval_num=6, save_every=1, seeds=[3], console=Console(quiet=True))
    with pytest.raises(UserError, match="names no earlier arm"):
        compare(None, sets, ["rl:algo=grpo model.name_or_path=@warm", arms[0]], tmp_path / "other", eval_num=6,
                save_every=1)


def _held(sets: list[str]) -> list[dict]:
    from grouprl.config import load_config
    from grouprl.tasks import build_task

    return build_task(load_config(None, sets).task).eval[:6]


def test_bad_runs_fail_in_one_line(tiny_model, toy_data, toy_reward, tmp_path):
    with pytest.raises(UserError, match="not a preset"):
        RunSpec.parse("nonsense")
    with pytest.raises(UserError, match="must share"):
        compare(None, base_sets(tiny_model, toy_data, toy_reward), ["grpo", "long:steps=9"], tmp_path,
                eval_num=2, save_every=1)
    res = CliRunner().invoke(app, ["compare", "--run", "grpo", "--run", "x:grpo.beta=-1", "-o", str(tmp_path)])
    assert res.exit_code == 2 and "run 'x'" in res.output and "grpo.beta" in res.output


def test_files_damaged_by_a_kill_are_made_again(report_dir, tiny_model, toy_data, toy_reward):
    """A kill while a JSON file was written leaves it cut short. compare, run again, evaluates a damaged
    evaluation cache again (the base model's too) and resumes a finished run whose run_info.json is damaged,
    which writes it again; the report comes out as before."""
    before = json.loads((report_dir / "report.json").read_text())
    run = report_dir / "runs" / "grpo" / "seed-0"
    info = (run / "run_info.json").read_text()
    (run / "run_info.json").write_text(info[:len(info) // 2])
    cache = report_dir / "runs" / "ppo" / "seed-1" / "eval-step-2.json"
    whole = json.loads(cache.read_text())
    cache.write_text(cache.read_text()[:100])
    (report_dir / "eval-base.json").write_text("[]")
    report = compare(None, base_sets(tiny_model, toy_data, toy_reward), RUNS, report_dir, eval_num=4, save_every=1,
                     seeds=SEEDS, console=Console(quiet=True))
    assert json.loads((run / "run_info.json").read_text()) == json.loads(info)
    assert "resumed after step 3" in " ".join((run / "train.log").read_text().split())
    fresh = json.loads(cache.read_text())  # evaluated again: the same greedy completions (its time aside)
    assert all(fresh[k] == whole[k] for k in ("key", "accuracy", "correct", "completions"))
    assert json.loads((report_dir / "eval-base.json").read_text())["accuracy"] == report["base_eval"]["accuracy"]
    assert report["base_eval"] == before["base_eval"] and report["eval_problems"] == before["eval_problems"] == 4


def test_a_report_folder_made_with_other_settings_is_refused(report_dir, tiny_model, toy_data, toy_reward):
    sets = base_sets(tiny_model, toy_data, toy_reward) + ["optim.lr=0.5"]
    with pytest.raises(UserError, match=r"run 'grpo' .* other settings \(optim.lr\)"):
        compare(None, sets, RUNS, report_dir, eval_num=4, save_every=1, seeds=SEEDS)


def test_report_page_in_a_headless_browser(report_dir):
    chromium = shutil.which("chromium")
    if chromium is None:
        pytest.skip("Debian's chromium is not installed (scripts/test.sh installs it when run as root)")
    from playwright.sync_api import sync_playwright

    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync"]
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=flags)
        page = browser.new_page(viewport={"width": 1200, "height": 900})
        page.goto((report_dir / "index.html").as_uri())
        assert page.locator("#comparison thead th").all_inner_texts() == ["", *RUNS]
        labels = page.locator("#comparison tbody tr td:first-child").all_inner_texts()
        assert "models trained" in labels and "peak memory (GiB)" in labels and len(labels) >= 25
        assert page.locator("#paired thead th").all_inner_texts() == ["", "ppo - grpo", "rank - grpo"]
        for img in ("#by-step", "#by-time", "#accuracy", "#critic"):  # the plots load and have a size
            assert page.eval_on_selector(img, "i => i.complete && i.naturalWidth > 300 && i.naturalHeight > 200")
        assert page.locator("section.run").count() == len(RUNS)
        for name in RUNS:
            assert page.locator(f"section.run[data-run='{name}'] pre").count() >= 1
        page.screenshot(path=str(report_dir / "screenshot.png"), full_page=True)
        browser.close()
    assert (report_dir / "screenshot.png").stat().st_size > 10_000


@pytest.fixture
def eval_calls(monkeypatch) -> list:
    """The held-out evaluation made a fake (no model loaded): the first problem right, the others wrong. The
    list it returns gets (prefill, max_new_tokens, batch_size) of every evaluation made."""
    import grouprl.evaluate
    import grouprl.models

    calls = []

    def fake_evaluate(net, tok, task, rows, *, prefill, max_new_tokens, batch_size, **kw):
        calls.append((prefill, max_new_tokens, batch_size))
        return ({"problems": len(rows), "format_rate": 0.5, "accuracy": 0.25},
                [{"correct": 1.0, "completion": "c"}] + [{"correct": 0.0, "completion": "c"}] * (len(rows) - 1))

    monkeypatch.setattr(grouprl.evaluate, "evaluate", fake_evaluate)
    monkeypatch.setattr(grouprl.models, "load_for_inference", lambda path, cfg: (None, None))
    return calls


def test_evaluation_cache_is_keyed_on_what_changes_the_result(tiny_model, toy_data, toy_reward, tmp_path, eval_calls):
    import os

    from grouprl.compare import evaluate_checkpoint
    from grouprl.config import load_config

    calls = eval_calls
    model = tmp_path / "model"  # a checkpoint of our own, to write again below
    shutil.copytree(tiny_model, model)
    cache = tmp_path / "eval.json"
    sets = toy_config(tiny_model, toy_data, toy_reward, tmp_path / "run")

    def run(*extra, num=4):
        return evaluate_checkpoint(str(model), load_config(None, sets + list(extra)), num, cache)

    first = run()
    assert first["accuracy"] == 0.25 and calls == [("", 12, 64)]  # rollout.max_new_tokens 12, batch 64
    assert first["correct"] == [1, 0, 0, 0] and first["completions"] == ["c"] * 4  # per problem, for the intervals
    run()
    run("eval.k=4", "eval.temperature=1.0")  # not used by a greedy evaluation: still cached
    assert len(calls) == 1
    run("eval.max_new_tokens=5")
    assert calls[-1] == ("", 5, 64)
    run("eval.max_new_tokens=5")  # the new result is the cached one now
    assert len(calls) == 2
    run("eval.max_new_tokens=5", "task.prefill=<think>")
    assert calls[-1] == ("<think>", 5, 64)
    run("eval.max_new_tokens=5", "task.prefill=<think>", num=3)
    assert len(calls) == 4
    weights = model / "model.safetensors"  # trained again at the same path: the weights file is new
    st = weights.stat()
    os.utime(weights, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    run("eval.max_new_tokens=5", "task.prefill=<think>", num=3)
    assert len(calls) == 5
    # a cache written before the key (model and problem count only) is not trusted
    cache.write_text(json.dumps({"model": str(model), "problems": 3, "format_rate": 1.0, "accuracy": 1.0}))
    assert run("eval.max_new_tokens=5", "task.prefill=<think>", num=3)["accuracy"] == 0.25
    assert len(calls) == 6
    import torch  # the evaluation runs with the run's thread count (two-thread ones oversubscribe one-thread runs)

    threads = torch.get_num_threads()
    try:
        cache.unlink()
        run("threads=1")
        assert len(calls) == 7 and torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(threads)


def test_evaluation_cache_is_written_whole_and_a_damaged_one_made_again(tiny_model, toy_data, toy_reward, tmp_path,
                                                                       eval_calls, monkeypatch):
    """A kill while a cache was written used to leave it cut short, and every later compare died reading it.
    Now a cache is renamed into place once whole (a kill before that leaves the old one or none), and one
    that cannot be read or is not an evaluation of the problems asked for is evaluated again."""
    import os

    from grouprl.compare import evaluate_checkpoint
    from grouprl.config import load_config

    cfg = load_config(None, toy_config(tiny_model, toy_data, toy_reward, tmp_path / "run"))
    cache = tmp_path / "eval-step-1.json"

    def run(num=4):
        return evaluate_checkpoint(str(tiny_model), cfg, num, cache)

    def killed_at_rename(src, dst):
        raise KeyboardInterrupt if Path(dst) == cache else AssertionError(f"unexpected rename to {dst}")

    with monkeypatch.context() as m:  # killed before the rename: no cache at all
        m.setattr(os, "replace", killed_at_rename)
        with pytest.raises(KeyboardInterrupt):
            run()
    assert not cache.exists() and len(eval_calls) == 1
    whole = run()
    assert whole["correct"] == [1, 0, 0, 0] and json.loads(cache.read_text()) == whole and len(eval_calls) == 2
    text = cache.read_text()
    with monkeypatch.context() as m:  # killed while another evaluation replaces it: the old one stays whole
        m.setattr(os, "replace", killed_at_rename)
        with pytest.raises(KeyboardInterrupt):
            run(num=3)
    assert cache.read_text() == text and len(eval_calls) == 3
    damaged = [text[:len(text) // 2], "\xff", "[]", json.dumps(whole | {"correct": [1, 0]}),
               json.dumps({k: v for k, v in whole.items() if k != "completions"})]
    for n, bad in enumerate(damaged):
        cache.write_text(bad)
        assert run() == whole and len(eval_calls) == 4 + n, bad
        assert json.loads(cache.read_text()) == whole
    assert run() == whole and len(eval_calls) == 3 + len(damaged)  # whole again: reused


def test_a_damaged_run_info_is_one_line(tiny_model, toy_data, toy_reward, tmp_path):
    from grouprl.compare import run_figures
    from grouprl.config import load_config

    cfg = load_config(None, toy_config(tiny_model, toy_data, toy_reward, tmp_path / "run"))
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "metrics.jsonl").write_text(json.dumps({"step": 1, "step_time": 1.0}) + "\n")
    for bad in ('{"algo": "gr', "[]", '{"algo": "grpo"}'):
        (run_dir / "run_info.json").write_text(bad)
        with pytest.raises(UserError, match=r"run 'grpo' seed 0: '.*run_info\.json' is missing or damaged"):
            run_figures("grpo", cfg, tmp_path, 4, lambda: None, {"grpo": {0: cfg}})


def test_compare_runs_each_arm_distributed(tiny_model, toy_data, toy_reward, tmp_path):
    """--nproc 2: each arm is a torchrun job of 2 ranks (its run_info says so) and the report is written."""
    out = tmp_path / "report"
    compare(None, base_sets(tiny_model, toy_data, toy_reward) + ["steps=2"], ["grpo", "ppo"], out, eval_num=4,
            save_every=1, console=Console(quiet=True), nproc=2)
    for arm in ("grpo", "ppo"):
        info = json.loads((out / "runs" / arm / "seed-0" / "run_info.json").read_text())
        assert info["world_size"] == 2 and info["strategy"] == "ddp", info
    report = json.loads((out / "report.json").read_text())
    assert {(a["name"], a["world_size"]) for a in report["arms"]} == {("grpo", 2), ("ppo", 2)}


def test_arms_that_would_train_identically_are_refused_and_settings_without_effect_warned(tmp_path):
    """At mu = 1 with one minibatch the ratio is exactly 1: GSPO is GRPO (refused, saying why), and DAPO's
    eps_high changes nothing (a warning); at mu = 2 both matter. Equal overrides under two names are refused."""
    from grouprl.compare import RunSpec, check_arms_differ, run_configs

    def cfgs(runs, sets=()):
        arms = run_configs(None, ["grpo.beta=0", *sets], [RunSpec.parse(r) for r in runs], [0], tmp_path, 1)
        return {name: arm[0] for name, arm in arms.items()}

    with pytest.raises(UserError, match=r"'grpo' and 'gspo' would train identically .*grpo\.ratio: with grpo\.mu=1"):
        check_arms_differ(cfgs(["grpo", "gspo"]))
    assert check_arms_differ(cfgs(["grpo", "gspo"], ["grpo.mu=2"])) == []
    warnings = check_arms_differ(cfgs(["grpo", "dapo", "ppo"]))
    assert len(warnings) == 1 and warnings[0].startswith("dapo: grpo.eps_high=0.28 has no effect here")
    with pytest.raises(UserError, match="'a' and 'b' would train identically .*rollout.engine: speed and output"):
        check_arms_differ(cfgs(["a:grpo.advantage=rank", "b:grpo.advantage=rank rollout.engine=hf"]))
    assert check_arms_differ(cfgs(["grpo", "dr-grpo", "rloo"])) == []


def fake_run(seed: int, accuracy: float, correct: list[int]) -> dict:
    """A run's figures as compare.run_figures returns them, every one set (the value of no interest: 1.0)."""
    from grouprl.report import FIGURES

    run = {"seed": seed, "algo": "grpo", "overrides": [], "models_trained": 1, "models_in_memory": 1,
           "trainable_parameters": 10, "device": "cpu", "world_size": 1, "correct": correct, "steps": 3,
           "eval_at_equal_time": {}, "eval_at_equal_compute": {}}
    for key, _, _ in FIGURES:
        *parents, child = key.split(".")
        where = run
        for p in parents:
            where = where.setdefault(p, {})
        where[child] = 1.0
    run["accuracy"] = accuracy
    return run


def test_report_of_one_seed_has_means_and_no_made_up_intervals():
    """One seed: every cell is the mean alone, the JSON holds null (not NaN) where an interval over seeds
    would be, the paired rows say there is none, and the accuracy's bootstrap over problems still has one."""
    from grouprl.report import aggregate, markdown

    runs = {"grpo": [fake_run(0, 0.5, [1, 0, 1, 0])], "dr-grpo": [fake_run(0, 0.75, [1, 1, 1, 0])]}
    report = {"model": "m", "task": "t", "steps": 3, "prompts_per_step": 2, "group_size": 4, "seeds": [0],
              "eval_problems": 4, "base_eval": {"accuracy": 0.0, "format_rate": 0.0}, "arms": aggregate(runs)}
    text = json.dumps(report, allow_nan=False)  # no NaN anywhere
    arm = report["arms"][1]
    assert arm["figures"]["accuracy"] == {"mean": 0.75, "lo": None, "hi": None, "n": 1}
    assert arm["accuracy_bootstrap"]["lo"] < 0.75 <= arm["accuracy_bootstrap"]["hi"]
    assert arm["paired"]["accuracy_t"]["p"] is None and "null" in text
    md = markdown(report)
    assert "| held-out accuracy at the last step | 50.0% | 75.0% |" in md
    assert "+25.0% (one seed: no interval)" in md  # the paired t over seeds
    assert "| held-out accuracy at the last step: bootstrap over seeds and problems | +25.0% [" in md


def test_seeds_come_from_seeds_only(tmp_path):
    from grouprl.compare import RunSpec, run_configs

    with pytest.raises(UserError, match="'x' sets seed: seeds come from --seeds"):
        run_configs(None, [], [RunSpec.parse("x:algo=grpo seed=3")], [0, 1], tmp_path, 1)
    with pytest.raises(UserError, match="--seeds must be distinct"):
        run_configs(None, [], [RunSpec.parse("grpo")], [0, 0], tmp_path, 1)


def test_a_supervised_arm_is_kept_when_only_sampling_settings_change():
    """Its training reads neither rollout, rewards nor entropy: changing them for the RL arms keeps it."""
    from grouprl.compare import _ignored
    from grouprl.config import load_config

    sft, grpo = load_config(None, ["algo=sft", "sft.source=d.jsonl"]), load_config(None, ["algo=grpo"])
    for key in ("rollout.temperature", "rewards", "entropy.coef", "grpo.beta"):
        assert _ignored(sft, key), key
    assert not _ignored(sft, "sft.batch_size") and not _ignored(sft, "optim.lr")
    assert _ignored(grpo, "sft.batch_size") and not _ignored(grpo, "rollout.temperature")
