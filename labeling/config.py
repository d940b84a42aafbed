"""Typed settings of the pseudo-labeling job (the reference is docs/labeling.md).

The file is either a Ray cluster-launcher config whose `metadata:` section holds the job settings
(`pipelines/pseudolabel.yaml`), or a plain mapping of the same settings. Dotted `key=value` overrides are
applied on top (values parsed as YAML: `batch_size=8`, `shards=[shard-000001]`, `teachers.semseg=null` drops a
teacher, `teachers.depth.resolution=[384, 384]`, `teachers.normals.from=depth` adds normals derived from the
depth teacher). Loading goes through the toolkit's one config loader (`shards.config`) and reads nothing but
the YAML file; `check_inputs` (called when the job starts, before Ray) checks the teacher weights and the input
shards.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from dataclasses import dataclass, field
from typing import Any, Literal

from shards import fs, modalities
from shards.config import ConfigError, load_config, to_data
from shards.format import FormatError, modality_kind, read_manifest
from shards.fs import MissingBackend
from shards.writer import committed_shards

__all__ = ["ConfigError", "LabelConfig", "RayConfig", "TeacherConfig", "check_inputs", "load_label_config"]

# The labelable kinds: the registry's target kinds (every kind but the input image). Each has a teacher class in
# `labeling.teachers.TEACHERS` (tests/test_normals_teacher.py checks the two agree); that module loads torch and
# transformers, which config checks must not wait for.
TEACHER_KINDS = tuple(k for k in modalities.kinds() if modalities.get(k).dense or modalities.get(k).is_classes)
MODEL_KIND = {"normals": "depth"}  # a normals teacher runs a depth model (labeling.teachers.NormalsTeacher)
DEVICES = ("auto", "cpu", "cuda")


@dataclass
class TeacherConfig:
    kind: Literal[TEACHER_KINDS] | None = None  # null: the output modality's kind (depth_*, semseg_*, normals_*)
    model: str = "default"  # local path, Hugging Face id in the local cache, or "default" (the shipped teacher)
    resolution: int | list[int] | None = None  # working resolution (or [h, w]); null = the processor's own
    dtype: Literal["float32", "bfloat16", "float16"] | None = None  # null: bf16 where matrix units run it fast
    fov_deg: float | None = None  # normals: horizontal field of view of the assumed pinhole; null = 60
    # normals: the depth teacher they come from (YAML key `from`): a depth output modality of this job, or `depth`
    # in a job without a `depth` teacher (this entry's model then runs)
    source: str | None = field(default=None, metadata={"key": "from"})

    def check(self) -> None:
        res = [self.resolution] if isinstance(self.resolution, int) else self.resolution
        if res is not None and (len(res) not in (1, 2) or min(res) <= 0):
            raise ConfigError(f"resolution: a positive size or [height, width], got {self.resolution}")
        if self.fov_deg is not None and not 0 < self.fov_deg < 180:
            raise ConfigError(f"fov_deg: a field of view in degrees, 0 < fov_deg < 180, got {self.fov_deg}")


@dataclass
class RayConfig:
    address: str | None = None  # None: RAY_ADDRESS or a running `ray start` cluster, else a new local instance;
    # "local": always a new one; "auto" / "host:port": must exist
    num_cpus: int | None = None  # CPUs of a newly started local instance (None = all)


@dataclass
class LabelConfig:
    input: str = "demo_out/data"  # shard set root holding manifest.json and <rgb>/shard-*.tar
    output: str | None = None  # root for the new modalities; None = same as input
    rgb: str = "rgb"  # input modality
    teachers: dict[str, TeacherConfig | None] = field(
        default_factory=lambda: {"depth": TeacherConfig("depth"), "semseg": TeacherConfig("semseg")}
    )  # output modality -> teacher
    shards: list[str] | None = None  # subset of shard names; None = all in the manifest
    batch_size: int = 16  # images per teacher forward pass
    device: str = "auto"  # auto = cuda when the cluster has GPUs
    actors: int = 2  # CPU: teacher actors (GPU: one per GPU, this is ignored)
    cpus_per_actor: float = 1.0  # Ray CPU resource per actor
    threads_per_actor: int = 1  # torch intra-op threads per CPU actor (fixed for determinism)
    prefetch: int = 2  # decoded batches queued ahead of inference (bounded memory)
    # host threads of one actor decoding input JPEGs / encoding output PNGs; null: on a GPU, half each of the
    # node's CPUs per GPU (so the host keeps up with the GPU's teachers), on CPU 1 each (the cores run teachers)
    decode_threads: int | None = None
    encode_threads: int | None = None
    decode_device: Literal["auto", "cpu", "cuda"] = "auto"  # input JPEGs: auto = nvJPEG on the actor's GPU
    max_retries: int = 2  # re-runs of a shard whose actor crashed
    progress: bool = True  # print a line per finished shard
    ray: RayConfig = field(default_factory=RayConfig)
    # keyword arguments for the fsspec filesystem of remote input/output (s3://, gs://); credentials come from
    # the backend's environment on every node (docs/object-storage.md)
    storage_options: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        # `teachers.semseg=null` drops a teacher; a teacher without `kind` takes its modality's kind
        self.teachers = {
            mod: dataclasses.replace(t, kind=t.kind or _kind_of(mod)) for mod, t in self.teachers.items() if t
        }

    @property
    def output_root(self) -> str:
        return self.output or self.input

    def to_dict(self) -> dict:
        return to_data(self)

    def check(self) -> None:
        for key in ("batch_size", "actors", "threads_per_actor", "prefetch", "decode_threads", "encode_threads"):
            if getattr(self, key) is not None and getattr(self, key) < 1:
                raise ConfigError(f"{key}: must be >= 1, got {getattr(self, key)}")
        if self.max_retries < 0:
            raise ConfigError("max_retries: must be >= 0")
        if self.device not in DEVICES:
            raise ConfigError(f"device: must be one of {DEVICES}, got {self.device!r}")
        if not self.teachers:
            raise ConfigError("teachers: no teacher configured")
        for mod, t in self.teachers.items():
            key = f"teachers.{mod}"
            try:
                mod_kind = modality_kind(mod)
            except FormatError as e:
                raise ConfigError(f"{key}: {e}") from None
            if mod_kind != t.kind:
                raise ConfigError(
                    f"{key}: output modality {mod!r} is of kind {mod_kind!r} but the teacher is {t.kind!r}"
                )
            if mod == self.rgb:
                raise ConfigError(f"{key}: output modality must differ from the input modality {self.rgb!r}")
            self._check_normals(mod, t)
        if self.shards is not None and len(set(self.shards)) != len(self.shards):
            raise ConfigError("shards: a shard is listed twice")

    def _check_normals(self, mod: str, t: TeacherConfig) -> None:
        """`from` and `fov_deg` belong to normals teachers; `from` names where the depth comes from."""
        key = f"teachers.{mod}"
        if t.kind != "normals":
            if t.source is not None or t.fov_deg is not None:
                raise ConfigError(f"{key}: `from` and `fov_deg` are settings of normals teachers, not of {t.kind}")
            return
        depth_teachers = [m for m, other in self.teachers.items() if other.kind == "depth"]
        if t.source is None:
            raise ConfigError(
                f"{key}.from: a normals teacher needs `from`, the depth teacher its normals come from "
                f"(this job's: {', '.join(depth_teachers) or 'none'}; e.g. from: depth)"
            )
        source = self.teachers.get(t.source)
        if source is None and t.source != "depth":
            raise ConfigError(
                f"{key}.from: {t.source!r} is not a depth teacher of this job (its depth teachers: "
                f"{', '.join(depth_teachers) or 'none'}); `from: depth` without a depth teacher runs this entry's model"
            )
        if source is not None and source.kind != "depth":
            raise ConfigError(f"{key}.from: teachers.{t.source} is a {source.kind} teacher, not a depth teacher")
        if source is not None and (t.model != "default" or t.resolution is not None or t.dtype is not None):
            raise ConfigError(f"{key}: its depth comes from teachers.{t.source}: set model, resolution and dtype there")

    def depth_source(self, modality: str) -> str | None:
        """The depth teacher of this job (its output modality) whose depth the normals teacher `modality` turns
        into normals, so that the depth network runs once for both; None when it runs a depth model of its own."""
        source = self.teachers[modality].source
        return source if source in self.teachers else None


def _kind_of(modality: str) -> str | None:
    kind = modality.split("_", 1)[0]
    return kind if kind in TEACHER_KINDS else None


def load_label_config(path: str, overrides: list[str] | tuple[str, ...] = ()) -> LabelConfig:
    """Read `path` (its `metadata:` section if it is a cluster config) and apply `key=value` overrides."""
    return load_config(LabelConfig, path, overrides, section="metadata")


# --- checks that read files (run when the job starts) ---------------------------------------------


def resolve_model(teacher: TeacherConfig) -> str:
    """The model path or id a teacher loads ("default" = the shipped small teacher of the kind of model it runs)."""
    if teacher.model == "default":
        from .teachers import DEFAULT_TEACHERS

        return str(DEFAULT_TEACHERS[MODEL_KIND.get(teacher.kind, teacher.kind)])
    return teacher.model


def _config_json(model: str, where: str) -> dict:
    """The transformers config.json of a local folder or a model in the local Hugging Face cache."""
    if os.path.exists(model):
        path = os.path.join(model, "config.json")
        if not os.path.isfile(path):
            raise ConfigError(
                f"{where}: {model} has no config.json: not a save_pretrained folder of a transformers model"
            )
    elif re.fullmatch(r"[\w.-]+(/[\w.-]+)?", model) and not model.startswith("."):
        from huggingface_hub import try_to_load_from_cache

        path = try_to_load_from_cache(model, "config.json")
        if not isinstance(path, str):
            raise ConfigError(
                f"{where}: weights of {model!r} are not in the local Hugging Face cache; download them "
                f"beforehand (`hf download {model}`) or give a local path"
            )
    else:
        raise ConfigError(f"{where}: weights folder {model} not found")
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        raise ConfigError(f"{where}: {path} is not readable JSON ({e})") from None


def _check_teacher_kind(config: dict, kind: str, where: str) -> None:
    """A depth (or normals) teacher must be a depth-estimation model, a semseg teacher a segmentation model."""
    from transformers.models.auto import modeling_auto as auto

    model_type = config.get("model_type", "?")
    fits = {
        "depth": set(auto.MODEL_FOR_DEPTH_ESTIMATION_MAPPING_NAMES),
        "semseg": set(auto.MODEL_FOR_UNIVERSAL_SEGMENTATION_MAPPING_NAMES)
        | set(auto.MODEL_FOR_SEMANTIC_SEGMENTATION_MAPPING_NAMES),
    }
    needed = MODEL_KIND.get(kind, kind)
    if needed not in fits:  # a kind registered in shards.modalities without a teacher class
        raise ConfigError(f"{where}: no teacher labels {kind!r} (labeling.teachers.TEACHERS has none for it)")
    if model_type not in fits[needed]:
        other = next((k for k, types in fits.items() if model_type in types), None)
        raise ConfigError(
            f"{where}: a {model_type!r} model ({', '.join(config.get('architectures') or [])}) is "
            f"not a {needed} model" + (f"; did you mean it as the {other} teacher?" if other else "")
        )


def input_shards(cfg: LabelConfig) -> list[dict]:
    """The manifest's shard entries to label ({"name", "count"}), in order."""
    entries = read_manifest(cfg.input)["shards"]
    if cfg.shards is not None:
        by_name = {e["name"]: e for e in entries}
        missing = [n for n in cfg.shards if n not in by_name]
        if missing:
            raise ConfigError(f"shards: {missing[0]} is not in {fs.join(cfg.input, 'manifest.json')}")
        entries = [by_name[n] for n in cfg.shards]
    return entries


def check_inputs(cfg: LabelConfig) -> list[str]:
    """Teacher weights exist and fit their kind; every input shard is complete. Raises ConfigError.

    Returns warnings: a teacher that declares a narrow training domain (`trained_on` in its config, e.g. the
    shipped synthetic teachers) run on data of another source.
    """
    try:
        entries = input_shards(cfg)
        manifest = read_manifest(cfg.input)
    except MissingBackend:
        raise  # one line naming the extra to install; no "make one with ..." hint
    except FormatError as e:
        raise ConfigError(
            f"input: {e} (make one with `multimae-shard build --src synthetic --out {cfg.input}`)"
        ) from None
    source = (manifest["modalities"].get(cfg.rgb, {}).get("producer") or {}).get("source")
    warnings = []
    for mod, t in cfg.teachers.items():
        if t.kind == "normals" and cfg.depth_source(mod) is not None:
            continue  # its model is the depth teacher's, checked under that teacher's key
        where = f"teachers.{mod}.model"
        config = _config_json(resolve_model(t), where)
        _check_teacher_kind(config, t.kind, where)
        domain = config.get("trained_on")
        if domain and source != domain:
            warnings.append(
                f"teachers.{mod}: {resolve_model(t)} was trained on {domain} data only and the input is "
                f"{source or 'of unknown source'}: expect poor labels (set teachers.{mod}.model to a real teacher, "
                "e.g. the paper's)"
            )
    committed = committed_shards(cfg.input, cfg.rgb)
    for e in entries:
        if e["name"] not in committed:
            raise ConfigError(
                f"input: shard {fs.join(cfg.input, cfg.rgb, e['name'] + '.tar')} is missing or "
                "incomplete (no stats json)"
            )
    return warnings
