"""Typed run configuration for `multimae-train` (DESIGN.md sections 6 and 7).

A run is described by one `RunConfig`: a YAML file (see `pipelines/pretrain-*.yaml`,
`pipelines/finetune-*.yaml`) overlaid with dotted command-line overrides such as
`optim.blr=3e-4 data.inputs.depth=depth_gt`. Unknown keys and values of the wrong type are rejected
with a `ConfigError` naming the key. The config travels into checkpoints as a plain dict
(`dataclasses.asdict`), so `torch.load(weights_only=True)` can read it back.
"""

from __future__ import annotations

import copy
import dataclasses
import re
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Literal

import yaml


class ConfigError(ValueError):
    """A bad config file, key or value; the message names the key and what is allowed."""


@dataclass
class ModelConfig:
    name: str = "multimae-tiny"  # a registered size: multimae-{tiny..large} (pre-training) or multivit-* (fine-tuning)
    patch_size: int = 16
    num_encoded_tokens: int = 98  # visible-token budget shared by all input modalities (pre-training)
    alphas: float = 1.0  # Dirichlet concentration of the budget split
    sample_tasks_uniformly: bool = False
    extra_norm_pix_loss: bool = True  # adds the `norm_rgb` output (official default); or list norm_rgb in out_domains
    out_domains: list[str] = field(default_factory=lambda: ["rgb", "depth", "semseg"])  # pre-training targets
    fp32_output_adapters: list[str] = field(default_factory=list)  # decoders run without autocast (official: semseg)
    num_semseg_classes: int | None = None  # None: from the manifest's class list
    head: Literal["linear", "dpt", "convnext"] = "linear"  # fine-tuning head
    drop_path: float = 0.0
    compile: bool = False  # torch.compile the model
    kwargs: dict[str, Any] = field(default_factory=dict)  # passed to multimae.create_model as is


@dataclass
class DataConfig:
    inputs: dict[str, str] = field(default_factory=lambda: {"rgb": "rgb"})  # model domain -> shard modality
    target: str | None = None  # fine-tuning target modality (e.g. semseg_gt, depth_gt); `cls` for classification
    image_size: int = 224
    crop_scale: list[float] = field(default_factory=lambda: [0.2, 1.0])
    crop_ratio: list[float] = field(default_factory=lambda: [3 / 4, 4 / 3])
    hflip: float = 0.5
    standardize_depth: bool = True  # robust (10-90% trimmed) standardization of depth inputs/targets (pre-training)
    train_shards: list[str] | None = None  # None: every shard not in eval_shards
    eval_shards: list[str] | None = None  # held-out shard names
    eval_num_shards: int = 0  # when eval_shards is None: hold out the last N shards
    shuffle_buffer: int = 500
    num_workers: int = 2
    chunk_steps: int = 0  # the stream is re-seeded every chunk_steps steps (0: checkpoint_every); see data.py
    ignore_index: int = 255  # semseg label ignored by loss and metrics
    reduce_zero_label: bool = False  # ADE20K-style: class 0 is "unlabeled" -> ignore, others shift by -1


@dataclass
class OptimConfig:
    blr: float = 1e-4  # base lr: lr = blr * batch_size / 256
    lr: float | None = None  # absolute lr (overrides blr scaling)
    warmup_lr: float = 1e-6
    min_lr: float = 0.0
    weight_decay: float = 0.05
    decay_everything: bool = False  # official pre-training decays norms/biases/tokens too
    layer_decay: float | None = None  # fine-tuning layer-wise lr decay
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1e-8
    clip_grad: float | None = None  # max global grad norm
    label_smoothing: float = 0.0  # classification
    depth_loss: Literal["berhu", "l1"] = "berhu"  # depth fine-tuning


@dataclass
class TrainConfig:
    batch_size: int = 256  # global batch per optimizer step (all ranks, all accumulation micro-steps)
    accum_steps: int = 1
    steps: int | None = None  # total optimizer steps; or give epochs (converted with the manifest count)
    epochs: float | None = None
    warmup_steps: int | None = None
    warmup_epochs: float = 0.0
    seed: int = 0
    dtype: Literal["float32", "bfloat16"] = "bfloat16"  # autocast dtype where the device supports it
    device: str = "auto"  # auto | cpu | cuda
    checkpoint_every: int = 1000
    keep_checkpoints: bool = False  # also keep checkpoint-<step>.pt files besides checkpoint.pt
    eval_every: int = 0  # fine-tuning: evaluate every N steps (0: at the end only)


@dataclass
class LogConfig:
    every: int = 10  # periodic line / metrics.jsonl / TensorBoard every N steps
    image_every: int = 0  # reconstruction PNG every N steps (0: at the end only); pre-training
    num_images: int = 4
    tensorboard: bool = True
    sample_keys: bool = False  # write keys-rank<r>.txt: the step and key of every sample each rank consumed


@dataclass
class RunConfig:
    task: Literal["pretrain", "cls", "semseg", "depth"] = "pretrain"
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    log: LogConfig = field(default_factory=LogConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# ---------------------------------------------------------------- building from plain data


def _check_value(value: Any, tp: Any, key: str) -> Any:
    """Return `value` converted to type `tp`, or raise ConfigError naming `key`."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _check_value(value, arg, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"{key}: bad value {value!r}")
    if origin is Literal:
        if value not in typing.get_args(tp):
            raise ConfigError(f"{key}: {value!r} is not one of {list(typing.get_args(tp))}")
        return value
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        (item,) = typing.get_args(tp)
        return [_check_value(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        _, vt = typing.get_args(tp)
        return {str(k): _check_value(v, vt, f"{key}.{k}") for k, v in value.items()}
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true/false, got {value!r}")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, key)
    raise ConfigError(f"{key}: unsupported type {tp}")


def _build(cls: type, data: Any, prefix: str = "") -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix or 'config'}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(data) - set(names))
    if unknown:
        where = f"{prefix}." if prefix else ""
        scope = f" in {prefix}" if prefix else ""
        raise ConfigError(f"unknown config key {where}{unknown[0]!s}; allowed keys{scope}: {', '.join(names)}")
    kwargs = {k: _check_value(v, hints[k], f"{prefix}.{k}" if prefix else k) for k, v in data.items()}
    return cls(**kwargs)


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Set each dotted `key=value` (value parsed as YAML) in a copy of `data`.

    `data.inputs.depth=depth_gt` changes one entry of a mapping; `data.inputs={rgb: rgb}` replaces it.
    """
    out = copy.deepcopy(data)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r}: expected key=value (e.g. optim.blr=3e-4)")
        key, raw = item.split("=", 1)
        value = yaml.safe_load(raw) if raw != "" else None
        parts = key.strip().split(".")
        node = out
        for i, p in enumerate(parts[:-1]):
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r}: {'.'.join(parts[: i + 1])} is not a mapping")
        node[parts[-1]] = value
    return out


_FLOAT_RE = re.compile(r"^[+-]?(\d+\.?\d*|\.\d+)[eE][+-]?\d+$")


def _normalise_yaml_numbers(obj: Any) -> Any:
    # YAML 1.1 (PyYAML) reads `1e-4` (no dot) as a string; accept it as the number the user meant.
    if isinstance(obj, dict):
        return {k: _normalise_yaml_numbers(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_normalise_yaml_numbers(v) for v in obj]
    if isinstance(obj, str) and _FLOAT_RE.match(obj):
        return float(obj)
    return obj


def from_dict(data: dict[str, Any]) -> RunConfig:
    """Validate plain data (e.g. a checkpoint's saved config) into a RunConfig."""
    cfg = _build(RunConfig, _normalise_yaml_numbers(data))
    validate(cfg)
    return cfg


def load_config(path: str | None, overrides: list[str] | None = None) -> RunConfig:
    """Read a YAML config (or defaults when `path` is None) and apply dotted overrides."""
    data: dict[str, Any] = {}
    if path is not None:
        try:
            with open(path) as f:
                data = yaml.safe_load(f) or {}
        except FileNotFoundError:
            raise ConfigError(f"config file not found: {path}") from None
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML: {e}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: expected a mapping at the top level")
    data = apply_overrides(data, overrides or [])
    try:
        return from_dict(data)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}" if path else str(e)) from None


def validate(cfg: RunConfig) -> None:
    """Cross-field checks that types alone cannot express."""
    if not cfg.data.inputs:
        raise ConfigError("data.inputs: at least one input modality is needed")
    if cfg.task != "pretrain" and cfg.data.target is None:
        raise ConfigError(f"data.target: required for task {cfg.task} (e.g. semseg_gt, depth_gt, cls)")
    if cfg.train.steps is None and cfg.train.epochs is None:
        raise ConfigError("train.steps or train.epochs must be set")
    if cfg.train.batch_size <= 0 or cfg.train.accum_steps <= 0:
        raise ConfigError("train.batch_size and train.accum_steps must be positive")
    lo, hi = cfg.data.crop_scale
    if not 0 < lo <= hi <= 1:
        raise ConfigError(f"data.crop_scale: need 0 < lo <= hi <= 1, got {cfg.data.crop_scale}")
    if len(cfg.optim.betas) != 2:
        raise ConfigError("optim.betas: two values expected")
