"""Fine-tuning evaluation: metrics, the eval loop and the zarr prediction dump (DESIGN.md section 6).

Metrics are sums kept in tensors, so ranks can add them with one all_reduce:
  - classification: top-1 (and top-5 when there are at least 5 classes);
  - semantic segmentation: mIoU (mean over classes that occur in target or prediction) and pixel accuracy,
    from a confusion matrix; `ignore_index` pixels are left out;
  - depth: delta1 (share of pixels with max(p/t, t/p) < 1.25), AbsRel (|p - t| / t) and RMSE, computed per
    image over valid pixels (finite target > 0) and averaged over images, as in the NYUv2 protocol.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import numpy as np
import torch

from shards import fs


class ClsMetric:
    def __init__(self, num_classes: int):
        self.k = min(5, num_classes)
        self.sums = torch.zeros(3, dtype=torch.float64)  # correct@1, correct@k, count

    def update(self, logits: torch.Tensor, target: torch.Tensor) -> None:
        """logits (B, K), target (B,) int."""
        topk = logits.topk(self.k, dim=1).indices.cpu()  # (B, k)
        t = target.cpu()[:, None]
        self.sums += torch.tensor(
            [(topk[:, :1] == t).sum().item(), (topk == t).any(1).sum().item(), len(t)], dtype=torch.float64
        )

    def compute(self) -> dict[str, float]:
        n = max(self.sums[2].item(), 1.0)
        out = {"top1": 100.0 * self.sums[0].item() / n, "count": int(self.sums[2].item())}
        if self.k == 5:
            out["top5"] = 100.0 * self.sums[1].item() / n
        return out


class SegMetric:
    def __init__(self, num_classes: int, ignore_index: int = 255):
        self.num_classes, self.ignore_index = num_classes, ignore_index
        self.sums = torch.zeros(num_classes, num_classes, dtype=torch.float64)  # confusion[target, pred]

    def update(self, pred: torch.Tensor, target: torch.Tensor) -> None:
        """pred, target (B, H, W) class ids."""
        p, t = pred.cpu().flatten(), target.cpu().flatten()
        keep = (t != self.ignore_index) & (t >= 0) & (t < self.num_classes)
        idx = t[keep] * self.num_classes + p[keep].clamp(0, self.num_classes - 1)
        self.sums += (
            torch.bincount(idx, minlength=self.num_classes**2).view(self.num_classes, self.num_classes).double()
        )

    def compute(self) -> dict[str, float]:
        cm = self.sums
        tp = cm.diag()
        union = cm.sum(0) + cm.sum(1) - tp
        present = union > 0
        iou = tp[present] / union[present]
        total = cm.sum().item()
        return {
            "mIoU": 100.0 * iou.mean().item() if present.any() else 0.0,
            "pixel_acc": 100.0 * tp.sum().item() / total if total else 0.0,
            "pixels": int(total),
        }


class DepthMetric:
    def __init__(self) -> None:
        self.sums = torch.zeros(4, dtype=torch.float64)  # delta1, absrel, rmse (per-image sums), images

    def update(self, pred: torch.Tensor, target: torch.Tensor) -> None:
        """pred, target (B, H, W) depth in the target's units."""
        p, t = pred.detach().float().cpu(), target.float().cpu()
        for pi, ti in zip(p, t):
            valid = torch.isfinite(ti) & (ti > 0)
            if not valid.any():
                continue
            pv, tv = pi[valid].clamp_min(1e-6), ti[valid]
            ratio = torch.maximum(pv / tv, tv / pv)
            self.sums += torch.tensor(
                [
                    (ratio < 1.25).double().mean().item(),
                    ((pv - tv).abs() / tv).mean().item(),
                    (pv - tv).pow(2).mean().sqrt().item(),
                    1.0,
                ],
                dtype=torch.float64,
            )

    def compute(self) -> dict[str, float]:
        n = max(self.sums[3].item(), 1.0)
        return {
            "delta1": 100.0 * self.sums[0].item() / n,
            "AbsRel": self.sums[1].item() / n,
            "RMSE": self.sums[2].item() / n,
            "images": int(self.sums[3].item()),
        }


def make_metric(task: str, num_classes: int | None, ignore_index: int = 255) -> ClsMetric | SegMetric | DepthMetric:
    if task == "cls":
        return ClsMetric(num_classes or 1)
    if task == "semseg":
        return SegMetric(num_classes or 1, ignore_index)
    if task == "depth":
        return DepthMetric()
    raise ValueError(f"no metric for task {task!r}")


def to_prediction(task: str, output: torch.Tensor) -> torch.Tensor:
    """Model output -> stored prediction: class ids (cls: (B,), semseg: (B, H, W)) or depth (B, H, W)."""
    if task in ("cls", "semseg"):
        return output.argmax(1)
    return output[:, 0] if output.dim() == 4 else output


class PredictionStore:
    """predictions.zarr: arrays `pred` and `target` (one sample per chunk) and `keys`, appended batch by batch."""

    def __init__(self, url: str, task: str):
        import zarr

        self.group = zarr.open_group(url, mode="w")
        self.group.attrs.update({"task": task})
        self.arrays: dict[str, Any] = {}

    def append(self, keys: list[str], pred: torch.Tensor, target: torch.Tensor) -> None:
        for name, x in (("pred", pred), ("target", target)):
            a = x.detach().cpu().numpy()
            if a.dtype == np.int64:
                a = a.astype(np.int32)
            if name not in self.arrays:
                self.arrays[name] = self.group.create_array(
                    name, shape=(0, *a.shape[1:]), chunks=(1, *a.shape[1:]), dtype=a.dtype
                )
            self.arrays[name].append(a)
        if "keys" not in self.arrays:
            self.arrays["keys"] = self.group.create_array("keys", shape=(0,), chunks=(4096,), dtype=str)
        self.arrays["keys"].append(np.asarray(keys, dtype=str))


@torch.no_grad()
def evaluate(
    predict: Callable[[dict[str, Any]], torch.Tensor],
    batches: Iterable[dict[str, Any]],
    task: str,
    num_classes: int | None,
    *,
    ignore_index: int = 255,
    store: PredictionStore | None = None,
    reduce: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> dict[str, float]:
    """Run `predict` over `batches` and return the task's metrics (summed across ranks with `reduce`)."""
    metric = make_metric(task, num_classes, ignore_index)
    for batch in batches:
        output = predict(batch)
        target = batch["target"]
        if task == "depth" and target.dim() == 4:
            target = target[:, 0]  # (B, 1, H, W) -> (B, H, W)
        pred = to_prediction(task, output)
        metric.update(output if task == "cls" else pred, target)
        if store is not None:
            store.append(list(batch["__key__"]), pred, target)
    if reduce is not None:
        metric.sums = reduce(metric.sums)
    return metric.compute()


def write_eval(url: str, results: dict[str, Any]) -> None:
    fs.write_json_atomic(url, results)


def format_table(results: dict[str, float]) -> str:
    """A two-column text table of the metrics."""
    width = max(len(k) for k in results)
    lines = [f"{'metric':<{width}}  value", f"{'-' * width}  -----"]
    for k, v in results.items():
        lines.append(f"{k:<{width}}  {v:.4f}" if isinstance(v, float) else f"{k:<{width}}  {v}")
    return "\n".join(lines)
