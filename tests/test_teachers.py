"""Tests for labeling.teachers: the shipped teachers, equality with Hugging Face processors, quality, errors."""

from __future__ import annotations

import re
import shutil

import numpy as np
import PIL.Image
import pytest
import torch
from transformers import (
    AutoImageProcessor,
    DepthAnythingConfig,
    DepthAnythingForDepthEstimation,
    Dinov2Config,
    DPTImageProcessor,
    DPTImageProcessorPil,
    Mask2FormerImageProcessorPil,
    SegformerConfig,
    SegformerForSemanticSegmentation,
    SegformerImageProcessor,
    SegformerImageProcessorPil,
)

from labeling.teachers import (
    DEFAULT_TEACHERS,
    PAPER_TEACHERS,
    TeacherNotFoundError,
    bilinear_matrix,
    load_teacher,
    mask_classification_scores,
    mask_classification_scores_at,
)
from labeling.train_teachers import EVAL_SEED, depth_scores, miou, render_scenes
from shards.precision import autocast_dtype, dtype_name
from shards.synthetic import SEMSEG_CLASSES, render_scene

SIZES = [(128, 128), (96, 128), (128, 128), (160, 200), (64, 80)]  # mixed sizes, two share a size


def _images(sizes: list[tuple[int, int]] = SIZES) -> list[torch.Tensor]:
    """Synthetic scene RGB images (H, W, 3) uint8 resized to ``sizes`` with PIL."""
    out = []
    for i, (h, w) in enumerate(sizes):
        rgb = PIL.Image.fromarray(render_scene(EVAL_SEED, 100 + i)["rgb"]).resize((w, h), PIL.Image.BILINEAR)
        out.append(torch.from_numpy(np.asarray(rgb).copy()))
    return out


@pytest.fixture(scope="module")
def images() -> list[torch.Tensor]:
    return _images()


@pytest.fixture(scope="module")
def teacher_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[str, str, type]]:
    """name -> (kind, folder, PIL-backend processor class): the shipped teachers plus two built from configs."""
    root = tmp_path_factory.mktemp("teachers")
    torch.manual_seed(0)
    segformer = root / "segformer"
    config = SegformerConfig(
        depths=[1, 1, 1, 1],
        hidden_sizes=[8, 16, 32, 64],
        num_attention_heads=[1, 1, 2, 2],
        decoder_hidden_size=32,
        num_labels=5,
        id2label={i: f"c{i}" for i in range(5)},
    )
    SegformerForSemanticSegmentation(config).save_pretrained(segformer)
    SegformerImageProcessor(size={"height": 64, "width": 64}).save_pretrained(segformer)
    # Depth Anything: its processor keeps the aspect ratio (multiple of 14) -> batches of different shapes
    depth_anything = root / "depth-anything"
    backbone = Dinov2Config(
        hidden_size=32,
        num_hidden_layers=4,
        num_attention_heads=2,
        intermediate_size=64,
        patch_size=14,
        image_size=56,
        out_features=["stage1", "stage2", "stage3", "stage4"],
        reshape_hidden_states=False,
    )
    config = DepthAnythingConfig(
        backbone_config=backbone,
        neck_hidden_sizes=[16, 32, 64, 64],
        fusion_hidden_size=32,
        head_hidden_size=16,
        reassemble_hidden_size=32,
        patch_size=14,
    )
    DepthAnythingForDepthEstimation(config).save_pretrained(depth_anything)
    processor = DPTImageProcessor(size={"height": 56, "width": 56}, keep_aspect_ratio=True, ensure_multiple_of=14)
    processor.save_pretrained(depth_anything)
    return {
        "dpt": ("depth", DEFAULT_TEACHERS["depth"], DPTImageProcessorPil),
        "mask2former": ("semseg", DEFAULT_TEACHERS["semseg"], Mask2FormerImageProcessorPil),
        "segformer": ("semseg", str(segformer), SegformerImageProcessorPil),
        "depth-anything": ("depth", str(depth_anything), DPTImageProcessorPil),
    }


@pytest.fixture(scope="module")
def loaded(teacher_dirs):
    # float32: these tests compare against the processors' float32 reference
    return {name: load_teacher(kind, folder, dtype="float32") for name, (kind, folder, _) in teacher_dirs.items()}


def test_shipped_teachers_load(loaded):
    depth, semseg = loaded["dpt"], loaded["mask2former"]
    assert (depth.kind, depth.modality, depth.meaning, depth.classes) == ("depth", "depth", "metric_m", None)
    assert (semseg.kind, semseg.modality, semseg.meaning) == ("semseg", "semseg", None)
    assert semseg.classes == SEMSEG_CLASSES
    for teacher, resolution in ((depth, [64, 64]), (semseg, [128, 128])):
        p = teacher.producer
        assert p["model"] == DEFAULT_TEACHERS[teacher.kind]
        assert re.fullmatch(r"[0-9a-f]{64}", p["weights_sha256"])
        assert (p["resolution"], p["dtype"], p["meaning"]) == (resolution, "float32", teacher.meaning)
        assert p["library"].startswith("transformers ")
    assert load_teacher("semseg", DEFAULT_TEACHERS["semseg"], modality="semseg_m2f").modality == "semseg_m2f"


def test_outputs_have_input_size_and_dtype(loaded, images):
    for name in ("dpt", "mask2former"):
        out = loaded[name](images)
        assert [tuple(o.shape) for o in out] == SIZES
        for o in out:
            assert o.device.type == "cpu"
            if name == "dpt":
                assert o.dtype == torch.float32 and torch.isfinite(o).all()  # bicubic resize may undershoot 0
            else:
                assert o.dtype == torch.int64 and 0 <= o.min() and o.max() < len(SEMSEG_CLASSES)
    assert loaded["dpt"]([]) == []


@pytest.mark.parametrize("name", ["dpt", "mask2former", "segformer", "depth-anything"])
def test_preprocessing_equals_hf_processors(name, teacher_dirs, loaded, images):
    """Batched pixel values == the torchvision processor per image (exact) and == the PIL processor (±1 level)."""
    kind, folder, pil_cls = teacher_dirs[name]
    teacher = loaded[name]
    torch_proc, pil_proc = AutoImageProcessor.from_pretrained(folder), pil_cls.from_pretrained(folder)
    one_level = 1 / 255 / min(pil_proc.image_std)  # one uint8 step after normalisation
    batches = teacher.preprocess(images)
    assert sorted(i for idx, _ in batches for i in idx) == list(range(len(images)))
    if name == "depth-anything":
        assert len(batches) > 1  # different processed shapes are run as separate batches
    for idx, pixel_values in batches:
        for i, pv in zip(idx, pixel_values):
            ref = torch_proc(images=images[i].permute(2, 0, 1), return_tensors="pt")["pixel_values"][0]
            assert torch.equal(pv, ref)
            ref_pil = pil_proc(images=PIL.Image.fromarray(images[i].numpy()), return_tensors="pt")["pixel_values"][0]
            assert pv.shape == ref_pil.shape
            assert (pv - ref_pil).abs().max() <= 1.01 * one_level
            assert (pv - ref_pil).abs().mean() < 0.05 * one_level


@pytest.mark.parametrize("name", ["dpt", "mask2former", "segformer", "depth-anything"])
def test_outputs_equal_hf_pipeline(name, teacher_dirs, loaded, images):
    """Teacher on a mixed-size batch == processor -> model -> processor.post_process_* one image at a time."""
    kind, folder, _ = teacher_dirs[name]
    teacher = loaded[name]
    proc = AutoImageProcessor.from_pretrained(folder)
    out = teacher(images)
    for image, got in zip(images, out):
        size = tuple(image.shape[:2])
        with torch.inference_mode():
            raw = teacher.model(**proc(images=image.permute(2, 0, 1), return_tensors="pt"))
        if kind == "depth":
            ref = proc.post_process_depth_estimation(raw, target_sizes=[size])[0]["predicted_depth"]
            torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-5)
        else:
            ref = proc.post_process_semantic_segmentation(raw, target_sizes=[size], return_segmentation_scores=True)[0]
            # batched vs single-image float sums may differ in the last bits: labels must agree wherever the
            # winning class leads by more than 1e-4 (all but near-ties)
            top2 = ref.segmentation_scores.topk(2, dim=0).values  # (2, H, W)
            decisive = top2[0] - top2[1] > 1e-4
            assert torch.equal(got[decisive], ref.segmentation[decisive])
            assert (got != ref.segmentation).float().mean() < 1e-3


def test_shipped_teachers_beat_trivial_baselines(loaded):
    """On held-out scenes: depth beats the per-image mean depth, semseg beats the majority class (floor)."""
    held_out = render_scenes(EVAL_SEED, 8)
    images, gt_depth, gt_seg = list(held_out["rgb"]), list(held_out["depth"]), list(held_out["semseg"])
    depth = depth_scores(loaded["dpt"](images), gt_depth)
    mean_depth = depth_scores([torch.full_like(g, g.mean().item()) for g in gt_depth], gt_depth, align=False)
    assert depth["abs_rel"] < 0.75 * mean_depth["abs_rel"] and depth["delta1"] > mean_depth["delta1"] + 0.2
    seg = miou(loaded["mask2former"](images), gt_seg, len(SEMSEG_CLASSES))
    majority = miou([torch.zeros_like(g) for g in gt_seg], gt_seg, len(SEMSEG_CLASSES))
    assert SEMSEG_CLASSES[0] == "floor" and seg > 2 * majority


def test_default_dtype_follows_the_hardware():
    teacher = load_teacher("depth", DEFAULT_TEACHERS["depth"])
    expected, why = autocast_dtype("cpu")
    assert teacher.producer["dtype"] == dtype_name(expected) and teacher.dtype_reason == why
    assert load_teacher("depth", DEFAULT_TEACHERS["depth"], dtype="float32").producer["dtype"] == "float32"


def test_resolution_and_dtype_options(images):
    teacher = load_teacher("depth", DEFAULT_TEACHERS["depth"], resolution=48)
    assert teacher.producer["resolution"] == [48, 48]
    assert [tuple(o.shape) for o in teacher(images[:2])] == SIZES[:2]
    fp32 = load_teacher("semseg", DEFAULT_TEACHERS["semseg"], dtype="float32")(images[:2])
    bf16_teacher = load_teacher("semseg", DEFAULT_TEACHERS["semseg"], dtype="bfloat16")
    assert bf16_teacher.producer["dtype"] == "bfloat16"
    bf16 = bf16_teacher(images[:2])
    agreement = torch.cat([(a == b).flatten() for a, b in zip(fp32, bf16)]).float().mean()
    assert bf16[0].dtype == torch.int64 and agreement > 0.9
    with pytest.raises(ValueError, match="dtype"):
        load_teacher("depth", DEFAULT_TEACHERS["depth"], dtype="int8")
    with pytest.raises(ValueError, match="resolution"):
        load_teacher("depth", DEFAULT_TEACHERS["depth"], resolution=0)
    with pytest.raises(ValueError, match="square resolution"):
        load_teacher("depth", DEFAULT_TEACHERS["depth"], resolution=(48, 80))


def test_missing_weights_errors(tmp_path):
    folder = tmp_path / "no-weights"
    shutil.copytree(DEFAULT_TEACHERS["depth"], folder)
    (folder / "model.safetensors").unlink()
    with pytest.raises(TeacherNotFoundError, match=rf"(?s){re.escape(str(folder))} has no weights.*hf download"):
        load_teacher("depth", str(folder))
    missing = tmp_path / "absent"
    with pytest.raises(TeacherNotFoundError, match=rf"{re.escape(str(missing))} does not exist"):
        load_teacher("depth", str(missing))
    with pytest.raises(TeacherNotFoundError, match="(?s)not in the local Hugging Face cache.*hf download"):
        load_teacher("depth", "multimae-tests/no-such-model-in-cache")
    assert issubclass(TeacherNotFoundError, FileNotFoundError)
    assert set(PAPER_TEACHERS) == set(DEFAULT_TEACHERS) == {"depth", "semseg"}


def test_bad_kind_and_inputs(loaded):
    with pytest.raises(ValueError, match="unknown teacher kind"):
        load_teacher("rgb", DEFAULT_TEACHERS["depth"])  # a modality kind without a teacher class
    with pytest.raises(ValueError, match="cannot be loaded as semseg|is it a semseg model"):
        load_teacher("semseg", DEFAULT_TEACHERS["depth"])
    with pytest.raises(ValueError, match="image 1: expected a uint8 tensor"):
        loaded["dpt"]([torch.zeros(8, 8, 3, dtype=torch.uint8), torch.zeros(8, 8, 3)])
    with pytest.raises(ValueError, match="image 0"):
        loaded["dpt"]([torch.zeros(3, 8, 8, dtype=torch.uint8)])


@pytest.mark.parametrize("size", [(128, 128), (96, 72), (37, 61), (1, 1), (224, 300), (500, 640)])
def test_sampled_mask_classification_scores_equal_dense(size):
    """Scores evaluated only where the final resize reads == upsample to 384 x 384, then resize (all sizes)."""
    torch.manual_seed(0)
    class_logits, mask_logits = torch.randn(2, 16, 10), 4 * torch.randn(2, 16, 32, 24)
    dense = torch.nn.functional.interpolate(
        mask_classification_scores(class_logits, mask_logits, (384, 384)),
        size=size,
        mode="bilinear",
        align_corners=False,
    )
    got = mask_classification_scores_at(class_logits, mask_logits, (384, 384), size)
    torch.testing.assert_close(got, dense, rtol=0, atol=2e-5)


def test_bilinear_matrix_equals_interpolate():
    x = torch.randn(3, 17, 23)
    for out in (5, 17, 40, 100):
        got = bilinear_matrix(17, out) @ x @ bilinear_matrix(23, out).T
        ref = torch.nn.functional.interpolate(x[None], size=(out, out), mode="bilinear", align_corners=False)[0]
        torch.testing.assert_close(got, ref, rtol=0, atol=1e-5)
