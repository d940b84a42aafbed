"""The packages depend one way: shards at the bottom, the model and trainer on it, the labeling job and its
teachers on shards only, the demo page (an application) on top of all three."""

import json
import subprocess
import sys


def imported_after(module: str) -> set[str]:
    """Top-level packages of this project that importing `module` in a fresh interpreter loads."""
    code = f"import sys, json; import {module}; print(json.dumps(sorted({{m.split('.')[0] for m in sys.modules}})))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    return set(json.loads(out)) & {"shards", "labeling", "multimae"}


def test_the_labeling_job_and_its_teachers_need_no_model_package():
    for module in ("labeling.job", "labeling.teachers", "labeling.config", "labeling.cli"):
        assert imported_after(module) == {"shards", "labeling"}, module


def test_shards_need_neither_the_model_nor_labeling():
    for module in ("shards.cli", "shards.reader", "shards.build", "shards.modalities", "shards.depth_space"):
        assert imported_after(module) == {"shards"}, module


def test_the_trainer_needs_no_labeling():
    assert imported_after("multimae.train.main") == {"shards", "multimae"}
