"""`make demo`: the whole path on the embedded default, through the same CLIs a user runs.

    python pipelines/demo.py [--out demo_out] [--quick]

Stages (each reused when its outputs exist, so a second run only says "reusing"):
  1. build    synthetic shard sets: `pretrain` (ground truth present but never trained on) and
              `labeled` (fine-tuning shards + the held-out test shard)
  2. label    pseudo depth + semseg with the shipped small teachers on Ray, then verify
  3. pretrain a tiny MultiMAE on rgb + pseudo depth + pseudo semseg
  4. finetune depth and semseg from the pre-trained encoder; evaluate on the test shard
  5. report   final table + OUT/report.md with the pictures

An --out made with --quick is never presented as the full demo (and the other way round): the sizes are
recorded in OUT/settings.json and a mismatch stops with one line.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from stages import (  # noqa: E402  (pipelines/stages.py, beside this file)
    PipelineError,
    Stage,
    build_synthetic,
    claim_folder,
    manifest_has,
    pseudo_label,
    run_cli,
    tool,
)

# Sizes of the full demo and of the smoke test (--quick).
FULL = {"pretrain_num": 512, "labeled_num": 384, "shard_size": 128, "pretrain_steps": 300, "finetune_steps": 200}
QUICK = {"pretrain_num": 48, "labeled_num": 48, "shard_size": 16, "pretrain_steps": 6, "finetune_steps": 4}
QUICK_TRAIN = ["train.batch_size=8", "log.every=2", "data.num_workers=0", "train.warmup_steps=1"]


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="demo_out", help="everything the demo writes goes under this folder")
    ap.add_argument("--quick", action="store_true", help="tiny sizes and step counts (smoke test, about 2 minutes)")
    args = ap.parse_args(argv)
    size = QUICK if args.quick else FULL
    out = Path(args.out).resolve()
    try:
        claim_folder(out, {"mode": "quick" if args.quick else "full", **size}, "demo")
        run_demo(out, size, args.quick)
    except PipelineError as e:
        sys.exit(f"demo: {e}")


def run_demo(out: Path, size: dict, quick: bool) -> None:
    pre, lab, runs = out / "pretrain", out / "labeled", out / "runs"
    t0 = time.time()
    timings: dict[str, float] = {}

    def build(log: Path) -> None:
        for root, num, seed in [(pre, size["pretrain_num"], 0), (lab, size["labeled_num"], 1)]:
            build_synthetic(root, num, size=128, shard_size=size["shard_size"], seed=seed, log=log)

    timings["build"] = Stage(1, 5, "build synthetic shard sets", out)(
        manifest_has(pre, ["rgb"]) and manifest_has(lab, ["rgb"]), build
    )

    def label(log: Path) -> None:
        pseudo_label(pre, log, f"batch_size={8 if quick else 16}")
        run_cli([tool("multimae-shard"), "show", str(pre), "--out", str(out / "samples.png"), "--n", "4"], log)

    timings["label"] = Stage(2, 5, "pseudo-label with the shipped teachers (Ray)", out)(
        manifest_has(pre, ["depth", "semseg"]) and (out / "samples.png").exists(), label
    )

    steps = [f"train.steps={size['pretrain_steps']}"]
    if quick:
        steps += QUICK_TRAIN + ["train.checkpoint_every=3", "log.image_every=3"]
    done_marker = runs / "pretrain" / "demo-stage.done"

    def pretrain(log: Path) -> None:
        run_cli(
            [
                tool("multimae-train"),
                "--shards",
                str(pre),
                "--config",
                "pipelines/pretrain-demo.yaml",
                "--out",
                str(runs / "pretrain"),
                *steps,
            ],
            log,
        )
        done_marker.touch()

    timings["pretrain"] = Stage(3, 5, "pre-train a tiny MultiMAE on rgb + pseudo depth + pseudo semseg", out)(
        done_marker.exists(), pretrain
    )

    ft_steps = [f"train.steps={size['finetune_steps']}"]
    if quick:
        ft_steps += QUICK_TRAIN + ["train.checkpoint_every=2"]

    def finetune(log: Path) -> None:
        for task in ["depth", "semseg"]:
            run_dir = runs / f"finetune-{task}"
            if (run_dir / "eval.json").exists():
                print(f"    reusing {run_dir / 'eval.json'}")
                continue
            run_cli(
                [
                    tool("multimae-train"),
                    "--shards",
                    str(lab),
                    "--config",
                    f"pipelines/finetune-demo-{task}.yaml",
                    "--init",
                    str(runs / "pretrain" / "checkpoint.pt"),
                    "--out",
                    str(run_dir),
                    "--save-predictions",
                    *ft_steps,
                ],
                log,
            )

    timings["finetune"] = Stage(4, 5, "fine-tune depth and semseg, evaluate on the held-out test shard", out)(
        all((runs / f"finetune-{t}" / "eval.json").exists() for t in ["depth", "semseg"]), finetune
    )

    print("\n=== [5/5] report", flush=True)
    from report import write_report  # pipelines/report.py, beside this file

    table = write_report(out, timings, time.time() - t0)
    print(table)
    print(f"\nreport: {out / 'report.md'}  (total {time.time() - t0:.0f} s)")
    print(f"open the interactive page: multimae-demo {runs / 'pretrain'}")


if __name__ == "__main__":
    main()
