"""The bad-input matrix, through the command line as a user meets it: every input a user can get wrong ends in
exactly one `error:` line naming the file, row or field, exit code 2, no traceback, and nothing written: a new
run's output_dir is not even created, and an existing run's folder (checkpoints, logs) is left byte for byte."""

from __future__ import annotations

import errno
import subprocess
import hashlib
import json
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from grouprl.cli import app
from test_cli import base_sets

runner = CliRunner()


def snapshot(folder: Path) -> dict[str, str]:
    """sha256 of every file under `folder` but the lock file (whose content is the last holder's pid)."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file() and p.name != ".lock"}


def one_error_line(res, *needles: str) -> str:
    assert res.exit_code == 2, res.output
    assert "Traceback" not in res.output, res.output
    errors = [line for line in res.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, res.output
    for needle in needles:
        assert needle in errors[0], errors[0]
    return errors[0]


def write(path: Path, data: str | bytes) -> Path:
    path.write_bytes(data if isinstance(data, bytes) else data.encode())
    return path


def rows(n: int, **extra) -> str:
    return "".join(json.dumps({"prompt": f"say a {i}", "answer": str(i % 10), **extra}) + "\n" for i in range(n))


@pytest.fixture(scope="module")
def files(tmp_path_factory, tiny_model) -> dict[str, Path]:
    """The bad files of the matrix, made once."""
    d = tmp_path_factory.mktemp("bad")
    good = rows(64).splitlines(keepends=True)
    broken = good[:56] + ['{"prompt": "say a 56", "answer": "6",}\n'] + good[57:]
    truncated = d / "truncated_model"
    shutil.copytree(tiny_model, truncated)
    weights = (truncated / "model.safetensors").read_bytes()
    (truncated / "model.safetensors").write_bytes(weights[: len(weights) // 2])
    no_tokenizer = d / "no_tokenizer"
    no_tokenizer.mkdir()
    for f in ("config.json", "model.safetensors", "generation_config.json"):
        shutil.copy(tiny_model / f, no_tokenizer / f)
    return {
        "latin1_yaml": write(d / "latin1.yaml", "task:\n  system_prompt: caf\u00e9\n".encode("latin-1")),
        "duplicate_yaml": write(d / "dup.yaml", "steps: 3\nseed: 1\nsteps: 5\n"),
        "latin1_jsonl": write(d / "latin1.jsonl", rows(3).encode() + '{"prompt": "caf\u00e9"}\n'.encode("latin-1")),
        "empty_jsonl": write(d / "empty.jsonl", ""),
        "broken_jsonl": write(d / "broken.jsonl", "".join(broken)),
        "null_prompt": write(d / "null.jsonl", rows(10) + json.dumps({"prompt": None, "answer": "1"}) + "\n"),
        "truncated_model": truncated,
        "no_tokenizer": no_tokenizer,
        "rewards": write(d / "bad_rewards.py", (
            "import sys, time\n"
            "def text(prompts, completions, **kw):\n    return ['11'] * len(completions)\n"
            "def quits(prompts, completions, **kw):\n    sys.exit(3)\n"
            "def huge(prompts, completions, **kw):\n    return [1e39] * len(completions)\n"
            "def hangs(prompts, completions, **kw):\n    time.sleep(60)\n    return [0.0] * len(completions)\n")),
        "a_file": write(d / "a_file", "not a folder"),
    }


def matrix(files: dict[str, Path]) -> dict[str, tuple[list[str], list[str], tuple[str, ...]]]:
    """case -> (extra --set overrides, extra CLI arguments, what the error line must name)."""
    r = files["rewards"]
    return {
        "config not UTF-8": ([], ["--config", str(files["latin1_yaml"])], (str(files["latin1_yaml"]), "UTF-8")),
        "duplicate YAML key": ([], ["--config", str(files["duplicate_yaml"])], ("steps", "lines 1 and 3")),
        "steps=true": (["steps=true"], [], ("steps",)),
        "lr=.inf": (["optim.lr=.inf"], [], ("optim.lr",)),
        "temperature=.inf": (["rollout.temperature=.inf"], [], ("rollout.temperature",)),
        "JSONL not UTF-8": ([f"task.source={files['latin1_jsonl']}"], [], (str(files["latin1_jsonl"]), "line 4")),
        "empty JSONL": ([f"task.source={files['empty_jsonl']}"], [], (str(files["empty_jsonl"]), "empty")),
        "broken line 57": ([f"task.source={files['broken_jsonl']}"], [], (str(files["broken_jsonl"]), "line 57")),
        "null prompt": ([f"task.source={files['null_prompt']}"], [],
                        (f"'{files['null_prompt']}' line 11", "'prompt' is null")),
        "truncated safetensors": ([f"model.name_or_path={files['truncated_model']}"], [],
                                  (str(files["truncated_model"]),)),
        "no tokenizer": ([f"model.name_or_path={files['no_tokenizer']}"], [], (str(files["no_tokenizer"]),)),
        "output_dir under a file": ([f"output_dir={files['a_file']}/run"], [], (str(files["a_file"]),)),
        "reward returns a string": ([f"rewards=[{{name: '{r}:text'}}]"], [], (f"{r}:text", "str")),
        "reward calls exit": ([f"rewards=[{{name: '{r}:quits'}}]"], [], (f"{r}:quits", "exit(3)")),
        "reward 1e39": ([f"rewards=[{{name: '{r}:huge'}}]"], [], (f"{r}:huge", "float32")),
        "reward hangs": ([f"rewards=[{{name: '{r}:hangs'}}]", "rewards_timeout_s=0.5"], [],
                         (f"{r}:hangs", "0.5s", "rewards_timeout_s")),
        "prompt too long": (["task.max_prompt_tokens=10"], [], ("toy.jsonl' line ", "task.long_prompts")),
    }


CASES = ["config not UTF-8", "duplicate YAML key", "steps=true", "lr=.inf", "temperature=.inf", "JSONL not UTF-8",
         "empty JSONL", "broken line 57", "null prompt", "truncated safetensors", "no tokenizer",
         "output_dir under a file", "reward returns a string", "reward calls exit", "reward 1e39", "reward hangs",
         "prompt too long"]


@pytest.mark.parametrize("case", CASES)
def test_a_new_run_with_bad_input(case, files, tiny_model, toy_data, tmp_path):
    sets, args, needles = matrix(files)[case]
    out = tmp_path / "run"
    argv = ["train", *args, *base_sets(tiny_model, toy_data, out)] + [a for s in sets for a in ("--set", s)]
    one_error_line(runner.invoke(app, argv), *needles)
    assert not out.exists()  # nothing was created


@pytest.fixture(scope="module")
def finished_run(tiny_model, toy_data, toy_reward, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("done") / "run"
    res = runner.invoke(app, ["train", *base_sets(tiny_model, toy_data, out), "--set", "save_every=1"])
    assert res.exit_code == 0, res.output
    return out


RESUME_CASES = ["steps=true", "lr=.inf", "reward returns a string", "reward hangs", "JSONL not UTF-8",
                "prompt too long", "truncated safetensors"]


@pytest.mark.parametrize("case", RESUME_CASES)
def test_resuming_with_bad_input_leaves_the_run_as_it_was(case, files, finished_run, tmp_path):
    """The same inputs given to `--resume` of a finished run (with a config that changes only those): one
    line, and every checkpoint and log byte for byte as before."""
    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    before = snapshot(run)
    sets, args, needles = matrix(files)[case]
    from grouprl.config import load_config, save_config

    if case in ("steps=true", "lr=.inf"):  # refused as an override, before the run's config is even read
        argv = ["train", "--resume", str(run), *[a for s in sets for a in ("--set", s)]]
    else:  # a config that differs in that input only: refused as a change, or as bad input, before any work
        config = tmp_path / "changed.yaml"
        save_config(load_config(run / "grouprl.yaml", sets + ["steps=4"]), config)
        argv = ["train", "--resume", str(run), "--config", str(config)]
        needles = ()  # either message is right; it must be one line
    one_error_line(runner.invoke(app, argv), *needles)
    assert snapshot(run) == before


def test_eval_refuses_k_and_num_below_one(finished_run):
    for args in (["--k", "0"], ["--num", "-1"]):
        one_error_line(runner.invoke(app, ["eval", "--model", str(finished_run / "final"), *args]), "at least 1")


def test_a_full_disk_is_one_line_and_keeps_the_last_checkpoint(tiny_model, toy_data, tmp_path, monkeypatch):
    """ENOSPC in the middle of the second checkpoint write: one line naming the file; step 1's checkpoint is
    intact and the run resumes from it."""
    import grouprl.checkpoint as checkpoint

    real = checkpoint.save_config
    calls = {"n": 0}

    def full_disk(cfg, path):
        calls["n"] += 1
        if calls["n"] == 2:
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return real(cfg, path)

    monkeypatch.setattr(checkpoint, "save_config", full_disk)
    out = tmp_path / "run"
    argv = ["train", *base_sets(tiny_model, toy_data, out), "--set", "save_every=1", "--set", "steps=3"]
    one_error_line(runner.invoke(app, argv), "No space left on device", "grouprl.yaml", "intact")
    monkeypatch.setattr(checkpoint, "save_config", real)
    from grouprl.checkpoint import latest_checkpoint

    assert latest_checkpoint(out).name == "step-000001"
    res = runner.invoke(app, ["train", "--resume", str(out)])
    assert res.exit_code == 0, res.output
    assert "removed" in res.output and "step-000002.tmp" in res.output
    assert latest_checkpoint(out).name == "final"


def test_plot_and_resume_survive_a_torn_last_line(finished_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    with (run / "metrics.jsonl").open("a") as f:
        f.write('{"step": 3, "rew')  # a power cut in the middle of a write
    res = runner.invoke(app, ["plot", str(run)])
    assert res.exit_code == 0, res.output
    res = runner.invoke(app, ["train", "--resume", str(run), "--set", "steps=3"])
    assert res.exit_code == 0, res.output
    assert [json.loads(x)["step"] for x in (run / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3]


def test_plot_versus_draws_several_runs_on_one_figure(finished_run, tmp_path):
    res = runner.invoke(app, ["plot", str(finished_run), "--versus", str(finished_run), "-o", str(tmp_path / "v.png")])
    assert res.exit_code == 0 and (tmp_path / "v.png").stat().st_size > 10_000, res.output
    one_error_line(runner.invoke(app, ["plot", str(finished_run), "--versus", str(tmp_path)]), "has no metrics.jsonl")


# --- found by probing as a hostile user would ------------------------------------------------------------

@pytest.mark.parametrize("sets, needles", [
    (["seed=100000000000000000000000"], ("seed",)),
    (["rewards_timeout_s=1e-300"], ("rewards_timeout_s",)),
    (["rollout.prompts_per_step=1000"], ("rollout.prompts_per_step=1000", "training prompts")),
])
def test_more_bad_settings(sets, needles, tiny_model, toy_data, tmp_path):
    out = tmp_path / "run"
    argv = ["train", *base_sets(tiny_model, toy_data, out)] + [a for s in sets for a in ("--set", s)]
    one_error_line(runner.invoke(app, argv), *needles)
    assert not out.exists()


def test_a_folder_that_is_not_empty_is_not_an_output_dir(tiny_model, toy_data, tmp_path):
    mine = tmp_path / "mine"
    mine.mkdir()
    write(mine / "completions.jsonl", "my own file\n")
    before = snapshot(mine)
    one_error_line(runner.invoke(app, ["train", *base_sets(tiny_model, toy_data, mine)]), "is not empty")
    assert snapshot(mine) == before


def test_reward_code_cannot_move_the_run_or_pose_as_ctrl_c(tiny_model, toy_data, tmp_path, monkeypatch):
    rewards = write(tmp_path / "r.py", (
        "import os\n"
        "def wanders(prompts, completions, **kw):\n    os.chdir(os.environ['ELSEWHERE'])\n"
        "    return [0.0] * len(completions)\n"
        "def interrupts(prompts, completions, **kw):\n    raise KeyboardInterrupt\n"))
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.setenv("ELSEWHERE", str(tmp_path / "elsewhere"))
    monkeypatch.chdir(tmp_path)
    res = runner.invoke(app, ["train", *base_sets(tiny_model, toy_data, "run"), "--set",
                              f"rewards=[{{name: '{rewards}:wanders'}}]"])
    assert res.exit_code == 0, res.output
    assert (tmp_path / "run" / "final").is_dir() and not (tmp_path / "elsewhere" / "run").exists()
    monkeypatch.chdir(tmp_path)
    res = runner.invoke(app, ["train", *base_sets(tiny_model, toy_data, tmp_path / "run2"), "--set",
                              f"rewards=[{{name: '{rewards}:interrupts'}}]"])
    one_error_line(res, "raised KeyboardInterrupt")


def test_data_columns_named_like_reward_arguments(tiny_model, tmp_path):
    data = write(tmp_path / "d.jsonl", rows(20, completions="x"))
    one_error_line(runner.invoke(app, ["train", *base_sets(tiny_model, data, tmp_path / "run")]),
                   "['completions']", "rename")


@pytest.mark.parametrize("damage, file", [
    (lambda p: p.write_text('{"step": 3, broken'), "trainer_state.json"),
    (lambda p: p.write_text("[]"), "trainer_state.json"),
    (lambda p: p.write_bytes(p.read_bytes()[:100]), "dcp/__0_0.distcp"),
    (lambda p: p.write_bytes(b"garbage"), "rng.pt"),
    (lambda p: p.write_bytes(b"garbage"), "dcp/.metadata"),  # a resume reads dcp/, not the HF export
])
def test_a_damaged_committed_checkpoint_is_one_line_naming_the_one_before(damage, file, finished_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    damage(run / "final" / file)
    before = snapshot(run)
    one_error_line(runner.invoke(app, ["train", "--resume", str(run), "--set", "steps=4"]),
                   f"checkpoint '{run / 'final'}' is damaged", f"resume from {run / 'checkpoints' / 'step-000001'}")
    assert snapshot(run) == before


@pytest.mark.parametrize("content, needle", [("", "holds no step"), ('{"step": 1}\n', "row 1"),
                                             ("xx\n{}\n", "line 1")])
def test_plot_of_a_bad_log_is_one_line(content, needle, tmp_path):
    write(tmp_path / "metrics.jsonl", content)
    one_error_line(runner.invoke(app, ["plot", str(tmp_path)]), needle)


def test_plot_and_eval_refuse_bad_output_paths_before_any_work(finished_run, tmp_path):
    one_error_line(runner.invoke(app, ["plot", str(finished_run), "-o", str(tmp_path / "x.txt")]), ".png")
    write(tmp_path / "a_file", "x")
    one_error_line(runner.invoke(app, ["eval", "--model", str(finished_run / "final"), "--num", "1",
                                       "-o", str(tmp_path / "a_file" / "e.json")]), "a_file")


def test_eval_data_with_a_dataset_config(finished_run, toy_data, tmp_path):
    res = runner.invoke(app, ["eval", "--model", str(finished_run / "final"), "--data", str(toy_data),
                              "--set", "task.name=dataset", "--num", "2", "-o", str(tmp_path / "e.json")])
    assert res.exit_code == 0, res.output
    assert json.loads((tmp_path / "e.json").read_text())["metrics"]["problems"] == 2


def test_quotes_around_a_text_override_are_quoting(tmp_path):
    from grouprl.config import load_config

    assert load_config(None, [f"output_dir='{tmp_path}/a'"]).output_dir == f"{tmp_path}/a"
    assert load_config(None, [f'output_dir="{tmp_path}/a"']).output_dir == f"{tmp_path}/a"


def test_a_really_full_disk(tiny_model, toy_data, tmp_path):
    """A 2 MB tmpfs fills up while the second checkpoint is written: one line, exit 2, the checkpoints before it
    intact, and the run resumes once there is room. Needs root and mount (CI has both); skipped elsewhere."""
    disk = tmp_path / "small"
    disk.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2000k", "tmpfs", str(disk)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here")
    try:
        out = disk / "run"
        argv = ["train", *base_sets(tiny_model, toy_data, out), "--set", "save_every=1", "--set", "steps=4"]
        one_error_line(runner.invoke(app, argv), "No space left on device", "intact")
        from grouprl.checkpoint import complete_checkpoints

        saved = complete_checkpoints(out)
        assert saved and all((p / "model.safetensors").is_file() for _, p in saved)
        kept = snapshot(saved[-1][1])
        moved = tmp_path / "run"
        shutil.copytree(out, moved, ignore=shutil.ignore_patterns("*.tmp"))
    finally:
        subprocess.run(["umount", str(disk)], check=False)
    assert snapshot(moved / saved[-1][1].relative_to(out)) == kept
    res = runner.invoke(app, ["train", "--resume", str(moved)])  # on a disk with room: it finishes
    assert res.exit_code == 0, res.output


@pytest.mark.parametrize("bad, needle", [
    ({"prompt": "say " + "b" * 600, "answer": "1"}, "over task.max_prompt_tokens"),  # over the tiny model's 512
    ({"prompt": "say a 4"}, "'answer' is null"),
    ({"prompt": [{"role": "assistant", "content": "4"}], "answer": "4"}, "expected a user turn"),
])
def test_a_bad_row_is_named_by_its_line_in_the_file(bad, needle, tiny_model, tmp_path):
    """The rows are shuffled and split before their prompts are measured: the error names the line the user
    opens (line 6, after a blank line 3, the file's 5th row), not a place in the shuffled split."""
    lines = rows(32).splitlines()
    lines.insert(2, "")
    lines[5] = json.dumps(bad)
    data = write(tmp_path / "d.jsonl", "\n".join(lines) + "\n")
    out = tmp_path / "run"
    one_error_line(runner.invoke(app, ["train", *base_sets(tiny_model, data, out)]), f"'{data}' line 6", needle)
    assert not out.exists()
