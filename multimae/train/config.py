"""The typed run configuration of `multimae-train` (the config reference is docs/training.md).

A run is one `RunConfig`: a YAML file (`pipelines/pretrain-*.yaml`, `pipelines/finetune-*.yaml`) overlaid with
dotted command-line overrides such as `optim.blr=3e-4 data.inputs.depth=depth_gt`, loaded by the toolkit's
one config loader (`shards.config`). The config travels into checkpoints as a plain dict (`to_dict`), so
`torch.load(weights_only=True)` reads it back. Importing this module does not import torch.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal

from multimae.sizes import MODEL_NAMES
from shards import modalities as registry
from shards.config import ConfigError, build, load_config
from shards.format import FormatError, modality_kind

__all__ = ["ConfigError", "RunConfig", "from_dict", "load_run_config"]

Objective = Literal["pretrain", "cls", "semseg", "depth", "dense"]
#: data settings that say how the storage is reached and where the rgb JPEGs are decoded, as the run's device
#: does; left out of saved configs and run identities
RUNTIME_KEYS = ("readahead", "storage_options", "decode_device")


@dataclass
class ModelConfig:
    name: str = "multimae-tiny"  # multimae-{tiny,small,base,large} (pre-training) or multivit-* (fine-tuning)
    patch_size: int = 16
    # encoder size; null = the named size's (tiny: 192-d, 12 blocks, 3 heads)
    dim_tokens: int | None = None
    num_blocks: int | None = None
    num_heads: int | None = None
    num_global_tokens: int = 1
    drop_path: float = 0.0
    compile: bool = False  # torch.compile the model
    # pre-training: masking and decoders
    num_encoded_tokens: int = 98  # visible-token budget shared by all input tasks
    alphas: float = 1.0  # Dirichlet concentration of the budget split
    sample_tasks_uniformly: bool = False  # first draw a random non-empty subset of input tasks per sample
    out_domains: list[str] | None = None  # tasks to reconstruct; null: every input
    extra_norm_pix_loss: bool = True  # adds the `norm_rgb` output (official default)
    fp32_output_adapters: list[str] = field(default_factory=list)  # decoders run without autocast (official: semseg)
    num_semseg_classes: int | None = None  # null: from the manifest's class list
    decoder_dim: int = 256
    decoder_blocks: int = 2
    decoder_heads: int = 8
    # fine-tuning head; null = the objective's default (cls: linear, depth: dpt, semseg: convnext)
    head: Literal["linear", "dpt", "convnext"] | None = None
    head_dim: int | None = None  # DPT feature width (256) / ConvNeXt embedding width (6144)
    head_layer_dims: list[int] | None = None  # DPT reassembly widths (96, 192, 384, 768)
    head_blocks: int | None = None  # ConvNeXt blocks (4); 0 makes the ConvNeXt head a per-patch linear probe
    # fine-tuning: train only the last N encoder blocks (+ the head); 0 freezes the whole encoder (a probe of
    # what pre-training learned, as MAE's partial fine-tuning); null trains everything
    trainable_blocks: int | None = None


@dataclass
class DataConfig:
    inputs: dict[str, str] = field(default_factory=lambda: {"rgb": "rgb"})  # model domain -> shard modality
    target: str | None = None  # fine-tuning target modality (semseg_gt, depth_gt, normals_gt ...) or `cls`
    image_size: int = 224
    # augmentation recipe (multimae/train/augment.py): crop (pre-training), cls, semseg, depth (official fine-tuning)
    augment: Literal["crop", "cls", "semseg", "depth"] = "crop"
    crop_scale: list[float] = field(default_factory=lambda: [0.2, 1.0])  # crop and cls recipes
    crop_ratio: list[float] = field(default_factory=lambda: [3 / 4, 4 / 3])
    hflip: float = 0.5
    rand_augment: str = "rand-m9-mstd0.5-inc1"  # cls recipe: timm RandAugment policy ("" = off)
    mixup: float = 0.0  # cls: timm Mixup alpha (official 0.8; 0 = off)
    cutmix: float = 0.0  # cls: timm CutMix alpha (official 1.0; 0 = off)
    color_augs: bool = False  # depth recipe: BYOL colour jitter + grayscale
    depth_space: Literal["depth", "inverse_depth"] = "depth"  # every depth modality is brought to this space
    standardize_depth: bool = True  # robust (10-90% trimmed) standardization of depth inputs
    train_shards: list[str] | None = None  # null: every shard not held out
    eval_shards: list[str] | None = None  # held-out shard names
    eval_num_shards: int = 0  # when eval_shards is null: hold out the last N shards
    eval_root: str | None = None  # a separate evaluation shard set (its shards, or eval_shards of it)
    shuffle_buffer: int = 500
    num_workers: int = 2
    chunk_steps: int = 0  # the stream is re-seeded every chunk_steps steps (0: checkpoint_every)
    ignore_index: int = 255  # semseg label ignored by loss and metrics
    reduce_zero_label: bool = False  # ADE20K-style: class 0 is "unlabeled" -> ignore, others shift by -1
    # training rgb JPEGs: auto = decoded by nvJPEG on the run's GPU, one call per batch, when the recipe allows;
    # like the device, not saved with the run
    decode_device: Literal["auto", "cpu", "cuda"] = "auto"
    # object storage (docs/object-storage.md); neither changes what is trained, so neither is saved with the run
    readahead: int = 2  # remote shard sets: shards each loader worker downloads ahead of the one it reads
    storage_options: dict[str, Any] = field(default_factory=dict)  # fsspec filesystem arguments (not credentials)

    def check(self) -> None:
        if not self.inputs:
            raise ConfigError("inputs: at least one input modality is needed")
        for domain, modality in self.inputs.items():
            if domain not in registry.kinds():  # a model domain is a modality kind; it reads a modality of it
                raise ConfigError(f"inputs.{domain}: unknown input domain (known: {', '.join(registry.kinds())})")
            kind = _kind(f"inputs.{domain}", modality)
            if kind != domain:
                raise ConfigError(f"inputs.{domain}: modality {modality!r} is {kind}, not {domain}")
        if self.target not in (None, "cls"):
            _kind("target", self.target)
        if len(self.crop_scale) != 2 or not 0 < self.crop_scale[0] <= self.crop_scale[1] <= 1:
            raise ConfigError(f"crop_scale: need [lo, hi] with 0 < lo <= hi <= 1, got {self.crop_scale}")
        if (self.mixup or self.cutmix) and len(self.inputs) != 1:
            raise ConfigError("mixup / cutmix: only with a single input modality")
        if self.eval_root is not None and self.eval_num_shards:
            raise ConfigError("eval_num_shards: holds out shards of --shards; with eval_root, use eval_shards or none")
        if len(self.crop_ratio) != 2 or not 0 < self.crop_ratio[0] <= self.crop_ratio[1]:
            raise ConfigError(f"crop_ratio: need [lo, hi] with 0 < lo <= hi, got {self.crop_ratio}")
        for key in ("image_size", "shuffle_buffer", "num_workers", "chunk_steps", "eval_num_shards", "readahead"):
            if getattr(self, key) < (1 if key == "image_size" else 0):
                raise ConfigError(f"{key}: must not be negative{' or zero' if key == 'image_size' else ''}")


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
    dense_loss: str | None = (
        None  # objective dense: a loss of the target's kind (null: its default; normals: l1, angular)
    )

    def check(self) -> None:
        if len(self.betas) != 2:
            raise ConfigError(f"betas: two values expected, got {self.betas}")


@dataclass
class TrainConfig:
    batch_size: int = 256  # global batch per optimizer step (all ranks, all accumulation micro-steps)
    accum_steps: int = 1
    steps: int | None = None  # total optimizer steps; or give epochs (converted with the manifest count)
    epochs: float | None = None
    warmup_steps: int | None = None
    warmup_epochs: float = 0.0
    seed: int = 0
    dtype: Literal["auto", "float32", "bfloat16"] = "auto"  # auto: bf16 where matrix units run it fast
    device: str = "auto"  # auto | cpu | cuda
    checkpoint_every: int = 1000
    keep_checkpoints: bool = False  # also keep checkpoint-<step>.pt files besides checkpoint.pt
    eval_every: int = 0  # fine-tuning: evaluate every N steps (0: at the end only)

    def check(self) -> None:
        if self.steps is None and self.epochs is None:
            raise ConfigError("steps: set train.steps or train.epochs")
        if self.batch_size <= 0 or self.accum_steps <= 0 or self.checkpoint_every <= 0:
            raise ConfigError("batch_size, accum_steps and checkpoint_every must be positive")
        if self.device != "auto" and self.device.split(":")[0] not in ("cpu", "cuda"):
            raise ConfigError(f"device: {self.device!r} is not auto, cpu, cuda or cuda:N")


@dataclass
class LogConfig:
    every: int = 10  # periodic line / metrics.jsonl / TensorBoard every N steps
    image_every: int = 0  # reconstruction PNG every N steps (0: at the end only); pre-training
    num_images: int = 4
    tensorboard: bool = True
    sample_keys: bool = False  # write keys-rank<r>.txt: the step and key of every sample each rank consumed

    def check(self) -> None:
        if self.every <= 0:
            raise ConfigError("every: must be positive")


@dataclass
class RunConfig:
    objective: Objective = "pretrain"
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    log: LogConfig = field(default_factory=LogConfig)

    def to_dict(self) -> dict[str, Any]:
        """The config as plain data, as checkpoints and config.json keep it: without the runtime settings
        (data.readahead, data.storage_options, data.decode_device), which say how to reach the data and where to
        decode it, not what the run is."""
        out = dataclasses.asdict(self)
        for key in RUNTIME_KEYS:
            del out["data"][key]
        return out

    @property
    def pretraining(self) -> bool:
        return self.objective == "pretrain"

    def _check_target(self) -> None:
        """The fine-tuning target fits the objective: cls, a semseg or depth modality, or for `dense` any
        registered dense kind (depth, normals, ...), with a loss that kind has."""
        target, objective = self.data.target, self.objective
        if (target == "cls") != (objective == "cls"):
            raise ConfigError(f"data.target: {target!r} is not a target for objective {objective}")
        if target == "cls":
            return
        entry = registry.of(target)
        if objective == "dense":
            if not entry.dense:
                dense = [k for k in registry.kinds() if registry.get(k).dense]
                raise ConfigError(f"data.target: {target!r} is {entry.kind}, not a dense kind ({', '.join(dense)})")
            loss = self.optim.dense_loss
            if loss is not None and loss not in entry.losses:
                raise ConfigError(
                    f"optim.dense_loss: {loss!r} is not a loss of {entry.kind} ({', '.join(entry.losses)})"
                )
        elif entry.kind != objective:
            raise ConfigError(f"data.target: {target!r} is not a target for objective {objective}")

    def check(self) -> None:
        """Rules across sections (each section checked its own fields already)."""
        m, d = self.model, self.data
        family = "multimae" if self.pretraining else "multivit"
        if m.name not in MODEL_NAMES:
            raise ConfigError(f"model.name: unknown model {m.name!r} (known: {', '.join(MODEL_NAMES)})")
        if not m.name.startswith(family + "-"):
            raise ConfigError(f"model.name: objective {self.objective} needs a {family}-* model, got {m.name!r}")
        if self.pretraining:
            unknown = [o for o in m.out_domains or [] if o not in registry.kinds() + ("norm_rgb",)]
            if unknown:
                known = ", ".join(registry.kinds())
                raise ConfigError(f"model.out_domains: unknown {unknown} (known: {known}, norm_rgb)")
            missing = [o for o in m.out_domains or [] if ("rgb" if o == "norm_rgb" else o) not in d.inputs]
            if missing:
                raise ConfigError(f"model.out_domains: {missing} need an input modality in data.inputs")
        else:
            if d.target is None:
                raise ConfigError(
                    f"data.target: required for objective {self.objective} (e.g. semseg_gt, depth_gt, cls)"
                )
            self._check_target()
        if m.trainable_blocks is not None and (self.pretraining or m.trainable_blocks < 0):
            raise ConfigError("model.trainable_blocks: how many last encoder blocks fine-tune (>= 0; not for pretrain)")
        if (d.mixup or d.cutmix or d.augment == "cls") and self.objective != "cls":
            # RandAugment's rotations and shears touch rgb only: they would misalign dense targets
            raise ConfigError("data.augment=cls, data.mixup and data.cutmix are for objective cls only")
        if self.train.steps is None and self.train.epochs is None:
            raise ConfigError("train.steps: set train.steps or train.epochs")


def _kind(key: str, modality: str) -> str:
    try:
        return modality_kind(modality)
    except FormatError as e:
        raise ConfigError(f"{key}: {e}") from None


def from_dict(data: dict[str, Any]) -> RunConfig:
    """Validate plain data (e.g. a checkpoint's saved config) into a RunConfig."""
    return build(RunConfig, data)


def load_run_config(path: str | None, overrides: list[str] | tuple[str, ...] = ()) -> RunConfig:
    """Read a YAML run config (defaults when `path` is None) and apply dotted overrides."""
    return load_config(RunConfig, path, overrides)
