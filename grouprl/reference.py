"""The config reference (docs/config.md), written from the pydantic tree itself, so the page cannot drift
from the code: `python -m grouprl.reference > docs/config.md`, and a test checks the page is current."""

from __future__ import annotations

import json
import re
import types
import typing

from pydantic import BaseModel
from pydantic_core import PydanticUndefined, to_jsonable_python

from grouprl.config import TrainConfig

HEADER = """# Config reference

Every field of a run's config: set it in the YAML file (sections as nested mappings) or on the command line
with `--set section.field=value`. A field left out takes its default. Written from `grouprl/config.py` by
`python -m grouprl.reference > docs/config.md`; a test keeps this page equal to the code.
"""


def type_name(annotation) -> str:
    """A field's type as a user writes it in YAML: `grpo` | `ppo`, int, float or null, list of ..."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is typing.Literal:
        return " \\| ".join(f"`{json.dumps(a) if isinstance(a, bool) else a}`" for a in args)
    if origin in (typing.Union, types.UnionType):
        return " or ".join("null" if a is type(None) else type_name(a) for a in args)
    if origin in (list, tuple):
        inner = [a for a in args if a is not Ellipsis]
        return f"list of {type_name(inner[0])}" if inner else "list"
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return "mapping"
    return getattr(annotation, "__name__", str(annotation))


def default_text(field) -> str:
    if field.default_factory is not None:
        value = field.default_factory()
    elif field.default is PydanticUndefined:
        return "required"
    else:
        value = field.default
    return f"`{json.dumps(to_jsonable_python(value))}`"


def slug(heading: str) -> str:
    """The anchor GitHub gives a heading: lower case, punctuation other than - and _ dropped, spaces as -."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def cell(text: str) -> str:
    return " ".join(text.split()).replace("|", "\\|")


def sections(model: type[BaseModel], prefix: str = "") -> list[tuple[str, list[str]]]:
    """(title, table rows) for this section and, after it, each of its subsections."""
    rows, subs = [], []
    for name, field in model.model_fields.items():
        dotted = f"{prefix}{name}"
        annotation, what = field.annotation, cell(field.description or "")
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            subs += sections(annotation, f"{dotted}.")
            rows.append(f"| `{dotted}` | mapping | | {what} [Its fields.](#{slug(dotted)}) |")
            continue
        item = (typing.get_args(annotation) or [None])[0]
        if typing.get_origin(annotation) is list and isinstance(item, type) and issubclass(item, BaseModel):
            subs += sections(item, f"{dotted}[].")
        rows.append(f"| `{dotted}` | {type_name(annotation)} | {default_text(field)} | {what} |")
    return [(prefix.rstrip(".") or "top level", rows)] + subs


def reference_markdown() -> str:
    out = [HEADER]
    for title, rows in sections(TrainConfig):
        out += [f"## {title}", "", "| field | type | default | what it does |", "| --- | --- | --- | --- |", *rows, ""]
    return "\n".join(out)


if __name__ == "__main__":
    print(reference_markdown(), end="")
