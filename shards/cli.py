"""`multimae-shard`: build, verify, inspect and picture aligned shard sets.

    multimae-shard build --src {imagenet,folder,paired,webdataset,synthetic} [--root PATH] --out DATA [options]
    multimae-shard verify DATA [--deep] [--workers N]
    multimae-shard info DATA
    multimae-shard show DATA --out FILE.png [--keys K ... | --n N]
    multimae-shard unlock DATA

Every location is a local path or an fsspec URL (s3://bucket/DATA, gs://...); `--storage-options JSON`
passes keyword arguments to the filesystem of every remote location (docs/object-storage.md).
Errors a user can cause (missing root, empty source, a foreign output folder, bad data, an output another
job is writing) end with one line naming the file and exit code 2; `verify` exits 1 when it finds problems.
"""

from __future__ import annotations

import argparse
import os
import sys

from .errors import printable
from .images import MAX_PIXELS
from .paired import DEPTH_MEANINGS
from .sources import SOURCES


def _cpus() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def _positive(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def _quality(text: str) -> int:
    value = int(text)
    if not 1 <= value <= 100:
        raise argparse.ArgumentTypeError(f"JPEG quality must be in 1..100, got {text}")
    return value


def _pair(text: str) -> tuple[str, str]:
    name, sep, folder = text.partition("=")
    if not (sep and name and folder):
        raise argparse.ArgumentTypeError(f"expected NAME=FOLDER (e.g. depth_gt=depth), got {text!r}")
    return name, folder


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="multimae-shard", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)

    b = sub.add_parser("build", help="turn an RGB source into aligned WebDataset shards (resumes if interrupted)")
    b.add_argument("--src", required=True, choices=SOURCES, help="source kind")
    b.add_argument(
        "--root",
        help="source: image tree (imagenet, folder), modality folders (paired), tar folder/pattern (webdataset)",
    )
    b.add_argument("--out", required=True, help="output shard set (local path or fsspec URL)")
    b.add_argument(
        "--num",
        type=_positive,
        help="number of samples (synthetic: scenes to render, default 1024; others: the first N in build order, "
        "which is shuffled by default)",
    )
    b.add_argument(
        "--size",
        type=_positive,
        help="shorter side of stored rgb, no upscaling (default 256; synthetic 128; paired: native size)",
    )
    b.add_argument("--shard-size", type=_positive, default=1000, help="samples per shard (default 1000)")
    b.add_argument("--workers", type=_positive, default=_cpus(), help="worker processes (default: CPU count)")
    b.add_argument("--seed", type=int, help="synthetic scene seed (default 0)")
    b.add_argument("--quality", type=_quality, default=95, help="rgb JPEG quality, 1..100 (default 95)")
    b.add_argument(
        "--max-pixels",
        type=_positive,
        default=MAX_PIXELS,
        help=f"skip images larger than this many pixels as 'too large' (default {MAX_PIXELS})",
    )
    b.add_argument("--class-from-parent", action="store_true", help="folder, paired: class = parent folder")
    b.add_argument(
        "--classes-from", metavar="DATA", help="use the class list (cls_classes) of this shard set, e.g. the train set"
    )
    b.add_argument("--labels", metavar="CSV", help="imagenet: flat val folder's LOC_val_solution.csv")
    b.add_argument(
        "--modalities",
        nargs="+",
        type=_pair,
        metavar="NAME=FOLDER",
        help="paired: each modality and its folder below --root, e.g. rgb=images depth_gt=depth semseg_gt=labels",
    )
    b.add_argument(
        "--depth-scale", type=float, metavar="F", help="paired: metres per stored depth level (0.001 for millimetres)"
    )
    b.add_argument(
        "--depth-meaning",
        choices=DEPTH_MEANINGS,
        help="paired: what the depth values mean (default metric_m)",
    )
    b.add_argument("--semseg-classes", metavar="FILE", help="paired: class names, one per line (line i = id i)")
    b.add_argument("--normals", action="store_true", help="synthetic: also write exact surface normals (normals_gt)")
    order = b.add_mutually_exclusive_group()
    order.add_argument(
        "--shuffle-seed",
        type=int,
        metavar="N",
        help="seed of the sample order's shuffle (default 0 for imagenet, folder, paired; others keep their order)",
    )
    order.add_argument("--no-shuffle", action="store_true", help="keep the sorted (class) order")
    b.add_argument("--no-progress", action="store_true", help="no progress bar")

    v = sub.add_parser("verify", help="check every shard of every modality; exit 1 listing each problem")
    v.add_argument("data")
    v.add_argument("--deep", action="store_true", help="also check every member against its digest in the stats")
    v.add_argument("--workers", type=_positive, default=1, help="shards checked in parallel (threads, default 1)")

    i = sub.add_parser("info", help="one-screen summary of a shard set")
    i.add_argument("data")
    i.add_argument("--semseg-samples", type=int, default=256, help="samples decoded for semseg class shares (256)")

    s = sub.add_parser("show", help="picture grid: one row per sample, one column per modality")
    s.add_argument("data")
    s.add_argument("--out", required=True, help="output picture (.png)")
    g = s.add_mutually_exclusive_group()
    g.add_argument("--keys", nargs="+", help="sample keys to show")
    g.add_argument("--n", type=_positive, default=6, help="show the first N samples (default 6)")
    s.add_argument("--modalities", nargs="+", help="columns (default: every modality in the manifest)")

    u = sub.add_parser("unlock", help="clear the lock a killed build or labeling job left on an output")
    u.add_argument("data")
    for command in (b, v, i, s, u):
        command.add_argument(
            "--storage-options",
            metavar="JSON",
            help="keyword arguments for the fsspec filesystem of remote locations, e.g. "
            '\'{"endpoint_url": "http://127.0.0.1:9000"}\' (credentials: the backend\'s environment)',
        )
    return p


def _build(args: argparse.Namespace) -> int:
    from .sources import open_source

    source = open_source(
        args.src,
        args.root,
        num=args.num,
        size=args.size,
        seed=args.seed,
        quality=args.quality,
        max_pixels=args.max_pixels,
        class_from_parent=args.class_from_parent,
        labels=args.labels,
        classes_from=args.classes_from,
        modalities=_modalities(args.modalities),
        depth_scale=args.depth_scale,
        depth_meaning=args.depth_meaning,
        semseg_classes=args.semseg_classes,
        shuffle_seed=args.shuffle_seed,
        shuffle=not args.no_shuffle,
        normals=args.normals,
    )
    from .build import build  # imports webdataset (and with it torch): only once the source is known to be fine

    summary = build(source, args.out, shard_size=args.shard_size, workers=args.workers, progress=not args.no_progress)
    print(summary.format())
    return 0


def _modalities(pairs: list[tuple[str, str]] | None) -> dict[str, str] | None:
    if pairs is None:
        return None
    names = [name for name, _ in pairs]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        from .sources import SourceError

        raise SourceError(f"--modalities names {repeated[0]!r} twice")
    return dict(pairs)


def _verify(args: argparse.Namespace) -> int:
    from .verify import shards_without_digests, verify

    problems = verify(args.data, workers=args.workers, deep=args.deep)
    for problem in problems:
        print(problem)
    if args.deep and (old := shards_without_digests(args.data)):
        print(
            f"verify: member digest check unavailable for {len(old)} shard file(s) (written before digests "
            f"existed, e.g. {printable(old[0])}); rebuild them to get digests",
            file=sys.stderr,
        )
    if problems:
        print(f"verify: {len(problems)} problem(s) in {printable(args.data)}", file=sys.stderr)
        return 1
    print(f"verify: {printable(args.data)} is complete and consistent")
    return 0


def _info(args: argparse.Namespace) -> int:
    from .info import info_text

    print(info_text(args.data, semseg_samples=args.semseg_samples))
    return 0


def _show(args: argparse.Namespace) -> int:
    from .show import show

    keys = show(args.data, args.out, keys=args.keys, n=args.n, modalities=args.modalities)
    print(f"show: {len(keys)} samples -> {args.out}")
    return 0


def _unlock(args: argparse.Namespace) -> int:
    from .lock import describe, lock_url, unlock

    record = unlock(args.data)
    if record is None:
        print(f"unlock: {args.data} has no lock")
    else:
        print(f"unlock: removed {lock_url(args.data)} of {describe(record)}")
    return 0


def main(argv: list[str] | None = None) -> None:
    args = parser().parse_args(argv)
    from . import fs
    from .format import FormatError  # also the base of SourceError, BuildError, LockHeld and MissingBackend

    command = {"build": _build, "verify": _verify, "info": _info, "show": _show, "unlock": _unlock}[args.command]
    try:
        fs.set_storage_options(fs.parse_storage_options(args.storage_options))
        code = command(args)
    except BrokenPipeError:  # `multimae-shard info DATA | head`: the reader left, nothing to report
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        code = 0
    except (FormatError, OSError) as e:  # OSError: unwritable --out, disk full, ... (message names the path)
        print(f"multimae-shard {args.command}: error: {printable(str(e))}", file=sys.stderr)
        code = 2
    except KeyboardInterrupt:
        print(f"multimae-shard {args.command}: interrupted; re-run the same command to resume", file=sys.stderr)
        code = 130
    raise SystemExit(code)


if __name__ == "__main__":
    main()
