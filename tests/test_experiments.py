"""The transfer experiment end to end at smoke-test size (pipelines/experiments/transfer.py --quick)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_transfer_quick_runs_every_stage_and_records_every_run(tmp_path):
    out = tmp_path / "transfer"
    cmd = [
        sys.executable,
        str(REPO / "pipelines" / "experiments" / "transfer.py"),
        "--quick",
        "--out",
        str(out),
        "--arms",
        "scratch",
        "multimae",
        "--tasks",
        "depth",
        "semseg-rgbd",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=1200)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    record = json.loads((out / "transfer.json").read_text())
    runs = {(r["arm"], r["task"]) for r in record["runs"]}
    assert runs == {
        ("scratch", "depth"),
        ("scratch", "semseg-rgbd"),
        ("multimae", "depth"),
        ("multimae", "semseg-rgbd"),
        ("multimae", "probe"),
    }
    assert record["failed"] == [] and record["code_version"] and record["settings"]["pretrain_steps"] == 4
    assert "| multimae |" in (out / "transfer.md").read_text()
    # the test set scores every fine-tuned run: its 16 scenes
    depth = next(r for r in record["runs"] if r["task"] == "depth")
    assert depth["metrics"]["images"] == 16
    # a second run reuses every stage and gives the same table
    again = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=600)
    assert again.returncode == 0 and json.loads((out / "transfer.json").read_text())["table"] == record["table"]
    # another pre-training length is another experiment: it needs its own folder, results never mix
    longer = subprocess.run([*cmd, "--pretrain-steps", "8"], capture_output=True, text=True, cwd=REPO, timeout=600)
    assert longer.returncode != 0 and "holds results made with other settings" in longer.stderr
