"""Rank-0 run logging: a progress line, `metrics.jsonl` and TensorBoard scalars every `log.every` steps."""

from __future__ import annotations

import json
import os


def fmt_eta(seconds: float) -> str:
    seconds = int(max(0, seconds))
    return f"{seconds // 3600:d}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


class Logger:
    """Appends to OUT/metrics.jsonl (and OUT/tb); a resumed run first drops what was logged after its checkpoint.

    start_step: the step the run starts or resumes from; lines of later steps (written by a run killed after
    its last checkpoint) are removed, so every step appears once.
    """

    def __init__(self, out_dir: str, enabled: bool, tensorboard: bool, start_step: int = 0):
        self.enabled = enabled
        self.tb = None
        self.jsonl = None
        if not enabled:
            return
        os.makedirs(out_dir, exist_ok=True)
        path = os.path.join(out_dir, "metrics.jsonl")
        _truncate_after(path, start_step)
        self.jsonl = open(path, "a")
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(os.path.join(out_dir, "tb"), purge_step=start_step + 1 if start_step else None)

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

    def close(self) -> None:
        if self.jsonl is not None:
            self.jsonl.close()
        if self.tb is not None:
            self.tb.close()


def _truncate_after(path: str, step: int) -> None:
    """Keep the metrics.jsonl lines of steps <= step (a partial last line of a killed run goes too)."""
    if not os.path.exists(path):
        return
    keep = []
    with open(path) as f:
        for line in f:
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if isinstance(record, dict) and record.get("step", 0) <= step:
                keep.append(line if line.endswith("\n") else line + "\n")
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.writelines(keep)
    os.replace(tmp, path)
