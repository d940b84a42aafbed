"""Typed settings of the pseudo-labeling job (DESIGN.md section 4), read from a YAML file.

The file is either a Ray cluster-launcher config whose ``metadata:`` section holds the job settings
(``pipelines/pseudolabel.yaml``), or a plain mapping of the same settings. Dotted ``key=value``
overrides are applied on top (values parsed as YAML: ``batch_size=8``, ``shards=[shard-000001]``,
``teachers.semseg=null`` drops a teacher). Everything is validated on load: unknown keys, bad
values, missing teacher weights and missing input shards each raise one `ConfigError` naming the
file, the key and what to do.
"""

from __future__ import annotations

import dataclasses
import os
import re
from dataclasses import dataclass, field
from typing import Any

import yaml

from shards import fs
from shards.format import FormatError, modality_kind, read_manifest
from shards.writer import shard_is_complete

TEACHER_KINDS = ("depth", "semseg")
DEVICES = ("auto", "cpu", "cuda")
DTYPES = (None, "float32", "bfloat16", "float16")


class ConfigError(ValueError):
    """A bad labeling config: the message names the file, the key and the fix."""


@dataclass
class TeacherConfig:
    kind: str  # "depth" | "semseg"
    model: str = "default"  # local path, Hugging Face id in the local cache, or "default"
    resolution: int | list[int] | None = None  # working resolution; None = the model processor's own
    dtype: str | None = None  # None = bfloat16 on GPU, float32 on CPU


@dataclass
class RayConfig:
    address: str | None = None  # None: RAY_ADDRESS or a running `ray start` cluster, else a new local
    # instance; "local": always a new one; "auto" / "host:port": must exist
    num_cpus: int | None = None  # CPUs of a newly started local instance (None = all)


@dataclass
class LabelConfig:
    input: str = "demo_out/data"  # shard set root holding manifest.json and <rgb>/shard-*.tar
    output: str | None = None  # root for the new modalities; None = same as input
    rgb: str = "rgb"  # input modality
    teachers: dict[str, TeacherConfig] = field(
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

    @property
    def output_root(self) -> str:
        return self.output or self.input

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# --- loading --------------------------------------------------------------------------------------


def _parse_override(text: str) -> tuple[list[str], Any]:
    if "=" not in text:
        raise ConfigError(f"override {text!r} is not key=value (e.g. batch_size=8 or teachers.depth.model=PATH)")
    key, value = text.split("=", 1)
    return key.strip().split("."), yaml.safe_load(value) if value.strip() else None


def _apply_override(data: dict, path: list[str], value: Any) -> None:
    node = data
    for part in path[:-1]:
        if not isinstance(node.get(part), dict):
            node[part] = {}
        node = node[part]
    node[path[-1]] = value


def _key(where: str, key: str) -> str:
    return f"{where}.{key}" if where else key


def _build(cls: type, data: Any, where: str) -> Any:
    """Dataclass `cls` from a mapping; unknown keys and wrong types raise ConfigError naming `where.key`."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping, got {type(data).__name__}")
    names = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(names))
    if unknown:
        raise ConfigError(f"{_key(where, unknown[0])}: unknown key (known: {', '.join(names)})")
    kwargs = {}
    for key, value in data.items():
        kwargs[key] = _convert(cls, key, value, _key(where, key))
    try:
        return cls(**kwargs)
    except TypeError as e:
        raise ConfigError(f"{where or 'config'}: {e}") from None


def _convert(cls: type, key: str, value: Any, where: str) -> Any:
    if cls is LabelConfig and key == "teachers":
        if not isinstance(value, dict) or not value:
            raise ConfigError(
                f"{where}: expected a mapping of output modality -> teacher, e.g. {{depth: {{kind: depth}}}}"
            )
        teachers = {}
        for mod, spec in value.items():
            if spec is None:  # `teachers.semseg=null` drops a teacher
                continue
            if isinstance(spec, dict) and "kind" not in spec and str(mod).split("_")[0] in TEACHER_KINDS:
                spec = {"kind": str(mod).split("_")[0], **spec}
            teachers[str(mod)] = _build(TeacherConfig, spec, _key(where, str(mod)))
        return teachers
    if cls is LabelConfig and key == "ray":
        return _build(RayConfig, value or {}, where)
    expected = {f.name: f.type for f in dataclasses.fields(cls)}[key]
    checks = {"int": int, "float": (int, float), "bool": bool, "str": str}
    base = expected.split(" | ")[0]
    if value is None:
        if "None" not in expected:
            raise ConfigError(f"{where}: must not be null")
        return value
    want = checks.get(base)
    if want is not None and (not isinstance(value, want) or (base == "int" and isinstance(value, bool))):
        raise ConfigError(f"{where}: expected {base}, got {value!r}")
    if base == "list[str]" and not (isinstance(value, list) and all(isinstance(v, str) for v in value)):
        raise ConfigError(f"{where}: expected a list of names, got {value!r}")
    return value


def load_config(path: str, overrides: list[str] | tuple[str, ...] = (), *, check_inputs: bool = True) -> LabelConfig:
    """Read `path` (its `metadata:` section if it is a cluster config), apply `key=value` overrides, validate."""
    if not os.path.isfile(path):
        raise ConfigError(f"{path}: config file not found")
    with open(path) as f:
        try:
            doc = yaml.safe_load(f) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(doc, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    where = "metadata" if "metadata" in doc else ""
    data = doc.get("metadata", doc) or {}
    try:
        for text in overrides:
            keys, value = _parse_override(text)
            _apply_override(data, keys, value)
        cfg = _build(LabelConfig, data, where)
        validate(cfg, where, check_inputs=check_inputs)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None
    return cfg


# --- validation -----------------------------------------------------------------------------------


def resolve_model(teacher: TeacherConfig) -> str:
    """The model path or id a teacher loads ("default" = the shipped small teacher of its kind)."""
    if teacher.model == "default":
        from .teachers import DEFAULT_TEACHERS

        return str(DEFAULT_TEACHERS[teacher.kind])
    return teacher.model


def _check_weights(model: str, where: str) -> None:
    if os.path.exists(model):
        if not os.path.isfile(os.path.join(model, "config.json")):
            raise ConfigError(
                f"{where}: {model} has no config.json: not a save_pretrained folder of a transformers model"
            )
        return
    if re.fullmatch(r"[\w.-]+(/[\w.-]+)?", model) and not model.startswith("."):
        from huggingface_hub import try_to_load_from_cache

        if isinstance(try_to_load_from_cache(model, "config.json"), str):
            return
        raise ConfigError(
            f"{where}: weights of {model!r} are not in the local Hugging Face cache; download them "
            f"beforehand (`hf download {model}`) or give a local path"
        )
    raise ConfigError(f"{where}: weights folder {model} not found")


def validate(cfg: LabelConfig, where: str = "", *, check_inputs: bool = True) -> None:
    """Check values, teacher weights and (with `check_inputs`) that every input shard is complete."""
    for key in ("batch_size", "actors", "threads_per_actor", "prefetch"):
        if getattr(cfg, key) < 1:
            raise ConfigError(f"{_key(where, key)}: must be >= 1, got {getattr(cfg, key)}")
    if cfg.max_retries < 0:
        raise ConfigError(f"{_key(where, 'max_retries')}: must be >= 0")
    if cfg.device not in DEVICES:
        raise ConfigError(f"{_key(where, 'device')}: must be one of {DEVICES}, got {cfg.device!r}")
    if not cfg.teachers:
        raise ConfigError(f"{_key(where, 'teachers')}: no teacher configured")
    for mod, t in cfg.teachers.items():
        key = f"{_key(where, 'teachers')}.{mod}"
        if t.kind not in TEACHER_KINDS:
            raise ConfigError(f"{key}.kind: must be one of {TEACHER_KINDS}, got {t.kind!r}")
        try:
            mod_kind = modality_kind(mod)
        except FormatError as e:
            raise ConfigError(f"{key}: {e}") from None
        if mod_kind != t.kind:
            raise ConfigError(f"{key}: output modality {mod!r} is of kind {mod_kind!r} but the teacher is {t.kind!r}")
        if mod == cfg.rgb:
            raise ConfigError(f"{key}: output modality must differ from the input modality {cfg.rgb!r}")
        if t.dtype not in DTYPES:
            raise ConfigError(f"{key}.dtype: must be one of {DTYPES}, got {t.dtype!r}")
        _check_weights(resolve_model(t), f"{key}.model")
    if check_inputs:
        check_input_shards(cfg, where)


def input_shards(cfg: LabelConfig) -> list[dict]:
    """The manifest's shard entries to label ({"name", "count"}), in order."""
    manifest = read_manifest(cfg.input)
    entries = manifest["shards"]
    if cfg.shards is not None:
        by_name = {e["name"]: e for e in entries}
        missing = [n for n in cfg.shards if n not in by_name]
        if missing:
            raise ConfigError(f"shards: {missing[0]} is not in {fs.join(cfg.input, 'manifest.json')}")
        entries = [by_name[n] for n in cfg.shards]
    return entries


def check_input_shards(cfg: LabelConfig, where: str = "") -> None:
    try:
        entries = input_shards(cfg)
    except FormatError as e:
        raise ConfigError(
            f"{_key(where, 'input')}: {e} (make one with `multimae-shard build --src synthetic --out {cfg.input}`)"
        ) from None
    for e in entries:
        if not shard_is_complete(cfg.input, cfg.rgb, e["name"]):
            raise ConfigError(
                f"{_key(where, 'input')}: shard {fs.join(cfg.input, cfg.rgb, e['name'] + '.tar')} is missing or "
                f"incomplete (no stats json)"
            )
