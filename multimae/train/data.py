"""The trainer's streaming data path: reader -> depth space -> joint augmentation -> batches -> normalization.

Stages, in order:
  1. `shards.reader.ShardDataset` streams the aligned shard set (resampled shards, shuffle buffer, split by
     worker; the split by rank is explicit here: rank r reads train shards r, r+W, r+2W, ...).
  2. `SampleTransform` (run inside the DataLoader workers) brings every depth modality to one space
     (`data.depth_space`, from the `meaning` the manifest records), then applies ONE geometry of the
     augmentation recipe (augment.py) to every modality of the sample and colour augmentation to rgb; semseg
     *inputs* come out at 1/SEMSEG_STRIDE resolution. Each kind follows its rules in `shards.modalities`
     (dtype, resize, flip, padding, standardization).
  3. `collate` builds the batch: {domain: (B, C, H, W) or (B, H, W), "target": ..., "__key__": [...]}.
  4. The batch step, on the run's device: rgb inputs cross from the workers as uint8 and are ImageNet-normalized
     there (`normalize_images`), a quarter of the bytes of float32 through shared memory and the copy to the
     GPU; class-id maps cross as uint8 (int16 when the ids need it) and are widened to int64 (`widen_ids`).
     An rgb *target* is normalized in the worker, so evaluation scores it as the model sees it.

With `data.decode_device` on the GPU (`rgb_decode_device`), the workers leave each rgb JPEG encoded with its
sample's geometry (`DeferredRgb`); the batch step decodes the batch in one nvJPEG call on the GPU and crops
and flips there (`finish_rgb`). The geometry is drawn in the worker as before, so both paths train
on the same crops.

Exact resume: the stream is cut into chunks of `chunk_steps` optimizer steps. Chunk c is a fresh DataLoader
whose reader and augmentation are seeded from (seed, c, rank, worker), so the batches of step s are a pure
function of (seed, s) and a resumed run re-creates them by skipping s - c * chunk_steps batches (zero when it
resumes from a checkpoint taken on a chunk boundary, the default).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import numpy as np
import torch
import torchvision.transforms.v2.functional as TF
from torch.utils.data import DataLoader, default_collate, get_worker_info

from multimae.losses import robust_standardize_depth
from shards import format as fmt
from shards import modalities
from shards.depth_space import to_depth_space
from shards.nvjpeg import EncodedJpeg, decode_jpegs, nvjpeg_works

from .augment import RGB_PAD, ColorAugment, Plan, apply_plan, eval_plan, pad_to, train_plan
from .config import ConfigError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def to_tensor(kind: str, value: np.ndarray) -> torch.Tensor:
    """Reader numpy -> torch (C, H, W) in the kind's decoded dtype: rgb uint8 (3,H,W), depth float32 (1,H,W),
    semseg int64 (1,H,W), normals float32 (3,H,W)."""
    if not value.flags.writeable:  # decoded images can be read-only views; torch wants writable memory
        value = value.copy()
    t = torch.from_numpy(np.ascontiguousarray(value, dtype=modalities.get(kind).decoded))
    return t.permute(2, 0, 1) if t.ndim == 3 else t[None]


def normalize_rgb(rgb: torch.Tensor) -> torch.Tensor:
    """uint8 (3, H, W) -> float32 ImageNet-normalized (3, H, W)."""
    return TF.normalize(rgb.float().div_(255.0), IMAGENET_MEAN, IMAGENET_STD)


def image_domains(inputs: dict[str, str]) -> list[str]:
    """The input domains of image kinds (rgb's `pad: grey`): they reach the batch step as uint8."""
    return [d for d, m in inputs.items() if modalities.of(m).pad == "grey"]


def normalize_images(batch: dict[str, Any], domains: Sequence[str]) -> None:
    """Image inputs of a collated batch, in place: uint8 (B, 3, H, W) -> ImageNet-normalized float32."""
    for d in domains:
        if batch[d].dtype != torch.uint8:
            raise TypeError(f"input {d!r}: expected uint8 pixels from the loader, got {batch[d].dtype}")
        batch[d] = normalize_rgb(batch[d])


def denormalize_rgb(rgb: torch.Tensor) -> torch.Tensor:
    """Inverse of normalize_rgb, clamped to [0, 1]: (..., 3, H, W) float."""
    mean = torch.tensor(IMAGENET_MEAN, device=rgb.device).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=rgb.device).view(3, 1, 1)
    return (rgb.float() * std + mean).clamp(0, 1)


def map_semseg_labels(ids: torch.Tensor, reduce_zero_label: bool, ignore_index: int) -> torch.Tensor:
    """ADE20K-style label reduction: 0 ("unlabeled") -> ignore_index, k -> k - 1; ignore_index stays ignored (as
    the official fine-tuning code keeps it)."""
    if not reduce_zero_label:
        return ids
    return torch.where((ids == 0) | (ids == ignore_index), torch.full_like(ids, ignore_index), ids - 1)


class DeferredRgb(NamedTuple):
    """An rgb input left for the batch step: its JPEG, still encoded, and the sample's geometry."""

    jpeg: EncodedJpeg
    plan: Plan


@dataclass
class SampleTransform:
    """Per-sample stage: depth space, the recipe's joint geometry and colour, renaming to domains.

    inputs: model domain -> shard modality (e.g. {"rgb": "rgb", "depth": "depth_gt"}); target: the shard
    modality of the fine-tuning target or "cls" (None for pre-training); depth_meanings: manifest meaning of
    each depth modality read. The output dict holds one tensor per domain, "target" when fine-tuning, and
    "__key__". Image inputs stay uint8 (`normalize_images` finishes them in the batch step); an image target
    comes out normalized.
    """

    inputs: dict[str, str]
    target: str | None
    image_size: int
    train: bool
    augment: str = "crop"
    crop_scale: tuple[float, float] = (0.2, 1.0)
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    hflip: float = 0.5
    rand_augment: str = ""
    color_augs: bool = False
    seed: Sequence[int] = (0,)
    reduce_zero_label: bool = False
    ignore_index: int = 255
    depth_space: str = "depth"
    depth_meanings: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self._rng: np.random.Generator | None = None
        self.color = ColorAugment(self.augment, self.image_size, self.rand_augment, self.color_augs)

    def rng(self) -> np.random.Generator:
        # created lazily inside each DataLoader worker, so every worker has its own reproducible stream
        if self._rng is None:
            info = get_worker_info()
            self._rng = np.random.default_rng([*self.seed, info.id if info is not None else 0])
        return self._rng

    def _tensor(self, modality: str, value: np.ndarray | EncodedJpeg) -> tuple[str, torch.Tensor | EncodedJpeg]:
        kind = fmt.modality_kind(modality)
        if isinstance(value, EncodedJpeg):  # the reader left it for the GPU (train_loader's defer_rgb)
            return kind, value
        if kind == "depth":
            value = to_depth_space(value, self.depth_meanings.get(modality, "metric_m"), self.depth_space)
        return kind, to_tensor(kind, value)

    def __call__(self, sample: dict[str, Any]) -> dict[str, Any]:
        items = [(domain, *self._tensor(modality, sample[modality])) for domain, modality in self.inputs.items()]
        if self.target is not None and self.target != "cls":
            items.append(("target", *self._tensor(self.target, sample[self.target])))
        first = items[0][2]
        h, w = (first.height, first.width) if isinstance(first, EncodedJpeg) else first.shape[-2:]
        if self.train:
            plan = train_plan(self.augment, h, w, self.image_size, self.rng(), scale=self.crop_scale,
                              ratio=self.crop_ratio, hflip=self.hflip)  # fmt: skip
        else:
            plan = eval_plan(self.augment, h, w, self.image_size)

        out: dict[str, Any] = {"__key__": sample["__key__"]}
        for name, kind, x in items:
            target = name == "target"
            rule = modalities.get(kind)
            if isinstance(x, EncodedJpeg):  # no colour augmentation (rgb_decode_device): the plan is all
                y = DeferredRgb(x, plan)
            elif rule.pad == "grey":  # rgb: colour, padding; uint8 (3, S, S), normalized later when an input
                y = apply_plan(x, kind, plan, pad=False)
                y = self.color(y, self.rng()) if self.train else y
                y = pad_to(y, plan, fill=RGB_PAD)
                y = normalize_rgb(y) if target else y
            elif rule.is_classes:  # inputs at the adapter's resolution; a fine-tuning target at full resolution
                ids = map_semseg_labels(x, self.reduce_zero_label, self.ignore_index) if target else x
                stride = 1 if target else rule.input_stride
                y = apply_plan(ids, kind, plan, stride=stride, fill=self.ignore_index)[0]  # (S', S') int64
            else:  # values (C, S, S) float32; padding is invalid: 0 (normals: missing), and NaN for inputs
                # that are standardized (left out of the statistics, then 0)
                y = apply_plan(x, kind, plan, fill=float("nan") if rule.standardize and not target else 0.0)
            out[name] = y
        if self.target == "cls":
            if "cls" not in sample:
                raise fmt.FormatError(f"sample {sample['__key__']} in shard {sample.get('__shard__')} has no cls label")
            out["target"] = int(sample["cls"])
        return out


def rgb_decode_device(setting: str, device: torch.device, transform: SampleTransform) -> str:
    """Where the training stream's rgb JPEGs are decoded (`data.decode_device`): "cpu" (the loader workers)
    or the run's CUDA device (one nvJPEG call per batch, then the crop there). `auto` takes the GPU when the run
    is on CUDA, rgb is an input, its recipe has no colour augmentation (RandAugment and colour jitter run on
    the CPU) and nvJPEG decodes on that device; `cuda` requires all of these."""
    if setting == "cpu":
        return "cpu"
    if device.type != "cuda":
        reason = f"the run is on {device.type}"
    elif "rgb" not in transform.inputs:
        reason = "rgb is not an input"
    elif transform.color.ops is not None:
        reason = f"the {transform.augment} recipe's rgb colour augmentation runs on the CPU"
    elif not nvjpeg_works(str(device)):
        reason = f"nvJPEG does not decode on {device}"
    else:
        return str(device)
    if setting == "cuda":
        raise ConfigError(f"data.decode_device: cuda needs rgb decoded on the GPU, but {reason}")
    return "cpu"


def narrowest_int(values: Sequence[torch.Tensor]) -> torch.dtype:
    """The smallest of uint8, int16, int64 that holds every value of these integer tensors."""
    lo, hi = zip(*(map(int, torch.aminmax(v)) for v in values))
    if min(lo) >= 0 and max(hi) <= 255:
        return torch.uint8
    if min(lo) >= -(2**15) and max(hi) < 2**15:
        return torch.int16
    return torch.int64


def collate(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """`default_collate` for the training stream's workers, except that a domain with deferred rgb inputs stays a
    list (for `finish_rgb`), and class-id maps (int64 tensors of 2 or more dims) travel in the narrowest integer
    dtype that holds the batch's ids (`narrowest_int`: uint8 for up to 256 classes and an ignore index of 255),
    an eighth of the bytes through shared memory; `widen_ids` brings them back to int64 on the device."""
    deferred = {k for s in samples for k, v in s.items() if isinstance(v, DeferredRgb)}
    rows = [{k: v for k, v in s.items() if k not in deferred} for s in samples]
    for k, v in rows[0].items():
        if isinstance(v, torch.Tensor) and v.dtype == torch.int64 and v.ndim >= 2:
            dtype = narrowest_int([r[k] for r in rows])
            for r in rows:
                r[k] = r[k].to(dtype)
    batch = default_collate(rows)
    batch.update({k: [s[k] for s in samples] for k in deferred})
    return batch


def widen_ids(batch: dict[str, Any], image_domains: Sequence[str]) -> None:
    """Class-id maps of a collated batch, in place: back to int64 (what the semseg adapter, the losses and the
    metrics take) from the narrow dtype `collate` sent them in; image domains stay uint8 for `normalize_images`."""
    for k, v in batch.items():
        if isinstance(v, torch.Tensor) and v.dtype in (torch.uint8, torch.int16) and k not in image_domains:
            batch[k] = v.long()


def finish_rgb(batch: dict[str, Any], device: torch.device | str) -> None:
    """Deferred rgb inputs of a collated batch, in place, on `device`: one batched JPEG decode, then each
    sample's crop, flip and padding (as `SampleTransform` does them on the CPU), uint8; inputs the
    workers finished (PNG members, say) are stacked with them in order. Raises FormatError naming the key of
    a JPEG that does not decode."""
    for domain, items in batch.items():
        if not isinstance(items, list) or not any(isinstance(v, DeferredRgb) for v in items):
            continue
        todo = [v for v in items if isinstance(v, DeferredRgb)]
        images = iter(decode_jpegs([v.jpeg for v in todo], device))
        out = []
        for key, v in zip(batch["__key__"], items):
            if not isinstance(v, DeferredRgb):
                out.append(v.to(device, non_blocking=True))
                continue
            img = next(images)
            if isinstance(img, Exception):
                raise fmt.FormatError(f"sample {key!r}: rgb {img}")
            out.append(pad_to(apply_plan(img, "rgb", v.plan, pad=False), v.plan, fill=RGB_PAD))
        batch[domain] = torch.stack(out)


def depth_meanings(manifest: dict) -> dict[str, str]:
    """The manifest meaning of every depth modality of a shard set."""
    return {m: e.get("meaning", "metric_m") for m, e in manifest["modalities"].items() if e.get("kind") == "depth"}


def transform_args(cfg: Any, manifest: dict | None = None) -> dict[str, Any]:
    """SampleTransform arguments of a RunConfig (and the manifest of the shard set it reads)."""
    d = cfg.data
    return dict(
        inputs=dict(d.inputs),
        target=None if cfg.objective == "pretrain" else d.target,
        image_size=d.image_size,
        augment=d.augment,
        crop_scale=tuple(d.crop_scale),
        crop_ratio=tuple(d.crop_ratio),
        hflip=d.hflip,
        rand_augment=d.rand_augment,
        color_augs=d.color_augs,
        reduce_zero_label=d.reduce_zero_label,
        ignore_index=d.ignore_index,
        depth_space=d.depth_space,
        depth_meanings=depth_meanings(manifest) if manifest is not None else {},
    )


def modalities_needed(inputs: dict[str, str], target: str | None) -> list[str]:
    """Shard modalities to read for these inputs/target ('cls' rides along with the rgb shards)."""
    mods = list(dict.fromkeys(inputs.values()))
    if target is not None and target != "cls" and target not in mods:
        mods.append(target)
    if target == "cls" and "rgb" not in mods:
        mods.append("rgb")
    return mods


def split_shards(
    manifest: dict,
    train_shards: list[str] | None,
    eval_shards: list[str] | None,
    eval_num_shards: int,
    *,
    need_train: bool = True,
    eval_manifest: dict | None = None,
) -> tuple[list[str], list[str]]:
    """(train, eval) shard names from the manifest(s) and the config's choice.

    Without `eval_manifest` the eval shards are held out of the training set (`eval_shards`, or its last
    `eval_num_shards`); with it they come from that separate set (`eval_shards`, default all of them).
    An eval-only run needs no training shard.
    """
    names = [s["name"] for s in manifest["shards"]]
    eval_names = names if eval_manifest is None else [s["name"] for s in eval_manifest["shards"]]
    for wanted, listed, what in ((train_shards, names, "training"), (eval_shards, eval_names, "evaluation")):
        unknown = sorted(set(wanted or []) - set(listed))
        if unknown:
            span = f"{listed[0]} .. {listed[-1]}" if listed else "no shard"
            raise fmt.FormatError(f"{what} shards {unknown} are not in its manifest (it lists {span})")
    if eval_shards is None:
        if eval_manifest is not None:
            eval_shards = eval_names
        else:
            eval_shards = names[max(0, len(names) - eval_num_shards) :] if eval_num_shards > 0 else []
    if train_shards is None:
        held_out = set(eval_shards) if eval_manifest is None else set()
        train_shards = [n for n in names if n not in held_out]
    if not train_shards and need_train:
        raise fmt.FormatError("no training shards left after holding out the eval shards")
    return list(train_shards), list(eval_shards)


def rank_shards(shards: list[str], rank: int, world: int) -> list[str]:
    """The explicit node split: rank r takes shards r, r+W, ...; every rank needs at least one shard."""
    if len(shards) < world:
        raise fmt.FormatError(f"{len(shards)} training shards cannot feed {world} ranks: write more, smaller shards")
    return shards[rank::world]


def train_loader(
    root: str,
    shards: list[str],
    transform_args: dict[str, Any],
    *,
    micro_batch: int,
    num_workers: int,
    shuffle_buffer: int,
    seed: int,
    chunk: int,
    rank: int,
    readahead: int = 2,
    pin_memory: bool = False,
    defer_rgb: bool = False,
) -> DataLoader:
    """The infinite, resampled training stream of one rank for chunk `chunk` (see module docstring).

    pin_memory (a CUDA run): batches come in page-locked memory, so `to_device`'s non-blocking copies overlap
    the step. Workers are not persistent: each chunk is a fresh, freshly seeded loader (exact resume).
    defer_rgb: rgb JPEG inputs come as `DeferredRgb`, for `finish_rgb` on the GPU (`rgb_decode_device`).
    """
    from shards.reader import ShardDataset

    transform = SampleTransform(train=True, seed=(seed, chunk, rank), **transform_args)
    if defer_rgb and transform.color.ops is not None:
        raise ValueError(f"defer_rgb: the {transform.augment} recipe colour-augments rgb on the CPU")
    dataset = ShardDataset(
        root,
        modalities_needed(transform.inputs, transform.target),
        shuffle_shards=True,
        shuffle_buffer=shuffle_buffer,
        seed=int(np.random.SeedSequence([seed, rank]).generate_state(1)[0]),
        resampled=True,
        split_by_node=False,
        split_by_worker=True,
        on_error="raise",
        shards=shards,
        transform=transform,
        readahead=readahead,
        defer_jpeg=[transform.inputs["rgb"]] if defer_rgb else (),
    )
    dataset.set_epoch(chunk)
    return DataLoader(
        dataset,
        batch_size=micro_batch,
        num_workers=num_workers,
        collate_fn=collate,
        drop_last=True,
        pin_memory=pin_memory,
        persistent_workers=False,
        prefetch_factor=4 if num_workers else None,
    )


def eval_samples(root: str, shards: list[str], transform_args: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """Every sample of the eval shards, in order, resized to image_size (no crop, no flip)."""
    from shards.reader import iter_shard

    transform = SampleTransform(train=False, **transform_args)
    mods = modalities_needed(transform.inputs, transform.target)
    for name in shards:
        for sample in iter_shard(root, name, mods):
            yield transform(sample)


def batched(samples: Iterator[dict[str, Any]], batch_size: int) -> Iterator[dict[str, Any]]:
    """Collate consecutive samples into batches (the last one may be smaller)."""
    buf: list[dict[str, Any]] = []
    for s in samples:
        buf.append(s)
        if len(buf) == batch_size:
            yield default_collate(buf)
            buf = []
    if buf:
        yield default_collate(buf)


def to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    """Move the tensors of a collated batch to `device` (keys and other values stay)."""
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def standardize_depth_inputs(batch: dict[str, Any], inputs: dict[str, str], enabled: bool = True) -> None:
    """Depth inputs, in place: robust (10-90 % trimmed) per-sample standardization over the valid (finite)
    pixels when `enabled`; invalid pixels (padding) become 0 either way."""
    for domain, modality in inputs.items():
        if modalities.of(modality).standardize:
            x = batch[domain]
            valid = torch.isfinite(x)
            if enabled:
                x = robust_standardize_depth(x, None if bool(valid.all()) else valid)
            batch[domain] = torch.nan_to_num(x, nan=0.0)
