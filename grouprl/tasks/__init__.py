"""Tasks: where prompts and reference answers come from, and how a prompt is put to the model.

A task is two lists of rows (train, held-out), each row a dict with 'prompt' (the question text), usually
'answer', and any other columns, which reach the reward functions as keyword arguments.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from transformers import PreTrainedTokenizerBase

from grouprl.config import TaskConfig
from grouprl.errors import UserError
from grouprl.tasks.arithmetic import arithmetic_splits
from grouprl.tasks.countdown import countdown_splits
from grouprl.tasks.data import dataset_rows, gsm8k_rows

# A worked example rather than placeholders: a model that copies it gets no correctness reward, and the
# format rewards refuse a reasoning copied verbatim from the prompt.
FORMAT_PROMPT = (
    "Answer in this format:\n<reasoning>\nyour working\n</reasoning>\n<answer>\nthe final number\n</answer>\n"
)
ARITHMETIC_PROMPT = (
    "Solve the problem. Think briefly inside <reasoning> tags, then give only the final number inside "
    "<answer> tags. Example:\n<reasoning>\n7 + 4 = 11\n</reasoning>\n<answer>\n11\n</answer>"
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

    def chat_prompt(self, tokenizer: PreTrainedTokenizerBase, row: dict, prefill: str) -> str:
        messages = [{"role": "system", "content": self.system_prompt}, {"role": "user", "content": row["prompt"]}]
        try:
            text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        except Exception as e:  # jinja raises from inside the model's own template
            raise UserError(f"the model's chat template rejected the prompt ({type(e).__name__}: {e}); "
                            "set task.system_prompt or use a model whose template takes a system message") from None
        return text + prefill


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
            cfg.num_train, cfg.num_eval, cfg.max_operand, cfg.max_steps, cfg.seed, cfg.curriculum
        )
        return Task("arithmetic", train, held, cfg.system_prompt or ARITHMETIC_PROMPT, "correctness")
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
    return Task(cfg.name, rows, held[: cfg.num_eval], cfg.system_prompt or FORMAT_PROMPT, "correctness")
