"""Typed settings of the pseudo-labeling job (the reference is docs/labeling.md).

The file is either a Ray cluster-launcher config whose `metadata:` section holds the job settings
(`pipelines/pseudolabel.yaml`), or a plain mapping of the same settings. Dotted `key=value` overrides are
applied on top (values parsed as YAML: `batch_size=8`, `shards=[shard-000001]`, `teachers.semseg=null` drops a
teacher, `teachers.depth.resolution=[384, 384]`). Loading goes through the toolkit's one config loader
(`shards.config`) and reads nothing but the YAML file; `check_inputs` (called when the job starts, before Ray)
checks the teacher weights and the input shards.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from dataclasses import dataclass, field
from typing import Any, Literal

from shards import fs
from shards.config import ConfigError, load_config
from shards.format import FormatError, modality_kind, read_manifest
from shards.fs import MissingBackend
from shards.writer import committed_shards

__all__ = ["ConfigError", "LabelConfig", "RayConfig", "TeacherConfig", "check_inputs", "load_label_config"]

TEACHER_KINDS = ("depth", "semseg")
DEVICES = ("auto", "cpu", "cuda")


@dataclass
class TeacherConfig:
    kind: Literal["depth", "semseg"] | None = None  # null: the output modality's kind (depth_*, semseg_*)
    model: str = "default"  # local path, Hugging Face id in the local cache, or "default" (the shipped teacher)
    resolution: int | list[int] | None = None  # working resolution (or [h, w]); null = the processor's own
    dtype: Literal["float32", "bfloat16", "float16"] | None = None  # null: bf16 where matrix units run it fast

    def check(self) -> None:
        res = [self.resolution] if isinstance(self.resolution, int) else self.resolution
        if res is not None and (len(res) not in (1, 2) or min(res) <= 0):
            raise ConfigError(f"resolution: a positive size or [height, width], got {self.resolution}")


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
        return dataclasses.asdict(self)

    def check(self) -> None:
        for key in ("batch_size", "actors", "threads_per_actor", "prefetch"):
            if getattr(self, key) < 1:
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
        if self.shards is not None and len(set(self.shards)) != len(self.shards):
            raise ConfigError("shards: a shard is listed twice")


def _kind_of(modality: str) -> str | None:
    kind = modality.split("_", 1)[0]
    return kind if kind in TEACHER_KINDS else None


def load_label_config(path: str, overrides: list[str] | tuple[str, ...] = ()) -> LabelConfig:
    """Read `path` (its `metadata:` section if it is a cluster config) and apply `key=value` overrides."""
    return load_config(LabelConfig, path, overrides, section="metadata")


# --- checks that read files (run when the job starts) ---------------------------------------------


def resolve_model(teacher: TeacherConfig) -> str:
    """The model path or id a teacher loads ("default" = the shipped small teacher of its kind)."""
    if teacher.model == "default":
        from .teachers import DEFAULT_TEACHERS

        return str(DEFAULT_TEACHERS[teacher.kind])
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
    """A depth teacher must be a depth-estimation model, a semseg teacher a segmentation model."""
    from transformers.models.auto import modeling_auto as auto

    model_type = config.get("model_type", "?")
    fits = {
        "depth": set(auto.MODEL_FOR_DEPTH_ESTIMATION_MAPPING_NAMES),
        "semseg": set(auto.MODEL_FOR_UNIVERSAL_SEGMENTATION_MAPPING_NAMES)
        | set(auto.MODEL_FOR_SEMANTIC_SEGMENTATION_MAPPING_NAMES),
    }[kind]
    if model_type not in fits:
        other = next((k for k in TEACHER_KINDS if k != kind), "")
        raise ConfigError(
            f"{where}: a {model_type!r} model ({', '.join(config.get('architectures') or [])}) is "
            f"not a {kind} model; did you mean it as the {other} teacher?"
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
