"""Trainer configs: YAML + dotted overrides, unknown keys and bad values rejected (multimae/train/config.py)."""

import glob
import os

import pytest
import torch

from multimae.train.config import ConfigError, from_dict
from multimae.train.config import load_run_config as load_config
from multimae.train.state import make_plan

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = sorted(
    glob.glob(os.path.join(ROOT, "pipelines", "pretrain-*.yaml"))
    + glob.glob(os.path.join(ROOT, "pipelines", "finetune-*.yaml"))
)


def write(tmp_path, text: str) -> str:
    path = tmp_path / "c.yaml"
    path.write_text(text)
    return str(path)


@pytest.mark.parametrize("path", CONFIGS, ids=os.path.basename)
def test_every_shipped_config_loads_and_round_trips(path):
    cfg = load_config(path)
    assert from_dict(cfg.to_dict()) == cfg  # what a checkpoint stores rebuilds the same config
    if cfg.objective != "pretrain":
        assert cfg.data.target is not None


def test_paper_recipe_numbers():
    cfg = load_config(os.path.join(ROOT, "pipelines", "pretrain-multimae-b.yaml"))
    assert (cfg.model.name, cfg.model.patch_size, cfg.data.image_size) == ("multimae-base", 16, 224)
    assert (cfg.model.num_encoded_tokens, cfg.model.alphas, cfg.train.batch_size) == (98, 1.0, 2048)
    assert (cfg.optim.blr, cfg.optim.betas, cfg.train.epochs, cfg.train.warmup_epochs) == (1e-4, [0.9, 0.95], 1600, 40)
    manifest = {"shards": [{"name": f"shard-{i:06d}", "count": 1000} for i in range(1281)]}
    plan = make_plan(cfg, manifest, world=8)
    assert plan.base_lr == pytest.approx(1e-4 * 2048 / 256)
    assert plan.micro_batch == 256 and plan.total_steps == 1600 * (1_281_000 // 2048)
    assert plan.warmup_steps == 40 * (1_281_000 // 2048)


def test_overrides_set_one_key_or_replace_a_mapping():
    base = os.path.join(ROOT, "pipelines", "pretrain-demo.yaml")
    cfg = load_config(base, ["data.inputs.depth=depth_gt", "optim.blr=3e-4", "train.steps=7"])
    assert cfg.data.inputs == {"rgb": "rgb", "depth": "depth_gt", "semseg": "semseg"}
    assert cfg.optim.blr == 3e-4 and cfg.train.steps == 7
    cfg = load_config(base, ["data.inputs={rgb: rgb}", "model.out_domains=null", "optim.clip_grad=null"])
    assert cfg.data.inputs == {"rgb": "rgb"} and cfg.optim.clip_grad is None


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["optim.bogus=1"], "override 'optim.bogus=1': optim.bogus: unknown key"),
        (["bogus=1"], "bogus: unknown key"),
        (["train.steps=ten"], "train.steps: expected an integer"),
        (["train.dtype=float16"], "train.dtype: 'float16' is not one of"),
        (["optim.betas=[0.9]"], "optim.betas: two values expected"),
        (["data.crop_scale=[0.5, 2.0]"], "data.crop_scale"),
        (["optim"], "expected key=value"),
        (["objective=cls"], "override 'objective=cls': model.name: objective cls needs a multivit"),
        (["objective=cls", "model.name=multivit-tiny"], "data.target: required for objective cls"),
        (["data.inputs.depht=depth"], "override 'data.inputs.depht=depth': data.inputs.depht: unknown input domain"),
        (["model.name=multimae-huge"], "model.name: unknown model 'multimae-huge'"),
        (["train.steps.x=1"], "train.steps is 300, not a section"),
        (["model.kwargs={depth: 4}"], "model.kwargs: unknown key"),
    ],
)
def test_bad_keys_and_values_are_rejected_with_the_key_named(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(os.path.join(ROOT, "pipelines", "pretrain-demo.yaml"), overrides)


def test_unknown_key_in_yaml_names_the_file(tmp_path):
    path = write(tmp_path, "objective: pretrain\ntrain: {steps: 3, stepz: 4}\n")
    with pytest.raises(ConfigError, match=r"c\.yaml: train\.stepz: unknown key"):
        load_config(path)
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(str(tmp_path / "missing.yaml"))


def test_batch_must_split_over_ranks_and_accumulation():
    cfg = load_config(
        os.path.join(ROOT, "pipelines", "pretrain-demo.yaml"), ["train.batch_size=30", "train.accum_steps=4"]
    )
    manifest = {"shards": [{"name": "shard-000000", "count": 64}, {"name": "shard-000001", "count": 64}]}
    with pytest.raises(ConfigError, match="not divisible"):
        make_plan(cfg, manifest, world=1)


def test_config_survives_weights_only_checkpoint_load(tmp_path):
    cfg = load_config(os.path.join(ROOT, "pipelines", "finetune-demo-semseg.yaml"))
    torch.save({"config": cfg.to_dict()}, tmp_path / "c.pt")
    assert from_dict(torch.load(tmp_path / "c.pt", weights_only=True)["config"]) == cfg
