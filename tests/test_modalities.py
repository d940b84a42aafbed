"""The modality registry (shards/modalities.py): its rules on literal arrays, the normals codec, and kinds that go
end to end — normals (built in) and an `edges` kind registered here, by this test alone, through build, verify,
pre-training and dense fine-tuning."""

from __future__ import annotations

import io
import json
import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from multimae.train.augment import Plan, apply_plan, flip_horizontal, renormalize
from multimae.train.config import ConfigError, load_run_config
from multimae.train.data import SampleTransform
from multimae.train.main import run
from shards import format as F
from shards import modalities
from shards.build import build
from shards.info import info_text
from shards.reader import iter_shard, iter_shard_members
from shards.show import normals_picture, show
from shards.sources import SourceError, open_source, synthetic_source
from shards.synthetic import render_scene
from shards.verify import verify

ROOT = Path(__file__).resolve().parents[1]
TINY = ["model.dim_tokens=64", "model.num_blocks=2", "model.num_heads=2"]
DECODER = ["model.decoder_dim=64", "model.decoder_blocks=1", "model.decoder_heads=2"]
COMMON = [
    "data.eval_num_shards=1",
    "data.num_workers=0",
    "data.shuffle_buffer=8",
    "train.batch_size=4",
    "train.steps=2",
    "train.warmup_steps=1",
    "log.every=1",
    "log.tensorboard=false",
    "log.num_images=2",
]
DENSE_HEAD = [
    "model.patch_size=16",
    "data.image_size=64",
    "model.head_dim=16",
    "model.head_layer_dims=[16, 16, 16, 16]",
]

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def cfg(name: str, overrides: list[str]):
    return load_run_config(str(ROOT / "pipelines" / name), overrides)


def angles_deg(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Angles between vectors, accurate near 0 (atan2 of |a x b| and a . b, not arccos)."""
    a, b = a.astype(np.float64), b.astype(np.float64)
    return np.degrees(np.arctan2(np.linalg.norm(np.cross(a, b), axis=-1), (a * b).sum(-1)))


def unit(v) -> np.ndarray:
    v = np.asarray(v, dtype=np.float64)
    return v / np.linalg.norm(v, axis=-1, keepdims=True)


# --- the registry ---------------------------------------------------------------------------------


def test_builtin_kinds_and_names():
    assert modalities.kinds()[:4] == ("rgb", "depth", "semseg", "normals")
    assert F.modality_kind("normals_dpt") == "normals" and modalities.of("normals_gt").unit_vectors
    assert modalities.get("semseg").is_classes and not modalities.get("normals").is_classes
    assert [k for k in modalities.kinds() if modalities.get(k).dense][:2] == ["depth", "normals"]
    for bad in ("normal", "normalsgt", "edges", "normals.x"):
        with pytest.raises(F.FormatError, match="unknown modality"):
            F.modality_kind(bad)
    with pytest.raises(ValueError, match="registered already"):
        modalities.register(modalities.Modality("depth", "range16", 2, "float32", "bilinear", "colormap", ("m",)))
    with pytest.raises(ValueError, match="flip 'rotate'"):
        modalities.Modality("x", "range16", 1, "float32", "bilinear", "colormap", ("m",), flip="rotate")
    with pytest.raises(ValueError, match="built-in"):
        modalities.unregister("rgb")


def test_normals_flip_negates_x_and_mirrors():
    # (3, 1, 2): left pixel faces right (+x), right pixel faces up-and-toward the camera
    n = torch.tensor([[[1.0, 0.0]], [[0.0, 0.6]], [[0.0, 0.8]]])
    out = apply_plan(n, "normals", Plan((0.0, 0.0, 1.0, 1.0), (1, 2), flip=True))
    expected = torch.tensor([[[0.0, -1.0]], [[0.6, 0.0]], [[0.8, 0.0]]])
    torch.testing.assert_close(out, expected)
    # rgb and depth only mirror
    torch.testing.assert_close(flip_horizontal(n, "mirror"), n.flip(-1))
    d = torch.tensor([[[1.0, 2.0, 3.0]]])
    torch.testing.assert_close(apply_plan(d, "depth", Plan((0.0, 0.0, 1.0, 1.0), (1, 3), flip=True)), d.flip(-1))


def test_normals_resize_renormalises_and_keeps_missing_pixels_missing():
    # a 1 x 2 map of +x and +y shrunk to one pixel: bilinear averages them, renormalised to the diagonal
    n = torch.tensor([[[1.0, 0.0]], [[0.0, 1.0]], [[0.0, 0.0]]])
    out = apply_plan(n, "normals", Plan((0.0, 0.0, 1.0, 1.0), (1, 1)))
    torch.testing.assert_close(out[:, 0, 0], torch.tensor([math.sqrt(0.5), math.sqrt(0.5), 0.0]))
    # one missing pixel (zero vector) beside one normal: the average is 0.5 long -> still a direction
    half = renormalize(torch.tensor([[[0.5]], [[0.0]], [[0.0]]]))
    torch.testing.assert_close(half[:, 0, 0], torch.tensor([1.0, 0.0, 0.0]))
    # mostly missing, or opposite normals cancelling -> missing
    assert renormalize(torch.tensor([[[0.3]], [[0.0]], [[0.0]]])).abs().sum() == 0
    # upscaling a smooth surface (normals within ~40 degrees of each other) keeps every pixel unit length
    rng = torch.Generator().manual_seed(0)
    v = torch.nn.functional.normalize(
        0.3 * torch.randn(3, 4, 4, generator=rng) + torch.tensor([0.0, 0.0, 1.0])[:, None, None], dim=0
    )
    up = apply_plan(v, "normals", Plan((0.0, 0.0, 1.0, 1.0), (9, 9)))
    torch.testing.assert_close(up.norm(dim=0), torch.ones(9, 9))


def test_normals_codec_8_and_16_bit():
    rng = np.random.default_rng(0)
    n = unit(rng.normal(size=(6, 7, 3)))
    n[0, 0] = 0.0  # missing
    valid = np.linalg.norm(n, axis=-1) > 0
    for bits, bound_deg in ((8, 0.5), (16, 0.01)):
        members = F.encode_sample("normals_gt", n, bits=bits)
        assert list(members) == ["normals_gt.png"]
        back = F.decode_sample("normals_gt", members)
        assert back.dtype == np.float32 and back.shape == (6, 7, 3)
        assert (back[0, 0] == 0).all()
        np.testing.assert_allclose(np.linalg.norm(back[valid], axis=-1), 1.0, atol=1e-6)
        assert angles_deg(back, n)[valid].max() < bound_deg
        with Image.open(io.BytesIO(members["normals_gt.png"])) as im:
            assert im.format == "PNG" and im.mode == "RGB"
    # Taskonomy's encoding, literally: v = 255 (x = +1), 128 (~0), 0 (-1 ... but (0,0,0) is missing)
    v = np.array([[[255, 128, 128], [128, 128, 255], [0, 0, 0]]], np.uint8)
    back = F.decode_sample("normals", {"normals.png": F.encode_normals_levels(v)})
    np.testing.assert_allclose(back[0, 0], [1.0, 0.0, 0.0], atol=1e-2)
    np.testing.assert_allclose(back[0, 1], [0.0, 0.0, 1.0], atol=1e-2)
    assert (back[0, 2] == 0).all()
    gray = io.BytesIO()
    Image.fromarray(np.zeros((4, 4), np.uint8)).save(gray, "PNG")
    with pytest.raises(F.FormatError, match="RGB"):
        F.decode_sample("normals", {"normals.png": gray.getvalue()})
    with pytest.raises(F.FormatError, match="NaN"):
        F.encode_normals(np.full((2, 2, 3), np.nan))


def test_sample_transform_feeds_normals_as_3_channel_float():
    n = unit(0.3 * np.random.default_rng(1).normal(size=(16, 16, 3)) + [0.0, 0.0, 1.0]).astype(np.float32)
    t = SampleTransform(inputs={"rgb": "rgb", "normals": "normals_gt"}, target="normals_gt", image_size=8, train=False)
    out = t({"__key__": "k", "rgb": np.zeros((16, 16, 3), np.uint8), "normals_gt": n})
    assert out["normals"].shape == (3, 8, 8) and out["normals"].dtype == torch.float32
    torch.testing.assert_close(out["normals"].norm(dim=0), torch.ones(8, 8))
    torch.testing.assert_close(out["target"], out["normals"])


# --- normals end to end ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def normals_data(tmp_path_factory) -> str:
    """24 synthetic 64 px scenes with exact normals_gt, 3 shards of 8."""
    out = str(tmp_path_factory.mktemp("normals") / "data")
    build(synthetic_source(24, size=64, seed=5, normals=True), out, shard_size=8, progress=False)
    return out


def test_synthetic_normals_build_verify_info_show(normals_data, tmp_path):
    manifest = F.read_manifest(normals_data)
    entry = manifest["modalities"]["normals_gt"]
    assert entry["kind"] == "normals" and entry["ext"] == "png" and entry["meaning"] == "camera_normals"
    assert verify(normals_data, deep=True) == []
    sample = next(iter_shard(normals_data, "shard-000000", ["normals_gt"]))
    exact = render_scene(5, 0, 64)["normals_gt"]  # the first scene of seed 5, stored with 8 bits
    assert angles_deg(sample["normals_gt"], exact).max() < 0.5
    assert "normals_gt" in info_text(normals_data)
    keys = show(normals_data, str(tmp_path / "grid.png"), n=2)
    assert len(keys) == 2 and (tmp_path / "grid.png").stat().st_size > 0
    colours = normals_picture(np.array([[[0.0, 0.0, 1.0], [0.0, 0.0, 0.0]]]))
    assert colours.tolist() == [[[128, 128, 255], [0, 0, 0]]]


def test_pretrain_on_normals_then_dense_fine_tuning_with_angular_metrics(normals_data, tmp_path):
    pre = str(tmp_path / "pre")
    over = [*TINY, *DECODER, *COMMON, "model.patch_size=16", "model.num_encoded_tokens=16", "data.image_size=64",
            "data.inputs={rgb: rgb, normals: normals_gt}", "model.out_domains=[rgb, normals]"]  # fmt: skip
    summary = run(cfg("pretrain-demo.yaml", over), normals_data, pre)
    assert summary["steps"] == 2 and os.path.exists(summary["reconstructions"])
    state = torch.load(os.path.join(pre, "checkpoint.pt"), weights_only=True)
    assert state["model"]["input_adapters.normals.proj.weight"].shape[1] == 3  # 3 input channels
    assert any(k.startswith("output_adapters.normals.") for k in state["model"])  # a normals decoder
    losses = [json.loads(line)["loss/normals"] for line in open(os.path.join(pre, "metrics.jsonl"))]
    assert len(losses) == 2 and all(math.isfinite(v) and v > 0 for v in losses)

    for loss in ("l1", "angular"):
        out = str(tmp_path / f"ft-{loss}")
        ft = run(
            cfg("finetune-demo-normals.yaml", [*TINY, *COMMON, *DENSE_HEAD, f"optim.dense_loss={loss}"]),
            normals_data,
            out,
            init=os.path.join(pre, "checkpoint.pt"),
            save_predictions=True,
        )
        record = json.load(open(os.path.join(out, "eval.json")))
        m = record["metrics"]
        assert record["objective"] == "dense" and record["target"] == "normals_gt" and m == ft["eval"]
        names = {"mean_angle_deg", "median_angle_deg", "within_11.25", "within_22.5", "within_30", "pixels"}
        assert set(m) == {f"normals/{k}" for k in names}
        assert m["normals/pixels"] == 8 * 64 * 64  # every pixel of the held-out shard has a normal
        assert 0 < m["normals/mean_angle_deg"] <= 180 and 0 <= m["normals/within_30"] <= 100
        assert m["normals/within_11.25"] <= m["normals/within_22.5"] <= m["normals/within_30"]
    import zarr

    store = zarr.open_group(os.path.join(out, "predictions.zarr"), mode="r")
    assert store["pred"].shape == (8, 3, 64, 64) and store["target"].shape == (8, 3, 64, 64)


def test_dense_objective_config_rules():
    over = [*TINY, *COMMON]
    with pytest.raises(ConfigError, match="not a dense kind"):
        cfg("finetune-demo-normals.yaml", [*over, "data.target=semseg_gt"])
    with pytest.raises(ConfigError, match="not a loss of normals"):
        cfg("finetune-demo-normals.yaml", [*over, "optim.dense_loss=berhu"])
    with pytest.raises(ConfigError, match="not a target for objective depth"):
        cfg("finetune-demo-depth.yaml", [*over, "data.target=normals_gt"])
    assert cfg("finetune-taskonomy-normals.yaml", []).data.target == "normals_gt"


# --- a kind registered by this test alone ---------------------------------------------------------


@pytest.fixture
def edges():
    """A 1-channel `edges` kind: 16-bit values with a per-sample range (depth's codec), L1 everywhere."""
    entry = modalities.register(
        modalities.Modality(
            "edges", codec="range16", channels=1, decoded="float32", interpolation="bilinear",
            picture="colormap", meanings=("edge_strength",),
        )
    )  # fmt: skip
    yield entry
    modalities.unregister("edges")


def sobel_edges(depth: np.ndarray) -> np.ndarray:
    """(H, W) -> (H, W) uint16 gradient magnitude of the depth map (an occlusion-edge map, Taskonomy-style)."""
    gy, gx = np.gradient(depth.astype(np.float64))
    return np.clip(np.hypot(gx, gy) * 4000, 0, 65535).astype(np.uint16)


def test_a_new_kind_goes_end_to_end_through_the_paired_source(edges, tmp_path):
    root = tmp_path / "task"
    for folder in ("rgb", "edges"):
        (root / folder).mkdir(parents=True)
    expected = {}
    for i in range(16):
        scene = render_scene(11, i, 64)
        Image.fromarray(scene["rgb"]).save(root / "rgb" / f"{i:03d}.png")
        expected[f"{i:03d}"] = sobel_edges(scene["depth_gt"])
        Image.fromarray(expected[f"{i:03d}"]).save(root / "edges" / f"{i:03d}.png")
    data = str(tmp_path / "data")
    source = open_source("paired", str(root), modalities={"rgb": "rgb", "edges_gt": "edges"}, shuffle=False)
    build(source, data, shard_size=8, progress=False)

    entry = F.read_manifest(data)["modalities"]["edges_gt"]
    assert entry["kind"] == "edges" and entry["meaning"] == "edge_strength" and entry["dtype"] == "uint16"
    assert verify(data, deep=True) == []
    for sample in iter_shard(data, "shard-000000", ["edges_gt"]):
        stem = sample["__key__"]
        np.testing.assert_array_equal(sample["edges_gt"], expected[stem].astype(np.float32))  # lossless

    pre = str(tmp_path / "pre")
    over = [*TINY, *DECODER, *COMMON, "model.patch_size=16", "model.num_encoded_tokens=16", "data.image_size=64",
            "data.inputs={rgb: rgb, edges: edges_gt}", "model.out_domains=[rgb, edges]"]  # fmt: skip
    run(cfg("pretrain-demo.yaml", over), data, pre)
    weights = torch.load(os.path.join(pre, "checkpoint.pt"), weights_only=True)["model"]
    assert weights["input_adapters.edges.proj.weight"].shape[1] == 1

    ft = str(tmp_path / "ft")
    over = [*TINY, *COMMON, *DENSE_HEAD, "data.target=edges_gt"]
    result = run(cfg("finetune-demo-normals.yaml", over), data, ft, init=os.path.join(pre, "checkpoint.pt"))
    metrics = json.load(open(os.path.join(ft, "eval.json")))["metrics"]
    assert set(metrics) == {"edges/L1", "edges/RMSE", "edges/pixels"} and metrics == result["eval"]
    assert metrics["edges/pixels"] == 8 * 64 * 64 and 0 < metrics["edges/L1"] <= metrics["edges/RMSE"]


def test_paired_normals_folder_is_stored_losslessly_at_its_bit_depth(tmp_path):
    root = tmp_path / "omni"
    for folder in ("rgb", "normal"):
        (root / folder).mkdir(parents=True)
    rng = np.random.default_rng(3)
    levels = {}
    for i in range(3):
        Image.fromarray(rng.integers(0, 255, (24, 32, 3), dtype=np.uint8)).save(root / "rgb" / f"{i}.png")
        v = rng.integers(1, 65535, (24, 32, 3)).astype(np.uint16)
        v[0, 0] = 0  # a missing pixel
        levels[str(i)] = v
        (root / "normal" / f"{i}.png").write_bytes(F.encode_normals_levels(v))
    data = str(tmp_path / "data")
    build(open_source("paired", str(root), modalities={"rgb": "rgb", "normals_gt": "normal"}), data, progress=False)
    assert verify(data) == []
    for raw in iter_shard_members(data, "shard-000000", ["normals_gt"]):
        stored = F.normals_levels(raw["normals_gt"]["normals_gt.png"])
        np.testing.assert_array_equal(stored, levels[raw["__key__"]])
    with pytest.raises(SourceError, match="--normals applies to --src synthetic"):
        open_source("paired", str(root), modalities={"rgb": "rgb", "normals_gt": "normal"}, normals=True)
