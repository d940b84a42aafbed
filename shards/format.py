"""The aligned per-modality shard format (DESIGN.md section 2): codecs, names and the manifest.

A sample of modality ``m`` is stored as tar members ``<key>.<m>.<ext>`` (plus ``<key>.<m>.json`` for
depth, holding the per-sample ``depth_range``). Codecs are lossless where it matters:

- ``rgb``     JPEG (quality 95 by default), uint8 (H, W, 3)
- ``depth``   16-bit grayscale PNG; value = lo + png / 65535 * (hi - lo), float32 (H, W)
- ``semseg``  8-bit grayscale PNG of class ids (16-bit above 255 classes), int64 (H, W)

Modality names are free (``depth_gt``, ``semseg_gt``, ``depth_dpt`` ...); their kind is the prefix
before the first underscore.
"""

from __future__ import annotations

import io
import json
from typing import Any

import numpy as np
from PIL import Image

from . import fs

FORMAT_VERSION = 1
KINDS = ("rgb", "depth", "semseg")
EXTENSIONS = {"rgb": "jpg", "depth": "png", "semseg": "png"}
DEPTH_LEVELS = 65535
MANIFEST = "manifest.json"


class FormatError(Exception):
    """A data problem a user can cause (misaligned shards, corrupt member, bad key); names file and key."""


def modality_kind(name: str) -> str:
    """'depth_gt' -> 'depth', 'semseg' -> 'semseg', 'rgb' -> 'rgb'."""
    kind = name.split("_", 1)[0]
    if kind not in KINDS or "." in name or "/" in name:
        raise FormatError(f"unknown modality {name!r}: names must start with one of {KINDS} (e.g. 'depth_gt')")
    return kind


def shard_name(index: int) -> str:
    return f"shard-{index:06d}"


def check_key(key: str) -> str:
    if not key or any(c in key for c in "./\\ \n") or key.startswith("_"):
        raise FormatError(f"invalid sample key {key!r}: keys must be non-empty and contain no dots, slashes or spaces")
    return key


# --- codecs ---------------------------------------------------------------------------------------


def encode_rgb(img: np.ndarray, quality: int = 95) -> bytes:
    """(H, W, 3) uint8 -> JPEG bytes (4:2:0 subsampling as PIL's default at this quality)."""
    if img.dtype != np.uint8 or img.ndim != 3 or img.shape[2] != 3:
        raise FormatError(f"rgb must be uint8 (H, W, 3), got {img.dtype} {img.shape}")
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def decode_rgb(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as im:
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


def decode_depth(data: bytes, depth_range: list[float]) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as im:
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
    with Image.open(io.BytesIO(data)) as im:
        if im.mode not in ("L", "I;16", "I;16B", "I", "P"):
            raise FormatError(f"semseg PNG must be single-channel, got mode {im.mode}")
        return np.asarray(im).astype(np.int64)


def encode_sample(modality: str, value: Any, num_classes: int | None = None, quality: int = 95) -> dict[str, bytes]:
    """Tar members (without the key prefix) for one modality of one sample."""
    kind = modality_kind(modality)
    if kind == "rgb":
        return {f"{modality}.jpg": encode_rgb(value, quality)}
    if kind == "depth":
        png, rng = encode_depth(value)
        return {f"{modality}.png": png, f"{modality}.json": fs.dumps_json({"depth_range": rng})}
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
        return decode_depth(members[name], json.loads(meta)["depth_range"])
    return decode_semseg(members[name])


# --- manifest -------------------------------------------------------------------------------------


def read_manifest(root: str) -> dict:
    path = fs.join(root, MANIFEST)
    if not fs.exists(path):
        raise FormatError(f"{path} not found: is {root} a shard set made by `multimae-shard build`?")
    manifest = fs.read_json(path)
    if manifest.get("format_version") != FORMAT_VERSION:
        raise FormatError(f"{path}: format_version {manifest.get('format_version')} is not {FORMAT_VERSION}")
    return manifest


def write_manifest(root: str, manifest: dict) -> None:
    fs.write_json_atomic(fs.join(root, MANIFEST), manifest)


def update_manifest(root: str, modalities: dict[str, dict], shards: list[dict] | None = None, **top: Any) -> dict:
    """Merge modality entries (and optionally the shard list / top-level fields) into the manifest, atomically."""
    from . import __version__

    path = fs.join(root, MANIFEST)
    manifest = fs.read_json(path) if fs.exists(path) else {"format_version": FORMAT_VERSION, "modalities": {}}
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
