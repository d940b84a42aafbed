"""`multimae-train`: pre-train or fine-tune MultiMAE on a shard set, or evaluate a checkpoint.

multimae-train --shards DATA --config pipelines/pretrain-demo.yaml [--out RUN_DIR] [key=value ...]
multimae-train --shards DATA --config pipelines/finetune-demo-semseg.yaml --init RUN_DIR/checkpoint.pt
multimae-train --shards DATA --config ... --out RUN_DIR --eval-only [--save-predictions]
torchrun --nproc_per_node 2 --standalone -m multimae.cli --shards DATA --config ...   (DDP)
"""

from __future__ import annotations

import argparse
import os
import sys

from multimae.config import ConfigError, load_config


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="multimae-train", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--shards", required=True, help="shard set root (local path or fsspec URL) with manifest.json")
    p.add_argument("--config", help="YAML run config (pipelines/pretrain-*.yaml, pipelines/finetune-*.yaml)")
    p.add_argument("--out", help="run directory (default: runs/<config name>)")
    p.add_argument("--init", help="initial weights: a multimae-train checkpoint or an official MultiMAE checkpoint")
    p.add_argument(
        "--resume",
        nargs="?",
        const=True,
        default=True,
        metavar="CHECKPOINT",
        help="continue from CHECKPOINT (default: RUN_DIR/checkpoint.pt when it exists)",
    )
    p.add_argument(
        "--no-resume", dest="resume", action="store_false", help="start fresh even if RUN_DIR has a checkpoint"
    )
    p.add_argument("--eval-only", action="store_true", help="evaluate the checkpoint (RUN_DIR or --init), no training")
    p.add_argument(
        "--stop-at",
        type=int,
        metavar="STEP",
        help="leave after STEP with a checkpoint (the lr schedule still spans train.steps); rerun to go on",
    )
    p.add_argument("--save-predictions", action="store_true", help="also write RUN_DIR/predictions.zarr")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. optim.blr=3e-4")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as e:
        sys.exit(f"multimae-train: config error: {e}")
    out = args.out or os.path.join("runs", os.path.splitext(os.path.basename(args.config or "default"))[0])

    from multimae.train import TrainingError, run
    from shards.format import FormatError

    try:
        summary = run(
            cfg,
            args.shards,
            out,
            init=args.init,
            resume=args.resume,
            eval_only=args.eval_only,
            save_predictions=args.save_predictions,
            stop_at=args.stop_at,
        )
    except ConfigError as e:
        sys.exit(f"multimae-train: config error: {e}")
    except (FormatError, TrainingError, FileNotFoundError) as e:
        sys.exit(f"multimae-train: error: {e}")
    if int(os.environ.get("RANK", "0")) == 0 and "steps" in summary:
        print(
            f"done: {summary['steps']} steps in {summary['seconds']} s "
            f"({summary['samples_per_s']:.1f} samples/s); checkpoint {summary['checkpoint']}",
            flush=True,
        )


if __name__ == "__main__":
    main()
