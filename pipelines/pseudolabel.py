"""Entry script for `ray submit pipelines/pseudolabel.yaml pipelines/pseudolabel.py [key=value ...]`.

Ray copies only this file to the head node (as ~/pseudolabel.py) and runs it there; the project
itself arrives through the cluster config's file_mounts (~/multimae-toolkit) and setup_commands.
It runs the same job as `multimae-label`, with the config's `metadata:` section, against the
cluster it runs on. Relative paths in the settings resolve against the project folder.

`ray submit` joins its script arguments into one remote shell command without quoting them, so an
override holding a space arrives split in two and one holding `;` runs a command on the head node.
Quote each argument with `shlex.quote` before handing it to `ray submit` (docs/trust-model.md). This
script refuses, before Ray starts, any argument that is not a dotted `key=value` whose value parses
as YAML, which is what a split override looks like.
"""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path

OVERRIDE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z_][A-Za-z0-9_]*)*=(?P<value>.*)", re.DOTALL)
QUOTING = (
    "`ray submit` joins its arguments into a shell command without quoting: quote each override with "
    "shlex.quote (see docs/trust-model.md)"
)


def override_problem(argv: list[str]) -> str | None:
    """Why the arguments are not a list of `key=value` overrides (with `--summary-json PATH`), or None."""
    import yaml

    args = iter(argv)
    for arg in args:
        if arg == "--summary-json":
            next(args, None)
            continue
        if arg.startswith("--summary-json="):
            continue
        match = OVERRIDE.fullmatch(arg)
        if match is None:
            return f"argument {arg!r} is not a dotted key=value override"
        try:
            yaml.safe_load(match["value"])
        except yaml.YAMLError as e:
            return f"override {arg!r}: the value is not valid YAML ({str(e).splitlines()[0]})"
    return None


def main(argv: list[str]) -> int:
    problem = override_problem(argv)
    if problem is not None:
        print(f"pseudolabel.py: error: {problem}; {QUOTING}", file=sys.stderr)
        return 2
    here = Path(__file__).resolve().parent
    project = Path(os.environ.get("MULTIMAE_PROJECT", Path.home() / "multimae-toolkit"))
    if not (project / "pipelines" / "pseudolabel.yaml").is_file():  # run from a checkout
        project = here.parent
    config = Path(os.environ.get("MULTIMAE_LABEL_CONFIG", project / "pipelines" / "pseudolabel.yaml"))
    os.chdir(project)

    from labeling.cli import main as label

    return label([str(config), "ray.address=auto", *argv])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
