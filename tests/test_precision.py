"""bf16 where the hardware runs it natively, float32 elsewhere, one setting away (multimae/precision.py)."""

import json
import os
import subprocess
import sys

import pytest
import torch

from multimae.train.config import load_run_config
from multimae.train.distributed import Dist
from multimae.train.main import run, setup
from shards.build import build
from shards.precision import autocast_dtype, bf16_feature, cpu_bf16_units
from shards.sources import synthetic_source

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = [
    "model.dim_tokens=64",
    "model.num_blocks=2",
    "model.num_heads=2",
    "model.decoder_dim=64",
    "model.decoder_blocks=1",
    "model.decoder_heads=2",
    "model.patch_size=8",
    "model.num_encoded_tokens=16",
    "data.image_size=32",
    "data.inputs={rgb: rgb, depth: depth_gt, semseg: semseg_gt}",
    "data.eval_num_shards=1",
    "data.shuffle_buffer=16",
    "data.num_workers=0",
    "train.batch_size=8",
    "optim.blr=1e-3",
    "train.warmup_steps=3",
    "log.tensorboard=false",
    "log.every=1",
    "log.image_every=0",
]


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> str:
    out = str(tmp_path_factory.mktemp("shards") / "data")
    build(synthetic_source(40, size=64, seed=3), out, shard_size=8, progress=False)
    return out


def test_bf16_feature_from_cpu_flags():
    assert bf16_feature("fpu avx2 avx512f avx512_bf16 amx_tile amx_bf16".split()) == "amx_bf16"
    assert bf16_feature("fpu avx2 avx512f avx512_bf16".split()) == "avx512_bf16"
    assert bf16_feature("fpu avx2 fma f16c".split()) is None  # e.g. AMD Zen 3: bf16 is emulated, slow


def test_auto_follows_the_hardware_and_float32_is_one_setting_away():
    dtype, why = autocast_dtype("cpu", "auto")
    assert dtype == (torch.bfloat16 if cpu_bf16_units() else torch.float32) and why
    assert autocast_dtype("cpu", "float32") == (torch.float32, "float32 requested")
    assert autocast_dtype("cpu", "bfloat16")[0] == torch.bfloat16  # an explicit choice is honoured


def test_the_run_log_names_the_dtype_and_why(data, tmp_path, capsys):
    run_, _ = setup(
        load_run_config(os.path.join(ROOT, "pipelines", "pretrain-demo.yaml"), TINY + ["train.steps=1"]),
        data,
        str(tmp_path),
        Dist(),
    )
    expected, why = autocast_dtype("cpu")
    assert run_.dtype == expected and f"({why})" in capsys.readouterr().out
    assert all(g.get("fused") for g in run_.optimizer.param_groups)  # fused AdamW, groups unchanged
    assert {g["weight_decay"] for g in run_.optimizer.param_groups} == {0.0, 0.05}


def test_bf16_pretraining_loss_stays_within_one_percent_of_float32(data, tmp_path):
    losses = {}
    for dtype in ("float32", "bfloat16"):
        cfg = load_run_config(
            os.path.join(ROOT, "pipelines", "pretrain-demo.yaml"), TINY + ["train.steps=30", f"train.dtype={dtype}"]
        )
        summary = run(cfg, data, str(tmp_path / dtype))
        assert summary["dtype"] == dtype
        losses[dtype] = summary["loss/total"]
    assert losses["bfloat16"] == pytest.approx(losses["float32"], rel=0.01), losses


@pytest.mark.slow
def test_gpu_script_dry_run_on_cpu(tmp_path):
    """benchmarks/gpu.sh at toy sizes on the CPU: every benchmark runs and the results file is complete."""
    env = {**os.environ, "PYTHON": sys.executable, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        ["bash", os.path.join(ROOT, "benchmarks", "gpu.sh"), str(tmp_path), "--dry-run"],
        capture_output=True,
        text=True,
        timeout=900,
        env=env,
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = json.load(open(tmp_path / "gpu-results.json"))
    tiny = results["model_speed"]["sizes"]["tiny"]
    assert set(tiny["dtypes"]) == {"float32", "bfloat16"} and tiny["dtypes"]["bfloat16"]["samples_per_s"] > 0
    assert tiny["adamw_s"]["fused"] > 0 and tiny["bf16_speedup"] > 0
    assert results["labeling"]["float32"]["job_samples_per_s"] > 0 and "bf16_over_float32_job" in results["labeling"]
    assert results["train_throughput"]["bf16_over_float32"]["model"] > 0
    host = results["labeling_host"]["threads 1, decode on cpu"]
    assert host["cpu_ms_per_sample"] > 0 and host["samples_per_s"] > 0
