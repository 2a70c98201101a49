"""Environments: what answers the model between its turns, for episodes of several turns.

An environment is a class; one instance serves one episode. Subclass `Environment` and override what you
need (all optional):

    reset(row) -> str | None   the episode starts from a data row (its prompt and every other column); a
                               string returned replaces the row's prompt as the user's message
    step(text) -> Reply | str | None
                               environments that answer in text (a game, a simulated user): called with
                               each model turn that makes no tool call; a string is the user's reply, None
                               (or Reply(done=True)) ends the episode
    reward() -> float | None   the outcome reward, asked once the episode is over (added to the reward
                               functions' weighted sum, as the 'env' column)
    demonstrate(row) -> list[dict] | None
                               a worked episode for the row, for a supervised warm-up (`grouprl demos`):
                               the assistant's and the environment's messages after the prompt (assistant
                               messages may carry tool_calls); None when it has none for this row

Every other public method is a tool the model can call: a plain method with type hints and a Google-style
docstring (its JSON schema comes from transformers' `get_json_schema`) that returns what the model should
read (turned into text with str()). A single-turn task has no environment: its episodes end after one turn.

Built-in environments are chosen by name (`env.name: calculator`); your own by 'path/to/file.py:Class'.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Callable

from grouprl.errors import UserError
from grouprl.userfile import load_attribute


@dataclass
class Reply:
    """An environment's answer to a model turn that called no tool."""
    text: str | None = None  # the user's message back; None ends the episode
    reward: float = 0.0  # this turn's reward: kept per turn, and on the turn's last token for PPO
    done: bool = False  # end the episode after this reply (the reply, if any, is not shown)


class Environment:
    """Base class of an environment (see the module's docstring)."""

    def reset(self, row: dict) -> str | None:
        return None

    def step(self, text: str) -> Reply | str | None:
        return None

    def reward(self) -> float | None:
        return None

    def demonstrate(self, row: dict) -> list[dict] | None:
        return None


INTERFACE = frozenset(n for n in vars(Environment) if not n.startswith("_"))


def tools_of(env: object) -> dict[str, Callable]:
    """The tools of an environment instance: its public methods outside the interface, by name."""
    return {n: getattr(env, n) for n in dir(type(env))
            if not n.startswith("_") and n not in INTERFACE and inspect.isfunction(getattr(type(env), n, None))}


def schemas(env_name: str, tools: dict[str, Callable]) -> list[dict]:
    """The tools' JSON schemas, for the chat template; a tool without type hints or a docstring is named."""
    from transformers.utils import get_json_schema

    out = []
    for name, fn in tools.items():
        try:
            out.append(get_json_schema(fn))
        except Exception as e:  # TypeHintParsingException, DocstringParsingException
            raise UserError(f"environment {env_name!r}: tool {name!r} cannot be described to the model "
                            f"({str(e).splitlines()[0]}): expected type hints on every argument and a docstring "
                            "with an Args: line for each") from None
    return out


BUILTIN = {
    "calculator": "grouprl.envs.calculator:Calculator",
    "guess": "grouprl.envs.guess:GuessNumber",
}


def load_env(name: str) -> type:
    """An environment class: a built-in by name or 'path/to/file.py:Class'."""
    if name in BUILTIN:
        module, attr = BUILTIN[name].split(":")
        return getattr(__import__(module, fromlist=[attr]), attr)
    path, sep, attr = name.rpartition(":")
    if not sep or not path.endswith(".py"):
        raise UserError(f"env.name={name!r}: expected one of {', '.join(sorted(BUILTIN))} or "
                        "'path/to/file.py:Class'")
    cls = load_attribute(path, attr, "environment", name)
    if cls is None:
        raise UserError(f"environment file {path!r} has no class {attr!r}")
    if not isinstance(cls, type):
        raise UserError(f"environment {name!r} is a {type(cls).__name__}: expected a class (one instance serves "
                        "one episode)")
    return cls
