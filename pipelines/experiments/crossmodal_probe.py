"""Zero-shot cross-modal probe of a MultiMAE pre-training run: every RGB token in, depth and semseg out.

    python pipelines/experiments/crossmodal_probe.py RUN_DIR [RUN_DIR ...] --shards DATA [--shard NAME ...]

No fine-tuning: the pre-trained decoders predict depth and semseg from RGB alone (depth and semseg tokens all
masked, as in the paper's cross-modal demo), scored on the shards' exact `depth_gt` / `semseg_gt`. The same
architecture with random weights and the trivial baselines (each image's mean depth; the majority class) are
scored alongside, so the table shows what pre-training itself learned about geometry and semantics.
Depth comes out standardized, so it is scored after per-image scale-and-shift alignment (as the teachers).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import multimae  # noqa: E402
from multimae import metrics  # noqa: E402
from multimae.train.checkpoints import load_model  # noqa: E402
from multimae.train.config import from_dict  # noqa: E402
from multimae.train.data import batched, eval_samples, image_domains, normalize_images, transform_args  # noqa: E402
from shards.format import read_manifest  # noqa: E402

INPUTS = {"rgb": "rgb", "depth": "depth_gt", "semseg": "semseg_gt"}
IMAGES = image_domains(INPUTS)  # uint8 from the transform, normalized here as the trainer's batch step does


def scores(depth_pred, depth_gt, seg_pred, seg_gt, num_classes: int, align: bool = True) -> dict[str, float]:
    """depth delta1 / AbsRel (per image, aligned) and semseg mIoU (pooled), as in multimae.metrics."""
    depth = metrics.mean_depth_errors(depth_pred, depth_gt, align=align)
    confusion = sum(metrics.confusion_matrix(p, t, num_classes) for p, t in zip(seg_pred, seg_gt))
    miou = metrics.segmentation_scores(confusion)["mIoU"]
    return {"delta1": 100 * depth["delta1"], "AbsRel": depth["AbsRel"], "mIoU": 100 * miou}


@torch.inference_mode()
def probe(model: torch.nn.Module, batches: list[dict], num_classes: int) -> dict[str, float]:
    """Scores of `model` predicting depth and semseg from every RGB token (the other tasks fully masked)."""
    depth_pred, depth_gt, seg_pred, seg_gt = [], [], [], []
    tokens, _ = model.tokenize({t: batches[0][t] for t in INPUTS})
    counts = {t: v.shape[1] for t, v in tokens.items()}  # tokens per task; the same for every batch
    for b in batches:
        x = {t: b[t] for t in INPUTS}
        masks = {t: torch.full((len(b["rgb"]), n), int(t != "rgb")) for t, n in counts.items()}
        preds, _ = model(x, task_masks=masks)
        depth_pred += list(preds["depth"][:, 0])
        depth_gt += list(b["depth"][:, 0])
        logits = F.interpolate(preds["semseg"], size=b["target"].shape[-2:], mode="bilinear", align_corners=False)
        seg_pred += list(logits.argmax(1))
        seg_gt += list(b["target"])
    return scores(depth_pred, depth_gt, seg_pred, seg_gt, num_classes)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="+", help="pre-training run folders (checkpoint.pt)")
    ap.add_argument("--shards", required=True, help="shard set with rgb, depth_gt and semseg_gt")
    ap.add_argument("--shard", nargs="*", help="shards to score (default: all)")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--json", help="also write the table as JSON here")
    args = ap.parse_args(argv)
    manifest = read_manifest(args.shards)
    names = args.shard or [s["name"] for s in manifest["shards"]]
    num_classes = len(manifest["modalities"]["semseg_gt"]["classes"])
    rows: dict[str, dict[str, float]] = {}
    data: dict[str, list[dict]] = {}  # decoded batches by transform settings, shared by runs of the same size
    for run in args.runs:
        model, state = load_model(run)
        cfg = from_dict(state["config"])
        cfg.data.inputs = dict(INPUTS)
        # semseg inputs come out at the adapter's 1/4 resolution, the semseg target at full size
        transform = dict(transform_args(cfg), target="semseg_gt")
        key = json.dumps(transform, sort_keys=True)
        if key not in data:
            data[key] = list(batched(eval_samples(args.shards, names, transform), args.batch_size))
            for b in data[key]:
                normalize_images(b, IMAGES)
        batches = data[key]
        if not rows:  # baselines, on the first run's data
            gts = [d for b in batches for d in b["depth"][:, 0]]
            segs = [s for b in batches for s in b["target"]]
            majority = torch.bincount(torch.cat([s.flatten() for s in segs]), minlength=num_classes).argmax()
            mean = [torch.full_like(g, g.mean().item()) for g in gts]
            rows["mean depth / majority class"] = scores(
                mean, gts, [torch.full_like(s, majority) for s in segs], segs, num_classes, align=False
            )
        torch.manual_seed(0)
        spec = state["model_spec"]
        rows[f"{Path(run).name} (random init)"] = probe(
            multimae.create_model(spec["name"], **spec["kwargs"]).eval(), batches, num_classes
        )
        rows[f"{Path(run).name} (step {state['step']})"] = probe(model, batches, num_classes)
    print(f"cross-modal probe on {args.shards} ({len(names)} shards): RGB in, depth and semseg out, no fine-tuning")
    print(f"{'model':<44}{'depth δ1':>10}{'AbsRel':>8}{'semseg mIoU':>13}")
    for name, r in rows.items():
        print(f"{name:<44}{r['delta1']:10.1f}{r['AbsRel']:8.3f}{r['mIoU']:13.1f}")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
