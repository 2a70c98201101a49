"""Reward functions and their weighted combination.

A reward function is a plain callable `(prompts, completions, **columns) -> list[float]`: prompts are the
texts the model saw (chat template applied, prefill included), completions the sampled texts (prefill
included), and columns the task's other columns (e.g. `answer`), one value per completion.

    >>> strict_format(["q"], ["<reasoning>\\n2 + 2 = 4\\n</reasoning>\\n<answer>\\n4\\n</answer>"])
    [1.0]

User functions are named 'path/to/file.py:function'; a learned reward model (a sequence-classification
checkpoint with one output) is named 'rm:<folder or HF id>'. Every call is checked at this boundary: an
exception, a wrong length, or a value that is not a finite number stops the run with one line naming the
function.
"""

from __future__ import annotations

import importlib.util
import math
import re
from pathlib import Path
from typing import Any, Callable

import torch

from grouprl.errors import UserError
from grouprl.tasks.countdown import check as countdown_check

RewardFn = Callable[..., list[float]]

STRICT = re.compile(r"^<reasoning>\n(.+?)\n</reasoning>\n<answer>\n(.+?)\n</answer>\s*$", re.DOTALL)
SOFT = re.compile(r"<reasoning>(.+?)</reasoning>\s*<answer>(.+?)</answer>", re.DOTALL)
ANSWER = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)
NUMBER = re.compile(r"^-?\d+(?:,\d{3})*(?:\.\d+)?$")


def extract_answer(completion: str) -> str | None:
    """Text of the last <answer>...</answer>, stripped; None when there is none."""
    found = ANSWER.findall(completion)
    return found[-1].strip() if found else None


def _says_something(body: str) -> bool:
    return bool(body.strip(". \n\t"))


def _real_reasoning(body: str, prompt: str) -> bool:
    """A reasoning earns format credit only if it says something and is not copied from the prompt
    (placeholder text such as '...' or 'your working', or the reasoning of an example shown there).
    Answers are not checked against the prompt: a right answer may well equal the example's."""
    body = body.strip()
    return _says_something(body) and f"<reasoning>\n{body}\n</reasoning>" not in prompt \
        and f"<reasoning>{body}</reasoning>" not in prompt


def _real_answer(body: str, prompt: str) -> bool:
    """An answer earns format credit if it says something and is not placeholder text copied from the
    prompt's layout; a number may equal the example's number by right (11 is 11)."""
    body = body.strip()
    copied = f"<answer>\n{body}\n</answer>" in prompt or f"<answer>{body}</answer>" in prompt
    return _says_something(body) and (not copied or _as_number(body) is not None)


def _layout_matches(pattern: re.Pattern, prompt: str, completion: str) -> float:
    m = pattern.search(completion)
    return float(bool(m) and _real_reasoning(m.group(1), prompt) and _real_answer(m.group(2), prompt))


def strict_format(prompts: list[str], completions: list[str], **_: Any) -> list[float]:
    """1.0 when the whole completion is exactly '<reasoning>\\n...\\n</reasoning>\\n<answer>\\n...\\n</answer>'
    (trailing whitespace allowed) with real, non-copied content in both tags; else 0.0."""
    return [_layout_matches(STRICT, p, c) for p, c in zip(prompts, completions)]


def soft_format(prompts: list[str], completions: list[str], **_: Any) -> list[float]:
    """1.0 when <reasoning>...</reasoning> then <answer>...</answer> appear in that order, any whitespace."""
    return [_layout_matches(SOFT, p, c) for p, c in zip(prompts, completions)]


def tag_count(prompts: list[str], completions: list[str], **_: Any) -> list[float]:
    """Partial credit, 0.25 for each of the four tags present exactly once with its newlines
    ('<reasoning>\\n', '\\n</reasoning>\\n', '\\n<answer>\\n', '\\n</answer>'), minus 0.001 per character
    after '</answer>' (text the format does not allow). At most 1.0. A closed reasoning that is empty or
    copied from the prompt voids the credit: the tags must hold the model's own work."""
    out = []
    for p, c in zip(prompts, completions):
        closed = re.search(r"<reasoning>(.*?)</reasoning>", c, re.DOTALL)
        if closed and not _real_reasoning(closed.group(1), p):
            out.append(0.0)
            continue
        score = sum(0.25 for tag in ("<reasoning>\n", "\n</reasoning>\n", "\n<answer>\n", "\n</answer>")
                    if c.count(tag) == 1)
        if c.count("</answer>") == 1:
            score -= 0.001 * len(c.split("</answer>")[1].strip())
        out.append(score)
    return out


def _as_number(text: str) -> float | None:
    text = text.strip().rstrip(".").replace("$", "")
    return float(text.replace(",", "")) if NUMBER.match(text) else None


def answers_match(predicted: str, reference: str) -> bool:
    """Numeric equality when both are plain numbers; otherwise symbolic equivalence by math-verify."""
    a, b = _as_number(predicted), _as_number(reference)
    if a is not None and b is not None:
        return math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-9)
    from math_verify import parse, verify

    try:
        gold = parse(reference if "$" in reference else f"${reference}$")
        pred = parse(predicted if "$" in predicted else f"${predicted}$")
        return bool(gold) and bool(pred) and bool(verify(gold, pred))
    except Exception:  # math-verify parses free text; anything it cannot handle is simply not a match
        return False


def correctness(prompts: list[str], completions: list[str], answer: list[str], **_: Any) -> list[float]:
    """1.0 when the text inside <answer> equals the reference `answer` (numerically or symbolically)."""
    out = []
    for c, ref in zip(completions, answer):
        pred = extract_answer(c)
        out.append(float(pred is not None and pred != "" and answers_match(pred, str(ref))))
    return out


LAST_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")


def last_number(completion: str) -> str | None:
    """The last number written anywhere in the completion (commas removed), or None."""
    found = LAST_NUMBER.findall(completion.replace(",", ""))
    return found[-1] if found else None


def answer_anywhere(prompts: list[str], completions: list[str], answer: list[str], **_: Any) -> list[float]:
    """1.0 when the last number anywhere in the completion equals the reference, tags or not.

    A denser correctness signal than `correctness` while the format is still being learned: a base
    model that computes the right result but has not learned the tags yet is still rewarded for it."""
    return [float((n := last_number(c)) is not None and answers_match(n, str(ref)))
            for c, ref in zip(completions, answer)]


def number(prompts: list[str], completions: list[str], **_: Any) -> list[float]:
    """1.0 when the text inside <answer> is a bare number (the answer form asked for), else 0.0."""
    return [float((a := extract_answer(c)) is not None and _as_number(a) is not None) for c in completions]


def countdown(
    prompts: list[str], completions: list[str], numbers: list[list[int]], target: list[int], **_: Any
) -> list[float]:
    """1.0 when the expression inside <answer> equals `target` using only `numbers`, each at most once."""
    out = []
    for c, nums, t in zip(completions, numbers, target):
        expr = extract_answer(c)
        out.append(float(expr is not None and countdown_check(expr.split("=")[0], list(nums), int(t))))
    return out


BUILTIN: dict[str, RewardFn] = {
    "strict_format": strict_format,
    "soft_format": soft_format,
    "tag_count": tag_count,
    "correctness": correctness,
    "answer_anywhere": answer_anywhere,
    "number": number,
    "countdown": countdown,
}


class RewardModel:
    """A learned reward model as a reward function: `AutoModelForSequenceClassification` with num_labels = 1,
    scoring each prompt + completion text (the prompt as the policy saw it, chat template included), in
    batches, without gradients. Its score is the output at the last non-padding token."""

    def __init__(self, name_or_path: str, batch_size: int = 16):
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        from grouprl.models import pick_device, pick_dtype, resolve_model_path

        path = resolve_model_path(name_or_path)
        self.device = pick_device("auto")
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(path)
            self.model = AutoModelForSequenceClassification.from_pretrained(
                path, dtype=pick_dtype("auto", self.device)).to(self.device).eval()
        except (OSError, ValueError) as e:
            raise UserError(f"cannot load reward model {name_or_path!r}: {str(e).splitlines()[0]}") from None
        if self.model.config.num_labels != 1:
            raise UserError(f"reward model {name_or_path!r} has {self.model.config.num_labels} outputs: expected "
                            "a sequence-classification model with num_labels = 1 (one scalar score)")
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.tokenizer.padding_side = "right"
        self.model.config.pad_token_id = self.tokenizer.pad_token_id  # how HF finds the last real token
        self.batch_size = batch_size
        limits = (self.tokenizer.model_max_length, getattr(self.model.config, "max_position_embeddings", None))
        self.max_length = min((n for n in limits if isinstance(n, int) and 0 < n < 1_000_000), default=None)

    @torch.no_grad()
    def __call__(self, prompts: list[str], completions: list[str], **_: Any) -> list[float]:
        texts = [p + c for p, c in zip(prompts, completions)]
        scores: list[float] = []
        for i in range(0, len(texts), self.batch_size):
            enc = self.tokenizer(texts[i:i + self.batch_size], return_tensors="pt", padding=True,
                                 truncation=self.max_length is not None, max_length=self.max_length,
                                 add_special_tokens=False).to(self.device)  # the prompt carries its own specials
            scores += self.model(**enc).logits[:, 0].float().tolist()
        return scores


def load_reward(name: str) -> RewardFn:
    """A built-in by name, 'rm:<model>' (a learned reward model), or 'path/to/file.py:function'."""
    if name in BUILTIN:
        return BUILTIN[name]
    if name.startswith("rm:"):
        return RewardModel(name.removeprefix("rm:"))
    path, sep, func = name.rpartition(":")
    if not sep or not path.endswith(".py"):
        raise UserError(f"reward {name!r}: expected one of {sorted(BUILTIN)}, 'rm:<reward model>' or "
                        "'path/to/file.py:function'")
    file = Path(path).expanduser()
    if not file.is_file():
        raise UserError(f"reward file {path!r} not found (from reward {name!r})")
    spec = importlib.util.spec_from_file_location(f"grouprl_user_reward_{file.stem}", file)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except Exception as e:
        raise UserError(f"reward file {path!r} failed to import: {type(e).__name__}: {e}") from None
    fn = getattr(module, func, None)
    if not callable(fn):
        raise UserError(f"reward file {path!r} has no function {func!r}")
    return fn


def call_reward(name: str, fn: RewardFn, prompts: list[str], completions: list[str], columns: dict) -> list[float]:
    """Call one reward function and check what it returns. Raises UserError naming the function."""
    try:
        values = fn(prompts=prompts, completions=completions, **columns)
    except Exception as e:
        raise UserError(f"reward function {name!r} raised {type(e).__name__}: {e}") from None
    try:
        values = [float(v) for v in values]
    except (TypeError, ValueError):
        raise UserError(f"reward function {name!r} must return a list of floats, got {type(values).__name__}") from None
    if len(values) != len(completions):
        raise UserError(f"reward function {name!r} returned {len(values)} values for {len(completions)} completions")
    bad = [i for i, v in enumerate(values) if not math.isfinite(v)]
    if bad:
        raise UserError(f"reward function {name!r} returned a non-finite value ({values[bad[0]]}) at index {bad[0]}")
    return values


class RewardSet:
    """The configured reward functions with their weights."""

    def __init__(self, specs: list[tuple[str, float]]):
        self.names = [n for n, _ in specs]
        self.weights = torch.tensor([w for _, w in specs], dtype=torch.float32)
        self.fns = [load_reward(n) for n in self.names]

    def score(self, prompts: list[str], completions: list[str], columns: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns (per-function rewards (N, K), weighted total (N,))."""
        per_fn = torch.tensor(
            [call_reward(n, f, prompts, completions, columns) for n, f in zip(self.names, self.fns)],
            dtype=torch.float32,
        ).T.reshape(len(completions), len(self.fns))
        return per_fn, per_fn @ self.weights
