"""Per-sample augmentation recipes: one geometry drawn per sample and applied to every modality alike.

A recipe (`data.augment`) says how a sample is cropped, resized, flipped, padded and colour-augmented, for
training and for evaluation. Geometry is a `Plan`: take a box of the source (fractions), resize it, pad it at
the bottom/right, maybe flip. Each kind follows its registry rules (`shards.modalities`): rgb is resized bicubic,
depth and normals bilinear, semseg nearest (semseg *inputs* at 1/SEMSEG_STRIDE resolution); normals are
renormalised after resizing and a flip negates their x component. Colour augmentations touch rgb only.

  crop    MultiMAE / MAE pre-training: RandomResizedCrop (`data.crop_scale`, `data.crop_ratio`) + flip;
          eval resizes the whole image to the square size.
  cls     the official ImageNet fine-tuning recipe (timm's `create_transform`): RandomResizedCrop + flip +
          RandAugment `data.rand_augment` (timm's implementation); Mixup / CutMix with label smoothing are
          batch-level (timm's `Mixup`, in the training loop). Eval: shorter side to size / 0.875, center crop.
  semseg  the official segmentation recipe ("simple"): flip, longest side to size, colour jitter (0.4, 0.4,
          0.2, 0.1; p = 0.5), large-scale jitter x U(0.1, 2.0), pad to size (rgb grey 128, labels
          `ignore_index`, depth invalid), random crop. Eval: longest side to size, pad.
  depth   the official NYUv2 depth recipe ("nyu-augs"): shorter side to size, flip, random crop; with
          `data.color_augs`, BYOL colour jitter (p = 0.5) and grayscale (p = 0.3). Eval: shorter side, center crop.

Randomness comes from the sample's numpy Generator (and, for the library transforms, seeds drawn from it), so
a resumed run re-creates every augmentation exactly.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
import torchvision.transforms.v2 as T
import torchvision.transforms.v2.functional as TF

from shards import modalities

RECIPES = ("crop", "cls", "semseg", "depth")
EVAL_CROP_PCT = 0.875  # timm's default eval crop for ImageNet
LSJ_SCALE = (0.1, 2.0)  # large-scale jitter range of the official segmentation recipe
RGB_PAD = 128  # grey, before normalization (official pad_value)
#: the registry's resize rules (`Modality.interpolation`)
INTERPOLATION = {"bicubic": TF.InterpolationMode.BICUBIC, "bilinear": TF.InterpolationMode.BILINEAR,
                 "nearest": TF.InterpolationMode.NEAREST_EXACT}  # fmt: skip


@dataclass(frozen=True)
class Plan:
    """Take `box` (top, left, height, width as fractions of the source), resize it to `size` (h, w), pad it at
    the bottom/right to `pad` (h, w) when given, flip horizontally when `flip`."""

    box: tuple[float, float, float, float]
    size: tuple[int, int]
    pad: tuple[int, int] | None = None
    flip: bool = False


def crop_params(height: int, width: int, scale, ratio, rng: np.random.Generator) -> tuple[float, float, float, float]:
    """RandomResizedCrop box as fractions (top, left, h, w) of the image; torchvision's rule, seeded by `rng`."""
    area = height * width
    log_ratio = (np.log(ratio[0]), np.log(ratio[1]))
    for _ in range(10):
        target_area = area * rng.uniform(scale[0], scale[1])
        aspect = np.exp(rng.uniform(*log_ratio))
        w = int(round(np.sqrt(target_area * aspect)))
        h = int(round(np.sqrt(target_area / aspect)))
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


def _scaled(h: int, w: int, scale: float) -> tuple[int, int]:
    return max(1, round(h * scale)), max(1, round(w * scale))


def _window(full: tuple[int, int], size: int, rng: np.random.Generator | None) -> tuple[float, ...]:
    """A size x size window (or the whole side when shorter) of a full (H, W) image: random, or centered."""
    (H, W), box = full, []
    for side in (H, W):
        extent = min(size, side)
        start = int(rng.integers(0, side - extent + 1)) if rng is not None else (side - extent) // 2
        box.append((start, extent))
    (top, h), (left, w) = box
    return top / H, left / W, h / H, w / W


def train_plan(recipe: str, h: int, w: int, size: int, rng: np.random.Generator, *, scale=(0.2, 1.0),
               ratio=(3 / 4, 4 / 3), hflip: float = 0.5) -> Plan:  # fmt: skip
    """The training geometry of one sample of source size (h, w)."""
    if recipe in ("crop", "cls"):
        box = crop_params(h, w, scale, ratio, rng)
        return Plan(box, (size, size), None, bool(rng.random() < hflip))
    flip = bool(rng.random() < hflip)
    if recipe == "semseg":
        full = _scaled(h, w, size / max(h, w) * rng.uniform(*LSJ_SCALE))  # longest side, then LSJ
        box = _window(full, size, rng)
        return Plan(box, (round(box[2] * full[0]), round(box[3] * full[1])), (size, size), flip)
    if recipe == "depth":
        full = _scaled(h, w, size / min(h, w))  # shorter side to size
        return Plan(_window(full, size, rng), (size, size), None, flip)
    raise ValueError(f"unknown augmentation recipe {recipe!r} (known: {', '.join(RECIPES)})")


def eval_plan(recipe: str, h: int, w: int, size: int) -> Plan:
    """The evaluation geometry (deterministic)."""
    if recipe == "crop":
        return Plan((0.0, 0.0, 1.0, 1.0), (size, size))
    if recipe == "cls":
        return Plan(_window(_scaled(h, w, size / EVAL_CROP_PCT / min(h, w)), size, None), (size, size))
    if recipe == "semseg":
        return Plan((0.0, 0.0, 1.0, 1.0), _scaled(h, w, size / max(h, w)), (size, size))
    if recipe == "depth":
        return Plan(_window(_scaled(h, w, size / min(h, w)), size, None), (size, size))
    raise ValueError(f"unknown augmentation recipe {recipe!r} (known: {', '.join(RECIPES)})")


def apply_plan(
    x: torch.Tensor, kind: str, plan: Plan, *, stride: int = 1, fill: float = 0.0, pad: bool = True
) -> torch.Tensor:
    """x (C, H, W) -> the plan's output (C, h, w) for a modality of `kind` at 1/stride of the image resolution.

    pad=False stops before the padding (see `pad_to`), e.g. to colour-augment the image part first.
    """
    H, W = x.shape[-2:]
    top, left = int(round(plan.box[0] * H)), int(round(plan.box[1] * W))
    h, w = max(1, int(round(plan.box[2] * H))), max(1, int(round(plan.box[3] * W)))
    size = [max(1, plan.size[0] // stride), max(1, plan.size[1] // stride)]
    rule = modalities.get(kind)
    mode = INTERPOLATION[rule.interpolation]
    out = TF.resized_crop(x, top, left, h, w, size, interpolation=mode, antialias=rule.interpolation != "nearest")
    if rule.unit_vectors:
        out = renormalize(out)
    if plan.flip:
        out = flip_horizontal(out, rule.flip)
    return pad_to(out, plan, stride=stride, fill=fill) if pad else out


def renormalize(v: torch.Tensor) -> torch.Tensor:
    """(3, H, W) vectors resampled from unit vectors -> unit vectors again; pixels whose interpolated vector is
    shorter than 0.5 (mostly missing neighbours, or opposite directions) become 0 = missing."""
    norm = v.norm(dim=0, keepdim=True)
    return torch.where(norm >= 0.5, v / norm.clamp_min(1e-6), torch.zeros_like(v))


def flip_horizontal(x: torch.Tensor, rule: str = "mirror") -> torch.Tensor:
    """x (C, H, W) mirrored left-right; rule "negate_x" also negates channel 0 (a vector's x component, which
    points right: mirrored, a surface facing right faces left)."""
    out = x.flip(-1)
    if rule == "negate_x":
        out[0].neg_()
    return out


def pad_to(x: torch.Tensor, plan: Plan, *, stride: int = 1, fill: float = 0.0) -> torch.Tensor:
    """Pad x (C, h, w) at the bottom and right to the plan's `pad` size (at 1/stride); unchanged without one."""
    if plan.pad is None:
        return x
    ph, pw = plan.pad[0] // stride - x.shape[-2], plan.pad[1] // stride - x.shape[-1]
    return F.pad(x, (0, max(0, pw), 0, max(0, ph)), value=fill)


class ColorAugment:
    """The recipe's colour augmentation of rgb uint8 (3, H, W), seeded from the sample's Generator."""

    def __init__(self, recipe: str, size: int, rand_augment: str = "", color_augs: bool = False):
        self.recipe = recipe
        self.ops = None
        if recipe == "cls" and rand_augment:
            from timm.data.auto_augment import rand_augment_transform

            mean = tuple(round(255 * m) for m in (0.485, 0.456, 0.406))
            self.ops = rand_augment_transform(rand_augment, {"translate_const": int(size * 0.45), "img_mean": mean})
        elif recipe == "semseg":
            self.ops = T.RandomApply([T.ColorJitter(0.4, 0.4, 0.2, 0.1)], p=0.5)
        elif recipe == "depth" and color_augs:
            self.ops = T.Compose([T.RandomApply([T.ColorJitter(0.1255, 0.4, (0.5, 1.5), (-0.2, 0.2))], p=0.5),
                                  T.RandomGrayscale(p=0.3)])  # fmt: skip

    def __call__(self, rgb: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
        if self.ops is None:
            return rgb
        seed = int(rng.integers(2**31))
        if self.recipe == "cls":  # timm's RandAugment: PIL images, `random` and numpy's global generator
            from PIL import Image

            states = random.getstate(), np.random.get_state()
            random.seed(seed)
            np.random.seed(seed)
            try:
                out = self.ops(Image.fromarray(rgb.permute(1, 2, 0).numpy()))
            finally:
                random.setstate(states[0])
                np.random.set_state(states[1])
            return torch.from_numpy(np.asarray(out).copy()).permute(2, 0, 1)
        with torch.random.fork_rng(devices=[]):  # torchvision's transforms draw from torch's generator
            torch.manual_seed(seed)
            return self.ops(rgb)
