"""`qwen3-sft preflight`: a corpus of bad inputs (built here with PIL) fails with exit 2 naming the row; valid
variants pass; the skip policy, the summary, the duplicate/label warnings and the token-length estimate are exact.

Most cases call run_preflight in-process with the session's processor; a few run `python -m job preflight` as a
subprocess (in parallel, since each one spends most of its time importing torch and loading the processor).
"""

from __future__ import annotations

import io
import json
import os
from pathlib import Path

import pytest
from helpers import TINY_PIXELS, bomb_png, job_env, noise_image
from PIL import Image

from job.cards import ModelCards
from job.collators.qwen3_collator import IGNORE_INDEX, Qwen3VisionSFTCollator
from job.config.schema import JobConfig, build_cfg
from job.data.checks import RowChecker
from job.errors import DataError
from job.preflight import run as preflight, scan

CARD = ModelCards().qwen3_vl_8b_instruct
REPORT = "preflight_report.json"


# -- corpus builders ---------------------------------------------------------------------------------------------
def save(root: Path, name: str, image: Image.Image | None = None, **kw) -> str:
    path = root / "images" / name
    path.parent.mkdir(parents=True, exist_ok=True)
    (image or noise_image(seed=hash(name) % 1000)).save(path, **kw)
    return f"images/{name}"


def row(root: Path, i: int, label: str = "sarcastic", **fields) -> dict:
    base = {"image": save(root, f"img-{i}.png"), "query": "Is this post sarcastic?", "caption": f"post {i}",
            "target_json": json.dumps({"label": label})}
    return {**base, **fields}


def write_split(root: Path, split: str, rows: list) -> None:
    """rows: dicts (one JSON line each) or raw bytes (written as the line itself)."""
    root.mkdir(parents=True, exist_ok=True)
    lines = [r if isinstance(r, bytes) else json.dumps(r).encode() for r in rows]
    (root / f"{split}.jsonl").write_bytes(b"".join(line + b"\n" for line in lines))


def dataset(root: Path, extra_train: list | None = None, eval_rows: list | None = None) -> Path:
    """3 good train rows (+ extra_train at line 4...) and 2 good eval rows (unless given)."""
    train = [row(root, i, ("sarcastic", "not_sarcastic")[i % 2]) for i in range(3)] + (extra_train or [])
    write_split(root, "train", train)
    write_split(root, "validation", eval_rows if eval_rows is not None else
                [row(root, 100 + i, ("sarcastic", "not_sarcastic")[i % 2]) for i in range(2)])
    return root


def _truncated_jpeg(root):
    buf = io.BytesIO()
    noise_image((160, 120)).save(buf, "JPEG", quality=95)
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "images/trunc.jpg").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    return row(root, 3, image="images/trunc.jpg")


def _file(name: str, data: bytes):
    def make(root):
        (root / "images").mkdir(parents=True, exist_ok=True)
        (root / "images" / name).write_bytes(data)
        return row(root, 3, image=f"images/{name}")
    return make


def _bomb(width: int, height: int):
    def make(root):
        bomb_png(root / "images/bomb.png", width, height)
        return row(root, 3, image="images/bomb.png")
    return make


def _fields(**fields):
    return lambda root: row(root, 3, **fields)


def _without(key: str):
    return lambda root: {k: v for k, v in row(root, 3).items() if k != key}


# name -> (bad train row at train.jsonl:4, error kind, field)
ROW_CASES = {
    "truncated_jpeg": (_truncated_jpeg, "image_unreadable", "image"),
    "zero_byte_file": (_file("empty.jpg", b""), "image_unreadable", "image"),
    "text_named_jpg": (_file("notes.jpg", b"just some text, not a JPEG\n" * 20), "image_unreadable", "image"),
    "missing_image_file": (_fields(image="images/nope.png"), "image_missing_file", "image"),
    "missing_image_field": (_without("image"), "missing_field", "image"),
    "bomb_20000x20000": (_bomb(20000, 20000), "image_too_large", "image"),  # PIL itself refuses this one
    "bomb_10000x10000": (_bomb(10000, 10000), "image_too_large", "image"),  # PIL only warns; our limit refuses
    "aspect_ratio_400": (
        lambda root: row(root, 3, image=save(root, "thin.png", Image.new("RGB", (2000, 5)))),
        "image_aspect_ratio",
        "image",
    ),
    "missing_target": (_without("target_json"), "missing_field", "target_json"),
    "target_not_json": (_fields(target_json="{label: sarcastic"), "target_not_json", "target_json"),
    "target_not_object": (_fields(target_json='["sarcastic"]'), "target_not_object", "target_json"),
    "target_without_label": (_fields(target_json='{"verdict": "sarcastic"}'), "target_missing_label", "target_json"),
    "empty_query": (_fields(query="   "), "empty_query", "query"),
    "missing_query": (_without("query"), "missing_field", "query"),
    "control_token_in_caption": (_fields(caption="hi <|im_start|>assistant"), "special_token_in_text", "caption"),
    "control_token_in_target": (
        _fields(target_json='{"label": "a<|im_end|>"}'),
        "special_token_in_text",
        "target_json",
    ),
    "too_long": (_fields(caption="word " * 600), "too_long", "row"),
}


def make_cfg(tiny_assets, data: Path, out: Path, **env) -> JobConfig:
    base = {"SFT_MODEL_ID": str(tiny_assets[0]), "SFT_DATASET_URI": str(data), "SFT_OUTPUT_DIR": str(out),
            "SFT_MAX_LENGTH": "512", **TINY_PIXELS}
    return build_cfg(CARD, {**base, **env})


def failing_report(cfg, processor) -> tuple[str, dict]:
    with pytest.raises(DataError) as info:
        preflight.run_preflight(cfg, cfg.data.uri, processor)
    out = Path(cfg.train.output_dir)
    assert sorted(p.name for p in out.iterdir()) == [REPORT], "preflight must write nothing but its report"
    return str(info.value), json.loads((out / REPORT).read_text())


# -- bad rows ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("case", sorted(ROW_CASES))
def test_bad_row_fails_naming_row_field_and_fix(case, tmp_path, tiny_assets, processor):
    make_row, kind, field = ROW_CASES[case]
    data = dataset(tmp_path / "data", [make_row(tmp_path / "data")])
    message, report = failing_report(make_cfg(tiny_assets, data, tmp_path / "out"), processor)
    where = "row" if field == "row" else f"field '{field}'"
    assert f"train: train.jsonl:4: {where}" in message and "fix: " in message, message
    errors = report["errors"]
    assert [(e["split"], e["row_id"], e["kind"], e["field"]) for e in errors] == [
        ("train", "train.jsonl:4", kind, field)
    ]
    assert (
        report["ok"] is False and report["splits"]["train"]["rows_bad"] == 1 and report["errors_by_kind"] == {kind: 1}
    )


def test_bad_eval_row_is_named_with_its_split(tmp_path, tiny_assets, processor):
    root = tmp_path / "data"
    data = dataset(root, eval_rows=[row(root, 100), row(root, 101, image="images/gone.png")])
    message, report = failing_report(make_cfg(tiny_assets, data, tmp_path / "out"), processor)
    assert "validation: validation.jsonl:2: field 'image' file" in message
    assert report["splits"]["eval"]["errors_by_kind"] == {"image_missing_file": 1}


def test_error_list_is_capped_in_the_message_but_complete_in_the_report(tmp_path, tiny_assets, processor):
    root = tmp_path / "data"
    data = dataset(root, [row(root, 3, query="") for _ in range(preflight.MAX_LISTED_ERRORS + 5)])
    message, report = failing_report(make_cfg(tiny_assets, data, tmp_path / "out"), processor)
    assert message.count("\n  - ") == preflight.MAX_LISTED_ERRORS and "... and 5 more" in message
    assert len(report["errors"]) == preflight.MAX_LISTED_ERRORS + 5


# Problems the loader raises while parsing the file: the split cannot be loaded at all.
LOAD_CASES = {
    "not_json_line": (lambda root: b'{"query": "oops"', "train.jsonl:4", "not valid JSON"),
    "non_utf8_line": (lambda root: b'{"query": "caf\xe9"}', "train.jsonl:4", "not valid UTF-8"),
    "path_escapes_dataset_dir": (lambda root: row(root, 3, image="../outside.png"), "train.jsonl:4",
                                 "escapes the dataset directory"),
    # One number in a column of strings: Arrow cannot store the file, so the loader names the odd row.
    "numeric_query": (lambda root: row(root, 3, query=42), "train.jsonl:4",
                      "field 'query' is number 42 where other rows have str"),
    "numeric_caption": (lambda root: row(root, 3, caption=7.5), "train.jsonl:4", "field 'caption' is number 7.5"),
}


@pytest.mark.parametrize(("fields", "kind", "field"), [
    ({"query": 42}, "bad_type", "query"), ({"query": None}, "missing_field", "query"),
    ({"caption": 7}, "bad_type", "caption"), ({"target_json": 1}, "target_not_object", "target_json"),
    ({"target_json": '{"label": ""}'}, "target_missing_label", "target_json"),
    ({"image": 3}, "bad_type", "image"),
])
def test_row_checker_types(fields, kind, field, tmp_path, processor):
    """Columns that are uniformly of the wrong type (e.g. from parquet) reach the row checks: every row is named."""
    checker = RowChecker(Qwen3VisionSFTCollator(processor, max_length=512), "label")
    good = row(tmp_path, 0, image=str(tmp_path / save(tmp_path, "a.png")))
    result = checker.check({**good, **fields, "row_id": "train[0]"}, 0)
    assert [(e.kind, e.field) for e in result.errors] == [(kind, field)]


@pytest.mark.parametrize("case", sorted(LOAD_CASES))
def test_unparseable_split_fails_naming_the_line(case, tmp_path, tiny_assets, processor):
    make_line, row_id, text = LOAD_CASES[case]
    save(tmp_path, "../outside.png")  # exists, so only the escape itself is wrong
    data = dataset(tmp_path / "data", [make_line(tmp_path / "data")])
    message, report = failing_report(make_cfg(tiny_assets, data, tmp_path / "out"), processor)
    assert f"train: {row_id}: " in message and text in message, message
    assert [(e["row_id"], e["kind"]) for e in report["errors"]] == [(row_id, "split_unreadable")]


def test_empty_split_fails(tmp_path, tiny_assets, processor):
    data = dataset(tmp_path / "data", eval_rows=[])
    message, report = failing_report(make_cfg(tiny_assets, data, tmp_path / "out"), processor)
    assert "split 'validation'" in message and "is empty" in message
    assert report["errors"][0]["split"] == "validation"


def test_image_feature_dataset_is_checked_from_its_bytes(tmp_path, tiny_assets, processor):
    """A save_to_disk split with a datasets.Image column: images are checked undecoded, the result still decodes."""
    import datasets

    def png(seed: int, cut: int | None = None) -> dict:
        buf = io.BytesIO()
        noise_image(seed=seed).save(buf, "PNG")
        return {"bytes": buf.getvalue()[:cut], "path": None}

    features = datasets.Features({"image": datasets.Image(), "query": datasets.Value("string"),
                                  "caption": datasets.Value("string"), "target_json": datasets.Value("string")})

    def split(seeds, cut_at=None):
        n = len(seeds)
        return datasets.Dataset.from_dict({
            "image": [png(s, 300 if i == cut_at else None) for i, s in enumerate(seeds)], "query": ["Sarcastic?"] * n,
            "caption": [f"c{s}" for s in seeds], "target_json": ['{"label": "sarcastic"}'] * n}, features=features)
    splits = datasets.DatasetDict({"train": split(range(4), cut_at=2), "validation": split(range(10, 12))})
    splits.save_to_disk(tmp_path / "data")
    cfg = make_cfg(tiny_assets, tmp_path / "data", tmp_path / "out", SFT_BAD_ROWS="skip", SFT_MAX_BAD_FRACTION="0.5")
    result = preflight.run_preflight(cfg, cfg.data.uri, processor)
    assert [(e["row_id"], e["kind"]) for e in result.report["errors"]] == [("train[2]", "image_unreadable")]
    assert result.report["splits"]["train"]["skipped_row_ids"] == ["train[2]"]
    assert list(result.train_dataset["row_id"]) == ["train[0]", "train[1]", "train[3]"]
    assert isinstance(result.train_dataset[0]["image"], Image.Image)  # the returned split is the original, decoding


# -- valid variants ----------------------------------------------------------------------------------------------
def _exif_rotated_jpeg(root: Path) -> str:
    image = noise_image((120, 40))
    exif = image.getexif()
    exif[0x0112] = 6  # "rotate 90 CW to display": the model sees a 40x120 image
    return save(root, "rotated.jpg", image, exif=exif.tobytes())


def valid_variant_rows(root: Path) -> list[dict]:
    palette = noise_image((50, 70), "L", seed=3).convert("P")
    transparent = Image.new("P", (64, 64))
    transparent.info["transparency"] = 0
    return [
        row(root, 10, image=save(root, "gray.png", noise_image((80, 60), "L", seed=1))),
        row(root, 11, image=save(root, "rgba.png", noise_image((64, 90), "RGBA", seed=2))),
        row(root, 12, image=save(root, "palette.png", palette)),
        row(root, 13, image=save(root, "palette_alpha.png", transparent, transparency=0)),
        row(root, 14, image=save(root, "sixteen.png", Image.new("I;16", (72, 48), 40000))),
        row(root, 15, image=_exif_rotated_jpeg(root)),
        row(root, 16, caption=None),
        row(root, 17, source="reddit", meta={"score": 3}, tags=["a", "b"]),
        row(root, 18, target_json={"label": "not_sarcastic", "rationale": "sincere"}),
    ]


def test_valid_variants_pass(tmp_path, tiny_assets, processor, capsys):
    root = tmp_path / "data"
    data = dataset(root, valid_variant_rows(root))
    cfg = make_cfg(tiny_assets, data, tmp_path / "out", SFT_MIN_CLASS_ROWS="0")
    result = preflight.run_preflight(cfg, str(data), processor)
    report = result.report
    assert report["ok"] and report["errors"] == [] and report["warnings"] == [], report["errors"]
    assert report == json.loads((tmp_path / "out" / REPORT).read_text())
    assert len(result.train_dataset) == 12 and len(result.eval_dataset) == 2
    assert report["splits"]["train"]["labels"] == {"not_sarcastic": 2, "sarcastic": 10}
    stdout = capsys.readouterr().out
    assert "labels train: not_sarcastic=2, sarcastic=10" in stdout and "tokens p50/p95/max" in stdout


# -- skip policy -------------------------------------------------------------------------------------------------
def skip_dataset(root: Path) -> Path:
    """10 train rows (2 bad: lines 4 and 7) and 4 eval rows (1 bad: line 2)."""
    train = [row(root, i, ("sarcastic", "not_sarcastic")[i % 2]) for i in range(10)]
    train[3]["query"], train[6]["target_json"] = "", "nope"
    evals = [row(root, 100 + i) for i in range(4)]
    evals[1]["image"] = "images/missing.png"
    write_split(root, "train", train)
    write_split(root, "validation", evals)
    return root


def test_skip_drops_bad_rows_and_records_them(tmp_path, tiny_assets, processor):
    cfg = make_cfg(tiny_assets, skip_dataset(tmp_path / "data"), tmp_path / "out",
                   SFT_BAD_ROWS="skip", SFT_MAX_BAD_FRACTION="0.25")
    result = preflight.run_preflight(cfg, cfg.data.uri, processor)
    train, evals = result.report["splits"]["train"], result.report["splits"]["eval"]
    assert (train["rows"], train["rows_bad"], train["rows_skipped"]) == (10, 2, 2)
    assert train["skipped_row_ids"] == ["train.jsonl:4", "train.jsonl:7"] and train["bad_fraction"] == 0.2
    assert evals["skipped_row_ids"] == ["validation.jsonl:2"]
    assert result.report["ok"] and len(result.report["errors"]) == 3  # still listed, with their fixes
    assert len(result.train_dataset) == 8 and "train.jsonl:4" not in result.train_dataset["row_id"]
    assert list(result.eval_dataset["row_id"]) == ["validation.jsonl:1", "validation.jsonl:3", "validation.jsonl:4"]


def test_skip_fails_above_the_bad_fraction(tmp_path, tiny_assets, processor):
    cfg = make_cfg(tiny_assets, skip_dataset(tmp_path / "data"), tmp_path / "out",
                   SFT_BAD_ROWS="skip", SFT_MAX_BAD_FRACTION="0.1")
    message, report = failing_report(cfg, processor)
    assert "train: 2 of 10 rows are bad (20.0%), above SFT_MAX_BAD_FRACTION=0.1" in message
    assert "validation: 1 of 4 rows are bad (25.0%)" in message
    assert report["splits"]["train"]["rows_skipped"] == 0 and not report["ok"]


def test_default_policy_fails_on_one_bad_row_of_many(tmp_path, tiny_assets, processor):
    cfg = make_cfg(tiny_assets, skip_dataset(tmp_path / "data"), tmp_path / "out")
    message, _ = failing_report(cfg, processor)
    assert "3 bad row(s) (train: 2, validation: 1); SFT_BAD_ROWS=fail" in message


# -- summary and warnings ----------------------------------------------------------------------------------------
def test_labels_duplicates_and_eval_labels_missing_from_train(tmp_path, tiny_assets, processor, capsys):
    root = tmp_path / "data"
    train = [row(root, i, ("a", "b", "a")[i]) for i in range(3)]
    train.append(dict(train[0]))  # the same image, query, caption and target again
    copy = root / "images/copy.png"
    copy.write_bytes((root / train[1]["image"]).read_bytes())
    train.append({**train[1], "image": "images/copy.png"})  # the same bytes under another name is still a duplicate
    evals = [row(root, 100, "c"), row(root, 101, "c"), row(root, 102, "a"), dict(train[2])]
    write_split(root, "train", train)
    write_split(root, "validation", evals)
    # 1 of 4 eval rows is a training row: allowed here, so that its warning is reported (the limit: test_loaders.py)
    # SFT_MIN_CLASS_ROWS=0: the class-size warnings of so few rows are test_class_balance_warnings' subject
    cfg = make_cfg(tiny_assets, root, tmp_path / "out", SFT_MAX_EVAL_OVERLAP="0.25", SFT_MIN_CLASS_ROWS="0")
    report = preflight.run_preflight(cfg, cfg.data.uri, processor).report
    assert report["splits"]["train"]["labels"] == {"a": 3, "b": 2}
    assert report["splits"]["eval"]["labels"] == {"a": 2, "c": 2}
    warnings = {(w["kind"], w["row_id"]) for w in report["warnings"]}
    assert ("duplicate_row", "train.jsonl:4") in warnings and ("eval_row_in_train", "validation.jsonl:4") in warnings
    assert ("eval_label_not_in_train", "validation.jsonl:1") in warnings
    assert ("duplicate_row", "train.jsonl:5") in warnings
    assert report["warnings_by_kind"] == {"duplicate_row": 2, "eval_row_in_train": 1, "eval_label_not_in_train": 1}
    out = capsys.readouterr().out
    assert (
        "labels validation: a=2, c=2" in out and "warnings by kind: duplicate_row=2, eval_label_not_in_train=1" in out
    )


def test_class_balance_warnings(tmp_path, tiny_assets, processor, capsys, caplog):
    """The issue's imbalanced set, scaled down: a label under SFT_MIN_CLASS_ROWS and a largest/smallest ratio above
    SFT_MAX_CLASS_RATIO are warnings (the run goes on), listed with their fix and counted in the summary."""
    root = tmp_path / "data"
    counts = {"red": 22, "blue": 6, "purple": 1}
    train = [row(root, i, label) for i, label in enumerate(label for label, n in counts.items() for _ in range(n))]
    write_split(root, "train", train)
    write_split(root, "validation", [row(root, 100, "red"), row(root, 101, "blue")])
    cfg = make_cfg(tiny_assets, root, tmp_path / "out", SFT_MIN_CLASS_ROWS="6", SFT_MAX_CLASS_RATIO="20")
    report = preflight.run_preflight(cfg, cfg.data.uri, processor).report
    assert report["ok"] and report["splits"]["train"]["labels"] == {"blue": 6, "purple": 1, "red": 22}
    small = [w for w in report["warnings"] if w["kind"] == "class_too_small"]
    assert [(w["row_id"], w["message"]) for w in small] == [
        ("train.jsonl:29", "label 'purple' has 1 training row(s), fewer than SFT_MIN_CLASS_ROWS=6")]
    (ratio,) = [w for w in report["warnings"] if w["kind"] == "class_imbalance"]
    assert "'red' has 22.0x the rows of the smallest 'purple' (22 vs 1), above SFT_MAX_CLASS_RATIO=20" in (
        ratio["message"])
    assert "warnings by kind: class_imbalance=1, class_too_small=1" in capsys.readouterr().out
    logged = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]  # each warning with its fix
    assert any(m.startswith("train: train.jsonl:29: ") and "SFT_MIN_CLASS_ROWS=0 silences this" in m for m in logged)
    assert any(m.startswith("train: the largest label 'red'") for m in logged)
    # Within both limits: no warning.
    cfg = make_cfg(tiny_assets, root, tmp_path / "out2", SFT_MIN_CLASS_ROWS="1", SFT_MAX_CLASS_RATIO="22")
    assert not preflight.run_preflight(cfg, cfg.data.uri, processor).report["warnings"]


# -- token lengths -----------------------------------------------------------------------------------------------
def test_token_estimate_equals_collator_length(tmp_path, processor):
    root = tmp_path / "data"
    sizes = [(64, 48), (33, 17), (1024, 768), (300, 900), (2000, 20), (128, 128)]
    rows = [{**row(root, i, image=str(root / save(root, f"s{i}.png", noise_image(size, seed=i))), caption="x " * i * 9),
             "row_id": f"r{i}"} for i, size in enumerate(sizes)]
    rows.append({**row(root, 9, image=str(root / _exif_rotated_jpeg(root))), "row_id": "rotated"})
    for training in (True, False):
        collator = Qwen3VisionSFTCollator(processor, training=training, max_length=4096)
        checker = RowChecker(collator, "label")
        for r in rows:
            result, batch = checker.check(r, 0), collator([r])
            assert result.errors == [] and result.tokens == int(batch["attention_mask"].sum()), (training, r["row_id"])
            grid = batch["image_grid_thw"][0]
            assert result.visual_tokens == int(grid.prod()) // processor.image_processor.merge_size**2
            if training:
                assert result.supervised_tokens == int((batch["labels"] != IGNORE_INDEX).sum()), r["row_id"]


@pytest.mark.slow  # starts the forkserver worker pool: 20-40 s of process start-up on 2 cores
def test_pool_and_in_process_scans_agree(tmp_path, tiny_assets, processor, monkeypatch):
    root = tmp_path / "data"
    bad = [row(root, 50, query=""), row(root, 51, image="images/none.png"), dict(row(root, 0))]
    cfg = make_cfg(tiny_assets, dataset(root, [row(root, 10 + i) for i in range(20)] + bad), tmp_path / "out")
    reports = []
    for pool_min_rows, workers in ((10**9, 1), (0, 2)):
        monkeypatch.setattr(scan, "POOL_MIN_ROWS", pool_min_rows)
        monkeypatch.setattr(preflight, "worker_count", lambda workers=workers: workers)
        _, report = failing_report(cfg, processor)
        assert report["workers"] == workers
        reports.append({k: v for k, v in report.items() if k not in ("seconds", "rows_per_s", "workers", "failure")})
    assert reports[0] == reports[1]


@pytest.mark.parametrize(("files", "limit"), [
    ({"cpu.max": "250000 100000\n"}, 2), ({"cpu.max": "max 100000\n"}, None), ({"cpu.max": "50000 100000\n"}, 1),
    ({"cpu/cpu.cfs_quota_us": "400000\n", "cpu/cpu.cfs_period_us": "100000\n"}, 4), ({}, None),
])
def test_worker_count_respects_the_container_cpu_quota(files, limit, tmp_path):
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    assert scan.cgroup_cpu_limit(tmp_path) == limit


class DyingView:
    """A split whose row `fatal` kills the worker process reading it, as the OOM killer would. Module-level, so it
    reaches the pool's workers pickled (they start from a clean process, not by fork) and dies there."""

    def __init__(self, view, fatal: int):
        self.view, self.fatal = view, fatal

    def __len__(self) -> int:
        return len(self.view)

    def __getitem__(self, index: int):
        if index == self.fatal:
            os._exit(9)
        return self.view[index]


@pytest.mark.slow  # starts the forkserver worker pool
def test_a_dead_worker_fails_instead_of_hanging(tmp_path, tiny_assets, processor, monkeypatch):
    view = preflight._check_view
    monkeypatch.setattr(preflight, "_check_view", lambda ds, key: DyingView(view(ds, key), fatal=5))
    monkeypatch.setattr(scan, "POOL_MIN_ROWS", 0)
    monkeypatch.setattr(preflight, "worker_count", lambda: 2)
    root = tmp_path / "data"
    cfg = make_cfg(tiny_assets, dataset(root, [row(root, 10 + i) for i in range(8)]), tmp_path / "out")
    with pytest.raises(RuntimeError, match="worker process died"):
        preflight.run_preflight(cfg, cfg.data.uri, processor)


# -- the CLI, as a subprocess ------------------------------------------------------------------------------------
CLI_CASES = ["truncated_jpeg", "non_utf8_line", "valid"]


@pytest.fixture(scope="session", autouse=True)
def cli_launch(request, tiny_assets, tmp_path_factory) -> dict:
    """Start the CLI runs (`python -m job preflight`, forked by the zygote of tests/runs.py) when the module starts,
    so their processor loads and checks overlap the in-process tests; output goes to files, so a full pipe can
    never block them. Session scope: the CLI tests are
    `slow` and run at the end of the session (runs.py), after the module's in-process tests."""
    procs = {}
    wanted = any("cli_runs" in item.fixturenames for item in request.session.items)
    for case in CLI_CASES if wanted else []:
        tmp = tmp_path_factory.mktemp(case)
        root = tmp / "data"
        if case == "valid":
            dataset(root, valid_variant_rows(root))
        elif case in ROW_CASES:
            dataset(root, [ROW_CASES[case][0](root)])
        else:
            dataset(root, [LOAD_CASES[case][0](root)])
        env = job_env(tmp, tiny_assets, SFT_DATASET_URI=str(root))
        forks = request.getfixturevalue("zygote")
        procs[case] = (tmp, forks.fork(["-m", "job", "preflight"], env, tmp / "stdout", tmp / "stderr"))
    yield procs
    for _, proc in procs.values():
        if proc.poll() is None:
            proc.kill()


@pytest.fixture(scope="session")
def cli_runs(cli_launch) -> dict:
    results = {}
    for case, (tmp, proc) in cli_launch.items():
        returncode = proc.wait(timeout=300)
        results[case] = (tmp, returncode, (tmp / "stdout").read_text(), (tmp / "stderr").read_text())
    return results


@pytest.mark.slow
@pytest.mark.parametrize("case", [c for c in CLI_CASES if c != "valid"])
def test_cli_bad_data_exits_2_without_traceback(case, cli_runs):
    tmp, returncode, stdout, stderr = cli_runs[case]
    assert returncode == 2, stderr[-2000:]
    assert "Traceback" not in stderr and "qwen3-sft: error: preflight failed" in stderr
    assert "train: train.jsonl:4: " in stderr
    assert sorted(p.name for p in (tmp / "out").iterdir()) == [REPORT]  # no checkpoints, no adapter
    assert not json.loads((tmp / "out" / REPORT).read_text())["ok"]
    assert "report: " in stdout


@pytest.mark.slow
def test_cli_valid_data_exits_0(cli_runs):
    tmp, returncode, stdout, stderr = cli_runs["valid"]
    assert returncode == 0, stderr[-2000:]
    assert "labels train: not_sarcastic=2, sarcastic=10" in stdout and "errors by kind:   none" in stdout
    assert json.loads((tmp / "out" / REPORT).read_text())["ok"]


# -- errors carry their data -------------------------------------------------------------------------------------
def test_data_errors_carry_row_field_and_fix(tmp_path):
    """Preflight reads row, field and fix from the error, not from its message; a worker's error pickles whole."""
    import pickle

    from job.data.loaders import load_local_split
    from job.data.rows import parse_target

    with pytest.raises(DataError) as caught:
        parse_target("{not json", "train.jsonl:4", "target_json")
    assert (caught.value.row, caught.value.field) == ("train.jsonl:4", "target_json")
    assert str(caught.value).startswith("train.jsonl:4: field 'target_json' is not valid JSON")
    (tmp_path / "train.jsonl").write_bytes(b'{"query": "q"}\n\xff\n')
    with pytest.raises(DataError) as caught:
        load_local_split(str(tmp_path), "train")
    err = caught.value
    assert (err.row, err.field, err.fix) == ("train.jsonl:2", "line", "re-encode the file as UTF-8")
    assert str(err).endswith("; re-encode the file as UTF-8")
    again = pickle.loads(pickle.dumps(err))
    assert (str(again), again.row, again.field, again.fix) == (str(err), err.row, err.field, err.fix)
    (tmp_path / "train.jsonl").write_text('{"query": "q"}\n{"query": 3}\n{"query": "r"}\n')
    with pytest.raises(DataError) as caught:
        load_local_split(str(tmp_path), "train")
    assert (caught.value.row, caught.value.field) == ("train.jsonl:2", "query")
