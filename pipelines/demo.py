"""`make demo`: the whole mission on the embedded default, through the same CLIs a user runs.

    python pipelines/demo.py [--out demo_out] [--quick]

Stages (each reused when its outputs exist, so a second run only says "reusing"):
  1. build    synthetic shard sets: `pretrain` (ground truth present but never trained on) and
              `labeled` (fine-tuning shards + the held-out test shard)
  2. label    pseudo depth + semseg with the shipped small teachers on Ray, then verify
  3. pretrain a tiny MultiMAE on rgb + pseudo depth + pseudo semseg
  4. finetune depth and semseg from the pre-trained encoder; evaluate on the test shard
  5. report   final table + OUT/report.md with the pictures
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


def tool(name: str) -> str:
    path = BIN / name
    return str(path) if path.exists() else name


# Sizes of the full demo and of the smoke test (--quick).
FULL = {"pretrain_num": 512, "labeled_num": 384, "shard_size": 128, "pretrain_steps": 300, "finetune_steps": 200}
QUICK = {"pretrain_num": 48, "labeled_num": 48, "shard_size": 16, "pretrain_steps": 6, "finetune_steps": 4}


def run(cmd: list[str], log: Path) -> None:
    """Run one CLI, streaming its output to the terminal and to the stage log."""
    print("$", " ".join(cmd), flush=True)
    with open(log, "ab") as f:
        # one intra-op thread per process: on 2 cores, DataLoader workers + 2 OpenMP threads thrash
        env = {"OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", **os.environ}
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, cwd=REPO, env=env)
        assert proc.stdout is not None
        for line in proc.stdout:
            sys.stdout.buffer.write(line)
            sys.stdout.flush()
            f.write(line)
        if proc.wait() != 0:
            raise SystemExit(f"demo: `{' '.join(cmd)}` failed with exit code {proc.returncode}; log: {log}")


class Stage:
    """Prints a header, skips the stage when `done` is true, and times it."""

    def __init__(self, number: int, title: str, out: Path):
        self.number, self.title, self.log = number, title, out / "logs" / f"{number}-{title.split()[0]}.log"
        self.log.parent.mkdir(parents=True, exist_ok=True)

    def __call__(self, done: bool, body) -> float:
        print(f"\n=== [{self.number}/5] {self.title}", flush=True)
        if done:
            print("    reusing the finished stage (delete its outputs to redo it)", flush=True)
            return 0.0
        start = time.time()
        body(self.log)
        took = time.time() - start
        print(f"    done in {took:.0f} s", flush=True)
        return took


def manifest_has(root: Path, modalities: list[str]) -> bool:
    path = root / "manifest.json"
    return path.exists() and set(modalities) <= set(json.loads(path.read_text())["modalities"])


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="demo_out", help="everything the demo writes goes under this folder")
    ap.add_argument("--quick", action="store_true", help="tiny sizes and step counts (smoke test, about 2 minutes)")
    args = ap.parse_args(argv)
    size = QUICK if args.quick else FULL
    out = Path(args.out).resolve()
    pre, lab, runs = out / "pretrain", out / "labeled", out / "runs"
    t0 = time.time()
    timings: dict[str, float] = {}

    def build(log: Path) -> None:
        for root, num, seed in [(pre, size["pretrain_num"], 0), (lab, size["labeled_num"], 1)]:
            run(
                [
                    tool("multimae-shard"),
                    "build",
                    "--src",
                    "synthetic",
                    "--out",
                    str(root),
                    "--num",
                    str(num),
                    "--size",
                    "128",
                    "--shard-size",
                    str(size["shard_size"]),
                    "--seed",
                    str(seed),
                    "--workers",
                    "2",
                ],
                log,
            )

    timings["build"] = Stage(1, "build synthetic shard sets", out)(
        manifest_has(pre, ["rgb"]) and manifest_has(lab, ["rgb"]), build
    )

    def label(log: Path) -> None:
        run(
            [
                tool("multimae-label"),
                "pipelines/pseudolabel.yaml",
                f"input={pre}",
                f"batch_size={8 if args.quick else 16}",
            ],
            log,
        )
        run([tool("multimae-shard"), "verify", str(pre)], log)
        run([tool("multimae-shard"), "show", str(pre), "--out", str(out / "samples.png"), "--n", "4"], log)

    timings["label"] = Stage(2, "pseudo-label with the shipped teachers (Ray)", out)(
        manifest_has(pre, ["depth", "semseg"]) and (out / "samples.png").exists(), label
    )

    steps = [f"train.steps={size['pretrain_steps']}"]
    if args.quick:
        steps += [
            "train.batch_size=8",
            "train.checkpoint_every=3",
            "log.image_every=3",
            "log.every=2",
            "data.num_workers=0",
            "train.warmup_steps=1",
        ]

    done_marker = runs / "pretrain" / "demo-stage.done"

    def pretrain(log: Path) -> None:
        run(
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

    timings["pretrain"] = Stage(3, "pre-train a tiny MultiMAE on rgb + pseudo depth + pseudo semseg", out)(
        done_marker.exists(), pretrain
    )

    ft_steps = [f"train.steps={size['finetune_steps']}"]
    if args.quick:
        ft_steps += [
            "train.batch_size=8",
            "train.checkpoint_every=2",
            "log.every=2",
            "data.num_workers=0",
            "train.warmup_steps=1",
        ]

    def finetune(log: Path) -> None:
        for task in ["depth", "semseg"]:
            run_dir = runs / f"finetune-{task}"
            if (run_dir / "eval.json").exists():
                print(f"    reusing {run_dir / 'eval.json'}")
                continue
            run(
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

    timings["finetune"] = Stage(4, "fine-tune depth and semseg, evaluate on the held-out test shard", out)(
        all((runs / f"finetune-{t}" / "eval.json").exists() for t in ["depth", "semseg"]), finetune
    )

    print("\n=== [5/5] report", flush=True)
    from report import write_report  # pipelines/report.py, beside this file

    table = write_report(out, timings, time.time() - t0)
    print(table)
    print(f"\nreport: {out / 'report.md'}  (total {time.time() - t0:.0f} s)")


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    main()
