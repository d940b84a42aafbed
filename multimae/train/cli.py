"""`multimae-train`: pre-train or fine-tune MultiMAE on a shard set, evaluate a checkpoint, export a run.

    multimae-train --shards DATA --config pipelines/pretrain-demo.yaml [--out RUN] [key=value ...]
    multimae-train --shards DATA --config pipelines/finetune-demo-semseg.yaml --init RUN/checkpoint.pt --out FT
    multimae-train --shards DATA --config ... --out RUN --eval-only [--save-predictions]
    multimae-train export RUN HUB_DIR          # a Hugging Face Hub folder (from_pretrained-loadable)
    torchrun --nproc_per_node 2 --standalone -m multimae.train --shards DATA --config ...   (DDP)

A second call with the same --out continues the run when it holds the same run (config, shards, init) and
stops with one line when it holds another. Exit status: 0 done, 1 the run failed (non-finite loss),
2 a usage, config or data error (one line naming the key or file).
"""

from __future__ import annotations

import argparse
import os
import sys

from .config import ConfigError, load_run_config

PROG = "multimae-train"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shards", help="shard set root (local path or fsspec URL) with manifest.json")
    p.add_argument("--config", help="YAML run config (pipelines/pretrain-*.yaml, pipelines/finetune-*.yaml)")
    p.add_argument(
        "--eval-shards",
        metavar="EVAL_DATA",
        help="evaluate on this separate shard set (data.eval_root), e.g. ImageNet's val split",
    )
    p.add_argument("--out", help="run folder (default: runs/<config name>)")
    p.add_argument(
        "--init",
        help="initial weights: a multimae-train checkpoint, an official MultiMAE or timm checkpoint, or a Hub folder",
    )
    resume = p.add_mutually_exclusive_group()
    resume.add_argument(
        "--resume",
        nargs="?",
        const=True,
        default=None,
        metavar="CHECKPOINT",
        help="continue the run in --out even if its settings differ (or continue CHECKPOINT)",
    )
    resume.add_argument(
        "--no-resume", dest="resume", action="store_false", help="start over even if --out holds a checkpoint"
    )
    p.add_argument("--eval-only", action="store_true", help="evaluate the checkpoint of --out (or --init), no training")
    p.add_argument(
        "--stop-at",
        type=int,
        metavar="STEP",
        help="leave after STEP with a checkpoint (the lr schedule still spans train.steps); rerun to go on",
    )
    p.add_argument("--save-predictions", action="store_true", help="also write RUN/predictions.zarr")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. optim.blr=3e-4")
    return p.parse_intermixed_args(argv)


def fail(message: str, code: int = 2) -> None:
    print(f"{PROG}: error: {one_line(message)}", file=sys.stderr)
    raise SystemExit(code)


def one_line(message: str) -> str:
    """An error raised in a DataLoader worker arrives with the worker's traceback around it: keep its message."""
    lines = [line for line in str(message).strip().splitlines() if line.strip()]
    if len(lines) <= 1:
        return lines[0] if lines else ""
    last = lines[-1]
    head, sep, rest = last.partition(": ")
    return rest if sep and "." in head and " " not in head else last  # "shards.errors.FormatError: msg" -> msg


def export_main(argv: list[str]) -> None:
    p = argparse.ArgumentParser(
        prog=f"{PROG} export",
        description="Write a run as a Hugging Face Hub folder "
        "(config.json with the class names, model.safetensors, README.md model card).",
    )
    p.add_argument("run", help="run folder (or its checkpoint.pt)")
    p.add_argument("out", help="folder to write (loads with MultiMAE/MultiViT.from_pretrained)")
    args = p.parse_args(argv)
    from multimae.interop import CheckpointError

    from .export import export_run

    try:
        path = export_run(args.run, args.out)
    except (CheckpointError, FileNotFoundError, ValueError) as e:
        fail(str(e))
    print(f"exported {args.run} -> {path}")


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["export"]:
        return export_main(argv[1:])
    args = parse_args(argv)
    # a separate evaluation set replaces held-out shards
    overrides = args.overrides + (
        [f"data.eval_root={args.eval_shards}", "data.eval_num_shards=0"] if args.eval_shards else []
    )
    try:
        cfg = load_run_config(args.config, overrides)
    except ConfigError as e:
        fail(f"config: {e}")
    if args.print_config:
        from shards.config import to_yaml

        print(to_yaml(cfg), end="")
        return
    if not args.shards:
        fail("--shards is required (a shard set made by multimae-shard build)")
    out = args.out or os.path.join("runs", os.path.splitext(os.path.basename(args.config or "default"))[0])

    from multimae.interop import CheckpointError
    from shards.format import FormatError

    from .engine import NonFiniteLoss
    from .main import run
    from .state import TrainingError

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
        fail(f"config: {e}")
    except NonFiniteLoss as e:
        fail(str(e), code=1)
    except (FormatError, TrainingError, CheckpointError, FileNotFoundError) as e:
        fail(str(e))
    if int(os.environ.get("RANK", "0")) == 0 and "steps" in summary:
        print(
            f"done: {summary['steps']} steps in {summary['seconds']} s ({summary['samples_per_s']:.1f} "
            f"samples/s, {summary['dtype']}); checkpoint {summary['checkpoint']}",
            flush=True,
        )


if __name__ == "__main__":
    main()
