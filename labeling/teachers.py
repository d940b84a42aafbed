"""Teacher networks that pseudo-label RGB images with depth, semantic segmentation and surface normals.

A teacher wraps a Hugging Face transformers model loaded with ``from_pretrained`` from a local folder or the
local Hugging Face cache (never a download):

- depth: any ``AutoModelForDepthEstimation`` (DPT, DPT-Hybrid, Depth Anything, ...);
- semseg: mask-classification models (Mask2Former, MaskFormer) turned into per-pixel class scores the way
  their processor's ``post_process_semantic_segmentation`` does, or any ``AutoModelForSemanticSegmentation``;
- normals: derived from a depth model's output by back-projecting it with a pinhole camera (`NormalsTeacher`).

One class per kind (`DepthTeacher`, `SemsegTeacher`, `NormalsTeacher`) shares the `Teacher` base; `TEACHERS` maps
each kind to its class, and a kind is labelable when it has one. `load_teacher(kind, model)` is the entry point.

Pre-processing is the model's own image processor (transformers' torchvision backend: batched torch ops on the
teacher's device). Post-processing is re-implemented here as batched torch ops and is numerically equal to the
processor's ``post_process_*`` methods (``tests/test_teachers.py`` checks both against real processors): labels
are produced at the teacher's working resolution and resized back to each input image's size (depth with the
processor's interpolation, segmentation from upsampled class scores, then argmax).
"""

from __future__ import annotations

import hashlib
import math
from abc import ABC, abstractmethod
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
import transformers
from huggingface_hub import constants as hf_constants
from huggingface_hub import try_to_load_from_cache
from transformers import (
    AutoConfig,
    AutoImageProcessor,
    AutoModelForDepthEstimation,
    AutoModelForSemanticSegmentation,
    AutoModelForUniversalSegmentation,
)
from transformers.modeling_outputs import DepthEstimatorOutput
from transformers.utils import logging as hf_logging

from shards.depth_space import to_depth_space

TEACHERS_DIR = Path(__file__).parent / "teachers"
DEFAULT_TEACHERS = {
    "depth": str(TEACHERS_DIR / "synthetic-dpt"),
    "semseg": str(TEACHERS_DIR / "synthetic-mask2former"),
}
# The transformers checkpoints closest to the paper's teachers: its Mask2Former itself, and for its Omnidata
# DPT-B-Hybrid (depth, not in transformers format) MiDaS's DPT-Hybrid, which predicts inverse relative depth.
PAPER_TEACHERS = {
    "depth": "Intel/dpt-hybrid-midas",
    "semseg": "facebook/mask2former-swin-small-coco-panoptic",
}
DEPTH_MEANINGS = ("inverse_relative", "relative", "metric_m")
DEFAULT_FOV_DEG = 60.0  # normals: assumed horizontal field of view (the middle of the synthetic cameras' 45-75)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

# Mask-classification models: their processors first upsample mask logits to a fixed size (Mask2Former: 384x384
# "for all models"), then resize class scores to the target size. None = no intermediate step (MaskFormer).
MASK_CLASSIFICATION_INTERMEDIATE = {"mask2former": (384, 384), "maskformer": None}
# Processors whose post_process_depth_estimation is a plain per-image F.interpolate of predicted_depth.
DEPTH_RESIZE_MODE = {"DPTImageProcessor": "bicubic", "DPTImageProcessorPil": "bicubic"}
# Depth models that predict metres; every other depth model is read as MiDaS-style inverse relative depth.
METRIC_DEPTH_MODEL_TYPES = ("zoedepth", "depth_pro")


class TeacherNotFoundError(FileNotFoundError):
    """The teacher's weights are neither in the given local folder nor in the local Hugging Face cache."""


# ---------------------------------------------------------------------------------------------------------------------
# post-processing (pure functions on batches)


def group_by_size(
    sizes: list[tuple[int, int]], fn: Callable[[list[int], tuple[int, int]], torch.Tensor]
) -> list[torch.Tensor]:
    """Call fn(indices, size) -> (n, ...) once per distinct target size; returns one (...) tensor per sample."""
    out: list[torch.Tensor] = [torch.empty(0)] * len(sizes)
    by_size: dict[tuple[int, int], list[int]] = defaultdict(list)
    for b, size in enumerate(sizes):
        by_size[tuple(size)].append(b)
    for size, idx in by_size.items():
        for b, m in zip(idx, fn(idx, size)):
            out[b] = m
    return out


def resize_to_sizes(maps: torch.Tensor, sizes: list[tuple[int, int]], mode: str) -> list[torch.Tensor]:
    """Resize maps (B, C, h, w) to per-sample sizes [(H_b, W_b)]; returns B tensors (C, H_b, W_b)."""
    return group_by_size(sizes, lambda idx, size: F.interpolate(maps[idx], size=size, mode=mode, align_corners=False))


def mask_classification_scores(
    class_logits: torch.Tensor, mask_logits: torch.Tensor, intermediate_size: tuple[int, int] | None
) -> torch.Tensor:
    """Per-pixel class scores of a mask-classification model (Mask2Former / MaskFormer semantic inference).

    class_logits (B, Q, K+1) with the "no object" class last, mask_logits (B, Q, h, w) -> scores (B, K, h', w'),
    where (h', w') = intermediate_size or (h, w).
    """
    if intermediate_size is not None:
        mask_logits = F.interpolate(mask_logits, size=intermediate_size, mode="bilinear", align_corners=False)
    class_probs = class_logits.softmax(dim=-1)[..., :-1]  # (B, Q, K)
    mask_probs = mask_logits.sigmoid()  # (B, Q, h', w')
    return torch.einsum("bqc, bqhw -> bchw", class_probs, mask_probs)  # (B, K, h', w')


def bilinear_matrix(in_size: int, out_size: int) -> torch.Tensor:
    """One axis of ``F.interpolate(mode="bilinear", align_corners=False)`` as an (out, in) matrix: out = M @ x.

    Indices and weights follow PyTorch's kernel (float32 source coordinates, clamped at the borders).
    """
    scale = np.float32(in_size) / np.float32(out_size)
    src = ((torch.arange(out_size, dtype=torch.float32) + 0.5) * float(scale) - 0.5).clamp_(min=0)
    i0 = src.floor().long().clamp_(max=in_size - 1)
    i1 = (i0 + 1).clamp_(max=in_size - 1)
    w1 = (src - i0).clamp_(0, 1)
    m = torch.zeros(out_size, in_size)
    rows = torch.arange(out_size)
    m.index_put_((rows, i0), 1 - w1, accumulate=True)
    m.index_put_((rows, i1), w1, accumulate=True)
    return m


def two_stage_matrices(in_size: int, mid_size: int, out_size: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Resize in -> mid -> out with the first stage evaluated only at the mid points the second one reads.

    Returns (first stage restricted to those points, second stage over them; None when it is the identity).
    """
    second = bilinear_matrix(mid_size, out_size)
    needed = second.ne(0).any(dim=0).nonzero()[:, 0]
    first, second = bilinear_matrix(in_size, mid_size)[needed], second[:, needed]
    if len(needed) == out_size and torch.equal(second, torch.eye(out_size)):
        return first, None
    return first, second


def resize_with(x: torch.Tensor, rows: torch.Tensor | None, cols: torch.Tensor | None) -> torch.Tensor:
    """x (..., h, w) -> rows @ x @ cols.T (..., H, W); None skips an axis."""
    if cols is not None:
        x = x @ cols.T.to(x.device)
    return x if rows is None else rows.to(x.device) @ x


def mask_classification_scores_at(
    class_logits: torch.Tensor, mask_logits: torch.Tensor, intermediate_size: tuple[int, int], size: tuple[int, int]
) -> torch.Tensor:
    """``mask_classification_scores`` with its intermediate upsampling, then resized to `size` (B, K, H, W).

    Equal to the processor's order (upsample the Q mask logits to the intermediate size, sigmoid, class
    einsum, bilinear resize to `size`), but the intermediate map is computed only at the points the final
    resize reads (1/9 of the 384 x 384 grid for a 128 px image) and resizing is done with matrix products;
    targets that read more than half of the grid take the processor's own path.
    """
    (h, w), (mh, mw) = mask_logits.shape[-2:], intermediate_size
    (rows1, rows2), (cols1, cols2) = two_stage_matrices(h, mh, size[0]), two_stage_matrices(w, mw, size[1])
    if len(rows1) * len(cols1) > mh * mw // 2:  # large target: most of the grid is read, interpolate is cheaper
        scores = mask_classification_scores(class_logits, mask_logits, intermediate_size)
        return F.interpolate(scores, size=size, mode="bilinear", align_corners=False)
    masks = resize_with(mask_logits, rows1, cols1)  # (B, Q, needed rows, needed cols)
    scores = torch.einsum("bqc, bqhw -> bchw", class_logits.softmax(dim=-1)[..., :-1], masks.sigmoid())
    return resize_with(scores, rows2, cols2)


# ---------------------------------------------------------------------------------------------------------------------
# normals from depth (pure functions)


def _neighbour(x: torch.Tensor, dim: int, step: int) -> torch.Tensor:
    """out[i] = x[i + step] along `dim` (step = +1 or -1); zero (False) past the image border."""
    n = x.shape[dim]
    edge = torch.zeros_like(x.narrow(dim, 0, 1))
    if step > 0:
        return torch.cat([x.narrow(dim, 1, n - 1), edge], dim)
    return torch.cat([edge, x.narrow(dim, 0, n - 1)], dim)


def _derivative(points: torch.Tensor, valid: torch.Tensor, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Difference of points (H, W, 3) along image axis `dim` (0: down the rows, 1: along the columns).

    Central where both neighbours are valid; one-sided where only one is (the image border, a neighbour without
    depth). Returns the (H, W, 3) differences and (H, W) where they are defined. Scales differ between the
    central and one-sided cases, which changes a normal's length, never its direction.
    """
    ahead, behind = _neighbour(points, dim, 1), _neighbour(points, dim, -1)
    ok_ahead, ok_behind = _neighbour(valid, dim, 1) & valid, _neighbour(valid, dim, -1) & valid
    one_sided = torch.where(ok_ahead[..., None], ahead - points, points - behind)
    return torch.where((ok_ahead & ok_behind)[..., None], (ahead - behind) / 2, one_sided), ok_ahead | ok_behind


def normals_from_depth(depth: torch.Tensor, fov_deg: float) -> torch.Tensor:
    """z-depth (H, W) -> unit surface normals float32 (H, W, 3) in camera coordinates (x right, y up, z toward
    the camera); the zero vector where a normal is undefined.

    Each pixel centre is back-projected with a pinhole of horizontal field of view `fov_deg` and square pixels
    (the vertical field of view follows from the aspect ratio; equal for square images), looking along -z. The
    normal is the cross product of the points' differences along the columns and the rows (`_derivative`),
    turned toward the camera. Depth may carry any global scale (the normals do not change); pixels whose depth
    is not finite and > 0, or without a valid neighbour along either axis, get the zero vector.
    """
    h, w = depth.shape
    z = depth.double()
    valid = torch.isfinite(z) & (z > 0)
    z = torch.where(valid, z, 0.0)
    focal = (w / 2) / math.tan(math.radians(fov_deg) / 2)  # pixels
    x = (torch.arange(w, dtype=torch.float64, device=z.device) + 0.5 - w / 2) / focal  # (W,) x / z, right
    y = (h / 2 - 0.5 - torch.arange(h, dtype=torch.float64, device=z.device)) / focal  # (H,) y / z, up
    points = torch.stack([x[None, :] * z, y[:, None] * z, -z], dim=-1)  # (H, W, 3)
    along_cols, ok_cols = _derivative(points, valid, 1)
    along_rows, ok_rows = _derivative(points, valid, 0)
    n = torch.linalg.cross(along_cols, along_rows, dim=-1)  # (H, W, 3)
    n = torch.where((n * points).sum(-1, keepdim=True) > 0, -n, n)  # toward the camera: n . (0 - p) >= 0
    length = n.norm(dim=-1, keepdim=True)
    defined = valid & ok_cols & ok_rows & (length[..., 0] > 0)
    return torch.where(defined[..., None], n / length.clamp_min(1e-300), 0.0).float()


def depth_for_normals(depth: torch.Tensor, meaning: str) -> torch.Tensor:
    """A depth teacher's output (H, W) of `meaning` -> depth up to a global scale (larger = farther).

    Metric and relative depth pass as they are (normals ignore the scale); inverse relative depth (MiDaS-style
    disparity) is inverted by the trainer's own rule, `shards.depth_space.to_depth_space`.
    """
    return torch.from_numpy(to_depth_space(depth.cpu().numpy(), meaning, "depth"))


# ---------------------------------------------------------------------------------------------------------------------
# the teachers


class Teacher(ABC):
    """One pseudo-labeling teacher: a transformers model, its image processor and batched post-processing.

    The common part of every kind: pre-processing by the model's processor, the forward pass under autocast on
    the teacher's device, and `__call__` from uint8 images to labels at the images' sizes. A subclass per kind
    turns model outputs into labels (`forward`, `postprocess`); `TEACHERS` maps each kind to its class.

    Attributes:
        kind: the modality kind it labels (a key of `TEACHERS`).
        modality: output modality name in the shard set (e.g. "depth", "semseg_m2f").
        classes: semseg class names from ``model.config.id2label`` (index = class id); None for other kinds.
        meaning: the manifest meaning of its output where the kind has several (depth: "inverse_relative" |
            "relative" | "metric_m"; normals: "camera_normals"); None for semseg.
        producer: provenance for the manifest (model, revision or weights_sha256, resolution, dtype, meaning,
            library, ...).
        dtype_reason: why it runs in its dtype (shown by the job's first progress line).
    """

    kind: str = ""
    classes: list[str] | None = None

    def __init__(
        self,
        model: torch.nn.Module,
        processor: Any,
        *,
        modality: str,
        device: torch.device,
        dtype: torch.dtype,
        meaning: str | None,
        producer: dict,
        dtype_reason: str = "",
    ) -> None:
        self.model = model.eval().to(device)
        self.processor = processor
        self.modality = modality
        self.device = device
        self.dtype = dtype
        self.meaning = meaning
        self.producer = producer
        self.dtype_reason = dtype_reason

    @staticmethod
    def auto_class(config: Any) -> type:
        """The transformers auto class that loads this kind's checkpoints of ``config.model_type``; a kind
        without checkpoints of its own (normals run a depth model) has none."""
        raise TypeError(f"no transformers checkpoints are teachers of this kind ({config.model_type})")

    @staticmethod
    def meaning_of(config: Any, model: str) -> str | None:
        """The `meaning` a checkpoint's labels have (read from its config); None where the kind has one."""
        return None

    def __repr__(self) -> str:
        return f"{type(self).__name__}(modality={self.modality!r}, model={self.producer['model']!r})"

    def preprocess(self, images: list[torch.Tensor]) -> list[tuple[list[int], torch.Tensor]]:
        """Run the model's image processor on the teacher's device.

        images: uint8 (H_i, W_i, 3). Returns batches [(indices, pixel_values (n, 3, h, w))], one per processed
        shape. Images are fed to the processor grouped by input size, so no batch is ever padded.
        """
        by_size: dict[tuple[int, int], list[int]] = defaultdict(list)
        for i, image in enumerate(images):
            _check_image(image, i)
            by_size[tuple(image.shape[:2])].append(i)
        batches: dict[tuple[int, int], tuple[list[int], list[torch.Tensor]]] = defaultdict(lambda: ([], []))
        for idx in by_size.values():
            chw = [images[i].permute(2, 0, 1) for i in idx]  # (3, H, W) each
            pixel_values = self.processor(
                images=chw, return_tensors="pt", device=self.device, input_data_format="channels_first"
            )["pixel_values"]  # (n, 3, h, w) float32
            indices, tensors = batches[tuple(pixel_values.shape[-2:])]
            indices.extend(idx)
            tensors.append(pixel_values)
        return [(indices, torch.cat(tensors)) for indices, tensors in batches.values()]

    def run_model(self, pixel_values: torch.Tensor) -> Any:
        """The model's raw output on pixel values (n, 3, h, w), under autocast in the teacher's dtype."""
        with torch.autocast(self.device.type, dtype=self.dtype, enabled=self.dtype != torch.float32):
            return self.model(pixel_values=pixel_values.to(self.device))

    @abstractmethod
    def forward(self, pixel_values: torch.Tensor) -> dict[str, torch.Tensor]:
        """Model outputs at the working resolution as float32 tensors (per kind)."""

    @abstractmethod
    def postprocess(self, out: dict[str, torch.Tensor], sizes: list[tuple[int, int]]) -> list[torch.Tensor]:
        """Outputs of ``forward()`` -> one label per image at ``sizes`` (per kind)."""

    @torch.inference_mode()
    def __call__(self, images: list[torch.Tensor]) -> list[torch.Tensor]:
        """images: uint8 (H_i, W_i, 3) tensors (sizes may differ). Returns one label per image, on the CPU and at
        the input size: depth float32 (H_i, W_i) in the teacher's units, semseg class ids int64 (H_i, W_i), or
        normals float32 (H_i, W_i, 3)."""
        outputs: list[torch.Tensor] = [torch.empty(0)] * len(images)
        for indices, pixel_values in self.preprocess(images):
            sizes = [tuple(images[i].shape[:2]) for i in indices]
            for i, label in zip(indices, self.postprocess(self.forward(pixel_values), sizes)):
                outputs[i] = label.cpu()
        return outputs


class DepthTeacher(Teacher):
    """Any ``AutoModelForDepthEstimation``; labels are depth float32 (H, W) in the teacher's units (`meaning`)."""

    kind = "depth"

    @staticmethod
    def auto_class(config: Any) -> type:
        return AutoModelForDepthEstimation

    @staticmethod
    def meaning_of(config: Any, model: str) -> str | None:
        return _depth_meaning(config, model)

    def forward(self, pixel_values: torch.Tensor) -> dict[str, torch.Tensor]:
        """{"depth": (n, 1, h, w)} at the working resolution."""
        return {"depth": self.run_model(pixel_values).predicted_depth.float().unsqueeze(1)}

    def postprocess(self, out: dict[str, torch.Tensor], sizes: list[tuple[int, int]]) -> list[torch.Tensor]:
        """Depth float32 (H, W) per image at ``sizes``, resized as the processor's post-processing does."""
        depth = out["depth"]
        mode = DEPTH_RESIZE_MODE.get(type(self.processor).__name__)
        if mode is not None:
            return [d[0] for d in resize_to_sizes(depth, sizes, mode)]
        # other depth processors (GLPN, ZoeDepth, ...) keep their own post-processing
        results = self.processor.post_process_depth_estimation(
            DepthEstimatorOutput(predicted_depth=depth[:, 0]), target_sizes=sizes
        )
        return [r["predicted_depth"].float().reshape(size) for r, size in zip(results, sizes)]


class SemsegTeacher(Teacher):
    """Mask-classification models (Mask2Former, MaskFormer) or any ``AutoModelForSemanticSegmentation``; labels
    are class ids int64 (H, W) into `classes`."""

    kind = "semseg"

    def __init__(self, model: torch.nn.Module, processor: Any, **kw: Any) -> None:
        super().__init__(model, processor, **kw)
        config = model.config
        self.classes = [str(config.id2label[i]) for i in range(len(config.id2label))]
        self._model_type = config.model_type
        self._universal = config.model_type in MASK_CLASSIFICATION_INTERMEDIATE

    @staticmethod
    def auto_class(config: Any) -> type:
        if config.model_type in MASK_CLASSIFICATION_INTERMEDIATE:
            return AutoModelForUniversalSegmentation
        return AutoModelForSemanticSegmentation

    def forward(self, pixel_values: torch.Tensor) -> dict[str, torch.Tensor]:
        """{"logits": (n, K, h, w)} or, for mask classification, {"class_logits": (n, Q, K+1), "mask_logits":
        (n, Q, h, w)}."""
        out = self.run_model(pixel_values)
        if self._universal:
            return {"class_logits": out.class_queries_logits.float(), "mask_logits": out.masks_queries_logits.float()}
        return {"logits": out.logits.float()}

    def postprocess(self, out: dict[str, torch.Tensor], sizes: list[tuple[int, int]]) -> list[torch.Tensor]:
        """Class ids int64 (H, W) per image at ``sizes``: class scores upsampled bilinearly, then argmax."""
        if "logits" in out:
            per_image = resize_to_sizes(out["logits"], sizes, "bilinear")
        elif (intermediate := MASK_CLASSIFICATION_INTERMEDIATE[self._model_type]) is not None:
            per_image = group_by_size(
                sizes,
                lambda idx, size: mask_classification_scores_at(
                    out["class_logits"][idx], out["mask_logits"][idx], intermediate, size
                ),
            )  # Mask2Former
        else:  # MaskFormer: scores at the mask resolution, then resized
            scores = mask_classification_scores(out["class_logits"], out["mask_logits"], None)
            per_image = resize_to_sizes(scores, sizes, "bilinear")
        return [s.max(dim=0).indices for s in per_image]  # == argmax (first maximum), faster on CPU


class NormalsTeacher(Teacher):
    """Surface normals derived from a depth teacher's output; labels are float32 (H, W, 3) unit vectors in camera
    coordinates (x right, y up, z toward the camera), the zero vector where undefined.

    Camera: a pinhole at the image centre with square pixels and a horizontal field of view of `fov_deg`
    (default 60 degrees; the vertical one follows from the aspect ratio, equal for square images). RGB images
    carry no intrinsics, so the angle is an assumption: a wrong one bends every normal off the optical axis (the
    cost on the synthetic scenes is in quality.json).

    Depth space: normals do not depend on a global depth scale, so metric and relative depth are used as they
    are; inverse relative depth (MiDaS / DPT-Hybrid disparity) is turned into depth first with the trainer's
    rule, 1 / max(d, 0.01 * max d) per image (`shards.depth_space.to_depth_space`). Disparity known only up to
    a shift as well stays approximate.

    It runs its depth teacher's model (the same object: sharing one with a job's depth output costs no second
    network); `from_depth` turns depth maps that teacher made into normals.
    """

    kind = "normals"

    def __init__(self, depth: DepthTeacher, *, fov_deg: float | None = None, modality: str = "normals") -> None:
        fov_deg = DEFAULT_FOV_DEG if fov_deg is None else float(fov_deg)
        if not 0 < fov_deg < 180:
            raise ValueError(f"normals teacher: fov_deg must be in (0, 180) degrees, got {fov_deg}")
        producer = {**depth.producer, "meaning": "camera_normals", "depth_meaning": depth.meaning, "fov_deg": fov_deg}
        super().__init__(
            depth.model,
            depth.processor,
            modality=modality,
            device=depth.device,
            dtype=depth.dtype,
            meaning="camera_normals",
            producer=producer,
            dtype_reason=depth.dtype_reason,
        )
        self.depth, self.fov_deg = depth, fov_deg

    def forward(self, pixel_values: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.depth.forward(pixel_values)

    def postprocess(self, out: dict[str, torch.Tensor], sizes: list[tuple[int, int]]) -> list[torch.Tensor]:
        return self.from_depth(self.depth.postprocess(out, sizes))

    def from_depth(self, depths: list[torch.Tensor]) -> list[torch.Tensor]:
        """Depth maps (H_i, W_i) of the depth teacher -> normals float32 (H_i, W_i, 3) on the CPU."""
        return [normals_from_depth(depth_for_normals(d, self.depth.meaning), self.fov_deg) for d in depths]


TEACHERS: dict[str, type[Teacher]] = {cls.kind: cls for cls in (DepthTeacher, SemsegTeacher, NormalsTeacher)}
KINDS = tuple(TEACHERS)  # the labelable kinds: those with a teacher class


def _check_image(image: Any, index: int) -> None:
    if not isinstance(image, torch.Tensor) or image.dtype != torch.uint8 or image.ndim != 3 or image.shape[2] != 3:
        desc = f"{type(image).__name__} {getattr(image, 'dtype', '')} {tuple(getattr(image, 'shape', ()))}"
        raise ValueError(f"teacher input image {index}: expected a uint8 tensor (H, W, 3), got {desc}")


# ---------------------------------------------------------------------------------------------------------------------
# loading


def load_teacher(
    kind: str,
    model: str,
    *,
    device: str = "cpu",
    dtype: str | None = None,
    resolution: int | tuple[int, int] | None = None,
    modality: str | None = None,
    fov_deg: float | None = None,
) -> Teacher:
    """Load a teacher from a local folder (``save_pretrained`` layout) or the local Hugging Face cache.

    Args:
        kind: a key of `TEACHERS`: "depth", "semseg" or "normals" (normals run a depth model).
        model: local folder or Hugging Face model id (resolved from the local cache only).
        device: torch device string, e.g. "cpu", "cuda", "cuda:1".
        dtype: "float32" | "bfloat16" | "float16" (autocast); default (None): bfloat16 where the device has bf16
            matrix units (GPUs, CPUs with AMX / AVX512-BF16; see shards.precision), float32 elsewhere.
        resolution: working resolution (h, w) or a square side, overriding the processor's size.
        modality: output modality name; defaults to ``kind``.
        fov_deg: normals only: the horizontal field of view of the assumed pinhole (default `DEFAULT_FOV_DEG`).

    Raises:
        TeacherNotFoundError: the folder / cached id lacks the config or the weights.
        ValueError: bad kind / dtype / resolution / fov_deg, or a checkpoint that is not a ``kind`` model.
    """
    if kind not in TEACHERS:
        raise ValueError(f"unknown teacher kind {kind!r}; expected one of {KINDS}")
    if kind == NormalsTeacher.kind:  # a depth teacher of the same model, its output turned into normals
        depth = load_teacher("depth", model, device=device, dtype=dtype, resolution=resolution)
        assert isinstance(depth, DepthTeacher)
        return NormalsTeacher(depth, fov_deg=fov_deg, modality=modality or kind)
    if fov_deg is not None:
        raise ValueError(f"fov_deg is a setting of normals teachers, not of {kind} teachers")
    cls = TEACHERS[kind]
    torch_device = torch.device(device)
    torch_dtype, dtype_reason = _resolve_dtype(dtype, torch_device)
    source, provenance = _locate(kind, model)

    config = AutoConfig.from_pretrained(source, local_files_only=True)
    bar = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # no "Loading weights" bar per actor
    try:
        net, info = cls.auto_class(config).from_pretrained(source, local_files_only=True, output_loading_info=True)
        processor = AutoImageProcessor.from_pretrained(source, local_files_only=True, **_size_override(resolution))
    except OSError as err:
        raise TeacherNotFoundError(f"{kind} teacher {model!r}: {err}\n{_HOW_TO_GET_WEIGHTS}") from err
    except (ValueError, RuntimeError) as err:  # another task's checkpoint, e.g. a depth model loaded as semseg
        raise ValueError(f"{kind} teacher {model!r} ({config.model_type}) cannot be loaded as {kind}: {err}") from err
    finally:
        if bar:
            hf_logging.enable_progress_bar()
    if info["missing_keys"]:
        missing = sorted(info["missing_keys"])
        raise ValueError(
            f"{kind} teacher {model!r}: the checkpoint has no weights for {len(missing)} parameters of "
            f"{type(net).__name__} (e.g. {missing[0]}); is it a {kind} model?"
        )
    if getattr(processor, "do_center_crop", False) or (
        type(processor).__name__ in DEPTH_RESIZE_MODE and getattr(processor, "do_pad", False)
    ):
        raise ValueError(f"{kind} teacher {model!r}: its processor crops or pads; labels would not align to pixels")

    plain_vit_dpt = config.model_type == "dpt" and not config.is_hybrid and config.backbone_config is None
    if plain_vit_dpt and resolution is not None and len(set(_resolution_of(processor))) != 1:
        raise ValueError(f"{kind} teacher {model!r}: a plain ViT DPT needs a square resolution, got {resolution!r}")
    meaning = cls.meaning_of(config, model)
    producer = {
        "model": model,
        **provenance,
        "resolution": _resolution_of(processor),
        "dtype": str(torch_dtype).removeprefix("torch."),
        "meaning": meaning,
        "library": f"transformers {transformers.__version__}",
        "architecture": type(net).__name__,
        "trained_on": getattr(config, "trained_on", None),  # a narrow training domain, when the model declares one
    }
    return cls(
        net,
        processor,
        modality=modality or kind,
        device=torch_device,
        dtype=torch_dtype,
        meaning=meaning,
        producer=producer,
        dtype_reason=dtype_reason,
    )


_HOW_TO_GET_WEIGHTS = (
    "Teachers load from a local folder written by save_pretrained() or from the local Hugging Face cache "
    f"({hf_constants.HF_HUB_CACHE}); nothing is downloaded at run time. Fetch a hub model once with "
    "`hf download <id>` (or set HF_HOME to a cache that holds it), or use the embedded teachers "
    f"{DEFAULT_TEACHERS['depth']} / {DEFAULT_TEACHERS['semseg']}."
)


def _locate(kind: str, model: str) -> tuple[str, dict]:
    """Resolve ``model`` to a loadable source and its provenance ({"weights_sha256"} or {"revision"})."""
    path = Path(model).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise TeacherNotFoundError(f"{kind} teacher folder {path} has no config.json.\n{_HOW_TO_GET_WEIGHTS}")
        weights = sorted(path.glob("*.safetensors")) or sorted(path.glob("*.bin"))
        if not weights:
            raise TeacherNotFoundError(
                f"{kind} teacher folder {path} has no weights (*.safetensors or *.bin).\n{_HOW_TO_GET_WEIGHTS}"
            )
        return str(path), {"weights_sha256": _sha256(weights)}
    if path.is_absolute() or model.startswith((".", "~")) or model.count("/") > 1:
        raise TeacherNotFoundError(f"{kind} teacher folder {model} does not exist.\n{_HOW_TO_GET_WEIGHTS}")
    try:
        cached = try_to_load_from_cache(model, "config.json")
    except ValueError as err:  # not a valid repo id either
        raise TeacherNotFoundError(f"{kind} teacher {model!r} is neither a folder nor a model id: {err}") from err
    if not isinstance(cached, str):
        raise TeacherNotFoundError(
            f"{kind} teacher {model!r} is not a local folder and not in the local Hugging Face cache.\n"
            f"{_HOW_TO_GET_WEIGHTS}"
        )
    return model, {"revision": Path(cached).parent.name}  # .../snapshots/<commit>/config.json


def _sha256(files: list[Path]) -> str:
    digest = hashlib.sha256()
    for file in files:
        with open(file, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def _resolve_dtype(dtype: str | None, device: torch.device) -> tuple[torch.dtype, str]:
    """(autocast dtype, why): an explicit choice, or bf16 where the device runs it natively (shards.precision)."""
    if dtype is None:
        from shards.precision import autocast_dtype

        return autocast_dtype(device, "auto")
    if dtype not in DTYPES:
        raise ValueError(f"unknown teacher dtype {dtype!r}; expected one of {sorted(DTYPES)}")
    return DTYPES[dtype], f"{dtype} requested"


def _size_override(resolution: int | tuple[int, int] | None) -> dict:
    if resolution is None:
        return {}
    h, w = (resolution, resolution) if isinstance(resolution, int) else tuple(resolution)
    if not (isinstance(h, int) and isinstance(w, int) and h > 0 and w > 0):
        raise ValueError(f"teacher resolution must be a positive int or (h, w), got {resolution!r}")
    return {"size": {"height": h, "width": w}}


def _resolution_of(processor: Any) -> list[int] | dict:
    """Working resolution [h, w] when the processor resizes to a fixed size, else its size rule."""
    size = processor.size
    size = size if isinstance(size, dict) else {k: v for k, v in vars(size).items() if v is not None}
    if size.get("height") and size.get("width"):
        return [int(size["height"]), int(size["width"])]
    return {k: v for k, v in size.items() if v is not None}


def _depth_meaning(config: Any, model: str) -> str:
    """Depth meaning from ``config.depth_meaning`` (set by the embedded teachers) or the model family."""
    meaning = getattr(config, "depth_meaning", None)
    if meaning is not None:
        if meaning not in DEPTH_MEANINGS:
            raise ValueError(f"depth teacher {model!r}: config depth_meaning {meaning!r} not in {DEPTH_MEANINGS}")
        return meaning
    if config.model_type in METRIC_DEPTH_MODEL_TYPES or getattr(config, "depth_estimation_type", None) == "metric":
        return "metric_m"
    return "inverse_relative"
