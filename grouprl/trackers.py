"""Experiment trackers (`report_to`): TensorBoard, Weights & Biases and Trackio, each through its own library.

Every tracker gets the resolved config once, every step's metrics, and every `log_completions_every` steps a
completions table: one row per prompt with its G completions, rewards and advantages. wandb and trackio are
optional extras (`pip install 'grouprl[wandb]'`, `'grouprl[trackio]'`); `check` names a missing one before
any work. W&B follows its own environment (WANDB_MODE=offline, WANDB_DIR, WANDB_API_KEY, ...), Trackio its
own (TRACKIO_DIR: a local store by default). A resumed run continues the same tracker run: its id is kept in
the run folder's trackers.json (a damaged one is set aside with a warning: new tracker runs start).
"""

from __future__ import annotations

import importlib.util
import json
import os
import tempfile
from pathlib import Path

import yaml
from rich.console import Console
from rich.markup import escape

from grouprl.errors import UserError
from grouprl.guard import write_atomic

EXTRAS = {"wandb": "wandb", "trackio": "trackio"}  # report_to name -> module (and grouprl extra)


def check(report_to: list[str]) -> None:
    """A UserError naming the first tracker whose library is not installed, or Trackio's store when it
    cannot be written (trackio itself only warns, and the run would end with an empty Trackio run)."""
    for name in report_to:
        if name in EXTRAS and importlib.util.find_spec(EXTRAS[name]) is None:
            raise UserError(f"report_to includes {name}, which is not installed: pip install 'grouprl[{name}]' "
                            f"(or remove it from report_to)")
    if "trackio" in report_to:
        store = trackio_store()
        try:
            store.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryFile(dir=store):
                pass
        except OSError as e:
            raise UserError(f"report_to trackio: its store {str(store)!r} cannot be written ({e.strerror or e}); "
                            "set TRACKIO_DIR to a writable folder, or remove trackio from report_to") from None


def trackio_store() -> Path:
    """The folder trackio writes to, in every mode (a Space's logs are kept there too): TRACKIO_DIR, else
    <HF_HOME>/trackio, as trackio/utils.py decides it."""
    from huggingface_hub.constants import HF_HOME

    return Path(os.environ.get("TRACKIO_DIR") or Path(HF_HOME) / "trackio")


def read_ids(path: Path) -> dict[str, str] | None:
    """The tracker run ids kept in a run folder's trackers.json ({report_to name: run id}): {} when there is
    none, None (with a warning) when it is damaged, as a kill while it was written or an edit can leave it."""
    if not path.is_file():
        return {}
    try:
        ids = json.loads(path.read_text())
    except (OSError, ValueError, RecursionError):
        ids = None
    if isinstance(ids, dict) and all(isinstance(v, str) for v in ids.values()):
        return ids
    Console(stderr=True).print(f"[yellow]warning:[/] {escape(str(path))} is damaged (expected a JSON object of "
                               'tracker run ids, e.g. {"wandb": "1a2b3c4d"}): the trackers start new runs',
                               highlight=False, soft_wrap=True)
    return None


def completions_table(step: int, rows: list[dict], group_size: int) -> tuple[list[str], list[list]]:
    """(columns, rows) of the completions table: per prompt its answer, mean reward and, for j = 1..G,
    completion_j, reward_j, advantage_j. rows: one dict per sequence (prompt, answer, completion, reward,
    advantage, and with an environment the episode's messages), G in a row per prompt."""
    from grouprl.episodes import shown

    g = group_size
    columns = ["step", "prompt", "answer", "mean_reward"] + [
        f"{k}_{j}" for j in range(1, g + 1) for k in ("completion", "reward", "advantage")]
    table = []
    for i in range(0, len(rows), g):
        group = rows[i:i + g]
        prompt = group[0]["prompt"]
        if not isinstance(prompt, str):  # chat messages
            prompt = "\n".join(f"{m['role']}: {m['content']}" for m in prompt)
        cells: list = [step, prompt, "" if group[0].get("answer") is None else str(group[0]["answer"]),
                       sum(r["reward"] for r in group) / len(group)]
        for r in group:  # an episode: every turn, its role first (the model's turns are 'assistant')
            cells += [shown(r["episode"]) if "episode" in r else r["completion"], r["reward"], r["advantage"]]
        table.append(cells)
    return columns, table


class TensorBoard:
    def __init__(self, out_dir: Path, config: dict, **_):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(out_dir / "tensorboard"))
        self.writer.add_text("config", "```\n" + yaml.safe_dump(config, sort_keys=False) + "```", 0)

    def log(self, step: int, metrics: dict[str, float]) -> None:
        for k, v in metrics.items():
            self.writer.add_scalar(k, v, step)

    def table(self, step: int, columns: list[str], rows: list[list]) -> None:
        def cell(v) -> str:
            text = f"{v:.3f}" if isinstance(v, float) else str(v)
            return text.replace("|", "\\|").replace("\n", "<br>")
        lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
        lines += ["| " + " | ".join(cell(v) for v in r) + " |" for r in rows]
        self.writer.add_text("completions", "\n".join(lines), step)

    def close(self) -> None:
        self.writer.close()


class WandB:
    def __init__(self, out_dir: Path, config: dict, project: str, name: str, run_id: str | None):
        import wandb

        try:
            self.run = wandb.init(project=project, name=name, id=run_id, resume="allow", config=config,
                                  dir=str(out_dir))
        except Exception as e:  # noqa: BLE001  (no login, no network, a bad entity: one line, nothing lost)
            raise UserError(f"report_to wandb: wandb.init failed ({str(e).splitlines()[0] if str(e) else type(e).__name__}"
                            "); log in (wandb login), set WANDB_MODE=offline, or remove wandb from report_to") from None
        self.id = self.run.id
        self.wandb = wandb

    def log(self, step: int, metrics: dict[str, float]) -> None:
        self.run.log(metrics, step=step)

    def table(self, step: int, columns: list[str], rows: list[list]) -> None:
        self.run.log({"completions": self.wandb.Table(columns=columns, data=rows)}, step=step)

    def close(self) -> None:
        self.run.finish()


class Trackio:
    def __init__(self, out_dir: Path, config: dict, project: str, name: str, run_id: str | None):
        import trackio

        self.trackio = trackio
        self.run = trackio.init(project=project, name=run_id or name, config=config, resume="allow", embed=False)
        self.id = self.run.name

    def log(self, step: int, metrics: dict[str, float]) -> None:
        self.trackio.log(metrics, step=step)

    def table(self, step: int, columns: list[str], rows: list[list]) -> None:
        self.trackio.log({"completions": self.trackio.Table(columns=columns, data=rows)}, step=step)

    def close(self) -> None:
        self.trackio.finish()


TRACKERS = {"tensorboard": TensorBoard, "wandb": WandB, "trackio": Trackio}


def open_trackers(report_to: list[str], out_dir: Path, config: dict, project: str, name: str) -> list:
    """The trackers of `report_to` ('jsonl' is the log files themselves), each continuing its earlier run of
    this folder when there is one (trackers.json)."""
    ids_file = out_dir / "trackers.json"
    kept = read_ids(ids_file)
    ids = kept or {}
    out = []
    try:
        for kind in report_to:
            if kind in TRACKERS:
                out.append(TRACKERS[kind](out_dir, config, project=project, name=name, run_id=ids.get(kind)))
    except BaseException:
        for t in out:
            t.close()
        raise
    new = {kind: t.id for kind, t in zip([k for k in report_to if k in TRACKERS], out) if hasattr(t, "id")}
    if new != kept:  # (a damaged file is replaced)
        write_atomic(ids_file, json.dumps(new, indent=1))
    return out
