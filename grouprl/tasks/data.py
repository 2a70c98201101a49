"""Loading rows from files or `datasets`: GSM8K-format data and a generic prompt-column dataset.

Sources: a .jsonl/.json/.parquet/.csv path, or a `datasets` name with an optional config and split,
'name[:config][@split]' (e.g. 'openai/gsm8k:main@train'). Rows come back as plain dicts.
"""

from __future__ import annotations

import re
from pathlib import Path

from grouprl.errors import UserError

FILE_FORMATS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}


def load_rows(source: str, default_split: str = "train") -> list[dict]:
    import datasets

    datasets.disable_progress_bars()
    path = Path(source).expanduser()
    try:
        if path.suffix in FILE_FORMATS or path.exists():
            if not path.is_file():
                raise UserError(f"dataset file {source!r} not found: expected a .jsonl, .json, .parquet or .csv file")
            if path.suffix not in FILE_FORMATS:
                raise UserError(f"dataset file {source!r}: unsupported extension, expected .jsonl, .parquet or .csv")
            ds = datasets.load_dataset(FILE_FORMATS[path.suffix], data_files=str(path), split="train")
        else:
            name, _, split = source.partition("@")
            name, _, config = name.partition(":")
            ds = datasets.load_dataset(name, config or None, split=split or default_split)
    except UserError:
        raise
    except Exception as e:  # datasets raises many types; the user needs the first line only
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"cannot load dataset {source!r}: {first}") from None
    return [dict(r) for r in ds]


def require_columns(rows: list[dict], columns: list[str], source: str) -> None:
    if not rows:
        raise UserError(f"dataset {source!r} is empty")
    missing = [c for c in columns if c not in rows[0]]
    if missing:
        raise UserError(
            f"dataset {source!r} lacks column(s) {missing}: expected {columns}, found {sorted(rows[0])}"
        )


def gsm8k_answer(solution: str) -> str:
    """The number after '#### ' in a GSM8K solution, commas removed ('#### 1,200' -> '1200')."""
    m = re.search(r"####\s*(.+?)\s*$", solution.strip())
    if not m:
        raise ValueError("no '#### answer' line")
    return m.group(1).replace(",", "").strip()


def gsm8k_rows(source: str) -> list[dict]:
    rows = load_rows(source)
    require_columns(rows, ["question", "answer"], source)
    out = []
    for i, r in enumerate(rows):
        try:
            answer = gsm8k_answer(str(r["answer"]))
        except ValueError:
            raise UserError(f"dataset {source!r} row {i}: answer must end with '#### <number>'") from None
        out.append({"prompt": r["question"], "answer": answer, "solution": r["answer"]})
    return out


def dataset_rows(source: str, prompt_column: str, answer_column: str | None) -> list[dict]:
    """Rows with 'prompt' (and 'answer' when answer_column is set); every other column is kept for rewards."""
    rows = load_rows(source)
    require_columns(rows, [prompt_column] + ([answer_column] if answer_column else []), source)
    out = []
    for r in rows:
        row = dict(r)
        row["prompt"] = str(row.pop(prompt_column))
        if answer_column:
            row["answer"] = str(row.pop(answer_column))
        out.append(row)
    return out
