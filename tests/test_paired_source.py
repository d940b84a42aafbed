"""The paired source on NYUv2-style trees made at test time: values exact after the round trip through the shards
and `shards.reader`, a missing file recorded, resizing, class names, the official task-folder layout."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from test_imagenet_source import WNIDS, photo
from test_sources import jpeg

from shards.build import build
from shards.cli import main
from shards.info import info_text
from shards.reader import ShardDataset
from shards.sources import SourceError, open_source
from shards.verify import verify

H, W = 48, 64
CLASSES = ["unlabeled", "wall", "floor", "bed"]


def png16(levels: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(levels.astype(np.uint16)).save(buf, "PNG")
    return buf.getvalue()


def png8(ids: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(ids.astype(np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def depth_mm(seed: int) -> np.ndarray:
    """(H, W) uint16 millimetres, constant on 2 x 2 blocks (so a half-size nearest resize is exact), with 0 holes."""
    rng = np.random.default_rng(seed)
    blocks = rng.integers(500, 10_000, (H // 2, W // 2))
    blocks[rng.random(blocks.shape) < 0.1] = 0  # missing
    blocks[0, 0] = 65535 if seed == 0 else blocks[0, 0]  # the largest level
    return np.repeat(np.repeat(blocks, 2, 0), 2, 1).astype(np.uint16)


def labels(seed: int) -> np.ndarray:
    """(H, W) uint8 class ids 0..3, 255 (unlabelled) on a border, constant on 2 x 2 blocks."""
    rng = np.random.default_rng(seed)
    blocks = rng.integers(0, len(CLASSES), (H // 2, W // 2))
    blocks[:, -2:] = 255
    return np.repeat(np.repeat(blocks, 2, 0), 2, 1).astype(np.uint8)


@pytest.fixture(scope="module")
def nyu(tmp_path_factory) -> Path:
    """NYU/{rgb,depth,labels}/<split>/<n>.{jpg,png}, 5 samples; depth of 'b/0004' is missing; nyu40-style class file."""
    root = tmp_path_factory.mktemp("nyu")
    for i, split in enumerate(["a"] * 3 + ["b"] * 2):
        for folder in ("rgb", "depth", "labels"):
            (root / folder / split).mkdir(parents=True, exist_ok=True)
        (root / "rgb" / split / f"{i:04d}.jpg").write_bytes(jpeg(photo(i, H, W)))
        if i != 4:
            (root / "depth" / split / f"{i:04d}.png").write_bytes(png16(depth_mm(i)))
        (root / "labels" / split / f"{i:04d}.png").write_bytes(png8(labels(i)))
    (root / "classes.txt").write_text("\n".join(CLASSES) + "\n\n")
    return root


def paired(root: Path, **kw) -> dict:
    args = dict(
        modalities={"rgb": "rgb", "depth_gt": "depth", "semseg_gt": "labels"},
        depth_scale=0.001,
        semseg_classes=str(root / "classes.txt"),
    )
    return open_source("paired", str(root), **{**args, **kw})


def read_back(out: Path, modalities: list[str]) -> dict[str, dict]:
    ds = ShardDataset(str(out), modalities, split_by_node=False, split_by_worker=False)
    return {s["__key__"]: s for s in ds}


def test_paired_round_trip_is_exact_and_a_missing_file_is_recorded(nyu, tmp_path):
    out = tmp_path / "out"
    summary = build(paired(nyu), str(out), shard_size=2, progress=False)
    assert (summary.samples, dict(summary.skipped)) == (4, {"missing": 1})
    got = read_back(out, ["rgb", "depth_gt", "semseg_gt"])
    assert sorted(got) == ["a-0000", "a-0001", "a-0002", "b-0003"]
    for key, sample in got.items():
        i = int(key[-4:])
        assert sample["depth_gt"].dtype == np.float32
        np.testing.assert_array_equal(sample["depth_gt"], (depth_mm(i) * 0.001).astype(np.float32))
        np.testing.assert_array_equal(sample["semseg_gt"], labels(i).astype(np.int64))
        assert sample["rgb"].shape == (H, W, 3)
        assert np.abs(sample["rgb"].astype(int) - photo(i, H, W)).mean() < 8  # two JPEG passes of noise
    assert got["a-0000"]["depth_gt"][0, 0] == np.float32(65.535) and (got["a-0000"]["depth_gt"] == 0).any()
    skipped = [s for p in sorted((out / "depth_gt").glob("*.json")) for s in json.loads(p.read_text())["skipped"]]
    assert skipped == [{"ref": "b/0004.jpg", "reason": f"missing: no depth_gt file b/0004.* in {nyu / 'depth'}"}]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["modalities"]["depth_gt"]["meaning"] == "metric_m"
    assert manifest["modalities"]["semseg_gt"]["classes"] == CLASSES
    assert manifest["modalities"]["semseg_gt"]["meaning"] == "class_ids"
    assert manifest["cls_classes"] is None
    assert verify(str(out), deep=True) == []  # 255 (unlabelled) is a valid semseg value
    assert "skipped by reason: missing: 1\n" in info_text(str(out))  # one sample, recorded by every modality


def test_paired_resize_follows_rgb_by_nearest_neighbour(nyu, tmp_path):
    out = tmp_path / "half"
    build(paired(nyu, size=H // 2), str(out), shard_size=8, progress=False)
    got = read_back(out, ["rgb", "depth_gt", "semseg_gt"])
    for key, sample in got.items():
        i = int(key[-4:])
        assert sample["rgb"].shape == (H // 2, W // 2, 3)
        np.testing.assert_array_equal(sample["depth_gt"], (depth_mm(i)[::2, ::2] * 0.001).astype(np.float32))
        np.testing.assert_array_equal(sample["semseg_gt"], labels(i)[::2, ::2])


def test_float_tiff_depth_is_scaled_and_nan_becomes_missing(tmp_path):
    root = tmp_path / "hypersim"
    metres = np.random.default_rng(0).uniform(0.5, 20.0, (H, W)).astype(np.float32)
    metres[:4] = np.nan  # no surface
    for folder in ("rgb", "depth"):
        (root / folder / "ai_001_001").mkdir(parents=True)
    (root / "rgb" / "ai_001_001" / "frame.0000.jpg").write_bytes(jpeg(photo(0, H, W)))
    Image.fromarray(metres).save(root / "depth" / "ai_001_001" / "frame.0000.tif")
    source = open_source("paired", str(root), modalities={"rgb": "rgb", "depth_gt": "depth"}, depth_scale=1.0)
    build(source, str(tmp_path / "out"), progress=False)
    (sample,) = read_back(tmp_path / "out", ["depth_gt"]).values()
    assert (sample["depth_gt"][:4] == 0).all()
    step = float(np.nanmax(metres)) / 65535  # the sample's own range [0, max], 16 bits
    assert np.abs(sample["depth_gt"][4:] - metres[4:]).max() <= step / 2 + 1e-6


def test_class_names_from_the_data_and_out_of_range_ids(nyu, tmp_path):
    source = paired(nyu, semseg_classes=None, modalities={"rgb": "rgb", "semseg_gt": "labels"}, depth_scale=None)
    assert source.semseg_classes == ["class0", "class1", "class2", "class3"]  # largest id 3; 255 is not a class
    short = tmp_path / "two.txt"
    short.write_text("unlabeled\nwall\n")
    summary = build(paired(nyu, semseg_classes=str(short)), str(tmp_path / "out"), shard_size=8, progress=False)
    assert (summary.samples, dict(summary.skipped)) == (0, {"missing": 1, "label out of range": 4})
    stats = json.loads((tmp_path / "out" / "rgb" / "shard-000000.json").read_text())
    reason = next(s["reason"] for s in stats["skipped"] if s["ref"] == "a/0000.jpg")
    assert reason == f"label out of range: semseg_gt: id 3 is not among the 2 classes of {short} (or 255, unlabelled)"
    blank = tmp_path / "blank.txt"
    blank.write_text("a\n\nb\n")
    with pytest.raises(SourceError, match="line 2 is blank"):
        paired(nyu, semseg_classes=str(blank))


def test_paired_user_errors(nyu, tmp_path):
    with pytest.raises(SourceError, match="needs exactly one rgb modality in --modalities, got 0"):
        paired(nyu, modalities={"depth_gt": "depth"}, semseg_classes=None)
    with pytest.raises(SourceError, match="needs --depth-scale .* 0.001 for millimetre PNGs"):
        paired(nyu, depth_scale=None)
    with pytest.raises(SourceError, match="--modalities semseg_gt=nope: .*nope is not a folder"):
        paired(nyu, modalities={"rgb": "rgb", "semseg_gt": "nope"}, depth_scale=None)
    with pytest.raises(SourceError, match="--depth-scale 0.001: needs a depth modality"):
        paired(nyu, modalities={"rgb": "rgb", "semseg_gt": "labels"})
    with pytest.raises(SourceError, match="--modalities: unknown modality 'edges'"):
        paired(nyu, modalities={"rgb": "rgb", "edges": "depth"})
    twin = tmp_path / "twin"
    (twin / "rgb").mkdir(parents=True)
    for ext in ("jpg", "png"):
        Image.fromarray(photo(0, 8, 8)).save(twin / "rgb" / f"x.{ext}")
    with pytest.raises(SourceError, match="x.jpg and .*x.png differ only by extension"):
        open_source("paired", str(twin), modalities={"rgb": "rgb"})


@pytest.fixture(scope="module")
def task_folders(tmp_path_factory) -> Path:
    """The official MultiMAE layout ROOT/<task>/<class>/<file>: rgb JPEGs, 16-bit depth, 8-bit semseg."""
    root = tmp_path_factory.mktemp("multimae")
    for c, wnid in enumerate(WNIDS[:2]):
        for i in range(3):
            name = f"{wnid}_{i}"
            for task in ("rgb", "depth_euclidean", "semseg"):
                (root / task / wnid).mkdir(parents=True, exist_ok=True)
            (root / "rgb" / wnid / f"{name}.JPEG").write_bytes(jpeg(photo(10 * c + i, H, W)))
            (root / "depth_euclidean" / wnid / f"{name}.png").write_bytes(png16(depth_mm(10 * c + i)))
            (root / "semseg" / wnid / f"{name}.png").write_bytes(png8(labels(10 * c + i)))
    return root


def test_official_task_folders_with_class_from_parent(task_folders, tmp_path):
    source = open_source(
        "paired",
        str(task_folders),
        modalities={"rgb": "rgb", "depth": "depth_euclidean", "semseg": "semseg"},
        depth_scale=1 / 512,
        depth_meaning="relative",
        class_from_parent=True,
    )
    assert source.cls_classes == WNIDS[:2] and source.semseg_classes == [f"class{i}" for i in range(4)]
    out = tmp_path / "out"
    build(source, str(out), shard_size=4, progress=False)
    got = read_back(out, ["rgb", "depth", "semseg"])
    assert {k: s["cls"] for k, s in got.items()} == {
        f"{w}-{w}_{i}": c for c, w in enumerate(WNIDS[:2]) for i in range(3)
    }
    np.testing.assert_array_equal(got[f"{WNIDS[1]}-{WNIDS[1]}_2"]["depth"], (depth_mm(12) / 512).astype(np.float32))
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["modalities"]["depth"]["meaning"] == "relative" and manifest["cls_classes"] == WNIDS[:2]
    assert verify(str(out)) == []


def test_paired_from_the_command_line(nyu, tmp_path, capsys):
    base = ["build", "--src", "paired", "--root", str(nyu), "--depth-scale", "0.001", "--workers", "1", "--no-progress"]
    mods = ["--modalities", "rgb=rgb", "depth_gt=depth", "semseg_gt=labels"]
    with pytest.raises(SystemExit) as done:
        main([*base, *mods, "--semseg-classes", str(nyu / "classes.txt"), "--out", str(tmp_path / "out")])
    assert done.value.code == 0
    assert capsys.readouterr().out.startswith(f"wrote 4 samples in 1 shards to {tmp_path / 'out'} ")
    with pytest.raises(SystemExit) as done:
        main([*base, *mods, "depth_gt=labels", "--out", str(tmp_path / "o2")])
    assert done.value.code == 2
    assert capsys.readouterr().err == "multimae-shard build: error: --modalities names 'depth_gt' twice\n"
    with pytest.raises(SystemExit) as done:
        main([*base, "--modalities", "rgb", "--out", str(tmp_path / "o3")])
    assert done.value.code == 2 and "expected NAME=FOLDER (e.g. depth_gt=depth), got 'rgb'" in capsys.readouterr().err
