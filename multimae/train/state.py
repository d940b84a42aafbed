"""The objects a training job is made of: its `Plan` (numbers derived from config, data and world size), the
`Run` that holds everything the job uses, and `TrainingError`, what it stops with."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any

import torch

from . import data as mdata
from .config import ConfigError, RunConfig
from .distributed import Dist
from .logger import Logger
from .run_folder import RunFolder

__all__ = ["Plan", "Run", "TrainingError", "make_plan"]


class TrainingError(RuntimeError):
    """A run cannot start or go on (incompatible checkpoint, another run in OUT); says why and what to do."""


@dataclass
class Plan:
    """Numbers derived from the config, the manifest and the world size."""

    total_steps: int
    warmup_steps: int
    base_lr: float
    micro_batch: int
    chunk_steps: int
    train_shards: list[str]
    eval_shards: list[str]
    num_train_samples: int


def make_plan(
    cfg: RunConfig, manifest: dict, world: int, eval_only: bool = False, eval_manifest: dict | None = None
) -> Plan:
    t = cfg.train
    per_step = t.batch_size // (world * t.accum_steps)
    if per_step * world * t.accum_steps != t.batch_size:
        raise ConfigError(
            f"train.batch_size {t.batch_size} is not divisible by world size {world} x "
            f"train.accum_steps {t.accum_steps}"
        )
    train_shards, eval_shards = mdata.split_shards(
        manifest,
        cfg.data.train_shards,
        cfg.data.eval_shards,
        cfg.data.eval_num_shards,
        need_train=not eval_only,
        eval_manifest=eval_manifest,
    )
    counts = {s["name"]: s["count"] for s in manifest["shards"]}
    n_train = sum(counts[n] for n in train_shards)
    steps_per_epoch = max(1, n_train // t.batch_size)
    total = t.steps if t.steps is not None else int(round(t.epochs * steps_per_epoch))
    warmup = t.warmup_steps if t.warmup_steps is not None else int(round(t.warmup_epochs * steps_per_epoch))
    base_lr = cfg.optim.lr if cfg.optim.lr is not None else cfg.optim.blr * t.batch_size / 256
    chunk = cfg.data.chunk_steps or t.checkpoint_every
    return Plan(total, min(warmup, total), base_lr, per_step, max(1, chunk), train_shards, eval_shards, n_train)


@dataclass
class Run:
    """Everything a training job holds, built once by `main.setup` when all of it exists.

    An evaluation-only run has no module, optimizer or logger. `step` is the one field that changes: the step
    loop advances it.
    """

    cfg: RunConfig
    dist: Dist
    shards_root: str
    out_dir: str
    ckpt_url: str  # OUT/checkpoint.pt
    manifest: dict
    plan: Plan
    eval_manifest: dict  # the manifest of the evaluation shard set (the same as `manifest` without data.eval_root)
    model: torch.nn.Module  # the plain module (saved, evaluated)
    spec: dict[str, Any]
    labels: dict[str, list[str]]
    dtype: torch.dtype
    identity: dict[str, Any]
    folder: RunFolder  # local paths of the run's growing files (staged on object storage)
    module: torch.nn.Module | None = None  # what forward/backward run through (DDP / compiled wrapper)
    optimizer: torch.optim.Optimizer | None = None
    step: int = 0
    init_step: int = 0  # the step of the --init checkpoint (what --eval-only reports without a run of its own)
    schedule: dict[str, Any] = field(default_factory=dict)
    logger: Logger | None = None
    decode_device: str = "cpu"  # where the training stream's rgb JPEGs are decoded (`data.rgb_decode_device`)

    @property
    def eval_root(self) -> str:
        return self.cfg.data.eval_root or self.shards_root

    @property
    def rank_shards(self) -> list[str]:
        return mdata.rank_shards(self.plan.train_shards, self.dist.rank, self.dist.world)

    @property
    def transform_args(self) -> dict[str, Any]:
        """SampleTransform arguments for the training shards."""
        return mdata.transform_args(self.cfg, self.manifest)

    @property
    def eval_transform_args(self) -> dict[str, Any]:
        """SampleTransform arguments for the evaluation shards (their manifest's depth meanings)."""
        return mdata.transform_args(self.cfg, self.eval_manifest)

    def autocast(self) -> contextlib.AbstractContextManager:
        device = self.dist.device.type
        return torch.autocast(device, dtype=self.dtype, enabled=self.dtype != torch.float32)

    def prepare_batch(self, batch: dict[str, Any]) -> dict[str, Any]:
        """A collated batch on the run's device, deferred rgb decoded there, class ids widened to int64, image
        inputs normalized, depth inputs standardized."""
        batch = mdata.to_device(batch, self.dist.device)
        mdata.finish_rgb(batch, self.dist.device)
        images = mdata.image_domains(self.cfg.data.inputs)
        mdata.widen_ids(batch, images)
        mdata.normalize_images(batch, images)
        mdata.standardize_depth_inputs(batch, self.cfg.data.inputs, self.cfg.data.standardize_depth)
        return batch
