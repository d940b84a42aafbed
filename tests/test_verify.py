"""`verify`: a valid set has no problems; each kind of damage is reported once with its file and key."""

import json
import os
import pickle

import numpy as np
import pytest
from test_reader import MODS, key_of, member_offset, members, rewrite, write_set

from shards import format as F
from shards import fs
from shards.verify import Problem, verify
from shards.writer import ShardWriter, stats_path, tar_path

S1 = "shard-000001"


@pytest.fixture
def data(tmp_path):
    root = str(tmp_path)
    return root, write_set(root, counts=[3, 4])


def found(problems: list[Problem]) -> list[tuple[str, str | None]]:
    return [(p.file, p.key) for p in problems]


def test_valid_set_has_no_problems(data):
    root, _ = data
    seen = []
    assert verify(root, workers=2, progress=lambda name, n: seen.append((name, n))) == []
    assert seen == [("shard-000000", 0), (S1, 0)]


def test_missing_key_swapped_order_and_extra_key(data):
    root, truth = data
    ks = [key_of(1, i) for i in range(4)]
    rewrite(root, "depth", 1, ks[:2] + ks[3:], truth)  # k2 missing
    rewrite(root, "semseg", 1, [ks[1], ks[0], ks[2], ks[3]], truth)  # swapped
    problems = verify(root)
    depth, semseg = tar_path(root, "depth", S1), tar_path(root, "semseg", S1)
    assert found(problems) == [
        (stats_path(root, "depth", S1), None),  # stats count 3 vs manifest 4
        (depth, ks[2]),
        (semseg, ks[1]),
    ]
    assert "count 3 but the manifest says 4" in problems[0].what
    assert "key missing" in problems[1].what and tar_path(root, "rgb", S1) in problems[1].what
    assert f"key order differs: sample 0 is {ks[0]!r}" in problems[2].what


def test_extra_shard_and_unlisted_modality_folder(data):
    root, truth = data
    rewrite(root, "depth", 2, [key_of(0, 0)], truth)
    with ShardWriter(root, "shard-000000", ["depth_gt"]) as w:
        w.write(key_of(0, 0), {"depth_gt": F.encode_sample("depth_gt", np.ones((2, 2)))})
    problems = verify(root)
    assert found(problems) == [(os.path.join(root, "depth_gt"), None), (tar_path(root, "depth", "shard-000002"), None)]
    assert "modality the manifest does not list" in problems[0].what and "extra shard" in problems[1].what


def test_corrupt_member_truncated_tar_and_missing_stats(data):
    root, _ = data
    semseg = tar_path(root, "semseg", S1)
    _, at = member_offset(semseg, f"{key_of(1, 1)}.semseg.png")
    with open(semseg, "r+b") as f:
        f.seek(at + 20)
        f.write(b"\xff" * 40)
    rgb0 = tar_path(root, "rgb", "shard-000000")
    with open(rgb0, "r+b") as f:
        f.truncate(member_offset(rgb0, f"{key_of(0, 2)}.cls")[1] + 1)
    os.remove(stats_path(root, "depth", S1))
    problems = verify(root)
    assert found(problems) == [
        (rgb0, key_of(0, 1)),  # unreadable after 2 samples; alignment of the others is checked against them
        (tar_path(root, "depth", "shard-000000"), key_of(0, 2)),
        (tar_path(root, "semseg", "shard-000000"), key_of(0, 2)),
        (stats_path(root, "depth", S1), None),
        (semseg, key_of(1, 1)),
    ]
    assert "tar unreadable after 2 samples" in problems[0].what
    assert "extra key" in problems[1].what
    assert "stats json missing" in problems[3].what
    assert "semseg does not decode" in problems[4].what


def test_bad_values_unexpected_members_and_count_mismatch(data):
    root, truth = data
    k0 = key_of(0, 0)
    with ShardWriter(root, "shard-000000", ["rgb", "semseg"]) as w:
        for i in range(3):
            k = key_of(0, i)
            rgb = {**members("rgb", truth[k]), "pyd": pickle.dumps({"x": 1})}
            sem = members("semseg", truth[k])
            if i == 0:
                rgb["cls"] = b"7"  # only 3 cls_classes
                sem = {"semseg.png": F.encode_semseg(np.full((24, 32), 9), 10)}  # only 7 classes
            if i == 2:
                sem = {"semseg.png": F.encode_semseg(np.zeros((12, 32), int), 10)}  # wrong size
            w.write(k, {"rgb": rgb, "semseg": sem})
    manifest = F.read_manifest(root)
    manifest["shards"][1]["count"] = 5
    F.write_manifest(root, manifest)
    problems = verify(root)
    rgb0, sem0 = tar_path(root, "rgb", "shard-000000"), tar_path(root, "semseg", "shard-000000")
    assert found(problems) == [
        (os.path.join(root, "manifest.json"), None),
        (rgb0, k0),
        (rgb0, k0),
        (rgb0, key_of(0, 1)),
        (rgb0, key_of(0, 2)),
        (sem0, k0),
        (sem0, key_of(0, 2)),
    ] + [(stats_path(root, m, S1), None) for m in sorted(MODS)]  # manifest json keys are sorted
    whats = [p.what for p in problems]
    assert "total 7 is not the sum" in whats[0]
    assert "unexpected member .pyd" in whats[1] and "cls 7 outside the 3 cls_classes" in whats[2]
    assert "class ids [9, 9] outside the 7 manifest classes" in whats[5]
    assert "size (12, 32) differs from (24, 32)" in whats[6]
    assert all("count 4 but the manifest says 5" in w for w in whats[7:])


def test_tampered_stats_and_unusable_manifest(data):
    root, _ = data
    path = stats_path(root, "rgb", S1)
    stats = fs.read_json(path)
    fs.write_json_atomic(path, {**stats, "keys_digest": "0" * 64})
    assert [(p.file, p.what) for p in verify(root)] == [(path, "keys_digest does not match the keys in the tar")]
    with open(os.path.join(root, "manifest.json"), "w") as f:
        json.dump({"format_version": 99}, f)
    (problem,) = verify(root)
    assert problem.file == os.path.join(root, "manifest.json") and "format_version 99" in problem.what
    assert str(problem).startswith(f"{problem.file}: manifest unusable")


def test_verify_reads_fsspec_urls():
    root = "memory://verify-test/data"
    write_set(root, counts=[2])
    assert verify(root) == []
    fs.write_json_atomic(stats_path(root, "depth", "shard-000000"), {"count": 1})
    assert [p.what for p in verify(root)] == [
        "count 1 but the manifest says 2",
        "holds 2 samples but its stats json says 1",
        "keys_digest does not match the keys in the tar",
    ]


def test_samples_a_modality_records_as_skipped_are_a_gap_not_a_misalignment(tmp_path):
    """A teacher that could not label key K writes K under `skipped` in its stats and leaves it out:
    verify accepts that and the reader drops K from every modality; an unrecorded gap is still an error."""
    from shards.reader import ShardDataset, iter_shard

    root = str(tmp_path)
    write_set(root, counts=[4], modalities=["rgb"])
    keys = [key_of(0, i) for i in range(4)]
    with ShardWriter(root, "shard-000000", ["depth"]) as w:
        for i, k in enumerate(keys):
            if i == 2:
                w.skip(k, "teacher failed: corrupt jpeg")
                continue
            w.write(k, {"depth": F.encode_sample("depth", np.full((24, 32), 1.0 + i, np.float32))})
    F.update_manifest(root, {"depth": F.modality_entry("depth", {"model": "t"}, meaning="metric_m")})
    assert verify(root) == []
    got = [s["__key__"] for s in iter_shard(root, "shard-000000", ["rgb", "depth"])]
    assert got == [keys[0], keys[1], keys[3]]
    got = sorted(s["__key__"] for s in ShardDataset(root, ["depth", "rgb"], split_by_node=False))
    assert got == [keys[0], keys[1], keys[3]]
    assert [s["__key__"] for s in iter_shard(root, "shard-000000", ["rgb"])] == keys  # rgb alone keeps all

    stats = json.loads(open(stats_path(root, "depth", "shard-000000")).read())
    stats["skipped"] = []  # the same gap, unrecorded
    fs.write_json_atomic(stats_path(root, "depth", "shard-000000"), stats)
    assert (tar_path(root, "depth", "shard-000000"), keys[2]) in found(verify(root))
    with pytest.raises(Exception, match="misaligned"):
        list(iter_shard(root, "shard-000000", ["rgb", "depth"]))
