"""Episodes of several turns: the model samples a turn, the environment answers (a tool's result or a text
reply), the model samples again, until the episode is over or reaches a limit.

Token in, token out. Everything after the prompt sits in the Rollout's completion columns: the model's
sampled ids exactly as sampled (loss mask 1) and, between its turns, the environment's replies as the chat
template's delta for the new messages (loss mask 0, attention 1). The history is never re-tokenized: each
turn is sampled from the ids so far. `ChatFormat` computes the delta and checks at the start that the
template keeps the prefix across turns.

A turn ends at an end-of-turn token (which the model sampled, so it is trained) or, for an environment with
tools, right after the token that closes a tool call (`</tool_call>`), or after an end-of-turn token that
follows it at once: the tokens an engine sampled past that are dropped (the kept ones' probabilities do not
depend on them), and the rest of the template's end of turn is appended as the environment's. A
single-turn task has no environment: its episodes end after the first turn.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import pickle
import numbers
import random
from collections import Counter
from dataclasses import dataclass, field, replace

import torch
from torch import Tensor

from grouprl import engines
from grouprl.envs import Environment, Reply, load_env, schemas, tools_of
from grouprl.envs.calls import CLOSE, parse_calls, parse_with_template, run_call
from grouprl.errors import UserError
from grouprl.limits import time_limit
from grouprl.tasks import Task, render


@dataclass(frozen=True)
class Limits:
    max_turns: int = 4  # model turns
    max_tool_calls: int = 8  # per episode
    max_reply_tokens: int = 256  # of one tool result or text reply (its content; longer is cut, and counted)
    tool_timeout_s: float = 5.0


@dataclass
class Episode:
    """One row's episode, for the rewards, the metrics and the completions log."""
    messages: list[dict] = field(default_factory=list)  # the model's turns and the replies, in order
    turn_tokens: list[int] = field(default_factory=list)  # the model's tokens in each of its turns
    tool_calls: int = 0
    errors: Counter = field(default_factory=Counter)  # tool errors by kind (calls.ERRORS)
    replies_cut: int = 0
    truncated: bool = False  # stopped by a limit (or failed) rather than finished
    failed: str | None = None  # the environment's own failure, one line
    turn_rewards: list[float] = field(default_factory=list)
    reward: float = 0.0  # the environment's outcome reward plus its per-turn rewards
    state: dict = field(default_factory=dict)  # the environment's public attributes at the end
    prefilled: int = 0  # tokens its later turns prefilled: what is new (kept cache), or the whole history again

    @property
    def turns(self) -> int:
        return len(self.turn_tokens)

    def summary(self) -> dict:
        """What the completions log and an evaluation's samples keep of it."""
        return {"episode": self.messages, "turns": self.turns, "tool_calls": self.tool_calls,
                "turn_rewards": self.turn_rewards, "truncated": self.truncated, "failed": self.failed}

    def record(self) -> dict:
        """What a reward function receives as `episode` (plain data, so it pickles to reward workers)."""
        return {"messages": self.messages, "turns": self.turns, "tool_calls": self.tool_calls,
                "errors": dict(self.errors), "truncated": self.truncated, "failed": self.failed,
                "turn_rewards": self.turn_rewards, "reward": self.reward, "state": self.state}


def shown(messages: list[dict]) -> str:
    """An episode as text, turn by turn, each with its role first (the model's turns are 'assistant')."""
    return "\n".join(f"[{m['role']}] {m['content']}" for m in messages)


# ---------------------------------------------------------------- the chat template across turns

A1, RESULT = "GROUPRL-TURN-A1", "GROUPRL-RESULT"


class ChatFormat:
    """How replies become tokens under the model's chat template. `delta(messages, ended)` is the text the
    template puts after a model turn's text when `messages` follow it: the end of the assistant turn, the
    messages, and the next generation prompt. It is read off a stand-in conversation (render it with the
    replies, take what follows the stand-in assistant text), so the real history is never rendered again.
    `ended`: the text of the end-of-turn token the model sampled (not added again), or None.

    Checked once, at the start: the template shows an assistant turn's text and a reply's content (else one
    UserError). Two fallbacks, each named in `fallbacks`: a template that cannot render a `tool` message gets
    tool results as user messages wrapped in <tool_response> (Qwen's own layout); a template that renders
    earlier turns differently once more messages follow (Qwen3 drops past think blocks; a message count in the
    system turn) does not keep the prefix, and each turn is then kept as sampled (token in, token out), which
    is what the model saw when it wrote the next one."""

    def __init__(self, tokenizer, system: list[dict], tools: list[dict] | None = None, has_tools: bool = False):
        """tools: the schemas the template renders itself (None when it cannot); has_tools: the environment
        has tools, so tool results must render (natively or not)."""
        self.tokenizer, self.tools = tokenizer, tools
        # the model's own call format where its template renders the tools and transformers can read its calls
        self.template_parser = bool(tools) and getattr(tokenizer, "response_template", None) is not None
        self.stop = None if self.template_parser else CLOSE  # a turn also ends after this text (Hermes calls)
        self.head = system + [{"role": "user", "content": "Q"}]
        self.tool_role = "tool"
        self.fallbacks: list[str] = []
        prompt = self.render(self.head, True)
        history = self.render(self.head + [{"role": "assistant", "content": A1}], False)
        if A1 not in history:
            raise UserError("the model's chat template does not show an assistant turn's text: episodes of several "
                            "turns need one that does (token in, token out)")
        self.closing = history[history.index(A1) + len(A1):]  # the template's end of an assistant turn
        problem = self._check_reply("user")
        if problem:
            raise UserError(f"the model's chat template cannot take a reply after an assistant turn ({problem}): "
                            "expected one that renders user messages after it")
        problem = self._check_reply("tool") if has_tools or tools else None
        if problem:
            self.tool_role = "tool_response"
            if self._check_reply("tool_response"):
                raise UserError(f"the model's chat template cannot take a tool result ({problem})")
            self.fallbacks.append("tool results are sent as user messages in <tool_response> tags (the template has "
                                  "no tool role)")
        after = self.render(self.head + [{"role": "assistant", "content": A1}, self.message("user", RESULT)], True)
        if not (history.startswith(prompt + A1) and after.startswith(history)):
            self.fallbacks.append("the template renders earlier turns differently once more messages follow, so it "
                                  "does not keep the prefix across turns: each turn is kept as sampled (token in, "
                                  "token out) and replies are appended as the template's delta")

    def parse(self, text: str) -> list:
        """The tool calls in a model turn."""
        return parse_with_template(text, self.tokenizer, self.tools) if self.template_parser else parse_calls(text)

    def render(self, messages: list[dict], generation_prompt: bool) -> str:
        return render(self.tokenizer, messages, tools=self.tools, add_generation_prompt=generation_prompt,
                      hint="expected a template that renders system, user, assistant and tool messages")

    def message(self, role: str, content: str) -> dict:
        """A reply message: role 'tool' (a result, in the form the template takes) or 'user'."""
        if role == "tool_response" or (role == "tool" and self.tool_role == "tool_response"):
            return {"role": "user", "content": f"<tool_response>\n{content}\n</tool_response>"}
        return {"role": role, "content": content}

    def _check_reply(self, role: str) -> str | None:
        """What goes wrong with replies of this role, or None."""
        try:
            after = self.render(self.head + [{"role": "assistant", "content": A1}, self.message(role, RESULT)], True)
        except UserError as e:
            return str(e)
        if A1 not in after or RESULT not in after[after.index(A1):]:
            return f"a {role} message after an assistant turn is not shown"
        return None

    def delta(self, messages: list[dict], ended: str | None) -> str:
        """The text appended after a model turn: the rest of the template's end of turn (less the end-of-turn
        token the model sampled, `ended`), then the messages and the next generation prompt."""
        after = self.render(self.head + [{"role": "assistant", "content": A1}] + messages, True)
        text = after[after.index(A1) + len(A1):]
        if ended and text.startswith(ended):
            text = text[len(ended):]
        return text

    def reply_ids(self, messages: list[dict], ended: str | None) -> list[int]:
        return self.tokenizer(self.delta(messages, ended), add_special_tokens=False)["input_ids"]


# ---------------------------------------------------------------- starting episodes


@dataclass
class Setup:
    """A run's environment, checked: its class, the chat format of its turns, the limits."""
    name: str
    cls: type
    chat: ChatFormat
    limits: Limits

    def start(self, rows: list[dict], group_size: int) -> tuple[list, list[dict]]:
        """G new environments per row (one per episode), reset on it, and the rows with the prompt their
        reset returned (when it returned one). An environment that fails to start (reset raises, returns
        the wrong type or another prompt than its group's first) is a `StartFailed`: its episode ends after
        the first turn, truncated and counted as failed."""
        envs, out = [], []
        for row in rows:
            first = None
            for j in range(group_size):
                try:
                    with time_limit(self.limits.tool_timeout_s) as limit:
                        env = self.cls()
                        prompt = env.reset(dict(row))
                    if limit.expired:
                        raise TimeoutError(f"reset took longer than {self.limits.tool_timeout_s:g}s")
                    if prompt is not None and not isinstance(prompt, str):
                        raise TypeError(f"reset returned {type(prompt).__name__}: expected a str (the prompt) or None")
                    if j == 0:
                        first = prompt
                    elif prompt != first:
                        raise ValueError("reset gave another prompt than the first of its group: expected one that "
                                         "depends on the row only (seed any randomness from it)")
                except Exception as e:
                    env = StartFailed(f"{type(e).__name__}: {str(e)[:200]}")
                envs.append(env)
            out.append({**row, "prompt": first} if first is not None else row)
        return envs, out


@dataclass
class StartFailed:
    """An environment that failed to start, and why."""
    reason: str


def setup(cfg, tokenizer, task: Task) -> tuple[Setup, Task]:
    """The environment of an EnvConfig (whose name is set), loaded and checked on the first training row
    (constructor, reset, tools), with the chat template checked across turns: before any model is loaded
    in training, every problem one UserError naming the environment. Returns the setup and the task with
    the tools shown to the model."""
    name = cfg.name
    limits = Limits(cfg.max_turns, cfg.max_tool_calls, cfg.max_reply_tokens, cfg.tool_timeout_s)
    cls = load_env(name)
    try:
        probe = cls()
        prompt = probe.reset(dict(task.train[0]))
    except Exception as e:
        raise UserError(f"environment {name!r} failed to start on the first training row: {type(e).__name__}: "
                        f"{str(e).splitlines()[0] if str(e) else ''}") from None
    if prompt is not None and not isinstance(prompt, str):
        raise UserError(f"environment {name!r}: reset returned {type(prompt).__name__}: expected a str (the "
                        "user's prompt) or None (keep the row's)")
    tools = schemas(name, tools_of(probe))
    if not tools and getattr(type(probe), "step", Environment.step) is Environment.step:
        raise UserError(f"environment {name!r} has no tools and no step: expected public methods (its tools) or a "
                        "step(text) that replies")
    plain = [{"role": "system", "content": "S"}, {"role": "user", "content": "Q"}]
    native = bool(tools) and render(tokenizer, plain, tools=tools) != render(tokenizer, plain)  # does it show them?
    task = dataclasses.replace(task, tools=tools or None, tools_native=native)
    chat = ChatFormat(tokenizer, [{"role": "system", "content": "S"}], tools if native else None, has_tools=bool(tools))
    return Setup(name, cls, chat, limits), task


def sample(model, tokenizer, task: Task, rows: list[dict], group_size: int, prefill: str, env: Setup | None,
           **generate_kw) -> tuple[list[dict], list[str], object, list[Episode] | None]:
    """G samples of each row through `rollout.generate`: episodes with `env` (G new environments per row,
    whose reset may give a row its prompt), single turns without. Returns the rows as shown, their chat
    prompts (one per row), the Rollout, and the episodes (None without an environment)."""
    from grouprl.rollout import generate

    envs = None
    if env is not None:
        envs, rows = env.start(rows, group_size)
    prompts = [task.chat_prompt(tokenizer, r, prefill) for r in rows]
    out = generate(model, tokenizer, prompts, group_size=group_size, prefill=prefill, envs=envs,
                   chat=env and env.chat, limits=env and env.limits, **generate_kw)
    rollout, episodes = out if env is not None else (out, None)
    return rows, prompts, rollout, episodes


# ---------------------------------------------------------------- the episode loop


def stop_at_close(tokenizer, ids: list[int], stop: str = CLOSE) -> int:
    """The number of tokens through the one that completes the first `stop` (`</tool_call>`), or len(ids)."""
    if stop not in tokenizer.decode(ids):
        return len(ids)
    lo, hi = 1, len(ids)  # the smallest k whose text contains it (containment only grows with k)
    while lo < hi:
        mid = (lo + hi) // 2
        if stop in tokenizer.decode(ids[:mid]):
            hi = mid
        else:
            lo = mid + 1
    return lo


def _turn_seed(seed: int, row: int, turn: int) -> int:
    return random.Random(f"{seed}/{row}/{turn}").getrandbits(63)


def _cut(tokenizer, text: str, max_tokens: int) -> tuple[str, bool]:
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if len(ids) <= max_tokens:
        return text, False
    return tokenizer.decode(ids[:max_tokens]) + " [cut]", True


def _is_real(x) -> bool:
    return isinstance(x, numbers.Real) and not isinstance(x, bool) and math.isfinite(float(x))


class Rows:
    """The growing completion columns of every episode: ids, loss mask, the engine's log-probs, per-turn
    rewards on the last model token of their turn."""

    def __init__(self, n: int):
        self.ids = [[] for _ in range(n)]
        self.mask = [[] for _ in range(n)]
        self.logp = [[] for _ in range(n)]
        self.turn_reward = [{} for _ in range(n)]  # position -> reward

    def add(self, i: int, ids: list[int], model: bool, logp: list[float] | None = None):
        self.ids[i] += ids
        self.mask[i] += [1.0 if model else 0.0] * len(ids)
        self.logp[i] += logp if logp is not None else [0.0] * len(ids)


def run(model, tokenizer, prompt_ids: Tensor, prompt_mask: Tensor, first: engines.Sampled,
        params: engines.SamplingParams, engine: str, envs: list, chat: ChatFormat | None,
        limits: Limits | None, prefill: str) -> tuple[dict, list[Episode]]:
    """Carry on the episodes whose first turn is `first` (G per prompt, as sampled from prompt_ids) until
    each is over. envs: one per row: an Environment, None (no environment: the episode ends after its first
    turn) or a StartFailed (the same, counted as failed and truncated). Returns the completion columns as
    tensors (ids, loss mask, attention, log-probs, turn rewards, truncated) and the episodes."""
    n, g = len(envs), params.group_size
    device = prompt_ids.device
    eos = set(params.eos)
    prompts = [ids[m.bool()].tolist() for ids, m in zip(prompt_ids, prompt_mask)]
    rows = Rows(n)
    episodes = [Episode() for _ in range(n)]
    for ep, env in zip(episodes, envs):
        if isinstance(env, StartFailed):
            ep.failed, ep.truncated = f"reset failed: {env.reason}", True
    envs = [None if isinstance(e, StartFailed) else e for e in envs]
    tools = [tools_of(e) if e is not None else {} for e in envs]
    active = list(range(n))
    out, turn = first, 1
    kept: list = [None] * n  # each row's KV cache after its turn (grouprl engine): the next turn reads only what is new
    read = [0] * n  # how many of the row's context tokens that cache has read
    while True:
        for j, i in enumerate(active):
            kept[i] = out.kept[j] if out.kept is not None else None
        still = []
        sampled_rows = out.completion_ids.tolist()  # one copy from the device per turn
        logp_rows = out.logprobs.tolist() if out.logprobs is not None else None
        for j, i in enumerate(active):
            ep, env, sampled = episodes[i], envs[i], sampled_rows[j]
            k = next((t + 1 for t, x in enumerate(sampled) if x in eos), len(sampled))
            if tools[i] and chat.stop:
                close = stop_at_close(tokenizer, sampled[:k], chat.stop)
                if close < k:  # the turn ends at the call, or at the model's end of turn right after it (the
                    after = tokenizer.decode(sampled[close:close + 1])  # template's: not Qwen's <|endoftext|>)
                    k = close + (sampled[close] in eos and chat.closing.startswith(after))
            k = min(k, params.max_new_tokens - len(rows.ids[i]))
            ended = tokenizer.decode(sampled[k - 1:k]) if k > 0 and sampled[k - 1] in eos else None
            ids = sampled[:k]
            rows.add(i, ids, True, logp_rows[j][:k] if logp_rows is not None else None)
            if kept[i] is not None:  # what the cache read past the turn's kept tokens is dropped
                read[i] = min(kept[i].length, len(prompts[i // g]) + len(rows.ids[i]))
                kept[i] = kept[i].crop(read[i])
            ep.turn_tokens.append(k)
            text = (prefill if turn == 1 else "") + tokenizer.decode(ids, skip_special_tokens=True)
            ep.messages.append({"role": "assistant", "content": text})
            # calls are read with special tokens kept: a tokenizer may have made <tool_call> one of them
            raw = (prefill if turn == 1 else "") + tokenizer.decode(ids) if tools[i] else text
            if not (ended or (tools[i] and chat.stop and chat.stop in raw)):  # the budget ran out inside the turn
                ep.truncated = True
                continue
            rewarded = len(ep.turn_rewards)
            replies = _answer(env, tools[i], text, raw, ep, limits, turn, chat, tokenizer)
            if len(ep.turn_rewards) > rewarded:  # on the last token of this turn
                rows.turn_reward[i][len(rows.ids[i]) - 1] = ep.turn_rewards[-1]
            if replies is None:
                continue
            reply = chat.reply_ids(replies, ended)
            if len(rows.ids[i]) + len(reply) >= params.max_new_tokens:
                ep.truncated = True  # no room for the reply and a next turn
                continue
            rows.add(i, reply, False)
            ep.messages += replies
            still.append(i)
        for i in set(active) - set(still):
            kept[i] = None  # the episode is over: its cache is freed
        if not still:
            break
        active, turn = still, turn + 1
        context = [prompts[i // g] + rows.ids[i] for i in active]
        seeds = None if params.seeds is None else tuple(_turn_seed(params.seeds[i // g], i % g, turn) for i in active)
        turn_params = replace(params, group_size=1, seeds=seeds,
                              max_new_tokens=max(params.max_new_tokens - len(rows.ids[i]) for i in active))
        if all(kept[i] is not None for i in active):
            chunks = [c[read[i]:] for i, c in zip(active, context)]
            for i, c in zip(active, chunks):
                episodes[i].prefilled += len(c)
            out = engines.resume(model, [kept[i] for i in active], chunks, turn_params)
            continue
        for i, c in zip(active, context):
            episodes[i].prefilled += len(c)
        width = max(len(c) for c in context)
        ids = torch.full((len(active), width), params.pad_token_id, dtype=torch.long)
        mask = torch.zeros(len(active), width, dtype=torch.long)
        for j, c in enumerate(context):
            ids[j, width - len(c):] = torch.tensor(c)
            mask[j, width - len(c):] = 1
        out = engines.sample(engine, model, ids.to(device), mask.to(device), turn_params)
    for ep, env in zip(episodes, envs):
        if env is not None:
            _finish(ep, env, limits)
    return _columns(rows, episodes, params.pad_token_id, device), episodes


def _answer(env, tools: dict, text: str, raw: str, ep: Episode, limits: Limits, turn: int, chat: ChatFormat,
            tokenizer) -> list[dict] | None:
    """The environment's reply messages to a model turn (text: without special tokens; raw: with them,
    where calls are read), or None when the episode is over."""
    if env is None:
        return None
    calls = chat.parse(raw) if tools else []
    if calls:
        if turn >= limits.max_turns or ep.tool_calls + len(calls) > limits.max_tool_calls:
            ep.truncated = True  # the calls are not run: no turn is left to read them
            return None
        replies = []
        for call in calls:
            content, error = run_call(call, tools, limits.tool_timeout_s)
            ep.tool_calls += 1
            if error:
                ep.errors[error] += 1
            content, cut = _cut(tokenizer, content, limits.max_reply_tokens)
            ep.replies_cut += cut
            replies.append(chat.message("tool", content))
        return replies
    reply, failed = _call(env.step, "step", limits, text)
    if failed:
        ep.failed, ep.truncated = failed, True
        return None
    if isinstance(reply, str) or reply is None:
        reply = Reply(reply, done=reply is None)
    problem = (f"step returned {type(reply).__name__}: expected a Reply, a str or None"
               if not isinstance(reply, Reply) else
               f"step's Reply.text is a {type(reply.text).__name__}: expected a str or None"
               if not (reply.text is None or isinstance(reply.text, str)) else
               f"step's Reply.reward is {reply.reward!r}: expected a finite number" if not _is_real(reply.reward)
               else None)
    if problem:
        ep.failed, ep.truncated = problem, True
        return None
    ep.turn_rewards.append(float(reply.reward))
    if reply.done or reply.text is None:
        return None
    if turn >= limits.max_turns:
        ep.truncated = True
        return None
    content, cut = _cut(tokenizer, reply.text, limits.max_reply_tokens)
    ep.replies_cut += cut
    return [chat.message("user", content)]


def _call(fn, name: str, limits: Limits, *args):
    """(fn(*args), None), or (None, why it failed) when it raised or ran past the tool time limit."""
    try:
        with time_limit(limits.tool_timeout_s) as limit:
            got = fn(*args)
    except Exception as e:
        return None, f"{name} raised {type(e).__name__}: {str(e)[:200]}"
    if limit.expired:
        return None, f"{name} took longer than {limits.tool_timeout_s:g}s"
    return got, None


def _finish(ep: Episode, env, limits: Limits) -> None:
    """The environment's outcome reward and state, once the episode is over."""
    got, failed = _call(env.reward, "reward", limits)
    if got is not None and not _is_real(got):
        got, failed = None, f"reward returned {type(got).__name__}: expected a finite number or None"
    ep.failed = ep.failed or failed
    ep.reward = (float(got) if got is not None else 0.0) + sum(ep.turn_rewards)
    ep.state = {k: _plain(v) for k, v in getattr(env, "__dict__", {}).items() if not k.startswith("_")}


def _plain(value):
    """A value of the environment's state as it can travel to reward workers: itself if it pickles, else its
    repr."""
    try:
        pickle.dumps(value)
        return copy.deepcopy(value)
    except Exception:
        return repr(value)[:1000]


def _columns(rows: Rows, episodes: list[Episode], pad: int, device) -> dict:
    n = len(rows.ids)
    c = max(1, max(len(x) for x in rows.ids))
    ids = torch.full((n, c), pad, dtype=torch.long)
    mask = torch.zeros(n, c)
    attention = torch.zeros(n, c, dtype=torch.long)
    logp = torch.zeros(n, c)
    turn_rewards = torch.zeros(n, c)
    for i in range(n):
        k = len(rows.ids[i])
        ids[i, :k] = torch.tensor(rows.ids[i], dtype=torch.long)
        mask[i, :k] = torch.tensor(rows.mask[i])
        attention[i, :k] = 1
        logp[i, :k] = torch.tensor(rows.logp[i])
        for t, r in rows.turn_reward[i].items():
            turn_rewards[i, t] += r
    truncated = torch.tensor([e.truncated for e in episodes])
    return {k: v.to(device) for k, v in dict(ids=ids, mask=mask, attention=attention, logp=logp,
                                               turn_rewards=turn_rewards, truncated=truncated).items()}
