"""SFT_TARGET_FORMAT=label: a column holding a class label is the target, and the verdict is `{SFT_LABEL_FIELD: name}`.

The public multimodal datasets hold a label, not a JSON verdict: a `ClassLabel` integer with names, a plain integer,
or a string. A label's name is, in this order:
- a `ClassLabel`'s: the column's feature as `datasets` restores it (the `huggingface` schema metadata of a parquet file
  it wrote, a `save_to_disk` directory), else the ClassLabel the source declares beside its files (`dataset_info.json`,
  or the README card's `dataset_info` features of SFT_DATASET_CONFIG's configuration);
- a plain integer's: SFT_LABEL_NAMES (index -> name); without it `LabelNamesMissing` (exit 2, the values found);
- a string's: the string itself (one of SFT_LABEL_NAMES, when given).

`LabelColumn.verdict` is the row rule (a value outside the names is a bad row, reported by preflight like any other);
`with_verdicts` turns a checked split's column into the verdicts' JSON text, exactly what a `target_json` column of
`{"label": "sarcastic"}` holds, so training, eval, the label set and the card read both formats alike.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from job.config.sections.data import DataConfig
from job.data.rows import RowProblem, describe
from job.errors import LabelNamesConflict, LabelNamesMissing

LabelKind = Literal["class_label", "integer", "string", "absent"]
_FIX = "give the row one of the class names (or its index), or fix SFT_LABEL_NAMES"


@dataclass(frozen=True)
class LabelColumn:
    """The label column as preflight understood it: its kind, its class names (index -> name; for strings the names
    allowed, None = any) and where they come from."""

    column: str
    field: str
    kind: LabelKind
    names: tuple[str, ...] | None
    source: str

    def verdict(self, value: Any) -> dict | RowProblem:
        """The row's verdict `{field: name}`, or the rule its label breaks."""
        if value is None or (self.kind == "class_label" and value == -1):  # -1: datasets' "no label"
            return RowProblem("missing_field", self.column, "has no class label",
                              f"give every row a label in '{self.column}' (or set SFT_TARGET_KEY)", "has no label")
        name = self._name(value)
        if isinstance(name, RowProblem):
            return name
        return {self.field: name}

    def _name(self, value: Any) -> str | RowProblem:
        if self.kind == "string":
            if not isinstance(value, str) or not value.strip():
                return RowProblem("bad_type", self.column, f"is {describe(value)}, expected a class name",
                                  "store each label as a non-empty string", f"has type {type(value).__name__}")
            if self.names is not None and value not in self.names:
                return self._unknown(value)
            return value
        integral = isinstance(value, int) or (isinstance(value, float) and value.is_integer())
        if isinstance(value, bool) or not integral:
            return RowProblem("bad_type", self.column, f"is {describe(value)}, expected a class index",
                              "store each label as an integer class index", f"has type {type(value).__name__}")
        names = self.names or ()
        index = int(value)
        return names[index] if 0 <= index < len(names) else self._unknown(value)

    def _unknown(self, value: Any) -> RowProblem:
        names = ", ".join(f"{i}: {n}" for i, n in enumerate(self.names or ())) if self.kind != "string" \
            else ", ".join(self.names or ())
        message = f"is {describe(value)}, not one of the {len(self.names or ())} class names ({names})"
        return RowProblem("label_unknown", self.column, message, _FIX, message)

    def verdict_text(self, value: Any) -> str | None:
        """The verdict as the training target's text (json.dumps as job.data.rows.target_text); None for a bad row."""
        found = self.verdict(value)
        return None if isinstance(found, RowProblem) else json.dumps(found, ensure_ascii=False)

    def to_json(self) -> dict:
        return {"column": self.column, "format": "label", "kind": self.kind, "label_field": self.field,
                "names": list(self.names) if self.names is not None else None, "names_from": self.source}


def _kind(feature: Any) -> LabelKind:
    import datasets

    if isinstance(feature, datasets.ClassLabel):
        return "class_label"
    dtype = getattr(feature, "dtype", "")
    if isinstance(feature, datasets.Value) and dtype.startswith(("int", "uint", "float")):
        return "integer"  # a float column: JSON lines of integers with a null, or pandas' NaN
    return "string"


def declared_class_names(dataset_path: str | None, column: str, config: str | None) -> tuple[list[str], str] | None:
    """The ClassLabel names the source declares for `column` beside its files, and where: its `dataset_info.json`,
    else its README card's `dataset_info` (the entry of `config`, or its only one)."""
    import datasets
    from datasets.info import DatasetInfosDict
    from huggingface_hub import DatasetCard

    if not dataset_path:
        return None
    root = Path(dataset_path) if Path(dataset_path).is_dir() else Path(dataset_path).parent
    features, where = None, ""
    if (root / "dataset_info.json").is_file():
        features, where = datasets.DatasetInfo.from_directory(str(root)).features, "dataset_info.json"
    elif (root / "README.md").is_file():
        infos = DatasetInfosDict.from_dataset_card_data(DatasetCard.load(root / "README.md").data)
        info = infos.get(config or "default") or (next(iter(infos.values())) if len(infos) == 1 else None)
        features, where = (info.features if info else None), "the dataset card (README.md dataset_info)"
    feature = (features or {}).get(column)
    return (list(feature.names), where) if isinstance(feature, datasets.ClassLabel) else None


def label_column(splits: dict[str, Any], data: DataConfig, dataset_path: str | None) -> LabelColumn | None:
    """SFT_TARGET_FORMAT=label: the label column of the loaded splits (role -> Dataset) and its class names; None for
    json. Raises LabelNamesMissing (plain integers, no names) and LabelNamesConflict (SFT_LABEL_NAMES is not the
    ClassLabel's)."""
    if data.target_format != "label":
        return None
    column, given = data.target_key, data.label_names
    features = [ds.features[column] for ds in splits.values() if column in ds.features]
    if not features:  # preflight reports the missing column (SFT_TARGET_KEY) with the split's columns
        return LabelColumn(column, data.label_field, "absent", given, "SFT_LABEL_NAMES" if given else "none")
    kind = _kind(features[0])
    declared: tuple[list[str], str] | None = None
    if kind == "class_label":
        declared = (list(features[0].names), "the column's ClassLabel feature")
    elif kind == "integer":
        declared = declared_class_names(dataset_path, column, data.config)
    if declared is not None:
        names, source = declared
        if given is not None and tuple(given) != tuple(names):
            raise LabelNamesConflict(column, names, list(given), source)
        return LabelColumn(column, data.label_field, "class_label", tuple(names), source)
    if kind == "integer" and given is None:
        values = sorted({int(v) for ds in splits.values() if column in ds.column_names
                         for v in ds.unique(column) if v is not None and float(v).is_integer()})
        raise LabelNamesMissing(column, values)
    return LabelColumn(column, data.label_field, kind, given,
                       "SFT_LABEL_NAMES" if given is not None else "the values themselves")


def with_verdicts(ds: Any, labels: LabelColumn | None) -> Any:
    """The split with its label column replaced by the verdicts' JSON text (None where a row has no valid label:
    preflight has refused or dropped such rows); the split itself for json targets."""
    if labels is None or ds is None or labels.column not in ds.column_names:
        return ds
    texts = [labels.verdict_text(value) for value in ds[labels.column]]
    return ds.remove_columns(labels.column).add_column(labels.column, texts)
