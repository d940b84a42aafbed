"""ImageNet as a user has it: class-shuffled shards, the validation split with the train set's class indices,
and a wrong --root refused with the right one named. Trees of real JPEGs are made at test time."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
from test_cli import run
from test_sources import jpeg, read_rgb_shards

from shards.build import BuildError, build
from shards.sources import SourceError, open_source

WNIDS = ["n01440764", "n01443537", "n01484850", "n01491361"]  # tench, goldfish, great white shark, tiger shark
PER_CLASS = 6
VAL_WNIDS = ["n01443537", "n01491361", "n01484850", "n01491361", "n01443537", "n01484850", "n01491361"]


def photo(seed: int, h: int = 72, w: int = 96) -> np.ndarray:
    """(h, w, 3) uint8: a colour gradient under smooth blobs and sensor-like noise, different per seed."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w] / max(h, w)
    angle = rng.uniform(0, 2 * np.pi)
    ramp = np.cos(angle) * x + np.sin(angle) * y  # (h, w)
    colours = rng.uniform(30, 225, (2, 3))
    img = colours[0] + (colours[1] - colours[0]) * ramp[..., None]  # (h, w, 3)
    for cy, cx, r, c in zip(*rng.uniform(0, 1, (3, 4)), rng.uniform(-60, 60, (4, 3))):
        img += c * np.exp(-((y - cy) ** 2 + (x - cx) ** 2) / (0.02 + 0.05 * r))[..., None]
    return np.clip(img + rng.normal(0, 6, img.shape), 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def ilsvrc(tmp_path_factory) -> Path:
    """ILSVRC-style root: train/<wnid>/*.JPEG (4 classes x 6), flat val/*.JPEG (8) and LOC_val_solution.csv,
    whose rows name only 3 of the classes (the sorted wnids of the val rows alone would shift every index) and
    leave the 8th image without a row."""
    root = tmp_path_factory.mktemp("ilsvrc")
    for c, wnid in enumerate(WNIDS):
        (root / "train" / wnid).mkdir(parents=True)
        for i in range(PER_CLASS):
            (root / "train" / wnid / f"{wnid}_{i}.JPEG").write_bytes(jpeg(photo(100 * c + i)))
    (root / "val").mkdir()
    rows = ["ImageId,PredictionString"]
    for i in range(8):
        image_id = f"ILSVRC2012_val_{i + 1:08d}"
        (root / "val" / f"{image_id}.JPEG").write_bytes(jpeg(photo(1000 + i)))
        if i < len(VAL_WNIDS):
            rows.append(f"{image_id},{VAL_WNIDS[i]} 10 12 60 50 {VAL_WNIDS[i]} 0 0 20 20")
    (root / "LOC_val_solution.csv").write_text("\n".join(rows) + "\n")
    return root


@pytest.fixture(scope="module")
def train_data(ilsvrc, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("train") / "in4"
    build(open_source("imagenet", str(ilsvrc / "train"), size=48), str(out), shard_size=4, progress=False)
    return out


def shard_classes(out: Path) -> list[set[int]]:
    """The classes in each rgb shard, in shard order."""
    tars = sorted((out / "rgb").glob("*.tar"))
    return [{int(s["cls"]) for s in wds.WebDataset(str(tar), shardshuffle=False)} for tar in tars]


def test_shuffled_build_puts_several_classes_in_every_shard(ilsvrc, train_data, tmp_path):
    mixed = shard_classes(train_data)
    assert len(mixed) == len(WNIDS) * PER_CLASS // 4
    assert all(len(classes) > 1 for classes in mixed), mixed
    sorted_out = tmp_path / "sorted"
    source = open_source("imagenet", str(ilsvrc / "train"), size=48, shuffle=False)
    build(source, str(sorted_out), shard_size=4, progress=False)
    assert sum(len(classes) == 1 for classes in shard_classes(sorted_out)) == 4  # the problem shuffling solves
    # the same samples and keys either way; only the order differs
    keys = [s["__key__"] for s in read_rgb_shards(train_data)]
    assert sorted(keys) == [s["__key__"] for s in read_rgb_shards(sorted_out)] and keys != sorted(keys)
    manifest = json.loads((train_data / "manifest.json").read_text())
    assert manifest["cls_classes"] == WNIDS
    assert manifest["modalities"]["rgb"]["producer"]["options"]["shuffle_seed"] == 0


def test_shuffled_build_is_identical_across_workers_and_seeds_differ(ilsvrc, train_data, tmp_path):
    two = tmp_path / "two"
    build(open_source("imagenet", str(ilsvrc / "train"), size=48), str(two), shard_size=4, workers=2, progress=False)
    assert all((two / "rgb" / p.name).read_bytes() == p.read_bytes() for p in (train_data / "rgb").glob("*.tar"))
    other = open_source("imagenet", str(ilsvrc / "train"), size=48, shuffle_seed=1)
    assert [it.key for it in other.items] != [s["__key__"] for s in read_rgb_shards(train_data)]
    with pytest.raises(BuildError, match="was built with .*'shuffle_seed': 0.*use a new --out"):
        build(other, str(two), shard_size=4, progress=False)  # a resume with another seed is refused


def val_by_key(out: Path) -> dict[str, int]:
    return {s["__key__"]: int(s["cls"]) for s in read_rgb_shards(out)}


def test_flat_val_with_csv_gets_the_train_class_indices(ilsvrc, train_data, tmp_path):
    out = tmp_path / "val"
    source = open_source(
        "imagenet",
        str(ilsvrc / "val"),
        labels=str(ilsvrc / "LOC_val_solution.csv"),
        classes_from=str(train_data),
        size=48,
    )
    summary = build(source, str(out), shard_size=3, progress=False)
    assert (summary.samples, dict(summary.skipped)) == (7, {"no label": 1})
    expected = {f"ILSVRC2012_val_{i + 1:08d}": WNIDS.index(w) for i, w in enumerate(VAL_WNIDS)}
    assert val_by_key(out) == expected
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["cls_classes"] == WNIDS
    stats = [json.loads(p.read_text()) for p in sorted((out / "rgb").glob("*.json"))]
    skipped = [s for st in stats for s in st["skipped"]]
    assert skipped == [
        {
            "ref": "ILSVRC2012_val_00000008.JPEG",
            "reason": f"no label: ILSVRC2012_val_00000008 has no row in {ilsvrc / 'LOC_val_solution.csv'}",
        }
    ]
    sample = next(s for s in read_rgb_shards(out) if s["__key__"] == "ILSVRC2012_val_00000002")
    assert json.loads(sample["json"])["wnid"] == "n01491361"
    # without --classes-from the classes are the CSV's own wnids: 3 of them, indices shifted
    own = open_source("imagenet", str(ilsvrc / "val"), labels=str(ilsvrc / "LOC_val_solution.csv"))
    assert own.cls_classes == WNIDS[1:]


def test_class_folder_val_with_classes_from(ilsvrc, train_data, tmp_path):
    val = tmp_path / "val"
    for wnid in WNIDS[2:]:  # re-arranged val holding only the last two classes
        (val / wnid).mkdir(parents=True)
        (val / wnid / f"ILSVRC2012_val_{wnid}.JPEG").write_bytes(jpeg(photo(int(wnid[1:]))))
    source = open_source("imagenet", str(val), classes_from=str(train_data))
    assert source.cls_classes == WNIDS
    assert sorted((it.label, it.cls) for it in source.items) == [(WNIDS[2], 2), (WNIDS[3], 3)]
    assert open_source("imagenet", str(val)).cls_classes == WNIDS[2:]  # unpinned: 0 and 1, not 2 and 3


def test_unknown_wnid_is_an_error_naming_it_and_the_file(ilsvrc, train_data, tmp_path):
    csv = tmp_path / "LOC_val_solution.csv"
    csv.write_text("ImageId,PredictionString\nILSVRC2012_val_00000003,n09999999 1 2 3 4\n")
    with pytest.raises(SourceError) as err:
        open_source("imagenet", str(ilsvrc / "val"), labels=str(csv), classes_from=str(train_data))
    assert str(err.value) == (
        f"{csv} (row ILSVRC2012_val_00000003): class 'n09999999' is not among the 4 classes of "
        f"--classes-from {train_data / 'manifest.json'}"
    )
    val = tmp_path / "val"
    (val / "n09999999").mkdir(parents=True)
    (val / "n09999999" / "x.JPEG").write_bytes(jpeg(photo(0)))
    with pytest.raises(SourceError, match=f"^{val / 'n09999999'}: class 'n09999999' is not among the 4 classes"):
        open_source("imagenet", str(val), classes_from=str(train_data))
    csv.write_text("ImageId,Label\nILSVRC2012_val_00000003,n01440764\n")
    with pytest.raises(SourceError, match="expected the header ImageId,PredictionString"):
        open_source("imagenet", str(ilsvrc / "val"), labels=str(csv))


def test_a_root_that_is_not_a_wnid_tree_is_refused_with_the_right_root(ilsvrc, tmp_path):
    res = run("build", "--src", "imagenet", "--root", str(ilsvrc), "--out", str(tmp_path / "o"))
    assert res.returncode == 2 and res.stderr.count("\n") == 1, res.stderr
    assert f"{ilsvrc} holds folders that are not WordNet ids (n + 8 digits), e.g. 'train'" in res.stderr
    assert (
        f"; did you mean --root {ilsvrc / 'train'}? (for" in res.stderr
        and "--src folder --class-from-parent" in res.stderr
    )
    assert not (tmp_path / "o").exists()
    with pytest.raises(SourceError, match="holds images but no <wnid> folders: .* give --labels LOC_val_solution.csv"):
        open_source("imagenet", str(ilsvrc / "val"))
    with pytest.raises(SourceError, match="is one class folder: give its parent"):
        open_source("imagenet", str(ilsvrc / "train" / WNIDS[0]))
    kaggle = tmp_path / "kaggle"  # ILSVRC/Data/CLS-LOC/train, beside Annotations/CLS-LOC/train of XML boxes
    for part, name in (("Data", "a.JPEG"), ("Annotations", "a.xml")):
        (kaggle / "ILSVRC" / part / "CLS-LOC" / "train" / WNIDS[0]).mkdir(parents=True)
        (kaggle / "ILSVRC" / part / "CLS-LOC" / "train" / WNIDS[0] / name).write_bytes(jpeg(photo(0)))
    with pytest.raises(SourceError, match=f"; did you mean --root {kaggle}/ILSVRC/Data/CLS-LOC/train\\? \\(for"):
        open_source("imagenet", str(kaggle))
    pets = tmp_path / "pets"
    (pets / "cats").mkdir(parents=True)
    (pets / "cats" / "1.jpg").write_bytes(jpeg(photo(1)))
    with pytest.raises(SourceError, match="e.g. 'cats': .*ROOT/<wnid>/\\*.JPEG \\(for other class folders use --src"):
        open_source("imagenet", str(pets))


def test_options_of_other_sources_are_refused(ilsvrc, train_data):
    with pytest.raises(SourceError, match="--labels applies to --src imagenet, not --src folder"):
        open_source("folder", str(ilsvrc / "val"), labels=str(ilsvrc / "LOC_val_solution.csv"))
    with pytest.raises(SourceError, match="--classes-from with --src folder needs --class-from-parent"):
        open_source("folder", str(ilsvrc / "train"), classes_from=str(train_data))
    # a folder tree of wnids pinned to the train classes gives the same indices as --src imagenet
    folder = open_source("folder", str(ilsvrc / "train"), class_from_parent=True, classes_from=str(train_data))
    assert {it.label: it.cls for it in folder.items} == {w: i for i, w in enumerate(WNIDS)}
