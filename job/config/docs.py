"""The settings tables of docs/configuration.md, derived from the sections: one table per section, a row per
setting with its variable, type and range, and default (`settings_tables`). The fourth column, what the setting
means, is written in docs/configuration.md alone; tests/config/ keeps the first three equal to the schema.
"""

from __future__ import annotations

import typing
from typing import Any

import annotated_types
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined

from job.cards import ModelSpec
from job.config.schema import JobConfig
from job.config.settings import env_name, meta

HEADER = ("| Variable | Type | Default | Meaning |", "|---|---|---|---|")
# A section's table title in docs/configuration.md ("### <title>").
TITLES = {"model": "Model", "data": "Data", "image": "Image", "train": "Run and training", "lora": "LoRA",
          "eval": "Evaluation", "wandb": "Weights & Biases", "storage": "Storage", "hub": "Hub and the push gate",
          "export": "Export", "lineage": "Lineage", "card": "Model card"}


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
    """The variable's type and range, as a reader writes them (`int, [1, 512]`, `` `fail` \\| `skip` ``)."""
    found = meta(info)
    choices = _choices(info.annotation)
    if choices:
        return " \\| ".join(f"`{c}`" for c in choices)
    words = [c for a in typing.get_args(info.annotation) for c in _choices(a) or ()]
    if words:  # a number or a word (SFT_PER_DEVICE_BATCH_SIZE: an int range or `auto`)
        number, *_ = (a for a in typing.get_args(info.annotation) if _choices(a) is None)
        kind, *constraints = typing.get_args(number)
        ranged = _range(kind.__name__, [m for c in constraints for m in c.metadata])
        return f"{ranged} or " + " \\| ".join(f"`{w}`" for w in words)
    if found["flat"] == "str":
        return "comma-separated names"
    args = {a for a in typing.get_args(info.annotation) if a is not type(None)} or {info.annotation}
    kind = " or ".join(sorted(t.__name__ for t in args)) if found["flat"] != "float" else "float"
    pattern = next((m.pattern for m in info.metadata if getattr(m, "pattern", None)), None)
    if pattern:
        return f"{kind}, `{pattern}`".replace("|", "\\|")  # a pipe inside a table cell, even in code
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


def settings_tables(card: ModelSpec) -> dict[str, list[tuple[str, str, str]]]:
    """Title -> (variable, type, default) of each setting of the section, in the section's order."""
    tables = {}
    for name, section in zip(JobConfig.model_fields, JobConfig.sections(), strict=True):
        tables[TITLES[name]] = [(f"`{env_name(meta(info)['env'])}`", type_cell(info), default_cell(info, card))
                                for info in section.model_fields.values() if meta(info)["env"]]
    return tables
