"""The `SFT_*` environment variables: how a section field names its variable (`setting`), the flat pydantic-settings
model derived from the sections (`flat_settings`), and every problem of an environment collected at once.

Each setting is declared once, as a field of its section in job/config/sections/ (type, range, default, example,
the model card's fallback, what it means); its variable is `SFT_<NAME>`. `job.config.schema` derives the flat
`Settings` from the sections, validates the environment with it (type and range errors, cross-field rules, unknown
`SFT_*` names with a "did you mean") and raises one `ConfigError` (exit 2) listing every problem.
"""

from __future__ import annotations

import difflib
from collections.abc import Mapping, Sequence
from typing import Annotated, Any

from pydantic import BaseModel, Field, ValidationError
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined
from pydantic_settings import BaseSettings, EnvSettingsSource, SettingsConfigDict
from pydantic_settings.sources.utils import parse_env_vars

ENV_PREFIX = "SFT_"
# The page that documents every setting (a test keeps its tables equal to the sections).
SETTINGS_DOC = "docs/configuration.md"
# The variable's type where it is not the field's: a comma-separated SFT_LORA_TARGET_MODULES is the tuple of names,
# and SFT_LORA_ALPHA is a float (64.0) where the card's alpha is an int (32): the JSON form keeps each as it was.
_FLAT_TYPES: dict[str, Any] = {"str": str, "float": float}


def setting(default: Any = PydanticUndefined, *, env: str | None = None, card: str | None = None,
            flat: str | None = None, examples: list[str] | None = None, doc: str | None = None,
            **constraints: Any) -> Any:
    """A section field, and the variable that sets it (`SFT_<ENV>`), declared once: its type is the field's, its
    range the constraints (checked on the variable and on the built section alike), its default the default, and
    what it means `doc` (the field's description: the Meaning cell of docs/configuration.md, markdown with links
    relative to docs/, and `qwen3-sft config --explain`; every variable has one).

    card: the ModelSpec attribute used when the variable is unset (or empty); the field then has no default of its
    own, and its variable defaults to None. env=None: the field comes from the card alone. A field whose section
    derives it (no default, no card) also has a variable that defaults to None. flat: the variable's type where it
    differs from the field's (a key of _FLAT_TYPES)."""
    if env is not None and not doc:
        raise TypeError(f"{env_name(env)}: a setting says what it means (doc=...)")
    extra: dict[str, Any] = {"env": env, "card": card, "flat": flat}
    section_default: Any = PydanticUndefined if card is not None else default
    return Field(section_default, examples=examples, description=doc, json_schema_extra=extra, **constraints)


def meta(info: FieldInfo) -> dict[str, Any]:
    """What `setting` recorded about a field: env, card and flat (all None for a field that is no setting)."""
    extra = info.json_schema_extra if isinstance(info.json_schema_extra, dict) else {}
    return {key: extra.get(key) for key in ("env", "card", "flat")}


def env_name(field: str) -> str:
    return f"{ENV_PREFIX}{field.upper()}"


def _flat_field(info: FieldInfo) -> tuple[Any, Any]:
    """The variable's (annotation, FieldInfo): the field's type and constraints; None by default when the section
    fills it (the card's value, or one the section derives)."""
    found = meta(info)
    annotation: Any = _FLAT_TYPES[found["flat"]] if found["flat"] else info.annotation
    filled = found["card"] is not None or info.default is PydanticUndefined
    if filled or info.default is None:  # a flat type (SFT_LABEL_NAMES: str) of a field that defaults to None
        annotation = annotation | None
    default = None if filled else info.default
    typed = Annotated[(annotation, *info.metadata)] if info.metadata else annotation
    return typed, Field(default, examples=info.examples, description=info.description)


def flat_fields(sections: Sequence[type[BaseModel]]) -> dict[str, tuple[Any, Any]]:
    """Every setting of the sections, in their order, by its variable's field name (SFT_ + the name upper-cased)."""
    fields: dict[str, tuple[Any, Any]] = {}
    for section in sections:
        for info in section.model_fields.values():
            name = meta(info)["env"]
            if name is not None:
                assert name not in fields, f"{env_name(name)} is declared twice"
                fields[name] = _flat_field(info)
    return fields


class FlatSettings(BaseSettings):
    """The base of the flat model of every `SFT_*` variable (job.config.schema.Settings)."""

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, case_sensitive=False, extra="ignore")


class _MappingEnvSource(EnvSettingsSource):
    """pydantic-settings' env source, reading a given mapping instead of os.environ (tests, dry runs)."""

    def __init__(self, settings_cls: type[BaseSettings], env: Mapping[str, str]):
        self._mapping = dict(env)
        super().__init__(settings_cls)

    def _load_env_vars(self) -> Mapping[str, str | None]:
        return parse_env_vars(self._mapping, self.case_sensitive, self.env_ignore_empty, self.env_parse_none_str)


def settings_from(settings_cls: type[FlatSettings], env: Mapping[str, str]) -> Any:
    """The variables of env, validated (raises pydantic's ValidationError)."""
    class _Scoped(settings_cls):  # type: ignore[valid-type, misc]
        @classmethod
        def settings_customise_sources(cls, settings_cls, init_settings, **_sources):
            return (init_settings, _MappingEnvSource(settings_cls, env))

    return _Scoped()


def unknown_var_problems(env: Mapping[str, str], known: tuple[str, ...]) -> list[str]:
    problems = []
    for name in sorted(k for k in env if k.upper().startswith(ENV_PREFIX)):
        if name.upper() in known:
            continue
        close = difflib.get_close_matches(name.upper(), known, n=1, cutoff=0.6)
        hint = f"; did you mean {close[0]}?" if close else f"; known names: see {SETTINGS_DOC} (e.g. {known[0]})"
        problems.append(f"{name}: unknown setting{hint}")
    return problems


def field_problems(exc: ValidationError, env: Mapping[str, str], settings_cls: type[FlatSettings]) -> list[str]:
    """One problem per variable: the errors of a union's members (`int` or `auto`) joined with "or"."""
    upper_env = {k.upper(): v for k, v in env.items()}
    errors: dict[str, list[Any]] = {}
    for err in exc.errors():
        errors.setdefault(str(err["loc"][0]) if err["loc"] else "?", []).append(err)
    problems = []
    for field, errs in errors.items():
        name = env_name(field)
        info = settings_cls.model_fields.get(field)
        examples = ", ".join(map(str, (info.examples or []) if info else []))
        value = upper_env.get(name, errs[0].get("input"))
        example = f" (example: {name}={examples.split(', ')[0]})" if examples else ""
        problems.append(f"{name}={value!r}: {', or '.join(e['msg'] for e in errs)}{example}")
    return problems


def effective_save_steps(s: Any) -> int:
    """The save interval follows a short run: a default SFT_SAVE_STEPS larger than SFT_MAX_STEPS becomes it."""
    return min(s.save_steps, s.max_steps) if s.max_steps > 0 else s.save_steps
