"""The transfer experiment (the paper's Table 1 at small scale): does MultiMAE pre-training on pseudo-labeled
data transfer better than RGB-only MAE and than no pre-training?

    python pipelines/experiments/transfer.py [--out runs/transfer] [--seeds 0 1 2]   # full run, about 1 hour on 2 CPUs
    python pipelines/experiments/transfer.py --quick                                  # smoke check, a few minutes
    python pipelines/experiments/transfer.py --arms multimae-gt --seeds 0             # ablation: exact labels
    python pipelines/experiments/transfer.py --finetune-steps 300 --finetune-overrides optim.layer_decay=0.1

Stages, each reused when its outputs exist (a killed run picks up where it stopped):
  1. build     three synthetic shard sets with different scene seeds (`multimae-shard build`):
               `pretrain` (its ground truth is never used), `finetune` (labeled; its last shard is the
               validation shard the trainer evaluates on) and `test` (held-out scenes, for the table);
  2. label     pseudo depth + semseg on `pretrain` with the shipped small teachers (`multimae-label`, Ray);
  3. pretrain  per seed: MAE (rgb in, rgb out, 75% masking as in MAE) and MultiMAE (rgb + pseudo depth +
               pseudo semseg in and out, the demo's token budget), same steps, batch, data and image size;
  4. finetune  per arm (scratch = random init, MAE, MultiMAE) x seed x task, identical budgets, from RGB only:
               depth (delta1, AbsRel), semseg (mIoU), cls (top-1); plus semseg from RGB-D, ground-truth depth
               as the extra input (the paper's RGB-D columns); then evaluated on the `test` shards;
  5. report    mean +- std over seeds per arm and task: OUT/transfer.md (printed) and OUT/transfer.json.

Training and evaluation go through `multimae.train.run`, the function behind `multimae-train` (same configs:
pipelines/pretrain-demo.yaml and pipelines/finetune-demo-*.yaml, plus the overrides listed in ARMS and TASKS);
each run's log is RUN_DIR/train.log.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(REPO), str(REPO / "pipelines")]

from stages import PipelineError, build_synthetic, claim_folder, manifest, pseudo_label  # noqa: E402

# Sizes of the full experiment and of the smoke check. Scene seeds differ per set, so no scene is shared.
FULL = dict(
    pretrain_num=1536,
    finetune_num=320,
    test_num=256,
    shard_size=64,
    image_px=128,
    pretrain_steps=400,
    finetune_steps=80,
    batch_size=32,
    seeds=[0, 1, 2],
)
QUICK = dict(
    pretrain_num=64,
    finetune_num=48,
    test_num=32,
    shard_size=16,
    image_px=96,
    pretrain_steps=6,
    finetune_steps=4,
    batch_size=8,
    seeds=[0],
)
SCENE_SEEDS = {"pretrain": 100, "finetune": 101, "test": 102}

PRETRAIN_CONFIG = "pipelines/pretrain-demo.yaml"
# Pre-training arms: config overrides on top of PRETRAIN_CONFIG (scratch has no pre-training).
ARMS: dict[str, list[str] | None] = {
    "scratch": None,
    # MAE: rgb only, 9 of 36 tokens visible at 96 px (MAE's 75% mask ratio); the norm-pix rgb loss stays on
    "mae": ["data.inputs={rgb: rgb}", "model.out_domains=[rgb]", "model.num_encoded_tokens=9"],
    # MultiMAE: rgb + pseudo depth + pseudo semseg, 32 of 3 x 36 tokens visible, as the demo config
    "multimae": [],
    # Ablation (not in the default run): MultiMAE pre-trained on the exact depth and semseg instead of the
    # teachers' pseudo labels, the upper bound that better teachers could reach
    "multimae-gt": ["data.inputs={rgb: rgb, depth: depth_gt, semseg: semseg_gt}"],
}
DEFAULT_ARMS = ["scratch", "mae", "multimae"]
# Transfer tasks: (fine-tuning config, overrides). All fine-tune from RGB except semseg-rgbd.
TASKS: dict[str, tuple[str, list[str]]] = {
    "depth": ("pipelines/finetune-demo-depth.yaml", []),
    "semseg": ("pipelines/finetune-demo-semseg.yaml", []),
    "cls": ("pipelines/finetune-demo-cls.yaml", []),
    "semseg-rgbd": ("pipelines/finetune-demo-semseg.yaml", ["data.inputs={rgb: rgb, depth: depth_gt}"]),
}
# Table columns: (task, metric, header).
COLUMNS = [
    ("depth", "delta1", "depth δ1 ↑"),
    ("depth", "AbsRel", "depth AbsRel ↓"),
    ("semseg", "mIoU", "semseg mIoU ↑"),
    ("cls", "top1", "cls top-1 ↑"),
    ("semseg-rgbd", "mIoU", "RGB-D semseg mIoU ↑"),
]


def train(
    config: str, overrides: list[str], shards: Path, out: Path, *, init: Path | None = None, eval_only: bool = False
) -> dict[str, Any] | None:
    """One `multimae-train` run through its Python API, its output going to OUT/train.log (or eval.log).

    Returns the run's summary, or None when the trainer stopped it (TrainingError: e.g. a non-finite loss).
    """
    from multimae.train.config import load_run_config
    from multimae.train.engine import TrainingError
    from multimae.train.main import run

    cfg = load_run_config(str(REPO / config), overrides)
    out.mkdir(parents=True, exist_ok=True)
    log = out / ("eval.log" if eval_only else "train.log")
    with open(log, "a") as f, contextlib.redirect_stdout(f):
        print(
            f"# multimae-train --shards {shards} --config {config} --out {out}"
            f"{f' --init {init}' if init else ''}{' --eval-only' if eval_only else ''} {' '.join(overrides)}",
            flush=True,
        )
        try:
            return run(cfg, str(shards), str(out), init=str(init) if init else None, eval_only=eval_only)
        except TrainingError as e:
            reason = str(e)
            print(f"multimae-train: error: {reason}", flush=True)
    print(f"transfer: run {out} stopped: {reason}", flush=True)
    return None


def common_overrides(size: dict[str, Any], seed: int, steps: int, quick: bool) -> list[str]:
    """The budget every arm shares; a checkpoint every quarter of the run, so a killed run loses little."""
    quarter = max(1, steps // 4)
    o = [
        f"train.seed={seed}",
        f"train.steps={steps}",
        f"train.warmup_steps={max(1, steps // 10)}",
        f"train.batch_size={size['batch_size']}",
        f"train.checkpoint_every={quarter}",
        f"log.every={quarter}",
    ]
    if quick:
        o += ["data.num_workers=0", "data.shuffle_buffer=16"]
    return o


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
            row.append("-" if c is None else f"{c['mean']:.{digits}f} ± {c['std']:.{digits}f} (n={c['n']})")
        lines.append(f"| {arm} | " + " | ".join(row) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="runs/transfer", help="everything the experiment writes goes here")
    ap.add_argument("--quick", action="store_true", help="tiny sets and step counts, one seed (smoke check)")
    ap.add_argument("--seeds", type=int, nargs="+", help="training seeds (default: 0 1 2; --quick: 0)")
    ap.add_argument("--pretrain-steps", type=int, help=f"pre-training steps per arm (default {FULL['pretrain_steps']})")
    ap.add_argument("--finetune-steps", type=int, help=f"fine-tuning steps per task (default {FULL['finetune_steps']})")
    ap.add_argument("--tasks", nargs="+", choices=list(TASKS), default=list(TASKS), help="transfer tasks to run")
    ap.add_argument(
        "--finetune-overrides",
        nargs="+",
        default=[],
        metavar="KEY=VALUE",
        help="config overrides for every fine-tuning run, e.g. optim.blr=5e-3 (recorded in settings)",
    )
    ap.add_argument(
        "--arms",
        nargs="+",
        choices=list(ARMS),
        default=DEFAULT_ARMS,
        help=f"pre-training arms (default: {' '.join(DEFAULT_ARMS)}; multimae-gt is an ablation)",
    )
    args = ap.parse_args(argv)
    size = dict(QUICK if args.quick else FULL)
    for key, value in (
        ("seeds", args.seeds),
        ("pretrain_steps", args.pretrain_steps),
        ("finetune_steps", args.finetune_steps),
    ):
        if value is not None:
            size[key] = value
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    data, runs, logs = out / "data", out / "runs", out / "logs"
    logs.mkdir(exist_ok=True)
    t_start = time.time()
    timings: dict[str, float] = {}

    # Runs are reused by directory name, so their settings must not change under them.
    # Arms and tasks may be added to a folder later; the ones it already holds must keep their definitions.
    arms = {arm: ARMS[arm] for arm in args.arms}
    settings = {k: v for k, v in size.items() if k != "seeds"} | {
        "scene_seeds": SCENE_SEEDS,
        "arms": arms,
        "tasks": TASKS,
    }
    if args.finetune_overrides:
        settings["finetune_overrides"] = args.finetune_overrides
    try:
        settings = claim_folder(out, settings, "transfer", extend=("arms", "tasks"))
    except PipelineError as e:
        raise SystemExit(f"transfer: {e}") from None

    # 1. build -------------------------------------------------------------------------------------
    t = time.time()
    for name in ("pretrain", "finetune", "test"):
        build_synthetic(
            data / name,
            size[f"{name}_num"],
            size=size["image_px"],
            shard_size=size["shard_size"],
            seed=SCENE_SEEDS[name],
            log=logs / "build.log",
        )
    timings["build"] = time.time() - t

    # 2. label -------------------------------------------------------------------------------------
    t = time.time()
    if not {"depth", "semseg"} <= set(manifest(data / "pretrain")["modalities"]):
        pseudo_label(data / "pretrain", logs / "label.log", "progress=false")
    timings["label"] = time.time() - t

    test_shards = [s["name"] for s in manifest(data / "test")["shards"]]
    test_overrides = [f"data.train_shards=[{test_shards[0]}]", f"data.eval_shards=[{','.join(test_shards)}]"]
    ft_eval = ["data.eval_num_shards=1"]  # the fine-tuning set's last shard: validation during fine-tuning
    results: list[dict[str, Any]] = []
    failed: list[str] = []  # runs that stopped (e.g. a non-finite loss): left out of the table, listed below it
    timings["pretrain"] = timings["finetune"] = 0.0
    n_runs = len(size["seeds"]) * len(arms) * len(args.tasks)
    done = 0
    for seed in size["seeds"]:
        # 3. pretrain ------------------------------------------------------------------------------
        for arm, arm_overrides in arms.items():
            if arm_overrides is None:
                continue
            run_dir = runs / f"pretrain-{arm}-s{seed}"
            if not (run_dir / "summary.json").exists():
                t = time.time()
                overrides = arm_overrides + common_overrides(size, seed, size["pretrain_steps"], args.quick)
                s = train(PRETRAIN_CONFIG, overrides + ["log.image_every=0"], data / "pretrain", run_dir)
                timings["pretrain"] += time.time() - t
                if s is None:
                    failed.append(f"pretrain {arm} seed {seed}: see {run_dir / 'train.log'}")
                    continue
                losses = " ".join(f"{k[5:]} {v:.3f}" for k, v in s.items() if k.startswith("loss/"))
                print(
                    f"pretrain {arm:8s} seed {seed}: {s['steps']} steps in {time.time() - t:.0f} s, "
                    f"final loss {losses}",
                    flush=True,
                )

        # 4. finetune and test ---------------------------------------------------------------------
        for arm, arm_overrides in arms.items():
            init = None if arm_overrides is None else runs / f"pretrain-{arm}-s{seed}" / "checkpoint.pt"
            for task in args.tasks:
                config, task_overrides = TASKS[task]
                run_dir = runs / f"finetune-{arm}-s{seed}-{task}"
                test_eval = run_dir / "test" / "eval.json"
                overrides = (
                    task_overrides
                    + common_overrides(size, seed, size["finetune_steps"], args.quick)
                    + args.finetune_overrides
                )
                t = time.time()
                if init is not None and not (init.parent / "summary.json").exists():
                    failed.append(f"finetune {arm} seed {seed} {task}: no pre-trained checkpoint")
                    continue
                if not test_eval.exists():
                    ok = (
                        train(config, overrides + ft_eval, data / "finetune", run_dir, init=init) is not None
                        and train(
                            config,
                            overrides + test_overrides,
                            data / "test",
                            run_dir / "test",
                            init=run_dir / "checkpoint.pt",
                            eval_only=True,
                        )
                        is not None
                    )
                    timings["finetune"] += time.time() - t
                    if not ok:
                        failed.append(f"finetune {arm} seed {seed} {task}: see the logs in {run_dir}")
                        continue
                metrics = json.loads(test_eval.read_text())["metrics"]
                results.append({"arm": arm, "seed": seed, "task": task, "metrics": metrics, "run": str(run_dir)})
                done += 1
                shown = " ".join(f"{k} {v:.3f}" for k, v in metrics.items() if isinstance(v, float))
                print(
                    f"[{done}/{n_runs}] {arm:8s} seed {seed} {task:11s} test: {shown} ({time.time() - t:.0f} s)",
                    flush=True,
                )

    # 5. report ------------------------------------------------------------------------------------
    table = aggregate(results)
    wall = time.time() - t_start
    timings = {k: round(v, 1) for k, v in timings.items()}
    header = (
        f"Transfer to held-out synthetic scenes ({size['test_num']} test scenes), mean ± std over seeds "
        f"{size['seeds']}; pre-training {size['pretrain_steps']} steps, fine-tuning {size['finetune_steps']} "
        f"steps per task, batch {size['batch_size']}."
    )
    failures = "".join(f"\nfailed: {f}" for f in failed)
    text = f"{header}\n\n{markdown_table(table)}\n{failures}\nstage seconds (this invocation): {timings}\n"
    (out / "transfer.md").write_text(text)
    (out / "transfer.json").write_text(
        json.dumps(
            {
                "settings": settings,
                "seeds": size["seeds"],
                "table": table,
                "runs": results,
                "failed": failed,
                "stage_seconds": timings,
                "wall_seconds": round(wall, 1),
            },
            indent=1,
        )
    )
    print(f"\n{text}total {wall:.0f} s; written: {out / 'transfer.md'}, {out / 'transfer.json'}", flush=True)
    if failed:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
