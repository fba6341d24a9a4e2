"""The data and image sections: where the rows come from, how they are read and checked, and the image size range.
How to add a setting: job/config/sections/__init__.py."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import field_validator

from job.cards import ModelSpec
from job.config.sections.base import Section
from job.config.settings import setting
from job.prompts import Queries


def share_or_count(value: int | float) -> int | float:
    """SFT_EVAL_HOLDOUT: a share of the rows (0 < x < 1) or a row count (>= 1)."""
    if (isinstance(value, int) and value >= 1) or (isinstance(value, float) and 0 < value < 1):
        return value
    raise ValueError("must be a share of the rows (0 < x < 1, e.g. 0.1) or a row count (an integer >= 1)")


def label_name_list(value: Any) -> Any:
    """SFT_LABEL_NAMES (comma separated): at least one name, each once (index i of a label column is the i-th)."""
    names = [m.strip() for m in value.split(",")] if isinstance(value, str) else value
    if value is None:
        return value
    if not names or any(not name for name in names):
        raise ValueError("must name every class, comma separated, none empty (e.g. non-sarcastic,sarcastic)")
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise ValueError(f"names {', '.join(repeated)} more than once: each class needs its own name")
    return value


class DataConfig(Section):
    uri: str | None = setting(
        None, env="dataset_uri", examples=["/data/sarcasm", "s3://bucket/sarcasm", "org/sarcasm"],
        doc="Required by `run`, `preflight`, `eval`. Local dataset file or directory (see [Data "
            "format](data.md#data-format)), an `s3://` prefix holding one, or a Hub dataset: `owner/name` (when no "
            "such local path exists) or `hf://datasets/owner/name[/folder]`. `run`, `preflight` and `eval` mirror an "
            "`s3://` prefix into `SFT_CACHE_DIR` first (the same cache; unchanged objects are not downloaded again) "
            "and download a Hub dataset's snapshot (only the folder's files, when one is named) into the Hugging Face "
            "cache (`HF_HOME`), then read it like a local directory. Private and gated Hub datasets need `HF_TOKEN`; "
            "a 401, 403 or 404 is exit 2 naming the repo, a timeout or 5xx exit 3; `HF_HUB_OFFLINE=1` reads the cache "
            "only.")
    revision: str | None = setting(
        None, env="dataset_revision", examples=["main"],
        doc="Unset: the default branch. Hub dataset: the branch, tag or commit to read. It is resolved to a commit "
            "before anything is downloaded; `preflight` and `run` print `dataset: Hub owner/name revision R = commit "
            "SHA`, and the commit is recorded in `training_meta.json` (`dataset.commit_sha`) and in the model card "
            "(`dataset_revision` beside `datasets:`, and each eval result's dataset revision).")
    config: str | None = setting(
        None, env="dataset_config", examples=["default", "en"],
        doc="A named configuration of the dataset, read the same way from a local directory, an `s3://` prefix (its "
            "mirror) and a Hub dataset (its snapshot). One the dataset card declares (`configs:` in `README.md`) is "
            "read from its `data_dir`, or from its `data_files` per split (parquet files, globs such as `en/train-*` "
            "relative to the dataset; linked into `SFT_CACHE_DIR/dataset-configs/`); otherwise from the folder of "
            "that name (`{config}/train-*.parquet`, what `push_to_hub(config_name=...)` writes). A name that is "
            "neither is exit 2 listing the configurations and folders (with a \"did you mean\"); a directory whose "
            "card declares configurations and that has no `train` split of its own names them. A configuration's "
            "`test` split is evaluated with `SFT_EVAL_SPLIT=test`.")
    train_split: str = setting("train", env="train_split", min_length=1, examples=["train"], doc="Training split name.")
    eval_split: str = setting(
        "validation", env="eval_split", min_length=1, examples=["validation"],
        doc="Eval split name; must differ from the training split.")
    train_subset: int | None = setting(
        None, env="train_subset", ge=1, examples=["1000"],
        doc="Unset: whole split. Train on N rows, a random subset fixed by `SFT_SEED`.")
    eval_subset: int | None = setting(
        None, env="eval_subset", ge=1, examples=["200"],
        doc="Unset: whole split. Evaluate on N rows, a random subset fixed by `SFT_SEED`.")
    image_key: str = setting(
        "image", env="image_key", min_length=1, examples=["image"], doc="Column holding the image.")
    query_key: str = setting(
        "query", env="query_key", min_length=1, examples=["query"],
        doc="Column holding the user's question (non-empty string). Data without one: `SFT_QUERY_TEXT`.")
    caption_key: str = setting(
        "caption", env="caption_key", min_length=1, examples=["caption"], doc="Column holding the optional caption.")
    target_key: str = setting(
        "target_json", env="target_key", min_length=1, examples=["target_json", "text_label"],
        doc="Column holding the verdict (JSON string or object), or with `SFT_TARGET_FORMAT=label` the class label.")
    label_field: str = setting(
        "label", env="label_field", min_length=1, examples=["label"],
        doc="Key inside the verdict that accuracy and macro F1 compare.")
    # None (unset) becomes the built-in prompt in _derived below
    system_prompt: str = setting(
        env="system_prompt", examples=["You are a sarcasm detector."],
        doc="Unset: the built-in prompt in `job/prompts.py`. System message for training and eval; an empty value "
            "sends no system message.")
    # preflight: what to do with rows that fail the checks (job/preflight/run.py)
    bad_rows: Literal["fail", "skip"] = setting(
        "fail", env="bad_rows", examples=["fail", "skip"],
        doc="Rows that fail the preflight checks: `fail` stops the job (exit 2); `skip` drops them from training and "
            "eval. A split that cannot be parsed at all always fails.")
    max_bad_fraction: float = setting(
        0.01, env="max_bad_fraction", ge=0, le=1, examples=["0.01"],
        doc="With `SFT_BAD_ROWS=skip`, the job still fails when more than this share of a split (or all of it) is "
            "bad.")
    # a source with one split: the share (0 < x < 1) or number (>= 1) of its rows held out for eval
    eval_holdout: int | float = setting(
        0.1, env="eval_holdout", examples=["0.1", "200"],
        doc="A source with one split (a single file, a `save_to_disk` directory holding one `Dataset`, a directory "
            "with only the training split): the share of its rows (or, as an integer, the number of rows) held out "
            "for eval. Each row's side is fixed by `SFT_SEED` and a hash of its content (image path relative to the "
            "dataset or image bytes, and the other fields), so adding rows later leaves the old ones where they were "
            "and identical rows land on the same side. Both sides' row ids are in `preflight_report.json` "
            "(`holdout`).")
    # eval rows identical to training rows above this share fail preflight (the gate would measure memorisation)
    max_eval_overlap: float = setting(
        0.01, env="max_eval_overlap", ge=0, le=1, examples=["0.01"],
        doc="Eval rows identical to training rows (same image bytes, query, caption and target) above this share of "
            "the eval split fail preflight (exit 2): the eval, and the gate, would measure memorisation. Below it "
            "they are warnings, counted in `preflight_report.json` (`eval_overlap`), `training_meta.json` and the "
            "model card.")
    # preflight warns about a label with fewer training rows than this (0: never), and about a largest/smallest
    # training-label ratio above SFT_MAX_CLASS_RATIO
    min_class_rows: int = setting(
        10, env="min_class_rows", ge=0, examples=["10"],
        doc="Preflight warns (`class_too_small`) about each label with fewer training rows than this; `0` never "
            "warns.")
    max_class_ratio: float = setting(
        20.0, env="max_class_ratio", ge=1, examples=["20"],
        doc="Preflight warns (`class_imbalance`) when the largest training label has more than this many times the "
            "rows of the smallest.")
    # (#35, appended: the JSON form keeps its order) the public datasets' shape, read by job/data/labels.py
    target_format: Literal["json", "label"] = setting(
        "json", env="target_format", examples=["json", "label"],
        doc="`json`: `SFT_TARGET_KEY` holds the verdict. `label`: it holds a class label (a `ClassLabel`, a plain "
            "integer or a string) and each row's verdict is `{SFT_LABEL_FIELD: name}`, exactly the text a "
            "`target_json` of that object trains ([Class labels](data.md#class-labels-and-a-fixed-question)). With "
            "`json`, a column of integers or plain strings fails preflight with the hint to set `label`.")
    label_names: tuple[str, ...] | None = setting(
        None, env="label_names", flat="str", examples=["non-sarcastic,sarcastic"],
        doc="`SFT_TARGET_FORMAT=label` only (with `json` it is exit 2 at config time). The class names of a plain "
            "integer column in index order (`non-sarcastic,sarcastic`: 0 and 1); required for one, whose preflight "
            "otherwise stops with exit 2 naming the values found. With a string column, the names allowed. With a "
            "`ClassLabel`, it must equal the declared names (exit 2 naming both otherwise). A value outside the names "
            "is a bad row (`label_unknown`).")
    query_text: str | None = setting(
        None, env="query_text", min_length=1, examples=["Is this post sarcastic? Answer in JSON."],
        doc="The user question of every row, for data without a query column; exit 2 beside a set `SFT_QUERY_KEY` "
            "(config) or a query column in the data (preflight). The model card's \"How to use\" shows it.")

    _holdout = field_validator("eval_holdout")(share_or_count)
    _names = field_validator("label_names")(label_name_list)

    @field_validator("label_names", mode="before")
    @classmethod
    def _split_names(cls, value: Any) -> Any:
        """SFT_LABEL_NAMES is comma separated; surrounding spaces are dropped (an empty name is an error)."""
        return tuple(name.strip() for name in value.split(",")) if isinstance(value, str) else value

    @classmethod
    def _derived(cls, values: dict[str, Any], s: Any) -> dict[str, Any]:
        # An empty SFT_SYSTEM_PROMPT is a choice (no system turn), so only None falls back to the default prompt.
        prompt = values["system_prompt"]
        return {**values, "system_prompt": prompt if prompt is not None else Queries().SYSTEM_PROMPT}

    @staticmethod
    def rules(s: Any, card: ModelSpec) -> list[str]:
        problems = []
        if s.train_split == s.eval_split:
            problems.append(f"SFT_TRAIN_SPLIT and SFT_EVAL_SPLIT are both {s.train_split!r}: evaluating on the "
                            "training split hides overfitting; use a held-out split (e.g. SFT_EVAL_SPLIT=validation)")
        if s.label_names is not None and s.target_format != "label":
            problems.append("SFT_LABEL_NAMES names the classes of a label column and only applies with "
                            "SFT_TARGET_FORMAT=label: set SFT_TARGET_FORMAT=label, or unset SFT_LABEL_NAMES")
        if s.query_text is not None and not s.query_text.strip():
            problems.append("SFT_QUERY_TEXT is blank: write the question every row is asked, or unset it")
        if s.query_text is not None and "query_key" in s.model_fields_set:
            problems.append(f"SFT_QUERY_TEXT asks every row the same question and SFT_QUERY_KEY={s.query_key!r} "
                            "names a query column: set one of them")
        return problems


class ImageConfig(Section):
    min_pixels: int = setting(
        env="image_min_pixels", card="image_min_pixels", ge=1024, examples=["65536"],
        doc="The card's default is 256x256. Processor `min_pixels`: smaller images are upscaled.")
    max_pixels: int = setting(
        env="image_max_pixels", card="image_max_pixels", ge=1024, le=4096 * 4096, examples=["1048576"],
        doc="The card's default is 1024x1024 = 1024 visual tokens. Processor `max_pixels`: larger images are "
            "downscaled, aspect ratio kept. One visual token covers 32x32 pixels. The cap exists because the model's "
            "own range goes up to 4096x4096 pixels, i.e. up to 16k visual tokens for a single image: one large photo "
            "would blow the sequence length and GPU memory (a 4k image alone would not fit a 24 GB card).")

    @staticmethod
    def rules(s: Any, card: ModelSpec) -> list[str]:
        problems = []
        min_px = s.image_min_pixels or card.image_min_pixels
        max_px = s.image_max_pixels or card.image_max_pixels
        max_length = s.max_length or card.max_length
        if min_px > max_px:
            problems.append(
                f"SFT_IMAGE_MIN_PIXELS={min_px} is larger than SFT_IMAGE_MAX_PIXELS={max_px}: min must be <= max")
        visual_tokens_at_cap = max_px // card.pixels_per_visual_token
        if visual_tokens_at_cap + 32 > max_length:
            problems.append(
                f"SFT_MAX_LENGTH={max_length} cannot hold one image at SFT_IMAGE_MAX_PIXELS={max_px} "
                f"({visual_tokens_at_cap} visual tokens) plus the prompt: raise SFT_MAX_LENGTH or lower the pixel cap")
        return problems
