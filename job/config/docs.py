"""The settings tables of docs/configuration.md, derived from the sections: one table per section, a row per
setting with its variable, type and range, default and meaning (`settings_tables`), written into the page by
`python -m job.config.docs --write docs/configuration.md` (`make docs`); tests/config/ keeps the page equal to them.
`qwen3-sft config --explain` prints the same fields beside the effective values (`explain`).
"""

from __future__ import annotations

import argparse
import json
import sys
import textwrap
import typing
from pathlib import Path
from typing import Any

import annotated_types
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined

from job.cards import ModelCards, ModelSpec
from job.config.schema import JobConfig
from job.config.settings import SETTINGS_DOC, env_name, meta

HEADER = ("| Variable | Type | Default | Meaning |", "|---|---|---|---|")
# A section's table title in docs/configuration.md ("### <title>").
TITLES = {"model": "Model", "data": "Data", "image": "Image", "train": "Run and training", "lora": "LoRA",
          "eval": "Evaluation", "wandb": "Weights & Biases", "storage": "Storage", "hub": "Hub and the push gate",
          "export": "Export", "lineage": "Lineage", "card": "Model card"}


def _cell(text: str) -> str:
    return text.replace("|", "\\|")  # a pipe inside a table cell, even in code


def _choices(annotation: Any) -> list[Any] | None:
    if typing.get_origin(annotation) is typing.Literal:
        return list(typing.get_args(annotation))
    return None


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else f"{value:g}"


def _range(kind: str, metadata: list[Any]) -> str:
    bounds = {type(m).__name__: getattr(m, type(m).__name__.lower()) for m in metadata
              if isinstance(m, (annotated_types.Ge, annotated_types.Gt, annotated_types.Le, annotated_types.Lt))}
    low = ("[", bounds["Ge"]) if "Ge" in bounds else ("(", bounds["Gt"]) if "Gt" in bounds else None
    high = (bounds["Le"], "]") if "Le" in bounds else (bounds["Lt"], ")") if "Lt" in bounds else None
    if low and high:
        return f"{kind}, {low[0]}{_number(low[1])}, {_number(high[0])}{high[1]}"
    if low:
        return f"{kind} {'>=' if low[0] == '[' else '>'} {_number(low[1])}"
    if high:
        return f"{kind} {'<=' if high[1] == ']' else '<'} {_number(high[0])}"
    longest = next((m.max_length for m in metadata if isinstance(m, annotated_types.MaxLen)), None)
    if longest is not None:
        return f"{kind}, 1..{longest} chars"
    return f"non-empty {kind}" if any(isinstance(m, annotated_types.MinLen) for m in metadata) else kind


def type_cell(info: FieldInfo) -> str:
    """The variable's type and range, as a reader writes them (`int, [1, 512]`, `` `fail` | `skip` ``)."""
    found = meta(info)
    choices = _choices(info.annotation)
    if choices:
        return " | ".join(f"`{c}`" for c in choices)
    if found["flat"] == "str":
        return "comma-separated names"
    args = {a for a in typing.get_args(info.annotation) if a is not type(None)} or {info.annotation}
    kind = " or ".join(sorted(t.__name__ for t in args)) if found["flat"] != "float" else "float"
    pattern = next((m.pattern for m in info.metadata if getattr(m, "pattern", None)), None)
    if pattern:
        return f"{kind}, `{pattern}`"
    return _range(kind, info.metadata)


def _shown(value: Any) -> str:
    if isinstance(value, tuple):
        value = ",".join(value)
    if isinstance(value, bool):
        value = str(value).lower()
    return f"`{value}`"


def default_cell(info: FieldInfo, card: ModelSpec) -> str:
    found = meta(info)
    if found["card"]:
        value = getattr(card, found["card"])
        return "card: none" if value is None else f"card: {_shown(value)}"
    if info.default is PydanticUndefined:
        return "derived"
    return "none" if info.default is None else _shown(info.default)


def settings_tables(card: ModelSpec) -> dict[str, list[tuple[str, str, str, str]]]:
    """Title -> (variable, type, default, meaning) of each setting of the section, in the section's order, each cell
    as the page writes it."""
    tables = {}
    for name, section in zip(JobConfig.model_fields, JobConfig.sections(), strict=True):
        tables[TITLES[name]] = [(f"`{env_name(meta(info)['env'])}`", _cell(type_cell(info)),
                                 _cell(default_cell(info, card)), _cell(info.description or ""))
                                for info in section.model_fields.values() if meta(info)["env"]]
    return tables


def table_lines(rows: list[tuple[str, str, str, str]]) -> list[str]:
    return [*HEADER, *(f"| {' | '.join(row)} |" for row in rows)]


def with_tables(page: str, card: ModelSpec) -> str:
    """The page with the table under each section's `## <title>` replaced by the one derived from the sections;
    the prose around the tables is kept. Raises ValueError for a title without its table on the page."""
    lines, missing = page.splitlines(), []
    for title, rows in settings_tables(card).items():
        at = lines.index(f"## {title}") + 1 if f"## {title}" in lines else None
        while at is not None and at < len(lines) and not lines[at].strip():
            at += 1
        if at is None or tuple(lines[at:at + 2]) != HEADER:
            missing.append(title)
            continue
        end = at
        while end < len(lines) and lines[end].startswith("|"):
            end += 1
        lines[at:end] = table_lines(rows)
    if missing:
        raise ValueError(f"no settings table under ## {', ## '.join(missing)} (add the heading and the header row)")
    return "\n".join(lines) + "\n"


def explain(values: dict[str, Any], card: ModelSpec) -> str:
    """Each setting under its section's title: the variable = the effective value (values: the config's JSON form,
    redacted), its type and default, and what it means, as the page says it."""
    out = []
    for name, section in zip(JobConfig.model_fields, JobConfig.sections(), strict=True):
        out.append(f"# {TITLES[name]}")
        for field, info in section.model_fields.items():
            if meta(info)["env"]:
                out.append(f"{env_name(meta(info)['env'])} = {json.dumps(values[name][field])}")
                out.append(f"    {type_cell(info)}; default {default_cell(info, card)}")
                out.extend(textwrap.wrap(info.description or "", 120, initial_indent="    ", subsequent_indent="    "))
        out.append("")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m job.config.docs",
                                     description=f"print the settings tables of {SETTINGS_DOC}, or write them")
    parser.add_argument("--write", metavar="PAGE", type=Path, help=f"rewrite the tables of PAGE ({SETTINGS_DOC})")
    args = parser.parse_args(argv)
    card = ModelCards().qwen3_vl_8b_instruct
    if args.write is None:
        for title, rows in settings_tables(card).items():
            print(f"## {title}\n\n" + "\n".join(table_lines(rows)) + "\n")
        return 0
    args.write.write_text(with_tables(args.write.read_text(), card))
    return 0


if __name__ == "__main__":
    sys.exit(main())
