"""The docs stay honest: every relative link in README.md and docs/ resolves (anchors included), every
command they give exists with the options they give it, the config reference equals the code, and the
README's quick start runs as written (on the tiny model)."""

from __future__ import annotations

import ast
import re
import shlex
import shutil
from pathlib import Path

import pytest
import typer.main
from typer.testing import CliRunner

from grouprl.cli import app
from grouprl.config import load_config
from grouprl.errors import UserError
from grouprl.reference import reference_markdown, slug

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.S | re.M)
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")
runner = CliRunner()


def prose(text: str) -> str:
    """The text without fenced code blocks and inline code, where a bracket is not a link."""
    return re.sub(r"`[^`\n]*`", "", FENCE.sub("", text))


def anchors(page: Path) -> set[str]:
    text = FENCE.sub("", page.read_text())
    return {slug(re.sub(r"[`*]", "", h)) for h in re.findall(r"^#+ (.+)$", text, re.M)}


def test_the_pages_are_found():
    names = {p.relative_to(ROOT).as_posix() for p in PAGES}
    assert {"README.md", "docs/README.md", "docs/usage.md", "docs/config.md", "docs/results.md"} <= names


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_every_relative_link_resolves(page):
    broken = []
    for target in LINK.findall(prose(page.read_text())):
        if re.match(r"[a-z]+:", target):  # https:, mailto:
            continue
        path, _, anchor = target.partition("#")
        file = (page.parent / path).resolve() if path else page
        if not file.exists():
            broken.append(f"{target}: no such file")
        elif anchor and file.suffix == ".md" and anchor not in anchors(file):
            broken.append(f"{target}: no heading with that anchor")
    assert not broken, broken


def commands(pages: list[Path]) -> list[tuple[Path, list[str], str | None]]:
    """Every command line the pages' code shows, in fenced blocks and inline code, joined across `\\`, with
    the error it is shown to print (a `$ command` line followed by an `error: ...` line), if any."""
    found = []
    for page in pages:
        text = page.read_text()
        chunks = [body for lang, body in FENCE.findall(text) if lang in ("", "bash", "sh")]
        chunks += re.findall(r"`([^`\n]+)`", FENCE.sub("", text))
        for chunk in chunks:
            lines = [line.strip() for line in chunk.replace("\\\n", " ").splitlines()] + [""]
            for line, after in zip(lines, lines[1:]):
                line = line.removeprefix("$ ")
                if re.match(r"(grouprl|python|bash) ", line):
                    error = after.removeprefix("error: ") if after.startswith("error: ") else None
                    found.append((page, shlex.split(line, comments=True), error))
    return found


GROUP = typer.main.get_command(app)  # typer's own click: a group is what has .commands


def subcommand(words: list[str]) -> tuple[list[str], object]:
    """The words naming a grouprl subcommand ('train', 'model import') and the click command they name."""
    names, command = [], GROUP
    for word in words:
        if word not in getattr(command, "commands", {}):
            break
        names.append(word)
        command = command.commands[word]
    return names, command


def test_every_grouprl_command_the_docs_give_exists_with_its_options():
    problems, seen = [], set()
    for page, argv, error in commands(PAGES):
        if argv[0] != "grouprl":
            continue
        names, command = subcommand(argv[1:])
        where = f"{page.relative_to(ROOT)}: {shlex.join(argv)}"
        if not names or hasattr(command, "commands"):
            problems.append(f"{where}: names no command")
            continue
        options = {"--help"} | {opt for param in command.params for opt in param.opts + param.secondary_opts}
        problems += [f"{where}: {word} is not an option of {' '.join(names)}"
                     for word in argv[1 + len(names):] if word.startswith("-") and word.split("=")[0] not in options]
        seen.add(tuple(names))
        if names[0] in ("train", "compare") and "--resume" not in argv:
            sets = [argv[i + 1] for i, word in enumerate(argv[:-1]) if word in ("--set", "-s")]
            config = next((argv[i + 1] for i, word in enumerate(argv[:-1]) if word in ("--config", "-c")), None)
            if config is None or (ROOT / config).exists():  # the quick start's own file is checked below
                try:
                    load_config(ROOT / config if config else None, sets)
                    if error is not None:
                        problems.append(f"{where}: is shown to fail ({error}) but is a valid config")
                except UserError as e:
                    if str(e) != error:
                        problems.append(f"{where}: prints {e}, not what the page shows ({error})")
    assert not problems, problems
    for names in seen:  # --help of each subcommand the docs name runs
        result = runner.invoke(app, [*names, "--help"])
        assert result.exit_code == 0, (names, result.output)
    assert {("train",), ("eval",), ("compare",)} <= seen


def script_options(path: Path) -> set[str]:
    """The --options a benchmark script declares to argparse (read from its source, not run)."""
    return {arg.value for node in ast.walk(ast.parse(path.read_text())) if isinstance(node, ast.Call)
            and getattr(node.func, "attr", None) == "add_argument"
            for arg in node.args if isinstance(arg, ast.Constant) and str(arg.value).startswith("-")}


def test_every_script_the_docs_give_exists_with_its_options():
    problems = []
    for page, argv, _ in commands(PAGES):
        if argv[0] == "grouprl" or argv[1] == "-m":
            continue
        script = ROOT / argv[1]
        where = f"{page.relative_to(ROOT)}: {shlex.join(argv)}"
        if not script.is_file():
            problems.append(f"{where}: no such file")
        elif script.suffix == ".py":
            declared = script_options(script)
            problems += [f"{where}: {word} is not an option of {argv[1]}"
                         for word in argv[2:] if word.startswith("--") and word.split("=")[0] not in declared]
    assert not problems, problems


def test_the_config_reference_is_current():
    assert (ROOT / "docs" / "config.md").read_text() == reference_markdown(), \
        "docs/config.md is out of date: python -m grouprl.reference > docs/config.md"


def quick_start() -> str:
    text = (ROOT / "README.md").read_text()
    return text.split("## Quick start", 1)[1].split("\n## ", 1)[0]


def test_the_readme_quick_start_runs_as_written(tiny_model, tmp_path, monkeypatch):
    """The quick start's files are examples/quickstart/'s, and its commands run in a copy of that folder; only
    the model (the tiny one) and the run's length are changed, on the command line."""
    section = quick_start()
    blocks = FENCE.findall(section)
    example = ROOT / "examples" / "quickstart"
    shown = {body.split("\n")[0].removeprefix("# ").strip(): body for lang, body in blocks
             if lang in ("python", "yaml") and body.startswith("# ")}
    assert set(shown) == {"my_reward.py", "my_task.yaml"}
    for name, body in shown.items():
        assert (example / name).read_text() == body, f"README's {name} differs from examples/quickstart/{name}"
    rows = next(body for lang, body in blocks if lang == "jsonl")
    assert (example / "my_data.jsonl").read_text().startswith(rows)
    shutil.copytree(example, tmp_path / "quickstart")
    monkeypatch.chdir(tmp_path / "quickstart")
    small = ["--set", f"model.name_or_path={tiny_model}", "--set", "steps=2", "--set", "rollout.max_new_tokens=4"]
    ran = []
    lines = [line for lang, body in blocks if lang == "bash" for line in body.splitlines()]
    assert any(line.startswith("cd examples/quickstart") for line in lines)
    for argv in [shlex.split(line, comments=True) for line in lines if line.startswith("grouprl ")]:
        result = runner.invoke(app, argv[1:] + (small if argv[1] == "train" else []))
        assert result.exit_code == 0, (argv, result.output)
        ran.append(argv[1])
    assert ran == ["train", "eval", "plot"], ran
    run = tmp_path / "quickstart" / "runs" / "my-task"
    assert (run / "final").is_dir() and (run / "rewards.png").is_file()
    logged = (run / "metrics.jsonl").read_text()
    assert '"reward/my_reward.py:brief"' in logged and '"reward/correctness"' in logged
