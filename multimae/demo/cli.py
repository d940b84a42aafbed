"""`multimae-demo`: serve the interactive cross-modal page for a pre-trained MultiMAE.

    multimae-demo RUN_OR_HUB_DIR [--teachers pipelines/pseudolabel.yaml] [--port 7860] [--host 127.0.0.1]

RUN_OR_HUB_DIR is a pre-training run folder of `multimae-train` (its checkpoint.pt is read again whenever training
writes a newer one) or a Hub folder of `multimae-train export`. The page binds 127.0.0.1 unless --host says
otherwise. Exit status 2 with one line for a problem the user can fix at start-up (no such folder, a fine-tuned
run, teachers that cannot load or do not fit the model, a port in use, gradio not installed).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

PROG = "multimae-demo"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", metavar="RUN_OR_HUB_DIR", help="pre-training run folder (or checkpoint file) or Hub folder")
    p.add_argument(
        "--teachers",
        metavar="FILE",
        help="labeling config whose teachers make the depth/semseg inputs (default: the shipped small teachers)",
    )
    p.add_argument("--port", type=int, default=7860, help="port to serve on (default 7860)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--device", default="auto", help="torch device for the model and teachers (auto: cuda if present)")
    return p.parse_args(argv)


def fail(message: str) -> None:
    print(f"{PROG}: error: {message}", file=sys.stderr)
    raise SystemExit(2)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    log = logging.getLogger("multimae.demo")  # the page's own lines only (not every HTTP request)
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter(f"{PROG}: %(message)s"))
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    if not os.path.exists(args.run):
        fail(f"{args.run} not found: give a pre-training run folder of multimae-train or a Hub folder of its export")
    if args.teachers is not None and not os.path.isfile(args.teachers):
        fail(f"--teachers {args.teachers}: no such file (a labeling config such as pipelines/pseudolabel.yaml)")
    try:
        import gradio  # noqa: F401
    except ImportError:
        fail("the page needs gradio: pip install -e '.[demo]'")

    import torch

    from labeling.config import ConfigError
    from labeling.teachers import TeacherNotFoundError

    from .app import build_page, serve
    from .loading import DemoError, ModelSource, NoCheckpoint, check_teachers, load_teachers

    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    where = args.teachers or "the shipped teachers"
    try:
        teachers = load_teachers(args.teachers, device)
    except (ConfigError, TeacherNotFoundError, ValueError) as e:
        fail(f"{where}: {str(e).splitlines()[0]}")
    source = ModelSource(args.run, device)
    try:
        model = source.get()
        check_teachers(model, teachers, where)
        log.info("model %s", model.describe())
    except NoCheckpoint as e:
        log.warning("%s", e)
    except DemoError as e:
        fail(str(e))
    try:
        serve(build_page(source, teachers, where), args.host, args.port)
    except OSError as e:
        fail(f"cannot serve on {args.host}:{args.port}: {str(e).splitlines()[0]} (choose another --port)")


if __name__ == "__main__":
    main()
