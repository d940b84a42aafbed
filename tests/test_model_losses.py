"""Masked losses against the official pixel-level formulation; robust depth standardization
against numpy; visible tokens never change the loss; uncertainty weighting."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import multimae
from multimae.losses import masked_cross_entropy, masked_l1_loss, masked_mse_loss, patchify

pytestmark = pytest.mark.usefixtures("one_thread")


def official_pixel_loss(pixel_loss, mask, p):
    """Official criterion: upsample the (B, N) mask to pixels, mean per sample, nanmean over batch."""
    B, H, W = pixel_loss.shape
    m = mask.reshape(B, H // p, W // p).float()
    m = F.interpolate(m[:, None], size=(H, W), mode="nearest")[:, 0]
    if m.sum() == 0:
        return torch.tensor(0.0)
    return ((pixel_loss * m).flatten(1).sum(1) / m.flatten(1).sum(1)).nanmean()


@pytest.fixture
def data():
    g = torch.Generator().manual_seed(0)
    B, p = 3, 4
    mask = (torch.rand(B, 16, generator=g) < 0.6).long()
    mask[2] = 0  # a sample without masked tokens: excluded from the batch mean, as official
    return dict(
        pred=torch.randn(B, 3, 16, 16, generator=g),
        target=torch.randn(B, 3, 16, 16, generator=g),
        logits=torch.randn(B, 7, 16, 16, generator=g),
        classes=torch.randint(0, 7, (B, 16, 16), generator=g),
        mask=mask,
        p=p,
    )


def test_losses_equal_the_official_pixel_formulation(data):
    d = data
    mse = official_pixel_loss(((d["pred"] - d["target"]) ** 2).mean(1), d["mask"], d["p"])
    torch.testing.assert_close(masked_mse_loss(d["pred"], d["target"], d["mask"], d["p"]), mse)
    l1 = official_pixel_loss((d["pred"] - d["target"]).abs().mean(1), d["mask"], d["p"])
    torch.testing.assert_close(masked_l1_loss(d["pred"], d["target"], d["mask"], d["p"]), l1)
    ce = official_pixel_loss(F.cross_entropy(d["logits"], d["classes"], reduction="none"), d["mask"], d["p"])
    torch.testing.assert_close(masked_cross_entropy(d["logits"], d["classes"], d["mask"], d["p"]), ce)
    # norm-pix: target normalized per patch (unbiased variance, eps 1e-6), official patch layout
    t = patchify(d["target"], 4)
    t = (t - t.mean(-1, keepdim=True)) / torch.sqrt(t.var(-1, keepdim=True) + 1e-6)
    t_img = t.reshape(3, 4, 4, 4, 4, 3).permute(0, 5, 1, 3, 2, 4).reshape(3, 3, 16, 16)
    norm = official_pixel_loss(((d["pred"] - t_img) ** 2).mean(1), d["mask"], d["p"])
    torch.testing.assert_close(masked_mse_loss(d["pred"], d["target"], d["mask"], d["p"], norm_pix=True), norm)


def test_changing_predictions_at_visible_tokens_leaves_the_loss_unchanged(data):
    d = data
    visible_px = F.interpolate((1 - d["mask"]).reshape(3, 1, 4, 4).float(), size=(16, 16))  # 1 = visible
    for fn, pred, target in [
        (masked_mse_loss, d["pred"], d["target"]),
        (masked_l1_loss, d["pred"], d["target"]),
        (masked_cross_entropy, d["logits"], d["classes"]),
    ]:
        base = fn(pred, target, d["mask"], 4)
        assert fn(pred + 100 * visible_px, target, d["mask"], 4) == base
        assert fn(pred + 100 * (1 - visible_px), target, d["mask"], 4) != base


def test_no_masked_token_gives_zero_and_nan_still_propagates(data):
    d = data
    zero = torch.zeros_like(d["mask"])
    assert masked_mse_loss(d["pred"], d["target"], zero, 4).item() == 0.0
    bad = d["pred"].clone()
    bad[0, 0, 0, 0] = float("nan")
    full = torch.ones_like(d["mask"])
    assert torch.isnan(masked_mse_loss(bad, d["target"], full, 4))
    with pytest.raises(ValueError, match="same size"):
        masked_mse_loss(d["pred"][..., :8], d["target"], d["mask"], 4)


def test_robust_standardize_depth_equals_numpy():
    rng = np.random.default_rng(0)
    depth = rng.gamma(2.0, 3.0, size=(4, 1, 24, 20)).astype(np.float32)
    depth[1, 0, :3] = 1e4  # outliers in the top 10 % do not move the statistics
    out = multimae.robust_standardize_depth(torch.from_numpy(depth)).numpy()
    for b in range(4):
        v = np.sort(depth[b].ravel())
        n = v.size
        kept = v[int(0.1 * n) : int(0.9 * n)].astype(np.float64)
        expect = (depth[b] - kept.mean()) / np.sqrt(kept.var(ddof=1) + 1e-6)
        np.testing.assert_allclose(out[b], expect, rtol=1e-4, atol=1e-5)


def test_robust_standardize_depth_with_validity_mask_equals_numpy_on_valid_pixels():
    rng = np.random.default_rng(1)
    depth = rng.uniform(0.5, 10, size=(3, 1, 16, 16)).astype(np.float32)
    valid = rng.random((3, 1, 16, 16)) > np.array([0.1, 0.5, 0.8])[:, None, None, None]
    depth[~valid] = 0.0  # invalid pixels (e.g. holes) must not enter the statistics
    out = multimae.robust_standardize_depth(torch.from_numpy(depth), torch.from_numpy(valid)).numpy()
    for b in range(3):
        v = np.sort(depth[b][valid[b]])
        n = v.size
        kept = v[int(0.1 * n) : int(0.9 * n)].astype(np.float64)
        expect = (depth[b] - kept.mean()) / np.sqrt(kept.var(ddof=1) + 1e-6)
        np.testing.assert_allclose(out[b][valid[b]], expect[valid[b]], rtol=1e-4, atol=1e-5)


def test_pretraining_loss_maps_tasks_strides_and_masks():
    g = torch.Generator().manual_seed(0)
    B = 2
    targets = {
        "rgb": torch.randn(B, 3, 32, 32, generator=g),
        "depth": torch.randn(B, 1, 32, 32, generator=g),
        "semseg": torch.randint(0, 5, (B, 8, 8), generator=g),
    }
    preds = {
        "rgb": torch.randn(B, 3, 32, 32, generator=g),
        "norm_rgb": torch.randn(B, 3, 32, 32, generator=g),
        "depth": torch.randn(B, 1, 32, 32, generator=g),
        "semseg": torch.randn(B, 5, 8, 8, generator=g),
    }
    masks = {"rgb": torch.tensor([[1, 0, 1, 0], [0, 0, 1, 1]]), "semseg": torch.tensor([[1, 1, 0, 0], [0, 1, 0, 1]])}
    out = multimae.pretraining_loss(preds, targets, masks, patch_size=16)
    torch.testing.assert_close(out["rgb"], masked_mse_loss(preds["rgb"], targets["rgb"], masks["rgb"], 16))
    torch.testing.assert_close(
        out["norm_rgb"], masked_mse_loss(preds["norm_rgb"], targets["rgb"], masks["rgb"], 16, True)
    )
    torch.testing.assert_close(
        out["semseg"], masked_cross_entropy(preds["semseg"], targets["semseg"], masks["semseg"], 4)
    )
    torch.testing.assert_close(
        out["depth"], (preds["depth"] - targets["depth"]).abs().mean()
    )  # not an input: all pixels
    torch.testing.assert_close(out["total"], out["rgb"] + out["norm_rgb"] + out["depth"] + out["semseg"])
    with pytest.raises(KeyError, match="'depth'"):
        multimae.pretraining_loss(preds, {k: v for k, v in targets.items() if k != "depth"}, masks)


def test_uncertainty_weighting_matches_official_rule():
    w = multimae.UncertaintyWeighting(["rgb", "depth"])
    with torch.no_grad():
        w.log_vars.copy_(torch.tensor([0.5, -1.0]))
    losses = {"rgb": torch.tensor(2.0), "depth": torch.tensor(0.0)}
    out = w(losses)
    torch.testing.assert_close(out["rgb"], torch.exp(torch.tensor(-0.5)) * 2.0 + 0.5)
    assert out["depth"].item() == 0.0  # a dropped task adds nothing, not its log-variance
    total = multimae.pretraining_loss(
        {"rgb": torch.zeros(1, 3, 16, 16)}, {"rgb": torch.ones(1, 3, 16, 16)}, {"rgb": torch.ones(1, 1)}, weighting=w
    )
    torch.testing.assert_close(total["total"], total["rgb_weighted"])
    torch.testing.assert_close(total["rgb"], torch.tensor(1.0))
