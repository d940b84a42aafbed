"""Zero-shot cross-modal probe of a MultiMAE pre-training run: every RGB token in, depth and semseg out.

    python benchmarks/crossmodal_probe.py RUN_DIR --shards DATA [--shard NAME ...]

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

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from labeling.train_teachers import depth_metrics, miou  # noqa: E402
from multimae.checkpointing import load_checkpoint_file  # noqa: E402
from multimae.config import from_dict  # noqa: E402
from multimae.data import batched, eval_samples  # noqa: E402
from multimae.train import _transform_args, build_model, semseg_classes  # noqa: E402
from shards.format import read_manifest  # noqa: E402


@torch.inference_mode()
def probe(model: torch.nn.Module, batches: list[dict], num_classes: int) -> dict[str, float]:
    """depth δ1/AbsRel (aligned) and semseg mIoU of `model` predicting both from every RGB token."""
    depth_pred, depth_gt, seg_pred, seg_gt = [], [], [], []
    tokens, _ = model.tokenize({t: batches[0][t] for t in ("rgb", "depth", "semseg")})
    counts = {t: v.shape[1] for t, v in tokens.items()}  # tokens per task; the same for every batch
    for b in batches:
        x = {"rgb": b["rgb"], "depth": b["depth"], "semseg": b["semseg"]}
        masks = {t: torch.full((len(b["rgb"]), n), int(t != "rgb")) for t, n in counts.items()}
        preds, _ = model(x, task_masks=masks)
        depth_pred += list(preds["depth"][:, 0])
        depth_gt += list(b["depth"][:, 0])
        logits = F.interpolate(preds["semseg"], size=b["target"].shape[-2:], mode="bilinear", align_corners=False)
        seg_pred += list(logits.argmax(1))
        seg_gt += list(b["target"])
    d = depth_metrics(depth_pred, depth_gt)
    return {"delta1": 100 * d["delta1"], "AbsRel": d["abs_rel"], "mIoU": 100 * miou(seg_pred, seg_gt, num_classes)}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="+", help="pre-training run folders (config.json + checkpoint.pt)")
    ap.add_argument("--shards", required=True, help="shard set with rgb, depth_gt and semseg_gt")
    ap.add_argument("--shard", nargs="*", help="shards to score (default: all)")
    ap.add_argument("--batch-size", type=int, default=32)
    args = ap.parse_args(argv)
    manifest = read_manifest(args.shards)
    names = args.shard or [s["name"] for s in manifest["shards"]]
    num_classes = semseg_classes(manifest, "semseg_gt")
    rows: dict[str, dict[str, float]] = {}
    data: dict[str, list[dict]] = {}  # decoded batches by transform settings, shared by runs of the same size
    for run in args.runs:
        cfg = from_dict(json.loads((Path(run) / "config.json").read_text()))
        cfg.data.inputs = {"rgb": "rgb", "depth": "depth_gt", "semseg": "semseg_gt"}
        # semseg inputs come out at the adapter's 1/4 resolution, the semseg target at full size
        transform = dict(_transform_args(cfg), target="semseg_gt")
        key = json.dumps(transform, sort_keys=True)
        if key not in data:
            data[key] = list(batched(eval_samples(args.shards, names, transform), args.batch_size))
        batches = data[key]
        if not rows:  # baselines, on the first run's data
            gts = [d for b in batches for d in b["depth"][:, 0]]
            segs = [s for b in batches for s in b["target"]]
            majority = torch.bincount(torch.cat([s.flatten() for s in segs]), minlength=num_classes).argmax()
            mean = depth_metrics([torch.full_like(g, g.mean().item()) for g in gts], gts, align=False)
            rows["mean depth / majority class"] = {
                "delta1": 100 * mean["delta1"],
                "AbsRel": mean["abs_rel"],
                "mIoU": 100 * miou([torch.full_like(s, majority) for s in segs], segs, num_classes),
            }
        torch.manual_seed(0)
        model = build_model(cfg, manifest).eval()
        rows[f"{Path(run).name} (random init)"] = probe(model, batches, num_classes)
        state = load_checkpoint_file(str(Path(run) / "checkpoint.pt"))
        model.load_state_dict(state["model"])
        rows[f"{Path(run).name} (step {state.get('step', '?')})"] = probe(model, batches, num_classes)
    print(f"cross-modal probe on {args.shards} ({len(names)} shards): RGB in, depth and semseg out, no fine-tuning")
    print(f"{'model':<44}{'depth δ1':>10}{'AbsRel':>8}{'semseg mIoU':>13}")
    for name, r in rows.items():
        print(f"{name:<44}{r['delta1']:10.1f}{r['AbsRel']:8.3f}{r['mIoU']:13.1f}")


if __name__ == "__main__":
    main()
