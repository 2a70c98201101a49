"""Bad input a user can hand grouprl (data files, over-long prompts, broken model folders): each is refused
with one UserError line that names the file, row or field and what is expected."""

import json
import shutil
from dataclasses import replace

import pytest

from grouprl.config import ModelConfig
from grouprl.errors import UserError
from grouprl.models import context_length, load_causal_lm, load_tokenizer
from grouprl.tasks import Task, default_max_prompt_tokens, fit_prompts, token_lengths
from grouprl.tasks.data import dataset_rows, gsm8k_rows, load_rows


@pytest.fixture(autouse=True)
def _datasets_cache(tmp_path, monkeypatch):
    """Keep `datasets`' Arrow cache inside the test's temporary folder."""
    import datasets.config

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf_cache")


def user_error(fn, *args) -> str:
    with pytest.raises(UserError) as info:
        fn(*args)
    message = str(info.value)
    assert "\n" not in message  # one line
    return message


# ---------------------------------------------------------------- data files


@pytest.mark.parametrize("name", ["d.jsonl", "d.json", "d.csv"])
def test_data_file_not_utf8_names_the_line(tmp_path, name):
    f = tmp_path / name
    lines = {"d.jsonl": ['{"prompt": "a", "answer": "1"}', '{"prompt": "b", "answer": "2"}',
                         '{"prompt": "caf\u00e9", "answer": "3"}'],
             "d.json": ["[", '{"prompt": "a", "answer": "1"},', '{"prompt": "caf\u00e9", "answer": "3"}]'],
             "d.csv": ["prompt,answer", "a,1", "caf\u00e9,3"]}[name]
    f.write_bytes("\n".join(lines).encode("latin-1"))
    msg = user_error(dataset_rows, str(f), "prompt", "answer")
    assert msg.startswith(f"dataset file '{f}' line 3 is not UTF-8 text")


def test_broken_json_line_names_the_line(tmp_path):
    f = tmp_path / "d.jsonl"
    f.write_text('{"prompt": "a", "answer": 1}\n\n{"prompt": "b", "answer": 2}\n{"prompt": "c", "answer": 3,}\n')
    msg = user_error(dataset_rows, str(f), "prompt", "answer")
    # line 4 of the file (the blank line 2 counts), not a byte position
    assert msg.startswith(f"dataset file '{f}' line 4: not valid JSON (") and "column 29" in msg  # the stray "}"


def test_broken_first_json_line_and_non_object_line(tmp_path):
    f = tmp_path / "d.jsonl"
    f.write_text('{"prompt": "a"\n{"prompt": "b"}\n')
    assert f"'{f}' line 1: not valid JSON" in user_error(load_rows, str(f))
    f.write_text('{"prompt": "a"}\n["b"]\n')
    assert f"'{f}' line 2: expected a JSON object" in user_error(load_rows, str(f))


def test_json_file_forms(tmp_path):
    f = tmp_path / "d.json"
    f.write_text(json.dumps([{"prompt": "a", "answer": 1}, {"prompt": "b", "answer": 2, "level": "hard"}], indent=1))
    # a list of objects; a column missing from one row is None there, as `datasets` gives it
    assert load_rows(str(f)) == [{"prompt": "a", "answer": 1, "level": None},
                                 {"prompt": "b", "answer": 2, "level": "hard"}]
    f.write_text('{"prompt": "a", "answer": 1}\n{"prompt": "b", "answer": 2}\n')  # JSON Lines named .json
    assert [r["prompt"] for r in load_rows(str(f))] == ["a", "b"]
    f.write_text('{"prompt": "a", "answer": 1}\n{"prompt": "b" "answer": 2}\n')
    assert f"'{f}' line 2: not valid JSON" in user_error(load_rows, str(f))
    f.write_text('[\n  {"prompt": "a"},\n  {"prompt": "b",\n]\n')
    assert f"'{f}' line 4: not valid JSON" in user_error(load_rows, str(f))
    f.write_text('[{"prompt": "a"}, "b"]')
    assert f"'{f}' item 2: expected a JSON object" in user_error(load_rows, str(f))


def test_utf8_byte_order_mark_is_not_data(tmp_path):
    f = tmp_path / "d.jsonl"
    f.write_bytes(b'\xef\xbb\xbf{"prompt": "a", "answer": 1}\n')
    assert dataset_rows(str(f), "prompt", "answer") == [{"prompt": "a", "answer": "1"}]


def _write_empty(tmp_path, name, content):
    f = tmp_path / name
    if name.endswith(".parquet"):
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.table({"prompt": pa.array([], pa.string()), "answer": pa.array([], pa.string())}), f)
    else:
        f.write_text(content)
    return str(f)


@pytest.mark.parametrize("name, content", [
    ("e.jsonl", ""), ("e.jsonl", "\n\n"), ("e.json", ""), ("e.json", "[]"), ("e.csv", ""),
    ("e.csv", "prompt,answer\n"), ("e.parquet", None),
])
def test_empty_data_file(tmp_path, name, content):
    src = _write_empty(tmp_path, name, content)
    msg = user_error(dataset_rows, src, "prompt", "answer")
    assert msg == f"dataset '{src}' is empty: expected at least one row with column(s) ['prompt', 'answer']"
    assert "is empty" in user_error(gsm8k_rows, src)


@pytest.mark.parametrize("prompt, what", [(None, "is null"), ("", "is empty"), ("  \n", "is empty"),
                                          (42, "is not text (int 42)")])
def test_bad_prompt_names_the_row(tmp_path, prompt, what):
    f = tmp_path / "d.jsonl"
    f.write_text("".join(json.dumps(r) + "\n" for r in [{"q": "fine", "a": 1}, {"q": prompt, "a": 2}]))
    msg = user_error(dataset_rows, str(f), "q", "a")
    assert msg.startswith(f"dataset file '{f}' line 2: 'q' {what}") and "expected the prompt text" in msg


def test_null_answer_names_the_row(tmp_path):
    f = tmp_path / "d.jsonl"
    f.write_text('{"q": "one", "a": 1}\n{"q": "two", "a": 0}\n{"q": "three", "a": null}\n')
    msg = user_error(dataset_rows, str(f), "q", "a")
    assert msg == f"dataset file '{f}' line 3: 'a' is null: expected the reference answer"
    # without an answer column the value is just another column for the rewards
    assert dataset_rows(str(f), "q", None)[2] == {"prompt": "three", "a": None}


def test_blank_csv_cells_name_the_row(tmp_path):
    f = tmp_path / "d.csv"
    f.write_text("prompt,answer\nhello,1\n,2\n")
    msg = user_error(dataset_rows, str(f), "prompt", "answer")
    assert msg.startswith(f"dataset file '{f}' record 2: 'prompt' is null")  # a record: the header is not one
    f.write_text("prompt,answer\nhello,1\nbye,\n")  # pandas reads the blank number as NaN
    assert f"'{f}' record 2: 'answer' is null" in user_error(dataset_rows, str(f), "prompt", "answer")


def test_gsm8k_null_question_and_answer(tmp_path):
    f = tmp_path / "g.jsonl"
    f.write_text('{"question": "q", "answer": "#### 1"}\n{"question": null, "answer": "#### 2"}\n')
    assert user_error(gsm8k_rows, str(f)).startswith(f"dataset file '{f}' line 2: 'question' is null")
    f.write_text('{"question": "q", "answer": null}\n')
    assert user_error(gsm8k_rows, str(f)).startswith(f"dataset file '{f}' line 1: 'answer' is null")


def test_data_path_is_a_directory(tmp_path):
    d = tmp_path / "data.jsonl"
    d.mkdir()
    assert "not found" in user_error(load_rows, str(d))


# ---------------------------------------------------------------- prompt length
# The tiny model's tokenizer is one token per character, and its template wraps each message as
# '<|role|>' content '<|end|>' (one token each) then '<|assistant|>': a prompt of system S, question Q and
# prefill P is 5 + len(S) + len(Q) + len(P) tokens.


@pytest.fixture(scope="module")
def tok(tiny_model):
    return load_tokenizer(str(tiny_model))


def rows(*questions):
    return [{"prompt": q, "answer": str(i), "level": i} for i, q in enumerate(questions)]


def make_task(train, held=None):
    return Task("dataset", train, held if held is not None else rows("held"), "sys", "correctness")


def test_token_lengths_match_the_tokenizer(tok):
    texts = ["abc", "", "<|user|>hi<|end|>", "caf\u00e9 ?", "x" * 1000]
    assert token_lengths(tok, texts) == [len(tok(t, add_special_tokens=False)["input_ids"]) for t in texts]
    assert token_lengths(tok, texts)[:3] == [3, 0, 4]


def test_fit_prompts_measures_the_whole_chat_prompt(tok):
    task = make_task(rows("abc", "abcdefghij"))
    # 5 + len("sys") 3 + len("abcdefghij") 10 + len("<r>") 3 = 21
    assert token_lengths(tok, [task.chat_prompt(tok, task.train[1], "<r>")]) == [21]
    fitted = fit_prompts(task, tok, "<r>", 21, "error")
    assert fitted.train == task.train and fitted.eval == task.eval and fitted is not task
    msg = user_error(fit_prompts, task, tok, "<r>", 20, "error")
    assert msg.startswith("train row 2 (starts 'abcdefghij'): the prompt is 21 tokens, over task.max_prompt_tokens=20")
    assert "truncate_left" in msg and "drop" in msg


def test_fit_prompts_names_the_held_out_split(tok):
    task = make_task(rows("a", "b"), held=rows("ok", "far too long a question", "also much too long"))
    msg = user_error(fit_prompts, task, tok, "", 15, "error")
    assert msg.startswith("held-out row 2 ") and "1 more held-out row(s) too" in msg


def test_fit_prompts_truncate_left_keeps_the_end_of_the_question(tok):
    task = make_task(rows("abc", "abcdefghij"))
    fitted = fit_prompts(task, tok, "<r>", 18, "truncate_left")
    # 21 tokens, 3 over: the question loses its first 3 characters; the other columns stay
    assert fitted.train == [task.train[0], {"prompt": "defghij", "answer": "1", "level": 1}]
    assert task.train[1]["prompt"] == "abcdefghij"  # the input task is not changed
    assert fitted.eval == task.eval


def test_fit_prompts_truncate_left_needs_room_for_a_question(tok):
    task = make_task(rows("abcdefghij"))
    # the frame alone (5 + 3 + 3) is 11 tokens
    msg = user_error(fit_prompts, task, tok, "<r>", 11, "truncate_left")
    assert msg.startswith("task.max_prompt_tokens=11 leaves no room for a question") and "11 tokens" in msg
    assert fit_prompts(task, tok, "<r>", 12, "truncate_left").train[0]["prompt"] == "j"


def test_fit_prompts_drop(tok):
    task = make_task(rows("abc", "abcdefghij", "ab"))
    fitted = fit_prompts(task, tok, "<r>", 18, "drop")
    assert fitted.train == [task.train[0], task.train[2]] and len(task.train) == 3
    msg = user_error(fit_prompts, task, tok, "<r>", 12, "drop")
    assert msg.startswith("no train row is left: every prompt is over task.max_prompt_tokens=12 (the shortest is 13")


def test_fit_prompts_catches_a_one_megabyte_prompt(tok):
    huge = "a" * 1_000_000 + " the end?"
    task = make_task(rows("short", huge))
    msg = user_error(fit_prompts, task, tok, "", 300, "error")
    assert msg.startswith("train row 2 (starts 'aaaa") and "1000017 tokens" in msg  # 5 + 3 + 1_000_009
    fitted = fit_prompts(task, tok, "", 300, "truncate_left")
    assert fitted.train[1]["prompt"] == "a" * 283 + " the end?"  # 300 - 8 = 292 characters, its end
    assert max(token_lengths(tok, [fitted.chat_prompt(tok, r, "") for r in fitted.train])) == 300


def test_fit_prompts_without_a_known_context_leaves_the_task(tok):
    task = make_task(rows("abc"))
    assert fit_prompts(task, tok, "", None, "error") is task


def test_fit_prompts_many_rows(tok):
    questions = [f"question number {i} " * (1 + i % 7) for i in range(3000)]
    task = make_task(rows(*questions), held=rows(*questions[:50]))
    fitted = fit_prompts(task, tok, "<r>", 100, "truncate_left")
    lengths = token_lengths(tok, [fitted.chat_prompt(tok, r, "<r>") for r in fitted.train])
    assert max(lengths) == 100 and len(fitted.train) == 3000
    for before, after in zip(task.train, fitted.train):
        assert before["prompt"].endswith(after["prompt"])
    dropped = fit_prompts(task, tok, "<r>", 100, "drop")
    assert len(dropped.train) == sum(5 + 3 + len(q) + 3 <= 100 for q in questions)


def test_default_max_prompt_tokens():
    assert default_max_prompt_tokens(512, 96) == 416
    assert default_max_prompt_tokens(None, 96) is None
    msg = user_error(default_max_prompt_tokens, 96, 96)
    assert msg.startswith("rollout.max_new_tokens=96 leaves no room for a prompt in the model's context of 96 tokens")


# ---------------------------------------------------------------- model folders


def test_context_length(tiny_model, tmp_path):
    assert context_length(str(tiny_model)) == 512  # LlamaConfig.max_position_embeddings
    gpt2 = tmp_path / "gpt2"
    gpt2.mkdir()
    (gpt2 / "config.json").write_text(json.dumps({"model_type": "gpt2", "n_positions": 77}))
    assert context_length(str(gpt2)) == 77
    mamba = tmp_path / "mamba"
    mamba.mkdir()
    (mamba / "config.json").write_text(json.dumps({"model_type": "mamba"}))
    assert context_length(str(mamba)) is None  # no positions: no limit to read
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": str(gpt2)}))
    assert context_length(str(adapter)) == 77


def test_context_length_of_a_broken_config(tmp_path):
    (tmp_path / "config.json").write_text("{not json")
    assert user_error(context_length, str(tmp_path)).startswith(f"cannot read the config of model '{tmp_path}'")


def _copy(tiny_model, tmp_path, name="model"):
    folder = tmp_path / name
    shutil.copytree(tiny_model, folder)
    return folder


@pytest.mark.parametrize("cut", ["head", "tail", "empty"])
def test_corrupt_safetensors(tiny_model, tmp_path, cut):
    folder = _copy(tiny_model, tmp_path)
    weights = folder / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes({"head": data[:100], "tail": data[:-100], "empty": b""}[cut])
    msg = user_error(load_causal_lm, str(folder), ModelConfig(device="cpu"))
    assert msg.startswith(f"cannot load model '{folder}': a weights file is truncated or corrupt (")
    assert msg.endswith("download or save it again")


def test_corrupt_pytorch_bin(tiny_model, tmp_path):
    folder = _copy(tiny_model, tmp_path)
    (folder / "model.safetensors").unlink()
    (folder / "pytorch_model.bin").write_bytes(b"PK\x03\x04" + b"\0" * 60)
    assert user_error(load_causal_lm, str(folder), ModelConfig(device="cpu")).startswith(
        f"cannot load model '{folder}': ")


def test_model_folder_without_tokenizer(tiny_model, tmp_path):
    folder = tmp_path / "weights_only"
    folder.mkdir()
    for name in ("config.json", "generation_config.json", "model.safetensors"):
        shutil.copy(tiny_model / name, folder / name)
    msg = user_error(load_tokenizer, str(folder))
    assert msg.startswith(f"model folder '{folder}' has no tokenizer: expected tokenizer.json")


def test_unusable_tokenizer_files(tiny_model, tmp_path):
    folder = _copy(tiny_model, tmp_path)
    (folder / "tokenizer.json").write_text('{"version": "1.0", "trunc')
    assert user_error(load_tokenizer, str(folder)).startswith(f"cannot load a tokenizer from '{folder}': ")
    (folder / "tokenizer.json").unlink()  # tokenizer_config.json alone names a class but gives no vocabulary
    assert user_error(load_tokenizer, str(folder)).startswith(f"cannot load a tokenizer from '{folder}': ")


def test_load_tokenizer_on_its_own(tiny_model):
    tok = load_tokenizer(str(tiny_model))
    assert tok.padding_side == "left" and tok.pad_token == "<pad>" and tok.chat_template
    task = replace(make_task(rows("abc")), system_prompt="s")
    assert task.chat_prompt(tok, task.train[0], "") == "<|system|>s<|end|><|user|>abc<|end|><|assistant|>"
