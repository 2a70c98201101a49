"""Episodes of several turns: the calculator, tool calls, the chat template's delta, the loop's ids and
masks worked out by hand (with a scripted engine), the math over model tokens only, every engine, and the
bad inputs an environment can bring."""

from __future__ import annotations

import json
import time

import pytest
import torch

from grouprl import engines
from grouprl.advantages import gae, kl_shaped_rewards
from grouprl.envs import Environment, load_env, schemas, tools_of
from grouprl.envs.calculator import Calculator, evaluate, show
from grouprl.envs.calls import Call, parse_calls, run_call
from grouprl.envs.guess import GuessNumber, secret_of
from grouprl.episodes import ChatFormat, Limits, Setup, StartFailed
from grouprl.errors import UserError
from grouprl.logprobs import LAYOUTS, forward_groups
from grouprl.losses import Normaliser, grpo_loss
from grouprl.models import load_tokenizer
from grouprl.rollout import eos_ids, generate
from grouprl.tasks import Task
from test_bad_inputs import one_error_line, write
from test_cli import base_sets, run
from test_engines import less_uniform, log_softmax_atol

T = torch.tensor
SYSTEM = [{"role": "system", "content": "S"}]


# ---------------------------------------------------------------- the calculator


@pytest.mark.parametrize("text, value", [
    ("2 + 3 * 4", 14), ("(12 + 7) * 3", 57), ("7 / 2", 3.5), ("7 // 2", 3), ("-3 ** 2", -9), ("2 ^ 10", 1024),
    ("10 % 4", 2), ("1.5 * 4", 6.0), ("6 × 7", 42),
])
def test_calculator_evaluates_arithmetic(text, value):
    assert evaluate(text) == value


@pytest.mark.parametrize("text, needle", [
    ("__import__('os').system('x')", "not arithmetic"), ("abs(-1)", "not arithmetic"), ("x + 1", "not arithmetic"),
    ("2 ** 65", "exponent"), ("9 ** 9 ** 9", "exponent"), ("10 ** 40", "larger than"), ("1 / 0", "division by zero"),
    ("1 +", "cannot parse"), ("1" * 201, "longer than"), ("+".join(["1"] * 40), "parts"),
    ("True + 1", "not arithmetic"),
    ("0 ** -1", "zero to a negative power"), ("(-8) ** 0.5", "not a real number"), ("1e308 * 10", "larger than"),
    ("(10 ** 30) ** 11", "larger than"),  # an int past float's range
])
def test_calculator_refuses_what_is_not_bounded_arithmetic(text, needle):
    with pytest.raises(ValueError, match=needle):
        evaluate(text)


def test_calculator_shows_whole_numbers_without_a_point():
    assert [show(x) for x in (14, 6.0, 3.5, 1 / 3)] == ["14", "6", "3.5", "0.3333333333"]


def test_guess_number_says_higher_or_lower_and_rewards_few_guesses():
    env = GuessNumber()
    assert "1 to 100" in env.reset({"prompt": "p", "secret": "37", "answer": "5"}) and env.secret == 37
    assert env.step("maybe 50?").text == "lower"
    assert env.step("20").text == "higher"
    assert "one whole number" in env.step("no idea").text  # not counted as a guess
    assert env.step("37").done and env.reward() == pytest.approx(0.8)  # the third guess
    assert secret_of({"prompt": "p", "secret": 37.0}) == 37  # an integer column with gaps reads as floats
    assert secret_of({"prompt": "p", "secret": 500}) == secret_of({"prompt": "p", "secret": 7.5}) \
        == secret_of({"prompt": "p", "answer": "7"})  # out of range, not whole, or none: drawn from the prompt
    secrets = [secret_of({"prompt": f"problem {k}"}) for k in range(2000)]
    assert set(secrets) == set(range(1, 101)) and max(secrets.count(s) for s in secrets) < 45  # uniform-ish


def test_guess_number_demonstrates_a_valid_game_that_its_own_replies_confirm():
    lengths = []
    for k in range(300):
        row = {"prompt": f"game {k}", "secret": 1 + k % 100}
        demo = GuessNumber().demonstrate(row)
        assert demo == GuessNumber().demonstrate(row)  # seeded by the row
        env, low, high = GuessNumber(), 1, 100
        env.reset(row)
        for i, message in enumerate(demo):
            assert message["role"] == ("assistant" if i % 2 == 0 else "user")
            if i % 2:
                continue
            guess = int(message["content"])
            assert low <= guess <= high  # never a number an earlier reply ruled out
            reply = env.step(message["content"])
            if i == len(demo) - 1:
                assert reply.done and guess == env.secret
            else:
                assert reply.text == demo[i + 1]["content"]
                low, high = (guess + 1, high) if reply.text == "higher" else (low, guess - 1)
        lengths.append(env.guesses)
    # random guessing among n possible numbers takes 2(1 + 1/n)H_n - 3 guesses on average: 7.5 for n = 100
    # (the mean of 300 games has a standard error near 0.15); halving would take 5.8
    assert 6.5 < sum(lengths) / len(lengths) < 8.5 and max(lengths) > 8

# ---------------------------------------------------------------- tool calls


def test_tool_calls_are_parsed_in_the_hermes_form():
    text = ('<tool_call>\n{"name": "calculate", "arguments": {"expression": "1+1"}}\n</tool_call> and '
            '<tool_call>{oops}</tool_call><tool_call>{"arguments": {}}</tool_call><tool_call>{"name": "a"')
    calls = parse_calls(text)
    assert calls[0] == Call("calculate", {"expression": "1+1"})
    assert [c.name for c in calls[1:]] == [None, None, None]
    assert "not JSON" in calls[1].error and '"name"' in calls[2].error and "without </tool_call>" in calls[3].error
    assert parse_calls("no call here") == []
    (stray,) = parse_calls('{"name": "calculate"}</tool_call>')  # the turn stops there: it must count as a call
    assert stray.name is None and "</tool_call> without <tool_call>" in stray.error


class Tools(Environment):
    def add(self, a: int, b: int) -> int:
        """Add two numbers.

        Args:
            a: the first
            b: the second
        """
        return a + b

    def fail(self) -> str:
        """Raise."""
        raise RuntimeError("it broke")

    def slow(self) -> str:
        """Sleep."""
        time.sleep(5)
        return "late"

    def long(self) -> str:
        """A long result."""
        return "a" * 500


@pytest.mark.parametrize("call, kind, needle", [
    (Call("add", {"a": 2, "b": 3}), None, "5"),
    (Call(None, {}, "not JSON"), "malformed", "malformed tool call"),
    (Call("mul", {}), "unknown_tool", "unknown tool 'mul': the tools are add, fail, long, slow"),
    (Call("add", {"a": 1, "c": 2}), "bad_arguments", "bad arguments for add"),
    (Call("fail", {}), "tool_raised", "fail raised RuntimeError: it broke"),
    (Call("slow", {}), "timeout", "took longer than 0.2s"),
])
def test_every_failed_call_is_a_message_and_a_counted_kind(call, kind, needle):
    text, error = run_call(call, tools_of(Tools()), timeout_s=0.2)
    assert error == kind and needle in text and text.startswith("error:") == (kind is not None)


def test_tools_are_the_public_methods_with_schemas_from_get_json_schema():
    assert sorted(tools_of(Tools())) == ["add", "fail", "long", "slow"]
    (calc,) = schemas("calculator", tools_of(Calculator()))
    assert calc["function"]["name"] == "calculate"
    assert calc["function"]["parameters"]["required"] == ["expression"]

    class NoHints(Environment):
        def tool(self, x):
            """Do.

            Args:
                x: it
            """
    with pytest.raises(UserError, match="environment 'e': tool 'tool' cannot be described"):
        schemas("e", tools_of(NoHints()))


# ---------------------------------------------------------------- the chat template across turns


def test_the_reply_is_the_templates_delta_after_the_models_turn(tool_tok):
    chat = ChatFormat(tool_tok, SYSTEM)
    assert chat.closing == "<|end|>" and chat.fallbacks == []
    tool = [chat.message("tool", "14")]
    assert chat.delta(tool, ended="<|end|>") == "<|tool|>14<|end|><|assistant|>"  # the model sampled <|end|> itself
    assert chat.delta(tool, ended=None) == "<|end|><|tool|>14<|end|><|assistant|>"  # stopped after </tool_call>
    # another end token the model may stop at (Qwen's <|endoftext|> beside <|im_end|>): the template's is added
    assert chat.delta(tool, ended="<pad>") == "<|end|><|tool|>14<|end|><|assistant|>"
    assert chat.delta([chat.message("user", "higher")], ended="<|end|>") == "<|user|>higher<|end|><|assistant|>"
    two = [chat.message("tool", "1"), chat.message("tool", "2")]  # two calls in one turn: one delta
    assert chat.delta(two, ended="<|end|>") == "<|tool|>1<|end|><|tool|>2<|end|><|assistant|>"


def with_template(tok, template):
    import copy
    tok = copy.deepcopy(tok)
    tok.chat_template = template
    return tok


COUNTING = ("{{ '<|system|>' + (messages|length)|string + '<|end|>' }}{% for m in messages %}{{ '<|' + m['role'] "
            "+ '|>' + m['content'] + '<|end|>' }}{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>' }}"
            "{% endif %}")
THINKING = ("{% for m in messages %}{{ '<|' + m['role'] + '|>' }}{% if m['role'] == 'assistant' and loop.last %}"
            "{{ '<think></think>' }}{% endif %}{{ m['content'] + '<|end|>' }}{% endfor %}{% if add_generation_prompt %}"
            "{{ '<|assistant|>' }}{% endif %}")
HIDING = ("{% for m in messages %}{{ '<|' + m['role'] + '|>' + (m['content'] if m['role'] != 'assistant' else 'x') "
          "+ '<|end|>' }}{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}")


@pytest.mark.parametrize("template", [COUNTING, THINKING], ids=["message-count", "last-turn-think-block"])
def test_a_template_that_rewrites_earlier_turns_keeps_turns_as_sampled_and_says_so(tool_tok, template):
    """Peers' drift: a template whose earlier turns change once more messages follow (Qwen3's think blocks,
    a message count). Nothing is rendered again: the reply is still the delta after the model's text."""
    chat = ChatFormat(with_template(tool_tok, template), SYSTEM)
    assert any("does not keep the prefix across turns" in f for f in chat.fallbacks)
    assert chat.delta([chat.message("user", "higher")], ended="<|end|>") == "<|user|>higher<|end|><|assistant|>"


def test_a_template_that_hides_the_models_text_is_refused(tool_tok):
    with pytest.raises(UserError, match="does not show an assistant turn's text"):
        ChatFormat(with_template(tool_tok, HIDING), SYSTEM)


@pytest.mark.parametrize("template", [
    # raises on a tool message (roles must alternate)
    "{% for m in messages %}{% if m['role'] == 'tool' %}{{ raise_exception('no tool role') }}{% endif %}"
    "{{ '<|' + m['role'] + '|>' + m['content'] + '<|end|>' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}",
    # drops any role it does not know (Zephyr's if / elif)
    "{% for m in messages %}{% if m['role'] in ('system', 'user', 'assistant') %}{{ '<|' + m['role'] + '|>' + "
    "m['content'] + '<|end|>' }}{% endif %}{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}",
], ids=["raises", "drops"])
def test_a_template_without_a_tool_role_gets_results_as_user_messages(tool_tok, template):
    chat = ChatFormat(with_template(tool_tok, template), SYSTEM, None, has_tools=True)  # tools in the system turn
    assert any("user messages in <tool_response>" in f for f in chat.fallbacks)
    expected = "<|user|><tool_response>\n5\n</tool_response><|end|><|assistant|>"
    assert chat.delta([chat.message("tool", "5")], "<|end|>") == expected


NATIVE = ("{% if tools %}{{ '<|system|>' + (tools|map(attribute='function')|map(attribute='name')|join(',')) + "
          "'<|end|>' }}{% endif %}{% for m in messages %}{{ '<|' + m['role'] + '|>' + m['content'] + '<|end|>' }}"
          "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}")
# the model's own call format, [call]{json}[/call], as a response template that transformers' parse_response reads
OWN_FORMAT = {"start_anchor": "<|assistant|>", "fields": {
    "content": {}, "tool_calls": {"open": "[call]", "close": "[/call]", "content": "json", "repeats": True,
                                  "transform": {"type": "function", "function": "{content}"}}}}


def own_format(tok):
    tok = with_template(tok, NATIVE)
    tok.response_template = OWN_FORMAT
    return tok


def test_a_template_with_a_response_parser_reads_the_models_own_call_format(tool_tok):
    tools = schemas("calculator", tools_of(Calculator()))
    chat = ChatFormat(own_format(tool_tok), SYSTEM, tools)
    assert chat.template_parser and chat.stop is None  # turns end at the end-of-turn token
    (call,) = chat.parse('[call]{"name": "calculate", "arguments": {"expression": "2*3"}}[/call]')
    assert call == Call("calculate", {"expression": "2*3"})
    (bad,) = chat.parse("[call]{oops}[/call]")
    assert bad.name is None and "the template's parser could not read it" in bad.error
    assert ChatFormat(tool_tok, SYSTEM, None, has_tools=True).parse("[call]{}[/call]") == []  # Hermes only


# ---------------------------------------------------------------- the loop, with a scripted engine


def scripted(monkeypatch, tok, turns: list[str]) -> list:
    """The engine writes turns[k] on its k-th call (the last one again after), in every row; log-prob -0.5
    per token. Returns the calls' (prompt ids, mask, params)."""
    calls = []

    def sample(engine, model, ids, mask, params):
        text = turns[min(len(calls), len(turns) - 1)]
        calls.append((ids.clone(), mask.clone(), params))
        row = tok(text, add_special_tokens=False)["input_ids"][:params.max_new_tokens]
        out = T([row] * (ids.shape[0] * params.group_size))
        return engines.Sampled(out, torch.full(out.shape, -0.5) if params.with_logprobs else None, 1)
    monkeypatch.setattr(engines, "sample", sample)
    return calls


def episodes_of(lm, tok, env_cls, limits=Limits(), max_new_tokens=200, group_size=2, prompts=("say a 1",)):
    task = Task("t", [{"prompt": p} for p in prompts], [], "S", "correctness",
                tools=schemas("t", tools_of(env_cls())) or None)
    envs = [env_cls() for _ in range(len(prompts) * group_size)]
    for e in envs:
        e.reset({"prompt": prompts[0], "answer": "37"})
    chat = ChatFormat(tok, SYSTEM)
    texts = [task.chat_prompt(tok, {"prompt": p}, "") for p in prompts]
    return generate(lm, tok, texts, group_size=group_size, max_new_tokens=max_new_tokens, envs=envs, chat=chat,
                    limits=limits, with_logprobs=True, engine="grouprl")


CALL = '<tool_call>{"name": "calculate", "arguments": {"expression": "2*(3+4)"}}</tool_call>'


def test_a_calculator_episode_by_hand(tool_lm, tool_tok, monkeypatch):
    calls = scripted(monkeypatch, tool_tok, [CALL + "zz", "14<|end|>"])
    ro, eps = episodes_of(tool_lm, tool_tok, Calculator)
    ids = lambda s: tool_tok(s, add_special_tokens=False)["input_ids"]  # noqa: E731
    turn1, reply, turn2 = ids(CALL), ids("<|end|><|tool|>14<|end|><|assistant|>"), ids("14<|end|>")
    row = turn1 + reply + turn2
    assert ro.input_ids[0, ro.prompt_len:].tolist() == row  # 'zz' after </tool_call> dropped
    assert ro.completion_mask[0].tolist() == [1.0] * len(turn1) + [0.0] * len(reply) + [1.0] * len(turn2)
    assert ro.completion_mask[0, -1] == 1 and row[-1] == eos_ids(tool_lm, tool_tok)[0]  # the EOS is trained
    assert ro.attention_mask[0, ro.prompt_len:].tolist() == [1] * len(row)
    assert ro.logprobs[0].tolist() == [-0.5] * len(turn1) + [0.0] * len(reply) + [-0.5] * len(turn2)
    assert ro.lengths.tolist() == [len(turn1) + len(turn2)] * 2 and ro.spans.tolist() == [len(row)] * 2
    assert ro.completions == ["14", "14"] and not ro.truncated.any()
    e = eps[0]
    assert (e.turns, e.tool_calls, e.turn_tokens, dict(e.errors)) == (2, 1, [len(turn1), len(turn2)], {})
    assert e.messages == [{"role": "assistant", "content": CALL}, {"role": "tool", "content": "14"},
                          {"role": "assistant", "content": "14"}]
    # the second turn is sampled from the ids so far, one row each: never re-tokenized
    prompt = calls[0][0][0][calls[0][1][0].bool()].tolist()
    second, mask, params = calls[1]
    assert params.group_size == 1 and second.shape[0] == 2
    assert second[0][mask[0].bool()].tolist() == prompt + turn1 + reply


def test_an_end_of_turn_right_after_a_call_is_the_models_and_trained(tool_lm, tool_tok, monkeypatch):
    scripted(monkeypatch, tool_tok, [CALL + "<|end|>zz", "14<|end|>"])
    ro, eps = episodes_of(tool_lm, tool_tok, Calculator)
    ids = lambda s: tool_tok(s, add_special_tokens=False)["input_ids"]  # noqa: E731
    turn1, reply, turn2 = ids(CALL + "<|end|>"), ids("<|tool|>14<|end|><|assistant|>"), ids("14<|end|>")
    assert ro.input_ids[0, ro.prompt_len:].tolist() == turn1 + reply + turn2  # the same tokens as without it
    assert ro.completion_mask[0].tolist() == [1.0] * len(turn1) + [0.0] * len(reply) + [1.0] * len(turn2)
    assert eps[0].tool_calls == 1 and eps[0].turn_tokens == [len(turn1), len(turn2)]


def test_an_episode_in_the_models_own_call_format(tool_lm, tool_tok, monkeypatch):
    tok = own_format(tool_tok)
    scripted(monkeypatch, tok, ['[call]{"name": "calculate", "arguments": {"expression": "2*3"}}[/call]<|end|>',
                                "6<|end|>"])
    tools = schemas("calculator", tools_of(Calculator()))
    task = Task("t", [{"prompt": "p"}], [], "S", "correctness", tools=tools, tools_native=True)
    prompt = task.chat_prompt(tok, {"prompt": "say a 1"}, "")
    assert prompt.startswith("<|system|>calculate<|end|>")  # the template shows the tools itself
    ro, eps = generate(tool_lm, tok, [prompt], group_size=1, max_new_tokens=200, envs=[Calculator()],
                       chat=ChatFormat(tok, SYSTEM, tools), limits=Limits())
    assert eps[0].messages[1] == {"role": "tool", "content": "6"} and ro.completions == ["6"]


def test_malformed_calls_and_unknown_tools_are_read_by_the_model(tool_lm, tool_tok, monkeypatch):
    scripted(monkeypatch, tool_tok, ['<tool_call>{"name": "nope", "arguments": {}}</tool_call>',
                                     "<tool_call>{bad json}</tool_call>",
                                     '<tool_call>{"name": "calculate", "arguments": {"x": 1}}</tool_call>',
                                     "done<|end|>"])
    ro, eps = episodes_of(tool_lm, tool_tok, Calculator, Limits(max_turns=4), max_new_tokens=1000)
    e = eps[1]
    assert e.turns == 4 and not e.truncated and e.tool_calls == 3
    assert dict(e.errors) == {"unknown_tool": 1, "malformed": 1, "bad_arguments": 1}
    tool_messages = [m["content"] for m in e.messages if m["role"] == "tool"]
    assert all(m.startswith("error:") for m in tool_messages) and len(tool_messages) == 3
    assert ro.completions[1] == "done"


@pytest.mark.parametrize("limits, max_new, turns, calls", [
    (Limits(max_turns=3), 1000, 3, 2),  # the third turn's call is not run: no turn is left to read it
    (Limits(max_turns=9, max_tool_calls=2), 1000, 3, 2),
    (Limits(max_turns=50), 300, None, None),  # the token budget ends it
])
def test_an_episode_that_never_ends_is_bounded(tool_lm, tool_tok, monkeypatch, limits, max_new, turns, calls):
    scripted(monkeypatch, tool_tok, [CALL])
    ro, eps = episodes_of(tool_lm, tool_tok, Calculator, limits, max_new_tokens=max_new)
    assert ro.truncated.all() and all(e.truncated for e in eps)
    assert ro.spans.max() <= max_new
    if turns is not None:
        assert (eps[0].turns, eps[0].tool_calls) == (turns, calls)


# A text environment with a reward per turn and at the end, as a user's file
SCORED_FILE = """
from grouprl.envs import Environment, Reply

class Scored(Environment):
    def reset(self, row):
        self.n = 0
    def step(self, text):
        self.n += 1
        return Reply("again", reward=0.25) if self.n == 1 else Reply(done=True, reward=1.0)
    def reward(self):
        return 2.0
"""
SCORED: dict = {}
exec(SCORED_FILE, SCORED)
Scored = SCORED["Scored"]


def test_per_turn_rewards_land_on_the_last_model_token_of_their_turn(tool_lm, tool_tok, monkeypatch):
    scripted(monkeypatch, tool_tok, ["ab<|end|>", "c<|end|>"])
    ro, eps = episodes_of(tool_lm, tool_tok, Scored)
    reply = len(tool_tok("<|user|>again<|end|><|assistant|>", add_special_tokens=False)["input_ids"])
    expected = [0.0, 0.0, 0.25] + [0.0] * reply + [0.0, 1.0]  # 'a', 'b', <|end|>, the reply, 'c', <|end|>
    assert ro.turn_rewards[0].tolist() == expected
    assert eps[0].turn_rewards == [0.25, 1.0] and eps[0].reward == 3.25 and eps[0].state == {"n": 2}


def test_a_long_reply_is_cut_and_counted(tool_lm, tool_tok, monkeypatch):
    scripted(monkeypatch, tool_tok, ['<tool_call>{"name": "long", "arguments": {}}</tool_call>', "x<|end|>"])
    ro, eps = episodes_of(tool_lm, tool_tok, Tools, Limits(max_reply_tokens=10))
    assert eps[0].replies_cut == 1 and eps[0].messages[1]["content"] == "a" * 10 + " [cut]"


class Broken(Environment):
    def step(self, text):
        raise KeyError("lost")


def test_an_environment_that_raises_ends_its_episode_and_is_counted(tool_lm, tool_tok, monkeypatch):
    scripted(monkeypatch, tool_tok, ["x<|end|>"])
    ro, eps = episodes_of(tool_lm, tool_tok, Broken)
    assert eps[0].failed == "step raised KeyError: 'lost'" and eps[0].truncated and ro.truncated.all()


class Picky(Environment):
    """Fails to start on rows whose prompt ends in 2; otherwise a one-reply text game."""

    def reset(self, row):
        if row["prompt"].endswith("2"):
            raise RuntimeError("no puzzle for this row")

    def step(self, text):
        return None


def test_an_environment_that_fails_to_start_ends_its_episode_truncated(tool_lm, tool_tok, monkeypatch):
    scripted(monkeypatch, tool_tok, ["x<|end|>"])
    setup = Setup("picky", Picky, ChatFormat(tool_tok, SYSTEM), Limits())
    envs, rows = setup.start([{"prompt": "say a 1"}, {"prompt": "say a 2"}], group_size=2)
    assert [isinstance(e, StartFailed) for e in envs] == [False, False, True, True]
    texts = [Task("t", [], [], "S", "correctness").chat_prompt(tool_tok, r, "") for r in rows]
    ro, eps = generate(tool_lm, tool_tok, texts, group_size=2, max_new_tokens=20, envs=envs, chat=setup.chat,
                       limits=setup.limits)
    assert ro.truncated.tolist() == [False, False, True, True]  # so mask_truncated drops them
    assert eps[2].failed == "reset failed: RuntimeError: no puzzle for this row" and eps[0].failed is None


class Random(Environment):
    def reset(self, row):
        import random
        return f"guess {random.random()}"

    def step(self, text):
        return None


def test_a_group_whose_resets_disagree_is_not_trained_on_a_prompt_it_never_saw(tool_tok):
    setup = Setup("random", Random, ChatFormat(tool_tok, SYSTEM), Limits())
    envs, _ = setup.start([{"prompt": "p"}], group_size=3)
    assert not isinstance(envs[0], StartFailed)
    assert all(isinstance(e, StartFailed) and "another prompt than the first of its group" in e.reason
               for e in envs[1:])


# ---------------------------------------------------------------- the math over model tokens only


def test_gae_skips_the_environments_tokens():
    rewards = T([[0.0, 0.5, 0.0, 0.0, 1.0, 0.0]])  # 0.5: a turn's reward on its last token
    values = T([[0.1, 0.2, 9.0, 9.0, 0.4, 7.0]])  # 9: values at environment tokens, never used
    mask = T([[1.0, 1.0, 0.0, 0.0, 1.0, 0.0]])
    adv, ret = gae(rewards, values, mask, gamma=1.0, lam=1.0)  # A = sum of later model rewards - V
    torch.testing.assert_close(adv, T([[1.4, 1.3, 0.0, 0.0, 0.6, 0.0]]))
    torch.testing.assert_close(ret, T([[1.5, 1.5, 0.0, 0.0, 1.0, 0.0]]))
    adv, _ = gae(rewards, values, mask, gamma=0.5, lam=0.0)  # one-step TD to the next *model* token
    torch.testing.assert_close(adv, T([[0.0 + 0.5 * 0.2 - 0.1, 0.5 + 0.5 * 0.4 - 0.2, 0.0, 0.0, 1.0 - 0.4, 0.0]]))


def test_the_score_goes_on_the_last_model_token_and_turn_rewards_where_they_are():
    mask = T([[1.0, 1.0, 0.0, 0.0, 1.0, 0.0], [1.0, 0.0, 0.0, 0.0, 0.0, 0.0]])
    turns = T([[0.0, 0.5, 0.0, 0.0, 0.0, 0.0], [0.0] * 6])
    r = kl_shaped_rewards(T([2.0, 3.0]), torch.zeros(2, 6), None, mask, 0.0, turns)
    torch.testing.assert_close(r, T([[0.0, 0.5, 0.0, 0.0, 2.0, 0.0], [3.0, 0.0, 0.0, 0.0, 0.0, 0.0]]))


def test_aggregations_count_only_the_models_tokens():
    mask = T([[1.0, 1.0, 0.0, 0.0, 1.0], [1.0, 0.0, 0.0, 0.0, 0.0]])
    logp = torch.zeros(2, 5)
    logp[:, 2:4] = 50.0  # environment tokens: if they counted, the ratio and every sum would show it
    adv = T([1.0, 2.0])
    norm = Normaliser.of(mask, max_len=5)
    assert (norm.num_tokens, norm.num_seqs) == (4.0, 2)
    for agg, expected in [("token_mean", -(3 * 1.0 + 2.0) / 4), ("seq_mean_token_mean", -(1.0 + 2.0) / 2),
                          ("constant", -(3 * 1.0 + 2.0) / (2 * 5))]:
        loss, s = grpo_loss(logp, logp.detach(), None, adv, mask, norm, eps_low=0.2, eps_high=0.2, beta=0.0,
                            aggregation=agg)
        assert loss.item() == pytest.approx(expected) and s.tokens == 4.0 and s.ratio == 4.0


# ---------------------------------------------------------------- every engine, and the trainer's log-probs


@pytest.fixture(scope="module")
def chatty(tool_model):
    """The tool model made less uniform, with EOS likely, so turns end and guessing episodes go on."""
    return less_uniform(tool_model, seed=3, eos_boost=1.5)


def guess_rollout(model, tok, engine, **kw):
    envs = [GuessNumber() for _ in range(4)]
    prompts = []
    for i, e in enumerate(envs):
        text = e.reset({"prompt": f"say a {i // 2}", "secret": 37})
        if i % 2 == 0:
            prompts.append(Task("t", [], [], "S", "correctness").chat_prompt(tok, {"prompt": text}, ""))
    return generate(model, tok, prompts, group_size=2, max_new_tokens=60, engine=engine, envs=envs,
                    chat=ChatFormat(tok, SYSTEM), limits=Limits(max_turns=3), **kw)


@pytest.mark.parametrize("engine", engines.ENGINES)
def test_a_single_turn_is_what_the_engine_sampled(chatty, engine):
    """Without an environment every episode ends after its first turn: the rollout is the engine's output."""
    from grouprl.rollout import completion_mask_from_ids

    model, tok = chatty
    prompts = ["<|user|>say a 1<|end|><|assistant|>", "<|user|>a longer prompt<|end|><|assistant|>"]
    params = engines.SamplingParams(group_size=3, max_new_tokens=10, eos=tuple(eos_ids(model, tok)), pad_token_id=0,
                                    temperature=0.9, seeds=(1, 2), with_logprobs=True)
    enc = tok(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        want = engines.sample(engine, model, enc.input_ids, enc.attention_mask, params)
        torch.manual_seed(0)
        ro = generate(model, tok, prompts, group_size=3, max_new_tokens=10, temperature=0.9, seeds=[1, 2],
                      engine=engine, with_logprobs=True)
    mask, truncated = completion_mask_from_ids(want.completion_ids, list(params.eos))
    assert ro.truncated.any() and not ro.truncated.all()
    assert torch.equal(ro.input_ids[:, ro.prompt_len:], want.completion_ids) and torch.equal(ro.completion_mask, mask)
    assert torch.equal(ro.truncated, truncated) and torch.equal(ro.logprobs, want.logprobs)
    assert ro.completions == tok.batch_decode(want.completion_ids, skip_special_tokens=True)
    assert ro.turn_rewards is None


@pytest.mark.parametrize("engine", [e for e in engines.ENGINES if e != "grouprl"])
def test_greedy_episodes_are_the_same_on_every_engine(chatty, engine):
    model, tok = chatty
    ref, ref_eps = guess_rollout(model, tok, "grouprl", greedy=True)
    assert max(e.turns for e in ref_eps) >= 2, [e.turn_tokens for e in ref_eps]
    ro, eps = guess_rollout(model, tok, engine, greedy=True)
    assert [e.messages for e in eps] == [e.messages for e in ref_eps]
    assert torch.equal(ro.input_ids, ref.input_ids) and torch.equal(ro.completion_mask, ref.completion_mask)


def test_the_grouprl_engine_reads_only_each_turns_new_tokens(chatty):
    model, tok = chatty
    ro, eps = guess_rollout(model, tok, "grouprl", greedy=True)
    _, again = guess_rollout(model, tok, "hf", greedy=True)  # re-reads the whole history every turn
    assert max(e.turns for e in eps) >= 2
    for i, (e, a) in enumerate(zip(eps, again)):
        replies = int((ro.attention_mask[i, ro.prompt_len:].bool() & (ro.completion_mask[i] == 0)).sum())
        assert e.prefilled == replies + e.turns - 1  # each reply, and the turn's last token, not yet read
        assert e.prefilled < a.prefilled or e.turns == 1


@pytest.mark.parametrize("engine", engines.ENGINES)
def test_trainer_logprobs_equal_the_engines_on_the_models_tokens(chatty, engine):
    import copy

    model, tok = copy.deepcopy(chatty[0]).double(), chatty[1]
    torch.manual_seed(0)
    ro, eps = guess_rollout(model, tok, engine, with_logprobs=True)
    assert (ro.spans > ro.lengths).any()  # some environment tokens
    with torch.no_grad():
        atol = log_softmax_atol(model, ro)
        for layout in LAYOUTS:
            logp = forward_groups(model, ro, torch.arange(4), layout=layout).logp
            torch.testing.assert_close(logp * ro.completion_mask, ro.logprobs, rtol=0, atol=atol)


# ---------------------------------------------------------------- training, and bad inputs


def env_sets(tool_model, toy_data, out, **extra) -> list[str]:
    sets = base_sets(tool_model, toy_data, out) + ["--set", "rollout.max_new_tokens=40", "--set", "eval_every=0"]
    return sets + [a for k, v in extra.items() for a in ("--set", f"{k}={v}")]


@pytest.mark.parametrize("algo", ["grpo", "ppo"])
@pytest.mark.parametrize("env", ["calculator", "guess"])
def test_episodes_train_end_to_end(algo, env, tool_model, toy_data, tmp_path):
    out = tmp_path / "run"
    prefill = "<tool_call>" if env == "calculator" else "50"  # a call opened; a first guess
    res = run("train", *env_sets(tool_model, toy_data, out, algo=algo, **{"env.name": env, "env.max_turns": 3,
                                                                          "task.prefill": prefill}))
    assert res.exit_code == 0, res.output
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(metrics) == 2 and all(m["episode/turns"] >= 1 for m in metrics) and "reward/env" in metrics[0]
    if env == "calculator":
        assert sum(m["episode/tool_calls"] for m in metrics) > 0  # the prefill opens a call (malformed ones count)
    row = json.loads((out / "completions.jsonl").read_text().splitlines()[0])
    assert row["episode"][0]["role"] == "assistant" and {"turns", "tool_calls", "turn_rewards", "truncated"} <= set(row)
    assert (out / "final").is_dir()


ENV_FILE = """
from grouprl.envs import Environment

class NoHints(Environment):
    def tool(self, x):
        return x

class Raises(Environment):
    def reset(self, row):
        raise ValueError("no data")
    def step(self, text):
        return None

class WrongType(Environment):
    def reset(self, row):
        return 3
    def step(self, text):
        return None

class Nothing(Environment):
    pass

not_a_class = 3
"""


@pytest.mark.parametrize("name, needles", [
    ("{f}:Missing", ["has no class 'Missing'"]),
    ("{f}:not_a_class", ["is a int: expected a class"]),
    ("{f}:NoHints", ["tool 'tool' cannot be described", "type hints"]),
    ("{f}:Raises", ["failed to start on the first training row: ValueError: no data"]),
    ("{f}:WrongType", ["reset returned int: expected a str"]),
    ("{f}:Nothing", ["has no tools and no step"]),
    ("nowhere.py:Env", ["environment file 'nowhere.py' not found"]),
    ("calculater", ["env.name='calculater': expected one of calculator, guess or 'path/to/file.py:Class'"]),
])
def test_a_bad_environment_is_one_line_before_training(name, needles, tool_model, toy_data, tmp_path):
    f = write(tmp_path / "my_env.py", ENV_FILE)
    out = tmp_path / "run"
    res = run("train", *env_sets(tool_model, toy_data, out, **{"env.name": name.format(f=f)}))
    one_error_line(res, *needles)
    assert not (out / "metrics.jsonl").exists()


def custom_template(tool_model, tmp_path, template):
    import shutil

    model = tmp_path / "model"
    shutil.copytree(tool_model, model)
    config = json.loads((model / "tokenizer_config.json").read_text())
    config["chat_template"] = template
    (model / "tokenizer_config.json").write_text(json.dumps(config))
    (model / "chat_template.jinja").unlink(missing_ok=True)
    return model


def test_a_template_that_hides_the_models_text_is_refused_in_one_line(tool_model, toy_data, tmp_path):
    model = custom_template(tool_model, tmp_path, HIDING)
    res = run("train", *env_sets(model, toy_data, tmp_path / "run", **{"env.name": "guess"}))
    one_error_line(res, "chat template does not show an assistant turn's text")


def test_a_template_that_rewrites_earlier_turns_trains_and_says_so(tool_model, toy_data, tmp_path):
    model = custom_template(tool_model, tmp_path, THINKING)
    res = run("train", *env_sets(model, toy_data, tmp_path / "run", **{"env.name": "guess", "steps": 1}))
    assert res.exit_code == 0, res.output
    assert "does not keep the prefix across turns: each turn is kept as sampled" in res.output


def test_the_env_reward_needs_an_environment(tool_model, toy_data, tmp_path):
    res = run("train", *base_sets(tool_model, toy_data, tmp_path / "run"), "--set", "rewards=[{name: env}]")
    one_error_line(res, "'env' is the environment's reward (in rewards or eval.reward) and needs env.name")


def test_evaluation_runs_episodes_while_training_and_after(tool_model, toy_data, tmp_path):
    out = tmp_path / "run"
    sets = env_sets(tool_model, toy_data, out, **{"env.name": "guess", "eval_every": 2, "task.prefill": "50",
                                                  "eval.k": 2, "eval.reward": "env"})
    res = run("train", *sets)
    assert res.exit_code == 0, res.output
    last = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    assert last["eval/turns"] >= 1 and "eval/pass@2" in last and "eval/tool_calls" in last
    report = tmp_path / "eval.json"
    res = run("eval", "--model", str(out), "--num", "3", "-o", str(report))
    assert res.exit_code == 0, res.output
    got = json.loads(report.read_text())
    assert got["metrics"]["turns"] >= 1 and got["samples"][0]["episode"][0]["role"] == "assistant"
    assert got["samples"][0]["prompt"].startswith("I am thinking of a whole number")  # the environment's prompt


def test_eval_runs_environment_code_from_a_model_folder_only_when_asked(tool_model, toy_data, tmp_path):
    f = write(tmp_path / "my_env.py", "from grouprl.envs import Environment\nclass Echo(Environment):\n"
              "    def step(self, text):\n        return None\n")
    out = tmp_path / "run"
    assert run("train", *env_sets(tool_model, toy_data, out, **{"env.name": f"{f}:Echo", "steps": 1})).exit_code == 0
    one_error_line(run("eval", "--model", str(out), "--num", "2"), "names environment code in env.name")
    assert run("eval", "--model", str(out), "--num", "2", "--set", f"env.name={f}:Echo").exit_code == 0


def test_built_in_environments_load_by_name():
    assert load_env("calculator") is Calculator and load_env("guess") is GuessNumber


def test_ppo_puts_each_weighted_turn_reward_on_its_turn(tool_model, toy_data, tmp_path, monkeypatch):
    import grouprl.ppo

    tok = load_tokenizer(str(tool_model))
    scripted(monkeypatch, tok, ["ab<|end|>", "c<|end|>"])
    seen = []
    real = grouprl.ppo.kl_shaped_rewards

    def spy(score, logp, ref_logp, mask, kl_coef, turn_rewards=None):
        seen.append((score.clone(), turn_rewards.clone(), mask.clone()))
        return real(score, logp, ref_logp, mask, kl_coef, turn_rewards)
    monkeypatch.setattr(grouprl.ppo, "kl_shaped_rewards", spy)
    f = write(tmp_path / "scored.py", SCORED_FILE)
    res = run("train", *env_sets(tool_model, toy_data, tmp_path / "run", algo="ppo", steps=1,
                                 **{"env.name": f"{f}:Scored", "rewards": "[{name: env, weight: 0.5}]",
                                    "ppo.kl_coef": 0, "ppo.epochs": 1}))
    assert res.exit_code == 0, res.output
    score, turns, mask = seen[0]
    # 0.5 x (2 + 0.25 + 1): 0.5 x 0.25 on the first turn's last token, 0.5 x 1.0 on the second's, the rest at the end
    assert turns.sum(1).tolist() == [0.5 * 1.25] * len(score) and score.tolist() == [0.5 * 2.0] * len(score)
    assert turns[0][turns[0] != 0].tolist() == [0.125, 0.5] and (mask[turns != 0] == 1).all()


def test_the_documented_environment_trains(tool_model, toy_data, tmp_path):
    """docs/environments.md's own example, as written."""
    from pathlib import Path

    page = (Path(__file__).parent.parent / "docs" / "environments.md").read_text()
    code = page.split("```python\n")[1].split("```")[0]
    f = write(tmp_path / "shop.py", code)
    out = tmp_path / "run"
    res = run("train", *env_sets(tool_model, toy_data, out, **{"env.name": f"{f}:Shop", "steps": 1}))
    assert res.exit_code == 0, res.output
    metrics = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
    assert metrics["reward/env"] == 1.0  # its reward() on every episode


def test_the_compare_report_shows_whole_episodes(tool_model, toy_data, tmp_path):
    from grouprl.compare import evaluate_checkpoint
    from grouprl.config import load_config

    sets = env_sets(tool_model, toy_data, tmp_path / "run", **{"env.name": "guess", "task.prefill": "50"})
    cfg = load_config(None, [a for a in sets if a != "--set"])
    got = evaluate_checkpoint(str(tool_model), cfg, 2, tmp_path / "eval.json")
    assert got["turns"] >= 1 and all(c.startswith("[assistant] 50") for c in got["completions"])
    assert "env" in got["key"]  # another environment is another evaluation


def test_episodes_under_torchrun_are_refused_in_one_line(tool_model, toy_data, tmp_path):
    from grouprl.config import load_config, world_problems

    sets = env_sets(tool_model, toy_data, tmp_path / "run", **{"env.name": "guess"})
    cfg = load_config(None, [a for a in sets if a != "--set"])
    assert world_problems(cfg, 1, "ddp") == []
    assert world_problems(cfg, 2, "ddp")[0] == ("env.name='guess': episodes with an environment run in one process "
                                                "for now (no torchrun)")
