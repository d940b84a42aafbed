"""Cross-modal prediction for the demo page, as plain functions that return numpy arrays (paper, Fig. 1 and 4).

Give a pre-trained MultiMAE a few visible patches of RGB, depth and segmentation and it predicts every modality
in full. The page (`app.py`) is a thin layer over these functions, which work without gradio:

    model = load_demo_model("demo_out/runs/pretrain")
    teachers = load_teachers()
    sample = scene_sample(3)                                  # or upload_sample(open("photo.jpg", "rb").read())
    images = model_inputs(sample, teachers)                   # rgb + pseudo depth / semseg from the teachers
    pred = predict(model, images, {"rgb": 12, "depth": 6, "semseg": 0}, seed=0, targets=sample_targets(sample))
    pred.masks["rgb"]          # (grid, grid) bool, True = masked
    pred.masked_inputs["rgb"]  # (S, S, 3) uint8, masked patches grey
    pred.predictions["depth"]  # (S, S) float32, standardized like the trainer's depth
    pictures(model, pred)      # {"rgb input": (H, W, 3) uint8, ..., "semseg target": ...}

Visible patches are drawn per modality from a `torch.Generator` seeded with `seed`: modality i takes the first
k_i entries of its own random permutation, so a seed fixes the patch order and a larger count only adds patches.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from labeling.teachers import NormalsTeacher, Teacher
from multimae.losses import robust_standardize_depth
from multimae.train.augment import Plan, apply_plan
from multimae.train.data import denormalize_rgb, normalize_rgb, to_tensor
from shards import modalities
from shards.depth_space import to_depth_space
from shards.images import MAX_PIXELS, BadImage, load_rgb
from shards.show import DEPTH_CMAP, normals_picture, palette
from shards.synthetic import GROUND_TRUTH, SEMSEG_CLASSES, render_scene

from .loading import KINDS, DemoError, DemoModel, blank_input

#: The bundled scenes: synthetic world seed 2 (`make demo` trains on seeds 0 and 1), rendered on the fly.
SCENE_SEED = 2
NUM_SCENES = 100
#: Scenes render at least this large (the shipped teachers work at 64 and 128 px), uploads shrink to it.
WORK_SIZE = 256
MIN_SCENE_SIZE = 128
#: Pictures are enlarged (nearest neighbour, whole factors) to at least this side, so patches stay sharp.
DISPLAY_SIZE = 256
MASK_GREY = 128


@dataclass
class Sample:
    """One image and what is known about it, at its own size.

    rgb: (H, W, 3) uint8; truth: exact labels where the source has them ({"depth": (H, W) float32 metres,
    "semseg": (H, W) int64 ids into `truth_classes`, "normals": (H, W, 3) float32}); name: how the page refers
    to it.
    """

    rgb: np.ndarray
    name: str
    truth: dict[str, np.ndarray] = field(default_factory=dict)
    truth_classes: list[str] | None = None


@dataclass
class Prediction:
    """What `predict` returns, every array at the model's image size S (semseg inputs/predictions at S / 4).

    inputs: {domain: what the model was given before masking}: rgb (S, S, 3) uint8, depth (S, S) float32
        (standardized when the model's trainer standardized it), semseg (S/4, S/4) int64.
    masks: {input domain: (grid, grid) bool, True = masked}; visible: {input domain: visible token count}.
    predictions: {output domain: rgb (S, S, 3) uint8, depth (S, S) float32 in the standardized space,
        semseg (S/4, S/4) int64 class ids} (norm_rgb, the per-patch normalized rgb, is left out).
    targets: {domain: rgb (S, S, 3) uint8, depth (S, S) float32 standardized like the predictions, semseg
        (S, S) int64 in the model's class ids, -1 where a target class is not one of the model's}.
    """

    inputs: dict[str, np.ndarray]
    masks: dict[str, np.ndarray]
    visible: dict[str, int]
    predictions: dict[str, np.ndarray]
    targets: dict[str, np.ndarray]

    @property
    def masked_inputs(self) -> dict[str, np.ndarray]:
        """The inputs as the encoder sees them: masked patches grey (rgb), NaN (values) or -1 (class ids)."""
        out = {}
        for d, x in self.inputs.items():
            rule = modalities.get(d)
            fill = MASK_GREY if rule.picture == "image" else -1 if rule.is_classes else np.nan
            out[d] = x.copy()
            out[d][_pixel_mask(self.masks[d], x.shape[0])] = fill
        return out


# ------------------------------------------------------------------------------------------------ samples


def scene_sample(index: int, seed: int = SCENE_SEED, size: int = MIN_SCENE_SIZE) -> Sample:
    """A synthetic scene rendered on the fly, with its exact depth (metres), segmentation and normals."""
    if index < 0:
        raise DemoError(f"scene number must be >= 0, got {index}")
    s = render_scene(seed, index, size)
    truth = {kind: s[f"{kind}_gt"].astype(modalities.get(kind).decoded) for kind in GROUND_TRUTH}
    return Sample(
        rgb=s["rgb"], name=f"scene {index} (synthetic seed {seed})", truth=truth, truth_classes=SEMSEG_CLASSES
    )


def upload_sample(data: bytes, name: str = "upload", max_pixels: int = MAX_PIXELS) -> Sample:
    """An image file's bytes -> Sample (shorter side shrunk to WORK_SIZE); DemoError names why it cannot be read."""
    try:
        rgb, _ = load_rgb(data, size=WORK_SIZE, max_pixels=max_pixels)
    except BadImage as e:
        raise DemoError(f"{name}: cannot use this image ({e.reason})") from None
    return Sample(rgb=rgb, name=name)


def pseudo_labels(rgb: np.ndarray, teachers: Mapping[str, Teacher]) -> dict[str, np.ndarray]:
    """Run each teacher on one (H, W, 3) uint8 image: {"depth": (H, W) float32, "semseg": (H, W) int64, "normals":
    (H, W, 3) float32}. A normals teacher derived from the depth teacher turns its depth map into normals (the
    depth network runs once)."""
    image = torch.from_numpy(np.array(rgb, dtype=np.uint8, order="C"))  # (H, W, 3) uint8, a writable copy
    out: dict[str, torch.Tensor] = {}
    for kind, teacher in sorted(teachers.items(), key=lambda item: isinstance(item[1], NormalsTeacher)):
        if isinstance(teacher, NormalsTeacher) and "depth" in out and teacher.depth is teachers.get("depth"):
            out[kind] = teacher.from_depth([out["depth"]])[0]
        else:
            out[kind] = teacher([image])[0]
    return {kind: label.numpy() for kind, label in out.items()}


def model_inputs(
    sample: Sample,
    teachers: Mapping[str, Teacher],
    from_truth: bool = False,
    kinds: tuple[str, ...] | None = None,
    depth_space: str = "depth",
) -> dict[str, np.ndarray]:
    """{"rgb", "depth", "semseg", ...} for the model: pseudo labels from the teachers, or the sample's ground truth.

    kinds limits which of the kinds besides rgb are made (teachers that are not needed do not run). Depth is
    brought to the model's `depth_space` from what it means (a disparity teacher's output is inverted, as the
    trainer does).
    """
    wanted = [k for k in KINDS[1:] if kinds is None or k in kinds]
    if from_truth:
        missing = [k for k in wanted if k not in sample.truth]
        if missing:
            raise DemoError(f"{sample.name} has no ground-truth {missing[0]}: use the teachers' labels")
        out = {"rgb": sample.rgb, **{k: sample.truth[k] for k in wanted}}
        meaning = "metric_m"
    else:
        out = {"rgb": sample.rgb, **pseudo_labels(sample.rgb, {k: teachers[k] for k in wanted if k in teachers})}
        meaning = getattr(teachers.get("depth"), "meaning", None) or "metric_m"
    if "depth" in out:
        out["depth"] = to_depth_space(out["depth"], meaning, depth_space)
    return out


def sample_targets(sample: Sample, labels: Mapping[str, np.ndarray]) -> tuple[dict[str, np.ndarray], list[str] | None]:
    """What predictions are compared with: the ground truth where the sample has it, else the pseudo `labels`.

    Returns (targets by kind, class names of a ground-truth semseg target or None when it uses the model's ids).
    """
    targets = {"rgb": sample.rgb, **{k: v for k, v in labels.items() if k != "rgb"}}
    targets.update(sample.truth)
    return targets, (sample.truth_classes if "semseg" in sample.truth else None)


# ------------------------------------------------------------------------------------------------ masking


def visible_masks(tokens: Mapping[str, int], visible: Mapping[str, int], seed: int) -> dict[str, torch.Tensor]:
    """{domain: (n,) int64, 1 = masked} with exactly visible[domain] zeros, chosen at random from `seed`.

    Each domain draws one permutation of its n tokens from one generator, in the order of `tokens`, and keeps
    the first k visible: the same seed gives the same patch order whatever the counts.
    """
    g = torch.Generator().manual_seed(int(seed))
    masks = {}
    for domain, n in tokens.items():
        k = int(visible.get(domain, 0))
        if not 0 <= k <= n:
            raise DemoError(f"{domain}: {k} visible tokens asked, the model has {n} (choose 0 to {n})")
        order = torch.randperm(n, generator=g)  # (n,)
        mask = torch.ones(n, dtype=torch.long)
        mask[order[:k]] = 0
        masks[domain] = mask
    if all(int(m.sum()) == m.numel() for m in masks.values()):
        raise DemoError("every modality is fully masked: give at least one visible token")
    return masks


# ------------------------------------------------------------------------------------------------ prediction


def center_box(height: int, width: int) -> tuple[float, float, float, float]:
    """The central square of an image as (top, left, h, w) fractions: resize-shorter-side + center-crop."""
    side = min(height, width)
    return (height - side) / 2 / height, (width - side) / 2 / width, side / height, side / width


def fit(kind: str, value: np.ndarray, size: int) -> torch.Tensor:
    """One modality at any size -> its central square at size x size: rgb (3, S, S) uint8, depth (1, S, S) float32,
    semseg (1, S, S) int64, normals (3, S, S) float32 (each kind resized as the trainer resizes it)."""
    x = to_tensor(kind, value)
    return apply_plan(x, kind, Plan(center_box(*x.shape[-2:]), (size, size)))


def _depth_space(kind: str, x: torch.Tensor, model: DemoModel) -> torch.Tensor:
    """(C, S, S) values -> the space the model reads and predicts: kinds the trainer standardizes (depth) robustly
    standardized, as in training; others as they are."""
    standardize = modalities.get(kind).standardize and model.standardize_depth
    return robust_standardize_depth(x[None])[0] if standardize else x


def model_batch(model: DemoModel, images: Mapping[str, np.ndarray]) -> dict[str, torch.Tensor]:
    """Images at any common size -> the model's batch of one: rgb (1, 3, S, S) normalized, depth (1, 1, S, S),
    semseg (1, S/4, S/4) int64, normals (1, 3, S, S). A domain missing from `images` is filled with zeros (it must
    be fully masked)."""
    S = model.image_size
    batch = {}
    for d in model.in_domains:
        rule = modalities.get(d)
        if d not in images:
            batch[d] = blank_input(d, S)
        elif rule.picture == "image":
            batch[d] = normalize_rgb(fit(d, images[d], S))
        elif not rule.is_classes:
            batch[d] = _depth_space(d, fit(d, images[d], S), model)
        else:
            batch[d] = fit(d, images[d], S // rule.input_stride)[0]
            n_classes = model.model.input_adapters[d].num_classes
            if int(batch[d].max()) >= n_classes:
                raise DemoError(f"semseg input has class id {int(batch[d].max())}; the model knows {n_classes}")
    return {d: v[None].to(model.device) for d, v in batch.items()}


def fit_targets(
    model: DemoModel, targets: Mapping[str, np.ndarray], classes: list[str] | None = None
) -> dict[str, np.ndarray]:
    """Targets at any size -> the model's size and space (see `Prediction.targets`).

    classes: names of the semseg target's ids when they are not the model's (e.g. the synthetic ground truth);
    they are mapped to the model's ids by name.
    """
    S, out = model.image_size, {}
    for kind, value in targets.items():
        x = fit(kind, value, S)
        rule = modalities.get(kind)
        if rule.picture == "image":
            out[kind] = x.permute(1, 2, 0).numpy()  # (S, S, 3) uint8
        elif not rule.is_classes:
            out[kind] = _channels_last(_depth_space(kind, x, model))  # (S, S) or (S, S, C)
        else:
            ids = x[0].numpy()  # (S, S)
            if classes is not None and model.semseg_classes is not None:
                to_model = np.array(
                    [model.semseg_classes.index(c) if c in model.semseg_classes else -1 for c in classes]
                )
                ids = to_model[ids]
            out[kind] = ids
    return out


@torch.inference_mode()
def predict(
    model: DemoModel,
    images: Mapping[str, np.ndarray],
    visible: Mapping[str, int],
    seed: int = 0,
    targets: Mapping[str, np.ndarray] | None = None,
    target_classes: list[str] | None = None,
) -> Prediction:
    """Mask the inputs to `visible` tokens per domain (chosen from `seed`), predict every output domain.

    images: {"rgb": (H, W, 3) uint8, "depth": (H, W) float, "semseg": (H, W) int ids} at any common size;
        a domain may be left out when it gets 0 visible tokens.
    visible: {input domain: visible tokens}, missing = 0.
    targets: what predictions are compared with (default: the images themselves), as in `fit_targets`.
    """
    missing = [d for d in model.in_domains if d not in images and visible.get(d, 0) > 0]
    if missing:
        raise DemoError(f"{missing[0]} has {visible[missing[0]]} visible tokens but no {missing[0]} input")
    masks = visible_masks(model.tokens, visible, seed)
    batch = model_batch(model, images)
    preds, _ = model.model(batch, task_masks={d: m[None].to(model.device) for d, m in masks.items()})
    inputs = {}
    for d, x in batch.items():
        x = x[0].cpu()
        rule = modalities.get(d)
        if rule.picture == "image":
            inputs[d] = (denormalize_rgb(x) * 255).round().byte().permute(1, 2, 0).numpy()  # (S, S, 3) uint8
        else:
            inputs[d] = x.numpy() if rule.is_classes else _channels_last(x)
    return Prediction(
        inputs=inputs,
        masks={d: m.view(model.grid, model.grid).bool().numpy() for d, m in masks.items()},
        visible={d: int((m == 0).sum()) for d, m in masks.items()},
        predictions=_outputs(preds),
        targets=fit_targets(model, images if targets is None else targets, target_classes),
    )


def _outputs(preds: Mapping[str, torch.Tensor]) -> dict[str, np.ndarray]:
    """Model outputs of a batch of one -> numpy (see `Prediction.predictions`)."""
    out = {}
    for d, p in preds.items():
        rule = modalities.find(d)
        if rule is None:  # norm_rgb
            continue
        p = p[0].float().cpu()
        if rule.picture == "image":
            out[d] = (denormalize_rgb(p) * 255).round().byte().permute(1, 2, 0).numpy()  # (S, S, 3)
        elif rule.is_classes:
            out[d] = p.argmax(0).numpy()  # (K, S/4, S/4) -> (S/4, S/4)
        else:
            out[d] = _channels_last(p)  # (S, S), or (S, S, C)
    return out


def _channels_last(x: torch.Tensor) -> np.ndarray:
    """(C, S, S) values -> (S, S) for one channel, (S, S, C) for more (normals)."""
    return x[0].numpy() if x.shape[0] == 1 else x.permute(1, 2, 0).numpy()


# ------------------------------------------------------------------------------------------------ pictures


def pictures(model: DemoModel, pred: Prediction, display: int = DISPLAY_SIZE) -> dict[str, np.ndarray]:
    """(H, W, 3) uint8 pictures, keyed "<domain> input" (masked patches grey), "<domain> prediction",
    "<domain> target", each by its kind's picture rule: rgb as is, depth colour-mapped over the target's range,
    semseg in the toolkit palette, normals as normal-map colours."""
    S = model.image_size
    factor = max(1, math.ceil(display / S))
    n_classes = model.model.output_adapters["semseg"].num_channels if "semseg" in model.out_domains else None
    if n_classes is None and "semseg" in model.tokens:
        n_classes = model.model.input_adapters["semseg"].num_classes
    depth_range = _range(pred.targets.get("depth", pred.predictions.get("depth")))
    out = {}
    for what, arrays in (("input", pred.inputs), ("prediction", pred.predictions), ("target", pred.targets)):
        for d in KINDS:
            if d not in arrays or (what == "target" and d not in pred.predictions):
                continue
            img = _picture(d, arrays[d], S, n_classes, depth_range if what != "input" else _range(arrays[d]))
            if what == "input":
                img[_pixel_mask(pred.masks[d], S)] = MASK_GREY
            out[f"{d} {what}"] = img.repeat(factor, 0).repeat(factor, 1)
    return out


def _range(depth: np.ndarray | None) -> tuple[float, float]:
    return (0.0, 1.0) if depth is None else (float(depth.min()), float(depth.max()))


def _pixel_mask(mask: np.ndarray, size: int) -> np.ndarray:
    """(grid, grid) token mask -> (size, size) pixel mask."""
    return mask.repeat(size // mask.shape[0], 0).repeat(size // mask.shape[1], 1)


def _picture(
    kind: str, x: np.ndarray, size: int, n_classes: int | None, depth_range: tuple[float, float]
) -> np.ndarray:
    """One modality -> (size, size, 3) uint8."""
    picture = modalities.get(kind).picture
    if picture == "image":
        return x.copy()
    if picture == "normals":
        v = np.nan_to_num(x)  # masked input patches are NaN (painted grey afterwards); predictions are not unit
        return normals_picture(v / np.maximum(np.linalg.norm(v, axis=-1, keepdims=True), 1e-6))
    if picture == "colormap":
        import matplotlib

        lo, hi = depth_range
        rgba = matplotlib.colormaps[DEPTH_CMAP](np.clip((x - lo) / max(hi - lo, 1e-6), 0, 1))  # (S, S, 4)
        return (rgba[..., :3] * 255).round().astype(np.uint8)
    ids = torch.from_numpy(np.ascontiguousarray(x))[None, None].float()
    ids = F.interpolate(ids, size=(size, size), mode="nearest")[0, 0].long().numpy()  # (S, S)
    colours = np.concatenate([(palette(n_classes or int(ids.max()) + 1) * 255).round(), [[0, 0, 0]]])
    return colours[ids].astype(np.uint8)  # id -1 (a class the model lacks) is black
