"""The base of every config section, and what several sections share. How to add a setting:
job/config/sections/__init__.py.

A section builds itself from the validated variables and the model card (`from_settings`): the variable's value,
the card's where a card-backed variable is unset, and a few values the section derives (`_derived`). Sections are
frozen and hold tuples, not lists; `extra="forbid"` makes a misspelt key an error.
"""

from __future__ import annotations

from typing import Any, Self

from pydantic import BaseModel, ConfigDict

from job.cards import ModelSpec
from job.config.settings import meta

# What an SFT_EVAL_MODE leaves out, for the rules that need a metric it does not measure (job/metric_table.py).
NOT_MEASURED = {"generate": "turns scoring off (no label probabilities)",
                "score": "generates no verdict (nothing to parse or match)"}


class Section(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    @classmethod
    def from_settings(cls, s: Any, card: ModelSpec) -> Self:
        """Each field from its variable, else (card-backed and unset or empty) from the card; then `_derived`."""
        values = {}
        for name, info in cls.model_fields.items():
            found = meta(info)
            value = getattr(s, found["env"]) if found["env"] else None
            if (value is None or value == "") and found["card"]:
                value = getattr(card, found["card"])
            values[name] = value
        return cls.model_validate(cls._derived(values, s))

    @classmethod
    def _derived(cls, values: dict[str, Any], s: Any) -> dict[str, Any]:
        return values

    @staticmethod
    def rules(s: Any, card: ModelSpec) -> list[str]:
        """The problems of the rules that involve more than one variable (each has its raise-test)."""
        return []
