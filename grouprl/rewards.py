"""Reward functions and their weighted combination.

A reward function is a plain callable `(prompts, completions, **columns) -> list[float]`: prompts are the
texts the model saw (chat template applied, prefill included), completions the sampled texts (prefill
included), and columns the task's other columns (e.g. `answer`), one value per completion.

    >>> strict_format(["q"], ["<reasoning>\\n2 + 2 = 4\\n</reasoning>\\n<answer>\\n4\\n</answer>"])
    [1.0]

User functions are named 'path/to/file.py:function'; a learned reward model (a sequence-classification
checkpoint with one output) is named 'rm:<folder or HF id>'; a verl-style scorer
`compute_score(data_source, solution_str, ground_truth, extra_info)` is named 'verl:path/to/file.py:function'.
A function may also take `completion_ids` (the sampled token ids of each completion, EOS included; the
prefill belongs to the prompt). `async def` functions are awaited concurrently with each other (and with
the synchronous ones, on an event loop of their own); with `workers` > 0 the synchronous ones run in a pool
of that many processes, each function's batch cut into that many slices. Every call is checked at this
boundary: an exception or exit, a call over its time limit, a wrong length, or a value that is not a finite
number stops the run with one line naming the function.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import copy
import functools
import inspect
import itertools
import math
import multiprocessing
import threading
import numbers
import os
import re
import reprlib
import signal
from collections.abc import Iterable, Mapping, Set, Sized
from typing import Any, Callable

import torch

from grouprl import limits
from grouprl.errors import StopNow, UserError
from grouprl.guard import die_with_parent
from grouprl.limits import Timeout, time_limit, watchdog
from grouprl.tasks.countdown import check as countdown_check
from grouprl.userfile import load_attribute

RewardFn = Callable[..., list[float]]

STRICT = re.compile(r"^<reasoning>\n(.+?)\n</reasoning>\n<answer>\n(.+?)\n</answer>\s*$", re.DOTALL)
SOFT = re.compile(r"<reasoning>(.+?)</reasoning>\s*<answer>(.+?)</answer>", re.DOTALL)
ANSWER = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)
NUMBER = re.compile(r"^-?\d+(?:,\d{3})*(?:\.\d+)?$")
TAG_BODY = re.compile(r"<(answer|reasoning)>(.*?)</\1>", re.DOTALL)
# Texts that system prompts have shown as placeholders (compared as `_norm` writes them): never the model's own
# answer or reasoning, whatever the prompt. A model trained on the old prompt answered "the final number".
PLACEHOLDERS = frozenset({"thefinalnumber", "finalnumber", "thenumber", "youranswer", "yourfinalanswer",
                          "finalanswer", "theanswer", "answer", "yourworking", "yourreasoning", "working",
                          "reasoning"})

# Bounds on the symbolic comparison in answers_match. sympy may spend minutes on an answer such as
# 9^{9^{9^9}} while a real final answer compares in milliseconds; a bounded comparison counts as no match.
ANSWER_TIME_S = 1.0  # both parses and the verify together
ANSWER_MAX_CHARS = 1000  # real final answers are short, and parsing time grows with length
# Refused before math-verify sees them: a power tower of numbers (9^{9^9}, 9**9**9) or an exponent or factorial
# of 6+ digits. CPython computes 9^(10^7) in C for seconds (10^7! likewise), where no alarm can stop it, and
# outside the main thread there is no alarm at all.
COSTLY = re.compile(r"\d\s*(\^|\*\*)\s*[{(]?\s*\d+\s*(\^|\*\*)|(\^|\*\*)\s*[{(]?\s*\d{6,}|\d{6,}\s*!")


def extract_answer(completion: str) -> str | None:
    """Text of the last <answer>...</answer>, stripped; None when there is none."""
    found = ANSWER.findall(completion)
    return found[-1].strip() if found else None


def _says_something(body: str) -> bool:
    return bool(body.strip(". \n\t"))


def _norm(text: str) -> str:
    """Text as copies are compared: no whitespace at all, case-folded, no punctuation around it, so that
    'The final number.' and 'the final\nnumber' count as the same words."""
    return "".join(text.split()).casefold().strip(".,;:!?'\"`<>[]()")


@functools.lru_cache(maxsize=256)
def _prompt_bodies(prompt: str) -> frozenset[str]:
    """`_norm` of every <answer> and <reasoning> body shown in the prompt (placeholders, worked examples).
    Cached: the G completions of a group share one prompt."""
    return frozenset(_norm(m.group(2)) for m in TAG_BODY.finditer(prompt))


def _own_text(body: str, prompt: str) -> bool:
    """Says something, is no known placeholder, and is not the body of a tag shown in the prompt."""
    key = _norm(body)
    return _says_something(body) and key not in PLACEHOLDERS and key not in _prompt_bodies(prompt)


def _real_reasoning(body: str, prompt: str) -> bool:
    """A reasoning earns format credit only if it is the model's own (see `_own_text`): not '...', not
    'your working', not the reasoning of an example shown in the prompt."""
    return _own_text(body, prompt)


def _real_answer(body: str, prompt: str) -> bool:
    """An answer earns format credit if it is the model's own (see `_own_text`) or a number: a number may
    equal the example's number by right (11 is 11), a placeholder never is one."""
    return _as_number(body) is not None or _own_text(body, prompt)


def _layout_matches(pattern: re.Pattern, prompt: str, completion: str) -> float:
    m = pattern.search(completion)
    return float(bool(m) and _real_reasoning(m.group(1), prompt) and _real_answer(m.group(2), prompt))


def strict_format(prompts: list[str], completions: list[str], **_: Any) -> list[float]:
    """1.0 when the whole completion is exactly '<reasoning>\\n...\\n</reasoning>\\n<answer>\\n...\\n</answer>'
    (trailing whitespace allowed) with the model's own content in both tags (no placeholder, nothing copied
    from the prompt's tags; see `_own_text`); else 0.0."""
    return [_layout_matches(STRICT, p, c) for p, c in zip(prompts, completions)]


def soft_format(prompts: list[str], completions: list[str], **_: Any) -> list[float]:
    """1.0 when <reasoning>...</reasoning> then <answer>...</answer> appear in that order, any whitespace."""
    return [_layout_matches(SOFT, p, c) for p, c in zip(prompts, completions)]


def tag_count(prompts: list[str], completions: list[str], **_: Any) -> list[float]:
    """Partial credit, 0.25 for each of the four tags present exactly once with its newlines
    ('<reasoning>\\n', '\\n</reasoning>\\n', '\\n<answer>\\n', '\\n</answer>'), minus 0.001 per character
    after '</answer>' (text the format does not allow). At most 1.0. A closed reasoning or answer that is
    empty, a placeholder or copied from the prompt voids the credit: the tags must hold the model's own work."""
    out = []
    for p, c in zip(prompts, completions):
        closed = re.search(r"<reasoning>(.*?)</reasoning>", c, re.DOTALL)
        answer = extract_answer(c)
        if (closed and not _real_reasoning(closed.group(1), p)) or \
                (answer is not None and not _real_answer(answer, p)):
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
    """Numeric equality when both are plain numbers; otherwise symbolic equivalence by math-verify.

    The symbolic comparison is bounded: a predicted answer longer than ANSWER_MAX_CHARS or matching COSTLY
    (a power tower, a huge exponent or factorial) is not compared, and a comparison that runs past
    ANSWER_TIME_S (main thread only) is cut short; all three count as not a match."""
    a, b = _as_number(predicted), _as_number(reference)
    if a is not None and b is not None:
        return math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-9)
    if len(predicted) > ANSWER_MAX_CHARS or COSTLY.search(predicted):
        return False
    parse, verify = _math_verify()  # outside the limit: an import cut short would leave half-loaded modules
    matched = False
    with time_limit(ANSWER_TIME_S):
        matched = _symbolic_match(parse, verify, predicted, reference)
    return matched


@functools.cache
def _math_verify() -> tuple[Callable, Callable]:
    """math-verify's parse and verify, imported and warmed up (its parsers load lazily) once, with its
    one-time 'timeout is disabled' warning turned off: `_symbolic_match` bounds it instead."""
    import math_verify.grader
    import math_verify.parser

    math_verify.parser.TIMEOUT_WARNING_SHOWN = math_verify.grader.TIMEOUT_WARNING_SHOWN = True
    parse, verify = math_verify.parse, math_verify.verify
    verify(parse("$\\frac{1}{2}$", parsing_timeout=None), parse("$0.5$", parsing_timeout=None), timeout_seconds=None)
    return parse, verify


def _symbolic_match(parse: Callable, verify: Callable, predicted: str, reference: str) -> bool:
    # math-verify's own timeouts are off: they call signal.alarm(n) and then alarm(0), which would cancel an
    # enclosing reward timeout (and they count whole seconds); answers_match's time_limit nests instead.
    try:
        gold = parse(reference if "$" in reference else f"${reference}$", parsing_timeout=None)
        pred = parse(predicted if "$" in predicted else f"${predicted}$", parsing_timeout=None)
        return bool(gold) and bool(pred) and bool(verify(gold, pred, timeout_seconds=None))
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


def env(prompts: list[str], completions: list[str], episode: list[dict], **_: Any) -> list[float]:
    """The environment's reward of each episode: its outcome reward plus its per-turn rewards (episodes.py).
    Added with weight 1 to a run with an environment unless the rewards list names it."""
    return [e["reward"] for e in episode]


BUILTIN: dict[str, RewardFn] = {
    "env": env,
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


def verl_reward(fn: Callable, name: str) -> RewardFn:
    """verl's reward interface as a reward function: fn(data_source=, solution_str=, ground_truth=,
    extra_info=) per completion, returning a number or a dict with a "score" (verl's two forms), from the
    columns that verl-style rows carry (data_source, ground_truth from reward_model, extra_info). An async fn
    gives an async reward whose completions are scored concurrently."""

    def calls(completions: list[str], data_source, ground_truth, extra_info) -> list[dict]:
        if data_source is None or ground_truth is None:
            raise ValueError("a verl reward needs the columns data_source and ground_truth: verl-style rows "
                             "(data_source, prompt, reward_model.ground_truth, extra_info)")
        extra = extra_info or [None] * len(completions)
        return [dict(data_source=d, solution_str=c, ground_truth=g, extra_info=e)
                for c, d, g, e in zip(completions, data_source, ground_truth, extra)]

    def score(v):
        return v["score"] if isinstance(v, Mapping) and "score" in v else v

    if inspect.iscoroutinefunction(fn):
        async def verl_async(prompts, completions, data_source=None, ground_truth=None, extra_info=None, **_):
            values = await asyncio.gather(*(fn(**kw) for kw in calls(completions, data_source, ground_truth,
                                                                      extra_info)))
            return [score(v) for v in values]
        return verl_async

    def verl_sync(prompts, completions, data_source=None, ground_truth=None, extra_info=None, **_):
        return [score(fn(**kw)) for kw in calls(completions, data_source, ground_truth, extra_info)]
    return verl_sync


def load_reward(name: str) -> RewardFn:
    """A built-in by name, 'rm:<model>' (a learned reward model), 'path/to/file.py:function', or
    'verl:path/to/file.py:function' (a verl compute_score, see verl_reward)."""
    if name in BUILTIN:
        return BUILTIN[name]
    if name.startswith("rm:"):
        return RewardModel(name.removeprefix("rm:"))
    if name.startswith("verl:"):
        return verl_reward(_load_user_function(name.removeprefix("verl:"), name), name)
    return _load_user_function(name, name)


def _load_user_function(spec_text: str, name: str) -> Callable:
    path, sep, func = spec_text.rpartition(":")
    if not sep or not path.endswith(".py"):
        raise UserError(f"reward {name!r}: expected one of {sorted(BUILTIN)}, 'rm:<reward model>', "
                        "'path/to/file.py:function' or 'verl:path/to/file.py:compute_score'")
    fn = load_attribute(path, func, "reward", name)
    if not callable(fn):
        raise UserError(f"reward file {path!r} has no function {func!r}")
    return fn


def _first_line(e: BaseException) -> str:
    lines = str(e).splitlines()
    return lines[0] if lines else ""


def _exit_call(e: SystemExit) -> str:
    """How the code called exit: 'exit()', 'exit(3)', "exit('bad data')"."""
    return "exit()" if e.code is None else f"exit({e.code!r})"


@contextlib.contextmanager
def kept_process_state():
    """What user code in this process may change and the run relies on, put back after it: the stop
    handlers of SIGINT and SIGTERM (a reward that ignores or resets them would take away the saving stop)
    and torch's grad mode (a reward model's `torch.set_grad_enabled(False)` would break the update)."""
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)} \
        if threading.current_thread() is threading.main_thread() else {}
    grad = torch.is_grad_enabled()
    try:
        yield
    finally:
        torch.set_grad_enabled(grad)
        for s, handler in handlers.items():
            if signal.getsignal(s) is not handler and handler is not None:
                signal.signal(s, handler)


def fresh(prompts: list[str], completions: list[str], columns: dict) -> dict:
    """The arguments of one reward call as copies: a function that changes what it was given (sorts the
    completions, edits a dict in a column) changes neither the logs, nor the other functions' arguments, nor
    the data set."""
    cells = {k: [copy.deepcopy(x) for x in v] if isinstance(v, list) else copy.deepcopy(v)  # each cell its own
             for k, v in columns.items()}
    return {"prompts": list(prompts), "completions": list(completions), **cells}


def call_reward(name: str, fn: RewardFn, prompts: list[str], completions: list[str], columns: dict,
                timeout_s: float | None = None) -> list[float]:
    """Call one reward function and check what it returns. Raises UserError naming the function.

    It must return one real number per completion, finite in float32 (|x| < 3.4e38): a list, a tuple, an
    array or a generator of int, float, bool (a number in Python: True is 1.0, False 0.0), numpy scalars or
    0-d tensors. With `timeout_s`, a call that runs longer is stopped (`time_limit`) and reported; one that
    cannot be stopped ends the process limits.WATCHDOG_GRACE_S later (`watchdog`). A Ctrl-C (KeyboardInterrupt)
    passes through unchanged: stopping the run is the training loop's business."""
    slow = _slow(name, timeout_s, len(completions)) if timeout_s is not None else ""
    try:
        with watchdog(None if timeout_s is None else timeout_s + limits.WATCHDOG_GRACE_S, slow), \
                time_limit(timeout_s) as limit, kept_process_state():
            values = fn(**fresh(prompts, completions, columns))
            # what it returned is the user's code too (a generator, a __float__): checked inside the limits
            values = _checked(name, values, len(completions))
    except (StopNow, Timeout, UserError):
        raise  # the user's second Ctrl-C in a training run; an enclosing time limit's timeout, for its owner
    except KeyboardInterrupt:
        if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
            raise  # no stop handler installed (the Python API, eval): this may well be the user's Ctrl-C
        raise UserError(f"reward function {name!r} raised KeyboardInterrupt: a reward function must return "
                        "its values") from None
    except SystemExit as e:
        raise UserError(f"reward function {name!r} called {_exit_call(e)}: a reward function must return its "
                        "values, not exit") from None
    except BaseException as e:  # any Exception, and GeneratorExit-like BaseExceptions
        raise UserError(f"reward function {name!r} raised {type(e).__name__}: {_first_line(e)}") from None
    if limit.expired:
        raise UserError(slow)
    return values


def _number(v: Any) -> float | None:
    """`v` as a float when it is one real number (bool, numpy scalar and 0-d tensor included), else None."""
    if getattr(v, "ndim", None) == 0 and hasattr(v, "item"):  # numpy scalar or 0-d array / tensor
        v = v.item()
    if not isinstance(v, numbers.Real):
        return None
    try:
        return float(v)
    except OverflowError:  # an int or Fraction past float64's range (10**400): infinite, refused below
        return math.inf if v > 0 else -math.inf


SHORT = reprlib.Repr()
SHORT.maxlevel, SHORT.maxlist, SHORT.maxtuple, SHORT.maxstring, SHORT.maxother = 2, 3, 3, 40, 40


def _short_repr(v: Any) -> str:
    text = " ".join((repr(v[:41]) if isinstance(v, str) else SHORT.repr(v)).split())  # never all of a huge value
    return text if len(text) <= 40 else text[:37] + "..."


def _checked(name: str, values: Any, n: int) -> list[float]:
    """`values` as n floats, each finite in float32, or UserError naming the function and the bad index."""
    try:
        if isinstance(values, (str, bytes, Mapping, Set)) or not isinstance(values, Iterable):
            raise TypeError
        size = len(values) if isinstance(values, Sized) else None  # range(10**18): refused before it is listed
        values = list(values) if size == n else list(itertools.islice(values, n + 1)) if size is None else values
    except TypeError:  # also a 0-d array, which has __iter__ but cannot be iterated
        raise UserError(f"reward function {name!r} must return a list of numbers, one per completion; got "
                        f"a {type(values).__name__}") from None
    if len(values) != n:  # an endless iterator stops at n + 1
        more = "more than " if size is None and len(values) > n else ""
        raise UserError(f"reward function {name!r} returned {more}{len(values) if not more else n} values for "
                        f"{n} completions")
    floats = [_number(v) for v in values]
    for i, (v, f) in enumerate(zip(values, floats)):
        if f is None:
            what = "None" if v is None else f"a {type(v).__name__} ({_short_repr(v)})"
            raise UserError(f"reward function {name!r} returned {what} at index {i}: expected a number")
    # Checked as float32, the rewards' dtype: 1e39 is a finite Python float but inf in float32.
    bad = (~torch.isfinite(torch.tensor(floats, dtype=torch.float32))).nonzero().flatten().tolist()
    if bad:
        raise UserError(f"reward function {name!r} returned {_short_repr(values[bad[0]])} at index {bad[0]}: "
                        "expected a finite number within float32's range (|x| < 3.4e38)")
    return floats


def is_async(fn: Callable) -> bool:
    """An `async def` function (or an object whose __call__ is one)."""
    return inspect.iscoroutinefunction(fn) or inspect.iscoroutinefunction(getattr(fn, "__call__", None))


def takes(fn: Callable, arg: str) -> bool:
    """Whether fn accepts the keyword `arg` (by name or through **kwargs)."""
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return False
    return any(p.name == arg or p.kind is inspect.Parameter.VAR_KEYWORD for p in params)


def _slow(name: str, timeout_s: float, n: int) -> str:
    return (f"reward function {name!r} took longer than {timeout_s:g}s on {n} completions: make it faster or "
            "raise rewards_timeout_s")


async def _await_all(jobs: list[tuple[str, Callable, dict, int]], timeout_s: float) -> list:
    """Await every async reward call at once, each within timeout_s; a failure becomes its one-line UserError
    (returned in place of the values, so that every call has finished or been cancelled)."""
    async def call(name: str, fn: Callable, kwargs: dict):
        # inside the task: an exit or KeyboardInterrupt that left it would stop the event loop itself
        try:
            columns = {a: v for a, v in kwargs.items() if a not in ("prompts", "completions")}
            return await fn(**fresh(kwargs["prompts"], kwargs["completions"], columns))
        except asyncio.CancelledError:
            raise
        except UserError as e:
            return e
        except BaseException as e:  # noqa: BLE001  (the user's code: any exception or exit is one line)
            if isinstance(e, SystemExit):
                return UserError(f"reward function {name!r} called {_exit_call(e)}: a reward function must return "
                                 "its values, not exit")
            if isinstance(e, KeyboardInterrupt):
                return UserError(f"reward function {name!r} raised KeyboardInterrupt: a reward function must "
                                 "return its values")
            return UserError(f"reward function {name!r} raised {type(e).__name__}: {_first_line(e)}")

    async def one(name: str, fn: Callable, kwargs: dict, n: int):
        try:
            return await asyncio.wait_for(call(name, fn, kwargs), timeout_s)
        except asyncio.TimeoutError:
            return UserError(_slow(name, timeout_s, n))
    return await asyncio.gather(*(one(*job) for job in jobs))


def _pool_init() -> None:
    """A worker leads a process group of its own, which close() ends with whatever the reward started, and
    dies with the training process."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent stops the run on Ctrl-C; workers just end
    os.setpgid(0, 0)
    die_with_parent()


def _pool_ready(_: int) -> bool:
    return True


_WORKER_FNS: dict[str, RewardFn] = {}


def _pool_call(name: str, prompts: list[str], completions: list[str], columns: dict, timeout_s: float):
    """In a worker process: one slice of one function's batch, as (values, None) or (None, error line)."""
    try:
        if name not in _WORKER_FNS:
            _WORKER_FNS[name] = load_reward(name)
        return call_reward(name, _WORKER_FNS[name], prompts, completions, columns, timeout_s), None
    except UserError as e:
        return None, str(e)


class RewardSet:
    """The configured reward functions with their weights; each call of each function limited to
    `timeout_s` seconds (TrainConfig.rewards_timeout_s). workers > 0: synchronous functions (not reward
    models) run in that many worker processes, which load them by name. Call `close` when done."""

    def __init__(self, specs: list[tuple[str, float]], timeout_s: float = 60.0, workers: int = 0):
        self.names = [n for n, _ in specs]
        self.weights = torch.tensor([w for _, w in specs], dtype=torch.float32)
        for name, w in zip(self.names, self.weights.tolist()):
            if not math.isfinite(w):
                raise UserError(f"reward {name!r}: weight is not a finite float32 number (|w| < 3.4e38)")
        self.timeout_s = timeout_s
        self.workers = workers
        self.fns = [load_reward(n) for n in self.names]
        self._loop: asyncio.AbstractEventLoop | None = None
        self._pool: concurrent.futures.ProcessPoolExecutor | None = None

    def _pooled(self, name: str, fn: Callable) -> bool:
        return self.workers > 0 and not is_async(fn) and not name.startswith("rm:")

    def _event_loop(self) -> asyncio.AbstractEventLoop:
        if self._loop is None:
            self._loop = asyncio.new_event_loop()
            threading.Thread(target=self._loop.run_forever, name="grouprl-async-rewards", daemon=True).start()
        return self._loop

    def _process_pool(self) -> concurrent.futures.ProcessPoolExecutor:
        if self._pool is None:  # spawn: a fork of a process running torch threads can deadlock
            self._pool = concurrent.futures.ProcessPoolExecutor(
                self.workers, mp_context=multiprocessing.get_context("spawn"), initializer=_pool_init)
            # started and importing now, outside the reward time limit (a worker's start-up takes seconds)
            try:
                list(self._pool.map(_pool_ready, range(self.workers)))
            except concurrent.futures.process.BrokenProcessPool:
                self._kill_pool()
                raise UserError("the reward worker processes (reward_workers) could not start; see above") from None
        return self._pool

    def weight_of(self, name: str) -> float:
        """The weight of the reward function `name` in the sum (0 when it is not one of them)."""
        return float(self.weights[self.names.index(name)]) if name in self.names else 0.0

    def score(self, prompts: list[str], completions: list[str], columns: dict,
              completion_ids: list[list[int]] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns (per-function rewards (N, K), weighted total (N,)). completion_ids reach the functions that
        take them."""
        n = len(completions)
        kwargs = [{"prompts": prompts, "completions": completions, **columns}
                  | ({"completion_ids": completion_ids} if completion_ids is not None and takes(f, "completion_ids")
                     else {}) for f in self.fns]
        values: list = [None] * len(self.fns)
        asynchronous = [k for k, f in enumerate(self.fns) if is_async(f)]
        pending = None
        if asynchronous:  # started first: they run while the synchronous ones below do
            jobs = [(self.names[k], self.fns[k], kwargs[k], n) for k in asynchronous]
            pending = asyncio.run_coroutine_threadsafe(_await_all(jobs, self.timeout_s), self._event_loop())
        pooled = {k: self._submit(k, kwargs[k]) for k, f in enumerate(self.fns)
                  if k not in asynchronous and self._pooled(self.names[k], f)}
        try:
            for k, f in enumerate(self.fns):
                if k not in asynchronous and k not in pooled:
                    values[k] = call_reward(self.names[k], f, prompts, completions,
                                            {a: v for a, v in kwargs[k].items() if a not in ("prompts", "completions")},
                                            self.timeout_s)
            for k, futures in pooled.items():
                values[k] = self._collect(k, futures, n)
            if pending is not None:
                for k, got in zip(asynchronous, self._wait_async(pending, asynchronous, n)):
                    if isinstance(got, UserError):
                        raise got
                    with time_limit(self.timeout_s) as limit:  # its result's __iter__, __float__: user code
                        values[k] = _checked(self.names[k], got, n)
                    if limit.expired:
                        raise UserError(_slow(self.names[k], self.timeout_s, n))
        finally:
            if pending is not None:
                pending.cancel()
            for futures in pooled.values():  # after an error: slices not yet started are dropped
                for _, f in futures:
                    f.cancel()
        per_fn = torch.tensor(values, dtype=torch.float32).T.reshape(n, len(self.fns))
        total = per_fn @ self.weights  # (N, K) @ (K,) -> (N,)
        bad = (~torch.isfinite(total)).nonzero().flatten().tolist()
        if bad:
            weights = ", ".join(f"{n}: {w:g}" for n, w in zip(self.names, self.weights.tolist()))
            rewards = ", ".join(f"{r:g}" for r in per_fn[bad[0]].tolist())
            raise UserError(f"the weighted reward of completion {bad[0]} is not finite in float32 (rewards "
                            f"[{rewards}] x weights {{{weights}}}): lower the weights or the rewards' scale")
        return per_fn, total

    def _wait_async(self, pending: concurrent.futures.Future, which: list[int], n: int) -> list:
        """The async calls' results; past the time limit plus a grace (a coroutine that blocks its event loop
        cannot be cancelled by wait_for), a UserError naming them."""
        try:
            return pending.result(timeout=self.timeout_s + limits.WATCHDOG_GRACE_S)
        except concurrent.futures.TimeoutError:
            self._loop = None  # that loop's thread is stuck in the user's code: the next call gets a new one
            names = ", ".join(repr(self.names[k]) for k in which)
            raise UserError(f"async reward function(s) {names} did not return within {self.timeout_s:g}s on {n} "
                            "completions (a coroutine that never awaits blocks the event loop): make them "
                            "faster or raise rewards_timeout_s") from None

    def _submit(self, k: int, kwargs: dict) -> list[tuple[int, concurrent.futures.Future]]:
        """Function k's batch in `workers` contiguous slices, sent to the pool: [(slice start, future)]."""
        n = len(kwargs["completions"])
        bounds = [i * n // self.workers for i in range(self.workers + 1)]
        out = []
        for lo, hi in zip(bounds, bounds[1:]):
            if hi > lo:
                part = {a: (v[lo:hi] if isinstance(v, list) else v) for a, v in kwargs.items()}
                prompts, completions = part.pop("prompts"), part.pop("completions")
                out.append((lo, self._process_pool().submit(_pool_call, self.names[k], prompts, completions, part,
                                                            self.timeout_s)))
        return out

    def _collect(self, k: int, futures: list[tuple[int, concurrent.futures.Future]], n: int) -> list[float]:
        name, values = self.names[k], []
        for _, future in futures:
            try:
                got, error = future.result(timeout=self.timeout_s + 2 * limits.WATCHDOG_GRACE_S)
            except concurrent.futures.TimeoutError:
                self._kill_pool()
                raise UserError(_slow(name, self.timeout_s, n)) from None
            except concurrent.futures.process.BrokenProcessPool:
                self._kill_pool()
                raise UserError(f"reward function {name!r}: a reward worker process died (killed, out of memory, or "
                                "the function ended its process); see above") from None
            if error is not None:
                raise UserError(error)
            values += got
        return values

    def _kill_pool(self) -> None:
        if self._pool is not None:
            for p in list(getattr(self._pool, "_processes", {}).values()):
                try:
                    os.killpg(p.pid, signal.SIGKILL)  # the worker and what its reward started
                except (ProcessLookupError, PermissionError):
                    p.kill()
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None

    def close(self) -> None:
        """Stop the worker processes (at once: after a stop or an error one may still be in the user's code)
        and the event loop."""
        self._kill_pool()
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._loop = None
