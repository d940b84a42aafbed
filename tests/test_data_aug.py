"""The trainer's joint augmentation: one crop and one flip for all modalities of a sample (multimae/data.py)."""

import numpy as np
import pytest
import torch

from multimae.train.data import SampleTransform, crop_params, denormalize_rgb, map_semseg_labels, normalize_rgb


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
    return (denormalize_rgb(out["rgb"])[0] * 255).numpy()  # (S, S)


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
    assert out["rgb"].shape == (3, 64, 64) and out["rgb"].dtype == torch.float32
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


def test_full_crop_with_flip_is_exact():
    sample = block_sample(3, size=64)
    t = make(crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0), hflip=1.0, image_size=64)
    out = t(sample)
    flipped = {k: np.ascontiguousarray(v[:, ::-1]) for k, v in sample.items() if k != "__key__"}
    expected_rgb = normalize_rgb(torch.from_numpy(flipped["rgb"]).permute(2, 0, 1))
    assert torch.equal(out["rgb"], expected_rgb)
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
    ids = torch.tensor([[0, 1, 2], [5, 0, 3]])
    assert map_semseg_labels(ids, True, 255).tolist() == [[255, 0, 1], [4, 255, 2]]
    assert torch.equal(map_semseg_labels(ids, False, 255), ids)
