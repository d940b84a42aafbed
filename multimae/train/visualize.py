"""Reconstruction pictures of MultiMAE pre-training (as the paper's figures).

One row per sample; columns: the masked input of every input modality (masked patches greyed out), then the
prediction and the target of every predicted modality (`norm_rgb` is left out: its per-patch normalized
pixels are not a picture). RGB is de-normalized, depth is colour-mapped with the target's range, semseg ids
use the palette of `multimae-shard show`.
"""

from __future__ import annotations

import os
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from multimae.input_adapters import SEMSEG_STRIDE  # noqa: E402
from shards import modalities  # noqa: E402
from shards.show import DEPTH_CMAP, normals_picture, palette  # noqa: E402

from .data import denormalize_rgb  # noqa: E402


def _pixel_mask(mask: torch.Tensor, size: tuple[int, int], grid: tuple[int, int]) -> np.ndarray:
    """(N,) token mask (1 = masked) -> (H, W) bool pixel mask."""
    m = mask.float().view(1, 1, *grid)
    return F.interpolate(m, size=size, mode="nearest")[0, 0].bool().cpu().numpy()


def _picture(domain: str, x: torch.Tensor, lo: float | None = None, hi: float | None = None) -> np.ndarray:
    """One modality of one sample -> (H, W, 3) float image in [0, 1]."""
    rule = modalities.find("rgb" if domain == "norm_rgb" else domain)
    picture = rule.picture if rule is not None else "colormap"  # the kind's picture rule, as `show` draws it
    if picture == "image":
        return denormalize_rgb(x).permute(1, 2, 0).cpu().numpy()  # (3, H, W) -> (H, W, 3)
    if picture == "normals":
        v = x.float().permute(1, 2, 0).cpu().numpy()  # (3, H, W) -> (H, W, 3), predictions not quite unit
        return normals_picture(v / np.maximum(np.linalg.norm(v, axis=-1, keepdims=True), 1e-6)) / 255.0
    if picture == "palette" and x.dim() == 3 and x.shape[0] > 1:  # semseg logits (K, H, W)
        x = x.argmax(0)
    if x.dtype in (torch.int64, torch.int32):
        ids = x.cpu().numpy()
        return palette(int(ids.max()) + 1)[ids]  # the colours of `multimae-shard show`
    d = x.float().squeeze(0).cpu().numpy()  # depth (H, W)
    lo = float(np.min(d)) if lo is None else lo
    hi = float(np.max(d)) if hi is None else hi
    return plt.get_cmap(DEPTH_CMAP)(np.clip((d - lo) / max(hi - lo, 1e-6), 0, 1))[..., :3]


def save_reconstruction_png(
    path: str,
    batch: dict[str, Any],
    preds: dict[str, torch.Tensor],
    masks: dict[str, torch.Tensor],
    inputs: dict[str, str],
    patch_size: int,
) -> str:
    """Write the picture grid for the samples of `batch` to `path` (PNG); returns the path."""
    in_domains = list(inputs)
    out_domains = [d for d in preds if d != "norm_rgb" and d in batch]
    n = len(batch["__key__"])
    cols = [(f"{d} (masked)", "in", d) for d in in_domains]
    for d in out_domains:
        cols += [(f"{d} pred", "pred", d), (f"{d} target", "target", d)]
    fig, axes = plt.subplots(n, len(cols), figsize=(2.0 * len(cols), 2.0 * n), squeeze=False)
    first = batch[in_domains[0]]  # (B, C, S, S), or (B, S/4, S/4) semseg class ids
    size = first.shape[-1] * (1 if first.dim() == 4 else SEMSEG_STRIDE)
    grid = (size // patch_size, size // patch_size)
    for i in range(n):
        for j, (title, what, d) in enumerate(cols):
            target = batch[d][i]
            lo = hi = None
            if target.dtype.is_floating_point and target.dim() == 3 and target.shape[0] == 1:  # scalar colour range
                lo, hi = float(target.min()), float(target.max())
            if what == "pred":
                img = _picture(d, preds[d][i].float(), lo, hi)
            else:
                img = _picture(d, target, lo, hi)
            if what == "in" and d in masks:
                img = img.copy()
                img[_pixel_mask(masks[d][i], img.shape[:2], grid)] = 0.5
            ax = axes[i, j]
            ax.imshow(img, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                ax.set_title(title, fontsize=8)
        axes[i, 0].set_ylabel(str(batch["__key__"][i]), fontsize=6)
    fig.tight_layout()
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path
