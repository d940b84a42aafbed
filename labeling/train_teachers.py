"""Train the embedded default teachers on synthetic scenes.

Two small models of the same transformers classes as the paper's teachers are trained from scratch on the
synthetic source's exact ground truth and saved with ``save_pretrained`` (weights + image processor config):

- ``synthetic-dpt``: ``DPTForDepthEstimation`` regressing metric z-depth in metres (``depth_gt``, L1 loss);
  the config carries ``depth_meaning = "metric_m"``, which ``load_teacher`` reads back.
- ``synthetic-mask2former``: ``Mask2FormerForUniversalSegmentation`` over ``SEMSEG_CLASSES`` trained with the
  model's own loss (Hungarian-matched mask + class losses) from ``mask_labels`` / ``class_labels`` made by its
  image processor from ``semseg_gt``, as Hugging Face does.

Training scenes come from ``TRAIN_SEED``; the held-out evaluation uses ``EVAL_SEED``. The evaluation loads the
saved folders with ``load_teacher`` (the path real checkpoints take) and writes ``quality.json``: depth AbsRel and
delta1 after per-image scale-and-shift alignment against the mean-depth baseline, semseg mIoU against the
majority-class baseline, and the normals teacher (normals derived from synthetic-dpt's depth, nothing trained)
against ``normals_gt``: angle errors at the shipped ``fov_deg``, at each scene's true field of view, and of a
camera-facing baseline.

    python -m labeling.train_teachers --only depth --steps 1200 --scenes 1024      # the shipped synthetic-dpt
    python -m labeling.train_teachers --only semseg --semseg-steps 3000 --scenes 2048  # shipped synthetic-mask2former
    python -m labeling.train_teachers --evaluate-only    # re-score all (quality.json, with bf16 vs float32 agreement)
"""

from __future__ import annotations

import argparse
import json
import math
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from transformers import (
    DPTConfig,
    DPTForDepthEstimation,
    DPTImageProcessor,
    Mask2FormerConfig,
    Mask2FormerForUniversalSegmentation,
    Mask2FormerImageProcessor,
)

from labeling.teachers import NormalsTeacher, depth_for_normals, load_teacher, normals_from_depth
from multimae import metrics
from shards.synthetic import SEMSEG_CLASSES, render_scene, sample_scene

TRAIN_SEED = 1001  # training scenes: render_scene(TRAIN_SEED, i)
EVAL_SEED = 7  # held-out scenes: render_scene(EVAL_SEED, i); never used for training
SCENE_SIZE = 128
DEPTH_MEANING = "metric_m"
TRAINED_ON = "synthetic"  # the shard source the teachers learned from
DEPTH_DIR, SEMSEG_DIR = "synthetic-dpt", "synthetic-mask2former"


# ---------------------------------------------------------------------------------------------------------------------
# models


def dpt_config(resolution: int, hidden: int = 64, layers: int = 4) -> DPTConfig:
    """A small DPT (ViT backbone, 8x8 patches); ``predicted_depth`` comes out at twice the input resolution."""
    config = DPTConfig(
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=hidden // 32,
        intermediate_size=2 * hidden,
        image_size=resolution,
        patch_size=8,
        neck_hidden_sizes=[16, 32, 64, 64],
        fusion_hidden_size=32,
        backbone_out_indices=[layers // 4 - 1, layers // 2 - 1, 3 * layers // 4 - 1, layers - 1],
        reassemble_factors=[4, 2, 1, 0.5],
        head_hidden_size=16,
    )
    config.depth_meaning = DEPTH_MEANING
    config.trained_on = TRAINED_ON  # the data domain: the labeling job warns on other data
    return config


def mask2former_config(classes: list[str], resolution: int, embed: int = 16) -> Mask2FormerConfig:
    """A small Mask2Former (tiny Swin backbone); masks are predicted at 1/4 of the input resolution."""
    hidden = 2 * embed
    config = Mask2FormerConfig(
        num_labels=len(classes),
        id2label=dict(enumerate(classes)),
        label2id={name: i for i, name in enumerate(classes)},
        hidden_dim=hidden,
        mask_feature_size=hidden,
        feature_size=hidden,
        encoder_layers=1,
        decoder_layers=3,
        num_queries=16,
        dim_feedforward=2 * hidden,
        encoder_feedforward_dim=2 * hidden,
        train_num_points=1024,
        backbone_config={
            "model_type": "swin",
            "embed_dim": embed,
            "depths": [1, 1, 2, 1],
            "num_heads": [max(1, embed * 2**i // 32) for i in range(4)],
            "window_size": 4,
            "image_size": resolution,
            "out_features": ["stage1", "stage2", "stage3", "stage4"],
        },
    )
    config.trained_on = TRAINED_ON  # the data domain: the labeling job warns on other data
    return config


# ---------------------------------------------------------------------------------------------------------------------
# data


def _render(args: tuple[int, int]) -> dict:
    return render_scene(*args, size=SCENE_SIZE)


def render_scenes(seed: int, count: int, workers: int = 1, normals: bool = False) -> dict[str, torch.Tensor]:
    """Render scenes (seed, 0..count-1) -> rgb (N, S, S, 3) uint8, depth (N, S, S) float32, semseg (N, S, S) int64;
    with `normals` also normals (N, S, S, 3) float32 and each camera's field of view fov_deg (N,) float64."""
    jobs = [(seed, i) for i in range(count)]
    if workers > 1:
        with ProcessPoolExecutor(workers) as pool:
            scenes = list(pool.map(_render, jobs, chunksize=16))
    else:
        scenes = [_render(job) for job in jobs]
    data = {
        "rgb": torch.from_numpy(np.stack([s["rgb"] for s in scenes])),
        "depth": torch.from_numpy(np.stack([s["depth_gt"] for s in scenes])),
        "semseg": torch.from_numpy(np.stack([s["semseg_gt"] for s in scenes]).astype(np.int64)),
    }
    if normals:  # held-out scoring only: training never reads them
        data["normals"] = torch.from_numpy(np.stack([s["normals_gt"] for s in scenes]))
        data["fov_deg"] = torch.tensor([math.degrees(sample_scene(seed, i).camera.fov) for i in range(count)])
    return data


def _batch(data: dict[str, torch.Tensor], size: int, gen: torch.Generator) -> dict[str, torch.Tensor]:
    """A random batch with random horizontal flips (the same flip for every modality of a scene)."""
    idx = torch.randint(len(data["rgb"]), (size,), generator=gen)
    flip = torch.rand(size, generator=gen) < 0.5
    rgb, depth, semseg = data["rgb"][idx], data["depth"][idx], data["semseg"][idx]  # (B, S, S, 3), (B, S, S) x2
    rgb[flip], depth[flip], semseg[flip] = rgb[flip].flip(2), depth[flip].flip(2), semseg[flip].flip(2)
    return {"rgb": rgb, "depth": depth, "semseg": semseg}


def _lr_factor(step: int, steps: int, warmup: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))


# ---------------------------------------------------------------------------------------------------------------------
# training


def fit(
    model: torch.nn.Module,
    loss_of: Callable[[dict[str, torch.Tensor]], torch.Tensor],
    data: dict[str, torch.Tensor],
    steps: int,
    *,
    batch: int,
    lr: float,
    seed: int,
    name: str,
    clip: float | None = None,
) -> torch.nn.Module:
    """The loop both teachers share: AdamW, warmup + cosine, random flipped batches; `loss_of(batch)` -> loss."""
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    gen = torch.Generator().manual_seed(seed)
    t0 = time.time()
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = lr * _lr_factor(step, steps, warmup=max(1, steps // 20))
        loss = loss_of(_batch(data, batch, gen))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if clip is not None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        opt.step()
        if step % 50 == 0 or step == steps - 1:
            print(f"  {name:6s} step {step:5d}/{steps}  loss {loss.item():.4f}  {time.time() - t0:.0f} s", flush=True)
    return model.eval()


def train_depth(
    data: dict[str, torch.Tensor],
    steps: int,
    *,
    batch: int,
    lr: float,
    resolution: int,
    hidden: int,
    device: torch.device,
) -> tuple[DPTForDepthEstimation, DPTImageProcessor]:
    """Train the small DPT on metric depth with an L1 loss (metres) at the scene resolution."""
    torch.manual_seed(0)
    processor = DPTImageProcessor(size={"height": resolution, "width": resolution})
    model = DPTForDepthEstimation(dpt_config(resolution, hidden, layers=hidden // 16)).to(device).train()

    def l1(b: dict[str, torch.Tensor]) -> torch.Tensor:
        pixel_values = processor(images=b["rgb"].permute(0, 3, 1, 2), return_tensors="pt", device=device)
        pred = model(pixel_values=pixel_values["pixel_values"]).predicted_depth  # (B, 2r, 2r)
        pred = F.interpolate(pred[:, None], size=b["depth"].shape[-2:], mode="bilinear", align_corners=False)[:, 0]
        return (pred - b["depth"].to(device)).abs().mean()

    return fit(model, l1, data, steps, batch=batch, lr=lr, seed=1, name="depth"), processor


def train_semseg(
    data: dict[str, torch.Tensor],
    steps: int,
    *,
    batch: int,
    lr: float,
    resolution: int,
    embed: int,
    device: torch.device,
) -> tuple[Mask2FormerForUniversalSegmentation, Mask2FormerImageProcessor]:
    """Train the small Mask2Former with its own loss; mask/class labels come from its processor."""
    torch.manual_seed(0)
    processor = Mask2FormerImageProcessor(size={"height": resolution, "width": resolution}, ignore_index=255)
    model = Mask2FormerForUniversalSegmentation(mask2former_config(SEMSEG_CLASSES, resolution, embed))
    model = model.to(device).train()

    def own_loss(b: dict[str, torch.Tensor]) -> torch.Tensor:
        inputs = processor(
            images=list(b["rgb"].permute(0, 3, 1, 2)), segmentation_maps=list(b["semseg"]), return_tensors="pt"
        )
        return model(
            pixel_values=inputs["pixel_values"].to(device),
            mask_labels=[m.to(device) for m in inputs["mask_labels"]],  # per image (n_i, r, r) binary masks
            class_labels=[c.to(device) for c in inputs["class_labels"]],  # per image (n_i,) class ids
        ).loss

    return fit(model, own_loss, data, steps, batch=batch, lr=lr, seed=2, name="semseg", clip=1.0), processor


# ---------------------------------------------------------------------------------------------------------------------
# evaluation


def depth_scores(preds: list[torch.Tensor], gts: list[torch.Tensor], align: bool = True) -> dict[str, float]:
    """AbsRel and delta1 per image (after scale-and-shift alignment), averaged over images (multimae.metrics)."""
    m = metrics.mean_depth_errors(preds, gts, align=align)
    return {"abs_rel": m["AbsRel"], "delta1": m["delta1"]}


def miou(preds: list[torch.Tensor], gts: list[torch.Tensor], num_classes: int) -> float:
    """mIoU pooled over every pixel of the images (multimae.metrics)."""
    confusion = sum(metrics.confusion_matrix(p, g, num_classes) for p, g in zip(preds, gts))
    return metrics.segmentation_scores(confusion)["mIoU"]


def normals_scores(preds: list[torch.Tensor], gts: list[torch.Tensor]) -> dict[str, float]:
    """Angle errors pooled over every valid pixel (multimae.metrics); preds, gts: (H, W, 3) each.

    mean_angle_deg, median_angle_deg, and within_11.25 / within_22.5 / within_30 in percent of the valid pixels.
    """
    sums = sum(
        metrics.normal_sums(metrics.angular_errors_deg(p.permute(2, 0, 1)[None], g.permute(2, 0, 1)[None]))
        for p, g in zip(preds, gts)
    )
    scores = metrics.normal_scores(sums)
    return {k: 100 * v if k.startswith("within_") else v for k, v in scores.items()}


def label_all(teacher, images: list[torch.Tensor], batch: int = 32) -> list[torch.Tensor]:
    return [out for i in range(0, len(images), batch) for out in teacher(images[i : i + batch])]


def bf16_agreement(teachers_dir: Path, images: list[torch.Tensor]) -> dict[str, float]:
    """How far the teachers' bfloat16 labels are from their float32 labels on the same images.

    depth: median over images of mean |bf16 - fp32| / mean |fp32| (relative difference); semseg: the share of
    pixels with the same class.
    """
    labels = {}
    for dtype in ("float32", "bfloat16"):
        depth = load_teacher("depth", str(teachers_dir / DEPTH_DIR), dtype=dtype)
        seg = load_teacher("semseg", str(teachers_dir / SEMSEG_DIR), dtype=dtype)
        labels[dtype] = (label_all(depth, images), label_all(seg, images))
    (d32, s32), (d16, s16) = labels["float32"], labels["bfloat16"]
    rel = torch.tensor([((a - b).abs().mean() / a.abs().mean()).item() for a, b in zip(d32, d16)])
    same = torch.cat([(a == b).flatten() for a, b in zip(s32, s16)]).double().mean().item()
    return {"depth_relative_difference_median": rel.median().item(), "depth_relative_difference_max": rel.max().item(),
            "semseg_pixel_agreement": same, "images": len(images)}  # fmt: skip


def evaluate(teachers_dir: Path, eval_data: dict[str, torch.Tensor], majority_class: int) -> dict:
    """Score the saved teachers (loaded with load_teacher, float32) and the trivial baselines on held-out scenes."""
    images = list(eval_data["rgb"])
    gt_depth, gt_seg = list(eval_data["depth"]), list(eval_data["semseg"])
    pred_depth = label_all(load_teacher("depth", str(teachers_dir / DEPTH_DIR), dtype="float32"), images)
    pred_seg = label_all(load_teacher("semseg", str(teachers_dir / SEMSEG_DIR), dtype="float32"), images)
    normals = load_teacher("normals", str(teachers_dir / DEPTH_DIR), dtype="float32")
    assert isinstance(normals, NormalsTeacher)
    gt_normals = list(eval_data["normals"])
    camera_facing = [torch.zeros_like(g) + torch.tensor([0.0, 0.0, 1.0]) for g in gt_normals]
    depth_space = [depth_for_normals(d, normals.depth.meaning) for d in pred_depth]
    true_fov = [float(f) for f in eval_data["fov_deg"]]
    mean_depth = [torch.full_like(g, g.mean().item()) for g in gt_depth]  # best constant after alignment
    majority = [torch.full_like(g, majority_class) for g in gt_seg]
    k = len(SEMSEG_CLASSES)
    return {
        "eval_seed": EVAL_SEED,
        "eval_scenes": len(images),
        "metrics": "per image, then averaged over images (depth); pooled over pixels (semseg)",
        "depth": {
            "teacher": depth_scores(pred_depth, gt_depth),
            "teacher_unaligned": depth_scores(pred_depth, gt_depth, align=False),
            "mean_depth_baseline": depth_scores(mean_depth, gt_depth, align=False),
        },
        "semseg": {
            "teacher_miou": miou(pred_seg, gt_seg, k),
            "majority_baseline_miou": miou(majority, gt_seg, k),
            "teacher_pixel_acc": float(np.mean([(p == g).float().mean().item() for p, g in zip(pred_seg, gt_seg)])),
            "majority_class": SEMSEG_CLASSES[majority_class],
        },
        "normals": {
            "metrics": "angle to normals_gt, pooled over pixels; within_* in percent of the valid pixels",
            "fov_deg": normals.fov_deg,  # what the teacher assumes (the cameras have 45-75 degrees)
            "teacher": normals_scores(label_all(normals, images), gt_normals),
            # the same depth back-projected with each scene's real field of view: the cost of the assumption
            "teacher_true_fov": normals_scores(
                [normals_from_depth(d, f) for d, f in zip(depth_space, true_fov)], gt_normals
            ),
            # exact depth_gt: what finite differences lose (object edges), then also the fov assumption
            "depth_gt_true_fov": normals_scores(
                [normals_from_depth(d, f) for d, f in zip(gt_depth, true_fov)], gt_normals
            ),
            "depth_gt": normals_scores([normals_from_depth(d, normals.fov_deg) for d in gt_depth], gt_normals),
            "camera_facing_baseline": normals_scores(camera_facing, gt_normals),
        },
        "bf16_agreement": bf16_agreement(teachers_dir, images),
    }


def print_quality(q: dict) -> None:
    d, s = q["depth"], q["semseg"]
    print(f"held-out scenes: {q['eval_scenes']} (seed {q['eval_seed']})")
    print(f"{'model':<34}{'AbsRel':>8}{'delta1':>8}")
    print(f"{'depth teacher (scale+shift aligned)':<34}{d['teacher']['abs_rel']:8.3f}{d['teacher']['delta1']:8.3f}")
    print(
        f"{'depth teacher (metric, unaligned)':<34}"
        f"{d['teacher_unaligned']['abs_rel']:8.3f}{d['teacher_unaligned']['delta1']:8.3f}"
    )
    print(
        f"{'mean-depth baseline':<34}{d['mean_depth_baseline']['abs_rel']:8.3f}"
        f"{d['mean_depth_baseline']['delta1']:8.3f}"
    )
    print(f"{'model':<34}{'mIoU':>8}")
    print(f"{'semseg teacher':<34}{s['teacher_miou']:8.3f}")
    print(f"{'majority-class baseline (' + s['majority_class'] + ')':<34}{s['majority_baseline_miou']:8.3f}")
    n = q.get("normals")
    if n:
        columns = ("mean_angle_deg", "median_angle_deg", "within_11.25", "within_22.5", "within_30")
        print(f"{'normals (angles in deg, within in %)':<34}" + "".join(f"{c.split('_')[0]:>8}" for c in columns[:2])
              + "".join(f"{'<' + c.split('_')[1]:>8}" for c in columns[2:]))  # fmt: skip
        rows = {
            f"normals teacher (fov {n['fov_deg']:g} assumed)": "teacher",
            "normals teacher, true fov": "teacher_true_fov",
            "depth_gt, true fov": "depth_gt_true_fov",
            f"depth_gt (fov {n['fov_deg']:g} assumed)": "depth_gt",
            "camera-facing baseline": "camera_facing_baseline",
        }
        for label, key in rows.items():
            print(f"{label:<34}" + "".join(f"{n[key][c]:8.1f}" for c in columns))
    b = q.get("bf16_agreement")
    if b:
        print(
            "bfloat16 vs float32 on the same scenes: depth relative difference "
            f"{b['depth_relative_difference_median']:.4f} (median; max {b['depth_relative_difference_max']:.4f}), "
            "semseg pixel agreement "
            f"{b['semseg_pixel_agreement']:.4f}"
        )


# ---------------------------------------------------------------------------------------------------------------------


def _save(model: torch.nn.Module, processor: object, folder: Path, recipe: dict) -> None:
    """save_pretrained weights + processor config, and the recipe that produced them (training.json)."""
    model.cpu().save_pretrained(folder)
    processor.save_pretrained(folder)
    (folder / "training.json").write_text(json.dumps(recipe, indent=2) + "\n")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "teachers", help="folder for both teachers")
    p.add_argument("--steps", type=int, default=1200, help="optimizer steps per teacher")
    p.add_argument("--depth-steps", type=int, default=None, help="steps for the depth teacher (default --steps)")
    p.add_argument("--semseg-steps", type=int, default=3000, help="steps for the semseg teacher (0: --steps)")
    p.add_argument("--only", choices=("depth", "semseg"), help="train one teacher; evaluate both from --out")
    p.add_argument("--evaluate-only", action="store_true", help="train nothing: score the teachers in --out")
    p.add_argument("--scenes", type=int, default=1024, help="training scenes rendered")
    p.add_argument("--eval-scenes", type=int, default=64, help="held-out scenes for the quality report")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--depth-lr", type=float, default=1e-3)
    p.add_argument("--semseg-lr", type=float, default=1e-3)
    p.add_argument("--depth-resolution", type=int, default=64, help="DPT working resolution (output is 2x)")
    p.add_argument("--semseg-resolution", type=int, default=128, help="Mask2Former working resolution")
    p.add_argument("--depth-hidden", type=int, default=64, help="DPT ViT width (layers = width / 16)")
    p.add_argument("--semseg-embed", type=int, default=32, help="Mask2Former Swin embedding width")
    p.add_argument("--workers", type=int, default=2, help="processes rendering scenes")
    p.add_argument("--device", default="cpu")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    t0 = time.time()

    scenes = 64 if args.evaluate_only else args.scenes  # for the majority class only
    print(f"rendering {scenes} training + {args.eval_scenes} held-out scenes (seeds {TRAIN_SEED}, {EVAL_SEED})")
    train = render_scenes(TRAIN_SEED, scenes, args.workers)
    held_out = render_scenes(EVAL_SEED, args.eval_scenes, args.workers, normals=True)
    majority_class = int(torch.bincount(train["semseg"].flatten(), minlength=len(SEMSEG_CLASSES)).argmax())
    print(f"rendered in {time.time() - t0:.0f} s")
    common = {"train_seed": TRAIN_SEED, "train_scenes": args.scenes, "batch": args.batch, "device": str(device)}

    if args.only in (None, "depth") and not args.evaluate_only:
        steps, t = args.depth_steps or args.steps, time.time()
        print(f"training depth teacher ({steps} steps)")
        model, processor = train_depth(
            train,
            steps,
            batch=args.batch,
            lr=args.depth_lr,
            resolution=args.depth_resolution,
            hidden=args.depth_hidden,
            device=device,
        )
        recipe = {"steps": steps, "lr": args.depth_lr, "resolution": args.depth_resolution}
        recipe["hidden"] = args.depth_hidden
        recipe["loss"] = "L1 on metric depth (m)"
        _save(model, processor, args.out / DEPTH_DIR, {**common, **recipe, "train_s": round(time.time() - t)})
    if args.only in (None, "semseg") and not args.evaluate_only:
        steps, t = args.semseg_steps or args.steps, time.time()
        print(f"training semseg teacher ({steps} steps)")
        model, processor = train_semseg(
            train,
            steps,
            batch=args.batch,
            lr=args.semseg_lr,
            resolution=args.semseg_resolution,
            embed=args.semseg_embed,
            device=device,
        )
        recipe = {"steps": steps, "lr": args.semseg_lr, "resolution": args.semseg_resolution}
        recipe["embed"] = args.semseg_embed
        recipe["loss"] = "Mask2Former loss (Hungarian-matched class CE + mask BCE + dice)"
        _save(model, processor, args.out / SEMSEG_DIR, {**common, **recipe, "train_s": round(time.time() - t)})

    quality = evaluate(args.out, held_out, majority_class)
    quality["training"] = {
        name: json.loads((args.out / name / "training.json").read_text()) for name in (DEPTH_DIR, SEMSEG_DIR)
    }
    (args.out / "quality.json").write_text(json.dumps(quality, indent=2) + "\n")
    print_quality(quality)
    print(
        f"saved {args.out / DEPTH_DIR}, {args.out / SEMSEG_DIR}, {args.out / 'quality.json'} "
        f"in {time.time() - t0:.0f} s"
    )


if __name__ == "__main__":
    main()
