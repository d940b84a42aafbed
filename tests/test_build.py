"""Building shard sets: manifest, exact round trips, determinism across worker counts, resume, killed builds."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
from PIL import Image

from shards import synthetic
from shards.build import BuildError, build
from shards.format import decode_sample, encode_rgb
from shards.sources import open_source

MODALITIES = ("rgb", "depth_gt", "semseg_gt")
CLI = str(Path(sys.executable).with_name("multimae-shard"))


def synth(tmp: Path, name: str = "out", workers: int = 1, num: int = 24, seed: int = 0) -> Path:
    out = tmp / name
    build(
        open_source("synthetic", num=num, size=64, seed=seed), str(out), shard_size=8, workers=workers, progress=False
    )
    return out


def tar_bytes(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.glob("*/*.tar"))}


def test_synthetic_manifest_and_stats(tmp_path):
    out = synth(tmp_path, num=20)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["format_version"] == 1 and manifest["total"] == 20
    assert manifest["shards"] == [
        {"name": "shard-000000", "count": 8},
        {"name": "shard-000001", "count": 8},
        {"name": "shard-000002", "count": 4},
    ]
    assert manifest["cls_classes"] == synthetic.CLS_CLASSES
    mods = manifest["modalities"]
    assert sorted(mods) == sorted(MODALITIES)
    assert (mods["depth_gt"]["kind"], mods["depth_gt"]["meaning"], mods["depth_gt"]["dtype"]) == (
        "depth",
        "metric_m",
        "uint16",
    )
    assert mods["semseg_gt"]["classes"] == synthetic.SEMSEG_CLASSES
    assert mods["rgb"]["producer"]["options"] == {"num": 20, "size": 64, "seed": 0, "quality": 95}
    for m in MODALITIES:
        stats = json.loads((out / m / "shard-000002.json").read_text())
        assert (stats["shard"], stats["modality"], stats["count"], stats["skipped"]) == ("shard-000002", m, 4, [])
        assert stats["bytes"] == (out / m / "shard-000002.tar").stat().st_size


def test_round_trip_is_exact_and_plain_webdataset_reads_it(tmp_path):
    out = synth(tmp_path, num=10)
    urls = {m: [str(out / m / f"shard-00000{i}.tar") for i in range(2)] for m in MODALITIES}
    streams = {m: list(wds.WebDataset(urls[m], shardshuffle=False)) for m in MODALITIES}
    assert [s["__key__"] for s in streams["rgb"]] == [synthetic.scene_key(0, i) for i in range(10)]
    for i in range(10):
        truth = synthetic.render_scene(0, i, 64)
        depth = decode_sample("depth_gt", streams["depth_gt"][i])
        lo, hi = json.loads(streams["depth_gt"][i]["depth_gt.json"])["depth_range"]
        assert np.abs(depth - truth["depth_gt"]).max() <= (hi - lo) / 65535 * 0.5 + 1e-5 * hi
        assert (decode_sample("semseg_gt", streams["semseg_gt"][i]) == truth["semseg_gt"]).all()
        assert streams["rgb"][i]["rgb.jpg"] == encode_rgb(truth["rgb"], 95)  # stored as the q95 JPEG of the scene
        rgb = decode_sample("rgb", streams["rgb"][i])
        assert rgb.shape == (64, 64, 3) and np.abs(rgb.astype(int) - truth["rgb"]).mean() < 16  # 4:2:0 JPEG
        assert int(streams["rgb"][i]["cls"]) == truth["cls"]
        assert json.loads(streams["rgb"][i]["json"]) == {
            "source": "synthetic",
            "seed": 0,
            "index": i,
            "orig_size": [64, 64],
        }


def test_tar_t_lists_sorted_members_with_fixed_metadata(tmp_path):
    out = synth(tmp_path, num=8)
    k0, k1 = synthetic.scene_key(0, 0), synthetic.scene_key(0, 1)
    for m, members in (
        ("rgb", ["cls", "json", "rgb.jpg"]),
        ("depth_gt", ["depth_gt.json", "depth_gt.png"]),
        ("semseg_gt", ["semseg_gt.png"]),
    ):
        listed = subprocess.run(
            ["tar", "-tf", str(out / m / "shard-000000.tar")], capture_output=True, text=True, check=True
        ).stdout.split()
        assert listed[: 2 * len(members)] == [f"{k}.{e}" for k in (k0, k1) for e in members]
        assert len(listed) == 8 * len(members)
        with tarfile.open(out / m / "shard-000000.tar") as tar:
            assert {(t.mtime, t.uname, t.gname) for t in tar} == {(0, "multimae", "multimae")}


def test_builds_are_byte_identical_across_runs_and_worker_counts(tmp_path):
    one = tar_bytes(synth(tmp_path, "one", workers=1))
    two = tar_bytes(synth(tmp_path, "two", workers=2))
    assert len(one) == 9 and one == two
    other_seed = tar_bytes(synth(tmp_path, "seed1", seed=1))
    assert other_seed["rgb/shard-000000.tar"] != one["rgb/shard-000000.tar"]


def test_resume_keeps_complete_shards_and_redoes_the_rest(tmp_path):
    out = synth(tmp_path)
    before = tar_bytes(out)
    kept_mtime = (out / "rgb" / "shard-000000.tar").stat().st_mtime_ns
    (out / "semseg_gt" / "shard-000001.json").unlink()  # shard 1 incomplete: killed between commits
    (out / "rgb" / "shard-000001.tar").write_bytes(b"half a tar")
    (out / "depth_gt" / "shard-000002.tar.tmp-deadbeef").write_bytes(b"leftover")
    summary = build(open_source("synthetic", num=24, size=64), str(out), shard_size=8, workers=2, progress=False)
    assert (summary.built, summary.kept, summary.samples, summary.new_samples) == (1, 2, 24, 8)
    assert tar_bytes(out) == before
    assert (out / "rgb" / "shard-000000.tar").stat().st_mtime_ns == kept_mtime
    assert not list(out.glob("*/*.tmp-*"))
    assert json.loads((out / "manifest.json").read_text())["total"] == 24


def test_resume_refuses_an_output_of_another_build(tmp_path):
    out = synth(tmp_path)
    with pytest.raises(BuildError, match="built with"):
        build(open_source("synthetic", num=24, size=64, seed=1), str(out), shard_size=8, progress=False)
    with pytest.raises(BuildError, match="shard-000002.*would not produce"):
        build(open_source("synthetic", num=16, size=64), str(out), shard_size=8, progress=False)


def test_resume_refuses_a_changed_source(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for i in (0, 2, 4, 6):
        Image.new("RGB", (20, 20), (i * 30, 0, 0)).save(src / f"{i}.png")
    build(open_source("folder", str(src)), str(tmp_path / "out"), shard_size=2, progress=False)
    Image.new("RGB", (20, 20)).save(src / "1.png")  # shifts every later sample into another position
    with pytest.raises(BuildError, match="shard-000000.json: its keys differ"):
        build(open_source("folder", str(src)), str(tmp_path / "out"), shard_size=2, progress=False)


def _children(pid: int) -> list[int]:
    kids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            kids.append(int(stat.parent.name))
    return kids


def _alive(pid: int) -> bool:
    try:
        return (Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]) != "Z"
    except OSError:
        return False


def _assert_no_partial_tar(out: Path, shard_size: int) -> None:
    """Every tar under a final name is a whole shard (a killed writer leaves only *.tmp-* files)."""
    for path in out.glob("*/shard-*.tar"):
        with tarfile.open(path) as tar:
            keys = {t.name.split(".", 1)[0] for t in tar}
        assert len(keys) == shard_size, path


@pytest.mark.slow
def test_killed_build_resumes_to_identical_bytes(tmp_path):
    out = tmp_path / "killed"
    cmd = [
        CLI,
        "build",
        "--src",
        "synthetic",
        "--num",
        "96",
        "--size",
        "64",
        "--shard-size",
        "8",
        "--workers",
        "2",
        "--out",
        str(out),
        "--no-progress",
    ]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 300
    while not list(out.glob("semseg_gt/shard-*.json")):
        assert proc.poll() is None, proc.stderr.read().decode()
        assert time.time() < deadline, "no shard committed in time"
        time.sleep(0.02)
    workers = _children(proc.pid)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert len(workers) == 2
    deadline = time.time() + 120
    while any(_alive(w) for w in workers):  # orphaned workers notice and stop after their current sample
        assert time.time() < deadline, "pool workers outlived the killed build"
        time.sleep(0.05)
    done = len(list(out.glob("semseg_gt/shard-*.json")))
    assert 1 <= done < 12 and not (out / "manifest.json").exists()
    _assert_no_partial_tar(out, 8)

    resumed = subprocess.run(cmd, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    assert f"({12 - done} built, {done} kept from an earlier run)" in resumed.stdout
    assert not list(out.glob("*/*.tmp-*"))
    reference = tmp_path / "reference"
    build(open_source("synthetic", num=96, size=64), str(reference), shard_size=8, workers=2, progress=False)
    assert tar_bytes(out) == tar_bytes(reference)
    for m in MODALITIES:
        for stats in (out / m).glob("*.json"):
            ours, ref = json.loads(stats.read_text()), json.loads((reference / m / stats.name).read_text())
            assert (ours["count"], ours["keys_digest"], ours["bytes"]) == (
                ref["count"],
                ref["keys_digest"],
                ref["bytes"],
            )


@pytest.mark.parametrize(
    "manifest, why",
    [
        ({"name": "captions", "version": 2}, "format_version None is not 1"),
        ({"format_version": 1, "modalities": ["rgb"]}, "'modalities' must be an object"),
        ("not json {", "not valid JSON"),
    ],
)
def test_an_output_with_another_tools_manifest_is_refused_before_building(tmp_path, manifest, why):
    out = tmp_path / "out"
    out.mkdir()
    text = manifest if isinstance(manifest, str) else json.dumps(manifest)
    (out / "manifest.json").write_text(text)
    args = ["build", "--src", "synthetic", "--num", "4", "--size", "32", "--out", str(out), "--workers", "1"]
    res = subprocess.run([CLI, *args, "--no-progress"], capture_output=True, text=True, timeout=300)
    assert res.returncode == 2 and res.stderr.count("\n") == 1, res.stderr
    assert res.stderr.startswith(f"multimae-shard build: error: {out / 'manifest.json'}: ") and why in res.stderr
    assert res.stderr.endswith(f"--out {out} holds another tool's files: use an empty --out\n")
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json"]  # nothing written
    assert (out / "manifest.json").read_text() == text
