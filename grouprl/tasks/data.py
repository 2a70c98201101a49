"""Loading rows from files or `datasets`: GSM8K-format data and a generic prompt-column dataset.

Sources: a .jsonl/.json/.parquet/.csv path, or a `datasets` name with an optional config and split,
'name[:config][@split]' (e.g. 'openai/gsm8k:main@train'). Rows come back as dicts (`Row`s).

JSON files are read here with `json`, one line at a time, so that a broken line is reported by its line
number (`datasets` reports a byte position inside an Arrow batch). Text files are checked to be UTF-8 and
every file to hold at least one row before `datasets` sees them: it fails on both without naming the cause.

Every row is a `Row` that knows where it came from, so that an error about it, here or after the rows are
shuffled and split, names the place a user can open: a JSON Lines file's line (1-based, blank lines counted),
a JSON array's item, a CSV or parquet file's record (1-based, a CSV's header not counted), a `datasets`
split's row (1-based: row 6 is `ds[5]`).
"""

from __future__ import annotations

import csv
import decimal
import json
import math
import numbers
import re
from pathlib import Path

from grouprl.errors import UserError

FILE_FORMATS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}


class Row(dict):
    """A data row: its columns, as a plain dict, and `origin`, where it came from (e.g. "dataset file
    'd.jsonl' line 6"), for the errors that name it. An attribute and not a column, so that it never reaches
    the reward functions (they receive every column); it goes wherever the row object goes: a shuffle, a
    split, a pickle to another rank. A copy made with {**row} is a plain dict: copy with `with_columns`."""

    def __init__(self, columns: dict, origin: str):
        super().__init__(columns)
        self.origin = origin


def origin_of(row: dict, otherwise: str) -> str:
    """Where a row came from: a `Row`'s origin, or `otherwise` for a row made in code (the built-in tasks)."""
    return getattr(row, "origin", otherwise)


def with_columns(row: dict, **columns) -> dict:
    """A copy of the row with `columns` set; a `Row` keeps its origin."""
    new = {**row, **columns}
    return Row(new, row.origin) if isinstance(row, Row) else new


def read_text(path: Path, source: str) -> str:
    """A text file's contents; UserError naming the first line that is not UTF-8."""
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise UserError(f"dataset file {source!r} cannot be read: {e.strerror or e}") from None
    try:
        return raw.decode("utf-8-sig")  # -sig: a byte-order mark from Windows editors is not data
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise UserError(f"dataset file {source!r} line {line} is not UTF-8 text (byte {e.start}): save the file "
                        "as UTF-8") from None


class DuplicateKey(ValueError):
    """A key given twice in one JSON object: json keeps the last silently (a YAML config refuses it too)."""


def _unique_keys(pairs: list[tuple[str, object]]) -> dict:
    keys = [k for k, _ in pairs]
    if len(set(keys)) < len(keys):
        twice = next(k for k in keys if keys.count(k) > 1)
        raise DuplicateKey(f"key {twice!r} appears twice in one object: keep one")
    return dict(pairs)


def json_lines(text: str, source: str) -> list[Row]:
    """One JSON object per line (blank lines skipped), each knowing its line; UserError naming the 1-based line
    of a bad one."""
    rows = []
    for n, line in enumerate(text.split("\n"), 1):  # not splitlines(): U+2028 may sit inside a JSON string
        if not line.strip():
            continue
        try:
            row = json.loads(line, object_pairs_hook=_unique_keys)
        except DuplicateKey as e:
            raise UserError(f"dataset file {source!r} line {n}: {e}") from None
        except json.JSONDecodeError as e:
            raise UserError(f"dataset file {source!r} line {n}: not valid JSON ({e.msg} at column {e.colno})") from None
        except RecursionError:
            raise UserError(f"dataset file {source!r} line {n}: nested too deep to read") from None
        if not isinstance(row, dict):
            raise UserError(f"dataset file {source!r} line {n}: expected a JSON object {{\"column\": value, ...}}, "
                            f"got {type(row).__name__}")
        rows.append(Row(row, f"dataset file {source!r} line {n}"))
    return rows


def json_rows(text: str, source: str) -> list[Row]:
    """A .json file: a list of objects, one object, or (as often named .json) one object per line."""
    if not text.strip():
        return []
    try:
        data = json.loads(text, object_pairs_hook=_unique_keys)
    except DuplicateKey as e:
        raise UserError(f"dataset file {source!r}: {e}") from None
    except RecursionError:
        raise UserError(f"dataset file {source!r}: nested too deep to read") from None
    except json.JSONDecodeError as e:
        if e.msg == "Extra data":  # a first complete value, then more: JSON Lines
            return json_lines(text, source)
        raise UserError(f"dataset file {source!r} line {e.lineno}: not valid JSON ({e.msg} at column "
                        f"{e.colno})") from None
    rows = data if isinstance(data, list) else [data]
    for i, row in enumerate(rows):
        if not isinstance(row, dict):
            raise UserError(f"dataset file {source!r} item {i + 1}: expected a JSON object {{\"column\": value, "
                            f"...}}, got {type(row).__name__}")
    return [Row(row, f"dataset file {source!r} item {i + 1}") for i, row in enumerate(rows)]


def same_columns(rows: list[Row]) -> list[Row]:
    """Every row with every column (None where a row lacks one), as `datasets` gives them."""
    columns = list(dict.fromkeys(k for r in rows for k in r))
    return [Row({k: r.get(k) for k in columns}, r.origin) for r in rows]


def file_is_empty(path: Path, fmt: str, source: str) -> bool:
    """True when a CSV or parquet file holds no data rows (`datasets` then fails with an unrelated message)."""
    if fmt == "parquet":
        import pyarrow.parquet as pq

        try:
            return pq.ParquetFile(path).metadata.num_rows == 0
        except Exception:  # not parquet at all: `datasets` reports it
            return False
    records = csv.reader(line for line in read_text(path, source).splitlines() if line.strip())
    try:
        return sum(1 for _ in zip(range(2), records)) < 2  # a header and no row, or nothing
    except csv.Error:  # a field past the csv module's limit: a row all the same, which `datasets` reads
        return False


def load_rows(source: str, default_split: str = "train") -> list[Row]:
    path = Path(source).expanduser()
    if path.suffix in FILE_FORMATS or path.exists():
        if not path.is_file():
            raise UserError(f"dataset file {source!r} not found: expected a .jsonl, .json, .parquet or .csv file")
        if path.suffix not in FILE_FORMATS:
            raise UserError(f"dataset file {source!r}: unsupported extension, expected .jsonl, .json, .parquet or "
                            ".csv")
        if path.suffix == ".jsonl":
            return same_columns(json_lines(read_text(path, source), source))
        if path.suffix == ".json":
            return same_columns(json_rows(read_text(path, source), source))
        if file_is_empty(path, FILE_FORMATS[path.suffix], source):
            return []
    return _load_with_datasets(source, path, default_split)


def _load_with_datasets(source: str, path: Path, default_split: str) -> list[Row]:
    import datasets

    datasets.disable_progress_bars()
    datasets.logging.set_verbosity_error()  # its own log line of a failure would precede ours
    try:
        if path.is_file():
            ds = datasets.load_dataset(FILE_FORMATS[path.suffix], data_files=str(path), split="train")
            where = f"dataset file {source!r} record"
        else:
            name_config, _, split = source.partition("@")
            name, _, config = name_config.partition(":")
            ds = datasets.load_dataset(name, config or None, split=split or default_split)
            where = f"dataset {name_config!r} split {split or default_split!r} row"
    except Exception as e:  # datasets raises many types; the user needs the first line of the cause
        while e.__cause__ is not None and isinstance(e.__cause__, Exception):  # "An error occurred while ..."
            e = e.__cause__
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"cannot load dataset {source!r}: {first}") from None
    return [Row(r, f"{where} {i + 1}") for i, r in enumerate(ds)]


def require_columns(rows: list[dict], columns: list[str], source: str) -> None:
    if not rows:
        raise UserError(f"dataset {source!r} is empty: expected at least one row with column(s) {columns}")
    missing = [c for c in columns if c not in rows[0]]
    if missing:
        raise UserError(
            f"dataset {source!r} lacks column(s) {missing}: expected {columns}, found {sorted(rows[0])}"
        )


def _missing(value) -> str | None:
    """'null' or 'empty' when a cell holds nothing usable (CSV and parquet give NaN for a blank number)."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "null"
    if isinstance(value, str) and not value.strip():
        return "empty"
    return None


def prompt_text(value, where: str, column: str) -> str:
    """The prompt of the row from `where` (its origin): non-empty text, or a UserError naming the row."""
    if (missing := _missing(value)) is not None:
        raise UserError(f"{where}: {column!r} is {missing}: expected the prompt text")
    if not isinstance(value, str):
        raise UserError(f"{where}: {column!r} is not text ({type(value).__name__} "
                        f"{str(value)[:40]}): expected the prompt text")
    return value


ROLES = ("system", "user", "assistant")


def prompt_value(value, where: str, column: str) -> str | list[dict]:
    """A prompt cell: text, or chat messages [{"role": "system"|"user"|"assistant", "content": text}, ...] (as
    JSON, parquet and `datasets` give them: a list of dicts; numpy arrays from pandas too) ending with a user
    turn. Messages come back as plain {"role", "content"} dicts; anything else is a UserError naming the row."""
    if hasattr(value, "tolist") and not isinstance(value, str):
        value = value.tolist()
    if not isinstance(value, list):
        return prompt_text(value, where, column)
    cell = f"{where}: {column!r}"
    if not value:
        raise UserError(f"{cell} is an empty list: expected chat messages [{{\"role\": ..., \"content\": ...}}]")
    out = []
    for i, m in enumerate(value):
        if not (isinstance(m, dict) and m.get("role") in ROLES and isinstance(m.get("content"), str)):
            raise UserError(f"{cell} message {i + 1} is not {{\"role\": one of {list(ROLES)}, \"content\": text}} "
                            f"(got {str(m)[:60]})")
        out.append({"role": m["role"], "content": m["content"]})
    if out[-1]["role"] != "user":
        raise UserError(f"{cell}: the last message is {out[-1]['role']!r}: expected a user turn (the model "
                        "answers it; put an answer's opening in task.prefill)")
    return out


def prompt_preview(prompt: str | list[dict], n: int = 30) -> str:
    """The start of a prompt for messages: its text, or a messages prompt's last user turn."""
    text = prompt if isinstance(prompt, str) else prompt[-1]["content"]
    return text[:n]


def answer_text(value, where: str, column: str) -> str:
    """The reference answer of the row from `where` as text (a finite number allowed: 4 -> '4'); UserError
    when it is missing, or a list, a mapping, a boolean or an infinite number (whose text no answer matches)."""
    if (missing := _missing(value)) is not None:
        raise UserError(f"{where}: {column!r} is {missing}: expected the reference answer")
    number = isinstance(value, (numbers.Real, decimal.Decimal)) and not isinstance(value, bool)
    if not (isinstance(value, str) or number) or number and not math.isfinite(value):
        raise UserError(f"{where}: {column!r} is {type(value).__name__} {str(value)[:40]}: expected the reference "
                        "answer as text or a finite number")
    return str(value)


def gsm8k_answer(solution: str) -> str:
    """The number after '#### ' in a GSM8K solution, commas removed ('#### 1,200' -> '1200')."""
    m = re.search(r"####\s*(.+?)\s*$", solution.strip())
    if not m:
        raise ValueError("no '#### answer' line")
    return m.group(1).replace(",", "").strip()


def gsm8k_rows(source: str) -> list[Row]:
    rows = load_rows(source)
    require_columns(rows, ["question", "answer"], source)
    out = []
    for r in rows:
        solution = answer_text(r["answer"], r.origin, "answer")
        try:
            answer = gsm8k_answer(solution)
        except ValueError:
            raise UserError(f"{r.origin}: answer must end with '#### <number>'") from None
        out.append(Row({"prompt": prompt_text(r["question"], r.origin, "question"), "answer": answer,
                        "solution": solution}, r.origin))
    return out


def is_verl_style(rows: list[dict], answer_column: str | None) -> bool:
    """verl's RL data layout: a `reward_model` column of {"ground_truth": ..., "style": ...} (beside
    `data_source`, `prompt` as chat messages and `extra_info`), and no answer column of its own."""
    return bool(rows) and "reward_model" in rows[0] and (answer_column is None or answer_column not in rows[0])


def dataset_rows(source: str, prompt_column: str, answer_column: str | None) -> list[Row]:
    """Rows with 'prompt' (text or chat messages) and 'answer' when answer_column is set; every other column
    is kept for rewards. verl-style rows (`is_verl_style`) get `ground_truth` from reward_model.ground_truth
    (as stored: what a verl compute_score expects) and 'answer' as its text."""
    rows = load_rows(source)
    verl = is_verl_style(rows, answer_column)
    require_columns(rows, [prompt_column] + ([answer_column] if answer_column and not verl else []), source)
    out = []
    for r in rows:
        row = Row(r, r.origin)
        row["prompt"] = prompt_value(row.pop(prompt_column), r.origin, prompt_column)
        if verl:
            rm = row.get("reward_model")
            if not isinstance(rm, dict) or _missing(rm.get("ground_truth")) is not None:
                raise UserError(f"{r.origin}: 'reward_model' has no ground_truth: expected "
                                "{\"ground_truth\": ..., \"style\": \"rule\"} (verl's layout)")
            gt = rm["ground_truth"]
            row["ground_truth"] = gt.tolist() if hasattr(gt, "tolist") else gt
            row["answer"] = answer_text(row["ground_truth"], r.origin, "reward_model.ground_truth")
        elif answer_column:
            row["answer"] = answer_text(row.pop(answer_column), r.origin, answer_column)
        out.append(row)
    return out
