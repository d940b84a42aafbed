"""The aligned per-modality shard format: codecs, names and the manifest.

A sample of modality ``m`` is stored as tar members ``<key>.<m>.<ext>`` (plus ``<key>.<m>.json`` where its
codec needs a per-sample field, e.g. depth's ``depth_range``). Each kind of `shards.modalities` names its
codec in `CODECS`:

- ``jpeg``     rgb: JPEG (quality 95 by default), uint8 (H, W, 3)
- ``range16``  depth: 16-bit grayscale PNG; value = lo + png / 65535 * (hi - lo), float32 (H, W)
- ``ids``      semseg: 8-bit grayscale PNG of class ids (16-bit above 255 classes), int64 (H, W); id 255
  (`IGNORE_ID`) marks unlabelled pixels, as in NYUv2 and ADE20K exports
- ``normals``  normals: RGB PNG of unit vectors as Taskonomy / Omnidata store them, n = 2 v / 255 - 1 (8-bit,
  the default) or 2 v / 65535 - 1 (16-bit), float32 (H, W, 3) renormalised; v = (0, 0, 0) marks a missing pixel
  and decodes to the zero vector

Modality names are free (``depth_gt``, ``semseg_gt``, ``depth_dpt`` ...); their kind is the prefix
before the first underscore.
"""

from __future__ import annotations

import io
import json
import math
import re
import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
from isal import isal_zlib
from PIL import Image

from . import fs
from . import modalities as registry
from .errors import FormatError, printable, shown
from .images import (
    LABEL_FORMATS,
    RGB_FORMATS,
    BadImage,
    fast_jpeg,
    fast_png,
    load_vectors,
    open_image,
    png_chunk,
)
from .limits import MAX_JSON_BYTES, max_pixels
from .modalities import modality_kind

FORMAT_VERSION = 1
DEPTH_LEVELS = 65535
IGNORE_ID = 255  # semseg: pixels without a label (the trainer's default ignore_index)
MANIFEST = "manifest.json"
# Names that become paths or tar member names (docs/trust-model.md): ASCII letters, digits, '_' and '-' only,
# so none can hold a dot, a slash or a control character, and a key never starts with '_' (webdataset's '__key__').
KEY_RE = re.compile(r"[A-Za-z0-9-][A-Za-z0-9_-]*")
SHARD_RE = re.compile(r"shard-[0-9]{6,}")

__all__ = ["modality_kind"]


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
    """JPEG (or PNG / WebP) bytes -> (H, W, 3) uint8: libjpeg-turbo straight into the array for the JPEGs
    `encode_rgb` writes, Pillow for everything else (`shards.images.fast_jpeg`)."""
    fast = fast_jpeg(data, max_pixels())
    if fast is not None:
        return fast
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
    return _png(q), [lo, hi]


def encode_depth_levels(levels: np.ndarray, step: float) -> tuple[bytes, list[float]]:
    """(H, W) 16-bit levels whose value is level x `step` (e.g. millimetres, step 0.001 m) -> (those levels as
    the PNG, [0, 65535 x step]): lossless, the decoded value is exactly float32(level x step), 0 stays 0."""
    levels = np.asarray(levels)
    if levels.ndim != 2 or levels.dtype != np.uint16:
        raise FormatError(f"depth levels must be uint16 (H, W), got {levels.dtype} {levels.shape}")
    return _png(levels), [0.0, DEPTH_LEVELS * step]


def decode_depth(data: bytes, depth_range: list[float]) -> np.ndarray:
    """16-bit PNG bytes and their [lo, hi] -> (H, W) float32 lo + png / 65535 * (hi - lo)."""
    q = fast_png(data, max_pixels(), bits=(16,))  # the writer's own layout; Pillow for any other PNG
    if q is None:
        with _open(data, LABEL_FORMATS) as im:
            if im.mode not in ("I;16", "I;16B", "I"):
                raise FormatError(f"depth PNG must be 16-bit grayscale, got mode {im.mode}")
            q = np.asarray(im)
    lo, hi = depth_range
    value = q.astype(np.float64)
    value /= DEPTH_LEVELS  # in place, in the order of lo + q / 65535 * (hi - lo): the same float64 values
    value *= hi - lo
    value += lo
    return value.astype(np.float32)


def encode_semseg(ids: np.ndarray, num_classes: int) -> bytes:
    """(H, W) integer class ids -> 8-bit PNG (16-bit when num_classes > 255)."""
    ids = np.asarray(ids)
    if ids.ndim != 2:
        raise FormatError(f"semseg must be (H, W), got {ids.shape}")
    dtype = np.uint8 if num_classes <= 255 else np.uint16
    if ids.size and (ids.min() < 0 or ids.max() > np.iinfo(dtype).max):
        raise FormatError(f"semseg ids out of range for {num_classes} classes: [{ids.min()}, {ids.max()}]")
    return _png(ids.astype(dtype), up=False)


def decode_semseg(data: bytes) -> np.ndarray:
    """8- or 16-bit single-channel PNG bytes -> (H, W) int64 class ids."""
    ids = fast_png(data, max_pixels(), bits=(8, 16))  # the writer's own layout; Pillow for any other PNG
    if ids is None:
        with _open(data, LABEL_FORMATS) as im:
            if im.mode not in ("L", "I;16", "I;16B", "I", "P"):
                raise FormatError(f"semseg PNG must be single-channel, got mode {im.mode}")
            ids = np.asarray(im)
    return ids.astype(np.int64)


def encode_normals(normals: np.ndarray, bits: int = 8) -> bytes:
    """(H, W, 3) float unit vectors -> RGB PNG, v = round((n + 1) / 2 * (2^bits - 1)); a zero vector (missing)
    is stored as v = (0, 0, 0). bits: 8 (Taskonomy / Omnidata's format) or 16 (for sources with more precision)."""
    n = np.asarray(normals, dtype=np.float64)
    if n.ndim != 3 or n.shape[2] != 3:
        raise FormatError(f"normals must be (H, W, 3), got {n.shape}")
    if not np.isfinite(n).all():
        raise FormatError("normals contain NaN or inf")
    if bits not in (8, 16):
        raise FormatError(f"normals are stored in 8 or 16 bits, not {bits}")
    top = 2**bits - 1
    v = np.clip(np.rint((n + 1.0) / 2.0 * top), 0, top)
    v[(n * n).sum(-1) < 0.25] = 0  # |n| < 0.5: no direction, a missing pixel
    return encode_normals_levels(v.astype(np.uint8 if bits == 8 else np.uint16))


def _deflate(raw: bytes) -> bytes:
    """The PNG image data's zlib stream: ISA-L at its level 2."""
    return isal_zlib.compress(raw, 2)


def _png(v: np.ndarray, up: bool = True, deflate: Callable[[bytes], bytes] = _deflate) -> bytes:
    """(H, W) gray or (H, W, 3) RGB, uint8 or uint16 -> PNG bytes: IHDR, one IDAT, IEND (Pillow writes 16-bit
    PNGs of one channel only).

    `up`: every row uses the Up filter (its byte-wise difference from the row above), for smooth maps (depth,
    normals); else no filter, for label maps, whose runs compress as well unfiltered (a reader then has nothing
    to undo). Pillow's encoder picks a filter per row, mostly Paeth on depth maps, and undoing Paeth costs a
    decoder about as much as the inflate; Up undoes in a vectorised loop. The stream is ISA-L's deflate at
    level 2: a third of zlib level 1's CPU time on depth maps for files as small, a tenth of zlib level 6's on
    label maps for files 1 KB larger at 256 px (docs/format.md). Any inflate reads it: it is a standard zlib
    stream.
    """
    h, w = v.shape[:2]
    if h == 0 or w == 0:
        raise FormatError(f"cannot store an empty image {v.shape} as a PNG")
    depth, colour = 8 * v.dtype.itemsize, 0 if v.ndim == 2 else 2
    samples = np.ascontiguousarray(v, dtype=">u2" if depth == 16 else np.uint8).view(np.uint8).reshape(h, -1)
    rows = np.empty((h, 1 + samples.shape[1]), np.uint8)  # each row: filter type, then big-endian samples
    rows[:, 0] = 2 if up else 0  # Up or None
    if up:
        rows[0, 1:] = samples[0]
        np.subtract(samples[1:], samples[:-1], out=rows[1:, 1:])  # modulo 256, as the filter is defined
    else:
        rows[:, 1:] = samples
    header = struct.pack(">IIBBBBB", w, h, depth, colour, 0, 0, 0)  # deflate, adaptive filtering, no interlace
    return (
        b"\x89PNG\r\n\x1a\n"
        + png_chunk(b"IHDR", header)
        + png_chunk(b"IDAT", deflate(rows.data))
        + png_chunk(b"IEND", b"")
    )


def decode_normals(data: bytes) -> np.ndarray:
    """RGB PNG (8 or 16 bits) -> (H, W, 3) float32 unit vectors; v = (0, 0, 0) decodes to the zero vector."""
    v = normals_levels(data)
    n = v.astype(np.float32) * np.float32(2.0 / np.iinfo(v.dtype).max) - 1.0
    norm = np.sqrt((n * n).sum(-1, keepdims=True))
    missing = (v == 0).all(-1, keepdims=True)
    return np.where(missing, 0.0, n / np.maximum(norm, 1e-6)).astype(np.float32)


def normals_levels(data: bytes) -> np.ndarray:
    """The stored (H, W, 3) uint8 or uint16 values of a normals member, through the safe decode path."""
    try:
        return load_vectors(data, max_pixels())
    except BadImage as e:
        raise FormatError(e.reason) from None


def encode_normals_levels(v: np.ndarray) -> bytes:
    """(H, W, 3) uint8 or uint16 stored values (a source's normals file) -> the normals PNG, losslessly."""
    if v.ndim != 3 or v.shape[2] != 3 or v.dtype not in (np.uint8, np.uint16):
        raise FormatError(f"normals levels must be uint8 or uint16 (H, W, 3), got {v.dtype} {v.shape}")
    return _png(v)


def parse_cls(data: bytes) -> int:
    """A `cls` member: an ASCII integer."""
    text = data.decode("ascii").strip()
    if not text.lstrip("-").isdigit():
        raise ValueError(f"cls must be an ASCII integer, got {data[:20]!r}")
    return int(text)


@dataclass(frozen=True)
class Codec:
    """How one kind's samples become tar members and back.

    ext: the image member's extension; dtype: stored dtype (the manifest's, for classes up to 255); meta: the
    field of the per-sample json member it needs, if any; encode(value, options) -> (image bytes, meta value or
    None), options holding `quality` (JPEG), `num_classes` (ids) or `bits` (normals); decode(image bytes, meta
    value or None) -> the decoded array.
    """

    ext: str
    dtype: str
    lossless: bool
    encode: Callable[[Any, dict], tuple[bytes, Any]]
    decode: Callable[[bytes, Any], np.ndarray]
    meta: str | None = None


def _encode_ids(ids: Any, options: dict) -> tuple[bytes, None]:
    if options.get("num_classes") is None:
        raise FormatError("encoding a class-id map needs num_classes")
    return encode_semseg(ids, options["num_classes"]), None


CODECS: dict[str, Codec] = {
    "jpeg": Codec("jpg", "uint8", False, lambda v, o: (encode_rgb(v, o.get("quality", 95)), None),
                  lambda data, _: decode_rgb(data)),
    "range16": Codec("png", "uint16", False, lambda v, o: encode_depth(v), decode_depth, meta="depth_range"),
    "ids": Codec("png", "uint8", True, _encode_ids, lambda data, _: decode_semseg(data)),
    "normals": Codec("png", "uint8", False, lambda v, o: (encode_normals(v, o.get("bits", 8)), None),
                     lambda data, _: decode_normals(data)),
}  # fmt: skip


def codec(modality: str) -> Codec:
    """The codec of a modality name ('depth_gt' -> range16)."""
    name = registry.of(modality).codec
    if name not in CODECS:
        raise FormatError(f"modality {modality!r}: its kind names codec {name!r}, which is not in CODECS")
    return CODECS[name]


def member_name(modality: str) -> str:
    """The image member's suffix of a modality: 'depth_gt' -> 'depth_gt.png'."""
    return f"{modality}.{codec(modality).ext}"


def meta_members(modality: str, image: bytes, meta: Any) -> dict[str, bytes]:
    """The tar members (without the key prefix) of one sample: the image and, where its codec has a per-sample
    field, the json holding it."""
    c = codec(modality)
    members = {f"{modality}.{c.ext}": image}
    if c.meta is not None:
        members[f"{modality}.json"] = fs.dumps_json({c.meta: meta})
    return members


def depth_members(modality: str, png: bytes, depth_range: list[float]) -> dict[str, bytes]:
    """The tar members (without the key prefix) of one depth sample: the PNG and its depth_range json."""
    return meta_members(modality, png, depth_range)


def encode_sample(modality: str, value: Any, num_classes: int | None = None, quality: int = 95, **options: Any
                  ) -> dict[str, bytes]:  # fmt: skip
    """Tar members (without the key prefix) for one modality of one sample."""
    image, meta = codec(modality).encode(value, {"num_classes": num_classes, "quality": quality, **options})
    return meta_members(modality, image, meta)


def decode_sample(modality: str, members: dict[str, bytes]) -> np.ndarray:
    """Inverse of encode_sample: members keyed by extension, e.g. {'depth.png': ..., 'depth.json': ...}."""
    c = codec(modality)
    name = f"{modality}.{c.ext}"
    if name not in members:
        raise FormatError(f"sample has no member {name!r} (members: {sorted(members)})")
    meta = None
    if c.meta is not None:
        raw = members.get(f"{modality}.json")
        if raw is None:
            raise FormatError(f"{registry.of(modality).kind} sample has no {modality}.json with {c.meta}")
        meta = parse_meta(raw, c.meta)
    return c.decode(members[name], meta)


def parse_meta(raw: bytes, field: str) -> Any:
    """The per-sample field of a json member (validated where the toolkit knows the field)."""
    if field == "depth_range":
        return parse_depth_range(raw)
    try:
        return json.loads(raw)[field]
    except (ValueError, TypeError, KeyError, IndexError, RecursionError) as e:
        raise FormatError(f"json member has no {field} ({type(e).__name__}: {printable(str(e))})") from None


def _finite(values: list[int | float]) -> bool:
    """np.isfinite(values).all(), with math's test for plain floats (what json gives): a tenth of numpy's cost."""
    if all(type(v) is float for v in values):
        return all(map(math.isfinite, values))
    return bool(np.isfinite(values).all())  # ints: numpy's conversion decides, as it always has


def parse_depth_range(meta: bytes) -> list[float]:
    """The [lo, hi] of a depth member's json: two finite numbers, lo <= hi."""
    try:
        rng = json.loads(meta)["depth_range"]
    except (ValueError, TypeError, KeyError, IndexError, RecursionError) as e:
        raise FormatError(f"depth json has no depth_range ({type(e).__name__}: {printable(str(e))})") from None
    numbers = isinstance(rng, list) and len(rng) == 2 and all(type(v) in (int, float) for v in rng)
    if not (numbers and _finite(rng) and rng[0] <= rng[1]):
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


def modality_entry(modality: str, producer: dict, *, meaning: str, classes: list[str] | None = None,
                   dtype: str | None = None) -> dict:  # fmt: skip
    """A manifest entry for one modality (dtype: the stored dtype when not the codec's, e.g. 16-bit normals)."""
    kind, c = modality_kind(modality), codec(modality)
    if dtype is None:
        dtype = "uint16" if c.dtype == "uint16" or (classes is not None and len(classes) > 255) else c.dtype
    entry = {"kind": kind, "ext": c.ext, "dtype": dtype, "meaning": meaning, "producer": producer}
    if registry.get(kind).is_classes:
        if classes is None:
            raise FormatError(f"{kind} modality {modality!r} needs its class list")
        entry["classes"] = list(classes)
    return entry
