"""The model and the teachers behind the demo page, loaded once per server.

`ModelSource(path).get()` gives a `DemoModel`: the pre-trained MultiMAE of a run folder (its `checkpoint.pt`, read
again whenever training writes a newer one) or of a Hub folder written by `multimae-train export`, with what the
page needs to feed it (image size, patch size, tokens per input modality, semseg class names, depth
standardization). `load_teachers()` loads the teachers (depth, semseg, ...) that turn an RGB image into the
model's other inputs: the shipped small teachers, or those of a labeling config.

User-caused problems raise `DemoError` with one line naming the file and what to do.
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass

import torch

from labeling.teachers import DEFAULT_TEACHERS, Teacher
from shards import modalities
from shards.synthetic import GROUND_TRUTH

#: The modalities the page can feed and draw, in registry order: rgb, and every kind the synthetic scenes have
#: ground truth for (a teacher of the kind labels uploads): rgb, depth, semseg, normals.
KINDS = tuple(k for k in modalities.kinds() if k == "rgb" or k in GROUND_TRUTH)


class DemoError(Exception):
    """A problem the user can fix (bad run folder, bad image, teachers that do not fit the model): one line."""


class NoCheckpoint(DemoError):
    """The run folder exists but holds no checkpoint yet (training has not written one)."""


@dataclass
class DemoModel:
    """A pre-trained MultiMAE and what feeding it takes.

    tokens: tokens per input domain at `image_size` (the same grid for every domain: (image_size / patch_size)^2).
    semseg_classes: class names of the semseg input/output (index = id), None when the source does not say.
    standardize_depth: whether depth inputs/targets are robustly standardized (as the trainer does).
    depth_space: the depth space the model was trained in ("depth": larger = farther; or "inverse_depth").
    """

    model: torch.nn.Module
    source: str
    step: int | None
    image_size: int
    patch_size: int
    tokens: dict[str, int]
    semseg_classes: list[str] | None
    standardize_depth: bool
    depth_space: str = "depth"

    @property
    def in_domains(self) -> list[str]:
        return list(self.tokens)

    @property
    def out_domains(self) -> list[str]:
        return [d for d in self.model.output_adapters if d != "norm_rgb"]

    @property
    def grid(self) -> int:
        """Tokens per side of the square token grid."""
        return self.image_size // self.patch_size

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def describe(self) -> str:
        step = f", step {self.step}" if self.step is not None else ""
        per = ", ".join(f"{d} {n}" for d, n in self.tokens.items())
        return (
            f"{self.source}{step}: {self.image_size} px, patch {self.patch_size}, tokens per modality: {per}; "
            f"predicts {', '.join(self.out_domains)}"
        )


def is_hub_folder(path: str) -> bool:
    """A folder written by `save_pretrained` / `multimae-train export` (config.json + model.safetensors)."""
    return os.path.isfile(os.path.join(path, "config.json")) and os.path.isfile(os.path.join(path, "model.safetensors"))


def checkpoint_file(path: str) -> str:
    """The file whose change means a new model: a Hub folder's weights, a run's checkpoint.pt, or the file given."""
    from multimae.train.checkpoints import CHECKPOINT

    if os.path.isdir(path):
        return os.path.join(path, "model.safetensors" if is_hub_folder(path) else CHECKPOINT)
    return path


def load_demo_model(path: str, device: str | torch.device = "cpu") -> DemoModel:
    """The pre-trained MultiMAE of a run folder, a checkpoint file or a Hub folder, in eval mode on `device`."""
    if not os.path.exists(path):
        raise DemoError(f"{path} not found: give a run folder of `multimae-train` (e.g. demo_out/runs/pretrain)")
    if is_hub_folder(path):
        model, step, classes, standardize, space = _from_hub(path)
    else:
        model, step, classes, standardize, space = _from_run(path)
    if type(model).__name__ != "MultiMAE":
        raise DemoError(
            f"{path} holds a fine-tuned {type(model).__name__}: the page needs a pre-training run (objective pretrain)"
        )
    unknown = [d for d in model.input_adapters if d not in KINDS]
    if unknown:
        raise DemoError(f"{path}: the page feeds {', '.join(KINDS)}; the model also takes {', '.join(unknown)}")
    model = model.to(device)
    image_size = int(model.input_adapters[next(iter(model.input_adapters))].image_size[0])
    return DemoModel(
        model=model,
        source=path,
        step=step,
        image_size=image_size,
        patch_size=int(model.patch_size),
        tokens=_token_counts(model, image_size),
        semseg_classes=classes,
        standardize_depth=standardize,
        depth_space=space,
    )


def _from_run(path: str) -> tuple[torch.nn.Module, int, list[str] | None, bool, str]:
    from multimae.interop import CheckpointError
    from multimae.train.checkpoints import load_model

    if not os.path.exists(checkpoint_file(path)):
        raise NoCheckpoint(
            f"{checkpoint_file(path)} does not exist yet: training has not written a checkpoint "
            f"(the page loads it on the next request once it exists)"
        )
    try:
        model, state = load_model(path)
    except (CheckpointError, FileNotFoundError) as e:
        raise DemoError(str(e)) from None
    config = state.get("config", {})
    data = config.get("data", {})
    standardize, space = bool(data.get("standardize_depth", True)), data.get("depth_space", "depth")
    return model, int(state["step"]), state.get("labels", {}).get("semseg"), standardize, space


def _from_hub(path: str) -> tuple[torch.nn.Module, int | None, list[str] | None, bool, str]:
    import json

    import multimae

    with open(os.path.join(path, "config.json")) as f:
        config = json.load(f)
    if config.get("objective", "pretrain") != "pretrain":
        raise DemoError(
            f"{path} holds a fine-tuned model (objective {config['objective']}): the page needs a pre-training run"
        )
    try:
        model = multimae.MultiMAE.from_pretrained(path).eval()
    except (OSError, ValueError, RuntimeError, TypeError) as e:
        raise DemoError(f"{path}: not a MultiMAE Hub folder ({type(e).__name__}: {str(e).splitlines()[0]})") from None
    labels = config.get("semseg_id2label")
    classes = [labels[str(i)] for i in range(len(labels))] if labels else None
    training = config.get("training", {})
    return model, training.get("steps"), classes, True, training.get("depth_space", "depth")


def _token_counts(model: torch.nn.Module, size: int) -> dict[str, int]:
    """Tokens per input domain for a size x size image (values at full size; class ids at 1/stride)."""
    device = next(model.parameters()).device
    with torch.inference_mode():
        tokens, _ = model.tokenize({d: blank_input(d, size).to(device)[None] for d in model.input_adapters})
    return {d: int(t.shape[1]) for d, t in tokens.items()}


def blank_input(kind: str, size: int) -> torch.Tensor:
    """An all-zero input of one kind for a size x size image, as the model takes it (no batch dimension):
    (C, S, S) float values, or (S / stride, S / stride) int64 class ids."""
    rule = modalities.get(kind)
    if rule.is_classes:
        side = size // rule.input_stride
        return torch.zeros(side, side, dtype=torch.long)
    return torch.zeros(rule.channels, size, size)


class ModelSource:
    """The model behind the page: loaded on first use and again whenever its checkpoint file changes.

    So a page started on a run that is still training shows the newest checkpoint on each request.
    """

    def __init__(self, path: str, device: str | torch.device = "cpu") -> None:
        self.path = path
        self.device = device
        self._lock = threading.Lock()
        self._stamp: tuple[int, int, int] | None = None
        self._model: DemoModel | None = None

    def get(self) -> DemoModel:
        """The current model; raises NoCheckpoint / DemoError."""
        with self._lock:
            stamp = _stamp(checkpoint_file(self.path))
            if self._model is None or stamp != self._stamp:
                self._model = load_demo_model(self.path, self.device)
                self._stamp = stamp
            return self._model


def _stamp(path: str) -> tuple[int, int, int] | None:
    """The file's identity: the inode tells a checkpoint renamed into place (as training writes it) from the old
    one even when both have the same size and the clock's tick gave them the same mtime."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_ino, st.st_mtime_ns, st.st_size


# --------------------------------------------------------------------------------------------------- teachers


def load_teachers(config: str | None = None, device: str = "cpu") -> dict[str, Teacher]:
    """One teacher per kind (depth, semseg, normals): the shipped small ones, or those of a labeling config.

    The shipped normals teacher derives normals from the shipped depth teacher (the same network: the page turns
    one depth map into both). With a labeling config (e.g. pipelines/pseudolabel.yaml) its teachers load as the
    labeling job loads them (`resolve_model`, resolution, dtype, `from`, `fov_deg`); where it has two teachers of
    one kind, the first serves.
    """
    from labeling.teachers import NormalsTeacher, load_teacher

    if config is None:
        teachers = {kind: load_teacher(kind, model, device=device) for kind, model in DEFAULT_TEACHERS.items()}
        return {**teachers, "normals": NormalsTeacher(teachers["depth"])}
    from labeling.config import load_label_config, resolve_model

    cfg = load_label_config(config)
    loaded: dict[str, Teacher] = {}  # by output modality
    for modality, t in cfg.teachers.items():
        source = cfg.depth_source(modality)
        if source is not None and source in loaded:  # normals from a depth teacher of the config: one network
            loaded[modality] = NormalsTeacher(loaded[source], fov_deg=t.fov_deg, modality=modality)
            continue
        kw = {"fov_deg": t.fov_deg} if t.kind == "normals" else {}
        loaded[modality] = load_teacher(
            t.kind, resolve_model(t), device=device, dtype=t.dtype, resolution=t.resolution, modality=modality, **kw
        )
    teachers: dict[str, Teacher] = {}
    for modality, teacher in loaded.items():
        teachers.setdefault(cfg.teachers[modality].kind, teacher)
    return teachers


def check_teachers(model: DemoModel, teachers: dict[str, Teacher], where: str = "the shipped teachers") -> None:
    """The teachers cover the model's inputs besides rgb, and the semseg teacher's classes are the model's."""
    for kind in KINDS[1:]:
        if kind in model.tokens and kind not in teachers:
            raise DemoError(f"{where}: no {kind} teacher, but {model.source} takes {kind} input")
    semseg = teachers.get("semseg")
    if semseg is None or "semseg" not in model.tokens:
        return
    n_model = model.model.input_adapters["semseg"].num_classes
    if model.semseg_classes is not None and semseg.classes != model.semseg_classes:
        raise DemoError(
            f"the semseg teacher {semseg.producer['model']} has classes {_short(semseg.classes)} but "
            f"{model.source} was trained on {_short(model.semseg_classes)}; pass --teachers with the labeling "
            f"config that made its data"
        )
    if len(semseg.classes) > n_model:
        raise DemoError(
            f"the semseg teacher {semseg.producer['model']} has {len(semseg.classes)} classes but {model.source} "
            f"takes {n_model}; pass --teachers with the labeling config that made its data"
        )


def _short(names: list[str]) -> str:
    return f"[{', '.join(names[:4])}{', ...' if len(names) > 4 else ''}] ({len(names)})"
