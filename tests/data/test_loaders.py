"""Where the rows come from (issue 18): the hold-out of a source with one split, the eval/train overlap limit, image
paths relative to the dataset, the dataset layouts. In-process preflight calls with the session's processor."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
from helpers import TINY_PIXELS, noise_image

from job.cards import ModelCards
from job.config.schema import build_cfg
from job.data.holdout import holdout_sides
from job.data.loaders import _rows_to_dataset, holds_out, load_local_split
from job.errors import DataError, exit_code_for
from job.eval import command as eval_command
from job.inputs import preflight_command
from job.outputs import lineage, training_meta
from job.preflight import run as preflight
from job.storage import s3 as s3io
from job.storage.hub import _eval_data_lines, build_model_card
from job.storage.sources import HubDataset, Sources, hub_dataset, localize
from job.train.prepare import _resolve_run_id
from job.train.resume import derived_run_id


def _rows(root: Path, n: int, start: int = 0) -> list[dict]:
    return [row(root, i, ("sarcastic", "not_sarcastic")[i % 2]) for i in range(start, start + n)]


def _write_all(root: Path, rows: list[dict], name: str = "all.jsonl") -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / name).write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root / name


REPORT = "preflight_report.json"
CARD = ModelCards().qwen3_vl_8b_instruct


def row(root: Path, i: int, label: str = "sarcastic", **fields) -> dict:
    """A good row whose image (images/img-{i}.png, 96x64 noise) is written under root."""
    (root / "images").mkdir(parents=True, exist_ok=True)
    noise_image(seed=i).save(root / "images" / f"img-{i}.png")
    base = {"image": f"images/img-{i}.png", "query": "Is this post sarcastic?", "caption": f"post {i}",
            "target_json": json.dumps({"label": label})}
    return {**base, **fields}


def write_split(root: Path, split: str, rows: list[dict]) -> None:
    root.mkdir(parents=True, exist_ok=True)
    (root / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def make_cfg(tiny_assets, data: Path, out: Path, **env: str):
    base = {"SFT_MODEL_ID": str(tiny_assets[0]), "SFT_DATASET_URI": str(data), "SFT_OUTPUT_DIR": str(out),
            "SFT_MAX_LENGTH": "512", **TINY_PIXELS}
    return build_cfg(CARD, {**base, **env})


# -- hold-out ----------------------------------------------------------------------------------------------------
def test_a_single_file_is_split_into_disjoint_train_and_eval_rows(tmp_path, tiny_assets, processor, capsys):
    """The issue's first bullet: all.jsonl no longer trains and evaluates on the same rows."""
    source = _write_all(tmp_path / "data", _rows(tmp_path / "data", 24))
    cfg = make_cfg(tiny_assets, source, tmp_path / "out", SFT_EVAL_HOLDOUT="0.25")
    assert holds_out(cfg.data, cfg.data.uri)
    result = preflight.run_preflight(cfg, cfg.data.uri, processor)
    report = json.loads((tmp_path / "out" / REPORT).read_text())
    train, held = report["holdout"]["train_row_ids"], report["holdout"]["eval_row_ids"]
    assert held and train and not set(train) & set(held) and len(train) + len(held) == 24
    assert list(result.eval_dataset["row_id"]) == held and all(r.startswith("all.jsonl:") for r in held)
    assert report["ok"] and report["eval_overlap"]["rows"] == 0
    assert "eval_row_in_train" not in report["warnings_by_kind"]
    assert (report["holdout"]["seed"], report["holdout"]["eval_holdout"]) == (42, 0.25)
    counted = preflight.run_preflight(cfg.replace(data={"eval_holdout": 5}), cfg.data.uri, processor).report[
        "holdout"]
    assert len(counted["eval_row_ids"]) == 5 and len(counted["train_row_ids"]) == 19


def test_the_holdout_depends_on_the_seed_and_each_row_not_on_the_others(tmp_path):
    root = tmp_path / "data"
    rows = [{"image": f"{root}/images/{i}.png", "query": f"q{i}", "target_json": "{}"} for i in range(400)]
    uri = str(_write_all(root, rows))

    def held(rows: list[dict], seed: int = 42, holdout: int | float = 0.1, where: str = uri) -> set[str]:
        ds = _rows_to_dataset([{**r, "row_id": r["query"]} for r in rows])
        return {ds[i]["row_id"] for i in holdout_sides(ds, seed, holdout, "image", where)["eval"]}

    first = held(rows)
    assert 20 < len(first) < 60
    more = rows + [{"image": f"{root}/images/n{i}.png", "query": f"new{i}", "target_json": "{}"} for i in range(100)]
    assert {q for q in held(more) if not q.startswith("new")} == first  # old rows stay where they were
    assert held(list(reversed(rows))) == first  # order does not matter
    assert held(rows, seed=7) != first
    moved = [{**r, "image": r["image"].replace(str(root), str(tmp_path / "moved"))} for r in rows]
    assert held(moved, where=str(_write_all(tmp_path / "moved", moved))) == first  # an s3:// mirror elsewhere: same
    assert len(held(rows, holdout=7)) == 7
    with pytest.raises(DataError, match="SFT_EVAL_HOLDOUT=399 leaves no train rows"):
        held(rows[:3], holdout=399)


def test_a_directory_with_only_the_training_split_is_held_out_but_another_split_name_is_an_error(
        tmp_path, tiny_assets, processor):
    root = tmp_path / "data"
    write_split(root, "train", _rows(root, 12))
    cfg = make_cfg(tiny_assets, root, tmp_path / "out", SFT_EVAL_HOLDOUT="3")
    assert holds_out(cfg.data, cfg.data.uri)
    assert len(preflight.run_preflight(cfg, cfg.data.uri, processor).eval_dataset) == 3
    write_split(root, "val", _rows(root, 2, 50))  # the eval split under a name SFT_EVAL_SPLIT does not give
    assert not holds_out(cfg.data, cfg.data.uri)
    with pytest.raises(DataError, match="no 'validation' split"):
        preflight.run_preflight(cfg, cfg.data.uri, processor)


# -- overlap -----------------------------------------------------------------------------------------------------
def _overlapping(root: Path) -> Path:
    train = _rows(root, 6)
    write_split(root, "train", train)
    write_split(root, "validation", [*_rows(root, 3, 100), dict(train[2])])
    return root


def test_eval_rows_identical_to_training_rows_above_the_limit_fail_preflight(tmp_path, tiny_assets, processor):
    cfg = make_cfg(tiny_assets, _overlapping(tmp_path / "data"), tmp_path / "out")
    with pytest.raises(DataError) as info:
        preflight.run_preflight(cfg, cfg.data.uri, processor)
    assert info.value.exit_code == 2
    message = str(info.value)
    assert "1 of 4 eval rows (25.0%) are identical to training rows (validation.jsonl:4)" in message
    assert "SFT_MAX_EVAL_OVERLAP=0.01" in message and "memorisation" in message
    assert not json.loads((tmp_path / "out" / REPORT).read_text())["ok"]


def test_overlap_below_the_limit_is_a_warning_and_goes_into_the_card(tmp_path, tiny_assets, processor):
    cfg = make_cfg(tiny_assets, _overlapping(tmp_path / "data"), tmp_path / "out", SFT_MAX_EVAL_OVERLAP="0.3")
    report = preflight.run_preflight(cfg, cfg.data.uri, processor).report
    assert report["ok"] and report["warnings_by_kind"]["eval_row_in_train"] == 1
    overlap = report["eval_overlap"]
    assert (overlap["rows"], overlap["of"], overlap["limit"], overlap["row_ids"]) == (1, 4, 0.3, ["validation.jsonl:4"])
    card = _eval_data_lines({"eval_overlap": overlap, "eval_holdout": None})
    assert "eval rows identical to training rows: 1 of 4 (SFT_MAX_EVAL_OVERLAP=0.3)" in card
    assert "held out" in _eval_data_lines({"eval_overlap": None, "eval_holdout": 0.1})


# -- image paths -------------------------------------------------------------------------------------------------
def _parquet_dataset(root: Path, rows: list[dict], name: str = "train.parquet") -> None:
    import datasets

    datasets.Dataset.from_list(rows).to_parquet(str(root / name))


def test_parquet_and_saved_paths_resolve_against_the_dataset_from_any_working_directory(
        tmp_path, tiny_assets, processor, monkeypatch):
    import datasets

    root = tmp_path / "data"
    root.mkdir()
    _parquet_dataset(root, _rows(root, 4))
    _parquet_dataset(root, _rows(root, 2, 100), "validation.parquet")
    saved = tmp_path / "saved"
    shutil.copytree(root / "images", saved / "images")
    datasets.DatasetDict({split: datasets.Dataset.from_parquet(str(root / f"{split}.parquet"))
                          for split in ("train", "validation")}).save_to_disk(str(saved))
    featured = tmp_path / "featured"  # datasets.Image values holding a relative path and no bytes
    shutil.copytree(root / "images", featured / "images")
    monkeypatch.chdir(featured)  # datasets measures the files while saving, from the working directory
    datasets.load_from_disk(str(saved)).cast_column("image", datasets.Image()).save_to_disk(str(featured))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # the paths are relative to the dataset, not to where the job runs
    for uri in (root, saved, featured):
        cfg = make_cfg(tiny_assets, uri, tmp_path / "out" / uri.name)
        result = preflight.run_preflight(cfg, str(uri), processor)
        assert result.report["ok"], result.report["errors"]
        image = result.train_dataset[0]["image"]
        if uri is featured:  # read through the resolved path, decoded by datasets
            assert image.size == (96, 64)
        else:
            assert image == str(uri.resolve() / "images/img-0.png")


def test_a_symlinked_images_folder_works_and_crafted_paths_do_not(tmp_path, tiny_assets, processor):
    """The issue's `images/` symlink: followed; `../../etc/passwd` and absolute paths: refused, in JSONL and parquet
    (string paths and plain {bytes, path} structs)."""
    store, root = tmp_path / "store", tmp_path / "data"
    rows = _rows(store, 4)
    root.mkdir()
    (root / "images").symlink_to(store / "images")
    write_split(root, "train", rows)
    write_split(root, "validation", _rows(store, 2, 100))
    assert preflight.run_preflight(make_cfg(tiny_assets, root, tmp_path / "out"), str(root), processor).report["ok"]
    for bad, why in (("../../etc/passwd", "leaves it through '..'"), ("/etc/passwd", "is absolute"),
                     ("images/../../x.png", "leaves it through '..'")):
        write_split(root, "train", [*rows[:2], {**rows[2], "image": bad}])
        with pytest.raises(DataError, match=f"train.jsonl:3: .*escapes the dataset directory .*{re.escape(why)}"):
            preflight.run_preflight(make_cfg(tiny_assets, root, tmp_path / "out"), str(root), processor)
        (root / "train.jsonl").unlink()
        _parquet_dataset(root, [*rows[:2], {**rows[2], "image": bad}])
        with pytest.raises(DataError, match=f"train\\[2\\]: .*escapes the dataset directory .*{re.escape(why)}"):
            preflight.run_preflight(make_cfg(tiny_assets, root, tmp_path / "out"), str(root), processor)
        (root / "train.parquet").unlink()
        # A plain struct column {bytes, path} (no datasets.Image feature): its path is confined the same way.
        structs = [{**r, "image": {"bytes": None, "path": r["image"]}} for r in rows[:2]]
        _parquet_dataset(root, [*structs, {**rows[2], "image": {"bytes": None, "path": bad}}])
        with pytest.raises(DataError, match=f"train\\[2\\]: .*escapes the dataset directory .*{re.escape(why)}"):
            preflight.run_preflight(make_cfg(tiny_assets, root, tmp_path / "out"), str(root), processor)
        (root / "train.parquet").unlink()


# -- run id ------------------------------------------------------------------------------------------------------
def test_an_unset_run_id_is_derived_from_the_data_and_the_training_settings(tmp_path, capsys):
    """A restarted pod without SFT_RUN_ID gets the same id (so it finds its checkpoints), a new run a new one."""
    env = {"SFT_DATASET_URI": str(tmp_path), "SFT_OUTPUT_DIR": str(tmp_path / "out")}
    cfg = build_cfg(CARD, env)
    data = {"train": "a" * 64, "eval": "b" * 64}
    run_id = _resolve_run_id(cfg, {"data_fingerprint": data})
    assert run_id == derived_run_id(cfg, data) and run_id.startswith("qwen3-sft-") and len(run_id) == 22
    assert f"run id: {run_id} (SFT_RUN_ID unset: derived from the data fingerprint" in capsys.readouterr().out
    assert derived_run_id(cfg.replace(train={"output_dir": "elsewhere"}, eval={"batch_size": 1}), data) == run_id
    assert derived_run_id(cfg.replace(train={"learning_rate": 1e-3}), data) != run_id
    assert derived_run_id(cfg, {**data, "train": "c" * 64}) != run_id
    named = cfg.replace(train={"run_id": "mine"})
    assert _resolve_run_id(named, {"data_fingerprint": data}) == "mine"


# -- layouts -----------------------------------------------------------------------------------------------------
def _imagefolder(folder: Path, n: int, start: int, metadata: str) -> None:
    """n rows whose images lie beside the metadata file, named by `file_name` as the imagefolder convention has it."""
    rows = []
    for r in _rows(folder, n, start):
        (folder / "images" / Path(r["image"]).name).rename(folder / Path(r["image"]).name)
        rows.append({"file_name": Path(r.pop("image")).name, **r})
    if metadata == "metadata.jsonl":
        (folder / metadata).write_text("".join(json.dumps(r) + "\n" for r in rows))
    else:
        lines = ["file_name,query,caption,target_json"] + [
            ",".join([r["file_name"], r["query"], r["caption"], '"' + r["target_json"].replace('"', '""') + '"'])
            for r in rows]
        (folder / metadata).write_text("\n".join(lines) + "\n")


def _hub_parquet(root: Path) -> None:
    """What `push_to_hub` writes: data/{split}-00000-of-00001.parquet, the images embedded as bytes."""
    import datasets

    for split, start, n in (("train", 0, 5), ("validation", 100, 2)):
        rows = [{**r, "image": {"bytes": (root / r["image"]).read_bytes(), "path": None}}
                for r in _rows(root, n, start)]
        features = datasets.Features({"image": datasets.Image(), **{k: datasets.Value("string") for k in
                                                                    ("query", "caption", "target_json")}})
        ds = datasets.Dataset.from_list(rows, features=features)
        (root / "data").mkdir(exist_ok=True)
        ds.to_parquet(str(root / "data" / f"{split}-00000-of-00001.parquet"))
    shutil.rmtree(root / "images")


LAYOUTS = {
    "hub_parquet_shards": (_hub_parquet, "train[0]", 5),
    "imagefolder_per_split": (lambda root: [_imagefolder(root / "train", 5, 0, "metadata.jsonl"),
                                            _imagefolder(root / "validation", 2, 100, "metadata.csv")],
                              "train/metadata.jsonl:1", 5),
    "imagefolder_under_data": (lambda root: [_imagefolder(root / "data" / "train", 5, 0, "metadata.csv"),
                                             _imagefolder(root / "data" / "validation", 2, 100, "metadata.jsonl")],
                               "data/train/metadata.csv:2", 5),
}


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_hub_layouts_are_found_without_pointing_inside_them(layout, tmp_path, tiny_assets, processor):
    """The issue's second bullet: push_to_hub's data/ shards and the imagefolder convention, from the dataset root."""
    build, first_id, n_train = LAYOUTS[layout]
    root = tmp_path / "data"
    root.mkdir()
    build(root)
    result = preflight.run_preflight(make_cfg(tiny_assets, root, tmp_path / "out"), str(root), processor)
    assert result.report["ok"], result.report["errors"]
    assert result.report["holdout"] is None and (len(result.train_dataset), len(result.eval_dataset)) == (n_train, 2)
    assert result.train_dataset[0]["row_id"] == first_id


def test_a_root_imagefolder_is_one_split_and_is_held_out(tmp_path, tiny_assets, processor):
    root = tmp_path / "data"
    root.mkdir()
    _imagefolder(root, 12, 0, "metadata.csv")
    cfg = make_cfg(tiny_assets, root, tmp_path / "out", SFT_EVAL_HOLDOUT="3")
    assert holds_out(cfg.data, cfg.data.uri)
    report = preflight.run_preflight(cfg, cfg.data.uri, processor).report
    assert report["ok"] and len(report["holdout"]["eval_row_ids"]) == 3
    assert all(r.startswith("metadata.csv:") for r in report["holdout"]["train_row_ids"])


def test_a_missing_split_names_every_layout(tmp_path):
    write_split(tmp_path, "train", [{"query": "q"}])
    write_split(tmp_path, "val", [{"query": "q"}])
    with pytest.raises(DataError) as info:
        load_local_split(str(tmp_path), "validation")
    for layout in ("validation.jsonl", "validation/metadata.jsonl (imagefolder)", "data/validation-*.parquet",
                   "save_to_disk"):
        assert layout in str(info.value)


# -- preflight and eval read s3:// sources as run does -----------------------------------------------------------
@pytest.fixture()
def s3_dataset(s3_endpoint, tmp_path) -> str:
    """6 train and 2 eval rows under s3://sources-<test>/ds (moto, over real HTTP)."""
    root = tmp_path / "upload"
    write_split(root, "train", _rows(root, 6))
    write_split(root, "validation", _rows(root, 2, 100))
    bucket = f"sources-{abs(hash(str(tmp_path))) % 10**8}"
    s3io.client().create_bucket(Bucket=bucket)
    s3io.upload_dir(s3io.client(), root, s3io.S3Uri(bucket, "ds"))
    return f"s3://{bucket}/ds"


def _cli_env(tiny_assets, tmp_path: Path, **env: str) -> dict[str, str]:
    return {"SFT_MODEL_ID": str(tiny_assets[0]), "SFT_OUTPUT_DIR": str(tmp_path / "out"), "SFT_MAX_LENGTH": "512",
            "SFT_CACHE_DIR": str(tmp_path / "cache"), **TINY_PIXELS, **env}


def test_a_train_only_s3_prefix_is_held_out_as_the_same_local_directory_is(s3_endpoint, tmp_path, tiny_assets,
                                                                             processor):
    """The mirror's bookkeeping (.s3-manifest.json) is not data: the prefix is one split, and the same rows are held
    out as from the directory it was uploaded from."""
    root = tmp_path / "upload"
    write_split(root, "train", _rows(root, 12))
    bucket = f"holdout-{abs(hash(str(tmp_path))) % 10**8}"
    s3io.client().create_bucket(Bucket=bucket)
    s3io.upload_dir(s3io.client(), root, s3io.S3Uri(bucket, "ds"))
    sides = {}
    for uri in (str(root), f"s3://{bucket}/ds"):
        cfg = make_cfg(tiny_assets, uri, tmp_path / "out", SFT_CACHE_DIR=str(tmp_path / "cache"), SFT_EVAL_HOLDOUT="3")
        path = localize(cfg).dataset_path
        assert holds_out(cfg.data, path), uri
        report = preflight.run_preflight(cfg, path, processor).report
        assert report["ok"], report["errors"]
        sides[uri] = (report["holdout"]["train_row_ids"], report["holdout"]["eval_row_ids"])
    train, held = sides[str(root)]
    assert sides[f"s3://{bucket}/ds"] == (train, held) and len(held) == 3 and len(train) == 9


@pytest.mark.slow  # loads the processor through the command's own path (about 8 s)
def test_preflight_mirrors_an_s3_dataset_into_the_run_cache(s3_dataset, tiny_assets, tmp_path):
    """The issue's fourth bullet: `preflight` (the retrain workflow's first step) reads the bucket itself."""
    env = _cli_env(tiny_assets, tmp_path, SFT_DATASET_URI=s3_dataset)
    result = preflight_command(build_cfg(CARD, env))
    assert result.report["ok"] and len(result.train_dataset) == 6 and len(result.eval_dataset) == 2
    mirror = tmp_path / "cache" / "datasets" / s3_dataset.removeprefix("s3://")
    assert (mirror / "train.jsonl").is_file() and result.train_dataset[0]["image"].startswith(str(mirror.resolve()))
    stamp = (mirror / "train.jsonl").stat().st_mtime_ns
    # The same cache `run` fills, and its ETag reuse: unchanged objects (size and ETag) are not downloaded again.
    assert localize(build_cfg(CARD, env)).dataset_path == str(mirror)
    assert (mirror / "train.jsonl").stat().st_mtime_ns == stamp


@pytest.mark.slow  # loads the tiny model and generates
def test_eval_mirrors_an_s3_dataset_into_the_run_cache(s3_dataset, tiny_assets, tmp_path):
    env = _cli_env(tiny_assets, tmp_path, SFT_DATASET_URI=s3_dataset, SFT_EVAL_ADAPTER="none",
                   SFT_EVAL_MAX_NEW_TOKENS="2", SFT_WANDB_ENABLED="false")
    assert eval_command.main(build_cfg(CARD, env))["n"] == 2
    assert (tmp_path / "cache" / "datasets" / s3_dataset.removeprefix("s3://") / "validation.jsonl").is_file()


# -- Hub dataset lineage -----------------------------------------------------------------------------------------
def test_the_hub_commit_goes_into_training_meta_and_the_card():
    """The resolved commit (what localize learned) is recorded next to the revision the user asked for."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    cfg = build_cfg(CARD, {"SFT_DATASET_URI": "hf://datasets/org/sarcasm/v2",
                                                        "SFT_DATASET_REVISION": "v2.1"})
    assert hub_dataset(cfg.data.uri) == HubDataset("org/sarcasm", "v2")
    sources = Sources(cfg.data.uri, cfg.model.id, "/cache/snapshots/x/v2", cfg.model.id, commit)
    info = lineage(cfg, sources, None, "f" * 64)
    meta = training_meta(cfg, sources, "r", lineage_info=info, metrics={}, durations={}, params={},
                         resumed_from=None, global_step=0)
    assert meta["dataset"]["commit_sha"] == commit and meta["dataset"]["revision"] == "v2.1"
    card = str(build_model_card(cfg, "r", {"post": {"accuracy": 0.5}}, info))
    assert "datasets:\n- org/sarcasm\n" in card and f"dataset_revision: {commit}" in card
    assert f"revision: {commit}" in card.split("model-index:")[1]  # each eval result names the commit


def test_hub_timeouts_are_transient_and_refusals_user_errors():
    """huggingface_hub 2 talks through httpx2: its timeouts and refused connections are exit 3 like httpx's."""
    import httpx2

    assert exit_code_for(httpx2.ConnectTimeout("timed out")) == 3
    assert exit_code_for(httpx2.ConnectError("refused")) == 3
