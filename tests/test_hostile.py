"""Folders, files and code from a stranger (the hostile review's findings): a checkpoint, a model folder or
a reward never runs code it was not asked to run, and what goes wrong is one line, never a traceback."""

from __future__ import annotations

import io
import pickle
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from grouprl.cli import app
from test_bad_inputs import finished_run, one_error_line, runner, snapshot, write  # noqa: F401 (a fixture)


class Payload:
    """Unpickling this creates the folder `where`: the test's stand-in for any code a pickle can run."""

    def __init__(self, where: Path):
        self.where = str(where)

    def __reduce__(self):
        import os

        return os.mkdir, (self.where,)


def test_a_crafted_dcp_metadata_runs_no_code_on_resume(finished_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    (run / "final" / "dcp" / ".metadata").write_bytes(pickle.dumps(Payload(tmp_path / "pwned")))
    before = snapshot(run)
    one_error_line(runner.invoke(app, ["train", "--resume", str(run), "--set", "steps=4"]),
                   f"checkpoint '{run / 'final'}' is damaged", "not checkpoint metadata")
    assert not (tmp_path / "pwned").exists()
    assert snapshot(run) == before


def test_a_crafted_rng_state_runs_no_code_and_gives_no_advice_to_run_it(finished_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    torch.save(Payload(tmp_path / "pwned"), run / "final" / "rng.pt")
    line = one_error_line(runner.invoke(app, ["train", "--resume", str(run), "--set", "steps=4"]), "is damaged",
                          "weights_only load refuses")
    assert "weights_only` set to `False`" not in line and not (tmp_path / "pwned").exists()


def test_the_real_metadata_reads_through_the_restricted_unpickler(finished_run):
    from torch.distributed.checkpoint.metadata import Metadata

    from grouprl.safe_dcp import MetadataUnpickler

    with open(finished_run / "final" / "dcp" / ".metadata", "rb") as f:
        meta = MetadataUnpickler(f).load()
    assert isinstance(meta, Metadata) and meta.state_dict_metadata


def test_checkpoint_values_are_read_as_weights_only(tmp_path):
    from grouprl.safe_dcp import SafePlanner

    planner = SafePlanner(flatten_state_dict=False)
    planner.state_dict = {}
    item = SimpleNamespace(dest_index=SimpleNamespace(fqn="lr"))
    buf = io.BytesIO()
    torch.save({"lr": 0.5, "betas": (0.9, 0.99)}, buf)
    buf.seek(0)
    planner.load_bytes(item, buf)
    assert planner.state_dict["lr"] == {"lr": 0.5, "betas": (0.9, 0.99)}
    buf = io.BytesIO()
    torch.save(Payload(tmp_path / "pwned"), buf)
    buf.seek(0)
    with pytest.raises(pickle.UnpicklingError):
        planner.load_bytes(item, buf)
    assert not (tmp_path / "pwned").exists()


def test_eval_runs_reward_code_named_by_a_model_folder_only_when_the_command_line_names_it(finished_run, tmp_path):
    import yaml

    folder = tmp_path / "downloaded"
    shutil.copytree(finished_run / "final", folder)
    code = write(folder / "judge.py", "from pathlib import Path\n"
                 f"Path({str(tmp_path / 'ran')!r}).mkdir(exist_ok=True)\n"
                 "def judge(prompts, completions, **kw):\n    return [1.0] * len(completions)\n")
    cfg = yaml.safe_load((folder / "grouprl.yaml").read_text())
    cfg.setdefault("eval", {})["reward"] = f"{code}:judge"
    (folder / "grouprl.yaml").write_text(yaml.safe_dump(cfg))
    one_error_line(runner.invoke(app, ["eval", "--model", str(folder), "--num", "1"]),
                   "names reward code in eval.reward", f"--set eval.reward={code}:judge")
    assert not (tmp_path / "ran").exists()
    res = runner.invoke(app, ["eval", "--model", str(folder), "--num", "1", "--set", "eval.reward=correctness"])
    assert res.exit_code == 0, res.output
    assert not (tmp_path / "ran").exists()
    res = runner.invoke(app, ["eval", "--model", str(folder), "--num", "1", "--set", f"eval.reward={code}:judge"])
    assert res.exit_code == 0, res.output
    assert (tmp_path / "ran").is_dir()


@pytest.mark.parametrize("file, content, needle", [
    ("trainer_state.json", None, "says step -5"),
    ("COMPLETE", '{"step": -5, "world_size": 1}', "says step"),
    ("COMPLETE", "not json", "COMPLETE"),
])
def test_a_checkpoint_whose_step_is_not_its_own_is_refused(file, content, needle, finished_run, tmp_path):
    import json

    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    path = run / "final" / file
    if content is None:
        content = json.dumps(json.loads(path.read_text()) | {"step": -5})
    path.write_text(content)
    before = snapshot(run)
    one_error_line(runner.invoke(app, ["train", "--resume", str(run), "--set", "steps=4"]),
                   f"'{run / 'final'}'", needle)
    assert snapshot(run) == before


def test_error_text_is_printed_as_it_is_never_as_markup(tiny_model, toy_data, tmp_path):
    from test_cli import base_sets

    missing = tmp_path / "x[" / "y].jsonl"
    line = one_error_line(runner.invoke(app, ["train", *base_sets(tiny_model, toy_data, tmp_path / "a"),
                                              "--set", f"task.source={missing}"]))
    assert str(missing) in line
    rewards = write(tmp_path / "r.py", "def judge(prompts, completions, **kw):\n"
                    "    raise ValueError('[blink]no[/] [/x] [bold red]')\n")
    line = one_error_line(runner.invoke(app, ["train", *base_sets(tiny_model, toy_data, tmp_path / "b"), "--set",
                                              f"rewards=[{{name: '{rewards}:judge'}}]"]))
    assert "raised ValueError: [blink]no[/] [/x] [bold red]" in line


@pytest.mark.parametrize("template, needle", [
    ("{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}", "took longer than 0.5s"),
    ("{{ 'x' * 5000000 }}", "5,000,000 characters"),
])
def test_a_chat_template_is_bounded_in_time_and_size(template, needle, tiny_model, monkeypatch):
    import grouprl.tasks as tasks
    from grouprl.errors import UserError
    from grouprl.models import load_tokenizer

    monkeypatch.setattr(tasks, "TEMPLATE_LIMIT_S", 0.5)
    tok = load_tokenizer(str(tiny_model), False)
    tok.chat_template = template
    task = tasks.Task("t", [], [], "system", "correctness")
    with pytest.raises(UserError, match=needle):
        task.chat_prompt(tok, {"prompt": "q"}, "")


@pytest.mark.parametrize("crash", ["import ctypes; ctypes.string_at(0)", "import os; os.abort()"])
def test_a_reward_that_crashes_the_process_says_where(crash, tiny_model, toy_data, tmp_path):
    """In the training process (reward_workers: 0) a segfault or abort cannot become an error line, but the
    crash report names the reward's file and line; in a worker it is one line."""
    from test_cli import base_sets

    rewards = write(tmp_path / "crash.py", f"def crash(prompts, completions, **kw):\n    {crash}\n")
    sets = [*base_sets(tiny_model, toy_data, tmp_path / "a"), "--set", f"rewards=[{{name: '{rewards}:crash'}}]"]
    p = subprocess.run([sys.executable, "-m", "grouprl", "train", *sets], capture_output=True, text=True,
                       timeout=300)
    assert p.returncode < 0 or p.returncode > 128, p.stderr[-2000:]
    assert "Fatal Python error" in p.stderr and f'File "{rewards}", line 2 in crash' in p.stderr, p.stderr[-2000:]
    line = one_error_line(runner.invoke(app, ["train", *sets[:-2], "--set", f"rewards=[{{name: '{rewards}:crash'}}]",
                                              "--set", "reward_workers=1", "--set",
                                              f"output_dir={tmp_path / 'b'}"]), "reward worker process died")
    assert "crash" in line


def test_a_reward_worker_that_sends_sigterm_to_the_trainer_stops_it_with_a_checkpoint(tiny_model, toy_data,
                                                                                       tmp_path):
    from test_cli import base_sets

    rewards = write(tmp_path / "term.py", "import os, signal\ncalls = 0\n"
                    "def term(prompts, completions, **kw):\n    global calls\n    calls += 1\n"
                    "    if calls == 3:  # the start-up check, step 1, step 2\n"
                    "        os.kill(os.getppid(), signal.SIGTERM)\n    return [0.0] * len(completions)\n")
    out = tmp_path / "run"
    p = subprocess.run([sys.executable, "-m", "grouprl", "train", *base_sets(tiny_model, toy_data, out), "--set",
                        "steps=6", "--set", f"rewards=[{{name: '{rewards}:term'}}]", "--set", "reward_workers=1"],
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 130, p.stderr[-2000:]
    assert "stopped by SIGTERM after step 2" in p.stderr
    assert (out / "checkpoints" / "step-000002" / "COMPLETE").is_file()


@pytest.mark.parametrize("link", [".lock", "completions.jsonl.tmp", "grouprl.yaml.tmp", "run_info.json.tmp",
                                  "metrics.jsonl", "completions.jsonl", "checkpoints"])
def test_a_run_folder_cannot_have_grouprl_write_through_its_links(link, finished_run, tmp_path):
    import os

    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    victim = write(tmp_path / "victim.txt", "my precious thesis\n")
    target = run / link
    if target.is_dir():
        shutil.move(target, tmp_path / "elsewhere")
        os.symlink(tmp_path / "elsewhere", target)
    elif target.exists():
        shutil.move(target, victim)
        os.symlink(victim, target)
    else:
        os.symlink(victim, target)
    before = victim.read_text()
    res = runner.invoke(app, ["train", "--resume", str(run), "--set", "steps=3"])
    assert victim.read_text() == before
    if link.endswith(".tmp"):  # a leftover is removed, never written through
        assert res.exit_code == 0, res.output
        assert not (run / link).is_symlink() and not (run / link.removesuffix(".tmp")).is_symlink()
    else:
        one_error_line(res, "is a symbolic link")


def test_a_yaml_alias_bomb_and_deep_nesting_are_one_line(tmp_path):
    bomb = "rewards:\n  - &a0 [lol,lol,lol,lol,lol,lol,lol,lol,lol]\n" + "".join(
        f"  - &a{i} [{','.join([f'*a{i - 1}'] * 9)}]\n" for i in range(1, 10))
    one_error_line(runner.invoke(app, ["train", "--config", str(write(tmp_path / "bomb.yaml", bomb))]), "rewards")
    one_error_line(runner.invoke(app, ["train", "--config", str(write(tmp_path / "deep.yaml",
                                                                      "steps: " + "[" * 5000 + "]" * 5000))]),
                   "nested too deep")
    one_error_line(runner.invoke(app, ["train", "--set", "steps=" + "[" * 3000 + "]" * 3000]), "nested too deep")


@pytest.mark.parametrize("change, needle", [
    ({"num_hidden_layers": 3}, "names 3 layers and its weights hold 2"),  # the third would be random
    ({"num_hidden_layers": 3_000_000}, "names 3000000 layers"),  # refused before transformers builds them
    ({"tie_word_embeddings": False}, "lack 1 tensor(s)"),  # lm_head.weight: random
    ({"num_attention_heads": 0}, "cannot"),
    ({"hidden_size": "64"}, "cannot"),
])
def test_a_model_folder_config_that_does_not_fit_its_weights_is_one_line(change, needle, finished_run, tmp_path):
    import json

    folder = tmp_path / "m"
    shutil.copytree(finished_run / "final", folder)
    cfg = json.loads((folder / "config.json").read_text())
    assert cfg["num_hidden_layers"] == 2
    (folder / "config.json").write_text(json.dumps(cfg | change))
    # in a process of its own: transformers' load report logs to the stderr it first saw
    p = subprocess.run([sys.executable, "-m", "grouprl", "eval", "--model", str(folder), "--num", "1"],
                       capture_output=True, text=True, timeout=300)
    lines = [line for line in p.stderr.splitlines() if line.startswith("error:")]
    assert p.returncode == 2 and len(lines) == 1 and "Traceback" not in p.stderr, p.stderr[-2000:]
    assert str(folder) in lines[0] and needle in lines[0], lines


@pytest.mark.parametrize("file, edit, needle", [
    ("metrics.jsonl", lambda t: '{"x": 1}\n' + t, "line 1 is not a grouprl log row"),
    ("metrics.jsonl", lambda t: t.replace('"reward": ', '"reward": "x", "r": ', 1), "'reward' is not a number"),
    ("completions.jsonl", lambda t: t + '{"step": "9"}\n' + t.splitlines()[0] + "\n", "is not a grouprl log row"),
])
def test_hand_edited_logs_stop_a_resume_with_one_line(file, edit, needle, finished_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    (run / file).write_text(edit((run / file).read_text()))
    before = snapshot(run)
    one_error_line(runner.invoke(app, ["train", "--resume", str(run), "--set", "steps=4"]), file, needle)
    assert snapshot(run) == before


def test_a_data_position_that_is_not_one_is_a_damaged_checkpoint(finished_run, tmp_path):
    import json

    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    path = run / "final" / "trainer_state.json"
    path.write_text(json.dumps(json.loads(path.read_text()) | {"data": {"evil": 1}}))
    one_error_line(runner.invoke(app, ["train", "--resume", str(run), "--set", "steps=4"]), "is damaged",
                   "data position")


@pytest.mark.parametrize("edit, needle", [
    (lambda t: t.replace('"reward": ', '"reward/c": "x", "reward": ', 1), "'reward/c' is not a number"),
    (lambda t: t.replace('"step": 1,', f'"step": {10**400},', 1), "'step' is not a number"),
    (lambda t: t.replace('"reward": ', '"reward/$\\\\foo{$": 0.5, "reward": '), None),  # mathtext: drawn as text
])
def test_plot_of_a_hostile_log_is_one_line_or_a_plot(edit, needle, finished_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    (run / "metrics.jsonl").write_text(edit((run / "metrics.jsonl").read_text()))
    (run / "grouprl.yaml").write_text("- a\n- b\n")
    res = runner.invoke(app, ["plot", str(run)])
    if needle is None:
        assert res.exit_code == 0 and (run / "rewards.png").is_file(), res.output
    else:
        one_error_line(res, needle)


@pytest.mark.parametrize("answer, needle", [
    (["1", "2"], "is list"), ({"x": 1}, "is dict"), (True, "is bool"), ("Infinity", "is float inf"),
])
def test_an_answer_that_is_not_text_or_a_finite_number_is_refused(answer, needle, tmp_path):
    import json

    from grouprl.errors import UserError
    from grouprl.tasks.data import dataset_rows

    line = json.dumps({"prompt": "q", "answer": answer}) if answer != "Infinity" else \
        '{"prompt": "q", "answer": Infinity}'
    data = write(tmp_path / "d.jsonl", '{"prompt": "p", "answer": 4}\n' + line + "\n")
    with pytest.raises(UserError, match=f"line 2: 'answer' {needle}"):
        dataset_rows(str(data), "prompt", "answer")


def test_a_key_twice_in_a_data_row_is_refused(tmp_path):
    from grouprl.errors import UserError
    from grouprl.tasks.data import dataset_rows

    data = write(tmp_path / "d.jsonl",
                 '{"prompt": "p", "answer": "1"}\n{"prompt": "f", "answer": "1", "answer": "2"}\n')
    with pytest.raises(UserError, match="line 2: key 'answer' appears twice"):
        dataset_rows(str(data), "prompt", "answer")


def test_a_csv_field_past_the_csv_modules_limit_is_read(tmp_path):
    from grouprl.tasks.data import dataset_rows

    data = write(tmp_path / "d.csv", "prompt,answer\n" + f'"{"y" * 200_000}",1\n' + "q,2\n")
    rows = dataset_rows(str(data), "prompt", "answer")
    assert [len(r["prompt"]) for r in rows] == [200_000, 1]


def test_a_closed_stdout_does_not_stop_the_run(tiny_model, toy_data, tmp_path):
    """`grouprl train ... | head -1`: the pipe closes after the first line; the run trains on and saves."""
    from test_cli import base_sets

    out = tmp_path / "run"
    p = subprocess.Popen([sys.executable, "-m", "grouprl", "train", *base_sets(tiny_model, toy_data, out), "--set",
                          "steps=3"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    p.stdout.readline()
    p.stdout.close()
    stderr = p.stderr.read()
    assert p.wait(timeout=300) == 0, stderr[-2000:]
    assert (out / "final" / "COMPLETE").is_file() and "Error" not in stderr, stderr[-2000:]


def test_a_csv_that_datasets_cannot_parse_names_the_cause(tmp_path):
    from grouprl.errors import UserError
    from grouprl.tasks.data import dataset_rows

    data = write(tmp_path / "d.csv", 'prompt,answer\n"unterminated,1\nq,2\n')
    with pytest.raises(UserError, match="EOF inside string"):  # not "An error occurred while generating ..."
        dataset_rows(str(data), "prompt", "answer")


def test_a_data_position_past_the_data_is_a_damaged_checkpoint(finished_run, tmp_path):
    import json

    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    path = run / "final" / "trainer_state.json"
    path.write_text(json.dumps(json.loads(path.read_text()) | {"data": {"epoch": 0, "index": 10**9}}))
    one_error_line(runner.invoke(app, ["train", "--resume", str(run), "--set", "steps=4"]), "is damaged",
                   "past the")


def test_compare_refuses_a_busy_or_impossible_report_folder_and_a_broken_run_text(tmp_path):
    from grouprl.compare import RunSpec, _valid_eval
    from grouprl.errors import UserError
    from grouprl.guard import RunLock

    busy = tmp_path / "busy"
    with RunLock(busy):
        one_error_line(runner.invoke(app, ["compare", "--out", str(busy)]), "in use by another grouprl process")
    one_error_line(runner.invoke(app, ["compare", "--out", str(write(tmp_path / "a_file", "x"))]), "a_file")
    with pytest.raises(UserError, match="No closing quotation"):
        RunSpec.parse("a:grpo.beta='0.1")
    key = {"problems": 1}
    good = {"key": key, "accuracy": 1.0, "format_rate": 1.0, "correct": [1], "completions": ["x"]}
    assert _valid_eval(good, key) and not _valid_eval(good | {"accuracy": float("nan")}, key)


def test_a_stray_file_where_a_checkpoint_is_written_is_cleared(finished_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    shutil.rmtree(run / "final")
    write(run / "checkpoints" / "step-000002.tmp", "stray")
    write(run / "checkpoints" / "step-abc", "not ours")
    res = runner.invoke(app, ["train", "--resume", str(run), "--set", "steps=3"])
    assert res.exit_code == 0, res.output
    assert (run / "final" / "COMPLETE").is_file() and (run / "checkpoints" / "step-abc").is_file()


def test_eval_k_past_the_batch_it_is_drawn_in_is_one_line(finished_run):
    one_error_line(runner.invoke(app, ["eval", "--model", str(finished_run / "final"), "--num", "1", "--k", "100000"]),
                   "eval k=100000 is more than eval.batch_size=4")
