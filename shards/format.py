"""The aligned per-modality shard format: codecs, names and the manifest.

A sample of modality ``m`` is stored as tar members ``<key>.<m>.<ext>`` (plus ``<key>.<m>.json`` for
depth, holding the per-sample ``depth_range``). Codecs are lossless where it matters:

- ``rgb``     JPEG (quality 95 by default), uint8 (H, W, 3)
- ``depth``   16-bit grayscale PNG; value = lo + png / 65535 * (hi - lo), float32 (H, W)
- ``semseg``  8-bit grayscale PNG of class ids (16-bit above 255 classes), int64 (H, W); id 255
  (`IGNORE_ID`) marks unlabelled pixels, as in NYUv2 and ADE20K exports

Modality names are free (``depth_gt``, ``semseg_gt``, ``depth_dpt`` ...); their kind is the prefix
before the first underscore.
"""

from __future__ import annotations

import io
import json
import re
from typing import Any

import numpy as np
from PIL import Image

from . import fs
from .errors import FormatError, printable, shown
from .images import LABEL_FORMATS, RGB_FORMATS, BadImage, open_image
from .limits import MAX_JSON_BYTES, max_pixels

FORMAT_VERSION = 1
KINDS = ("rgb", "depth", "semseg")
EXTENSIONS = {"rgb": "jpg", "depth": "png", "semseg": "png"}
DEPTH_LEVELS = 65535
IGNORE_ID = 255  # semseg: pixels without a label (the trainer's default ignore_index)
MANIFEST = "manifest.json"
# Names that become paths or tar member names (docs/trust-model.md): ASCII letters, digits, '_' and '-' only,
# so none can hold a dot, a slash or a control character, and a key never starts with '_' (webdataset's '__key__').
KEY_RE = re.compile(r"[A-Za-z0-9-][A-Za-z0-9_-]*")
SHARD_RE = re.compile(r"shard-[0-9]{6,}")
MODALITY_RE = re.compile(r"(?:rgb|depth|semseg)(?:_[A-Za-z0-9][A-Za-z0-9_-]*)?")


def modality_kind(name: str) -> str:
    """'depth_gt' -> 'depth', 'semseg' -> 'semseg', 'rgb' -> 'rgb'."""
    if not isinstance(name, str) or not MODALITY_RE.fullmatch(name):
        raise FormatError(
            f"unknown modality {shown(name)}: names are one of {KINDS}, optionally followed by '_' and "
            "letters, digits, '_' or '-' (e.g. 'depth_gt')"
        )
    return name.split("_", 1)[0]


def shard_name(index: int) -> str:
    return f"shard-{index:06d}"


def check_shard_name(name: Any) -> str:
    """A shard name from a manifest, a stats file or a user: 'shard-' and 6 or more digits, nothing else."""
    if not isinstance(name, str) or not SHARD_RE.fullmatch(name):
        raise FormatError(f"invalid shard name {shown(name)}: shard names are 'shard-' and 6+ digits")
    return name


def check_key(key: Any) -> str:
    if not isinstance(key, str) or not KEY_RE.fullmatch(key):
        raise FormatError(
            f"invalid sample key {shown(key)}: keys are ASCII letters, digits, '_' and '-' "
            "(not starting with '_'), without dots, slashes or spaces"
        )
    return key


# --- codecs ---------------------------------------------------------------------------------------


def encode_rgb(img: np.ndarray, quality: int = 95) -> bytes:
    """(H, W, 3) uint8 -> JPEG bytes (4:2:0 subsampling as PIL's default at this quality)."""
    if img.dtype != np.uint8 or img.ndim != 3 or img.shape[2] != 3:
        raise FormatError(f"rgb must be uint8 (H, W, 3), got {img.dtype} {img.shape}")
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def _open(data: bytes, formats: tuple[str, ...]) -> Image.Image:
    """A shard member's image, through the one safe decode path (allow-listed formats, pixel limit first)."""
    try:
        return open_image(data, formats, max_pixels())
    except BadImage as e:
        raise FormatError(e.reason) from None


def decode_rgb(data: bytes) -> np.ndarray:
    with _open(data, RGB_FORMATS) as im:
        return np.asarray(im.convert("RGB"))


def encode_depth(depth: np.ndarray) -> tuple[bytes, list[float]]:
    """(H, W) float -> (16-bit PNG bytes, [lo, hi]); the range is the per-sample min and max."""
    depth = np.asarray(depth, dtype=np.float32)
    if depth.ndim != 2:
        raise FormatError(f"depth must be (H, W), got {depth.shape}")
    if not np.isfinite(depth).all():
        raise FormatError("depth contains NaN or inf")
    lo, hi = float(depth.min()), float(depth.max())
    scale = (hi - lo) if hi > lo else 1.0
    q = np.rint((depth.astype(np.float64) - lo) / scale * DEPTH_LEVELS).astype(np.uint16)
    buf = io.BytesIO()
    # zlib level 1: depth maps (teacher outputs especially) are noisy in the low bits, so level 6 costs twice
    # the CPU time for 4 % (teacher depth) to 12 % (smooth ground truth) smaller files
    Image.fromarray(q).save(buf, format="PNG", compress_level=1)
    return buf.getvalue(), [lo, hi]


def encode_depth_levels(levels: np.ndarray, step: float) -> tuple[bytes, list[float]]:
    """(H, W) 16-bit levels whose value is level x `step` (e.g. millimetres, step 0.001 m) -> (those levels as
    the PNG, [0, 65535 x step]): lossless, the decoded value is exactly float32(level x step), 0 stays 0."""
    levels = np.asarray(levels)
    if levels.ndim != 2 or levels.dtype != np.uint16:
        raise FormatError(f"depth levels must be uint16 (H, W), got {levels.dtype} {levels.shape}")
    buf = io.BytesIO()
    Image.fromarray(levels).save(buf, format="PNG", compress_level=1)  # level 1: see encode_depth
    return buf.getvalue(), [0.0, DEPTH_LEVELS * step]


def depth_members(modality: str, png: bytes, depth_range: list[float]) -> dict[str, bytes]:
    """The tar members (without the key prefix) of one depth sample: the PNG and its depth_range json."""
    return {f"{modality}.png": png, f"{modality}.json": fs.dumps_json({"depth_range": depth_range})}


def decode_depth(data: bytes, depth_range: list[float]) -> np.ndarray:
    with _open(data, LABEL_FORMATS) as im:
        if im.mode not in ("I;16", "I;16B", "I"):
            raise FormatError(f"depth PNG must be 16-bit grayscale, got mode {im.mode}")
        q = np.asarray(im).astype(np.float64)
    lo, hi = depth_range
    return (lo + q / DEPTH_LEVELS * (hi - lo)).astype(np.float32)


def encode_semseg(ids: np.ndarray, num_classes: int) -> bytes:
    """(H, W) integer class ids -> 8-bit PNG (16-bit when num_classes > 255)."""
    ids = np.asarray(ids)
    if ids.ndim != 2:
        raise FormatError(f"semseg must be (H, W), got {ids.shape}")
    dtype = np.uint8 if num_classes <= 255 else np.uint16
    if ids.size and (ids.min() < 0 or ids.max() > np.iinfo(dtype).max):
        raise FormatError(f"semseg ids out of range for {num_classes} classes: [{ids.min()}, {ids.max()}]")
    buf = io.BytesIO()
    Image.fromarray(ids.astype(dtype)).save(buf, format="PNG")
    return buf.getvalue()


def decode_semseg(data: bytes) -> np.ndarray:
    with _open(data, LABEL_FORMATS) as im:
        if im.mode not in ("L", "I;16", "I;16B", "I", "P"):
            raise FormatError(f"semseg PNG must be single-channel, got mode {im.mode}")
        return np.asarray(im).astype(np.int64)


def parse_cls(data: bytes) -> int:
    """A `cls` member: an ASCII integer."""
    text = data.decode("ascii").strip()
    if not text.lstrip("-").isdigit():
        raise ValueError(f"cls must be an ASCII integer, got {data[:20]!r}")
    return int(text)


def encode_sample(modality: str, value: Any, num_classes: int | None = None, quality: int = 95) -> dict[str, bytes]:
    """Tar members (without the key prefix) for one modality of one sample."""
    kind = modality_kind(modality)
    if kind == "rgb":
        return {f"{modality}.jpg": encode_rgb(value, quality)}
    if kind == "depth":
        return depth_members(modality, *encode_depth(value))
    if num_classes is None:
        raise FormatError(f"encoding {modality!r} needs num_classes")
    return {f"{modality}.png": encode_semseg(value, num_classes)}


def decode_sample(modality: str, members: dict[str, bytes]) -> np.ndarray:
    """Inverse of encode_sample: members keyed by extension, e.g. {'depth.png': ..., 'depth.json': ...}."""
    kind = modality_kind(modality)
    name = f"{modality}.{EXTENSIONS[kind]}"
    if name not in members:
        raise FormatError(f"sample has no member {name!r} (members: {sorted(members)})")
    if kind == "rgb":
        return decode_rgb(members[name])
    if kind == "depth":
        meta = members.get(f"{modality}.json")
        if meta is None:
            raise FormatError(f"depth sample has no {modality}.json with depth_range")
        return decode_depth(members[name], parse_depth_range(meta))
    return decode_semseg(members[name])


def parse_depth_range(meta: bytes) -> list[float]:
    """The [lo, hi] of a depth member's json: two finite numbers, lo <= hi."""
    try:
        rng = json.loads(meta)["depth_range"]
    except (ValueError, TypeError, KeyError, IndexError, RecursionError) as e:
        raise FormatError(f"depth json has no depth_range ({type(e).__name__}: {printable(str(e))})") from None
    numbers = isinstance(rng, list) and len(rng) == 2 and all(type(v) in (int, float) for v in rng)
    if not (numbers and np.isfinite(rng).all() and rng[0] <= rng[1]):
        raise FormatError(f"bad depth_range {shown(rng)}: expected [lo, hi], finite numbers with lo <= hi")
    return [float(v) for v in rng]


# --- json documents: manifest ---------------------------------------------------------------------


def read_json_file(url: str) -> Any:
    """A manifest or stats json; FormatError naming the file when it is too large, not UTF-8 or not JSON."""
    try:
        size = fs.size(url)
    except FileNotFoundError:
        raise FormatError(f"{url} not found") from None
    if size > MAX_JSON_BYTES:
        raise FormatError(
            f"{url}: {size} bytes, over the {MAX_JSON_BYTES}-byte limit of a json file: not a shard set file"
        )
    try:
        return json.loads(fs.read_bytes(url))
    except (ValueError, RecursionError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise FormatError(f"{url}: not valid JSON ({e}): the file is damaged; restore or rebuild it") from None


def _check_manifest(manifest: Any, path: str) -> dict:
    """The manifest's structure, names and counts; FormatError naming the file and the offending value."""

    def bad(what: str) -> FormatError:
        return FormatError(f"{path}: {what}")

    if not isinstance(manifest, dict):
        raise bad(f"expected a JSON object, got {type(manifest).__name__}")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise bad(f"format_version {shown(manifest.get('format_version'))} is not {FORMAT_VERSION}")
    modalities = manifest.get("modalities")
    if not isinstance(modalities, dict):
        raise bad(f"'modalities' must be an object, got {shown(modalities)}")
    for name, entry in modalities.items():
        try:
            kind = modality_kind(name)
        except FormatError as e:
            raise bad(str(e)) from None
        if not isinstance(entry, dict) or entry.get("kind", kind) != kind:
            raise bad(f"modality {name!r}: entry must be an object of kind {kind!r}, got {shown(entry)}")
    shards = manifest.get("shards", [])
    if not isinstance(shards, list):
        raise bad(f"'shards' must be a list, got {shown(shards)}")
    seen = set()
    for entry in shards:
        if not isinstance(entry, dict) or set(entry) < {"name", "count"}:
            raise bad(f"shard entry {shown(entry)} must be an object with 'name' and 'count'")
        try:
            check_shard_name(entry["name"])
        except FormatError as e:
            raise bad(str(e)) from None
        if type(entry["count"]) is not int or entry["count"] < 0:
            raise bad(f"shard {entry['name']}: count {shown(entry['count'])} is not a non-negative integer")
        if entry["name"] in seen:
            raise bad(f"shard {entry['name']} is listed twice")
        seen.add(entry["name"])
    classes = manifest.get("cls_classes")
    if classes is not None and not (isinstance(classes, list) and all(isinstance(c, str) for c in classes)):
        raise bad(f"'cls_classes' must be a list of names, got {shown(classes)}")
    return manifest


def read_manifest(root: str) -> dict:
    """The validated manifest of a shard set: every modality and shard name checked before it becomes a path."""
    path = fs.join(root, MANIFEST)
    if not fs.exists(path):
        raise FormatError(f"{path} not found: is {root} a shard set made by `multimae-shard build`?")
    return _check_manifest(read_json_file(path), path)


def write_manifest(root: str, manifest: dict) -> None:
    fs.write_json_atomic(fs.join(root, MANIFEST), manifest)


def update_manifest(root: str, modalities: dict[str, dict], shards: list[dict] | None = None, **top: Any) -> dict:
    """Merge modality entries (and optionally the shard list / top-level fields) into the manifest, atomically."""
    from . import __version__

    path = fs.join(root, MANIFEST)
    manifest = read_manifest(root) if fs.exists(path) else {"format_version": FORMAT_VERSION, "modalities": {}}
    manifest["modalities"].update(modalities)
    if shards is not None:
        manifest["shards"] = shards
        manifest["total"] = sum(s["count"] for s in shards)
    manifest.update(top)
    manifest["created_by"] = f"multimae-toolkit {__version__}"
    write_manifest(root, manifest)
    return manifest


def modality_entry(modality: str, producer: dict, *, meaning: str, classes: list[str] | None = None) -> dict:
    """A manifest entry for one modality."""
    kind = modality_kind(modality)
    dtype = "uint16" if kind == "depth" or (classes is not None and len(classes) > 255) else "uint8"
    entry = {"kind": kind, "ext": EXTENSIONS[kind], "dtype": dtype, "meaning": meaning, "producer": producer}
    if kind == "semseg":
        if classes is None:
            raise FormatError(f"semseg modality {modality!r} needs its class list")
        entry["classes"] = list(classes)
    return entry
