"""The supervised stage (`grouprl sft`): conversations laid out as the episode loop lays out episodes (the
same tokens and loss mask), a tiny model that learns them, exact resume, packed equal to padded, RL started
from its output (full weights or a LoRA adapter), and bad data as one line before any model is loaded."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from rich.console import Console
from safetensors.torch import load_file

from grouprl.config import load_config
from grouprl.envs import schemas, tools_of
from grouprl.envs.calculator import Calculator
from grouprl.envs.calls import parse_calls
from grouprl.episodes import ChatFormat
from grouprl.loop import train
from grouprl.sft import collate, conversation, end_of_turn, tokenize, turn_text
from grouprl.tasks import Task
from test_bad_inputs import one_error_line, write
from test_cli import run
from test_episodes import CALL, SYSTEM, episodes_of, scripted


def ids_of(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False)["input_ids"]


def test_a_plain_conversation_by_hand(tool_tok):
    chat = ChatFormat(tool_tok, SYSTEM)
    task = Task("t", [], [], "", "correctness")
    messages = conversation({"messages": [{"role": "user", "content": "ab"}, {"role": "assistant", "content": "c"},
                                          {"role": "user", "content": "d"}, {"role": "assistant", "content": "e"}]},
                            "messages", "row 1")
    end = end_of_turn(tool_tok, chat)
    assert tool_tok.decode([end]) == "<|end|>"
    ex = tokenize(messages, task, chat, tool_tok, "", end, "row 1")
    assert ex.prompt == ids_of(tool_tok, "<|user|>ab<|end|><|assistant|>")
    reply = ids_of(tool_tok, "<|user|>d<|end|><|assistant|>")  # the model's own <|end|> is not repeated
    assert ex.ids == ids_of(tool_tok, "c") + [end] + reply + ids_of(tool_tok, "e") + [end]
    assert ex.mask == [1.0, 1.0] + [0.0] * len(reply) + [1.0, 1.0]


def test_an_episode_is_trained_on_the_tokens_and_mask_the_episode_loop_made(tool_lm, tool_tok, monkeypatch):
    """The episode loop runs a calculator episode (a call, its result, the answer); its messages, as SFT data,
    give back the same prompt, completion ids and loss mask."""
    scripted(monkeypatch, tool_tok, [CALL + "<|end|>zz", "14<|end|>"])  # the call's turn ended by the model
    ro, eps = episodes_of(tool_lm, tool_tok, Calculator)
    task = Task("t", [], [], "S", "correctness", messages_system="S", tools=schemas("t", tools_of(Calculator())))
    chat = ChatFormat(tool_tok, SYSTEM)
    messages = [{"role": "user", "content": "say a 1"}] + eps[0].messages
    ex = tokenize(conversation({"messages": messages}, "messages", "r"), task, chat, tool_tok, "",
                  end_of_turn(tool_tok, chat), "r")
    p = ro.prompt_len
    assert ex.prompt == ro.input_ids[0, :p][ro.attention_mask[0, :p].bool()].tolist()
    assert ex.ids == ro.input_ids[0, p:].tolist()
    assert ex.mask == ro.completion_mask[0].tolist()
    assert ex.ids[len(ids_of(tool_tok, CALL))] == end_of_turn(tool_tok, chat) and ex.mask[len(ids_of(tool_tok, CALL))]


def test_structured_tool_calls_are_written_as_the_loop_reads_them(tool_tok):
    chat = ChatFormat(tool_tok, SYSTEM)
    openai = {"role": "assistant", "content": "", "tool_calls": [
        {"type": "function", "function": {"name": "calculate", "arguments": "{\"expression\": \"2*3\"}"}}]}
    text = turn_text(chat, conversation({"messages": [{"role": "user", "content": "q"}, openai]}, "messages", "r")[1])
    (call,) = parse_calls(text)
    assert (call.name, call.arguments) == ("calculate", {"expression": "2*3"})


CALLS_TEMPLATE = (
    "{% if tools %}{{ '<|system|>' + (tools|map(attribute='function')|map(attribute='name')|join(',')) + '<|end|>' }}"
    "{% endif %}{% for m in messages %}{{ '<|' + m['role'] + '|>' + m['content'] }}{% for c in m.tool_calls or [] %}"
    "{{ '[call]' + (c|tojson) + '[/call]' }}{% endfor %}{{ '<|end|>' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}")


def test_structured_tool_calls_take_the_templates_own_form_where_it_has_one(tool_tok):
    from test_episodes import OWN_FORMAT, with_template

    tok = with_template(tool_tok, CALLS_TEMPLATE)
    tok.response_template = OWN_FORMAT
    chat = ChatFormat(tok, SYSTEM, schemas("calculator", tools_of(Calculator())))
    call = {"name": "calculate", "arguments": {"expression": "2*3"}}
    message = {"role": "assistant", "content": "", "tool_calls": [call]}
    text = turn_text(chat, message)
    assert text == '[call]{"name": "calculate", "arguments": {"expression": "2*3"}}[/call]'
    (call,) = chat.parse(text)  # read back by the episode loop's parser for this template
    assert (call.name, call.arguments) == ("calculate", {"expression": "2*3"})


def test_prompt_completion_rows_are_conversations():
    got = conversation({"prompt": "q", "completion": "a"}, "messages", "r")
    assert got == [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]


# ---------------------------------------------------------------- runs


def sums(n: int) -> list[dict]:
    """n tool conversations: a call of the calculator, its result, the answer."""
    rows = []
    for k in range(n):
        a, b = 2 + k % 7, 1 + k % 4
        rows.append({"messages": [
            {"role": "user", "content": f"what is {a}+{b}?"},
            {"role": "assistant", "content": "", "tool_calls": [
                {"type": "function", "function": {"name": "calculate", "arguments": {"expression": f"{a}+{b}"}}}]},
            {"role": "tool", "content": str(a + b)},
            {"role": "assistant", "content": str(a + b)}]})
    return rows


@pytest.fixture(scope="module")
def sft_data(tmp_path_factory):
    path = tmp_path_factory.mktemp("sft") / "data.jsonl"
    return write(path, "".join(json.dumps(r) + "\n" for r in sums(24)))


def sft_sets(model, data, out, **extra) -> list[str]:
    sets = {"algo": "sft", "model.name_or_path": str(model), "sft.source": str(data), "output_dir": str(out),
            "steps": 6, "optim.lr": 3e-3, "env.name": "calculator", "task.prefill": "", "sft.batch_size": 4,
            "sft.micro_batch_size": 2, "save_every": 2, "seed": 0, **extra}
    return [f"{k}={v}" for k, v in sets.items()]


def losses(result) -> list[float]:
    return [h["loss"] for h in result.history]


def test_a_tiny_model_learns_its_conversations(tool_model, sft_data, tmp_path):
    out = tmp_path / "run"
    res = run("sft", *[a for s in sft_sets(tool_model, sft_data, out, steps=24, **{
        "sft.eval_source": sft_data, "eval_every": 12}) for a in ("--set", s)])
    assert res.exit_code == 0, res.output
    metrics = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == list(range(1, 25))
    # a random model starts near ln(vocabulary) per token; 24 steps of lr 3e-3 take it far below
    assert metrics[0]["loss"] > 3.0 and metrics[-1]["loss"] < 0.6 * metrics[0]["loss"]
    assert [m["step"] for m in metrics if "eval/loss" in m] == [12, 24]
    assert metrics[-1]["eval/loss"] < metrics[11]["eval/loss"]
    assert (out / "final" / "model.safetensors").is_file() and metrics[-1]["epoch"] == 4.0


def test_every_layout_gives_the_same_loss(tool_model, sft_data, tmp_path):
    quiet = Console(quiet=True)
    runs = {layout: train(load_config(None, sft_sets(tool_model, sft_data, tmp_path / layout, steps=2, **{
        "model.update_layout": layout, "sft.eval_source": sft_data})), quiet)
        for layout in ("padded", "packed", "shared")}
    # the same sums of the same log-probs in another order: float32 rounding of a loss near 4, two steps
    for key in ("loss", "eval/loss"):  # the held-out loss: after the last step, even without eval_every
        got = {layout: [h[key] for h in r.history if key in h] for layout, r in runs.items()}
        assert len(got["padded"]) == (2 if key == "loss" else 1)
        assert got["packed"] == pytest.approx(got["padded"], rel=1e-5)
        assert got["shared"] == pytest.approx(got["padded"], rel=1e-5)


def test_a_group_shares_its_common_prefix_once(tool_tok):
    chat = ChatFormat(tool_tok, SYSTEM)
    task = Task("t", [], [], "", "correctness", messages_system="be brief")
    end = end_of_turn(tool_tok, chat)
    examples = [tokenize(conversation({"prompt": q, "completion": a}, "messages", "r"), task, chat, tool_tok, "", end,
                         "r") for q, a in [("ab", "c"), ("ad", "e"), ("b", "ff"), ("b", "g")]]
    batch = collate(examples, 0, "cpu", group_size=2)
    head = ids_of(tool_tok, "<|system|>be brief<|end|><|user|>")
    p = batch.prompt_len
    shared = batch.attention_mask[:, :p].sum(1).tolist()  # each row's prompt: its group's common prefix
    assert shared == [len(head) + 1] * 2 + [len(head) + 3] * 2  # 'a'; the second group's whole prompt
    for i, e in enumerate(examples):  # every row is its example's tokens, its loss mask on the same tokens
        row = batch.input_ids[i][batch.attention_mask[i].bool()].tolist()
        assert row == e.prompt + e.ids
        trained = [t for t, m in zip(batch.input_ids[i, p:].tolist(), batch.completion_mask[i].tolist()) if m]
        assert trained == [t for t, m in zip(e.ids, e.mask) if m]
    assert batch.input_ids[0, p - len(head) - 1:p - 1].tolist() == head and batch.group_size == 2
    assert batch.prompt_index == [0, 0, 1, 1]


@pytest.mark.parametrize("lora", [False, True])
def test_stopped_and_resumed_equals_uninterrupted(lora, tool_model, sft_data, tmp_path):
    quiet = Console(quiet=True)
    extra = {"model.lora.enabled": "true", "model.lora.r": 4} if lora else {}
    straight = train(load_config(None, sft_sets(tool_model, sft_data, tmp_path / "a", **extra)), quiet)
    out = tmp_path / "b"
    train(load_config(None, sft_sets(tool_model, sft_data, out, steps=5, **extra)), quiet)
    shutil.rmtree(out / "final")  # lost after step 5: the latest checkpoint is step 4
    resumed = train(load_config(None, sft_sets(tool_model, sft_data, out, **extra)), quiet, resume=True)
    assert [h["step"] for h in resumed.history] == list(range(1, 7))
    assert losses(straight) == losses(resumed)
    name = "adapter_model.safetensors" if lora else "model.safetensors"
    a, b = load_file(straight.final_checkpoint / name), load_file(resumed.final_checkpoint / name)
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("lora", [False, True])
def test_rl_starts_from_the_warm_up(lora, tool_model, sft_data, tmp_path):
    """The warm-up's output (full weights, or a LoRA adapter merged on load) is the RL run's model: its first
    step samples from the warmed-up weights, not the base's."""
    from grouprl.models import load_causal_lm, load_policy
    from grouprl.config import ModelConfig

    extra = {"model.lora.enabled": "true", "model.lora.r": 4} if lora else {}
    warm = train(load_config(None, sft_sets(tool_model, sft_data, tmp_path / "sft", **extra)), Console(quiet=True))
    x = torch.tensor([[5, 6, 7, 8]])
    merged = load_causal_lm(str(warm.final_checkpoint), ModelConfig())
    base = load_causal_lm(str(tool_model), ModelConfig())
    assert not torch.allclose(merged(x).logits, base(x).logits)
    if lora:  # merged on load: what peft's own adapter loading computes
        from peft import AutoPeftModelForCausalLM

        ref = AutoPeftModelForCausalLM.from_pretrained(warm.final_checkpoint)
        assert torch.allclose(merged(x).logits, ref(x).logits, atol=1e-5)
        policy, _ = load_policy(ModelConfig(name_or_path=str(warm.final_checkpoint), lora={"enabled": True}))
        with policy.disable_adapter():  # the RL run's reference is the warmed-up model
            assert torch.allclose(policy(x).logits, merged(x).logits, atol=1e-5)
    rl = tmp_path / "rl"
    write(tmp_path / "rl.jsonl", "".join(json.dumps({"prompt": f"what is {k}+1?", "answer": str(k + 1)}) + "\n"
                                         for k in range(10)))
    res = run("train", *[a for s in [
        f"model.name_or_path={warm.final_checkpoint}", "task.name=dataset", f"task.source={tmp_path / 'rl.jsonl'}",
        f"output_dir={rl}", "steps=1", "env.name=calculator", "task.prefill=", "rewards=[{name: env}]",
        "rollout.max_new_tokens=40", "rollout.prompts_per_step=2", "rollout.group_size=2", "task.num_eval=2",
        f"model.lora.enabled={str(lora).lower()}"] for a in ("--set", s)])
    assert res.exit_code == 0, res.output
    if lora:  # the RL adapter names the warm-up as its base, so loading it rebuilds the whole chain
        config = json.loads((rl / "final" / "adapter_config.json").read_text())
        assert Path(config["base_model_name_or_path"]) == warm.final_checkpoint.absolute()
        again = load_causal_lm(str(rl / "final"), ModelConfig())
        assert not torch.allclose(again(x).logits, base(x).logits)
    else:
        assert (rl / "final" / "model.safetensors").is_file()


BAD = {
    "no assistant": ([{"role": "user", "content": "q"}], "no assistant message"),
    "ends with a result": (sums(1)[0]["messages"][:3], "expected an assistant turn"),
    "a bad role": ([{"role": "robot", "content": "q"}], "expected {\"role\": one of"),
    "no prompt": ([{"role": "assistant", "content": "a"}], "expected a user turn"),
    "a bad call": ([{"role": "user", "content": "q"}, {"role": "assistant", "content": "", "tool_calls": [
        {"function": {"name": "calculate", "arguments": "{not json"}}]}], "a tool call that is not"),
    "content not text": ([{"role": "user", "content": 3}, {"role": "assistant", "content": "a"}], "expected text"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_conversations_are_one_line_naming_the_row(case, tool_model, tmp_path):
    messages, needle = BAD[case]
    data = write(tmp_path / "bad.jsonl", json.dumps(sums(1)[0]) + "\n" + json.dumps({"messages": messages}) + "\n")
    res = run("sft", *[a for s in sft_sets(tool_model, data, tmp_path / "run") for a in ("--set", s)])
    one_error_line(res, needle, "line 2")
    assert not (tmp_path / "run").exists()  # refused before any model is loaded or folder made


def test_sft_config_errors_are_one_line(tool_model, sft_data, tmp_path):
    res = run("sft", "--set", f"model.name_or_path={tool_model}", "--set", f"output_dir={tmp_path / 'r'}")
    one_error_line(res, "sft.source")
    res = run("sft", *[a for s in sft_sets(tool_model, sft_data, tmp_path / "r", **{"task.prefill": "so"})
                       for a in ("--set", s)])
    one_error_line(res, "task.prefill")
    res = run("sft", *[a for s in sft_sets(tool_model, write(tmp_path / "e.jsonl", ""), tmp_path / "r")
                       for a in ("--set", s)])
    one_error_line(res, "empty")
