"""`data.decode_device`: rgb JPEGs left encoded by the loader workers and decoded in one batched call by the
batch step (nvJPEG on a GPU). On the CPU the same batched call runs libjpeg-turbo, so the deferred path must
give the very batches of the worker path: same crops, flips, values, order."""

import io

import numpy as np
import pytest
import torch
from PIL import Image

from multimae.train import data as mdata
from multimae.train.config import ConfigError, RunConfig
from shards import format as F
from shards.build import build
from shards.nvjpeg import EncodedJpeg, encoded_jpeg
from shards.reader import ShardDataset
from shards.sources import synthetic_source
from shards.writer import ShardWriter

PNG_KEYS: set[str] = set()
ARGS = dict(
    inputs={"rgb": "rgb", "depth": "depth_gt", "semseg": "semseg_gt"},
    target=None,
    image_size=32,
    augment="crop",
    depth_meanings={"depth_gt": "metric_m"},
)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> str:
    """24 synthetic 48 px scenes in 3 shards; in shard 1 every third rgb member is a PNG (the workers decode
    those as before, so a batch mixes both kinds)."""
    out = tmp_path_factory.mktemp("shards") / "data"
    build(synthetic_source(24, size=48, seed=5), str(out), shard_size=8, progress=False)
    mods = ["rgb", "depth_gt", "semseg_gt"]
    samples = [
        {m: raw[m] for m in mods} | {"__key__": raw["__key__"]} for raw in _raw_samples(str(out), "shard-000001", mods)
    ]
    for m in mods:
        (out / m / "shard-000001.tar").unlink()
        (out / m / "shard-000001.json").unlink()
    with ShardWriter(str(out), "shard-000001", mods) as w:
        for i, s in enumerate(samples):
            members = {m: dict(s[m]) for m in mods}
            if i % 3 == 1:
                buf = io.BytesIO()
                Image.fromarray(F.decode_rgb(members["rgb"]["rgb.jpg"])).save(buf, "PNG")
                members["rgb"]["rgb.jpg"] = buf.getvalue()  # a member's format is its magic bytes
                PNG_KEYS.add(s["__key__"])
            w.write(s["__key__"], members)
    return str(out)


def _raw_samples(root: str, name: str, mods: list[str]) -> list[dict]:
    from shards.reader import iter_shard_members

    return list(iter_shard_members(root, name, mods))


def stream(root: str, shards: list[str], defer: bool, batch: int = 4, buffer: int = 8, args: dict = ARGS,
           workers: int = 0):  # fmt: skip
    """The trainer's training stream (chunk 0, rank 0, no workers by default), rgb deferred or decoded by the
    worker."""
    loader = mdata.train_loader(root, shards, args, micro_batch=batch, num_workers=workers, shuffle_buffer=buffer,
                                seed=11, chunk=0, rank=0, defer_rgb=defer)  # fmt: skip
    return iter(loader)


def batches(root: str, defer: bool, n: int = 8) -> list[dict]:
    it = stream(root, ["shard-000001", "shard-000002"], defer)
    out = []
    for _ in range(n):
        batch = next(it)
        mdata.finish_rgb(batch, "cpu")
        out.append(batch)
    return out


def test_the_deferred_rgb_path_gives_the_worker_paths_batches(data):
    plain, deferred = batches(data, defer=False), batches(data, defer=True)
    kinds = set()
    for a, b in zip(plain, deferred):
        assert a["__key__"] == b["__key__"]
        assert set(a) == set(b)
        for k in ("rgb", "depth", "semseg"):
            assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k
        kinds.update("png" if k in PNG_KEYS else "jpg" for k in a["__key__"])
    assert kinds == {"png", "jpg"}
    raw = next(stream(data, ["shard-000001"], defer=True, batch=8, buffer=0))
    types = [type(v).__name__ for v in raw["rgb"]]
    assert types.count("DeferredRgb") == 5 and types.count("Tensor") == 3  # PNG members come finished


def test_the_reader_leaves_plain_jpegs_encoded_with_their_size(data):
    samples = list(ShardDataset(data, ["rgb", "depth_gt"], shards=["shard-000001"], defer_jpeg=["rgb"]))
    assert [isinstance(s["rgb"], EncodedJpeg) for s in samples] == [i % 3 != 1 for i in range(8)]
    for s in samples:
        if isinstance(s["rgb"], EncodedJpeg):
            assert s["rgb"].shape == (48, 48, 3) == (*s["depth_gt"].shape, 3)
    gray = io.BytesIO()
    Image.new("L", (8, 8)).save(gray, "JPEG")
    cmyk = io.BytesIO()
    Image.new("CMYK", (8, 8)).save(cmyk, "JPEG")
    assert encoded_jpeg(gray.getvalue()) is None and encoded_jpeg(cmyk.getvalue()) is None  # the CPU decides
    assert encoded_jpeg(b"\xff\xd8\xff" + bytes(20)) is None


def test_a_deferred_jpeg_that_does_not_decode_names_its_sample(data):
    batch = next(stream(data, ["shard-000000"], defer=True, buffer=0))
    bad = batch["rgb"][2]
    batch["rgb"][2] = bad._replace(jpeg=bad.jpeg._replace(data=bad.jpeg.data[:200]))
    with pytest.raises(F.FormatError, match=f"sample {batch['__key__'][2]!r}: rgb "):
        mdata.finish_rgb(batch, "cpu")


def test_decode_device_selection(monkeypatch):
    cpu, cuda = torch.device("cpu"), torch.device("cuda", 0)
    crop = mdata.SampleTransform(train=True, **ARGS)
    rand_augment = mdata.SampleTransform(train=True, **{**ARGS, "augment": "cls", "rand_augment": "rand-m9-n2"})
    depth_only = mdata.SampleTransform(train=True, **{**ARGS, "inputs": {"depth": "depth_gt"}})
    monkeypatch.setattr(mdata, "nvjpeg_works", lambda device: True)
    assert mdata.rgb_decode_device("auto", cuda, crop) == "cuda:0"
    assert mdata.rgb_decode_device("cuda", cuda, crop) == "cuda:0"
    assert mdata.rgb_decode_device("cpu", cuda, crop) == "cpu"
    assert mdata.rgb_decode_device("auto", cpu, crop) == "cpu"
    for transform, why in (
        (rand_augment, "the cls recipe's rgb colour augmentation runs on the CPU"),
        (depth_only, "rgb is not an input"),
    ):
        assert mdata.rgb_decode_device("auto", cuda, transform) == "cpu"
        with pytest.raises(ConfigError, match=why):
            mdata.rgb_decode_device("cuda", cuda, transform)
    with pytest.raises(ConfigError, match="needs rgb decoded on the GPU, but the run is on cpu"):
        mdata.rgb_decode_device("cuda", cpu, crop)
    monkeypatch.setattr(mdata, "nvjpeg_works", lambda device: False)
    assert mdata.rgb_decode_device("auto", cuda, crop) == "cpu"
    with pytest.raises(ConfigError, match="nvJPEG does not decode on cuda:0"):
        mdata.rgb_decode_device("cuda", cuda, crop)
    with pytest.raises(ValueError, match="defer_rgb: the cls recipe colour-augments rgb"):
        stream("unused", [], defer=True, args={**ARGS, "augment": "cls", "rand_augment": "rand-m9-n2"})


def test_decode_device_is_a_runtime_setting_not_saved_with_the_run():
    cfg = RunConfig()
    assert cfg.data.decode_device == "auto"
    assert "decode_device" not in cfg.to_dict()["data"]
    assert np.isin(["readahead", "storage_options"], list(cfg.to_dict()["data"])).sum() == 0


def test_rgb_inputs_cross_the_workers_as_uint8_and_are_normalized_in_the_batch_step(data):
    """A quarter of float32's bytes through the workers' shared memory: the batch step normalizes, exactly as
    the per-sample normalization would."""
    batch = next(stream(data, ["shard-000000"], defer=False, workers=1))
    assert batch["rgb"].dtype == torch.uint8 and batch["rgb"].shape == (4, 3, 32, 32)
    assert batch["depth"].dtype == torch.float32
    pixels = batch["rgb"].clone()
    assert mdata.image_domains(ARGS["inputs"]) == ["rgb"]
    mdata.normalize_images(batch, ["rgb"])
    assert batch["rgb"].dtype == torch.float32
    assert torch.equal(batch["rgb"], torch.stack([mdata.normalize_rgb(p) for p in pixels]))
    with pytest.raises(TypeError, match="expected uint8 pixels"):
        mdata.normalize_images(batch, ["rgb"])  # twice would be a silent double normalization


def test_class_ids_cross_the_workers_narrow_and_are_widened_in_the_batch_step(data):
    """uint8 ids for up to 256 classes (an eighth of int64's bytes), int16 or int64 when the ids need them;
    values never change."""
    batch = next(stream(data, ["shard-000000"], defer=False, workers=1))
    assert batch["semseg"].dtype == torch.uint8 and batch["semseg"].shape == (4, 8, 8)  # stride-4 input
    ids = batch["semseg"].clone()
    mdata.widen_ids(batch, mdata.image_domains(ARGS["inputs"]))
    assert batch["semseg"].dtype == torch.int64 and torch.equal(batch["semseg"], ids.long())
    assert batch["rgb"].dtype == torch.uint8  # an image domain: left for normalize_images


@pytest.mark.parametrize(
    "extreme, dtype", [(255, torch.uint8), (256, torch.int16), (-1, torch.int16), (2**15, torch.int64)]
)
def test_collate_picks_the_narrowest_dtype_that_holds_every_id(extreme, dtype):
    samples = [{"__key__": str(i), "target": torch.full((3, 3), 7, dtype=torch.int64), "cls": 3} for i in range(3)]
    samples[2]["target"][1, 1] = extreme
    batch = mdata.collate(samples)
    assert batch["target"].dtype == dtype
    assert torch.equal(batch["target"].long(), torch.stack([s["target"] for s in samples]))
    assert batch["cls"].dtype == torch.int64  # labels, not maps: as default_collate gives them
    mdata.widen_ids(batch, [])
    assert batch["target"].dtype == torch.int64 and batch["target"][2, 1, 1] == extreme
