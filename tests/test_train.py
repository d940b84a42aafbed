"""The lean trainer end to end on real synthetic shards (multimae/train.py, multimae/cli.py).

A tiny MultiMAE (64-d, 2 blocks, 32 px) keeps every run to seconds on 2 CPU cores.
"""

import json
import os
import subprocess
import sys

import pytest
import torch
import zarr

from multimae.train.cli import main as cli_main
from multimae.train.config import load_run_config
from multimae.train.engine import lr_at
from multimae.train.main import run
from multimae.train.state import TrainingError
from shards.build import build
from shards.reader import iter_shard
from shards.sources import synthetic_source

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_FT = ["model.dim_tokens=64", "model.num_blocks=2", "model.num_heads=2"]
TINY = TINY_FT + ["model.decoder_dim=64", "model.decoder_blocks=1", "model.decoder_heads=2"]
PRETRAIN = [
    *TINY,
    "model.patch_size=8",
    "model.num_encoded_tokens=16",
    "data.image_size=32",
    "data.inputs={rgb: rgb, depth: depth_gt, semseg: semseg_gt}",
    "data.eval_num_shards=1",
    "data.shuffle_buffer=16",
    "data.num_workers=0",
    "train.batch_size=8",
    "optim.blr=1e-3",
    "train.warmup_steps=2",
    "log.every=1",
    "log.tensorboard=false",
    "log.num_images=2",
]


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> str:
    """40 synthetic 64 px scenes in 5 shards of 8 (rgb + cls, depth_gt, semseg_gt)."""
    out = str(tmp_path_factory.mktemp("shards") / "data")
    build(synthetic_source(40, size=64, seed=3), out, shard_size=8, progress=False)
    return out


def cfg_of(name: str, overrides: list[str]):
    return load_run_config(os.path.join(ROOT, "pipelines", name), overrides)


def final_weights(run_dir: str) -> dict[str, torch.Tensor]:
    return torch.load(os.path.join(run_dir, "checkpoint.pt"), weights_only=True)["model"]


def read_metrics(run_dir: str) -> list[dict]:
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def test_lr_schedule_warmup_then_cosine():
    kw = dict(base_lr=1.0, warmup_steps=10, total_steps=110, warmup_lr=0.0, min_lr=0.1)
    assert lr_at(0, **kw) == 0.0
    assert lr_at(5, **kw) == pytest.approx(0.5)
    assert lr_at(10, **kw) == pytest.approx(1.0)
    assert lr_at(60, **kw) == pytest.approx(0.55)
    assert lr_at(110, **kw) == pytest.approx(0.1)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_exact_resume_equals_straight_run(data, tmp_path, dtype):
    # chunks of 3 steps, checkpoints every 2: the resume at step 4 lands inside a chunk (replays a batch)
    over = PRETRAIN + ["train.steps=6", "train.checkpoint_every=2", "data.chunk_steps=3", "data.num_workers=1"]
    over.append(f"train.dtype={dtype}")
    cfg = cfg_of("pretrain-demo.yaml", over)
    straight, split = str(tmp_path / "straight"), str(tmp_path / "split")
    s = run(cfg, data, straight)
    assert s["steps"] == 6
    first = run(cfg, data, split, stop_at=4)
    assert first["steps"] == 4
    assert torch.load(os.path.join(split, "checkpoint.pt"), weights_only=True)["step"] == 4
    second = run(cfg, data, split)
    assert second["resumed_from"] == 4 and second["steps"] == 6
    a, b = final_weights(straight), final_weights(split)
    assert a.keys() == b.keys()
    diff = max((a[k].float() - b[k].float()).abs().max().item() for k in a)
    assert diff <= 1e-6, diff
    # the logged losses of steps 5 and 6 agree too, and the checkpoint is plain data with the config
    la = {m["step"]: m["loss/total"] for m in read_metrics(straight)}
    lb = {m["step"]: m["loss/total"] for m in read_metrics(split)}
    assert la[5] == pytest.approx(lb[5], abs=1e-6) and la[6] == pytest.approx(lb[6], abs=1e-6)
    state = torch.load(os.path.join(split, "checkpoint.pt"), weights_only=True)
    assert state["config"]["train"]["steps"] == 6 and state["data"]["chunk_steps"] == 3
    assert set(state["optimizer"]) == {"state", "param_groups"}
    assert os.path.exists(os.path.join(straight, "reconstructions", "step-00000006.png"))


def test_resume_refuses_a_different_batch_size(data, tmp_path):
    over = PRETRAIN + ["train.steps=1"]
    run(cfg_of("pretrain-demo.yaml", over), data, str(tmp_path))
    with pytest.raises(TrainingError, match="train.batch_size"):
        run(cfg_of("pretrain-demo.yaml", over + ["train.batch_size=4"]), data, str(tmp_path))


def test_overfit_a_tiny_batch(data, tmp_path):
    # one shard of 8 samples, no crop/flip randomness: every batch holds the same 8 images
    over = [
        *TINY_FT,
        "model.patch_size=8",
        "data.image_size=32",
        "data.train_shards=[shard-000000]",
        "data.eval_shards=[shard-000000]",
        "data.crop_scale=[1.0, 1.0]",
        "data.crop_ratio=[1.0, 1.0]",
        "data.hflip=0.0",
        "data.num_workers=0",
        "data.shuffle_buffer=0",
        "train.batch_size=8",
        "train.steps=60",
        "train.warmup_steps=5",
        "optim.lr=2e-3",
        "optim.layer_decay=null",
        "optim.weight_decay=0.0",
        "optim.label_smoothing=0.0",
        "log.every=1",
        "log.tensorboard=false",
    ]
    summary = run(cfg_of("finetune-demo-cls.yaml", over), data, str(tmp_path))
    losses = [m["loss/total"] for m in read_metrics(str(tmp_path))]
    assert losses[-1] * 10 <= losses[0], (losses[0], losses[-1])
    assert summary["eval"]["top1"] == 100.0 and summary["eval"]["count"] == 8


def test_finetune_semseg_and_depth_from_pretrained_write_metrics_and_predictions(data, tmp_path):
    pre = str(tmp_path / "pre")
    run(cfg_of("pretrain-demo.yaml", PRETRAIN + ["train.steps=2"]), data, pre)
    init = os.path.join(pre, "checkpoint.pt")
    common = [
        *TINY_FT,
        "model.patch_size=8",
        "data.image_size=32",
        "data.eval_num_shards=1",
        "data.num_workers=0",
        "data.shuffle_buffer=8",
        "train.batch_size=4",
        "train.steps=3",
        "train.warmup_steps=1",
        "log.tensorboard=false",
    ]

    seg_dir = str(tmp_path / "seg")
    seg = run(
        cfg_of("finetune-demo-semseg.yaml", common + ["model.head_dim=64"]),
        data,
        seg_dir,
        init=init,
        save_predictions=True,
    )
    record = json.load(open(os.path.join(seg_dir, "eval.json")))
    assert record["eval_shards"] == ["shard-000004"] and record["target"] == "semseg_gt"
    assert record["metrics"]["pixels"] == 8 * 32 * 32  # every pixel of the 8 held-out samples (no ignore label)
    assert 0.0 <= record["metrics"]["mIoU"] <= 100.0 and record["metrics"] == seg["eval"]
    store = zarr.open_group(os.path.join(seg_dir, "predictions.zarr"), mode="r")
    keys = [s["__key__"] for s in iter_shard(data, "shard-000004", ["rgb"])]
    assert list(store["keys"][:]) == keys
    assert store["pred"].shape == (8, 32, 32) and store["target"].shape == (8, 32, 32)
    assert store["pred"].chunks == (1, 32, 32)
    pred, target = torch.from_numpy(store["pred"][:]), torch.from_numpy(store["target"][:])
    assert (pred == target).double().mean().item() * 100 == pytest.approx(record["metrics"]["pixel_acc"])

    # eval-only on the fine-tuned run reproduces its metrics
    again = run(
        cfg_of("finetune-demo-semseg.yaml", common + ["model.head_dim=64"]),
        data,
        seg_dir,
        eval_only=True,
    )
    assert again == pytest.approx(seg["eval"])
    # ... and evaluating every shard of a set (a separate test set: no shard left to train on) works too
    every = [f"shard-{i:06d}" for i in range(5)]
    full = run(
        cfg_of(
            "finetune-demo-semseg.yaml",
            common + ["model.head_dim=64", f"data.eval_shards={every}"],
        ),
        data,
        seg_dir,
        eval_only=True,
    )
    assert full["pixels"] == sum(1 for n in every for _ in iter_shard(data, n, ["rgb"])) * 32 * 32

    depth_dir = str(tmp_path / "depth")  # DPT works at patch 16: 64 px, fresh weights
    depth_over = common + [
        "model.patch_size=16",
        "data.image_size=64",
        "model.head_dim=16",
        "model.head_layer_dims=[16, 16, 16, 16]",
    ]
    depth = run(cfg_of("finetune-demo-depth.yaml", depth_over), data, depth_dir)
    m = depth["eval"]
    assert m["images"] == 8 and 0.0 <= m["delta1"] <= 100.0 and m["AbsRel"] > 0 and m["RMSE"] > 0


def test_non_finite_loss_stops_with_a_clear_message(data, tmp_path):
    over = PRETRAIN + ["train.steps=5", "optim.lr=1e30", "optim.clip_grad=null", "train.warmup_steps=0"]
    with pytest.raises(TrainingError, match="non-finite loss at step"):
        run(cfg_of("pretrain-demo.yaml", over), data, str(tmp_path))


def test_cli_rejects_unknown_config_key(data, tmp_path, capsys):
    config = os.path.join(ROOT, "pipelines", "pretrain-demo.yaml")
    with pytest.raises(SystemExit) as e:
        cli_main(["--shards", data, "--config", config, "--out", str(tmp_path), "optim.bogus=1"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "override 'optim.bogus=1': optim.bogus: unknown key" in err
    assert len(err.strip().splitlines()) == 1
    with pytest.raises(SystemExit) as e:
        cli_main(["--shards", str(tmp_path / "nowhere"), "--config", config, "--out", str(tmp_path)])
    assert e.value.code == 2 and "manifest.json not found" in capsys.readouterr().err


@pytest.mark.slow
def test_torchrun_two_ranks_on_cpu(data, tmp_path):
    out = str(tmp_path / "ddp")
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--standalone",
        "-m",
        "multimae.train",
        "--shards",
        data,
        "--config",
        os.path.join(ROOT, "pipelines", "pretrain-demo.yaml"),
        "--out",
        out,
        *PRETRAIN,
        "train.steps=4",
        "train.checkpoint_every=2",
        "log.sample_keys=true",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    seen = {}
    for r in (0, 1):
        with open(os.path.join(out, f"keys-rank{r}.txt")) as f:
            rows = [line.split("\t") for line in f.read().splitlines()]
        assert sorted({int(s) for s, _ in rows}) == [0, 1, 2, 3]  # both ranks took every step
        assert len(rows) == 4 * 4  # global batch 8 = 2 ranks x 4
        seen[r] = {k for _, k in rows}
    assert not seen[0] & seen[1]  # ranks read disjoint shards, so disjoint samples
    summary = json.load(open(os.path.join(out, "summary.json")))
    assert summary["steps"] == 4 and len(summary["weights_digest"]) == 2
    assert summary["weights_digest"][0] == summary["weights_digest"][1]


def test_evaluate_on_a_separate_shard_set_with_the_same_classes(data, tmp_path):
    other = str(tmp_path / "val")
    build(synthetic_source(8, size=64, seed=9), other, shard_size=8, progress=False)
    over = [
        *TINY_FT,
        "model.patch_size=8",
        "data.image_size=32",
        "data.num_workers=0",
        "data.shuffle_buffer=8",
        "train.batch_size=4",
        "train.steps=2",
        "train.warmup_steps=1",
        "log.tensorboard=false",
        "model.head_dim=64",
        "data.eval_num_shards=0",
        f"data.eval_root={other}",
    ]
    out = str(tmp_path / "ft")
    summary = run(cfg_of("finetune-demo-semseg.yaml", over), data, out)
    record = json.load(open(os.path.join(out, "eval.json")))
    assert record["eval_shards"] == ["shard-000000"] and summary["eval"]["pixels"] == 8 * 32 * 32
    # every shard of --shards trains (none held out)
    assert summary["eval"] == record["metrics"]
    manifest = json.load(open(os.path.join(other, "manifest.json")))
    manifest["modalities"]["semseg_gt"]["classes"][0] = "ground"
    json.dump(manifest, open(os.path.join(other, "manifest.json"), "w"))
    with pytest.raises(Exception, match="classes of 'semseg_gt' differ from the training set's"):
        run(cfg_of("finetune-demo-semseg.yaml", over), data, str(tmp_path / "ft2"))


def test_classification_with_mixup_cutmix_and_rand_augment_resumes_exactly(data, tmp_path):
    over = [
        *TINY_FT,
        "model.patch_size=8",
        "data.image_size=32",
        "data.num_workers=0",
        "data.shuffle_buffer=8",
        "train.batch_size=4",
        "train.steps=4",
        "train.warmup_steps=1",
        "train.checkpoint_every=2",
        "log.tensorboard=false",
        "data.eval_num_shards=1",
        "data.augment=cls",
        "data.mixup=0.8",
        "data.cutmix=1.0",
        "optim.label_smoothing=0.1",
    ]
    cfg = cfg_of("finetune-demo-cls.yaml", over)
    straight = run(cfg, data, str(tmp_path / "a"))
    run(cfg, data, str(tmp_path / "b"), stop_at=2)
    resumed = run(cfg, data, str(tmp_path / "b"))
    assert straight["weights_digest"] == resumed["weights_digest"]
    assert 0.0 <= straight["eval"]["top1"] <= 100.0


def test_init_from_another_depth_space_is_refused(data, tmp_path):
    pre = str(tmp_path / "pre")
    run(cfg_of("pretrain-demo.yaml", PRETRAIN + ["train.steps=1"]), data, pre)
    over = [
        *TINY_FT,
        "model.patch_size=8",
        "data.image_size=32",
        "data.num_workers=0",
        "train.batch_size=4",
        "train.steps=1",
        "train.warmup_steps=1",
        "log.tensorboard=false",
        "model.head_dim=64",
        "data.eval_num_shards=1",
        "data.inputs={rgb: rgb, depth: depth_gt}",
        "data.depth_space=inverse_depth",
    ]
    with pytest.raises(TrainingError, match="depth inputs in space 'depth'.*data.depth_space=depth"):
        run(
            cfg_of("finetune-demo-semseg.yaml", over),
            data,
            str(tmp_path / "ft"),
            init=os.path.join(pre, "checkpoint.pt"),
        )


@pytest.mark.parametrize("trainable", [0, 1])
def test_partial_fine_tuning_keeps_the_frozen_part_fixed(data, tmp_path, trainable):
    pre = str(tmp_path / "pre")
    run(cfg_of("pretrain-demo.yaml", PRETRAIN + ["train.steps=1"]), data, pre)
    over = [
        *TINY_FT,
        "model.patch_size=8",
        "data.image_size=32",
        "data.num_workers=0",
        "train.batch_size=4",
        "train.steps=2",
        "train.warmup_steps=1",
        "log.tensorboard=false",
        "model.head_dim=64",
        "model.head_blocks=0",
        "data.eval_num_shards=1",
        f"model.trainable_blocks={trainable}",
        "optim.weight_decay=0.5",
    ]
    out = str(tmp_path / "ft")
    run(cfg_of("finetune-demo-semseg.yaml", over), data, out, init=os.path.join(pre, "checkpoint.pt"))
    before, after = final_weights(pre), final_weights(out)
    changed = {k for k in after if k in before and not torch.equal(before[k], after[k])}  # encoder keys
    expected = {k for k in after if k.startswith("encoder.1.")} if trainable else set()
    assert changed == expected
    assert any(k.startswith("output_adapters.") for k in after)  # the head is new and trains
