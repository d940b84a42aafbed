"""Entry script for `ray submit pipelines/pseudolabel.yaml pipelines/pseudolabel.py [key=value ...]`.

Ray copies only this file to the head node (as ~/pseudolabel.py) and runs it there; the project
itself arrives through the cluster config's file_mounts (~/multimae-toolkit) and setup_commands.
It runs the same job as `multimae-label`, with the config's `metadata:` section, against the
cluster it runs on. Relative paths in the settings resolve against the project folder.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path


def main(argv: list[str]) -> int:
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
