"""Pre-training losses on masked tokens (MultiMAE paper, Sec. 3.4 and Appendix A).

* rgb: MSE; `norm_rgb`: MSE against per-patch normalized pixels (MAE's norm-pix target);
* depth: L1 on depth standardized per image with 10-90 % trimmed statistics
  (`robust_standardize_depth`, applied by the data path to both input and target);
* semseg: cross-entropy on the class map at stride 4.

As in the official criterion, each loss is averaged over the pixels of the masked patches of a
sample, then over the samples that have masked patches (the official `nanmean`); a task without
any masked patch in the batch contributes 0. Computation is per patch (patchify, mean per patch,
weighted by the (B, N) token mask), which equals the official pixel-level formulation without
upsampling the mask. Optional uncertainty weighting (Kendall et al., 2018) as in the official
`UncertaintyWeightingStrategy`.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn as nn
import torch.nn.functional as F

from shards import modalities


def robust_standardize_depth(
    depth: torch.Tensor, mask: torch.Tensor | None = None, trim: float = 0.1, eps: float = 1e-6
) -> torch.Tensor:
    """Standardize each image with the mean and variance of its 10-90 % value range.

    depth: (B, 1, H, W) or (B, H, W) float; mask: same shape, bool, True = valid pixel (optional).
    Per image the values are sorted, the lowest and highest `trim` fraction dropped (indices
    [int(0.1 n), int(0.9 n)) as official), and (depth - mean) / sqrt(var + eps) returned, with the
    unbiased variance. Invalid pixels do not enter the statistics (their output is still defined).
    """
    B = depth.shape[0]
    flat = depth.reshape(B, -1).float()  # (B, n)
    n = flat.shape[1]
    if mask is None:
        vals = flat.sort(dim=1).values[:, int(trim * n) : int((1 - trim) * n)]  # (B, n_kept)
        mean, var = vals.mean(1), vals.var(1)
    else:
        valid = mask.reshape(B, -1).bool()
        n_valid = valid.sum(1)  # (B,)
        vals = torch.where(valid, flat, torch.full_like(flat, float("inf"))).sort(dim=1).values
        pos = torch.arange(n, device=depth.device)[None, :]
        lo, hi = (trim * n_valid).long(), ((1 - trim) * n_valid).long()  # int() per image
        keep = (pos >= lo[:, None]) & (pos < hi[:, None])
        cnt = keep.sum(1).clamp(min=1)
        vals = torch.where(keep, vals, torch.zeros_like(vals))
        mean = vals.sum(1) / cnt
        var = torch.where(keep, (vals - mean[:, None]) ** 2, torch.zeros_like(vals)).sum(1) / (cnt - 1).clamp(min=1)
    shape = (B,) + (1,) * (depth.ndim - 1)
    return ((depth.float() - mean.view(shape)) / torch.sqrt(var.view(shape) + eps)).to(depth.dtype)


def patchify(x: torch.Tensor, p: int) -> torch.Tensor:
    """(B, C, H, W) -> (B, H/p * W/p, p*p*C), pixels of a patch row-major, channels last (as official)."""
    B, C, H, W = x.shape
    x = x.reshape(B, C, H // p, p, W // p, p).permute(0, 2, 4, 3, 5, 1)  # (B, nh, nw, p, p, C)
    return x.reshape(B, (H // p) * (W // p), p * p * C)


def normalize_patches(target: torch.Tensor, p: int, eps: float = 1e-6) -> torch.Tensor:
    """Per-patch normalized pixels (MAE norm-pix target) in patch layout (B, N, p*p*C)."""
    t = patchify(target, p)
    return (t - t.mean(-1, keepdim=True)) / torch.sqrt(t.var(-1, keepdim=True) + eps)


def _masked_mean(patch_loss: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """(B, N) per-patch loss, (B, N) mask (1 = masked, counted) -> scalar.

    Mean over the masked patches of each sample, then over samples with any masked patch;
    0 when no sample has one. NaN/inf in counted patches propagates (it must stop training).
    """
    if mask is None:
        return patch_loss.mean()
    if mask.shape != patch_loss.shape:
        raise ValueError(
            f"mask shape {tuple(mask.shape)} does not match the {tuple(patch_loss.shape)} patch grid of the prediction"
        )
    m = mask.to(patch_loss.dtype)
    n = m.sum(1)  # (B,)
    per_sample = (patch_loss * m).sum(1) / n.clamp(min=1)
    has = (n > 0).to(patch_loss.dtype)
    return (per_sample * has).sum() / has.sum().clamp(min=1)


def _check_grid(pred: torch.Tensor, target: torch.Tensor, p: int, name: str) -> None:
    if pred.shape[-2:] != target.shape[-2:] or pred.shape[-1] % p or pred.shape[-2] % p:
        raise ValueError(
            f"'{name}': prediction {tuple(pred.shape)} and target {tuple(target.shape)} "
            f"must have the same size, divisible by the patch size {p}"
        )


def masked_mse_loss(
    pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None, p: int, norm_pix: bool = False
) -> torch.Tensor:
    """MSE over masked patches; pred/target (B, C, H, W), mask (B, H/p * W/p) with 1 = masked."""
    _check_grid(pred, target, p, "mse")
    t = normalize_patches(target.float(), p) if norm_pix else patchify(target.float(), p)
    return _masked_mean(((patchify(pred.float(), p) - t) ** 2).mean(-1), mask)


def masked_l1_loss(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None, p: int) -> torch.Tensor:
    """L1 over masked patches; pred/target (B, C, H, W), mask (B, H/p * W/p) with 1 = masked."""
    _check_grid(pred, target, p, "l1")
    return _masked_mean((patchify(pred.float(), p) - patchify(target.float(), p)).abs().mean(-1), mask)


def masked_cross_entropy(
    logits: torch.Tensor,
    target: torch.Tensor,
    mask: torch.Tensor | None,
    p: int,
    label_smoothing: float = 0.0,
    ignore_index: int = -100,
) -> torch.Tensor:
    """Cross-entropy over masked patches; logits (B, K, h, w), target (B, h, w) int64 class ids."""
    _check_grid(logits, target, p, "cross-entropy")
    ce = F.cross_entropy(
        logits.float(), target.long(), reduction="none", label_smoothing=label_smoothing, ignore_index=ignore_index
    )  # (B, h, w)
    return _masked_mean(patchify(ce[:, None], p).mean(-1), mask)


class UncertaintyWeighting(nn.Module):
    """Learned task weighting: loss_t -> exp(-s_t) * loss_t + s_t; a zero loss stays zero."""

    def __init__(self, tasks: Iterable[str]) -> None:
        super().__init__()
        self.tasks = list(tasks)
        self.log_vars = nn.Parameter(torch.zeros(len(self.tasks)))

    def forward(self, losses: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        out = dict(losses)
        for i, task in enumerate(self.tasks):
            if task in losses:
                loss = losses[task]
                out[task] = (torch.exp(-self.log_vars[i]) * loss + self.log_vars[i]) * (loss != 0)
        return out


def task_losses() -> dict[str, tuple[str, int]]:
    """Loss kind and stride (target resolution = image / stride) per output task: each registered kind's
    `pretrain_loss` and input stride (rgb mse, depth l1, semseg ce at 1/4, normals l1, ...), plus norm_rgb."""
    entries = [modalities.get(k) for k in modalities.kinds()]
    return {**{m.kind: (m.pretrain_loss, m.input_stride) for m in entries}, "norm_rgb": ("norm_mse", 1)}


def pretraining_loss(
    preds: dict[str, torch.Tensor],
    targets: dict[str, torch.Tensor],
    masks: dict[str, torch.Tensor],
    patch_size: int = 16,
    loss_on_unmasked: bool = False,
    weighting: nn.Module | None = None,
    extra_losses: dict[str, tuple[str, int]] | None = None,
) -> dict[str, torch.Tensor]:
    """Per-task masked losses and their sum under "total".

    preds: model outputs; targets: the batch (rgb (B,3,H,W), depth (B,1,H,W) already robustly
    standardized, semseg (B,H/4,W/4) int64); masks: the model's (B, N) masks, 1 = masked.
    `norm_rgb` is scored against `targets["rgb"]` with the rgb mask. A task that was not an input
    has no mask and is scored on all its pixels (as official). `weighting` (e.g.
    `UncertaintyWeighting`) maps the raw losses to the ones summed into "total"; the raw ones are
    returned under their task names, the weighted ones under "<task>_weighted".
    """
    kinds = {**task_losses(), **(extra_losses or {})}
    losses: dict[str, torch.Tensor] = {}
    for task, pred in preds.items():
        if task not in kinds:
            raise KeyError(f"no loss defined for output task '{task}' (known: {sorted(kinds)})")
        kind, stride = kinds[task]
        source = "rgb" if task == "norm_rgb" else task
        if source not in targets:
            raise KeyError(f"target '{source}' for output task '{task}' is missing from the batch")
        target = targets[source]
        mask = None if loss_on_unmasked else masks.get(source)
        p = max(1, patch_size // stride)
        if kind == "ce":
            losses[task] = masked_cross_entropy(pred, target, mask, p)
        elif kind == "l1":
            losses[task] = masked_l1_loss(pred, target, mask, p)
        else:
            losses[task] = masked_mse_loss(pred, target, mask, p, norm_pix=kind == "norm_mse")
    weighted = weighting(losses) if weighting is not None else losses
    out = dict(losses)
    if weighting is not None:
        out.update({f"{t}_weighted": v for t, v in weighted.items()})
    out["total"] = torch.stack(list(weighted.values())).sum()
    return out


# ---------------------------------------------------------------- fine-tuning


def berhu_loss(pred: torch.Tensor, target: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Reverse Huber on valid pixels; threshold c = 0.2 x max |error| of the batch (official depth fine-tuning)."""
    err = (pred - target).abs()[valid]
    c = (0.2 * err.max()).clamp_min(1e-6).detach()
    return torch.where(err <= c, err, (err**2 + c**2) / (2 * c)).mean()


def finetune_loss(
    objective: str,
    output: torch.Tensor,
    target: torch.Tensor,
    *,
    label_smoothing: float = 0.0,
    ignore_index: int = 255,
    depth_loss: str = "berhu",
    dense_loss: str = "l1",
    unit_vectors: bool = False,
) -> torch.Tensor:
    """The loss of one fine-tuning objective, in float32.

    cls: logits (B, K), target (B,) int or (B, K) probabilities (mixed targets carry their own smoothing);
    semseg: logits (B, K, H, W), target (B, H, W) int (`ignore_index` pixels left out);
    depth: prediction (B, 1, H, W) or (B, H, W), target the same, scored on valid pixels (finite, > 0) with
    BerHu (official) or L1. A batch without a valid depth pixel gives a zero loss that
    still reaches every parameter.
    dense (any dense modality): prediction (B, C, H, W), target the same ((B, H, W) for C = 1), scored on valid
    pixels (finite; for `unit_vectors` also non-zero, zero marking a missing normal) with `dense_loss`: "l1"
    (mean absolute error over channels) or "angular" (mean angle in radians between prediction and target).
    """
    if objective == "dense":
        return dense_loss_of(output, target, dense_loss, unit_vectors)
    if objective == "cls":  # target: class ids (B,), or class probabilities (B, K) after Mixup / CutMix
        smoothing = 0.0 if target.is_floating_point() else label_smoothing
        return F.cross_entropy(output.float(), target, label_smoothing=smoothing)
    if objective == "semseg":
        return F.cross_entropy(output.float(), target, ignore_index=ignore_index)
    if objective != "depth":
        raise ValueError(f"unknown fine-tuning objective {objective!r} (known: cls, semseg, depth, dense)")
    pred = output.float()[:, 0] if output.dim() == 4 else output.float()  # (B, H, W)
    tgt = target[:, 0] if target.dim() == 4 else target
    valid = torch.isfinite(tgt) & (tgt > 0)
    if not valid.any():
        return pred.sum() * 0.0
    if depth_loss == "berhu":
        return berhu_loss(pred, tgt, valid)
    return (pred - tgt).abs()[valid].mean()


def dense_loss_of(output: torch.Tensor, target: torch.Tensor, loss: str, unit_vectors: bool) -> torch.Tensor:
    """The `dense` objective's loss (see `finetune_loss`), in float32."""
    pred = output.float()
    tgt = target.float()
    if tgt.dim() == 3:
        tgt = tgt[:, None]  # (B, H, W) -> (B, 1, H, W)
    if pred.shape != tgt.shape:
        raise ValueError(f"dense prediction {tuple(pred.shape)} and target {tuple(tgt.shape)} differ")
    valid = torch.isfinite(tgt).all(1)  # (B, H, W)
    if unit_vectors:
        valid &= tgt.abs().sum(1) > 0
    if not valid.any():
        return pred.sum() * 0.0
    p, t = pred.permute(0, 2, 3, 1)[valid], tgt.permute(0, 2, 3, 1)[valid]  # (n, C)
    if loss == "l1":
        return (p - t).abs().mean()
    if loss == "angular":
        cos = F.cosine_similarity(p, t, dim=1, eps=1e-6)
        return torch.acos(cos.clamp(-1 + 1e-6, 1 - 1e-6)).mean()  # clamped: acos' gradient is infinite at +-1
    raise ValueError(f"unknown dense loss {loss!r} (known: l1, angular)")
