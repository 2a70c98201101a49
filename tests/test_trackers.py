"""report_to: TensorBoard, W&B (offline mode) and Trackio (its local store) through their own libraries, each
getting every metric, the resolved config and the completions table; checked by reading the files back."""

from __future__ import annotations

import glob
import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from grouprl.errors import UserError
from grouprl.trackers import TRACKERS, check, completions_table, open_trackers
from tests.test_learning import toy_config


def test_completions_table_one_row_per_prompt():
    rows = [{"prompt": "p1", "answer": 3, "completion": f"c{j}", "reward": float(j), "advantage": j - 0.5}
            for j in range(2)] + [{"prompt": "p2", "answer": None, "completion": "d", "reward": 1.0, "advantage": 0.0},
                                  {"prompt": "p2", "answer": None, "completion": "e", "reward": 0.0, "advantage": 0.0}]
    columns, table = completions_table(7, rows, group_size=2)
    assert columns == ["step", "prompt", "answer", "mean_reward", "completion_1", "reward_1", "advantage_1",
                       "completion_2", "reward_2", "advantage_2"]
    assert table == [[7, "p1", "3", 0.5, "c0", 0.0, -0.5, "c1", 1.0, 0.5],
                     [7, "p2", "", 0.5, "d", 1.0, 0.0, "e", 0.0, 0.0]]


def test_a_missing_tracker_library_is_named(monkeypatch, tmp_path):
    import importlib.util

    monkeypatch.setenv("TRACKIO_DIR", str(tmp_path / "trackio"))
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    with pytest.raises(UserError, match=r"report_to includes wandb, which is not installed: pip install 'grouprl\[wandb\]'"):
        check(["jsonl", "wandb"])
    check(["jsonl", "tensorboard", "trackio"])


def test_a_trackio_store_that_cannot_be_written_is_refused_before_training(monkeypatch, tmp_path):
    """trackio itself only warns when it cannot write its store, and the run would end with an empty Trackio
    run: check refuses it at start. A folder under a regular file can never be made (as root too)."""
    import importlib.util

    (tmp_path / "a-file").write_text("")
    monkeypatch.setenv("TRACKIO_DIR", str(tmp_path / "a-file" / "trackio"))
    with pytest.raises(UserError, match=r"report_to trackio: its store '.*a-file/trackio' cannot be written .*"
                                        "set TRACKIO_DIR to a writable folder, or remove trackio from report_to"):
        check(["jsonl", "trackio"])
    check(["jsonl", "tensorboard"])  # not asked for: not checked
    monkeypatch.setenv("TRACKIO_DIR", str(tmp_path / "new" / "trackio"))
    check(["trackio"])
    assert (tmp_path / "new" / "trackio").is_dir()
    # not installed: that is what is named (the store is trackio's own setting)
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "trackio" else real(name, *a))
    monkeypatch.setenv("TRACKIO_DIR", str(tmp_path / "a-file" / "trackio"))
    with pytest.raises(UserError, match="report_to includes trackio, which is not installed"):
        check(["trackio"])


@pytest.mark.parametrize("damaged", [b'{"wandb": "1a2', b"[]", b'{"wandb": 3}', b"\xff\xfe"],
                         ids=["cut-short", "a-list", "not-a-string", "not-utf8"])
def test_a_damaged_trackers_json_starts_new_tracker_runs(damaged, monkeypatch, tmp_path, capsys):
    """trackers.json only keeps the tracker run ids a resume continues: when it is damaged (a kill while it was
    written, an edit) the resume goes on with new tracker runs, says so in one line, and writes it again."""
    run_ids = []

    class Fake:
        def __init__(self, out_dir, config, project, name, run_id):
            run_ids.append(run_id)
            self.id = run_id or "new-id"

        def close(self):
            pass

    monkeypatch.setitem(TRACKERS, "wandb", Fake)
    ids_file = tmp_path / "trackers.json"
    ids_file.write_bytes(damaged)
    open_trackers(["jsonl", "wandb"], tmp_path, {}, "project", "run")
    assert run_ids == [None] and json.loads(ids_file.read_text()) == {"wandb": "new-id"}
    err = " ".join(capsys.readouterr().err.split())
    assert err.startswith("warning:") and "trackers.json is damaged" in err and "start new runs" in err
    open_trackers(["jsonl", "wandb"], tmp_path, {}, "project", "run")  # the id written is continued
    assert run_ids == [None, "new-id"] and capsys.readouterr().err == ""


def wandb_records(run_file: str) -> list:
    """The records of a .wandb file: a 7-byte header, then LevelDB-log blocks of 32 KiB whose chunks carry a
    7-byte header (crc32, length, type: 1 full, 2 first, 3 middle, 4 last) and W&B Record protobufs."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = Path(run_file).read_bytes()
    assert data[:4] == b":W&B"
    pos, out, buf = 7, [], b""
    while pos + 7 <= len(data):
        if 32768 - pos % 32768 < 7:  # a block's tail too short for a header is padding
            pos += 32768 - pos % 32768
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if kind == 0 and length == 0:
            break
        buf += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            rec = pb.Record()
            rec.ParseFromString(buf)
            out.append(rec)
            buf = b""
    return out


def test_all_trackers_get_metrics_config_and_completions(tiny_model, toy_data, toy_reward, tmp_path):
    out = tmp_path / "run"
    sets = toy_config(tiny_model, toy_data, toy_reward, out, **{
        "steps": 3, "report_to": "[jsonl, tensorboard, wandb, trackio]", "log_completions_every": 2,
        "rollout.group_size": 4, "rollout.prompts_per_step": 2, "rollout.max_new_tokens": 6,
        "eval_every": 2, "eval.num_problems": 4, "project": "grouprl-test", "run_name": "toy"})
    env = os.environ | {"WANDB_MODE": "offline", "WANDB_SILENT": "true", "TRACKIO_DIR": str(tmp_path / "trackio"),
                        "WANDB_CACHE_DIR": str(tmp_path / "wandb-cache"), "WANDB_CONFIG_DIR": str(tmp_path / "wcfg")}
    cmd = [sys.executable, "-m", "grouprl", "train"] + [a for s in sets for a in ("--set", s)]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    metrics = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2, 3]
    completions = [json.loads(x) for x in (out / "completions.jsonl").read_text().splitlines()]
    assert sorted({c["step"] for c in completions}) == [2] and len(completions) == 8  # every 2nd step: 2 x G=4

    # W&B offline: the config, every metric of every step, and the completions table (2 prompts, G = 4)
    records = wandb_records(glob.glob(str(out / "wandb" / "offline-run-*" / "run-*.wandb"))[0])
    run = next(r.run for r in records if r.WhichOneof("record_type") == "run")
    config = {i.key: json.loads(i.value_json) for i in run.config.update}
    assert run.display_name == "toy" and config["rollout"]["group_size"] == 4 and config["steps"] == 3
    history = [{i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in r.history.item}
               for r in records if r.WhichOneof("record_type") == "history"]
    logged = {}
    for h in history:
        logged.setdefault(h["_step"], {}).update(h)
    for m in metrics:
        for k, v in m.items():
            if k != "step":
                assert logged[m["step"]][k] == pytest.approx(v), k
    assert "eval/accuracy" in logged[2] and logged[2]["completions/nrows"] == 2 and logged[2]["completions/ncols"] == 16
    assert "completions/nrows" not in logged[1]
    table = json.loads(Path(glob.glob(str(out / "wandb" / "offline-run-*" / "files" / "media" / "table" / "*.json"))[0])
                       .read_text())
    assert table["columns"][:4] == ["step", "prompt", "answer", "mean_reward"] and len(table["data"]) == 2
    assert table["data"][0][4] == completions[0]["completion"]

    # Trackio's local store: the same metrics, the config and the table
    probe = ("import json, sys; from trackio.sqlite_storage import SQLiteStorage as S; "
             "print(json.dumps([S.get_logs('grouprl-test', 'toy'), S.get_run_config('grouprl-test', 'toy')]))")
    got = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, timeout=120)
    logs, tconfig = json.loads(got.stdout.strip().splitlines()[-1])
    by_step = {}
    for row in logs:
        by_step.setdefault(row["step"], {}).update(row)
    for m in metrics:
        for k, v in m.items():
            assert by_step[m["step"]][k] == pytest.approx(v), k
    assert by_step[2]["completions"]["_type"] == "trackio.table" and len(by_step[2]["completions"]["_value"]) == 2
    assert tconfig["rollout"]["group_size"] == 4

    # TensorBoard: the scalars and the config text
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ea = EventAccumulator(str(out / "tensorboard"), size_guidance={"scalars": 0, "tensors": 0})
    ea.Reload()
    assert [e.step for e in ea.Scalars("reward")] == [1, 2, 3]
    assert "config/text_summary" in ea.Tags()["tensors"] and "completions/text_summary" in ea.Tags()["tensors"]

    # a resume continues the same W&B run (its id kept in trackers.json)
    ids = json.loads((out / "trackers.json").read_text())
    assert set(ids) == {"wandb", "trackio"}
    resumed = subprocess.run([sys.executable, "-m", "grouprl", "train", "--resume", str(out), "--set", "steps=4"],
                             env=env, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stdout[-2000:] + resumed.stderr[-2000:]
    runs = sorted(glob.glob(str(out / "wandb" / "offline-run-*")))
    assert len(runs) == 2 and all(r.endswith(ids["wandb"]) for r in runs)
