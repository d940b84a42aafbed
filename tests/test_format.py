"""The shard format core: lossless codecs, atomic deterministic writer, manifest, fsspec URLs."""

import hashlib
import json
import os
import tarfile

import numpy as np
import pytest
from blake3 import blake3

from shards import format as F
from shards import fs
from shards.writer import ShardWriter, shard_is_complete, stats_path, tar_path


def test_depth_roundtrip_is_exact_to_the_uint16_step():
    rng = np.random.default_rng(0)
    depth = rng.uniform(0.3, 12.0, (37, 53)).astype(np.float32)
    members = F.encode_sample("depth_gt", depth)
    assert set(members) == {"depth_gt.png", "depth_gt.json"}
    lo, hi = json.loads(members["depth_gt.json"])["depth_range"]
    assert (lo, hi) == (float(depth.min()), float(depth.max()))
    back = F.decode_sample("depth_gt", members)
    assert back.dtype == np.float32 and back.shape == depth.shape
    step = (hi - lo) / F.DEPTH_LEVELS
    assert np.abs(back - depth).max() <= step * 0.5 + 1e-6
    # decoding then re-encoding is a fixed point: the stored values are exactly representable
    assert F.encode_sample("depth_gt", back)["depth_gt.png"] == members["depth_gt.png"]


def test_depth_png_is_16_bit_and_constant_depth_survives():
    png, rng = F.encode_depth(np.full((4, 5), 2.5, np.float32))
    assert rng == [2.5, 2.5]
    assert np.array_equal(F.decode_depth(png, rng), np.full((4, 5), 2.5, np.float32))
    import io

    from PIL import Image

    assert Image.open(io.BytesIO(png)).mode.startswith("I;16")
    with pytest.raises(F.FormatError, match="NaN"):
        F.encode_depth(np.array([[np.nan, 1.0]]))


@pytest.mark.parametrize("num_classes", [10, 255, 1000])
def test_semseg_roundtrip_exact_8_and_16_bit(num_classes):
    ids = np.random.default_rng(1).integers(0, num_classes, (31, 29))
    data = F.encode_semseg(ids, num_classes)
    back = F.decode_semseg(data)
    assert back.dtype == np.int64 and np.array_equal(back, ids)
    with pytest.raises(F.FormatError, match="out of range"):
        F.encode_semseg(np.full((2, 2), 70000), num_classes)


def test_rgb_roundtrip_within_jpeg_tolerance():
    y, x = np.mgrid[0:64, 0:96]
    img = np.stack([x * 2, y * 3, (x + y)], -1).astype(np.uint8)
    back = F.decode_sample("rgb", F.encode_sample("rgb", img))
    assert back.shape == img.shape and back.dtype == np.uint8
    assert np.abs(back.astype(int) - img).mean() < 2.0


def test_modality_names_and_keys_are_checked():
    assert F.modality_kind("depth_gt") == "depth" and F.modality_kind("semseg") == "semseg"
    for bad in ["edges", "rgb.x", "", "Depth"]:
        with pytest.raises(F.FormatError):
            F.modality_kind(bad)
    for bad in ["a.b", "", "a/b", "_x"]:
        with pytest.raises(F.FormatError):
            F.check_key(bad)


def _write(root, keys, name="shard-000000"):
    img = np.zeros((8, 8, 3), np.uint8)
    with ShardWriter(root, name, ["rgb", "semseg_gt"], producer={"source": "test"}) as w:
        for i, k in enumerate(keys):
            ids = np.full((8, 8), i % 5)
            w.write(
                k,
                {
                    "rgb": {**F.encode_sample("rgb", img), "cls": str(i).encode()},
                    "semseg_gt": F.encode_sample("semseg_gt", ids, num_classes=5),
                },
            )
        w.skip("broken.jpg", "truncated")
    return w


def test_writer_commits_tar_then_stats_and_is_deterministic(tmp_path):
    keys = [f"k{i:04d}" for i in range(5)]
    _write(str(tmp_path / "a"), keys)
    _write(str(tmp_path / "b"), keys)
    for m in ["rgb", "semseg_gt"]:
        a, b = (tmp_path / d / m / "shard-000000.tar" for d in "ab")
        assert a.read_bytes() == b.read_bytes()
        stats = json.loads((tmp_path / "a" / m / "shard-000000.json").read_text())
        assert stats["count"] == 5 and stats["bytes"] == a.stat().st_size
        assert stats["keys_digest"] == hashlib.sha256("\n".join(keys).encode()).hexdigest()
        assert stats["skipped"] == [{"ref": "broken.jpg", "reason": "truncated"}]
        assert shard_is_complete(str(tmp_path / "a"), m, "shard-000000")
    with tarfile.open(tmp_path / "a" / "rgb" / "shard-000000.tar") as tf:
        members = tf.getmembers()
        stored = {m.name: tf.extractfile(m).read() for m in members}
    stats = json.loads((tmp_path / "a" / "rgb" / "shard-000000.json").read_text())
    assert "member_sha256" not in stats  # one field of digests: BLAKE3, of every member's bytes
    assert stats["member_blake3"] == {name: blake3(data).hexdigest() for name, data in stored.items()}
    assert [m.name for m in members[:2]] == ["k0000.cls", "k0000.rgb.jpg"]
    assert all(m.mtime == 0 for m in members)
    umask = os.umask(0)
    os.umask(umask)
    assert (tmp_path / "a" / "rgb" / "shard-000000.tar").stat().st_mode & 0o777 == 0o666 & ~umask


def test_writer_abort_and_errors_leave_nothing_visible(tmp_path):
    root = str(tmp_path)
    with pytest.raises(F.FormatError, match="duplicate key"):
        _write(root, ["a", "a"])
    assert not fs.exists(tar_path(root, "rgb", "shard-000000"))
    assert not fs.exists(stats_path(root, "rgb", "shard-000000"))
    assert [p.name for p in (tmp_path / "rgb").iterdir()] == []  # temporaries removed too
    w = ShardWriter(root, "shard-000001", ["rgb"])
    with pytest.raises(F.FormatError, match="lacks modalities"):
        w.write("k", {})
    w.abort()
    assert not any((tmp_path / "rgb").iterdir())


def test_manifest_update_merges_modalities(tmp_path):
    root = str(tmp_path)
    with pytest.raises(F.FormatError, match="not found"):
        F.read_manifest(root)
    F.update_manifest(
        root,
        {"rgb": F.modality_entry("rgb", {"source": "x"}, meaning="srgb")},
        shards=[{"name": "shard-000000", "count": 3}, {"name": "shard-000001", "count": 2}],
    )
    F.update_manifest(
        root, {"semseg": F.modality_entry("semseg", {"model": "m"}, meaning="class_ids", classes=["a", "b"])}
    )
    m = F.read_manifest(root)
    assert m["total"] == 5 and set(m["modalities"]) == {"rgb", "semseg"}
    assert m["modalities"]["semseg"]["classes"] == ["a", "b"] and m["modalities"]["semseg"]["dtype"] == "uint8"
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]


def test_writer_and_manifest_work_on_an_fsspec_url():
    root = "memory://shardset"
    _write(root, ["x1", "x2"])
    assert shard_is_complete(root, "semseg_gt", "shard-000000")
    assert fs.listdir(fs.join(root, "rgb")) == ["shard-000000.json", "shard-000000.tar"]
    assert fs.read_json(stats_path(root, "rgb", "shard-000000"))["count"] == 2


@pytest.mark.parametrize(
    "rng, want",
    [
        ("[0.5, 2.5]", [0.5, 2.5]),
        ("[2, 3]", [2.0, 3.0]),
        ("[1.5, 1.5]", [1.5, 1.5]),
        ("[0, 1.0e30]", [0.0, 1.0e30]),
        ("[NaN, 2.0]", None),
        ("[-Infinity, 3.0]", None),
        ("[1e400, 2]", None),  # json's inf, beside an int
        ("[3.0, 2.0]", None),
        ("[true, 3]", None),
        ("[1.0]", None),
    ],
)
def test_depth_range_is_two_finite_numbers_in_order(rng, want):
    meta = f'{{"depth_range": {rng}}}'.encode()
    if want is None:
        with pytest.raises(F.FormatError, match="bad depth_range"):
            F.parse_depth_range(meta)
    else:
        assert F.parse_depth_range(meta) == want
