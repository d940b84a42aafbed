"""The `multimae-shard` console script: build / info / show / verify output and exit codes."""

from __future__ import annotations

import shutil
import subprocess
import sys
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from shards import synthetic
from shards.cli import main

CLI = str(Path(sys.executable).with_name("multimae-shard"))


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([CLI, *args], capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("cli") / "data"
    res = run(
        "build",
        "--src",
        "synthetic",
        "--num",
        "12",
        "--size",
        "64",
        "--shard-size",
        "5",
        "--workers",
        "2",
        "--out",
        str(out),
    )
    assert res.returncode == 0, res.stderr
    assert f"wrote 12 samples in 3 shards to {out} (3 built, 0 kept from an earlier run), skipped 0," in res.stdout
    assert "12/12" in res.stderr  # the progress bar reached the end
    return out


def test_info_summarises_modalities_and_classes(data, capsys):
    main_exit(["info", str(data)], 0)
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith(f"{data}: 12 samples in 3 shards (format 1,")
    rows = {ln.split()[0]: ln.split() for ln in lines[2:6]}
    assert rows["modality"][:4] == ["modality", "kind", "shards", "samples"]
    for m, kind in (("rgb", "rgb"), ("depth_gt", "depth"), ("semseg_gt", "semseg")):
        assert rows[m][1:4] == [kind, "3/3", "12"]
    scenes = [synthetic.render_scene(0, i, 64) for i in range(12)]
    truth = Counter(synthetic.CLS_CLASSES[s["cls"]] for s in scenes)
    start = lines.index(f"cls histogram (12 samples, {len(truth)} classes):")
    shown = {ln.split()[0]: int(ln.split()[1]) for ln in lines[start + 1 : start + 1 + len(truth)]}
    assert shown == dict(truth)
    pixels = np.bincount(np.concatenate([s["semseg_gt"].ravel() for s in scenes]))
    share = {synthetic.SEMSEG_CLASSES[c]: f"{100 * n / pixels.sum():.1f}%" for c, n in enumerate(pixels) if n}
    start = lines.index("semseg_gt pixel share by class (first 12 samples):")
    shown = {ln.split()[0]: ln.split()[1] for ln in lines[start + 1 : start + 1 + len(share)]}
    assert shown == share


def test_show_draws_one_row_per_sample(data, tmp_path, capsys):
    main_exit(["show", str(data), "--out", str(tmp_path / "grid.png"), "--n", "2"], 0)
    assert capsys.readouterr().out.strip() == f"show: 2 samples -> {tmp_path / 'grid.png'}"
    with Image.open(tmp_path / "grid.png") as im:
        assert im.size == (780, 610)  # 3 columns x 2 rows of 2.6 in + legend, at 100 dpi
        assert len(np.unique(np.asarray(im.convert("RGB")).reshape(-1, 3), axis=0)) > 500


def test_show_by_key_and_unknown_key(data, tmp_path, capsys):
    key = synthetic.scene_key(0, 7)
    main_exit(
        ["show", str(data), "--out", str(tmp_path / "k.png"), "--keys", key, "--modalities", "rgb", "semseg_gt"], 0
    )
    assert capsys.readouterr().out.strip() == f"show: 1 samples -> {tmp_path / 'k.png'}"
    with Image.open(tmp_path / "k.png") as im:
        assert im.size == (520, 350)
    main_exit(["show", str(data), "--out", str(tmp_path / "x.png"), "--keys", "nope"], 2)
    assert "no sample with key 'nope'" in capsys.readouterr().err


def test_verify_passes_then_reports_a_truncated_shard(data, tmp_path, capsys):
    main_exit(["verify", str(data)], 0)
    assert capsys.readouterr().out == f"verify: {data} is complete and consistent\n"
    broken = tmp_path / "broken"
    shutil.copytree(data, broken)
    tar = broken / "semseg_gt" / "shard-000001.tar"
    with tarfile.open(tar) as t:
        third = t.getmembers()[2]
    tar.write_bytes(tar.read_bytes()[: third.offset_data + third.size // 2])  # cut inside the 3rd sample
    res = run("verify", str(broken))
    assert res.returncode == 1
    assert str(tar) in res.stdout and "Traceback" not in res.stderr


def main_exit(argv: list[str], code: int) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == code


def test_user_errors_exit_2_with_one_line(tmp_path, capsys, data):
    res = run("build", "--src", "imagenet", "--root", str(tmp_path / "missing"), "--out", str(tmp_path / "o"))
    assert (res.returncode, res.stderr) == (
        2,
        f"multimae-shard build: error: source root {tmp_path / 'missing'} does not exist\n",
    )
    (tmp_path / "empty").mkdir()
    res = run("build", "--src", "folder", "--root", str(tmp_path / "empty"), "--out", str(tmp_path / "o"))
    assert res.returncode == 2 and res.stderr.startswith("multimae-shard build: error: no image files")
    res = run("build", "--src", "flickr", "--out", str(tmp_path / "o"))
    assert res.returncode == 2 and "invalid choice: 'flickr'" in res.stderr

    main_exit(
        [
            "build",
            "--src",
            "synthetic",
            "--num",
            "12",
            "--size",
            "64",
            "--shard-size",
            "5",
            "--seed",
            "3",
            "--out",
            str(data),
            "--no-progress",
        ],
        2,
    )
    err = capsys.readouterr().err
    assert err.startswith("multimae-shard build: error: ") and "use a new --out" in err and err.count("\n") == 1
    main_exit(["info", str(tmp_path / "empty")], 2)
    assert "manifest.json not found" in capsys.readouterr().err
    main_exit(["show", str(data), "--out", str(tmp_path / "x.png"), "--modalities", "depth"], 2)
    assert "has no modality 'depth'" in capsys.readouterr().err
