"""The `grouprl` command line: a thin typer layer over the Python API.

Every UserError becomes one line on stderr ("error: ...") and exit code 2.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from grouprl.errors import Stopped, UserError

app = typer.Typer(add_completion=False, no_args_is_help=True, help="GRPO for language models with verifiable rewards.")
model_app = typer.Typer(no_args_is_help=True, help="Model utilities.")
app.add_typer(model_app, name="model")

ConfigOpt = typer.Option(None, "--config", "-c", help="YAML config file (see configs/).")
SetOpt = typer.Option(None, "--set", "-s", help="Dotted override, e.g. --set rollout.group_size=8 (repeatable).")


@app.callback()
def _quiet() -> None:
    """GRPO for language models with verifiable rewards."""
    import faulthandler

    from transformers.utils import logging as hf_logging

    # a crash in native code (a reward's C extension, a segfault, an abort) names the Python line it was in
    try:
        faulthandler.enable()
    except (ValueError, OSError):  # stderr is not a file (the CLI called from Python, with captured output)
        pass

    hf_logging.disable_progress_bar()  # our own progress bar is the one to watch


TrustOpt = typer.Option(False, "--trust-remote-code", help="Allow modelling code shipped with the model "
                        "(never taken from a checkpoint's grouprl.yaml without this flag).")


def _fail(err: Exception, code: int = 2) -> None:
    """One line on stderr and the exit code. Under torchrun, an error that every rank raised alike (a
    collective check, a stop) is printed by rank 0 alone."""
    from grouprl.distributed import is_main, shutdown

    if is_main() or not (getattr(err, "everywhere", False) or isinstance(err, Stopped)):
        Console(stderr=True).print(Text.assemble(("error:", "bold red"), f" {err}"), highlight=False, soft_wrap=True)
    shutdown(err)
    raise typer.Exit(code)


NprocOpt = typer.Option(1, "--nproc", min=1, help="Processes on this machine (one per GPU; gloo on the CPU): "
                        "a shortcut for torchrun --standalone --nproc-per-node N -m grouprl ...")


def _ignore_stop_signals() -> None:
    """The run has stopped and says so: a further Ctrl-C must not cut that line short."""
    import signal

    for s in (signal.SIGINT, signal.SIGTERM):
        signal.signal(s, signal.SIG_IGN)


class _Tolerant:
    """stdout that a closed pipe (`grouprl train | head`, or a reward that closes sys.stdout) cannot stop:
    the run goes on, with its progress in its logs, and nothing more is written there."""

    def __init__(self, stream):
        self._stream, self.lost = stream, False

    def _try(self, method: str, *args):
        if not self.lost:
            try:
                return getattr(self._stream, method)(*args)
            except (BrokenPipeError, ValueError):  # ValueError: a closed file
                self.lost = True
                try:  # the interpreter's own flush at exit would complain of the same pipe
                    os.dup2(os.open(os.devnull, os.O_WRONLY), self._stream.fileno())
                except (OSError, ValueError):
                    pass
        return None

    def write(self, text: str) -> int:
        self._try("write", text)
        return len(text)

    def flush(self) -> None:
        self._try("flush")

    def __getattr__(self, name: str):
        return getattr(self._stream, name)


def _io_error(e: OSError) -> UserError:
    """A failed read or write (a full disk, a folder that vanished) as one line naming the file."""
    where = f" {str(e.filename)!r}" if e.filename else ""
    return UserError(f"cannot read or write{where}: {e.strerror or e}; what was saved before is intact")


def _inherited_config(folder: Path, trust_remote_code: bool):
    """The settings saved in a checkpoint's or run's grouprl.yaml, as data: they may not switch on
    trust_remote_code; only the command line can (--trust-remote-code)."""
    from grouprl.config import load_config

    cfg = load_config(folder / "grouprl.yaml")
    if cfg.model.trust_remote_code and not trust_remote_code:
        raise UserError(f"{str(folder / 'grouprl.yaml')!r} asks for model.trust_remote_code, which runs code shipped "
                        "with the model: pass --trust-remote-code to allow it")
    return cfg


@app.command()
def train(
    config: Optional[Path] = ConfigOpt,
    set_: Optional[list[str]] = SetOpt,
    algo: Optional[str] = typer.Option(None, help="grpo, ppo or sft (shorthand for --set algo=...)."),
    resume: Optional[Path] = typer.Option(
        None, help="Continue the run in this output_dir from its latest checkpoint, with its saved config "
        "(--set may change e.g. steps)."),
    trust_remote_code: bool = TrustOpt,
    nproc: int = NprocOpt,
) -> None:
    """Train a policy with GRPO or PPO; writes metrics, completions and checkpoints to output_dir.
    Ctrl-C (or SIGTERM) stops after the current step with a checkpoint (exit 130); a second one at once."""
    out = "OUTPUT_DIR"
    sys.stdout = _Tolerant(sys.stdout)
    if nproc > 1:
        _launch(nproc, sys.argv[sys.argv.index("train"):] if "train" in sys.argv else None,
                config or (resume / "grouprl.yaml" if resume is not None else None), set_)
    import torch
    import torch.distributed as dist

    from grouprl.distributed import first_line, shutdown

    try:
        from grouprl.config import load_config
        from grouprl.loop import train as run

        sets = list(set_ or []) + ([f"algo={algo}"] if algo is not None else [])
        if resume is not None:  # with --config, a run that died before its first checkpoint starts afresh
            if config is None:
                if not (resume / "grouprl.yaml").is_file():
                    raise UserError(f"--resume {str(resume)!r}: no grouprl.yaml there; expected a run's output_dir")
                _inherited_config(resume, trust_remote_code)
                config = resume / "grouprl.yaml"
            sets.append(f"output_dir={resume}")
        cfg = load_config(config, sets)
        out = cfg.output_dir
        run(cfg, resume=resume is not None)
        shutdown()
    except UserError as e:
        _fail(e)
    except RuntimeError as e:  # another rank died, or hung past distributed.timeout_s; or out of memory
        if isinstance(e, torch.OutOfMemoryError) or "can't allocate memory" in str(e):
            _fail(UserError(f"out of memory ({first_line(e)[:200]}): lower rollout.prompts_per_step, group_size "
                            "or max_new_tokens (or set max_tokens_per_micro_batch); the checkpoints written so far "
                            f"are intact: grouprl train --resume {out}"))
        if not (dist.is_initialized() and _lost_contact(e)):
            shutdown(e)
            raise
        err = UserError(f"lost contact with another rank ({first_line(e)[:200]}); see that rank's output above; "
                        f"the checkpoints written so far are intact: grouprl train --resume {out}")
        err.everywhere = True  # said once, by rank 0 when it is one of those left (the launcher names the lost one)
        _fail(err, 1)
    except OSError as e:
        _fail(_io_error(e))
    except Stopped as e:
        _ignore_stop_signals()
        _fail(e, 130)
    except KeyboardInterrupt:
        _ignore_stop_signals()
        err = UserError(f"stopped at once; the checkpoints written so far are intact: grouprl train --resume {out}")
        err.everywhere = True
        _fail(err, 130)
    except Exception as e:  # a bug: its traceback, after leaving the process group (see distributed.shutdown)
        shutdown(e)
        raise


@app.command()
def sft(
    config: Optional[Path] = ConfigOpt,
    set_: Optional[list[str]] = SetOpt,
    resume: Optional[Path] = typer.Option(
        None, help="Continue the run in this output_dir from its latest checkpoint, with its saved config."),
    trust_remote_code: bool = TrustOpt,
) -> None:
    """Supervised fine-tuning on conversations (sft.source), the warm-up before RL: loss on the assistant's
    turns only, laid out as the episode loop lays out episodes. The same as `grouprl train --algo sft`;
    start RL from its output with --set model.name_or_path=<output_dir>/final."""
    train(config=config, set_=set_, algo="sft", resume=resume, trust_remote_code=trust_remote_code, nproc=1)


@app.command()
def demos(
    config: Optional[Path] = ConfigOpt,
    set_: Optional[list[str]] = SetOpt,
    out: Path = typer.Option(..., "--out", "-o", help="The JSONL file to write."),
    num: Optional[int] = typer.Option(None, min=1, help="Training rows to demonstrate (default: all)."),
) -> None:
    """Write the environment's worked episodes (its demonstrate(row): the calculator's for word_problems, the
    guessing game's whole games) of the task's training rows as `grouprl sft` data: one conversation per line,
    the prompt as RL shows it."""
    try:
        from grouprl.config import load_config
        from grouprl.sft import write_demonstrations

        written, missing = write_demonstrations(load_config(config, list(set_ or [])), out, num)
        Console().print(escape(f"wrote {written} demonstrations to {out}")
                        + (f" ({missing} rows had none)" if missing else ""))
    except UserError as e:
        _fail(e)
    except OSError as e:
        _fail(_io_error(e))


def _lost_contact(err: RuntimeError) -> bool:
    """A collective failed because a peer is gone or silent (gloo and nccl say it in their own words)."""
    import torch.distributed as dist

    text = str(err)
    return isinstance(err, dist.DistError) or any(s in text for s in (
        "Connection closed by peer", "Connection reset by peer", "Broken pipe", "Timed out", "timed out", "NCCL"))


def _launch(nproc: int, argv: list[str] | None, config: Optional[Path], sets: Optional[list[str]]) -> None:
    """Re-run this train command as nproc processes (without --nproc) and exit with their exit code."""
    from grouprl.launch import launch

    if argv is None:  # called from Python rather than the command line
        raise UserError("--nproc needs the grouprl command line")
    args, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == "--nproc":
            skip = True
        elif not a.startswith("--nproc="):
            args.append(a)
    try:
        from grouprl.config import load_config

        timeout = load_config(config, list(sets or [])).distributed.timeout_s if config and config.is_file() else 600.0
    except UserError as e:
        _fail(e)
    code, line = launch(nproc, args, timeout)
    if line:
        _fail(UserError(line), code)
    raise typer.Exit(code)


@app.command("eval")
def eval_(
    model: str = typer.Option("embedded", "--model", "-m", help="Checkpoint folder, HF id, or 'embedded'."),
    config: Optional[Path] = ConfigOpt,
    set_: Optional[list[str]] = SetOpt,
    data: Optional[str] = typer.Option(None, help="Evaluate on this file/dataset instead of the held-out split."),
    k: Optional[int] = typer.Option(None, help="Samples per problem for pass@k / maj@k (default: eval.k)."),
    num: Optional[int] = typer.Option(None, help="Problems to evaluate (default: eval.num_problems)."),
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="JSON file for the metrics and samples."),
    baseline: Optional[Path] = typer.Option(None, help="An earlier eval JSON to show side by side (e.g. the base)."),
    trust_remote_code: bool = TrustOpt,
) -> None:
    """Strict-format rate, greedy accuracy, and pass@k / maj@k on held-out problems. --model may also be a
    run's output_dir: its latest complete checkpoint is evaluated."""
    try:
        import torch

        from grouprl.checkpoint import latest_checkpoint
        from grouprl.config import load_config
        from grouprl.evaluate import evaluate
        from grouprl.guard import reward_files
        from grouprl.models import load_for_inference
        from grouprl.tasks import build_task

        if k is not None and k < 1 or num is not None and num < 1:
            raise UserError(f"--k and --num must be at least 1 (got --k {k}, --num {num})")
        run_dir = Path(model)
        if (run_dir / "checkpoints").is_dir() or (run_dir / "final").is_dir():  # a run folder: its latest
            found = latest_checkpoint(run_dir)
            if found is None:
                raise UserError(f"--model {model!r} is a run folder without a complete checkpoint")
            model = str(found)
        before = None
        if baseline is not None:
            try:
                before = json.loads(baseline.read_text())
            except (OSError, ValueError, RecursionError):
                before = None
            if not (isinstance(before, dict) and isinstance(before.get("metrics"), dict) and "model" in before):
                raise UserError(f"baseline {str(baseline)!r}: expected a JSON file written by `grouprl eval -o`")
        if output is not None and output.is_dir():
            raise UserError(f"--output {str(output)!r} is a folder: expected a JSON file path")
        if output is not None:  # found before the evaluation, not after it
            output.parent.mkdir(parents=True, exist_ok=True)
            if not os.access(output.parent, os.W_OK):
                raise UserError(f"--output {str(output)!r}: its folder is not writable")
        ckpt_cfg = Path(model) / "grouprl.yaml"
        sets = list(set_ or []) + ([f"task.source={data}", f"task.eval_source={data}"] if data is not None else [])
        if config is None and ckpt_cfg.is_file():
            _inherited_config(Path(model), trust_remote_code)  # refuses remote code asked for by the folder
            cfg = load_config(ckpt_cfg, sets)
            named = [s for s in sets if s.replace(" ", "").startswith("eval.reward=")]
            if reward_files([cfg.eval.reward or ""]) and not named:
                raise UserError(f"{str(ckpt_cfg)!r} names reward code in eval.reward ({cfg.eval.reward!r}); code "
                                "named in a model folder runs only when the command line names it: pass --set "
                                f"eval.reward={cfg.eval.reward} to run it, or --set eval.reward=correctness for "
                                "the built-in one")
            named = [s for s in sets if s.replace(" ", "").startswith("env.name=")]
            if reward_files([cfg.env.name or ""]) and not named:
                raise UserError(f"{str(ckpt_cfg)!r} names environment code in env.name ({cfg.env.name!r}); code "
                                "named in a model folder runs only when the command line names it: pass --set "
                                f"env.name={cfg.env.name} to run it, or --set env.name=null for single turns")
        else:
            cfg = load_config(config, sets)
        cfg.model.trust_remote_code = cfg.model.trust_remote_code or trust_remote_code
        if data is not None and cfg.task.name in ("arithmetic", "countdown"):
            cfg.task.name = "gsm8k"  # a data file to evaluate on holds GSM8K-format rows
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        task = build_task(cfg.task)
        rows = task.eval[: num or cfg.eval.num_problems]
        net, tok = load_for_inference(model, cfg.model)
        env = None
        if cfg.env.name:  # episodes, as the run trained them
            from grouprl.episodes import setup

            env, task = setup(cfg.env, tok, task)
        torch.manual_seed(cfg.seed)
        metrics, samples = evaluate(
            net, tok, task, rows, prefill=cfg.task.prefill,
            max_new_tokens=cfg.eval.max_new_tokens or cfg.rollout.max_new_tokens, k=k or cfg.eval.k,
            temperature=cfg.eval.temperature, batch_size=cfg.eval.batch_size, correctness=cfg.eval.reward, env=env,
        )
    except UserError as e:
        _fail(e)
        return
    except OSError as e:
        _fail(_io_error(e))
        return
    table = Table(title=escape(f"eval of {model} on {len(rows)} held-out {cfg.task.name} problems"))
    table.add_column("metric")
    if before is not None:
        table.add_column(escape(str(before["model"])), justify="right")
    table.add_column(escape(model), justify="right")
    for key, v in metrics.items():
        cells = [f"{v:.3f}" if isinstance(v, float) else str(v)]
        if before is not None:
            b = before["metrics"].get(key, "")
            cells.insert(0, f"{b:.3f}" if isinstance(b, float) else escape(str(b)))
        table.add_row(escape(key), *cells)
    Console().print(table)
    if output is not None:
        try:
            output.write_text(json.dumps({"model": model, "metrics": metrics, "samples": samples}, indent=1))
        except OSError as e:
            e.filename = e.filename or str(output)  # a failed write (a full disk) does not say which file
            _fail(_io_error(e))


@app.command()
def compare(
    config: Optional[Path] = ConfigOpt,
    set_: Optional[list[str]] = SetOpt,
    run: Optional[list[str]] = typer.Option(
        None, "--run", "-r", help="A run: a preset (grpo, ppo, ppo-head, ppo-adapter, dr-grpo, dapo, gspo, rank, "
        "rloo) or "
        "'name:key=value key=value' (repeatable; default: grpo and ppo)."),
    out: Path = typer.Option(Path("runs/compare"), "--out", "-o", help="Report folder (runs go in OUT/runs/)."),
    eval_num: int = typer.Option(100, help="Held-out problems per evaluation."),
    save_every: int = typer.Option(5, help="Checkpoint every N steps (resume points, equal-time evaluations)."),
    seeds: Optional[str] = typer.Option(
        None, "--seeds", help="Train every arm once per seed, e.g. 0,1,2: the report gives means, 95% intervals "
        "and paired tests against the first arm (default: the config's seed)."),
    nproc: int = typer.Option(1, "--nproc", min=1, help="Run each arm as a torchrun job of N processes "
                              "(one per GPU; gloo on the CPU)."),
) -> None:
    """Train GRPO, PPO and variants side by side, each in its own process, and write a report (markdown, JSON,
    plots, HTML). Run it again to continue an interrupted comparison."""
    try:
        from grouprl.compare import compare as run_compare

        if eval_num < 1 or save_every < 1:
            raise UserError("--eval-num and --save-every must be at least 1")
        try:
            seed_list = [int(x) for x in seeds.split(",")] if seeds is not None else None
        except ValueError:
            raise UserError(f"--seeds {seeds!r}: expected integers separated by commas, e.g. 0,1,2") from None
        run_compare(config, list(set_ or []), list(run or ["grpo", "ppo"]), out, eval_num=eval_num,
                    save_every=save_every, seeds=seed_list, nproc=nproc)
        print(out / "index.html")
    except UserError as e:
        _fail(e)
    except OSError as e:
        _fail(_io_error(e))
    except KeyboardInterrupt:
        _ignore_stop_signals()
        _fail(UserError(f"stopped; the run in progress saved a checkpoint: run the same compare again to continue "
                        f"({out})"), 130)


@app.command()
def plot(
    run_dir: Path = typer.Argument(..., help="A run's output_dir (holding metrics.jsonl)."),
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="PNG path (default: RUN_DIR/rewards.png)."),
    versus: Optional[list[Path]] = typer.Option(None, "--versus", help="Other runs to draw beside it (repeatable): "
                                                "their total reward and each reward function on the same axes."),
) -> None:
    """Plot the reward curve of a run to a PNG (with --versus, several runs' curves on one figure)."""
    try:
        from grouprl.plots import plot_rewards

        for d in [run_dir, *(versus or [])]:
            if not (d / "metrics.jsonl").is_file():
                raise UserError(f"{str(d)!r} has no metrics.jsonl: expected a run's output_dir")
        output = output or run_dir / "rewards.png"
        if output.suffix.lower() not in (".png", ".pdf", ".svg") or output.is_dir():
            raise UserError(f"--output {str(output)!r}: expected a .png, .pdf or .svg file path")
        print(plot_rewards(run_dir, output, others=list(versus or [])))
    except UserError as e:
        _fail(e)
    except OSError as e:
        _fail(_io_error(e))


@app.command()
def rewards() -> None:
    """List the built-in reward functions."""
    from grouprl.rewards import BUILTIN

    for name, fn in BUILTIN.items():
        doc = (fn.__doc__ or "").strip().splitlines()[0]
        print(f"{name:15s} {doc}")


@model_app.command("import")
def model_import(force: bool = typer.Option(False, help="Re-import even if the cache exists.")) -> None:
    """Import the embedded SmolLM2-135M-Instruct GGUF into the safetensors cache; print its folder."""
    try:
        from grouprl.models import import_embedded

        print(import_embedded(force=force))
    except UserError as e:
        _fail(e)
    except OSError as e:  # the cache folder (GROUPRL_CACHE) cannot be written
        _fail(_io_error(e))


def main() -> None:  # pragma: no cover
    sys.exit(app())
