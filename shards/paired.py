"""The `paired` source: ground-truth datasets stored as one folder per modality.

``--modalities rgb=images depth_gt=depth semseg_gt=labels normals_gt=normals`` names each modality and its
folder below ``--root``; the kind comes from the name (``rgb*``, ``depth*``, ``semseg*``, ``normals*`` or any
registered kind) and exactly one is rgb. Files are matched by their relative path without extension
(``images/a/0001.jpg`` with ``depth/a/0001.png``); a sample that one folder lacks is skipped and recorded with
the folder that lacks it. This reads NYUv2, ADE20K, Hypersim, Taskonomy and Omnidata exports, and the official
MultiMAE task-folder layout ``ROOT/<task>/<class>/<file>`` directly (``--class-from-parent`` then gives ``cls``
from the ``<class>`` level, as the folder source does).

- rgb goes through the same safe decoding as every source (`shards.images.load_rgb`).
- depth: 16-bit (or 8-bit) PNG / TIFF levels are stored losslessly, value = level x ``--depth-scale`` (0.001
  for millimetres), 0 stays 0 (= missing); float TIFFs are multiplied by the scale (NaN and inf become 0).
  The manifest meaning is ``--depth-meaning`` (``metric_m`` by default).
- semseg (any class-id kind): 8/16-bit label PNGs hold class ids, 255 (`IGNORE_ID`) = unlabelled; names come
  from ``--semseg-classes FILE`` (one per line, line i = id i), else ``class0 .. classN-1`` with N one more than
  the largest id in the label files (read once before the build). An id outside the list skips the sample.
- normals: 8- or 16-bit RGB PNGs (Taskonomy / Omnidata: n = 2 v / (2^bits - 1) - 1) are stored losslessly, at
  the bit depth they have.
- other value kinds (one channel, e.g. a registered ``edges``): PNG / TIFF values are stored as they are.
- sizes: ``--size S`` brings the shorter side of rgb to S (bicubic, never upscaled); the other modalities
  follow to the same size by nearest neighbour. Without it every modality keeps rgb's native size. A map whose
  aspect ratio differs from its rgb image skips the sample ("size mismatch").
"""

from __future__ import annotations

import math
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from . import fs
from . import modalities as registry
from .format import (
    IGNORE_ID,
    FormatError,
    depth_members,
    encode_depth,
    encode_depth_levels,
    encode_normals_levels,
    encode_semseg,
    member_name,
    modality_kind,
)
from .images import BadImage, load_plane, load_vectors
from .source import (
    ClassList,
    Item,
    Members,
    Refused,
    RgbEncoder,
    Source,
    SourceError,
    SourceSpec,
    encoder_options,
    list_images,
    parent_classes,
    path_key,
    read_image_file,
    unique_keys,
)

DEPTH_MEANINGS = registry.DEPTH.meanings
READABLE_CODECS = ("range16", "ids", "normals")  # the kinds' files this source knows how to read
ASPECT_TOLERANCE = 0.01  # relative difference of width / height between rgb and a depth or label map
SCAN_THREADS = 8  # label files decoded at once when the class count is read from the data


def paired_source(
    root: str,
    encoder: RgbEncoder,
    modalities: dict[str, str],
    *,
    depth_scale: float | None = None,
    depth_meaning: str = "metric_m",
    semseg_classes: str | None = None,
    class_from_parent: bool = False,
    pinned: ClassList | None = None,
) -> Source:
    """One folder per modality below `root`, matched by relative path without extension."""
    order = _modality_order(modalities)
    kinds = {m: modality_kind(m) for m in order}
    _check_options(kinds, depth_scale, depth_meaning, semseg_classes)
    files = {m: stems(root, modalities[m], m) for m in order}
    names = sorted(set().union(*files.values()))
    rgb = order[0]
    refs = [files[rgb].get(s, s) for s in names]
    labels: list[str | None] = [None] * len(names)
    ids: list[int | None] = [None] * len(names)
    cls_classes = None
    if class_from_parent:
        labels, ids, classes = parent_classes(fs.join(root, modalities[rgb]), names, pinned)
        cls_classes = classes.names
    elif pinned is not None:
        raise SourceError("--classes-from with --src paired needs --class-from-parent (the class of each sample)")
    items = []
    for key, stem, ref, cls, label in zip(unique_keys(names), names, refs, ids, labels):
        lacking = [m for m in order if stem not in files[m]]
        if lacking:
            folder = fs.join(root, modalities[lacking[0]])
            loc = Refused(f"missing: no {lacking[0]} file {stem}.* in {folder}")
        else:
            loc = {m: fs.join(root, modalities[m], files[m][stem]) for m in order}
        items.append(Item(key, ref, loc, cls, label))
    semseg = [m for m in order if registry.get(kinds[m]).is_classes]
    class_names = _semseg_names(semseg_classes, items, semseg, encoder.max_pixels) if semseg else None
    options = {
        **encoder_options(encoder),
        "modalities": {m: modalities[m] for m in order},
        "depth_scale": depth_scale,
        "depth_meaning": depth_meaning,
        "semseg_classes": _absolute(semseg_classes),
        "num_semseg_classes": len(class_names) if class_names else None,
        "class_from_parent": class_from_parent,
    }
    maker = PairedMaker(encoder, tuple(order), depth_scale, len(class_names or []), semseg_classes or "the data")
    meanings = {m: depth_meaning if kinds[m] == "depth" else registry.get(kinds[m]).meanings[0] for m in order}
    return Source("paired", root, items, maker, options, tuple(order), cls_classes, class_names, meanings=meanings)


def _modality_order(modalities: dict[str, str]) -> list[str]:
    """The rgb modality first, then the others as given; SourceError unless exactly one is rgb."""
    if not modalities:
        raise SourceError("--src paired needs --modalities NAME=FOLDER ... (e.g. rgb=images depth_gt=depth)")
    try:
        rgb = [m for m in modalities if modality_kind(m) == "rgb"]
    except FormatError as e:
        raise SourceError(f"--modalities: {e}") from None
    if len(rgb) != 1:
        raise SourceError(
            f"--src paired needs exactly one rgb modality in --modalities, got {len(rgb)} ({', '.join(modalities)})"
        )
    return rgb + [m for m in modalities if m != rgb[0]]


def _check_options(
    kinds: dict[str, str], depth_scale: float | None, depth_meaning: str, semseg_classes: str | None
) -> None:
    has = set(kinds.values())
    for m, kind in kinds.items():
        if kind != "rgb" and registry.get(kind).codec not in READABLE_CODECS:
            raise SourceError(
                f"--modalities {m}: --src paired reads {', '.join(READABLE_CODECS)} kinds; {kind} is stored "
                f"with codec {registry.get(kind).codec}"
            )
    if "depth" in has and depth_scale is None:
        raise SourceError(
            "--src paired with a depth modality needs --depth-scale (metres per stored level: 0.001 for "
            "millimetre PNGs, 1 for metres)"
        )
    if depth_scale is not None and ("depth" not in has or not (math.isfinite(depth_scale) and depth_scale > 0)):
        raise SourceError(f"--depth-scale {depth_scale}: needs a depth modality and a positive finite number")
    if depth_meaning not in DEPTH_MEANINGS:
        raise SourceError(f"--depth-meaning {depth_meaning!r}: choose one of {', '.join(DEPTH_MEANINGS)}")
    if semseg_classes is not None and "semseg" not in has:
        raise SourceError("--semseg-classes needs a semseg modality in --modalities")


def stems(root: str, folder: str, modality: str) -> dict[str, str]:
    """{relative path without extension: relative path} of the images in ROOT/folder; SourceError for a
    missing or empty folder and for two files that differ only by extension (they cannot be paired)."""
    url = fs.join(root, folder)
    if not fs.isdir(url):
        raise SourceError(f"--modalities {modality}={folder}: {url} is not a folder")
    out: dict[str, str] = {}
    for rel in list_images(url):
        stem = path_key(rel)
        if stem in out:
            raise SourceError(
                f"{fs.join(url, out[stem])} and {fs.join(url, rel)} differ only by extension: files are paired by "
                "name without extension; keep one"
            )
        out[stem] = rel
    if not out:
        raise SourceError(f"--modalities {modality}={folder}: no image files under {url}")
    return out


def read_class_names(url: str) -> list[str]:
    """Class names, one per line (line i = id i); trailing blank lines ignored, blank lines inside refused."""
    if not fs.exists(url):
        raise SourceError(f"--semseg-classes {url} does not exist")
    try:
        lines = [line.strip() for line in fs.read_bytes(url, limit=2**24).decode("utf-8-sig").splitlines()]
    except UnicodeDecodeError as e:
        raise SourceError(f"--semseg-classes {url} is not UTF-8 text ({e})") from None
    while lines and not lines[-1]:
        lines.pop()
    if not lines or "" in lines:
        where = f"line {lines.index('') + 1} is blank" if lines else "it is empty"
        raise SourceError(f"--semseg-classes {url}: {where}; the file holds one class name per line, id 0 first")
    return lines


def _semseg_names(path: str | None, items: list[Item], modalities: list[str], max_pixels: int) -> list[str]:
    if path is not None:
        return read_class_names(path)
    urls = [it.loc[m] for it in items if not isinstance(it.loc, Refused) for m in modalities]
    with ThreadPoolExecutor(SCAN_THREADS) as pool:
        top = max(pool.map(lambda url: _largest_id(url, max_pixels), urls), default=-1)
    return [f"class{i}" for i in range(top + 1)] or ["class0"]


def _largest_id(url: str, max_pixels: int) -> int:
    """The largest class id (IGNORE_ID aside) of one label file; -1 for an unreadable one (the build skips it)."""
    try:
        ids = load_plane(read_image_file(url), max_pixels)
    except BadImage:
        return -1
    ids = ids[ids != IGNORE_ID]
    return int(ids.max()) if ids.size and ids.dtype.kind in "ui" else -1


def _absolute(url: str | None) -> str | None:
    return os.path.abspath(url) if url is not None and fs.is_local(url) else url


# --- the maker (runs in pool workers) -------------------------------------------------------------


@dataclass(frozen=True)
class PairedMaker:
    """One matched sample -> the members of every modality, all at rgb's stored size."""

    encoder: RgbEncoder
    modalities: tuple[str, ...]  # rgb first
    depth_scale: float | None
    num_classes: int
    classes_origin: str

    def __call__(self, item: Item) -> Members:
        rgb_name = self.modalities[0]
        rgb, orig = self.encoder.load(read_image_file(item.loc[rgb_name]))
        meta = {"source": item.ref, **({"class": item.label} if item.label is not None else {})}
        out = {rgb_name: self.encoder.pack(rgb, orig, meta, item.cls, rgb_name)}
        for m in self.modalities[1:]:
            try:
                out[m] = self.encode(m, read_image_file(item.loc[m]), orig, rgb.shape[:2])
            except BadImage as e:
                category, _, detail = e.reason.partition(":")
                raise BadImage(f"{category}: {m}{':' + detail if detail else ''}") from None
        return out

    def encode(self, modality: str, data: bytes, orig: tuple[int, int], size: tuple[int, int]) -> dict[str, bytes]:
        """One modality's file -> its members at rgb's stored `size`, by the codec of its kind."""
        kind = registry.of(modality)
        if kind.codec == "normals":
            levels = fit(load_vectors(data, self.encoder.max_pixels), orig, size)
            return {member_name(modality): encode_normals_levels(levels)}
        plane = fit(load_plane(data, self.encoder.max_pixels), orig, size)
        if kind.is_classes:
            return self.semseg(modality, plane)
        return self.values(modality, plane, self.depth_scale if kind.kind == "depth" else 1.0)

    def values(self, modality: str, plane: np.ndarray, scale: float) -> dict[str, bytes]:
        """(H, W) stored levels -> members of a 16-bit value map (depth: metres): integers exactly (level x
        scale), floats scaled; negative values refused."""
        if plane.dtype.kind in "ui":
            if plane.size and (plane.min() < 0 or plane.max() > 65535):
                raise BadImage(f"corrupt: {modality} levels [{plane.min()}, {plane.max()}] outside 16 bits")
            return depth_members(modality, *encode_depth_levels(plane.astype(np.uint16), scale))
        values = np.where(np.isfinite(plane), plane.astype(np.float64) * scale, 0.0)  # (H, W)
        if (values < 0).any():
            raise BadImage(f"corrupt: negative {registry.of(modality).kind} {values.min():.4g}")
        return depth_members(modality, *encode_depth(values))

    def semseg(self, modality: str, plane: np.ndarray) -> dict[str, bytes]:
        """(H, W) class ids -> the semseg member; ids outside the class list (IGNORE_ID aside) skip the sample."""
        if plane.dtype.kind not in "ui":
            raise BadImage("not a label map: float values (store class ids in an 8- or 16-bit PNG)")
        ids = plane.astype(np.int64)
        bad = ids[(ids != IGNORE_ID) & ((ids < 0) | (ids >= self.num_classes))]
        if bad.size:
            raise BadImage(
                f"label out of range: id {bad.max() if bad.max() >= self.num_classes else bad.min()} is not among "
                f"the {self.num_classes} classes of {self.classes_origin} (or {IGNORE_ID}, unlabelled)"
            )
        return {f"{modality}.png": encode_semseg(ids, self.num_classes)}


def fit(plane: np.ndarray, orig: tuple[int, int], size: tuple[int, int]) -> np.ndarray:
    """A (h, w) or (h, w, C) map resized by nearest neighbour to `size` (rgb's stored (H, W)); BadImage when its aspect
    ratio differs from rgb's original (h, w) `orig`."""
    (ph, pw), (oh, ow), (h, w) = plane.shape[:2], orig, size
    if abs(pw * oh - ow * ph) > ASPECT_TOLERANCE * ow * ph:
        raise BadImage(f"size mismatch: {pw}x{ph} px, its rgb image {ow}x{oh} px")
    if (ph, pw) == (h, w):
        return plane
    rows = np.minimum(((np.arange(h) + 0.5) * ph / h).astype(np.int64), ph - 1)  # (H,) source row of each row
    cols = np.minimum(((np.arange(w) + 0.5) * pw / w).astype(np.int64), pw - 1)  # (W,)
    return plane[rows[:, None], cols[None, :]]  # (H, W) or (H, W, C)


PAIRED = SourceSpec(
    "paired",
    lambda root, encoder, modalities=None, **options: paired_source(root, encoder, modalities or {}, **options),
    ("modalities", "depth_scale", "depth_meaning", "semseg_classes", "class_from_parent", "classes_from"),
    shuffled=True,
    default_size=None,  # paired data keeps its native size unless --size
)
