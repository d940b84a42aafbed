"""Rank-0 run logging: a progress line, `metrics.jsonl` and TensorBoard scalars every `log.every` steps."""

from __future__ import annotations

import json
import os
from collections.abc import Callable

from .run_folder import RunFolder


def fmt_eta(seconds: float) -> str:
    seconds = int(max(0, seconds))
    return f"{seconds // 3600:d}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


class Logger:
    """Appends to OUT/metrics.jsonl (and OUT/tb); a resumed run first drops what was logged after its checkpoint.

    start_step: the step the run starts or resumes from; lines of later steps (written by a run killed after
    its last checkpoint) are removed, so every step appears once. The files live in `folder` (run_folder.py):
    on object storage they are staged locally and uploaded with every checkpoint.
    """

    def __init__(self, folder: RunFolder, enabled: bool, tensorboard: bool, start_step: int = 0):
        self.enabled = enabled
        self.tb = None
        self.jsonl = None
        if not enabled:
            return
        path = folder.path("metrics.jsonl", fetch=True)
        _truncate_after(path, start_step)
        self.jsonl = open(path, "a")
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(folder.path("tb"), purge_step=start_step + 1 if start_step else None)

    def log(self, step: int, scalars: dict[str, float], line: str | None = None) -> None:
        if not self.enabled:
            return
        self.jsonl.write(json.dumps({"step": step, **scalars}) + "\n")
        self.jsonl.flush()
        if self.tb is not None:
            for k, v in scalars.items():
                self.tb.add_scalar(k, v, step)
        if line:
            print(line, flush=True)

    def flush(self) -> None:
        """Everything logged so far is in the files (before they are uploaded with a checkpoint)."""
        if self.tb is not None:
            self.tb.flush()

    def close(self) -> None:
        if self.jsonl is not None:
            self.jsonl.close()
        if self.tb is not None:
            self.tb.close()


def _metrics_step(line: str) -> int | None:
    try:
        record = json.loads(line)
    except ValueError:
        return None
    return record.get("step", 0) if isinstance(record, dict) else None


def _keys_step(line: str) -> int | None:
    step, sep, _ = line.partition("\t")
    return int(step) + 1 if sep and step.isdigit() else None  # the line of step s is written while taking step s + 1


def truncate_keys_after(path: str, step: int) -> None:
    """Keep the keys-rank<r>.txt lines of the steps a run resumed at `step` has already taken."""
    _truncate_after(path, step, _keys_step)


def _truncate_after(path: str, step: int, step_of: Callable[[str], int | None] = _metrics_step) -> None:
    """Keep the lines of steps <= step (a partial last line of a killed run goes too)."""
    if not os.path.exists(path):
        return
    keep = []
    with open(path) as f:
        for line in f:
            s = step_of(line)
            if s is not None and s <= step:
                keep.append(line if line.endswith("\n") else line + "\n")
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.writelines(keep)
    os.replace(tmp, path)
