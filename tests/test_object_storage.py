"""Shard sets and training runs on a real S3 API (moto's server on 127.0.0.1, see conftest.py).

Every command with s3:// input and output: build (to S3, and from an S3 --root), verify, info, show, the
reader with readahead, the trainer (checkpoints, metrics.jsonl, pictures, predictions.zarr, resume); the
commit protocol (a tar without its stats json is never read, a killed build resumes byte-identically); the
output lock; the missing-backend error; storage options.
"""

from __future__ import annotations

import io
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
import torch
from PIL import Image
from test_train import PRETRAIN, TINY_FT

from shards import fs
from shards.build import build
from shards.cli import main as shard_main
from shards.format import read_manifest
from shards.lock import LOCK, LockHeld, holder_record, lock_url, output_lock
from shards.reader import ShardDataset, iter_shard
from shards.sources import open_source
from shards.verify import verify
from shards.writer import committed_shards, read_stats

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
MODS = ("rgb", "depth_gt", "semseg_gt")


def synth(out: str, num: int = 24, workers: int = 1) -> None:
    build(open_source("synthetic", num=num, size=48), out, shard_size=8, workers=workers, progress=False)


def objects(url: str) -> dict[str, bytes]:
    """Every file under a local folder or a remote prefix, by relative path."""
    return {f[len(url) + 1 :]: fs.read_bytes(f) for f in fs.find(url)}


def tars(url: str) -> dict[str, bytes]:
    return {k: v for k, v in objects(url).items() if k.endswith(".tar")}


def stats_without_duration(url: str) -> dict[str, dict]:
    out = {}
    for k, v in objects(url).items():
        if k.endswith(".json") and "/" in k:
            out[k] = {f: x for f, x in json.loads(v).items() if f not in ("duration_s", "producer")}
    return out


def no_endpoint(monkeypatch) -> None:
    """Point the environment's S3 endpoint at a closed loopback port and forget every S3 filesystem made so far:
    whatever works from here on got the endpoint from the storage options."""
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
    type(fs.filesystem("s3://any/x")[0]).clear_instance_cache()


def shard_cli(*args: str, capsys) -> tuple[int, str, str]:
    """multimae-shard in this process (the test's S3 environment applies); (exit code, stdout, stderr)."""
    with pytest.raises(SystemExit) as e:
        shard_main(list(args))
    out = capsys.readouterr()
    return e.value.code, out.out, out.err


# --- the commands -----------------------------------------------------------------------------------


def test_build_verify_info_show_on_s3_equal_the_local_build(s3_bucket, tmp_path, capsys):
    data = f"{s3_bucket}/data"
    code, out, _ = shard_cli(
        "build", "--src", "synthetic", "--num", "24", "--size", "48", "--shard-size", "8", "--workers", "2",
        "--out", data, "--no-progress", capsys=capsys,
    )  # fmt: skip
    assert code == 0 and "wrote 24 samples in 3 shards" in out
    local = str(tmp_path / "local")
    synth(local)
    assert tars(data) == tars(local) and len(tars(data)) == 9  # the same bytes, whole objects
    assert stats_without_duration(data) == stats_without_duration(local)
    assert not fs.exists(lock_url(data))  # released
    assert read_manifest(data)["total"] == 24

    code, out, _ = shard_cli("verify", data, "--deep", capsys=capsys)
    assert code == 0 and out.strip() == f"verify: {data} is complete and consistent"
    code, out, _ = shard_cli("info", data, capsys=capsys)
    assert code == 0 and "24" in out and "semseg_gt" in out
    code, out, _ = shard_cli("show", data, "--out", f"{data}-grid.png", "--n", "2", capsys=capsys)
    assert code == 0
    assert Image.open(io.BytesIO(fs.read_bytes(f"{data}-grid.png"))).format == "PNG"


def _image_tree(root: str) -> None:
    """Six small JPEGs in two classes, written through shards.fs (a local folder or an S3 prefix)."""
    rng = np.random.default_rng(0)
    for i in range(6):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 255, (40, 56, 3), dtype=np.uint8)).save(buf, "JPEG")
        fs.write_atomic(fs.join(root, f"n0000000{i % 2}", f"img_{i}.JPEG"), buf.getvalue())


def _wds_tars(root: str) -> None:
    """Two img2dataset-style tars (key.jpg + key.cls), written through shards.fs."""
    rng = np.random.default_rng(1)
    for t in range(2):
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w") as tar:
            for i in range(3):
                img = io.BytesIO()
                Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(img, "JPEG")
                for name, data in ((f"{t}{i:04d}.jpg", img.getvalue()), (f"{t}{i:04d}.cls", str(i).encode())):
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
        fs.write_atomic(fs.join(root, f"part-{t}.tar"), buf.getvalue())


@pytest.mark.parametrize("src", ["imagenet", "folder", "webdataset"])
def test_build_from_an_s3_root_equals_the_build_from_disk(s3_bucket, tmp_path, src):
    make = _wds_tars if src == "webdataset" else _image_tree
    remote, local = f"{s3_bucket}/in", str(tmp_path / "in")
    make(remote)
    make(local)
    for root, out in ((remote, f"{s3_bucket}/out"), (local, str(tmp_path / "out"))):
        build(open_source(src, root, size=32), out, shard_size=4, progress=False)
    assert read_manifest(f"{s3_bucket}/out")["total"] == 6
    assert tars(f"{s3_bucket}/out") == tars(str(tmp_path / "out"))


def test_reader_with_readahead_and_dataloader_workers_reads_what_disk_gives(s3_bucket, tmp_path):
    data, local = f"{s3_bucket}/data", str(tmp_path / "local")
    synth(data, num=40)
    synth(local, num=40)
    want = [(s["__key__"], s["depth_gt"].sum()) for n in range(5) for s in iter_shard(local, f"shard-00000{n}", MODS)]
    for readahead in (0, 1, 3):
        ds = ShardDataset(data, MODS, readahead=readahead)
        assert ds.readahead == readahead
        assert [(s["__key__"], s["depth_gt"].sum()) for s in ds] == want
    loader = torch.utils.data.DataLoader(ShardDataset(data, MODS, readahead=2), batch_size=None, num_workers=2)
    assert sorted(s["__key__"] for s in loader) == sorted(k for k, _ in want)
    assert ShardDataset(local, MODS, readahead=2).readahead == 0  # local disk: nothing to read ahead


def test_a_tar_without_its_stats_json_is_invisible(s3_bucket):
    data = f"{s3_bucket}/data"
    synth(data, num=16)
    # an uncommitted write of a shard no manifest lists (a killed job's, or a running one's): ignored
    fs.write_atomic(fs.join(data, "rgb", "shard-000007.tar"), b"half a tar")
    assert committed_shards(data, "rgb") == {"shard-000000", "shard-000001"}
    assert len(list(ShardDataset(data, MODS))) == 16
    assert verify(data) == []
    # a listed shard whose stats json is gone: never read, named as uncommitted
    fs.remove(fs.join(data, "depth_gt", "shard-000001.json"))
    (problem,) = verify(data)
    assert problem.file == fs.join(data, "depth_gt", "shard-000001.json")
    assert problem.what.startswith("stats json missing: the shard was never committed (its tar is not read)")
    with pytest.raises(Exception, match=r"depth_gt: shards \['shard-000001'\] missing or incomplete"):
        ShardDataset(data, MODS)


# --- killed build, resumed ------------------------------------------------------------------------


@pytest.mark.slow
def test_killed_build_on_s3_resumes_to_identical_bytes(s3_bucket, tmp_path):
    data = f"{s3_bucket}/killed"
    cmd = [str(BIN / "multimae-shard"), "build", "--src", "synthetic", "--num", "64", "--size", "48"]
    cmd += ["--shard-size", "4", "--workers", "1", "--no-progress", "--out", data]
    proc = subprocess.Popen(cmd, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.time() + 240
        while len(committed_shards(data, "semseg_gt")) < 3 and proc.poll() is None and time.time() < deadline:
            time.sleep(0.05)
        assert proc.poll() is None, "the build ended before it could be killed: " + proc.stderr.read().decode()
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert fs.exists(lock_url(data))  # left behind by the killed job
    assert not fs.exists(fs.join(data, "manifest.json"))  # written last
    for m in MODS:  # every committed tar is whole: its size and keys are the ones its stats json records
        for name in committed_shards(data, m):
            stats = read_stats(data, m, name)
            assert fs.size(fs.join(data, m, f"{name}.tar")) == stats["bytes"]
            assert sum(1 for _ in iter_shard(data, name, [m])) == stats["count"]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "taking over the stale lock of multimae-shard build" in res.stderr  # same host, its process gone
    assert "kept from an earlier run" in res.stdout and " 0 kept" not in res.stdout
    clean = str(tmp_path / "clean")
    build(open_source("synthetic", num=64, size=48), clean, shard_size=4, progress=False)
    assert tars(data) == tars(clean) and stats_without_duration(data) == stats_without_duration(clean)
    assert verify(data) == [] and not fs.exists(lock_url(data))


# --- the output lock ------------------------------------------------------------------------------


@pytest.mark.parametrize("where", ["local", "s3"])
def test_a_second_writer_stops_with_one_line_naming_the_lock(where, s3_bucket, tmp_path, capsys):
    data = f"{s3_bucket}/data" if where == "s3" else str(tmp_path / "data")
    with output_lock(data, "multimae-label") as record:
        code, _, err = shard_cli("build", "--src", "synthetic", "--num", "8", "--out", data, capsys=capsys)
        assert code == 2 and len(err.strip().splitlines()) == 1
        assert f"{lock_url(data)} is held by multimae-label (pid {os.getpid()}" in err
        assert record["owner"] in err and f"`multimae-shard unlock {data}`" in err
        with pytest.raises(LockHeld):
            with output_lock(data, "multimae-shard build"):
                pass
    assert not fs.exists(lock_url(data))  # released: the next job goes ahead
    synth(data, num=8)
    assert verify(data) == []


def test_two_builds_started_together_one_fails_clearly_the_other_completes(s3_bucket):
    data = f"{s3_bucket}/data"
    cmd = [str(BIN / "multimae-shard"), "build", "--src", "synthetic", "--num", "16", "--size", "32"]
    cmd += ["--shard-size", "4", "--workers", "1", "--no-progress", "--out", data]
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    results = sorted((p.wait(timeout=300), p.stderr.read()) for p in procs)
    assert [code for code, _ in results] == [0, 2], results
    assert f"{lock_url(data)} is held by multimae-shard build" in results[1][1]
    assert verify(data) == [] and read_manifest(data)["total"] == 16


def test_a_lock_left_on_another_host_is_cleared_with_unlock(s3_bucket, capsys):
    data = f"{s3_bucket}/data"
    stale = {**holder_record("multimae-label"), "host": "node-7", "boot_id": "elsewhere"}
    fs.write_atomic(lock_url(data), fs.dumps_json(stale))
    code, _, err = shard_cli("build", "--src", "synthetic", "--num", "8", "--out", data, capsys=capsys)
    assert code == 2 and "is held by multimae-label (pid" in err and "on node-7" in err
    code, out, _ = shard_cli("unlock", data, capsys=capsys)
    assert code == 0 and f"removed {lock_url(data)} of multimae-label" in out
    code, _, _ = shard_cli("build", "--src", "synthetic", "--num", "8", "--out", data, "--no-progress", capsys=capsys)
    assert code == 0


def test_a_local_lock_of_a_running_job_cannot_be_unlocked(tmp_path, capsys):
    data = str(tmp_path / "data")
    with output_lock(data, "multimae-shard build"):
        code, _, err = shard_cli("unlock", data, capsys=capsys)
        assert code == 2 and "is held by multimae-shard build" in err
    assert not (tmp_path / "data" / LOCK).exists()
    code, out, _ = shard_cli("unlock", data, capsys=capsys)
    assert code == 0 and out.strip() == f"unlock: {data} has no lock"


# --- errors and settings --------------------------------------------------------------------------


def test_a_missing_backend_is_one_line_naming_the_extra(tmp_path):
    """s3fs / gcsfs hidden (a module that fails to import, as when the extra is not installed)."""
    for module in ("s3fs", "gcsfs"):
        (tmp_path / module).mkdir()
        (tmp_path / module / "__init__.py").write_text(f'raise ImportError("No module named {module}")\n')
    env = dict(os.environ, PYTHONPATH=f"{tmp_path}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    for url, extra in (("s3://bucket/DATA", "s3"), ("gs://bucket/DATA", "gcs")):
        res = subprocess.run([str(BIN / "multimae-shard"), "info", url], env=env, capture_output=True, text=True)
        assert res.returncode == 2
        assert res.stderr == (
            f"multimae-shard info: error: {url}/manifest.json needs the {extra} extra: "
            f"pip install 'multimae-toolkit[{extra}]'\n"
        )
    res = subprocess.run(
        [
            str(BIN / "multimae-train"),
            "--shards",
            "s3://bucket/DATA",
            "--config",
            str(REPO / "pipelines" / "pretrain-demo.yaml"),
        ],
        env=env,
        capture_output=True,
        text=True,
    )
    assert res.returncode == 2 and res.stderr.strip().endswith("needs the s3 extra: pip install 'multimae-toolkit[s3]'")
    assert len(res.stderr.strip().splitlines()) == 1


def test_storage_options_reach_the_filesystem(s3_bucket, moto_endpoint, monkeypatch, capsys):
    data = f"{s3_bucket}/data"
    synth(data, num=8)
    no_endpoint(monkeypatch)  # from here on only the options know the endpoint
    options = json.dumps({"endpoint_url": moto_endpoint})
    code, out, _ = shard_cli("verify", data, "--storage-options", options, capsys=capsys)
    assert code == 0 and "complete and consistent" in out
    code, _, err = shard_cli("verify", data, "--storage-options", "[1, 2]", capsys=capsys)
    assert code == 2 and err.strip() == (
        "multimae-shard verify: error: --storage-options: expected a JSON object of keyword arguments, got list"
    )
    try:
        fs.set_storage_options({"endpoint_url": moto_endpoint})
        ds = ShardDataset(data, MODS, readahead=1)
    finally:
        fs.set_storage_options(None)
    loader = torch.utils.data.DataLoader(ds, batch_size=None, num_workers=1)  # the options travel with it
    assert len(list(loader)) == 8


# --- training ---------------------------------------------------------------------------------------

RUN = [*PRETRAIN, "data.num_workers=1", "log.sample_keys=true", "log.image_every=2", "log.tensorboard=true"]


def _cfg(name: str, overrides: list[str]):
    from multimae.train.config import load_run_config

    return load_run_config(str(REPO / "pipelines" / name), overrides)


def _metrics(url: str) -> list[dict]:
    return [json.loads(line) for line in fs.read_bytes(fs.join(url, "metrics.jsonl")).decode().splitlines()]


def test_training_on_s3_resumes_exactly_and_logs_every_step_once(s3_bucket, tmp_path, one_thread):
    from multimae.train.main import run

    data = f"{s3_bucket}/data"
    synth(data, num=24)
    cfg = _cfg("pretrain-demo.yaml", [*RUN, "train.steps=6", "train.checkpoint_every=2", "train.keep_checkpoints=true"])
    straight = run(cfg, data, str(tmp_path / "straight"))
    out = f"{s3_bucket}/runs/pre"
    first = run(cfg, data, out, stop_at=4)
    assert first["steps"] == 4 and first["checkpoint"] == f"{out}/checkpoint.pt"
    # as if killed after logging step 4 but before its checkpoint: the newest checkpoint is step 2's
    fs.write_atomic(f"{out}/checkpoint.pt", fs.read_bytes(f"{out}/checkpoint-00000002.pt"))
    second = run(cfg, data, out)
    assert second["resumed_from"] == 2 and second["weights_digest"] == straight["weights_digest"]
    assert [m["step"] for m in _metrics(out)] == [1, 2, 3, 4, 5, 6]  # steps 3, 4 logged once, not twice
    local = {m["step"]: m["loss/total"] for m in _metrics(str(tmp_path / "straight"))}
    assert {m["step"]: m["loss/total"] for m in _metrics(out)} == pytest.approx(local, abs=1e-6)
    keys = fs.read_bytes(f"{out}/keys-rank0.txt").decode().splitlines()
    assert sorted({int(line.split("\t")[0]) for line in keys}) == list(range(6)) and len(keys) == 6 * 8
    assert keys == (tmp_path / "straight" / "keys-rank0.txt").read_text().splitlines()
    files = set(objects(out))
    assert {"config.json", "summary.json", "reconstructions/step-00000006.png"} <= files
    assert any(f.startswith("tb/events.out.tfevents") for f in files)
    assert second["reconstructions"] == f"{out}/reconstructions/step-00000006.png"


def test_finetune_and_eval_only_write_predictions_zarr_to_s3(s3_bucket, tmp_path, one_thread, monkeypatch):
    import zarr

    from multimae.train.main import run

    data = f"{s3_bucket}/data"
    synth(data, num=16)
    endpoint = os.environ["AWS_ENDPOINT_URL"]
    no_endpoint(monkeypatch)  # the run config's data.storage_options carries it
    over = [
        *TINY_FT,
        "model.patch_size=8",
        "data.image_size=32",
        "data.eval_num_shards=1",
        "data.num_workers=1",
        "train.batch_size=4",
        "train.steps=2",
        "train.warmup_steps=1",
        "model.head_dim=32",
        f"data.storage_options={{endpoint_url: '{endpoint}'}}",
    ]
    out = f"{s3_bucket}/runs/seg"
    trained = run(_cfg("finetune-demo-semseg.yaml", over), data, out, save_predictions=True)
    again = run(_cfg("finetune-demo-semseg.yaml", over), data, out, eval_only=True, save_predictions=True)
    assert again == pytest.approx(trained["eval"])
    try:
        fs.set_storage_options({"endpoint_url": endpoint})
        record = fs.read_json(f"{out}/eval.json")
        saved = torch.load(io.BytesIO(fs.read_bytes(f"{out}/checkpoint.pt")), weights_only=True)
        local = tmp_path / "predictions.zarr"
        for name, blob in objects(f"{out}/predictions.zarr").items():
            (local / name).parent.mkdir(parents=True, exist_ok=True)
            (local / name).write_bytes(blob)
    finally:
        fs.set_storage_options(None)
    assert record["step"] == 2 and record["metrics"] == pytest.approx(trained["eval"])
    assert "storage_options" not in saved["config"]["data"]  # how to reach the storage is not part of the run
    store = zarr.open_group(str(local), mode="r")
    assert store["pred"].shape == (8, 32, 32) and len(store["keys"][:]) == 8
