"""The modality registry: one entry per kind says how its samples are stored, transformed, shown and learned.

Every list of kinds in the toolkit comes from here: the modality-name pattern of the shard format, the codecs,
`verify`, `info` and `show`, the labeling teachers' kinds, the trainer's domains, augmentation rules, losses,
heads and metrics, the model's channels and the demo page's rows. Adding a kind is one `register(Modality(...))`
(plus, where it needs one, a codec in `shards.format.CODECS` and a teacher class). docs/modalities.md walks
through it with surface normals as the example.

A modality *name* in a shard set is its kind, optionally followed by ``_`` and a suffix (``depth_gt``,
``normals_dpt``); the kind is the part before the first underscore. This module imports neither torch nor PIL.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from .errors import FormatError, shown

KIND_RE = re.compile(r"[a-z][a-z0-9]*")  # a kind holds no '_' (it ends at the first one)
INTERPOLATIONS = ("bicubic", "bilinear", "nearest")
FLIPS = ("mirror", "negate_x")
PICTURES = ("image", "colormap", "palette", "normals")
INPUT_ADAPTERS = ("patched", "semseg")
PRETRAIN_LOSSES = ("mse", "l1", "ce")
METRICS = ("semseg", "depth", "normals", "dense")


@dataclass(frozen=True)
class Modality:
    """What the toolkit knows about one kind of modality.

    codec:          name of its codec in `shards.format.CODECS` (member extension, stored dtype, per-sample json)
    channels:       decoded channels; None for class-id maps (the channel count is the class count)
    decoded:        numpy dtype of a decoded sample: (H, W, C) for C > 1 (rgb, normals), (H, W) otherwise
    interpolation:  resize rule: bicubic (images), bilinear (continuous values), nearest (ids)
    flip:           horizontal flip rule: "mirror" (pixels only) or "negate_x" (vectors whose first component
                    points right also change sign)
    unit_vectors:   values are unit vectors: resizing renormalises them; a zero vector marks a missing pixel
    picture:        how pictures show it: "image", "colormap" (scalars), "palette" (ids), "normals" (RGB = (n+1)/2)
    meanings:       what a value means (manifest `meaning`); the first is the default
    input_adapter:  "patched" (a Conv2d patch projection of `channels`) or "semseg" (class embedding, then patches)
    input_stride:   inputs reach the model at 1/input_stride of the image resolution (semseg: 4, as official)
    pretrain_loss:  the masked reconstruction loss of its output adapter: "mse", "l1" or "ce"
    standardize:    pre-training standardizes it per image (10-90 % trimmed statistics, depth's official rule)
    head:           fine-tuning head when it is the target: "dpt" (dense regression) or "convnext" (segmentation)
    losses:         fine-tuning losses it accepts, the default first
    metrics:        metric family when it is the fine-tuning target: semseg, depth, normals or dense (L1, RMSE)
    pad:            value of padded pixels: "invalid" (0 for targets, NaN for standardized inputs), "ignore"
                    (the ignore index) or "grey" (rgb's 128)
    """

    kind: str
    codec: str
    channels: int | None
    decoded: str
    interpolation: str
    picture: str
    meanings: tuple[str, ...]
    input_adapter: str = "patched"
    input_stride: int = 1
    pretrain_loss: str = "l1"
    standardize: bool = False
    flip: str = "mirror"
    unit_vectors: bool = False
    head: str = "dpt"
    losses: tuple[str, ...] = ("l1",)
    metrics: str = "dense"
    pad: str = "invalid"

    def __post_init__(self) -> None:
        checks = {
            "interpolation": INTERPOLATIONS, "flip": FLIPS, "picture": PICTURES,
            "input_adapter": INPUT_ADAPTERS, "pretrain_loss": PRETRAIN_LOSSES, "metrics": METRICS,
        }  # fmt: skip
        for key, known in checks.items():
            if getattr(self, key) not in known:
                raise ValueError(f"modality {self.kind!r}: {key} {getattr(self, key)!r} is not one of {known}")
        if not KIND_RE.fullmatch(self.kind):
            raise ValueError(f"modality kind {self.kind!r}: lowercase letters and digits, starting with a letter")
        if not self.meanings:
            raise ValueError(f"modality {self.kind!r}: at least one meaning")

    @property
    def is_classes(self) -> bool:
        """A map of class ids (semseg-like), not values."""
        return self.channels is None

    @property
    def dense(self) -> bool:
        """A dense target for `objective: dense` (values per pixel; rgb is the image, not a target)."""
        return not self.is_classes and self.kind != "rgb"


_REGISTRY: dict[str, Modality] = {}
_NAME_RE: re.Pattern | None = None


def register(modality: Modality, *, replace: bool = False) -> Modality:
    """Add a kind; every registry-driven list sees it from then on. Re-registering a kind needs replace=True."""
    global _NAME_RE
    if modality.kind in _REGISTRY and not replace and _REGISTRY[modality.kind] != modality:
        raise ValueError(f"modality kind {modality.kind!r} is registered already (pass replace=True)")
    _REGISTRY[modality.kind] = modality
    _NAME_RE = None
    return modality


def unregister(kind: str) -> None:
    """Remove a kind registered by `register` (e.g. one a test added)."""
    global _NAME_RE
    if kind in BUILTIN:
        raise ValueError(f"{kind!r} is a built-in modality kind")
    _REGISTRY.pop(kind, None)
    _NAME_RE = None


def kinds() -> tuple[str, ...]:
    """Every registered kind, built-ins first in their order."""
    return tuple(_REGISTRY)


def find(kind: str) -> Modality | None:
    """The entry of a kind, or None (e.g. a model domain known only by its channel count)."""
    return _REGISTRY.get(kind)


def get(kind: str) -> Modality:
    try:
        return _REGISTRY[kind]
    except (KeyError, TypeError):
        raise FormatError(f"unknown modality kind {shown(kind)} (known: {', '.join(_REGISTRY)})") from None


def name_pattern() -> re.Pattern:
    """A modality name: a registered kind, optionally '_' and letters, digits, '_' or '-'."""
    global _NAME_RE
    if _NAME_RE is None:
        alternatives = "|".join(sorted(map(re.escape, _REGISTRY), key=len, reverse=True))
        _NAME_RE = re.compile(rf"(?:{alternatives})(?:_[A-Za-z0-9][A-Za-z0-9_-]*)?")
    return _NAME_RE


def modality_kind(name: str) -> str:
    """'depth_gt' -> 'depth', 'semseg' -> 'semseg', 'normals_dpt' -> 'normals'."""
    if not isinstance(name, str) or not name_pattern().fullmatch(name):
        raise FormatError(
            f"unknown modality {shown(name)}: names are one of {kinds()}, optionally followed by '_' and "
            "letters, digits, '_' or '-' (e.g. 'depth_gt')"
        )
    return name.split("_", 1)[0]


def of(name: str) -> Modality:
    """The registry entry of a modality name ('depth_gt' -> the depth entry)."""
    return _REGISTRY[modality_kind(name)]


def display_order(name: str) -> tuple[int, str]:
    """Sort key of modality names: by kind in registry order (rgb, depth, semseg, normals, ...), then name."""
    return kinds().index(modality_kind(name)), name


RGB = register(Modality(
    "rgb", codec="jpeg", channels=3, decoded="uint8", interpolation="bicubic", picture="image",
    meanings=("image",), pretrain_loss="mse", pad="grey",
))  # fmt: skip
DEPTH = register(Modality(
    "depth", codec="range16", channels=1, decoded="float32", interpolation="bilinear", picture="colormap",
    meanings=("metric_m", "relative", "inverse_relative"), standardize=True, losses=("berhu", "l1"),
    metrics="depth",
))  # fmt: skip
SEMSEG = register(Modality(
    "semseg", codec="ids", channels=None, decoded="int64", interpolation="nearest", picture="palette",
    meanings=("class_ids",), input_adapter="semseg", input_stride=4, pretrain_loss="ce", head="convnext",
    losses=("ce",), metrics="semseg", pad="ignore",
))  # fmt: skip
NORMALS = register(Modality(
    "normals", codec="normals", channels=3, decoded="float32", interpolation="bilinear", picture="normals",
    meanings=("camera_normals",), flip="negate_x", unit_vectors=True, losses=("l1", "angular"), metrics="normals",
))  # fmt: skip
BUILTIN = kinds()
