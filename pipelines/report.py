"""The demo's final table and `OUT/report.md` (pictures of every stage), from the files the stages wrote."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

FINETUNE_METRICS = {"depth": ["delta1", "AbsRel", "RMSE"], "semseg": ["mIoU", "pixel_acc"]}  # as in eval.json


def pseudo_label_quality(root: Path, max_samples: int = 256) -> dict[str, float]:
    """Pseudo labels against the synthetic ground truth of the same scenes (never used for training).

    Depth delta1 after per-image scale-and-shift alignment, averaged over images; semseg mIoU pooled over
    pixels (the definitions of `multimae.metrics`).
    """
    import torch

    from multimae import metrics
    from shards.format import read_manifest
    from shards.reader import iter_shard

    manifest = read_manifest(str(root))
    num_classes = len(manifest["modalities"]["semseg_gt"]["classes"])
    preds, gts = [], []
    confusion = torch.zeros(num_classes, num_classes, dtype=torch.int64)
    for shard in manifest["shards"]:
        for s in iter_shard(str(root), shard["name"], ["depth", "depth_gt", "semseg", "semseg_gt"]):
            preds.append(torch.from_numpy(s["depth"]))
            gts.append(torch.from_numpy(s["depth_gt"]))
            confusion += metrics.confusion_matrix(
                torch.from_numpy(s["semseg"]), torch.from_numpy(s["semseg_gt"]), num_classes
            )
            if len(preds) >= max_samples:
                break
        if len(preds) >= max_samples:
            break
    depth = metrics.mean_depth_errors(preds, gts, align=True)
    # percentages, like the trainer's eval.json
    return {
        "samples": len(preds),
        "depth_delta1": 100 * depth["delta1"],
        "semseg_miou": 100 * metrics.segmentation_scores(confusion)["mIoU"],
    }


def prediction_picture(run_dir: Path, task: str, out_png: Path, n: int = 4) -> bool:
    """Fine-tuned predictions next to the ground truth, from the run's predictions.zarr."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import zarr

    from shards.show import DEPTH_CMAP, palette

    store = run_dir / "predictions.zarr"
    if not store.exists():
        return False
    group = zarr.open_group(str(store), mode="r")
    pred, target, keys = group["pred"], group["target"], group["keys"]
    n = min(n, pred.shape[0])
    fig, axes = plt.subplots(n, 2, figsize=(4, 2 * n), squeeze=False)
    for i in range(n):
        p, t = np.asarray(pred[i]), np.asarray(target[i])
        if task == "depth":
            kw = {"cmap": DEPTH_CMAP, "vmin": float(t.min()), "vmax": float(t.max())}
        else:  # class ids in the colours of `multimae-shard show`
            colours = palette(int(max(p.max(), t.max())) + 1)
            p, t, kw = colours[p], colours[t], {"interpolation": "nearest"}
        for j, (img, title) in enumerate([(p, "prediction"), (t, "ground truth")]):
            axes[i, j].imshow(img, **kw)
            axes[i, j].set_title(f"{title}" if i == 0 else "", fontsize=8)
            axes[i, j].axis("off")
        axes[i, 0].text(-4, p.shape[0] / 2, str(keys[i]), rotation=90, va="center", ha="right", fontsize=6)
    fig.tight_layout()
    fig.savefig(out_png, dpi=100)
    plt.close(fig)
    return True


def write_report(out: Path, timings: dict[str, float], total_s: float) -> str:
    """Write OUT/report.md and return the final table as text."""
    runs = out / "runs"
    rows = []
    for task, metrics in FINETUNE_METRICS.items():
        path = runs / f"finetune-{task}" / "eval.json"
        results = json.loads(path.read_text()) if path.exists() else {}
        results = results.get("metrics", results)
        for m in metrics:
            value = results.get(m)
            rows.append((f"fine-tuned {task}", m, "n/a" if value is None else f"{value:.3f}"))
    quality = pseudo_label_quality(out / "pretrain")
    rows.append(("pseudo depth vs depth_gt", "delta1 (scale+shift aligned)", f"{quality['depth_delta1']:.3f}"))
    rows.append(("pseudo semseg vs semseg_gt", "mIoU", f"{quality['semseg_miou']:.3f}"))
    width = [max(len(r[i]) for r in rows + [("what", "metric", "value")]) for i in range(3)]
    lines = [
        "  ".join(h.ljust(w) for h, w in zip(("what", "metric", "value"), width)),
        "  ".join("-" * w for w in width),
    ]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, width)) for r in rows]
    table = "\n".join(lines)

    recon = sorted((runs / "pretrain" / "reconstructions").glob("*.png"))
    pictures = []
    for task in FINETUNE_METRICS:
        png = out / f"predictions-{task}.png"
        if prediction_picture(runs / f"finetune-{task}", task, png):
            pictures.append(f"![{task} predictions]({png.name})")
    md = [
        "# MultiMAE demo report",
        "",
        f"Total wall time {total_s:.0f} s; stages (0 = reused): "
        + ", ".join(f"{k} {v:.0f} s" for k, v in timings.items())
        + ".",
        "",
        "## Results (held-out synthetic test shard)",
        "",
        "| what | metric | value |",
        "|---|---|---|",
        *[f"| {a} | {b} | {c} |" for a, b, c in rows],
        "",
        "## The shards: rgb, pseudo depth, pseudo semseg and the ground truth",
        "",
        "![samples](samples.png)",
        "",
        "## Pre-training reconstructions (masked inputs, predictions, targets)",
        "",
        f"![reconstructions]({recon[-1].relative_to(out)})" if recon else "(no reconstruction picture was written)",
        "",
        "## Fine-tuned predictions next to the ground truth",
        "",
        *pictures,
        "",
    ]
    (out / "report.md").write_text("\n".join(md))
    return table
