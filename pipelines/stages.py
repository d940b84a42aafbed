"""The stage runner shared by the demo (`pipelines/demo.py`) and the experiments (`pipelines/experiments/`).

A pipeline is a list of stages that call the toolkit's own CLIs (`multimae-shard`, `multimae-label`,
`multimae-train`) or its Python API. Each stage prints a header, is skipped when its outputs already exist
(a second run says "reusing"), logs every command and its output under OUT/logs, and is timed. An output
folder remembers the sizes it was made with (OUT/settings.json): running again with other sizes into the
same folder stops with one line instead of mixing results.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


class PipelineError(SystemExit):
    """A stage failed or the output folder belongs to another configuration; the message says which."""


def tool(name: str) -> str:
    """The console script of this environment (the venv's), or the bare name on the PATH."""
    path = BIN / name
    return str(path) if path.exists() else name


def run_cli(cmd: list[str], log: Path, *, echo: bool = True) -> None:
    """Run one CLI with one intra-op thread, its output appended to `log` (and streamed when `echo`)."""
    print("$", " ".join(cmd), flush=True)
    log.parent.mkdir(parents=True, exist_ok=True)
    # one intra-op thread per process: on small machines DataLoader workers + OpenMP threads thrash
    env = {"OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", **os.environ}
    with open(log, "ab") as f:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, cwd=REPO, env=env)
        assert proc.stdout is not None
        for line in proc.stdout:
            if echo:
                sys.stdout.buffer.write(line)
                sys.stdout.flush()
            f.write(line)
        if proc.wait() != 0:
            raise PipelineError(f"`{' '.join(cmd)}` failed with exit code {proc.returncode}; log: {log}")


class Stage:
    """Prints a numbered header, skips the body when `done`, and times it."""

    def __init__(self, number: int, total: int, title: str, out: Path):
        self.number, self.total, self.title = number, total, title
        self.log = out / "logs" / f"{number}-{title.split()[0]}.log"

    def __call__(self, done: bool, body: Callable[[Path], None]) -> float:
        print(f"\n=== [{self.number}/{self.total}] {self.title}", flush=True)
        if done:
            print("    reusing the finished stage (delete its outputs to redo it)", flush=True)
            return 0.0
        start = time.time()
        body(self.log)
        took = time.time() - start
        print(f"    done in {took:.0f} s", flush=True)
        return took


def manifest(root: Path) -> dict[str, Any] | None:
    path = root / "manifest.json"
    return json.loads(path.read_text()) if path.exists() else None


def manifest_has(root: Path, modalities: list[str]) -> bool:
    m = manifest(root)
    return m is not None and set(modalities) <= set(m["modalities"])


def claim_folder(out: Path, settings: dict[str, Any], name: str, *, extend: tuple[str, ...] = ()) -> dict[str, Any]:
    """Record `settings` in OUT/settings.json, or check they equal the recorded ones.

    Keys in `extend` hold mappings that may gain entries later (e.g. experiment arms); the entries the folder
    already holds must keep their values. Returns the merged settings.
    """
    out.mkdir(parents=True, exist_ok=True)
    path = out / "settings.json"
    new = json.loads(json.dumps(settings))
    if path.exists():
        old = json.loads(path.read_text())
        same = {k: v for k, v in old.items() if k not in extend} == {k: v for k, v in new.items() if k not in extend}
        clash = [k for k in extend for e in old.get(k, {}).keys() & new.get(k, {}).keys() if old[k][e] != new[k][e]]
        if not same or clash:
            raise PipelineError(
                f"{name}: {out} holds results made with other settings ({path}); use another --out or delete it"
            )
        for k in extend:
            new[k] = {**old.get(k, {}), **new.get(k, {})}
    path.write_text(json.dumps(new, indent=1) + "\n")
    return new


def build_synthetic(root: Path, num: int, *, size: int, shard_size: int, seed: int, log: Path) -> None:
    """`multimae-shard build --src synthetic` unless `root` already holds a shard set."""
    if manifest(root) is None:
        run_cli(
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
                str(size),
                "--shard-size",
                str(shard_size),
                "--seed",
                str(seed),
                "--workers",
                "2",
                "--no-progress",
            ],
            log,
        )


def pseudo_label(root: Path, log: Path, *overrides: str) -> None:
    """`multimae-label pipelines/pseudolabel.yaml` on `root` (the shipped teachers), then `verify`."""
    run_cli([tool("multimae-label"), "pipelines/pseudolabel.yaml", f"input={root}", *overrides], log)
    run_cli([tool("multimae-shard"), "verify", str(root)], log)
