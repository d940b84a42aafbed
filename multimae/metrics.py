"""Evaluation metrics as pure functions (the protocols of the MultiMAE paper, Sec. 4).

Every score in the toolkit comes from here: the trainer's evaluation, the teachers' quality check, the demo
report and the cross-modal probe.

- Depth (NYUv2 protocol): over the valid pixels of one image (finite target > 0), delta1 = share of pixels with
  max(p / t, t / p) < 1.25, AbsRel = mean |p - t| / t, RMSE = sqrt(mean (p - t)^2). **Each metric is computed
  per image and then averaged over images**, so every image counts the same whatever its valid-pixel count.
  `align_scale_shift` first fits s * p + t to the target by least squares (for relative-depth predictions).
- Semantic segmentation: a confusion matrix over labeled pixels (`ignore_index` left out); mIoU is the mean
  IoU over the classes that occur in the target or the prediction; pixel accuracy = correct / labeled pixels.
  Both are pooled over every pixel of the evaluation set.
- Classification: top-k = share of samples whose label is among the k largest logits.
- Surface normals (Taskonomy / Omnidata protocol): the per-pixel angle between prediction and target; mean and
  median angle (degrees) and the share of pixels under 11.25, 22.5 and 30 degrees, **pooled over every valid
  pixel of the set**. The median comes from a fixed histogram (`ANGLE_BIN_DEG` wide bins) so that it, like the
  other scores, is a function of sums that ranks can add.
- Other dense targets (any channel count): L1 (mean absolute error) and RMSE over the pixels whose target is finite,
  pooled over every valid pixel and channel of the set.

Percentages are fractions in [0, 1] here; reports multiply by 100.
"""

from __future__ import annotations

import torch

DELTA1_THRESHOLD = 1.25
ANGLE_THRESHOLDS_DEG = (11.25, 22.5, 30.0)
ANGLE_BIN_DEG = 0.01  # median resolution: 18000 bins over [0, 180], 144 KB of float64 to all_reduce
ANGLE_BINS = round(180 / ANGLE_BIN_DEG)
# normal_sums layout: sum of angles, pixel count, one count per threshold, then the histogram
NORMAL_SUMS_SIZE = 2 + len(ANGLE_THRESHOLDS_DEG) + ANGLE_BINS


def valid_depth(target: torch.Tensor) -> torch.Tensor:
    """Pixels with a usable depth target: finite and > 0 (missing depth is stored as 0)."""
    return torch.isfinite(target) & (target > 0)


def align_scale_shift(pred: torch.Tensor, target: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
    """Least-squares s, t with s * pred + t ~ target over the valid pixels of one image -> aligned (H, W)."""
    valid = valid_depth(target) if valid is None else valid
    p, t = pred[valid].double(), target[valid].double()
    a = torch.stack([p, torch.ones_like(p)], dim=1)  # (n, 2)
    s, shift = torch.linalg.lstsq(a, t[:, None]).solution[:, 0]
    return (pred.double() * s + shift).to(pred.dtype)


def depth_errors(pred: torch.Tensor, target: torch.Tensor, min_depth: float = 1e-6) -> dict[str, float] | None:
    """delta1, AbsRel and RMSE of one image (H, W) over its valid pixels; None when it has none.

    Predictions are clamped to `min_depth` so that ratios stay finite.
    """
    valid = valid_depth(target)
    if not bool(valid.any()):
        return None
    p, t = pred[valid].double().clamp_min(min_depth), target[valid].double()
    ratio = torch.maximum(p / t, t / p)
    return {
        "delta1": (ratio < DELTA1_THRESHOLD).double().mean().item(),
        "AbsRel": ((p - t).abs() / t).mean().item(),
        "RMSE": (p - t).pow(2).mean().sqrt().item(),
    }


def mean_depth_errors(preds, targets, align: bool = False) -> dict[str, float]:
    """Per-image depth errors averaged over images (images without a valid pixel are left out).

    preds, targets: iterables of (H, W) tensors. align: fit scale and shift per image first.
    """
    sums = {"delta1": 0.0, "AbsRel": 0.0, "RMSE": 0.0}
    n = 0
    for p, t in zip(preds, targets):
        errors = depth_errors(align_scale_shift(p, t) if align else p, t)
        if errors is None:
            continue
        for k, v in errors.items():
            sums[k] += v
        n += 1
    return {**{k: v / max(n, 1) for k, v in sums.items()}, "images": n}


def confusion_matrix(
    pred: torch.Tensor, target: torch.Tensor, num_classes: int, ignore_index: int = 255
) -> torch.Tensor:
    """(K, K) int64 counts [target class, predicted class] over pixels whose target is a class in [0, K)."""
    p, t = pred.flatten().long(), target.flatten().long()
    keep = (t != ignore_index) & (t >= 0) & (t < num_classes)
    idx = t[keep] * num_classes + p[keep].clamp(0, num_classes - 1)
    return torch.bincount(idx, minlength=num_classes**2).view(num_classes, num_classes)


def segmentation_scores(confusion: torch.Tensor) -> dict[str, float]:
    """mIoU over classes present in target or prediction, and pixel accuracy, from a confusion matrix."""
    cm = confusion.double()
    tp = cm.diag()
    union = cm.sum(0) + cm.sum(1) - tp
    present = union > 0
    total = cm.sum().item()
    return {
        "mIoU": (tp[present] / union[present]).mean().item() if bool(present.any()) else 0.0,
        "pixel_acc": tp.sum().item() / total if total else 0.0,
    }


def topk_correct(logits: torch.Tensor, target: torch.Tensor, k: int) -> int:
    """Number of samples whose label is among the k largest logits; logits (B, K), target (B,)."""
    topk = logits.topk(min(k, logits.shape[1]), dim=1).indices  # (B, k)
    return int((topk == target[:, None]).any(dim=1).sum())


def angular_errors_deg(pred: torch.Tensor, target: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
    """Angles in degrees (float64, 1-D) between pred and target normals (B, 3, H, W) at the valid pixels.

    A pixel is valid when its target is finite with a non-zero norm (an all-zero target marks a missing pixel),
    and `valid` (B, H, W) is true there when given. pred need not be unit length; a zero-length or non-finite
    prediction has no direction and counts as 90 degrees (the mean angle of a random guess), not as 0.
    """
    p, t = pred.double(), target.double()
    keep = torch.isfinite(t).all(1) & (t.norm(dim=1) > 0)  # (B, H, W)
    if valid is not None:
        keep &= valid.bool()
    p, t = p.movedim(1, -1)[keep], t.movedim(1, -1)[keep]  # (n, 3)
    no_direction = ~torch.isfinite(p).all(1) | (p.norm(dim=1) < 1e-12)  # (n,)
    p = torch.where(no_direction[:, None], 0.0, p)
    p = p / p.norm(dim=1, keepdim=True).clamp_min(1e-12)
    t = t / t.norm(dim=1, keepdim=True)
    # atan2(|p x t|, p . t): accurate near 0 and 180 degrees, where acos(p . t) loses precision
    angle = torch.atan2(torch.linalg.cross(p, t, dim=1).norm(dim=1), (p * t).sum(1)).rad2deg()
    return torch.where(no_direction, 90.0, angle)


def normal_sums(angles: torch.Tensor) -> torch.Tensor:
    """Summable statistics (NORMAL_SUMS_SIZE,) float64 of a 1-D tensor of angles in degrees.

    Sums from several batches or ranks add up to the sums of their union; `normal_scores` turns them into scores.
    """
    a = angles.double().flatten()
    under = [(a < th).sum() for th in ANGLE_THRESHOLDS_DEG]
    bins = (a / ANGLE_BIN_DEG).long().clamp(0, ANGLE_BINS - 1)  # 180 degrees exactly goes to the last bin
    hist = torch.bincount(bins, minlength=ANGLE_BINS).double()
    return torch.cat([torch.stack([a.sum(), torch.tensor(float(a.numel()), dtype=torch.float64), *under]), hist])


def normal_scores(sums: torch.Tensor) -> dict[str, float]:
    """mean_angle_deg, median_angle_deg and within_{11.25,22.5,30} (fractions) from `normal_sums` of a set.

    The median is where the histogram's cumulative count reaches half the pixels, with pixels spread evenly
    within their bin: it is within ANGLE_BIN_DEG of the sorted angles' middle value.
    """
    s = sums.double()
    n = s[1].item()
    hist = s[2 + len(ANGLE_THRESHOLDS_DEG) :]
    out = {"mean_angle_deg": s[0].item() / n if n else 0.0, "median_angle_deg": 0.0}
    if n:
        cum = hist.cumsum(0)
        k = int(torch.searchsorted(cum, torch.tensor([n / 2], dtype=torch.float64)).item())  # first cum >= n / 2
        before = cum[k - 1].item() if k else 0.0
        out["median_angle_deg"] = (k + (n / 2 - before) / hist[k].item()) * ANGLE_BIN_DEG
    for i, th in enumerate(ANGLE_THRESHOLDS_DEG):
        out[f"within_{th:g}"] = s[2 + i].item() / n if n else 0.0
    return out


def dense_error_sums(pred: torch.Tensor, target: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
    """Summable (4,) float64: sum |p - t|, sum (p - t)^2, valid values, valid pixels.

    pred, target: (B, C, H, W), or (B, H, W) for one channel. A pixel is valid when all its target channels are
    finite (and `valid` (B, H, W) is true there when given); every channel of a valid pixel is one value.
    """
    # (B, H, W) -> (B, 1, H, W), each on its own: a (B, H, W) prediction may meet a (B, 1, H, W) target
    p, t = (x.double()[:, None] if x.dim() == 3 else x.double() for x in (pred, target))
    keep = torch.isfinite(t).all(1)  # (B, H, W)
    if valid is not None:
        keep &= valid.bool()
    d = (p - t).movedim(1, -1)[keep]  # (n, C)
    n_pixels = torch.tensor(float(d.shape[0]), dtype=torch.float64)
    return torch.stack([d.abs().sum(), d.pow(2).sum(), torch.tensor(float(d.numel()), dtype=torch.float64), n_pixels])


def dense_scores(sums: torch.Tensor) -> dict[str, float]:
    """L1 and RMSE pooled over every valid value of the set, from `dense_error_sums`."""
    n = sums[2].item()
    if not n:
        return {"L1": 0.0, "RMSE": 0.0}
    return {"L1": sums[0].item() / n, "RMSE": (sums[1].item() / n) ** 0.5}
