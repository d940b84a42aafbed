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

Percentages are fractions in [0, 1] here; reports multiply by 100.
"""

from __future__ import annotations

import torch

DELTA1_THRESHOLD = 1.25


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
