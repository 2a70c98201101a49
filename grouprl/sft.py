"""Supervised fine-tuning (`grouprl sft`, algo: sft): the warm-up before RL, on the user's conversations.

An example is a conversation (system, user, assistant and tool messages), laid out as the episode loop lays
out an episode (episodes.py): the prompt is everything before the first assistant turn, through the chat
template (the tools described as RL shows them) and task.prefill; then each assistant turn's text as the
model would write it, with the end-of-turn token that ends it (loss mask 1: a turn that calls a tool too, so
the model learns to stop after its call, which the episode loop keeps and trains as well), and between
turns the replies as the chat template's delta (mask 0). So the warm-up trains exactly the tokens that RL
samples afterwards, under the same mask.

A batch is a Rollout whose groups are micro-batches of examples sharing their common prefix as one prompt
(the prompt-shared layout computes it once, with the same gradient), or of one example each; the loss is the
mean negative log-likelihood of the batch's assistant tokens (every token weighs the same). The optimizer
step, micro-batches, LoRA or full weights, layouts, checkpoints and exact resume are those of the RL runs:
`grouprl train` resumes an SFT run too, and starts RL from its output (model.name_or_path:
<output_dir>/final).
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from rich.console import Console
from rich.markup import escape

from grouprl.errors import UserError
from grouprl.learner import PolicyOnly, no_grad_rows, run_minibatches
from grouprl.logprobs import attention, forward_groups, pick_layout
from grouprl.losses import Normaliser, token_mean
from grouprl.microbatch import Budget
from grouprl.models import trainable_parameters
from grouprl.optim import make_optimizer
from grouprl.rollout import Rollout, eos_ids

ROLES = ("system", "user", "assistant", "tool")


# ---------------------------------------------------------------- data: conversations


def conversation(row: dict, column: str, where: str) -> list[dict]:
    """The messages of a data row: its `column` (chat messages), or TRL's prompt and completion columns (text
    or messages each). Each message comes back as {role, content} (and tool_calls: [{name, arguments}] on an
    assistant message that has them); anything else is one UserError naming the row."""
    if column in row:
        messages = _listed(row[column])
    elif "prompt" in row and "completion" in row:
        prompt, completion = _listed(row["prompt"]), _listed(row["completion"])
        messages = (prompt if isinstance(prompt, list) else [{"role": "user", "content": prompt}]) + \
            (completion if isinstance(completion, list) else [{"role": "assistant", "content": completion}])
    else:
        raise UserError(f"{where}: no {column!r} column, nor 'prompt' and 'completion': expected chat messages "
                        f"[{{\"role\": ..., \"content\": ...}}, ...] in {column!r} (sft.messages_column)")
    if not isinstance(messages, list) or not messages:
        raise UserError(f"{where}: {column!r} is not a list of messages: expected [{{\"role\": ..., \"content\": "
                        "...}, ...]")
    out = [_message(m, f"{where} message {i + 1}") for i, m in enumerate(messages)]
    first = next((i for i, m in enumerate(out) if m["role"] == "assistant"), None)
    if first is None:
        raise UserError(f"{where}: no assistant message: expected at least one (the turns that are trained)")
    if first == 0 or out[first - 1]["role"] != "user":
        raise UserError(f"{where}: the messages before the first assistant turn end with "
                        f"{out[first - 1]['role'] if first else 'nothing'!r}: expected a user turn (the prompt)")
    if out[-1]["role"] != "assistant":
        raise UserError(f"{where}: the last message is {out[-1]['role']!r}: expected an assistant turn (what follows "
                        "the last one is never trained)")
    if any(m["role"] == "system" for m in out[1:]):
        raise UserError(f"{where}: a system message after the first message: expected it first, if at all")
    return out


def _listed(value):
    return value.tolist() if hasattr(value, "tolist") and not isinstance(value, str) else value  # parquet arrays


def _message(m, where: str) -> dict:
    if not isinstance(m, dict) or m.get("role") not in ROLES:
        raise UserError(f"{where}: expected {{\"role\": one of {list(ROLES)}, \"content\": text}} (got {str(m)[:60]})")
    calls = _listed(m.get("tool_calls")) if m["role"] == "assistant" else None
    content = m.get("content")
    if content is None and calls:
        content = ""
    if not isinstance(content, str):
        raise UserError(f"{where}: its content is {type(content).__name__}: expected text")
    out = {"role": m["role"], "content": content}
    if calls:
        out["tool_calls"] = [_call(c, where) for c in calls]
    return out


def _call(call, where: str) -> dict:
    """A tool call as {name, arguments: dict}, from OpenAI's form ({"type": "function", "function": {...}}) or a
    plain {name, arguments}; arguments may be a JSON string."""
    fn = call.get("function", call) if isinstance(call, dict) else None
    args = fn.get("arguments", {}) if isinstance(fn, dict) else None
    if isinstance(args, str):
        try:
            args = json.loads(args)
        except ValueError:
            args = None
    if not (isinstance(fn, dict) and isinstance(fn.get("name"), str) and isinstance(args, dict)):
        raise UserError(f"{where}: a tool call that is not {{\"name\": text, \"arguments\": {{...}}}} (got "
                        f"{str(call)[:80]})")
    return {"name": fn["name"], "arguments": args}


def write_demonstrations(cfg, out: Path, num: int | None = None) -> tuple[int, int]:
    """The environment's worked episodes (its `demonstrate(row)`) of the task's first `num` training rows (all
    by default), as SFT data in `out`: one conversation per line, the prompt as RL shows it (its system turn
    without the tools, which SFT and RL both add), then the row's other columns. Returns (written, rows the
    environment had none for)."""
    from grouprl.envs import Environment, load_env
    from grouprl.guard import write_atomic
    from grouprl.tasks import build_task
    from grouprl.tasks.data import origin_of

    if not cfg.env.name:
        raise UserError("demonstrations need env.name: the environment whose demonstrate(row) writes them")
    cls = load_env(cfg.env.name)
    if getattr(cls, "demonstrate", Environment.demonstrate) is Environment.demonstrate:
        raise UserError(f"environment {cfg.env.name!r} has no demonstrate(row): expected one that returns a worked "
                        "episode's messages (docs/sft.md)")
    task = build_task(cfg.task)
    lines, missing = [], 0
    for k, row in enumerate(task.train[:num]):
        where = origin_of(row, f"training row {k + 1}")
        try:
            env = cls()
            prompt = env.reset(dict(row))
            demo = env.demonstrate(dict(row))
        except Exception as e:
            raise UserError(f"environment {cfg.env.name!r} failed to demonstrate {where}: {type(e).__name__}: "
                            f"{str(e).splitlines()[0] if str(e) else ''}") from None
        if demo is None:
            missing += 1
            continue
        shown = {**row, "prompt": prompt} if isinstance(prompt, str) else row
        messages = task.messages(shown) + list(demo) if isinstance(demo, (list, tuple)) else demo
        conversation({"messages": messages}, "messages", f"environment {cfg.env.name!r}'s demonstration of {where}")
        lines.append(json.dumps({"messages": messages, **{c: v for c, v in row.items() if c != "prompt"}},
                                default=str))
    if not lines:
        raise UserError(f"environment {cfg.env.name!r} demonstrated none of the {len(task.train[:num])} training rows "
                        "(demonstrate returned None for each)")
    out.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(out, "\n".join(lines) + "\n")
    return len(lines), missing


# ---------------------------------------------------------------- tokens, as the episode loop lays them out


@dataclass
class Example:
    prompt: list[int]  # the chat template's prompt (and task.prefill)
    ids: list[int]  # the assistant turns and the replies between them
    mask: list[float]  # 1.0 on the assistant's tokens
    origin: str

    def __len__(self) -> int:
        return len(self.prompt) + len(self.ids)


def end_of_turn(tokenizer, chat) -> int:
    """The token that ends the model's turns: the first of the template's end of an assistant turn when it is
    a special token (Qwen's and SmolLM's <|im_end|>), else the tokenizer's EOS."""
    closing = tokenizer(chat.closing, add_special_tokens=False)["input_ids"]
    if closing and closing[0] in tokenizer.all_special_ids:
        return closing[0]
    if tokenizer.eos_token_id is None:
        raise UserError("the tokenizer has no EOS token and its chat template no special end-of-turn token: "
                        "expected one (it ends the trained turns)")
    return tokenizer.eos_token_id


def turn_text(chat, message: dict) -> str:
    """An assistant message as the model writes it: its content, then its tool calls in the form the episode
    loop reads (the template's own where it renders the tools, else Hermes <tool_call> tags)."""
    if not message.get("tool_calls"):
        return message["content"]
    if chat.tools:  # the template writes calls its own way: what it adds for this message, its end of turn cut
        head = chat.head
        before = chat.render(head, True)
        after = chat.render(head + [message], False)
        if after.startswith(before) and after.endswith(chat.closing):
            return after[len(before):len(after) - len(chat.closing)]
    from grouprl.envs.calls import CLOSE, OPEN

    return message["content"] + "".join(f"{OPEN}\n{json.dumps(c)}\n{CLOSE}" for c in message["tool_calls"])


def tokenize(messages: list[dict], task, chat, tokenizer, prefill: str, end: int, origin: str) -> Example:
    """One conversation (`conversation`'s) as prompt ids, then the completion ids and their loss mask."""
    first = next(i for i, m in enumerate(messages) if m["role"] == "assistant")
    prompt = tokenizer(task.chat_prompt(tokenizer, {"prompt": messages[:first]}, prefill),
                       add_special_tokens=False)["input_ids"]
    ended_text = tokenizer.decode([end])
    ids: list[int] = []
    mask: list[float] = []
    i = first
    while i < len(messages):
        text = turn_text(chat, messages[i])
        if i == first and prefill:
            if not text.startswith(prefill):
                raise UserError(f"{origin}: the first assistant turn does not start with task.prefill {prefill!r}, "
                                "which ends the prompt: expected turns that start with it, or task.prefill: ''")
            text = text[len(prefill):]
        j = next((k for k in range(i + 1, len(messages)) if messages[k]["role"] == "assistant"), len(messages))
        replies = messages[i + 1:j]
        turn = tokenizer(text, add_special_tokens=False)["input_ids"] + [end]
        ids += turn
        mask += [1.0] * len(turn)
        if j < len(messages):
            reply = chat.reply_ids([chat.message(m["role"], m["content"]) for m in replies], ended_text)
            ids += reply
            mask += [0.0] * len(reply)
        i = j
    return Example(prompt, ids, mask, origin)


def examples(source: str, column: str, task, chat, tokenizer, prefill: str, max_tokens: int,
             console: Console) -> list[Example]:
    """Every row of `source` tokenized; those over max_tokens are dropped, and counted."""
    from grouprl.tasks.data import load_rows, origin_of

    rows = load_rows(source)
    if not rows:
        raise UserError(f"sft data {source!r} is empty: expected conversations, one per row")
    end = end_of_turn(tokenizer, chat)
    out = []
    for n, row in enumerate(rows):
        where = origin_of(row, f"{source!r} row {n + 1}")
        out.append(tokenize(conversation(row, column, where), task, chat, tokenizer, prefill, end, where))
    kept = [e for e in out if len(e) <= max_tokens]
    if len(kept) < len(out):
        console.print(f"dropped {len(out) - len(kept)} of {len(out)} examples of {escape(source)} over "
                      f"{max_tokens} tokens (sft.max_tokens)")
    if not kept:
        raise UserError(f"every example of {source!r} is over sft.max_tokens={max_tokens} tokens: raise it")
    return kept


def collate(batch: list[Example], pad: int, device, group_size: int = 1) -> Rollout:
    """Examples as a Rollout: groups of `group_size` consecutive examples (it divides the batch), each group's
    prompt the longest run of tokens its examples share from the start (the system prompt and tools, say),
    cut before the first trained token, and each row's completion the rest of its tokens. With the
    prompt-shared layout (logprobs.py) a group's prompt is computed once for all its rows, with the same
    gradient. group_size 1: every example's prompt its own. Prompts left-padded, completions right-padded."""
    g = group_size
    rows, masks, cuts = [e.prompt + e.ids for e in batch], [[0.0] * len(e.prompt) + e.mask for e in batch], []
    for k in range(0, len(batch), g):
        members = [rows[i] for i in range(k, k + g)]
        trained_from = min(len(e.prompt) for e in batch[k:k + g])  # the first trained token stays in the completion
        cuts += [min(len(os.path.commonprefix(members)), trained_from)] * g
    if g > 1 and min(cuts) == 0:  # a group shares nothing: each example its own prompt
        return collate(batch, pad, device)
    n, p, c = len(batch), max(cuts), max(max(len(r) - cut for r, cut in zip(rows, cuts)), 1)
    ids = torch.full((n, p + c), pad, dtype=torch.long)
    att = torch.zeros(n, p + c, dtype=torch.long)
    mask = torch.zeros(n, c)
    for i, (row, m, cut) in enumerate(zip(rows, masks, cuts)):
        ids[i, p - cut:p + len(row) - cut] = torch.tensor(row, dtype=torch.long)
        att[i, p - cut:p + len(row) - cut] = 1
        mask[i, :len(row) - cut] = torch.tensor(m[cut:])
    return Rollout(ids.to(device), att.to(device), mask.to(device), torch.zeros(n, dtype=torch.bool, device=device),
                   [""] * n, [i // g for i in range(n)], g, 1.0)


# ---------------------------------------------------------------- the update


class SFT(PolicyOnly):
    """The supervised stage as a learner: the policy, its optimizer and the token budget (what checkpoints
    save and a resume restores, as GRPO's)."""

    name = "SFT"

    def __init__(self, cfg, policy: torch.nn.Module, pad: int = 0):
        self.cfg, self.policy, self.pad = cfg, policy, pad
        self.layout = pick_layout(cfg.model.update_layout, cfg.model.gradient_checkpointing, attention(policy))
        self.optim = make_optimizer([p for p in policy.parameters() if p.requires_grad], cfg.optim.lr, cfg.optim)
        self.trainable_parameters = trainable_parameters(policy)
        self.budget = Budget(cfg.max_tokens_per_micro_batch, "lower sft.micro_batch_size or sft.max_tokens")

    @staticmethod
    def resume_problem(cfg, step: int) -> str | None:
        return None

    def collate(self, examples: list[Example], device) -> Rollout:
        """A batch as the layout wants it: under the prompt-shared layout, micro-batches of examples that share
        their common prefix (the system prompt and tools) as one prompt; else, or under a token budget (which
        splits micro-batches by tokens, never inside a group), each example whole."""
        share = self.layout == "shared" and self.cfg.max_tokens_per_micro_batch is None
        g = self.cfg.sft.micro_batch_size if share else 1
        return collate(examples, self.pad, device, g if len(examples) % g == 0 else 1)

    def update(self, batch: Rollout) -> dict[str, float]:
        """One optimizer step on the batch: the mean NLL of its assistant tokens."""
        mask = batch.completion_mask
        self.policy.train()

        def micro_step(rows, norm: Normaliser):
            out = forward_groups(self.policy, batch, rows, layout=self.layout)
            loss = token_mean(-out.logp, mask[rows], norm)
            return loss, {"loss": loss.item()}

        p = run_minibatches(batch, mask, epochs=1, minibatches=1, micro_batch_size=self.cfg.sft.micro_batch_size,
                            max_len=batch.completion_len, optims=[self.optim], models=[self.policy],
                            micro_step=micro_step, budget=self.budget)
        out = {"tokens": float(mask.sum()), "lr": self.optim.lr(), "nonfinite_steps": float(p.nonfinite),
               **self.budget.metrics()}
        if p.steps:
            out |= {"loss": p.sums["loss"], "grad_norm": p.grad_norms[0]}
        return out

    def loss(self, data: list[Example], device) -> float:
        """The mean NLL of the assistant tokens of `data`, without gradients."""
        self.policy.eval()
        total = tokens = 0.0
        size = self.cfg.sft.batch_size
        for k in range(0, len(data), size):
            batch = self.collate(data[k:k + size], device)

            def nll(rows, batch=batch):
                return {"nll": -forward_groups(self.policy, batch, rows, layout=self.layout).logp
                        * batch.completion_mask[rows]}

            per_micro = max(1, self.cfg.sft.micro_batch_size // batch.group_size)
            got = no_grad_rows(len(batch.completions), batch.group_size, per_micro, nll, batch, self.budget)["nll"]
            total, tokens = total + float(got.sum()), tokens + float(batch.completion_mask.sum())
        return total / max(tokens, 1.0)


# ---------------------------------------------------------------- the run


def inputs(cfg, tokenizer, console: Console) -> tuple[list[Example], list[Example], object]:
    """The training and held-out examples, tokenized and checked before any model is loaded, and the chat
    format they were laid out with."""
    import dataclasses

    from grouprl.episodes import ChatFormat, setup
    from grouprl.models import context_length, resolve_model_path
    from grouprl.tasks import Task

    task = Task("sft", [{"prompt": "Q"}], [], "", "correctness", messages_system=cfg.task.system_prompt)
    if cfg.env.name:  # the tools described as RL will show them
        env, task = setup(cfg.env, tokenizer, dataclasses.replace(task, train=[{"prompt": "Q", "answer": "0"}]))
        chat = env.chat
    else:
        chat = ChatFormat(tokenizer, [{"role": "system", "content": "S"}], has_tools=True)
    for fallback in chat.fallbacks:
        console.print(f"sft: {fallback}")
    limit = cfg.sft.max_tokens or context_length(resolve_model_path(cfg.model.name_or_path),
                                                 cfg.model.trust_remote_code) or 2048
    s = cfg.sft
    train = examples(s.source, s.messages_column, task, chat, tokenizer, cfg.task.prefill, limit, console)
    held = examples(s.eval_source, s.messages_column, task, chat, tokenizer, cfg.task.prefill, limit, console) \
        if s.eval_source else []
    return train, held, chat


def run(cfg, console: Console, out: Path, start: float, locks: list, stop, resume: bool):
    """The SFT steps of `grouprl train` (loop.train calls it for algo: sft): cfg.steps optimizer steps of
    sft.batch_size examples, in a seeded order epoch after epoch; checkpoints, stops and resumes as RL runs do."""
    import random

    from grouprl.batch import PromptStream
    from grouprl.checkpoint import latest_checkpoint, prune_checkpoints, save_checkpoint
    from grouprl.config import save_config
    from grouprl.distributed import world_size
    from grouprl.errors import Stopped
    from grouprl.guard import RunLock, write_atomic
    from grouprl.loop import TrainResult, _progress, _refuse, _restore, _resume_point, damaged, peak_memory_gib
    from grouprl.metrics import MetricsLog, read_metrics, truncate_jsonl
    from grouprl.models import load_policy, load_tokenizer, resolve_model_path

    ckpt = _resume_point(out, cfg, {}, console) if resume else None
    if world_size() > 1:
        _refuse(["algo=sft runs in one process for now (no torchrun)"])
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    tokenizer = load_tokenizer(resolve_model_path(cfg.model.name_or_path), cfg.model.trust_remote_code)
    train, held, chat = inputs(cfg, tokenizer, console)
    if not resume:  # (a resume took it before anything else)
        locks.append(RunLock(out).acquire())
    policy, tokenizer = load_policy(cfg.model)
    device = next(policy.parameters()).device
    end, stops = end_of_turn(tokenizer, chat), eos_ids(policy, tokenizer)
    if end not in stops:
        raise UserError(f"the turns are trained to end with {tokenizer.decode([end])!r}, which the model's generation "
                        f"config does not stop at ({[tokenizer.decode([t]) for t in stops]}): set its eos_token_id "
                        "to include it")
    learner = SFT(cfg, policy, tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0)
    stream = PromptStream(train, cfg.seed, in_order=False)
    history: list[dict] = []
    first_step = 1
    if ckpt is not None:
        state = _restore(ckpt, learner)
        if state["data"]["index"] > len(train):
            raise damaged(ckpt, ValueError(f"its data position {state['data']['index']} is past the {len(train)} "
                                           "examples"))
        stream = PromptStream(train, cfg.seed, False, **state["data"])
        first_step = state["step"] + 1
        history = [m for m in read_metrics(out / "metrics.jsonl") if m["step"] < first_step]
        start -= history[-1].get("elapsed", 0.0) if history else 0.0
        truncate_jsonl(out / "metrics.jsonl", first_step - 1)
    save_config(cfg, out / "grouprl.yaml")
    write_atomic(out / "run_info.json", json.dumps({
        "algo": "sft", "models_trained": 1, "models_in_memory": 1, "trainable_parameters": learner.trainable_parameters,
        "device": str(device), "world_size": 1, "strategy": None}, indent=1))
    log = MetricsLog(out, cfg.report_to, cfg.model_dump(mode="json"), cfg.project, cfg.run_name)
    epoch_steps = len(train) / cfg.sft.batch_size
    console.print(f"[bold]grouprl[/] {escape(f'SFT on {cfg.sft.source} ({len(train)} examples, {len(held)} held-out)')}"
                  f", model {escape(cfg.model.name_or_path)}, {learner.trainable_parameters:,} trainable parameters, "
                  f"batch {cfg.sft.batch_size}: {cfg.steps} steps = {cfg.steps / epoch_steps:.2f} epochs, layout "
                  f"{learner.layout} -> {escape(str(out))}"
                  + (f", resumed after step {first_step - 1}" if ckpt else ""))

    def checkpoint(path: Path, step: int) -> Path:
        log.sync()
        state = {"step": step, "data": stream.state(), "seed": cfg.seed, "reward_files": {}, **learner.state()}
        return save_checkpoint(path, learner.policy, tokenizer, cfg, state, learner.trained(), cfg.save_merged)

    bad_streak = 0
    try:
        with _progress(console, "SFT") as bar:
            job = bar.add_task("sft", total=cfg.steps, completed=first_step - 1, info="")
            for step in range(first_step, cfg.steps + 1):
                if step == first_step and stop.requested:
                    raise Stopped(f"stopped by {stop.requested} before step {step}: nothing new to save; start "
                                  f"again with: grouprl train --resume {out}")
                t0 = time.perf_counter()
                batch = learner.collate(stream.take(cfg.sft.batch_size), device)
                m = learner.update(batch)
                m |= {"epoch": stream.epoch + stream.index / len(train), "step_time": time.perf_counter() - t0,
                      "peak_mem_gib": peak_memory_gib(device)}
                evaluated = held and (step == cfg.steps or (cfg.eval_every and step % cfg.eval_every == 0))
                if evaluated:
                    m["eval/loss"] = learner.loss(held, device)
                m["elapsed"] = time.perf_counter() - start
                history.append({"step": step, **m})
                log.log(step, m)
                bar.console.print(f"step {step:>4}  loss {m['loss']:.4f}" if "loss" in m else
                                  f"step {step:>4}  update skipped (non-finite)",
                                  f" held-out loss {m['eval/loss']:.4f}" if evaluated else "",
                                  f" {m['tokens']:.0f} tokens  {m['step_time']:.1f}s", sep="")
                bar.update(job, advance=1, info=f"loss {m.get('loss', float('nan')):.3f}")
                bad_streak = bad_streak + 1 if m["nonfinite_steps"] else 0
                if bad_streak >= cfg.max_nonfinite_steps:
                    raise UserError(f"{bad_streak} steps in a row had a non-finite loss or gradient norm (up to step "
                                    f"{step}): stopped; the last good checkpoint is {latest_checkpoint(out) or 'none'}."
                                    " Lower optim.lr or use float32")
                if step == cfg.steps:
                    break
                if stop.requested or (cfg.save_every and step % cfg.save_every == 0):
                    saved = checkpoint(out / "checkpoints" / f"step-{step:06d}", step)
                    prune_checkpoints(out, cfg.save_total_limit)
                if stop.requested:
                    raise Stopped(f"stopped by {stop.requested} after step {step}; saved {saved}. Resume with: "
                                  f"grouprl train --resume {out}")
        final = checkpoint(out / "final", cfg.steps)
    finally:
        log.close()
    return TrainResult(out, final, history, time.perf_counter() - start)
