"""The Ray labeling job end to end: real Ray, the shipped transformers teachers, real shards on disk.

One local Ray instance serves the module. The reference run labels 200 synthetic scenes in 4 shards;
the other tests compare their output bytes against it (kill and resume, actor crash, re-run).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import ray
import torch

from labeling.config import ConfigError, LabelConfig, RayConfig, check_inputs
from labeling.config import load_label_config as load_config
from labeling.job import run
from shards.format import encode_sample, read_manifest, shard_name, update_manifest
from shards.reader import iter_shard, iter_shard_members
from shards.synthetic import render_scene, scene_key
from shards.writer import ShardWriter

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
SHARDS, PER_SHARD = 4, 50
OUT_MODS = ("depth", "semseg")


def make_rgb_set(
    root: Path, shards: int = SHARDS, per_shard: int = PER_SHARD, size: int = 64, corrupt: set[str] = frozenset()
) -> list[list[str]]:
    """An rgb-only shard set of synthetic scenes (every 5th image 48x64, to check resizing back); keys per shard."""
    keys = []
    for s in range(shards):
        with ShardWriter(str(root), shard_name(s), ["rgb"], producer={"source": "synthetic"}) as w:
            keys.append([])
            for i in range(per_shard):
                idx = s * per_shard + i
                img = render_scene(7, idx, size=size)["rgb"]
                if i % 5 == 4:
                    img = np.ascontiguousarray(img[8:56])  # (48, 64, 3)
                key = scene_key(7, idx)
                member = encode_sample("rgb", img)
                if key in corrupt:
                    member = {"rgb.jpg": member["rgb.jpg"][:200]}  # truncated JPEG
                w.write(key, {"rgb": member})
                keys[-1].append(key)
    update_manifest(
        str(root),
        {
            "rgb": {
                "kind": "rgb",
                "ext": "jpg",
                "dtype": "uint8",
                "meaning": "srgb",
                "producer": {"source": "synthetic"},
            }
        },
        shards=[{"name": shard_name(s), "count": per_shard} for s in range(shards)],
        cls_classes=None,
    )
    return keys


def config(data: Path, **kw) -> LabelConfig:
    cfg = load_config(str(REPO / "pipelines" / "pseudolabel.yaml"), [f"input={data}", "progress=false"])
    for k, v in kw.items():
        setattr(cfg, k, v)
    return cfg


def output_files(root: Path, mods: tuple[str, ...] = OUT_MODS) -> dict[str, bytes]:
    """Every output tar, and every stats json without its duration, by relative path."""
    files = {}
    for mod in mods:
        for p in sorted((root / mod).iterdir()):
            data = p.read_bytes()
            if p.suffix == ".json":
                data = b"\n".join(line for line in data.splitlines() if b'"duration_s"' not in line)
            files[f"{mod}/{p.name}"] = data
    return files


@pytest.fixture(scope="module")
def ray_local(tmp_path_factory):
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def rgb_set(tmp_path_factory) -> tuple[Path, list[list[str]]]:
    root = tmp_path_factory.mktemp("rgb") / "data"
    return root, make_rgb_set(root)


@pytest.fixture(scope="module")
def reference(ray_local, rgb_set, tmp_path_factory) -> tuple[Path, dict]:
    src, _ = rgb_set
    data = tmp_path_factory.mktemp("ref") / "data"
    shutil.copytree(src, data)
    events = []
    summary = run(config(data), on_event=events.append)
    return data, {"summary": summary, "events": events}


def copy_input(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns(*OUT_MODS))
    return dst


# --- end to end -------------------------------------------------------------------------------------


def test_end_to_end_aligned_outputs(reference, rgb_set):
    data, ref = reference
    _, keys = rgb_set
    s = ref["summary"]
    assert (s["shards_total"], s["shards_labeled"], s["samples_labeled"]) == (SHARDS, SHARDS, SHARDS * PER_SHARD)
    assert s["shards_failed"] == {} and s["samples_skipped"] == [] and s["manifest_updated"]
    done = [e for e in ref["events"] if e["event"] == "shard_done"]
    assert [e["done"] for e in done] == [1, 2, 3, 4] and done[-1]["samples"] == SHARDS * PER_SHARD

    verify = subprocess.run([str(BIN / "multimae-shard"), "verify", str(data)], capture_output=True, text=True)
    assert verify.returncode == 0, verify.stdout + verify.stderr

    manifest = read_manifest(str(data))
    from labeling.teachers import DEFAULT_TEACHERS

    assert manifest["modalities"]["depth"]["producer"]["model"] == str(DEFAULT_TEACHERS["depth"])
    assert manifest["modalities"]["semseg"]["classes"][0] and manifest["modalities"]["semseg"]["kind"] == "semseg"
    assert manifest["modalities"]["depth"]["dtype"] == "uint16"
    n_classes = len(manifest["modalities"]["semseg"]["classes"])
    for s_idx in range(SHARDS):
        samples = list(iter_shard(str(data), shard_name(s_idx), ["rgb", *OUT_MODS]))
        assert [x["__key__"] for x in samples] == keys[s_idx]  # same keys, same order
        for x in samples:
            h, w = x["rgb"].shape[:2]
            assert x["depth"].shape == (h, w) and x["depth"].dtype == np.float32 and np.isfinite(x["depth"]).all()
            assert x["semseg"].shape == (h, w) and x["semseg"].max() < n_classes
        # a pseudo-label is informative: depth varies and more than one class is predicted somewhere
        assert np.std(np.stack([x["depth"][:48] for x in samples])) > 0
        assert len(np.unique(np.concatenate([x["semseg"].ravel() for x in samples]))) > 1


def test_normals_from_the_depth_teacher_are_aligned_and_resumable(ray_local, tmp_path):
    """Depth and normals from one depth teacher: normals decode, match the rgb keys and images, pass verify; a
    lost normals shard is re-made byte-identically (its depth now computed for the normals alone), depth untouched."""
    import torch

    from labeling.teachers import DEFAULT_TEACHERS, load_teacher

    data = tmp_path / "data"
    keys = make_rgb_set(data, shards=2, per_shard=12)
    cfg = load_config(
        str(REPO / "pipelines" / "pseudolabel.yaml"),
        [f"input={data}", "progress=false", "actors=1", "batch_size=8", "teachers.semseg=null",
         "teachers.depth.dtype=float32", "teachers.normals.from=depth"],
    )  # fmt: skip
    summary = run(cfg)
    assert summary["manifest_updated"] and summary["samples_labeled"] == 24 and summary["shards_failed"] == {}
    verify = subprocess.run([str(BIN / "multimae-shard"), "verify", str(data)], capture_output=True, text=True)
    assert verify.returncode == 0, verify.stdout + verify.stderr
    entry = read_manifest(str(data))["modalities"]["normals"]
    producer = entry["producer"]
    assert (entry["kind"], entry["meaning"], producer["fov_deg"], producer["depth_meaning"]) == (
        "normals", "camera_normals", 60.0, "metric_m",
    )  # fmt: skip
    teacher = load_teacher("normals", DEFAULT_TEACHERS["depth"], dtype="float32")
    for s_idx, shard_keys in enumerate(keys):
        samples = list(iter_shard(str(data), shard_name(s_idx), ["rgb", "depth", "normals"]))
        assert [x["__key__"] for x in samples] == shard_keys
        expected = teacher([torch.from_numpy(x["rgb"].copy()) for x in samples])
        for x, want in zip(samples, expected):
            n = x["normals"]
            assert n.shape == (*x["rgb"].shape[:2], 3) and n.dtype == np.float32
            length = np.linalg.norm(n, axis=-1)
            assert ((np.abs(length - 1) < 1e-3) | (length == 0)).all() and (length > 0).mean() > 0.99
            # the normals of this very image, up to 8-bit storage (about half a degree)
            angle = np.degrees(np.arccos(np.clip((n * want.numpy()).sum(-1), -1, 1)))
            assert angle[length > 0].mean() < 1.0
    before = output_files(data, ("depth", "normals"))
    (data / "normals" / "shard-000001.json").unlink()
    (data / "normals" / "shard-000001.tar").unlink()
    summary = run(cfg)
    assert summary["shards_labeled"] == 1 and summary["shards_already_complete"] == 1
    assert output_files(data, ("depth", "normals")) == before


def test_rerun_skips_committed_shards_and_redoes_only_missing(reference, tmp_path):
    data, _ = reference
    work = tmp_path / "data"
    shutil.copytree(data, work)
    before = output_files(work)
    summary = run(config(work, actors=1))
    assert summary["shards_labeled"] == 0 and summary["shards_already_complete"] == SHARDS
    (work / "depth" / "shard-000002.json").unlink()  # as if killed between the tar rename and its stats
    (work / "depth" / "shard-000002.tar").unlink()
    summary = run(config(work, actors=1))
    assert summary["shards_labeled"] == 1 and summary["shards_already_complete"] == SHARDS - 1
    assert output_files(work) == before  # the one shard re-made byte-identical, semseg untouched


class FrozenActor:
    """A job `on_event` hook that freezes (SIGSTOP) the actor `pick(actors)` at `actors_ready`, before any shard
    is dispatched, and sets `given` once a shard is handed to it: that shard provably cannot finish."""

    def __init__(self, pick: Callable[[list[dict]], dict]):
        self.pick, self.events, self.pid, self.given = pick, [], None, threading.Event()

    def __call__(self, event: dict) -> None:
        self.events.append(event)
        if event["event"] == "actors_ready":
            self.pid = self.pick(event["actors"])["pid"]
            os.kill(self.pid, signal.SIGSTOP)
        elif event["event"] == "shard_started" and event["pid"] == self.pid:
            self.given.set()

    def started(self) -> dict:
        """The one `shard_started` event of the frozen actor."""
        (event,) = [e for e in self.events if e["event"] == "shard_started" and e["pid"] == self.pid]
        return event

    def kill(self) -> None:
        """SIGKILL the frozen process (a stopped process cannot exit by itself)."""
        if self.pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGKILL)


@pytest.mark.slow
def test_actor_killed_mid_shard_is_retried(reference, rgb_set, tmp_path):
    """Actor 0 is frozen (SIGSTOP) before the first shard is handed out and killed once it holds one, so its
    shard is provably in flight when it dies, whatever the machine's load."""
    ref_data, _ = reference
    data = copy_input(rgb_set[0], tmp_path / "data")
    frozen, result = FrozenActor(lambda actors: actors[0]), {}
    cfg = config(data, shards=["shard-000000", "shard-000001"])
    thread = threading.Thread(target=lambda: result.update(run(cfg, on_event=frozen)))
    thread.start()
    try:
        assert frozen.given.wait(timeout=400), "no shard was handed to the frozen actor"
        started = frozen.started()
        for mod in OUT_MODS:  # what the actor would have left, had it died while writing: the retry removes it
            (data / mod).mkdir(exist_ok=True)
            (data / mod / f"{started['shard']}.tar.tmp-{frozen.pid}").write_bytes(b"half a tar")
    finally:
        frozen.kill()
    thread.join(timeout=400)
    assert not thread.is_alive()
    assert result["shards_failed"] == {} and result["retries"] >= 1
    events = frozen.events
    assert started["shard"] in {e["shard"] for e in events if e["event"] == "shard_retry"}
    ref = output_files(ref_data)
    assert output_files(data) == {
        k: v for k, v in ref.items() if k.split("/")[1].split(".")[0] in ("shard-000000", "shard-000001")
    }
    assert not [p for mod in OUT_MODS for p in (data / mod).iterdir() if ".tmp-" in p.name]


def test_host_threads_change_no_byte_of_the_output(reference, rgb_set, tmp_path):
    """decode_threads / encode_threads > 1 (the GPU default) give exactly the one-thread output, skips included."""
    from labeling.job import ShardLabeler, stage_threads

    ref, _ = reference
    data = copy_input(rgb_set[0], tmp_path / "data")
    cfg = config(data, decode_threads=3, encode_threads=2)
    assert stage_threads(cfg, "cpu") == (3, 2) and stage_threads(config(data), "cpu") == (1, 1)
    labeler = ShardLabeler(cfg)
    for name in ("shard-000000", "shard-000001"):
        labeler.label_shard(name, list(OUT_MODS))
    got = output_files(data)
    assert got == {k: v for k, v in output_files(ref).items() if k in got} and len(got) == 2 * len(OUT_MODS) * 2
    bad = tmp_path / "bad"
    skipped = scene_key(7, 13)
    make_rgb_set(bad, shards=1, per_shard=24, corrupt={skipped})
    ShardLabeler(config(bad, decode_threads=4, encode_threads=3, batch_size=5)).label_shard("shard-000000", ["depth"])
    stats = json.loads((bad / "depth" / "shard-000000.json").read_text())
    assert stats["count"] == 23 and [s["ref"] for s in stats["skipped"]] == [skipped]
    keys = [x["__key__"] for x in iter_shard_members(str(bad), "shard-000000", ["depth"])]
    assert keys == [scene_key(7, i) for i in range(24) if i != 13]  # in key order


def test_corrupt_sample_is_recorded_and_skipped(ray_local, tmp_path):
    data = tmp_path / "data"
    bad = scene_key(7, 13)
    keys = make_rgb_set(data, shards=1, per_shard=24, corrupt={bad})[0]
    summary = run(config(data, batch_size=8, actors=1))
    assert summary["samples_labeled"] == 23 and summary["shards_failed"] == {}
    assert [(s["ref"], s["shard"]) for s in summary["samples_skipped"]] == [(bad, "shard-000000")]
    assert "decode rgb" in summary["samples_skipped"][0]["reason"]
    for mod in OUT_MODS:
        stats = json.loads((data / mod / "shard-000000.json").read_text())
        assert stats["count"] == 23 and [s["ref"] for s in stats["skipped"]] == [bad]
    got = [x["__key__"] for x in iter_shard_members(str(data), "shard-000000", list(OUT_MODS))]
    assert got == [k for k in keys if k != bad]  # the two outputs stay aligned with each other
    # the recorded gap is not a misalignment: verify flags only the corrupt input member itself
    from shards.verify import verify

    assert [(p.key, "rgb" in p.file) for p in verify(str(data))] == [(bad, True)]


# --- kill the driver and resume ---------------------------------------------------------------------


def _kill_ray_of(needle: str) -> None:
    """SIGKILL the process groups of every process whose command line mentions `needle` (our temp dir)."""
    groups = set()
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            if needle in Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace"):
                groups.add(os.getpgid(int(pid)))
        except OSError:
            continue
    for g in groups - {os.getpgid(0)}:
        os.killpg(g, signal.SIGKILL)


@pytest.mark.slow
def test_sigkill_driver_then_rerun_equals_uninterrupted_run(reference, rgb_set, tmp_path):
    ref_data, _ = reference
    data = copy_input(rgb_set[0], tmp_path / "data")
    ray_tmp = Path(f"/tmp/mml-{os.getpid()}")  # short: Ray's socket paths must fit in 107 bytes
    env = dict(os.environ, RAY_TMPDIR=str(ray_tmp), RAY_AUTH_MODE="disabled")
    cmd = [
        str(BIN / "multimae-label"),
        str(REPO / "pipelines" / "pseudolabel.yaml"),
        f"input={data}",
        "ray.address=local",
        "ray.num_cpus=2",
    ]
    proc = subprocess.Popen(cmd, env=env, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.time() + 300
        while time.time() < deadline and proc.poll() is None:
            if len(list((data / "semseg").glob("*.json"))) >= 1:
                break
            time.sleep(0.05)
        assert proc.poll() is None, "the job ended before it could be killed: " + proc.stderr.read().decode()[-2000:]
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    finally:
        _kill_ray_of(str(ray_tmp))
        shutil.rmtree(ray_tmp, ignore_errors=True)
    committed = sorted(p.stem for p in (data / "semseg").glob("*.json"))
    assert 1 <= len(committed) < SHARDS
    assert "depth" not in read_manifest(str(data))["modalities"]
    for mod in OUT_MODS:  # whatever has a final name is a whole tar; nothing half-written is visible
        for tar in (data / mod).glob("*.tar"):
            with tarfile.open(tar) as t:
                assert len(t.getmembers()) > 0
    summary = run(config(data))
    assert summary["shards_already_complete"] >= len(committed) - 1 and summary["manifest_updated"]
    assert output_files(data) == output_files(ref_data)  # byte-identical to the uninterrupted run
    assert not [p for mod in OUT_MODS for p in (data / mod).iterdir() if ".tmp-" in p.name]


# --- config errors ----------------------------------------------------------------------------------


def write_cfg(tmp_path: Path, text: str) -> str:
    path = tmp_path / "cfg.yaml"
    path.write_text(text)
    return str(path)


def test_shipped_config_loads_with_overrides(rgb_set):
    data, _ = rgb_set
    cfg = load_config(
        str(REPO / "pipelines" / "pseudolabel.yaml"),
        [f"input={data}", "batch_size=4", "teachers.semseg=null", "ray.address=local"],
    )
    assert cfg.batch_size == 4 and list(cfg.teachers) == ["depth"] and cfg.ray == RayConfig(address="local")
    assert cfg.teachers["depth"].model == "default" and cfg.output_root == str(data)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["colour=red"], "override 'colour=red': colour: unknown key"),
        (["teachers.depth.weights=x"], "teachers.depth.weights: unknown key"),
        (["teachers.depth.kind=semseg"], "output modality 'depth' is of kind 'depth'"),
        (["batch_size=0"], "override 'batch_size=0': batch_size: must be >= 1"),
        (["batch_size=many"], "batch_size: expected an integer, got 'many'"),
        (["device=tpu"], "device: must be one of"),
        (["teachers.depth.model.path=x"], "teachers.depth.model is 'default', not a section"),
        (["teachers.depth.resolution=[0, 3]"], "teachers.depth.resolution: a positive size or [height, width]"),
        (["batch_size"], "expected key=value"),
    ],
)
def test_bad_config_names_the_key(rgb_set, overrides, message):
    data, _ = rgb_set
    with pytest.raises(ConfigError) as err:
        load_config(str(REPO / "pipelines" / "pseudolabel.yaml"), [f"input={data}", *overrides])
    assert message in str(err.value)


def test_config_types_follow_the_schema(rgb_set):
    data, _ = rgb_set
    cfg = load_config(
        str(REPO / "pipelines" / "pseudolabel.yaml"),
        [f"input={data}", "teachers.depth.resolution=[384, 384]", "cpus_per_actor=1e-1", "ray.num_cpus=2"],
    )
    assert cfg.teachers["depth"].resolution == [384, 384] and cfg.cpus_per_actor == 0.1
    assert load_config(str(REPO / "pipelines" / "pseudolabel.yaml"), ["cpus_per_actor='2.5e0'"]).cpus_per_actor == 2.5


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["teachers.depth.model=/nonexistent/dpt"], "teachers.depth.model: weights folder /nonexistent/dpt"),
        (["teachers.semseg.model=nobody/no-such-model"], "not in the local Hugging Face cache"),
        (["shards=[shard-000099]"], "shards: shard-000099 is not in"),
    ],
)
def test_checks_that_read_files_run_when_the_job_starts(rgb_set, overrides, message):
    data, _ = rgb_set
    cfg = load_config(str(REPO / "pipelines" / "pseudolabel.yaml"), [f"input={data}", *overrides])  # no I/O here
    with pytest.raises(ConfigError) as err:
        check_inputs(cfg)
    assert message in str(err.value)


def test_a_semseg_model_as_depth_teacher_is_refused_before_ray_starts(rgb_set):
    data, _ = rgb_set
    from labeling.teachers import DEFAULT_TEACHERS

    cfg = load_config(
        str(REPO / "pipelines" / "pseudolabel.yaml"),
        [f"input={data}", f"teachers.depth.model={DEFAULT_TEACHERS['semseg']}"],
    )
    with pytest.raises(ConfigError, match="'mask2former' model .* is not a depth model"):
        check_inputs(cfg)


def test_synthetic_teachers_on_other_data_warn_in_one_line(rgb_set, tmp_path):
    data = copy_input(rgb_set[0], tmp_path / "data")
    cfg = load_config(str(REPO / "pipelines" / "pseudolabel.yaml"), [f"input={data}"])
    assert check_inputs(cfg) == []  # synthetic teachers on synthetic scenes
    manifest = json.loads((data / "manifest.json").read_text())
    manifest["modalities"]["rgb"]["producer"]["source"] = "imagenet"
    (data / "manifest.json").write_text(json.dumps(manifest))
    warnings = check_inputs(cfg)
    assert len(warnings) == 2 and all("trained on synthetic data only and the input is imagenet" in w for w in warnings)
    assert "\n" not in warnings[0]


def test_missing_input_shards(rgb_set, tmp_path):
    cfg = load_config(str(REPO / "pipelines" / "pseudolabel.yaml"), [f"input={tmp_path / 'nothing'}"])
    with pytest.raises(ConfigError, match=r"input: .*manifest\.json not found.*multimae-shard build"):
        check_inputs(cfg)
    data = copy_input(rgb_set[0], tmp_path / "data")
    (data / "rgb" / "shard-000001.json").unlink()
    with pytest.raises(ConfigError, match=r"rgb/shard-000001\.tar is missing or incomplete"):
        check_inputs(load_config(str(REPO / "pipelines" / "pseudolabel.yaml"), [f"input={data}"]))


def test_cli_reports_bad_config_in_one_line(tmp_path):
    cfg = write_cfg(tmp_path, "input: /nonexistent\nbatchsize: 3\n")
    res = subprocess.run([str(BIN / "multimae-label"), cfg], capture_output=True, text=True, timeout=300)
    assert res.returncode == 2
    assert (
        res.stderr.strip() == f"multimae-label: error: config: {cfg}: batchsize: unknown key (known: "
        f"{', '.join(LabelConfig.__dataclass_fields__)})"
    )


def test_decode_device_selection_and_the_batched_decode_path(rgb_set, tmp_path):
    """decode_device: auto is the CPU for CPU actors, cuda is refused there; the deferred path (headers checked
    in the reader, JPEGs decoded in one batched call) gives the CPU path's images, and a JPEG the batched call
    cannot decode falls back to the CPU decoder and is recorded when that fails too."""
    from labeling.job import EncodedJpeg, decode_device, decoded_batches, device_decode

    assert decode_device("auto", "cpu") == "cpu" and decode_device("cpu", "cuda") == "cpu"
    with pytest.raises(ConfigError, match="decode_device: cuda needs teacher actors on a GPU"):
        decode_device("cuda", "cpu")
    data, _ = rgb_set
    plain = next(decoded_batches(str(data), "shard-000000", "rgb", 8))
    deferred = next(decoded_batches(str(data), "shard-000000", "rgb", 8, threads=2, defer_jpeg=True))
    assert all(isinstance(img, EncodedJpeg) for _, img, _ in deferred)
    decoded = device_decode(deferred, "cpu", "rgb")  # the same batched call nvJPEG gets, on the CPU here
    for (key, a, _), (key2, b, err) in zip(plain, decoded):
        assert key == key2 and err is None and torch.equal(a, b)
    broken = deferred[:2] + [(deferred[2][0], deferred[2][1]._replace(data=deferred[2][1].data[:300]), None)]
    out = device_decode(broken, "cpu", "rgb")
    assert [err is None for _, _, err in out] == [True, True, False] and "decode rgb" in out[2][2]
    assert torch.equal(out[0][1], plain[0][1])
