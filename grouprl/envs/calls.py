"""Tool calls in the model's text, and running them. Calls take the Hermes form (Qwen's and most tool
templates' default):

    <tool_call>
    {"name": "calculate", "arguments": {"expression": "3 * 4"}}
    </tool_call>

unless the model's chat template renders tools itself and its tokenizer has a response template, which
transformers' `parse_response` reads (the model's own call format, whatever it is): `parse_with_template`.

Nothing the model writes can crash the episode: a malformed call, an unknown tool, arguments that do not
fit the tool, a tool that raises and a tool past its time limit each become a tool message the model reads
(starting 'error:') and are counted by kind (ERRORS).
"""

from __future__ import annotations

import inspect
import json
import re
from dataclasses import dataclass
from typing import Callable

from grouprl.limits import time_limit

OPEN, CLOSE = "<tool_call>", "</tool_call>"
CALL = re.compile(re.escape(OPEN) + r"(.*?)" + re.escape(CLOSE), re.S)
ERRORS = ("malformed", "unknown_tool", "bad_arguments", "tool_raised", "timeout")
MAX_RESULT_CHARS = 100_000  # a result's text before it is tokenized (and cut to env.max_reply_tokens)


@dataclass
class Call:
    name: str | None  # None: malformed
    arguments: dict
    error: str | None = None  # why it is malformed


def parse_calls(text: str) -> list[Call]:
    """The calls in a model turn, in order. An opening tag never closed, or a closing tag never opened, counts
    as one malformed call."""
    calls = []
    for body in CALL.findall(text):
        try:
            obj = json.loads(body)
        except json.JSONDecodeError as e:
            calls.append(Call(None, {}, f"not JSON ({e.msg})"))
            continue
        if not (isinstance(obj, dict) and isinstance(obj.get("name"), str)
                and isinstance(obj.get("arguments", {}), dict)):
            calls.append(Call(None, {}, 'expected {"name": <tool>, "arguments": {...}}'))
            continue
        calls.append(Call(obj["name"], obj.get("arguments", {})))
    if text.rfind(OPEN) > text.rfind(CLOSE):
        calls.append(Call(None, {}, f"{OPEN} without {CLOSE}"))
    if text.count(CLOSE) > len(CALL.findall(text)):
        calls.append(Call(None, {}, f"{CLOSE} without {OPEN}"))
    return calls


def parse_with_template(text: str, tokenizer, tools: list[dict]) -> list[Call]:
    """The calls in a model turn, read by the tokenizer's response template (transformers' parse_response).
    Text it cannot read is one malformed call."""
    try:
        message = tokenizer.parse_response(text, prefix="", tools=tools)
        calls = message.get("tool_calls") or []
        out = []
        for c in calls:
            f = c.get("function", c) if isinstance(c, dict) else None
            if not (isinstance(f, dict) and isinstance(f.get("name"), str)
                    and isinstance(f.get("arguments", {}), dict)):
                out.append(Call(None, {}, 'expected {"name": <tool>, "arguments": {...}}'))
            else:
                out.append(Call(f["name"], f.get("arguments", {})))
        return out
    except Exception as e:
        lines = str(e).splitlines()
        return [Call(None, {}, f"the template's parser could not read it ({lines[0] if lines else type(e).__name__})")]


def run_call(call: Call, tools: dict[str, Callable], timeout_s: float) -> tuple[str, str | None]:
    """(the text the model reads, the error kind or None)."""
    if call.name is None:
        return (f'error: malformed tool call: {call.error}; write {OPEN}{{"name": <tool>, "arguments": '
                f"{{...}}}}{CLOSE}", "malformed")
    fn = tools.get(call.name)
    if fn is None:
        return f"error: unknown tool {call.name!r}: the tools are {', '.join(sorted(tools))}", "unknown_tool"
    try:
        inspect.signature(fn).bind(**call.arguments)
    except TypeError as e:
        return f"error: bad arguments for {call.name}: {e}", "bad_arguments"
    try:
        with time_limit(timeout_s) as limit:
            result = fn(**call.arguments)
    except Exception as e:
        return f"error: {call.name} raised {type(e).__name__}: {str(e)[:200]}", "tool_raised"
    if limit.expired:
        return f"error: {call.name} took longer than {timeout_s:g}s", "timeout"
    try:
        text = str(result)
    except Exception as e:
        return f"error: {call.name} returned a value that has no text ({type(e).__name__})", "tool_raised"
    return text[:MAX_RESULT_CHARS], None
