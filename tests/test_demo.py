"""The demo pipeline end to end at smoke-test size: every stage's outputs, a finite final table, reuse on rerun."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from multimae.demo import load_demo_model

REPO = Path(__file__).resolve().parents[1]


def demo(out: Path) -> str:
    proc = subprocess.run(
        [sys.executable, str(REPO / "pipelines" / "demo.py"), "--quick", "--out", str(out)],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


@pytest.mark.slow
def test_quick_demo_runs_every_stage_and_reuses_them(tmp_path):
    out = tmp_path / "demo"
    log = demo(out)
    for root in ["pretrain", "labeled"]:
        manifest = json.loads((out / root / "manifest.json").read_text())
        assert {"rgb", "depth_gt", "semseg_gt"} <= set(manifest["modalities"])
    assert {"depth", "semseg"} <= set(json.loads((out / "pretrain" / "manifest.json").read_text())["modalities"])
    assert "is complete and consistent" in log  # multimae-shard verify after labeling
    assert (out / "runs" / "pretrain" / "checkpoint.pt").exists()
    assert list((out / "runs" / "pretrain" / "reconstructions").glob("*.png"))
    for task, metric in [("depth", "delta1"), ("semseg", "mIoU")]:
        results = json.loads((out / "runs" / f"finetune-{task}" / "eval.json").read_text())
        assert math.isfinite(results["metrics"][metric])
        assert (out / f"predictions-{task}.png").exists()
    report = (out / "report.md").read_text()
    assert "![samples](samples.png)" in report and (out / "samples.png").exists()
    rows = [line for line in report.splitlines() if line.startswith("| ") and "metric" not in line]
    values = [float(row.split("|")[3]) for row in rows]
    assert len(values) == 7 and all(math.isfinite(v) for v in values)
    # the last line names the page's command on the model just trained, and that model loads
    command = log.strip().splitlines()[-1]
    assert command == f"open the interactive page: multimae-demo {out.resolve() / 'runs' / 'pretrain'}"
    assert load_demo_model(command.split()[-1]).step == 6

    again = demo(out)
    assert again.count("reusing the finished stage") == 4


def test_full_demo_refuses_a_folder_made_by_the_quick_one(tmp_path):
    """The sizes are recorded in OUT/settings.json: smoke-test results are never presented as the demo."""
    out = tmp_path / "demo"
    out.mkdir()
    (out / "settings.json").write_text(json.dumps({"mode": "quick"}))
    proc = subprocess.run(
        [sys.executable, str(REPO / "pipelines" / "demo.py"), "--out", str(out)],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=120,
    )
    assert proc.returncode == 1 and "holds results made with other settings" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and not (out / "pretrain").exists()
