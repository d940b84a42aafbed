"""The trainer's joint augmentation: one crop and one flip for all modalities of a sample (multimae/data.py)."""

import numpy as np
import pytest
import torch

from multimae.train.augment import crop_params
from multimae.train.data import SampleTransform, map_semseg_labels, normalize_rgb


def block_sample(seed: int, size: int = 128, block: int = 16) -> dict:
    """rgb made of flat blocks; semseg_gt and depth_gt are functions of the rgb's red channel."""
    rng = np.random.default_rng(seed)
    n = size // block
    level = rng.integers(0, 8, size=(n, n))  # class id per block
    red = (level * 32 + 16).astype(np.uint8)  # 16, 48, ..., 240
    other = rng.integers(0, 256, size=(n, n, 2)).astype(np.uint8)
    rgb = np.concatenate([red[..., None], other], axis=-1).repeat(block, 0).repeat(block, 1)  # (H, W, 3)
    semseg = level.repeat(block, 0).repeat(block, 1).astype(np.int64)
    depth = 1.0 + rgb[..., 0].astype(np.float32) / 255.0  # (H, W) metres
    return {"__key__": f"{seed:06d}", "rgb": rgb, "semseg_gt": semseg, "depth_gt": depth}


def make(train: bool = True, **kw) -> SampleTransform:
    args = dict(
        inputs={"rgb": "rgb", "depth": "depth_gt", "semseg": "semseg_gt"},
        target="semseg_gt",
        image_size=64,
        train=train,
        seed=(0, 0, 0),
    )
    args.update(kw)
    return SampleTransform(**args)


def interior(ids: np.ndarray, r: int = 2) -> np.ndarray:
    """(H, W) bool: pixels whose (2r+1)^2 neighbourhood has one class (interpolation blurs only edges)."""
    win = np.lib.stride_tricks.sliding_window_view(np.pad(ids, r, mode="edge"), (2 * r + 1, 2 * r + 1))
    return win.min(axis=(-1, -2)) == win.max(axis=(-1, -2))


def red_of(out: dict) -> np.ndarray:
    return out["rgb"][0].float().numpy()  # (S, S): image inputs leave the transform as uint8 pixels


def test_crop_params_respect_scale_ratio_and_bounds():
    rng = np.random.default_rng(1)
    for _ in range(500):
        top, left, h, w = crop_params(96, 128, (0.2, 1.0), (3 / 4, 4 / 3), rng)
        assert 0 <= top and 0 <= left and top + h <= 1 + 1e-9 and left + w <= 1 + 1e-9
        area = h * w  # fraction of the image
        assert 0.2 - 0.02 <= area <= 1.0
        aspect = (w * 128) / (h * 96)
        assert 3 / 4 - 0.05 <= aspect <= 4 / 3 + 0.05


@pytest.mark.parametrize("seed", range(12))
def test_random_crop_flip_keeps_modalities_aligned(seed):
    sample = block_sample(seed)
    t = make(seed=(seed, 0, 0))
    out = t(sample)
    assert out["rgb"].shape == (3, 64, 64) and out["rgb"].dtype == torch.uint8  # normalized in the batch step
    assert out["depth"].shape == (1, 64, 64) and out["depth"].dtype == torch.float32
    assert out["semseg"].shape == (16, 16) and out["semseg"].dtype == torch.int64  # stride 4 input
    assert out["target"].shape == (64, 64) and out["target"].dtype == torch.int64  # full-resolution target

    red = red_of(out)
    cls_from_rgb = np.clip(np.round((red - 16) / 32), 0, 7)
    target = out["target"].numpy()
    inner = interior(target)
    assert inner.mean() > 0.3
    assert (cls_from_rgb == target)[inner].all()
    # a target that missed the flip fails the same check: the test tells aligned from misaligned
    mirrored = target[:, ::-1]
    if not (mirrored == target).all():
        assert (cls_from_rgb == mirrored)[interior(mirrored)].mean() < 0.9

    depth_err = np.abs(out["depth"][0].numpy() - (1.0 + red / 255.0))
    assert depth_err[inner].max() < 0.01
    # semseg input at stride 4 = the full-resolution target sampled at the centres of 4x4 cells
    sub = inner[2::4, 2::4]
    assert (out["semseg"].numpy() == target[2::4, 2::4])[sub].all()


def test_an_image_target_is_normalized_in_the_worker():
    """Evaluation scores the batch's target as it comes from the loader, so an rgb target is already in the
    model's (normalized) space; only image *inputs* wait for the batch step."""
    sample = block_sample(4, size=64)
    out = make(inputs={"depth": "depth_gt"}, target="rgb", train=False, image_size=64)(sample)
    assert out["target"].dtype == torch.float32
    assert torch.equal(out["target"], normalize_rgb(torch.from_numpy(sample["rgb"]).permute(2, 0, 1)))


def test_full_crop_with_flip_is_exact():
    sample = block_sample(3, size=64)
    t = make(crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0), hflip=1.0, image_size=64)
    out = t(sample)
    flipped = {k: np.ascontiguousarray(v[:, ::-1]) for k, v in sample.items() if k != "__key__"}
    assert torch.equal(out["rgb"], torch.from_numpy(flipped["rgb"]).permute(2, 0, 1))
    assert torch.equal(out["depth"][0], torch.from_numpy(flipped["depth_gt"]))
    assert torch.equal(out["target"], torch.from_numpy(flipped["semseg_gt"]))
    assert torch.equal(out["semseg"], torch.from_numpy(flipped["semseg_gt"][2::4, 2::4]))


def test_same_seed_same_augmentation_other_seed_differs():
    sample = block_sample(5)
    a, b = make(seed=(7, 2, 0))(sample), make(seed=(7, 2, 0))(sample)
    c = make(seed=(7, 3, 0))(sample)
    assert all(torch.equal(a[k], b[k]) for k in ("rgb", "depth", "semseg", "target"))
    assert not torch.equal(a["rgb"], c["rgb"])


def test_eval_transform_resizes_whole_image_without_flip():
    sample = block_sample(4, size=128)
    out = make(train=False)(sample)
    assert torch.equal(out["target"], torch.from_numpy(sample["semseg_gt"][1::2, 1::2]))


def test_cls_target_and_missing_label_error():
    sample = block_sample(2)
    t = make(target="cls", inputs={"rgb": "rgb"})
    assert t({**sample, "cls": 3})["target"] == 3
    with pytest.raises(Exception, match="no cls label"):
        t(sample)


def test_reduce_zero_label():
    ids = torch.tensor([[0, 1, 2], [5, 0, 3], [255, 254, 1]])
    assert map_semseg_labels(ids, True, 255).tolist() == [[255, 0, 1], [4, 255, 2], [255, 253, 0]]  # 255 stays ignored
    assert torch.equal(map_semseg_labels(ids, False, 255), ids)


# --- the official fine-tuning recipes (multimae/train/augment.py) ---------------------------------


def check_aligned(out: dict, pad_rgb: float | None = None) -> np.ndarray:
    """The semseg target agrees with the depth input (a function of the source's red channel; colour jitter
    leaves depth alone) wherever both are inside the image; returns the pad mask."""
    red = (out["depth"][0].numpy() - 1.0) * 255.0
    target = out["target"].numpy()
    pad = target == 255
    cls_from_depth = np.clip(np.round((red - 16) / 32), 0, 7)
    inner = interior(target) & ~pad
    assert (cls_from_depth == target)[inner].all()
    assert np.isnan(out["depth"][0].numpy()[pad]).all() and not np.isnan(out["depth"][0].numpy()[~pad]).any()
    if pad_rgb is not None and pad.any():
        assert np.abs(red_of(out)[pad] - pad_rgb).max() < 1.0  # padding is grey in rgb exactly where labels are ignored
    return pad


@pytest.mark.parametrize("seed", range(8))
def test_semseg_recipe_large_scale_jitter_pads_and_stays_aligned(seed):
    sample = block_sample(seed, size=96)
    t = make(seed=(seed, 1, 0), augment="semseg", inputs={"rgb": "rgb", "depth": "depth_gt"}, image_size=64)
    out = t(sample)
    assert out["rgb"].shape == (3, 64, 64) and out["target"].shape == (64, 64)
    check_aligned(out, pad_rgb=128)


def test_semseg_recipe_pads_when_scaled_down_and_eval_keeps_aspect():
    sample = block_sample(1, size=96)
    sample = {k: (v[:48] if k != "__key__" else v) for k, v in sample.items()}  # 48 x 96: wide image
    inputs = {"rgb": "rgb", "depth": "depth_gt"}
    pads = [check_aligned(make(seed=(s, 0, 0), augment="semseg", inputs=inputs)(sample), 128) for s in range(6)]
    assert any(p.any() for p in pads)  # LSJ below 1 and a wide image leave padding
    out = make(train=False, augment="semseg", inputs=inputs, image_size=64)(sample)
    pad = check_aligned(out, pad_rgb=128)
    assert pad[:32].sum() == 0 and pad[32:].all()  # longest side to 64 -> 32 x 64, padded below


def test_depth_recipe_crops_the_shorter_side_and_color_touches_rgb_only():
    sample = block_sample(2, size=96)
    sample = {k: (v[:, :80] if k != "__key__" else v) for k, v in sample.items()}  # 96 x 80
    args = dict(augment="depth", inputs={"rgb": "rgb"}, target="depth_gt", image_size=64, color_augs=True)
    plain = make(seed=(3, 0, 0), **{**args, "color_augs": False})(sample)
    colored = make(seed=(3, 0, 0), **args)(sample)
    assert plain["target"].shape == (1, 64, 64) and torch.equal(plain["target"], colored["target"])
    depth_from_red = 1.0 + red_of(plain) / 255.0
    inner = interior((plain["target"][0].numpy() * 255).round())
    assert np.abs(plain["target"][0].numpy() - depth_from_red)[inner].max() < 0.01
    assert make(train=False, **args)(sample)["target"].shape == (1, 64, 64)


def test_cls_recipe_rand_augment_is_seeded_and_eval_center_crops():
    sample = {**block_sample(6, size=96), "cls": 2}
    args = dict(augment="cls", inputs={"rgb": "rgb"}, target="cls", image_size=64, rand_augment="rand-m9-mstd0.5-inc1")
    a, b = make(seed=(1, 0, 0), **args)(sample), make(seed=(1, 0, 0), **args)(sample)
    assert torch.equal(a["rgb"], b["rgb"]) and a["target"] == 2
    changed = [
        not torch.equal(
            make(seed=(s, 0, 0), **args)(sample)["rgb"],
            make(seed=(s, 0, 0), **{**args, "rand_augment": ""})(sample)["rgb"],
        )
        for s in range(8)
    ]  # each of RandAugment's 2 ops applies with p = 0.5 (same crop: the geometry draws come first)
    assert sum(changed) >= 4
    ev = make(train=False, **args)(sample)
    assert ev["rgb"].shape == (3, 64, 64)


def test_mixup_and_cutmix_give_soft_targets_from_timm():
    from timm.data import Mixup

    mixup = Mixup(mixup_alpha=0.8, cutmix_alpha=1.0, label_smoothing=0.1, num_classes=5)
    x, y = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 3])
    _, soft = mixup(x, y)
    assert soft.shape == (4, 5) and torch.allclose(soft.sum(1), torch.ones(4))


# --- depth meaning: one depth space for every depth modality --------------------------------------


def test_inverse_relative_depth_is_inverted_with_a_clip():
    from shards.depth_space import DISPARITY_CLIP, to_depth_space

    disparity = np.array([[4.0, 2.0], [1.0, 0.0]], dtype=np.float32)  # near = large
    depth = to_depth_space(disparity, "inverse_relative", "depth")
    assert depth[0, 0] < depth[0, 1] < depth[1, 0] < depth[1, 1]  # near = small now
    assert depth[1, 1] == pytest.approx(1 / (DISPARITY_CLIP * 4.0))  # zero disparity: clipped, not infinite
    metric = np.array([[1.0, 2.0]], dtype=np.float32)
    assert to_depth_space(metric, "metric_m", "depth") is metric
    assert (
        to_depth_space(metric, "metric_m", "inverse_depth")[0, 0]
        > to_depth_space(metric, "metric_m", "inverse_depth")[0, 1]
    )
    assert not to_depth_space(np.zeros((2, 2), np.float32), "inverse_relative").any()  # no signal: all missing
    with pytest.raises(Exception, match="unknown depth meaning"):
        to_depth_space(metric, "furlongs")


def test_sample_transform_reads_the_manifest_meaning():
    sample = block_sample(7, size=64)
    sample["depth"] = 1.0 / sample["depth_gt"]  # a teacher's disparity of the same scene
    common = dict(inputs={"rgb": "rgb", "depth": "depth"}, target="depth_gt", train=False, image_size=64)
    out = make(**common, depth_meanings={"depth": "inverse_relative", "depth_gt": "metric_m"})(sample)
    ratio = out["depth"][0] / out["target"][0]  # both depth-like now: equal up to the unknown scale
    assert torch.allclose(ratio, ratio.mean(), rtol=1e-3)
