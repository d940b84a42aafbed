"""The transfer experiment: does pre-training on this pipeline's pseudo-labelled data give a better encoder?

    python pipelines/experiments/transfer.py [--out runs/transfer] [--jobs 2]     # the full protocol
    python pipelines/experiments/transfer.py --quick --out /tmp/transfer-quick     # smoke check, minutes
    python pipelines/experiments/transfer.py --out runs/transfer-3000 --pretrain-steps 3000 --arms multimae-48

Arms, with the same data, steps, batch and model for every one of them:
  scratch      no pre-training (random encoder);
  mae          MAE: rgb in and out, 75 % of the tokens masked;
  multimae     MultiMAE: rgb + pseudo depth + pseudo semseg (this pipeline's shipped teachers) in and out, the
               paper's visible-token ratio (1/6) and task sampling that also shows rgb-only inputs;
  multimae-gt  the same on the exact depth and segmentation of the scenes (the oracle: perfect teachers);
  multimae-48  MultiMAE with MAE's visible ratio (1/4) instead of the paper's (1/6).

Protocol, chosen so that the encoder has to carry the information:
  - 64 px scenes cut into 8 px patches: 8 x 8 tokens per modality (the earlier 96 px / 16 px protocol gave the
    encoder 6 x 6 tokens, and a fresh DPT head as large as the encoder could learn the task around it);
  - transfer by partial fine-tuning (as in the MAE paper): only the encoder's last block and a per-patch
    linear head train; the rest of the encoder keeps what pre-training made of it;
  - tasks: depth (delta1, AbsRel on metric depth), semantic segmentation (mIoU) and RGB-D segmentation (rgb +
    ground-truth depth in), scored on held-out test scenes; plus the zero-shot cross-modal probe of the
    MultiMAE arms (RGB in, depth and semseg out, no fine-tuning);
  - seeds: each seed repeats pre-training and fine-tuning; the table gives mean +- std over seeds.

Stages, each reused when its outputs exist (a killed run picks up where it stopped): build three synthetic
shard sets (pretrain / finetune / test, different scene seeds) -> label `pretrain` with the shipped teachers ->
pre-train every arm and seed -> fine-tune every arm, seed and task (evaluated on the test set) -> probe ->
OUT/transfer.md and OUT/transfer.json (every run's metrics, the settings, the code version). Trainings run
as `multimae-train` processes, `--jobs` at a time, one thread each; each run's log is RUN_DIR/train.log.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(REPO), str(REPO / "pipelines")]

from stages import PipelineError, build_synthetic, claim_folder, manifest, pseudo_label, tool  # noqa: E402

FULL = dict(
    pretrain_num=2048,
    finetune_num=512,
    test_num=256,
    shard_size=128,
    image_px=64,
    pretrain_steps=1500,
    finetune_steps=300,
    batch_size=32,
    seeds=[0, 1, 2],
)
QUICK = dict(
    pretrain_num=48,
    finetune_num=32,
    test_num=16,
    shard_size=16,
    image_px=64,
    pretrain_steps=4,
    finetune_steps=3,
    batch_size=8,
    seeds=[0],
)
SCENE_SEEDS = {"pretrain": 100, "finetune": 101, "test": 102}

PRETRAIN_CONFIG = "pipelines/pretrain-demo.yaml"
# The model of every arm: the demo's tiny encoder (192-d, 4 blocks) on 8 px patches of 64 px images; narrow
# decoders (128-d, 1 block) and the norm-pixel rgb target alone (MAE's best) keep pre-training affordable.
MODEL = [
    "model.patch_size=8",
    "model.num_blocks=4",
    "model.decoder_blocks=1",
    "model.decoder_dim=128",
    "model.decoder_heads=2",
    "model.extra_norm_pix_loss=false",
]


def multimae_arm(labels: str, visible: int) -> list[str]:
    """MultiMAE on rgb + depth + semseg, `labels` "" (pseudo) or "_gt" (exact), `visible` of the 192 tokens."""
    return [
        f"data.inputs={{rgb: rgb, depth: depth{labels}, semseg: semseg{labels}}}",
        "model.out_domains=[norm_rgb, depth, semseg]",
        f"model.num_encoded_tokens={visible}",
        "model.sample_tasks_uniformly=true",
    ]


# Pre-training arms: overrides of PRETRAIN_CONFIG (scratch has no pre-training).
ARMS: dict[str, list[str] | None] = {
    "scratch": None,
    "mae": ["data.inputs={rgb: rgb}", "model.out_domains=[norm_rgb]", "model.num_encoded_tokens=16"],  # 16 of 64
    "multimae": multimae_arm("", 32),  # 32 of 3 x 64 = 1/6, as the paper's 98 of 588
    "multimae-gt": multimae_arm("_gt", 32),
    # MultiMAE at MAE's visible ratio: 48 of 192 = 1/4. With task sampling, rgb gets a third of the budget on
    # average: 16 tokens, as many as MAE sees, where the paper's 1/6 leaves the encoder ~11 rgb tokens per sample.
    "multimae-48": multimae_arm("", 48),
}
# Partial fine-tuning: the last encoder block and a per-patch linear head (ConvNeXt head without blocks:
# one linear map from each token to its 4 x 4 sub-patch predictions, upsampled 2x).
FINETUNE = [
    "model.trainable_blocks=1",
    "model.head=convnext",
    "model.head_blocks=0",
    "model.head_dim=512",
    "optim.layer_decay=null",
    "data.eval_num_shards=0",
]
TASKS: dict[str, tuple[str, list[str]]] = {
    "depth": ("pipelines/finetune-demo-depth.yaml", []),
    "semseg": ("pipelines/finetune-demo-semseg.yaml", []),
    "semseg-rgbd": ("pipelines/finetune-demo-semseg.yaml", ["data.inputs={rgb: rgb, depth: depth_gt}"]),
}
COLUMNS = [  # (task, metric, header)
    ("depth", "delta1", "depth δ1 ↑"),
    ("depth", "AbsRel", "depth AbsRel ↓"),
    ("semseg", "mIoU", "semseg mIoU ↑"),
    ("semseg-rgbd", "mIoU", "RGB-D semseg mIoU ↑"),
    ("probe", "delta1", "probe depth δ1 ↑"),
    ("probe", "mIoU", "probe semseg mIoU ↑"),
]


def train(config: str, overrides: list[str], shards: Path, out: Path, *, init: Path | None = None) -> bool:
    """One `multimae-train` run (one thread), its output in OUT/train.log; False when it failed."""
    out.mkdir(parents=True, exist_ok=True)
    cmd = [tool("multimae-train"), "--shards", str(shards), "--config", config, "--out", str(out)]
    cmd += (["--init", str(init)] if init else []) + overrides
    with open(out / "train.log", "ab") as log:
        log.write(("$ " + " ".join(cmd) + "\n").encode())
        log.flush()
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
        return subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=REPO, env=env).returncode == 0


def budget(size: dict[str, Any], seed: int, steps: int, quick: bool) -> list[str]:
    """The budget every arm shares; a checkpoint every quarter of the run, so a killed run loses little."""
    quarter = max(1, steps // 4)
    o = [
        f"train.seed={seed}",
        f"train.steps={steps}",
        f"train.warmup_steps={max(1, steps // 20)}",
        f"train.batch_size={size['batch_size']}",
        f"train.checkpoint_every={quarter}",
        f"log.every={quarter}",
        f"data.image_size={size['image_px']}",
        "log.tensorboard=false",
        "train.dtype=float32",
        "data.num_workers=0" if quick else "data.num_workers=1",
    ]
    return o + (["data.shuffle_buffer=16"] if quick else [])


def code_version() -> str:
    proc = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=REPO)
    dirty = subprocess.run(
        ["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True, cwd=REPO
    ).stdout.strip()
    return (proc.stdout.strip() or "unknown") + ("+changes" if dirty else "")


def aggregate(results: list[dict[str, Any]]) -> dict[str, dict[str, dict[str, Any]]]:
    """{arm: {"task/metric": {mean, std, n, values}}} over seeds (std: sample std, 0 for one seed)."""
    table: dict[str, dict[str, dict[str, Any]]] = {}
    for arm in dict.fromkeys(r["arm"] for r in results):
        for task, metric, _ in COLUMNS:
            values = [r["metrics"][metric] for r in results if r["arm"] == arm and r["task"] == task]
            if values:
                table.setdefault(arm, {})[f"{task}/{metric}"] = {
                    "mean": statistics.fmean(values),
                    "std": statistics.stdev(values) if len(values) > 1 else 0.0,
                    "n": len(values),
                    "values": values,
                }
    return table


def markdown_table(table: dict[str, dict[str, dict[str, Any]]]) -> str:
    lines = ["| arm | " + " | ".join(h for _, _, h in COLUMNS) + " |", "|---|" + "---:|" * len(COLUMNS)]
    for arm, cells in table.items():
        row = []
        for task, metric, _ in COLUMNS:
            c = cells.get(f"{task}/{metric}")
            digits = 3 if metric == "AbsRel" else 1
            row.append("-" if c is None else f"{c['mean']:.{digits}f} ± {c['std']:.{digits}f}")
        lines.append(f"| {arm} | " + " | ".join(row) + " |")
    return "\n".join(lines)


def margins(table: dict[str, dict[str, dict[str, Any]]]) -> list[str]:
    """Each pre-trained arm against scratch, in units of the larger std (the '> 2 std' criterion)."""
    out = []
    for arm in (a for a in table if a != "scratch"):
        for key, better in (("depth/delta1", 1), ("semseg/mIoU", 1), ("semseg-rgbd/mIoU", 1)):
            a, s = table[arm].get(key), table.get("scratch", {}).get(key)
            if a and s:
                gap = better * (a["mean"] - s["mean"])
                spread = max(a["std"], s["std"])
                ratio = f" ({gap / spread:+.1f} std)" if min(a["n"], s["n"]) > 1 and spread > 0 else ""
                out.append(f"{arm} vs scratch, {key}: {gap:+.2f}{ratio}")
    return out


def probe(run_dir: Path, test: Path, out_json: Path) -> dict[str, float] | None:
    """The zero-shot cross-modal probe of one pre-training run on the test set (pipelines/experiments)."""
    if not out_json.exists():
        cmd = [
            sys.executable,
            str(REPO / "pipelines" / "experiments" / "crossmodal_probe.py"),
            str(run_dir),
            "--shards",
            str(test),
            "--json",
            str(out_json),
        ]
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
        with open(run_dir / "probe.log", "wb") as log:
            if subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=REPO, env=env).returncode:
                return None
    rows = json.loads(out_json.read_text())
    return next((v for k, v in rows.items() if "(step" in k), None)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="runs/transfer", help="everything the experiment writes goes here")
    ap.add_argument("--quick", action="store_true", help="tiny sets and step counts, one seed (smoke check)")
    ap.add_argument("--seeds", type=int, nargs="+", help="seeds (default: 0 1 2; --quick: 0)")
    ap.add_argument("--arms", nargs="+", choices=list(ARMS), default=list(ARMS), help="pre-training arms")
    ap.add_argument("--tasks", nargs="+", choices=list(TASKS), default=list(TASKS), help="transfer tasks")
    ap.add_argument("--pretrain-steps", type=int, help=f"pre-training steps (default: {FULL['pretrain_steps']})")
    ap.add_argument("--jobs", type=int, default=2, help="trainings run at the same time (one thread each)")
    args = ap.parse_args(argv)
    size = dict(QUICK if args.quick else FULL)
    if args.seeds:
        size["seeds"] = args.seeds
    if args.pretrain_steps:
        size["pretrain_steps"] = args.pretrain_steps
    out = Path(args.out).resolve()
    data, runs = out / "data", out / "runs"
    arms = {a: ARMS[a] for a in args.arms}
    settings = {k: v for k, v in size.items() if k != "seeds"} | {
        "scene_seeds": SCENE_SEEDS,
        "model": MODEL,
        "finetune": FINETUNE,
        "arms": arms,
        "tasks": TASKS,
    }
    try:
        settings = claim_folder(out, settings, "transfer", extend=("arms", "tasks"))
    except PipelineError as e:
        raise SystemExit(str(e)) from None
    t_start = time.time()
    timings: dict[str, float] = {}

    t = time.time()
    for name in ("pretrain", "finetune", "test"):
        build_synthetic(
            data / name,
            size[f"{name}_num"],
            size=size["image_px"],
            shard_size=size["shard_size"],
            seed=SCENE_SEEDS[name],
            log=out / "logs" / "build.log",
        )
    if not {"depth", "semseg"} <= set(manifest(data / "pretrain")["modalities"]):
        pseudo_label(data / "pretrain", out / "logs" / "label.log", "progress=false")
    timings["data"] = time.time() - t

    failed: list[str] = []

    def pretrain(arm: str, seed: int) -> None:
        run_dir = runs / f"pretrain-{arm}-s{seed}"
        if (run_dir / "summary.json").exists():
            return
        overrides = MODEL + arms[arm] + budget(size, seed, size["pretrain_steps"], args.quick) + ["log.image_every=0"]
        ok = train(PRETRAIN_CONFIG, overrides, data / "pretrain", run_dir)
        if not ok:
            failed.append(f"pretrain {arm} seed {seed}: see {run_dir / 'train.log'}")
        print(f"pretrain {arm} seed {seed}: {'done' if ok else 'FAILED'}", flush=True)

    def finetune(arm: str, seed: int, task: str) -> None:
        run_dir = runs / f"finetune-{arm}-s{seed}-{task}"
        init = None if arms[arm] is None else runs / f"pretrain-{arm}-s{seed}" / "checkpoint.pt"
        if (run_dir / "eval.json").exists():
            return
        if init is not None and not init.exists():
            failed.append(f"finetune {arm} seed {seed} {task}: no pre-trained checkpoint")
            return
        config, task_overrides = TASKS[task]
        overrides = MODEL + FINETUNE + task_overrides + budget(size, seed, size["finetune_steps"], args.quick)
        overrides.append(f"data.eval_root={data / 'test'}")  # scored on the held-out test scenes
        ok = train(config, overrides, data / "finetune", run_dir, init=init)
        if not ok:
            failed.append(f"finetune {arm} seed {seed} {task}: see {run_dir / 'train.log'}")
        print(f"finetune {arm} seed {seed} {task}: {'done' if ok else 'FAILED'}", flush=True)

    with ThreadPoolExecutor(max(1, args.jobs)) as pool:
        t = time.time()
        list(pool.map(lambda job: pretrain(*job), [(a, s) for s in size["seeds"] for a in arms if arms[a]]))
        timings["pretrain"] = time.time() - t
        t = time.time()
        jobs = [(a, s, k) for s in size["seeds"] for a in arms for k in args.tasks]
        list(pool.map(lambda job: finetune(*job), jobs))
        timings["finetune"] = time.time() - t

    results: list[dict[str, Any]] = []
    for arm, seed, task in jobs:
        path = runs / f"finetune-{arm}-s{seed}-{task}" / "eval.json"
        if path.exists():
            results.append(
                {
                    "arm": arm,
                    "seed": seed,
                    "task": task,
                    "metrics": json.loads(path.read_text())["metrics"],
                    "run": str(path.parent),
                }
            )
    t = time.time()
    for arm in (a for a in arms if a.startswith("multimae")):
        for seed in size["seeds"]:
            run_dir = runs / f"pretrain-{arm}-s{seed}"
            if (run_dir / "checkpoint.pt").exists():
                scores = probe(run_dir, data / "test", run_dir / "probe.json")
                if scores is None:
                    failed.append(f"probe {arm} seed {seed}: see {run_dir / 'probe.log'}")
                else:
                    results.append({"arm": arm, "seed": seed, "task": "probe", "metrics": scores, "run": str(run_dir)})
    timings["probe"] = time.time() - t

    table = aggregate(results)
    wall = time.time() - t_start
    header = (
        f"Transfer to {size['test_num']} held-out synthetic test scenes, mean ± std over seeds {size['seeds']}; "
        f"pre-training {size['pretrain_steps']} steps, partial fine-tuning (last block + per-patch linear head) "
        f"{size['finetune_steps']} steps per task, batch {size['batch_size']}, {size['image_px']} px, 8 px patches."
    )
    text = "\n".join([header, "", markdown_table(table), "", *margins(table), *(f"failed: {f}" for f in failed)])
    (out / "transfer.md").write_text(text + "\n")
    record = {
        "settings": settings,
        "seeds": size["seeds"],
        "code_version": code_version(),
        "table": table,
        "runs": results,
        "failed": failed,
        "stage_seconds": {k: round(v, 1) for k, v in timings.items()},
        "wall_seconds": round(wall, 1),
        "date": time.strftime("%Y-%m-%d"),
    }
    (out / "transfer.json").write_text(json.dumps(record, indent=1) + "\n")
    print(f"\n{text}\n\ntotal {wall:.0f} s; written: {out / 'transfer.md'}, {out / 'transfer.json'}", flush=True)
    if failed:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
