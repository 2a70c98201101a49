"""Tasks: where prompts and reference answers come from, and how a prompt is put to the model.

A task is two lists of rows (train, held-out), each row a dict with 'prompt' (the question text), usually
'answer', and any other columns, which reach the reward functions as keyword arguments. Rows read from data
are `Row`s that carry their origin (file and line, or split and row) through the shuffle and split, so that
an error names where the user finds the row. `fit_prompts` checks every prompt against the model's context
before any model is loaded, and cuts or drops those too long.
"""

from __future__ import annotations

import dataclasses
import random
from dataclasses import dataclass

from transformers import PreTrainedTokenizerBase

from grouprl.config import TaskConfig
from grouprl.errors import UserError
from grouprl.limits import time_limit
from grouprl.tasks.arithmetic import arithmetic_splits
from grouprl.tasks.countdown import countdown_splits
from grouprl.tasks.word_problems import word_problem_splits
from grouprl.tasks.data import dataset_rows, gsm8k_rows, origin_of, prompt_preview, with_columns

# Each prompt shows a worked example rather than placeholders ("your working"): a small model copies what it
# is shown, and a copied example earns no reward (the format rewards refuse a reasoning copied verbatim from
# the prompt, and the example's answer is rarely the right one), while copied placeholder text once did.
FORMAT_PROMPT = (
    "Think briefly inside <reasoning> tags, then give only the final answer inside <answer> tags. Example for "
    "'A box holds 6 eggs. How many eggs are in 3 boxes?':\n<reasoning>\n3 boxes of 6 eggs: 3 * 6 = 18\n"
    "</reasoning>\n<answer>\n18\n</answer>"
)
ARITHMETIC_PROMPT = (
    "Solve the problem. Think briefly inside <reasoning> tags, then give only the final number inside "
    "<answer> tags. Example:\n<reasoning>\n7 + 4 = 11\n</reasoning>\n<answer>\n11\n</answer>"
)
WORD_PROMPT = (
    "Solve the word problem. Give only the final number inside <answer> tags, for example:\n<answer>\n42\n"
    "</answer>"
)
COUNTDOWN_PROMPT = (
    "Think briefly inside <reasoning> tags, then give only the expression inside <answer> tags. Example "
    "for [2, 3, 4] and 14:\n<reasoning>\n2 * 4 = 8, 8 + 3 = 11 is not it; 3 * 4 = 12, 12 + 2 = 14\n"
    "</reasoning>\n<answer>\n3 * 4 + 2\n</answer>"
)


@dataclass
class Task:
    name: str
    train: list[dict]
    eval: list[dict]
    system_prompt: str
    correctness: str  # name of the built-in reward that decides whether an answer is right
    messages_system: str | None = None  # a system turn put before chat-messages prompts that have none
    tools: list[dict] | None = None  # the environment's tools (JSON schemas), shown to the model
    tools_native: bool = False  # the chat template renders `tools`; else they are described in the system turn

    def messages(self, row: dict) -> list[dict]:
        """The chat turns of a row: the task's system prompt and the question; or, for a prompt that is chat
        messages, those messages (with task.system_prompt first when it is set and they have no system turn).
        Tools the chat template cannot render are described at the end of the system turn (TOOLS_PROMPT)."""
        prompt = row["prompt"]
        if isinstance(prompt, list):
            head = [{"role": "system", "content": self.messages_system}] \
                if self.messages_system and prompt[0]["role"] != "system" else []
            messages = head + prompt
        else:
            messages = [{"role": "system", "content": self.system_prompt}, {"role": "user", "content": prompt}]
        if self.tools and not self.tools_native:
            described = tools_prompt(self.tools)
            if messages[0]["role"] == "system":
                messages = [{"role": "system", "content": f"{messages[0]['content']}\n\n{described}"}, *messages[1:]]
            else:
                messages = [{"role": "system", "content": described}, *messages]
        return messages

    def chat_prompt(self, tokenizer: PreTrainedTokenizerBase, row: dict, prefill: str) -> str:
        """The text the model continues: the chat template applied to `messages`, then the prefill."""
        text = render(tokenizer, self.messages(row), tools=self.tools if self.tools_native else None)
        if len(text) > TEMPLATE_MAX_CHARS:
            raise UserError(f"{origin_of(row, 'a row')}: its prompt through the model's chat template is "
                            f"{len(text):,} characters, over {TEMPLATE_MAX_CHARS:,}: expected a shorter prompt, "
                            "or a template that renders the messages (fix or replace its chat_template)")
        return text + prefill


def render(tokenizer: PreTrainedTokenizerBase, messages: list[dict], tools: list[dict] | None = None,
           add_generation_prompt: bool = True,
           hint: str = "set task.system_prompt or use a model whose template takes a system message") -> str:
    """The chat template applied to messages (and tools). The template is code from the model's folder: its
    time is bounded, and its errors become one line, ending with `hint`."""
    extra = {"tools": tools} if tools else {}
    try:
        with time_limit(TEMPLATE_LIMIT_S) as limit:
            text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt,
                                                 **extra)
    except Exception as e:  # jinja raises from inside the model's own template
        raise UserError(f"the model's chat template rejected the prompt ({type(e).__name__}: {e}); {hint}") from None
    if limit.expired:
        raise UserError(f"the model's chat template took longer than {TEMPLATE_LIMIT_S:g}s to render one prompt: "
                        "expected a template that renders the messages (fix or replace its chat_template)")
    return text


# How tools are shown to a model whose chat template does not render them: in the system turn, with the
# call in the Hermes form (what Qwen's and most tool templates use, so a model trained here reads familiar text)
TOOLS_PROMPT = (
    "You can call these tools:\n<tools>\n{tools}\n</tools>\nTo call one, write\n<tool_call>\n"
    '{{"name": "<tool>", "arguments": {{<its arguments as JSON>}}}}\n</tool_call>\nand stop: its result comes back '
    "in a message of its own. When you have what you need, give your answer."
)


def tools_prompt(tools: list[dict]) -> str:
    import json

    return TOOLS_PROMPT.format(tools="\n".join(json.dumps(t) for t in tools))


# Bounds on rendering a model folder's chat template (jinja in a sandbox, but with loops and string sizes
# unbounded): one prompt's time, and its length, far above any real prompt's and below what makes the
# tokenizer itself fail (a 300 MB prompt ends it with SIGABRT).
TEMPLATE_LIMIT_S = 10.0
TEMPLATE_MAX_CHARS = 2**22


def _split(rows: list[dict], num_eval: int, seed: int) -> tuple[list[dict], list[dict]]:
    if len(rows) < 2:
        raise UserError(f"the dataset has {len(rows)} row(s): at least 2 are needed to split off a held-out set")
    rows = rows[:]
    random.Random(seed).shuffle(rows)
    k = min(num_eval, len(rows) // 5 or 1)
    return rows[k:], rows[:k]


def build_task(cfg: TaskConfig) -> Task:
    if cfg.name == "arithmetic":
        train, held = arithmetic_splits(
            cfg.num_train, cfg.num_eval, cfg.max_operand, cfg.max_steps, cfg.seed, cfg.curriculum, cfg.min_steps
        )
        return Task("arithmetic", train, held, cfg.system_prompt or ARITHMETIC_PROMPT, "correctness")
    if cfg.name == "word_problems":
        train, held = word_problem_splits(cfg.num_train, cfg.num_eval, cfg.max_operand, cfg.min_steps, cfg.max_steps,
                                          cfg.seed)
        return Task("word_problems", train, held, cfg.system_prompt or WORD_PROMPT, "correctness")
    if cfg.name == "countdown":
        train, held = countdown_splits(cfg.num_train, cfg.num_eval, cfg.seed)
        return Task("countdown", train, held, cfg.system_prompt or COUNTDOWN_PROMPT, "countdown")
    assert cfg.source is not None  # checked by the config
    if cfg.name == "gsm8k":
        rows = gsm8k_rows(cfg.source)
        held = gsm8k_rows(cfg.eval_source) if cfg.eval_source else None
    else:
        rows = dataset_rows(cfg.source, cfg.prompt_column, cfg.answer_column)
        held = dataset_rows(cfg.eval_source, cfg.prompt_column, cfg.answer_column) if cfg.eval_source else None
    if held is None:
        rows, held = _split(rows, cfg.num_eval, cfg.seed)
    return Task(cfg.name, rows, held[: cfg.num_eval], cfg.system_prompt or FORMAT_PROMPT, "correctness",
                messages_system=cfg.system_prompt)


# ---------------------------------------------------------------- prompt length


def default_max_prompt_tokens(context_length: int | None, max_new_tokens: int) -> int | None:
    """The longest prompt that leaves room for max_new_tokens in the model's context; None if unknown."""
    if context_length is None:
        return None
    if context_length <= max_new_tokens:
        raise UserError(f"rollout.max_new_tokens={max_new_tokens} leaves no room for a prompt in the model's "
                        f"context of {context_length} tokens: lower it, or set task.max_prompt_tokens")
    return context_length - max_new_tokens


def token_lengths(tokenizer: PreTrainedTokenizerBase, texts: list[str]) -> list[int]:
    """Tokens per text, encoded as rollout encodes prompts (the chat template holds its own special tokens)."""
    if not texts:
        return []
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None and hasattr(backend, "encode_batch_fast"):
        # what tokenizer(texts) runs, without offsets and without copying every id into Python: 3x faster
        return [len(e) for e in backend.encode_batch_fast(texts, add_special_tokens=False)]
    # verbose=False: the 'longer than model_max_length' warning is what this check reports, as a UserError
    enc = tokenizer(texts, add_special_tokens=False, return_attention_mask=False, verbose=False)
    return [len(ids) for ids in enc["input_ids"]]


def fit_prompts(task: Task, tokenizer: PreTrainedTokenizerBase, prefill: str, max_prompt_tokens: int | None,
                long_prompts: str) -> Task:
    """A copy of the task whose every train and held-out prompt (chat template, system prompt and prefill
    included) is at most max_prompt_tokens long. A longer one, by long_prompts: 'error' raises a UserError
    naming the row where the user finds it (its file and line, or split and row; for a task made in code, its
    place in the split), 'truncate_left' keeps the end of its question, 'drop' removes the row.
    max_prompt_tokens None (the model's context is unknown) leaves the task as it is."""
    if max_prompt_tokens is None:
        return task
    assert long_prompts in ("error", "truncate_left", "drop"), long_prompts
    fitted = {split: _fit_split(task, tokenizer, prefill, max_prompt_tokens, long_prompts, split, rows)
              for split, rows in (("train", task.train), ("held-out", task.eval))}
    return dataclasses.replace(task, train=fitted["train"], eval=fitted["held-out"])


def _fit_split(task: Task, tokenizer: PreTrainedTokenizerBase, prefill: str, limit: int, long_prompts: str,
               split: str, rows: list[dict]) -> list[dict]:
    lengths = token_lengths(tokenizer, [task.chat_prompt(tokenizer, r, prefill) for r in rows])
    long = [i for i, n in enumerate(lengths) if n > limit]
    if not long:
        return list(rows)
    if long_prompts == "error":
        i = long[0]
        where = origin_of(rows[i], f"{split} row {i + 1}")
        more = f"; {len(long) - 1} more {split} row(s) too" if len(long) > 1 else ""
        raise UserError(f"{where} (starts {prompt_preview(rows[i]['prompt'])!r}): the prompt is {lengths[i]} tokens, "
                        f"over task.max_prompt_tokens={limit} (chat template, system prompt and prefill included)"
                        f"{more}: set task.long_prompts to truncate_left (keep the end of the question) or drop "
                        "(skip the row), or raise task.max_prompt_tokens")
    if long_prompts == "drop":
        kept = [r for r, n in zip(rows, lengths) if n <= limit]
        if not kept:
            raise UserError(f"no {split} row is left: every prompt is over task.max_prompt_tokens={limit} (the "
                            f"shortest is {min(lengths)} tokens); raise task.max_prompt_tokens or shorten the prompts")
        return kept
    if any(isinstance(rows[i]["prompt"], list) for i in long):
        i = next(i for i in long if isinstance(rows[i]["prompt"], list))
        where = origin_of(rows[i], f"{split} row {i + 1}")
        raise UserError(f"{where}: the chat-messages prompt is {lengths[i]} tokens, over "
                        f"task.max_prompt_tokens={limit}, and truncate_left cuts text prompts only: set "
                        "task.long_prompts to drop, or raise task.max_prompt_tokens")
    cut = _truncate_left(task, tokenizer, prefill, limit, [rows[i] for i in long])
    out = list(rows)
    for i, row in zip(long, cut):
        out[i] = row
    return out


def _truncate_left(task: Task, tokenizer: PreTrainedTokenizerBase, prefill: str, limit: int,
                   rows: list[dict]) -> list[dict]:
    """The rows with their questions cut from the left, token-wise, until each whole prompt fits in limit."""
    (frame,) = token_lengths(tokenizer, [task.chat_prompt(tokenizer, {"prompt": ""}, prefill)])
    if frame >= limit:
        raise UserError(f"task.max_prompt_tokens={limit} leaves no room for a question: the chat template, "
                        f"system prompt and prefill alone take {frame} tokens; raise it or shorten task.system_prompt")
    questions = tokenizer([r["prompt"] for r in rows], add_special_tokens=False, return_attention_mask=False,
                          verbose=False)["input_ids"]
    # Start from the frame's own length; a cut can tokenize differently where the question meets the template
    # (or where it was cut), so re-measure and shorten the rows still over by their excess until all fit.
    # Terminates: budgets only fall, and a budget of 0 (an empty question) fits since frame < limit.
    budget = [min(limit - frame, len(q)) for q in questions]
    out = list(rows)
    pending = list(range(len(rows)))
    while pending:
        kept = [questions[j][len(questions[j]) - budget[j]:] if budget[j] else [] for j in pending]
        texts = tokenizer.batch_decode(kept, skip_special_tokens=False, clean_up_tokenization_spaces=False)
        for j, text in zip(pending, texts):
            out[j] = with_columns(rows[j], prompt=text.lstrip("\ufffd"))  # a cut inside a multi-byte character
        lengths = token_lengths(tokenizer, [task.chat_prompt(tokenizer, out[j], prefill) for j in pending])
        over = [(j, n - limit) for j, n in zip(pending, lengths) if n > limit]
        assert all(budget[j] > 0 for j, _ in over), "an empty question fits, since frame < limit"
        for j, excess in over:
            budget[j] = max(budget[j] - excess, 0)
        pending = [j for j, _ in over]
    return out
