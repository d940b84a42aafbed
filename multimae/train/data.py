"""The trainer's streaming data path: reader -> joint augmentation -> normalization -> batches.

Stages, in order:
  1. `shards.reader.ShardDataset` streams the aligned shard set (resampled shards, shuffle buffer, split by
     worker; the split by rank is explicit here: rank r reads train shards r, r+W, r+2W, ...).
  2. `SampleTransform` (run inside the DataLoader workers) applies ONE random-resized-crop (scale 0.2-1.0,
     ratio 3/4-4/3, as MultiMAE/MAE) and ONE horizontal flip to every modality of a sample: bicubic for rgb,
     bilinear for depth, nearest for semseg; semseg *inputs* are produced at stride 4 (image_size / 4), as the
     semseg input adapter expects. RGB is normalized with the ImageNet mean/std.
  3. `default_collate` builds the batch: {domain: (B, C, H, W) or (B, H, W), "target": ..., "__key__": [...]}.

Exact resume: the stream is cut into chunks of `chunk_steps` optimizer steps. Chunk c is a fresh DataLoader
whose reader and augmentation are seeded from (seed, c, rank, worker), so the batches of step s are a pure
function of (seed, s) and a resumed run re-creates them by skipping s - c * chunk_steps batches (zero when it
resumes from a checkpoint taken on a chunk boundary, the default).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torchvision.transforms.v2.functional as TF
from torch.utils.data import DataLoader, default_collate, get_worker_info

from multimae.input_adapters import SEMSEG_STRIDE
from multimae.losses import robust_standardize_depth
from shards import format as fmt

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def crop_params(
    height: int, width: int, scale: Sequence[float], ratio: Sequence[float], rng: np.random.Generator
) -> tuple[float, float, float, float]:
    """RandomResizedCrop box as fractions (top, left, h, w) of the image; torchvision's rule, seeded by `rng`."""
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(*log_ratio))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            i = int(rng.integers(0, height - h + 1))
            j = int(rng.integers(0, width - w + 1))
            return i / height, j / width, h / height, w / width
    # fallback: central crop clamped to the ratio range
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        h, w = height, int(round(height * max(ratio)))
    else:
        w, h = width, height
    return (height - h) // 2 / height, (width - w) // 2 / width, h / height, w / width


def _interp(kind: str) -> TF.InterpolationMode:
    return {
        "rgb": TF.InterpolationMode.BICUBIC,
        "depth": TF.InterpolationMode.BILINEAR,
        "semseg": TF.InterpolationMode.NEAREST_EXACT,
    }[kind]


def resized_crop(
    x: torch.Tensor, kind: str, box: tuple[float, float, float, float], size: int, flip: bool
) -> torch.Tensor:
    """Crop `box` (fractions) out of x (C, H, W) and resize to (size, size) with the kind's interpolation."""
    h_img, w_img = x.shape[-2:]
    top, left = int(round(box[0] * h_img)), int(round(box[1] * w_img))
    h, w = max(1, int(round(box[2] * h_img))), max(1, int(round(box[3] * w_img)))
    antialias = kind != "semseg"
    out = TF.resized_crop(x, top, left, h, w, [size, size], interpolation=_interp(kind), antialias=antialias)
    return out.flip(-1) if flip else out


def to_tensor(kind: str, value: np.ndarray) -> torch.Tensor:
    """Reader numpy -> torch (C, H, W): rgb uint8 (3,H,W), depth float32 (1,H,W), semseg int64 (1,H,W)."""
    if not value.flags.writeable:  # decoded images can be read-only views; torch wants writable memory
        value = value.copy()
    if kind == "rgb":
        return torch.from_numpy(np.ascontiguousarray(value)).permute(2, 0, 1)
    if kind == "depth":
        return torch.from_numpy(np.ascontiguousarray(value, dtype=np.float32))[None]
    return torch.from_numpy(np.ascontiguousarray(value, dtype=np.int64))[None]


def normalize_rgb(rgb: torch.Tensor) -> torch.Tensor:
    """uint8 (3, H, W) -> float32 ImageNet-normalized (3, H, W)."""
    return TF.normalize(rgb.float().div_(255.0), IMAGENET_MEAN, IMAGENET_STD)


def denormalize_rgb(rgb: torch.Tensor) -> torch.Tensor:
    """Inverse of normalize_rgb, clamped to [0, 1]: (..., 3, H, W) float."""
    mean = torch.tensor(IMAGENET_MEAN, device=rgb.device).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=rgb.device).view(3, 1, 1)
    return (rgb.float() * std + mean).clamp(0, 1)


def map_semseg_labels(ids: torch.Tensor, reduce_zero_label: bool, ignore_index: int) -> torch.Tensor:
    """ADE20K-style label reduction: 0 ("unlabeled") -> ignore_index, k -> k - 1."""
    if not reduce_zero_label:
        return ids
    return torch.where(ids == 0, torch.full_like(ids, ignore_index), ids - 1)


@dataclass
class SampleTransform:
    """Per-sample stage: joint crop/flip (train) or plain resize (eval), normalization, renaming to domains.

    inputs: model domain -> shard modality (e.g. {"rgb": "rgb", "depth": "depth_gt"}); target: the shard
    modality of the fine-tuning target or "cls" (None for pre-training). The output dict holds one tensor
    per domain, "target" when fine-tuning, and "__key__".
    """

    inputs: dict[str, str]
    target: str | None
    image_size: int
    train: bool
    crop_scale: tuple[float, float] = (0.2, 1.0)
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    hflip: float = 0.5
    seed: Sequence[int] = (0,)
    reduce_zero_label: bool = False
    ignore_index: int = 255

    def __post_init__(self) -> None:
        self._rng: np.random.Generator | None = None

    def rng(self) -> np.random.Generator:
        # created lazily inside each DataLoader worker, so every worker has its own reproducible stream
        if self._rng is None:
            info = get_worker_info()
            self._rng = np.random.default_rng([*self.seed, info.id if info is not None else 0])
        return self._rng

    def __call__(self, sample: dict[str, Any]) -> dict[str, Any]:
        size = self.image_size
        items: list[tuple[str, str, torch.Tensor]] = []  # (output name, kind, tensor (C,H,W))
        for domain, modality in self.inputs.items():
            kind = fmt.modality_kind(modality)
            items.append((domain, kind, to_tensor(kind, sample[modality])))
        if self.target is not None and self.target != "cls":
            kind = fmt.modality_kind(self.target)
            items.append(("target", kind, to_tensor(kind, sample[self.target])))

        if self.train:
            ref_h, ref_w = items[0][2].shape[-2:]
            box = crop_params(ref_h, ref_w, self.crop_scale, self.crop_ratio, self.rng())
            flip = bool(self.rng().random() < self.hflip)
        else:
            box, flip = (0.0, 0.0, 1.0, 1.0), False

        out: dict[str, Any] = {"__key__": sample["__key__"]}
        for name, kind, x in items:
            # semseg inputs at stride 4 (adapter resolution); a semseg fine-tuning target at full resolution
            out_size = size // SEMSEG_STRIDE if (kind == "semseg" and name != "target") else size
            y = resized_crop(x, kind, box, out_size, flip)
            if kind == "rgb":
                y = normalize_rgb(y)  # (3, S, S)
            elif kind == "semseg":
                y = y[0]  # (S', S') int64
                if name == "target":
                    y = map_semseg_labels(y, self.reduce_zero_label, self.ignore_index)
            out[name] = y  # depth stays (1, S, S) float32
        if self.target == "cls":
            if "cls" not in sample:
                raise fmt.FormatError(f"sample {sample['__key__']} in shard {sample.get('__shard__')} has no cls label")
            out["target"] = int(sample["cls"])
        return out


def transform_args(cfg: Any) -> dict[str, Any]:
    """SampleTransform arguments of a RunConfig (inputs, fine-tuning target, size, augmentation, labels)."""
    d = cfg.data
    return dict(
        inputs=dict(d.inputs),
        target=None if cfg.objective == "pretrain" else d.target,
        image_size=d.image_size,
        crop_scale=tuple(d.crop_scale),
        crop_ratio=tuple(d.crop_ratio),
        hflip=d.hflip,
        reduce_zero_label=d.reduce_zero_label,
        ignore_index=d.ignore_index,
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
) -> tuple[list[str], list[str]]:
    """(train, eval) shard names from the manifest and the config's choice (an eval-only run needs no train shard)."""
    names = [s["name"] for s in manifest["shards"]]
    unknown = sorted((set(train_shards or []) | set(eval_shards or [])) - set(names))
    if unknown:
        raise fmt.FormatError(f"shards {unknown} are not in the manifest (it lists {names[0]} .. {names[-1]})")
    if eval_shards is None:
        eval_shards = names[len(names) - eval_num_shards :] if eval_num_shards > 0 else []
    if train_shards is None:
        held_out = set(eval_shards)
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
) -> DataLoader:
    """The infinite, resampled training stream of one rank for chunk `chunk` (see module docstring)."""
    from shards.reader import ShardDataset

    transform = SampleTransform(train=True, seed=(seed, chunk, rank), **transform_args)
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
    )
    dataset.set_epoch(chunk)
    return DataLoader(
        dataset,
        batch_size=micro_batch,
        num_workers=num_workers,
        collate_fn=default_collate,
        drop_last=True,
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
    """Robust (10-90 % trimmed) per-sample standardization of the depth inputs, in place, on the batch's device."""
    if enabled:
        for domain, modality in inputs.items():
            if fmt.modality_kind(modality) == "depth":
                batch[domain] = robust_standardize_depth(batch[domain])
