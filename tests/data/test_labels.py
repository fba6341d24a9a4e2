"""#35: the public sarcasm datasets as they are. A class-label column as the target (SFT_TARGET_FORMAT=label: a
ClassLabel, a plain integer with SFT_LABEL_NAMES, a string), a fixed question (SFT_QUERY_TEXT) for data without a
query column, and the card's configurations (SFT_DATASET_CONFIG) read from a local directory and an s3:// prefix as
from a Hub id (the Hub id: tests/storage/test_sources.py). Built with the real `datasets` library; preflight runs
in-process with the session's processor.
"""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from helpers import SARCASM_QUERY, TINY_PIXELS, noise_image, sarcasm_card_dataset

from job.cards import ModelCards
from job.collators.qwen3_collator import Qwen3VisionSFTCollator
from job.config.schema import build_cfg
from job.errors import (
    DataError,
    LabelNamesConflict,
    LabelNamesMissing,
    QueryColumnConflict,
    UserError,
    exit_code_for,
)
from job.eval.score import LabelSet
from job.preflight import run as preflight
from job.storage import s3 as s3io
from job.storage.sources import localize

CARD = ModelCards().qwen3_vl_8b_instruct
# The worked example of docs/data.md ("Train on a public sarcasm dataset"), on the test copy of the dataset.
PUBLIC = {"SFT_DATASET_CONFIG": "en", "SFT_TARGET_FORMAT": "label", "SFT_TARGET_KEY": "text_label",
          "SFT_QUERY_TEXT": SARCASM_QUERY, "SFT_CAPTION_KEY": "text", "SFT_IMAGE_KEY": "image"}
SARCASTIC, NOT = '{"label": "sarcastic"}', '{"label": "non-sarcastic"}'


def make_cfg(tiny_assets, uri, tmp_path: Path, **env: str):
    return build_cfg(CARD, {"SFT_MODEL_ID": str(tiny_assets[0]), "SFT_DATASET_URI": str(uri),
                            "SFT_OUTPUT_DIR": str(tmp_path / "out"), "SFT_CACHE_DIR": str(tmp_path / "cache"),
                            "SFT_MAX_LENGTH": "512", "SFT_MIN_CLASS_ROWS": "0", **TINY_PIXELS, **env})


def checked(cfg, processor):
    """localize (mirror, card configuration) and preflight, as `preflight` does after loading the processor."""
    return preflight.run_preflight(cfg, localize(cfg).dataset_path, processor)


def jsonl_dataset(root: Path, labels: dict[str, list], **extra) -> Path:
    """One JSONL per split: an image, a caption and a `label` column holding the given values."""
    (root / "images").mkdir(parents=True)
    for n, (split, values) in enumerate(labels.items()):
        lines = []
        for i, value in enumerate(values):
            noise_image((40, 32), seed=100 * n + i).save(root / "images" / f"{split}-{i}.png")
            lines.append(json.dumps({"image": f"images/{split}-{i}.png", "caption": f"post {i}", "label": value,
                                     **extra}))
        (root / f"{split}.jsonl").write_text("\n".join(lines) + "\n")
    return root


def test_the_public_shape_from_a_local_directory_and_an_s3_prefix(s3_endpoint, tmp_path, tiny_assets, processor,
                                                                  capsys):
    """The card's `en` configuration (per-split data_files globs), its ClassLabel names, no query column, the post's
    text as the caption, and its `test` split evaluated: the same rows, names and verdicts from both places."""
    root = sarcasm_card_dataset(tmp_path / "upload")
    bucket = f"labels-{abs(hash(str(tmp_path))) % 10**8}"
    s3io.client().create_bucket(Bucket=bucket)
    s3io.upload_dir(s3io.client(), root, s3io.S3Uri(bucket, "sarcasm"))
    for uri in (root, f"s3://{bucket}/sarcasm"):
        result = checked(make_cfg(tiny_assets, uri, tmp_path, SFT_EVAL_SPLIT="test", **PUBLIC), processor)
        report = result.report
        assert report["ok"], report["errors"]
        assert report["understood"] == {
            "image": {"column": "image", "splits": ["train", "test"]},
            "query": {"text": SARCASM_QUERY},
            "caption": {"column": "text", "splits": ["train", "test"]},
            "target": {"column": "text_label", "splits": ["train", "test"], "format": "label", "kind": "class_label",
                       "label_field": "label", "names": ["non-sarcastic", "sarcastic"],
                       "names_from": "the column's ClassLabel feature"},
            "label_counts": {"train": {"non-sarcastic": 3, "sarcastic": 3},
                             "test": {"non-sarcastic": 1, "sarcastic": 1}},
        }, uri
        assert [report["splits"][role]["rows"] for role in ("train", "eval")] == [6, 2]
        # The verdicts training and eval read: exactly a target_json column's text for the same labels.
        assert list(result.train_dataset["text_label"]) == [NOT, SARCASTIC] * 3
        assert list(result.eval_dataset["text_label"]) == [NOT, SARCASTIC]
        assert list(result.train_dataset["id"]) == [f"en-train-{i}" for i in range(6)]  # en's files, not zh's
        out = capsys.readouterr().out
        assert f"columns: image <- 'image' (train, test); query <- SFT_QUERY_TEXT {SARCASM_QUERY!r}; caption <- " \
               "'text' (train, test)\n" in out
        assert "target <- 'text_label': class labels (class_label; names from the column's ClassLabel feature: " \
               'non-sarcastic, sarcastic), the verdict {"label": name}\n' in out
        assert "labels train: non-sarcastic=3, sarcastic=3\nlabels test: non-sarcastic=1, sarcastic=1\n" in out


def test_a_label_verdict_is_the_answer_a_json_target_trains(processor):
    """The label path's answer text is the json path's, token for token, and so is the label set scoring mode uses."""
    collator = Qwen3VisionSFTCollator(processor, query_text=SARCASM_QUERY, caption_key="text", target_key="text_label")
    as_label = {"text": "Oh great, rain", "text_label": SARCASTIC}  # what with_verdicts made of a ClassLabel 1
    as_json = {"query": SARCASM_QUERY, "caption": "Oh great, rain", "target_json": {"label": "sarcastic"}}
    assert collator.chat_text(as_label) == Qwen3VisionSFTCollator(processor).chat_text(as_json)
    assert LabelSet.from_targets([NOT, SARCASTIC], "label") == \
        LabelSet.from_targets([{"label": "non-sarcastic"}, {"label": "sarcastic"}], "label")


def test_plain_integers_without_names_stop_naming_sft_label_names(tmp_path, tiny_assets, processor):
    data = jsonl_dataset(tmp_path / "data", {"train": [0, 1, 1], "validation": [0, 2]})
    cfg = make_cfg(tiny_assets, data, tmp_path, SFT_TARGET_FORMAT="label", SFT_TARGET_KEY="label",
                   SFT_QUERY_TEXT="Sarcastic?")
    with pytest.raises(LabelNamesMissing) as info:
        checked(cfg, processor)
    assert exit_code_for(info.value) == 2 and info.value.values == [0, 1, 2] and info.value.column == "label"
    assert str(info.value) == (
        "SFT_TARGET_KEY='label' holds plain integers (values found: 0, 1, 2) and declares no class names: set "
        "SFT_LABEL_NAMES to the class names in index order, comma separated (index 0 first, e.g. "
        "SFT_LABEL_NAMES=non-sarcastic,sarcastic), or give the column a ClassLabel feature")


def test_plain_integers_with_names_and_a_value_outside_them(tmp_path, tiny_assets, processor):
    """SFT_LABEL_NAMES maps index -> name; a 7 is a bad row like any other (here dropped by SFT_BAD_ROWS=skip)."""
    data = jsonl_dataset(tmp_path / "data", {"train": [0, 1, 1, 7, 0, 1], "validation": [0, 1]})
    cfg = make_cfg(tiny_assets, data, tmp_path, SFT_TARGET_FORMAT="label", SFT_TARGET_KEY="label",
                   SFT_LABEL_NAMES="non-sarcastic,sarcastic", SFT_QUERY_TEXT="Sarcastic?", SFT_BAD_ROWS="skip",
                   SFT_MAX_BAD_FRACTION="0.2")
    result = checked(cfg, processor)
    report = result.report
    assert report["errors"] == [{
        "split": "train", "row_id": "train.jsonl:4", "index": 3, "kind": "label_unknown", "field": "label",
        "message": "is int 7, not one of the 2 class names (0: non-sarcastic, 1: sarcastic)",
        "fix": "give the row one of the class names (or its index), or fix SFT_LABEL_NAMES"}]
    assert report["splits"]["train"]["skipped_row_ids"] == ["train.jsonl:4"]
    assert report["understood"]["target"]["names_from"] == "SFT_LABEL_NAMES"
    assert report["understood"]["label_counts"]["train"] == {"non-sarcastic": 2, "sarcastic": 3}
    assert list(result.train_dataset["label"]) == [NOT, SARCASTIC, SARCASTIC, NOT, SARCASTIC]


def test_strings_are_their_own_names(tmp_path, tiny_assets, processor):
    data = jsonl_dataset(tmp_path / "data", {"train": ["sarcastic", "non-sarcastic", "sarcastic"],
                                             "validation": ["sarcastic", "non-sarcastic"]})
    result = checked(make_cfg(tiny_assets, data, tmp_path, SFT_TARGET_FORMAT="label", SFT_TARGET_KEY="label",
                              SFT_QUERY_TEXT="Sarcastic?"), processor)
    target = result.report["understood"]["target"]
    assert (target["kind"], target["names"], target["names_from"]) == ("string", None, "the values themselves")
    assert result.report["understood"]["label_counts"] == {"train": {"non-sarcastic": 1, "sarcastic": 2},
                                                           "validation": {"non-sarcastic": 1, "sarcastic": 1}}
    assert list(result.train_dataset["label"]) == [SARCASTIC, NOT, SARCASTIC]


def test_names_that_differ_from_the_class_label_are_refused(tmp_path, tiny_assets, processor):
    root = sarcasm_card_dataset(tmp_path / "ds", rows={"train": 2, "validation": 2}, languages=("en",))
    with pytest.raises(LabelNamesConflict) as info:
        checked(make_cfg(tiny_assets, root, tmp_path, **{**PUBLIC, "SFT_LABEL_NAMES": "no,yes"}), processor)
    assert str(info.value) == (
        "SFT_LABEL_NAMES=no,yes differs from the class names the column's ClassLabel feature declares for "
        "'text_label' (non-sarcastic,sarcastic): unset SFT_LABEL_NAMES (the declared names are used) or make it equal "
        "to them")


def test_class_names_from_the_card_when_the_parquet_has_none(tmp_path, tiny_assets, processor):
    """Parquet written without `datasets` (plain int64) beside a card whose dataset_info declares the ClassLabel."""
    root = sarcasm_card_dataset(tmp_path / "ds", rows={"train": 2, "validation": 2}, languages=("en",))
    for split in ("train", "validation"):
        shard = root / "en" / f"{split}-00000-of-00001.parquet"
        table = pq.read_table(shard)
        pq.write_table(table.replace_schema_metadata(None).cast(table.schema.remove_metadata()), shard)
        assert pq.read_schema(shard).metadata is None
    report = checked(make_cfg(tiny_assets, root, tmp_path, **PUBLIC), processor).report
    assert report["ok"], report["errors"]
    assert report["understood"]["target"]["names_from"] == "the dataset card (README.md dataset_info)"
    assert report["understood"]["label_counts"]["train"] == {"non-sarcastic": 1, "sarcastic": 1}


@pytest.mark.parametrize(("values", "held", "names_hint"), [
    ([0, 1, 1], "plain int values (0, 1)", " with SFT_LABEL_NAMES=<the class names in index order>"),
    (["sarcastic", "non-sarcastic", "sarcastic"], "plain str values ('non-sarcastic', 'sarcastic')", ""),
])
def test_json_format_on_a_label_column_hints_label(values, held, names_hint, tmp_path, tiny_assets, processor):
    data = jsonl_dataset(tmp_path / "data", {"train": values, "validation": values[:2]})
    with pytest.raises(DataError) as info:
        checked(make_cfg(tiny_assets, data, tmp_path, SFT_TARGET_KEY="label", SFT_QUERY_TEXT="Sarcastic?"), processor)
    message = str(info.value)
    assert message.startswith("preflight failed: the target column holds class labels, not JSON verdicts: set "
                              "SFT_TARGET_FORMAT=label\n")
    assert f"  - train: column 'label' holds {held} in 3 of 3 rows, not JSON verdicts; fix: set SFT_TARGET_FORMAT=" \
           f'label{names_hint}: each row\'s verdict is then {{"label": <its class name>}}\n' in message


def test_a_class_label_column_read_as_json_hints_label(tmp_path, tiny_assets, processor):
    root = sarcasm_card_dataset(tmp_path / "ds", rows={"train": 2, "validation": 2}, languages=("en",))
    with pytest.raises(DataError, match=r"column 'text_label' holds ClassLabel indices \(names: non-sarcastic, "
                                        r"sarcastic\) in 2 of 2 rows, not JSON verdicts; fix: set SFT_TARGET_FORMAT"
                                        r"=label: each row"):
        checked(make_cfg(tiny_assets, root, tmp_path, **{**PUBLIC, "SFT_TARGET_FORMAT": "json"}), processor)


def test_query_text_beside_a_query_column_is_refused(tmp_path, tiny_assets, processor):
    data = jsonl_dataset(tmp_path / "data", {"train": ["a", "b"], "validation": ["a"]}, query="Sarcastic?")
    with pytest.raises(QueryColumnConflict) as info:
        checked(make_cfg(tiny_assets, data, tmp_path, SFT_TARGET_FORMAT="label", SFT_TARGET_KEY="label",
                         SFT_QUERY_TEXT="Is it?"), processor)
    assert exit_code_for(info.value) == 2 and str(info.value) == (
        "SFT_QUERY_TEXT asks every row the same question, and split 'train' has a query column 'query' "
        "(SFT_QUERY_KEY): unset SFT_QUERY_TEXT to ask each row its own query, or drop the column")


def test_the_cards_configurations_are_named_when_none_or_an_unknown_one_is_set(tmp_path, tiny_assets, processor):
    root = sarcasm_card_dataset(tmp_path / "ds", rows={"train": 2}, languages=("en", "zh"))
    with pytest.raises(UserError) as info:
        localize(make_cfg(tiny_assets, root, tmp_path, **{**PUBLIC, "SFT_DATASET_CONFIG": "eng"}))
    assert str(info.value) == (f"SFT_DATASET_CONFIG='eng': SFT_DATASET_URI={str(root)!r} declares no such "
                               "configuration and has no such folder (it has: en, zh); did you mean 'en'? "
                               "unset it or name one of them")
    unset = {k: v for k, v in PUBLIC.items() if k != "SFT_DATASET_CONFIG"}
    with pytest.raises(DataError, match=f"no 'train' split in {root}: its dataset card declares the configurations "
                                        "en, zh; set SFT_DATASET_CONFIG to one of them"):
        checked(make_cfg(tiny_assets, root, tmp_path, **unset), processor)

