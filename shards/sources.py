"""The sources of `multimae-shard build`: imagenet, folder, paired, webdataset, synthetic.

A source does two things, split so that only small objects cross process boundaries:

- in the main process it enumerates its samples in a fixed order (sorted paths, tar order, scene index)
  as small picklable `Item`s, which `open_source` then permutes with a seeded shuffle (on by default for
  the file sources, whose sorted order is class order): sample i of the final order goes to shard
  i // shard_size, whatever the worker count; an item whose `loc` is `Refused` is recorded as skipped;
- its `maker` (a small picklable callable, run in pool workers) turns one item into the tar members
  of every modality, or raises `BadImage` with a reason, which the build records as a skip.

Keys are deterministic and dot-free. File sources derive them from the relative path without its
extension, '/' -> '-' and any character outside [A-Za-z0-9_-] -> '_' (``n01440764/n01440764_10026.JPEG``
-> ``n01440764-n01440764_10026``); webdataset sources from the input key the same way; a key that
repeats gets ``-1``, ``-2``, ... in enumeration order. Synthetic keys come from `synthetic.scene_key`.
"""

from __future__ import annotations

import hashlib
import json
import os
import posixpath
import random
import re
import tarfile
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import numpy as np

from . import __version__, fs, limits
from .errors import printable
from .format import FormatError, encode_rgb, encode_sample, modality_entry, read_manifest
from .images import MAX_PIXELS, BadImage, load_rgb
from .modalities import of
from .tars import header_problem, next_member, open_tar

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff", ".ppm", ".pgm", ".pnm")
SOURCES = ("imagenet", "folder", "paired", "webdataset", "synthetic")
SHUFFLED = ("imagenet", "folder", "paired")  # sources whose sample order is shuffled unless told otherwise
Members = dict[str, dict[str, bytes]]  # modality -> {"rgb.jpg": ..., "cls": ..., "json": ...}


class SourceError(FormatError):
    """A source a user pointed at that cannot be read (missing root, no images, bad tar); names the path."""


class Item(NamedTuple):
    """One sample of a source, as enumerated in the main process."""

    key: str  # the output key
    ref: str  # where it came from, for the sample json and skip records (relative path, tar:member, ...)
    loc: Any  # source-specific: file URL, (tar URL, {ext: ...}), scene index, or Refused(reason)
    cls: int | None = None
    label: str | None = None  # class name (wnid / folder) when the source has classes


class Refused(NamedTuple):
    """The `loc` of an item known at enumeration to be unusable (no label row, a modality's file missing):
    the build records it as skipped with `reason`, like an unreadable file."""

    reason: str


@dataclass
class ClassList:
    """Class names in index order and where they came from, to say which list an unknown class is missing from."""

    names: list[str]
    origin: str

    def __post_init__(self) -> None:
        self._index = {c: i for i, c in enumerate(self.names)}

    def index(self, label: str, where: str) -> int:
        """The index of `label`; SourceError naming `where` (the file or folder) when the list lacks it."""
        if label not in self._index:
            raise SourceError(f"{where}: class {label!r} is not among the {len(self.names)} classes of {self.origin}")
        return self._index[label]


def classes_from_data(data: str) -> ClassList:
    """The `cls_classes` of another shard set's manifest (`--classes-from DATA`), to build with its class indices."""
    manifest = read_manifest(data)
    names = manifest.get("cls_classes")
    if not names:
        raise SourceError(
            f"{fs.join(data, 'manifest.json')} has no cls_classes: --classes-from needs a shard set built from "
            "a source with classes (imagenet, folder --class-from-parent)"
        )
    return ClassList(list(names), f"--classes-from {fs.join(data, 'manifest.json')}")


# --- keys -----------------------------------------------------------------------------------------


def sanitize_key(name: str) -> str:
    """'a/b c.d' -> 'a-b_c_d'; never empty, never starting with '_' (webdataset reserves '__...')."""
    key = re.sub(r"[^A-Za-z0-9_-]", "_", name.replace("/", "-"))
    return key if key and not key.startswith("_") else f"k{key}"


def unique_keys(names: list[str]) -> list[str]:
    """Sanitised keys for names in order; a repeated key gets -1, -2, ... (deterministic)."""
    seen: set[str] = set()
    out = []
    for name in names:
        key = base = sanitize_key(name)
        n = 0
        while key in seen:
            n += 1
            key = f"{base}-{n}"
        seen.add(key)
        out.append(key)
    return out


def path_key(rel: str) -> str:
    """Relative path -> key stem (extension removed)."""
    return posixpath.splitext(rel)[0]


# --- listing --------------------------------------------------------------------------------------


def _fs_root(root: str):
    if not fs.exists(root):
        raise SourceError(f"source root {root} does not exist")
    filesystem, path = fs.filesystem(root)
    if not filesystem.isdir(path):
        raise SourceError(f"source root {root} is not a folder")
    return filesystem, path.rstrip("/")


def _hidden(rel: str) -> bool:
    return any(part.startswith(".") for part in rel.split("/"))


def list_images(root: str) -> list[str]:
    """Sorted relative paths (with '/') of every image file under root, hidden files and folders excluded."""
    filesystem, path = _fs_root(root)
    rels = (posixpath.relpath(p, path) for p in filesystem.find(path, withdirs=False))
    return sorted(r for r in rels if r.lower().endswith(IMAGE_EXTS) and not _hidden(r))


def list_subdirs(root: str) -> list[str]:
    filesystem, path = _fs_root(root)
    dirs = (e["name"] for e in filesystem.ls(path, detail=True) if e["type"] == "directory")
    return sorted(n for n in (posixpath.basename(d.rstrip("/")) for d in dirs) if not n.startswith("."))


# --- makers (run in pool workers) -----------------------------------------------------------------


@dataclass(frozen=True)
class RgbEncoder:
    """Image bytes -> the rgb members: JPEG at shorter side `size` (None: native size), `cls`, sample json."""

    size: int | None
    quality: int = 95
    max_pixels: int = MAX_PIXELS

    def load(self, data: bytes) -> tuple[np.ndarray, tuple[int, int]]:
        """((H, W, 3) uint8 at the stored size, original (h, w)); BadImage when the bytes are no usable image."""
        return load_rgb(data, self.size, self.max_pixels)

    def pack(self, rgb: np.ndarray, orig: tuple[int, int], meta: dict, cls: int | None, name: str = "rgb") -> dict:
        """The members of modality `name` for a decoded (H, W, 3) image."""
        out = {f"{name}.jpg": encode_rgb(rgb, self.quality), "json": fs.dumps_json({**meta, "orig_size": list(orig)})}
        if cls is not None:
            out["cls"] = str(cls).encode()
        return out

    def members(self, data: bytes, meta: dict, cls: int | None) -> Members:
        return {"rgb": self.pack(*self.load(data), meta, cls)}


def read_image_file(url: str) -> bytes:
    """A source image file's bytes: regular files only (a FIFO or a link to /dev/zero is refused unopened),
    at most the member limit (shards.limits), else BadImage with the reason."""
    limit = limits.max_member_bytes()
    try:
        return fs.read_bytes(url, limit=limit)
    except fs.NotRegularFile as e:
        raise BadImage(f"not a regular file: {e.kind}") from None
    except FormatError:
        raise BadImage(f"too large: over the {limit}-byte file limit (MULTIMAE_MAX_MEMBER_BYTES)") from None
    except OSError as e:
        raise BadImage(f"unreadable: {e}") from None


@dataclass(frozen=True)
class FileMaker:
    encoder: RgbEncoder
    label_field: str  # "wnid" for imagenet, "class" for folder

    def __call__(self, item: Item) -> Members:
        data = read_image_file(item.loc)
        meta: dict[str, Any] = {"source": item.ref}
        if item.label is not None:
            meta[self.label_field] = item.label
        return self.encoder.members(data, meta, item.cls)


@dataclass(frozen=True)
class TarSampleMaker:
    """Reads one sample's members from an input tar by byte range; only image/cls/txt/json are ever decoded."""

    encoder: RgbEncoder

    def __call__(self, item: Item) -> Members:
        url, ranges = item.loc
        refused = [reason for reason in ranges.values() if isinstance(reason, str)]
        if refused:
            raise BadImage(f"refused member: {printable(refused[0])}")
        image_ext = next((e for e in IMAGE_EXTS if e[1:] in ranges), None)
        if image_ext is None:
            raise BadImage(f"no image member (has {sorted(ranges)})")
        try:
            with fs.open_file(url, "rb") as f:
                raw = {}
                for ext in (image_ext[1:], "cls", "txt", "json"):
                    if ext in ranges:
                        offset, size = ranges[ext]
                        f.seek(offset)
                        raw[ext] = f.read(size)
        except OSError as e:
            raise BadImage(f"unreadable: {e}") from None
        meta: dict[str, Any] = {"source": item.ref}
        cls = None
        if "cls" in raw:
            text = raw["cls"].decode("ascii", "replace").strip()
            if not re.fullmatch(r"\d+", text):
                raise BadImage(f"corrupt: cls member is not an integer: {text[:20]!r}")
            cls = int(text)
        if "txt" in raw:
            meta["caption"] = raw["txt"].decode("utf-8", "replace")
        if "json" in raw:
            try:
                meta["meta"] = json.loads(raw["json"])
            except ValueError as e:
                raise BadImage(f"corrupt: json member: {e}") from None
        return self.encoder.members(raw[image_ext[1:]], meta, cls)


@dataclass(frozen=True)
class SceneMaker:
    """Renders synthetic scene `index` into rgb (+cls, json), depth_gt and semseg_gt members."""

    seed: int
    size: int
    quality: int = 95
    normals: bool = False  # also normals_gt

    def __call__(self, item: Item) -> Members:
        from . import synthetic

        scene = synthetic.render_scene(self.seed, item.loc, self.size)
        meta = {"source": "synthetic", "seed": self.seed, "index": item.loc, "orig_size": [self.size, self.size]}
        rgb = {
            "rgb.jpg": encode_rgb(scene["rgb"], self.quality),
            "cls": str(int(scene["cls"])).encode(),
            "json": fs.dumps_json(meta),
        }
        out = {
            "rgb": rgb,
            "depth_gt": encode_sample("depth_gt", scene["depth_gt"]),
            "semseg_gt": encode_sample("semseg_gt", scene["semseg_gt"], num_classes=len(synthetic.SEMSEG_CLASSES)),
        }
        if self.normals:
            out["normals_gt"] = encode_sample("normals_gt", scene["normals_gt"])
        return out


# --- sources --------------------------------------------------------------------------------------


@dataclass
class Source:
    """An enumerated source: items in build order, the maker that encodes one item, manifest facts."""

    name: str
    root: str | None
    items: list[Item]
    maker: Callable[[Item], Members]
    options: dict
    modalities: tuple[str, ...] = ("rgb",)
    cls_classes: list[str] | None = None
    semseg_classes: list[str] | None = None
    meanings: dict[str, str] = field(default_factory=lambda: {"rgb": "image"})

    def __len__(self) -> int:
        return len(self.items)

    def producer(self) -> dict:
        return {"source": self.name, "root": self.root, "options": self.options, "code_version": __version__}

    def modality_entries(self) -> dict[str, dict]:
        producer = self.producer()
        return {
            m: modality_entry(
                m, producer, meaning=self.meanings[m], classes=self.semseg_classes if of(m).is_classes else None
            )
            for m in self.modalities
        }


def parent_classes(root: str, rels: list[str], pinned: ClassList | None) -> tuple[list[str], list[int], ClassList]:
    """--class-from-parent: (parent folder of each path, its class index, the class list: `pinned` or the
    sorted parents); SourceError for a file without a parent folder or a parent `pinned` lacks."""
    top = [r for r in rels if "/" not in r]
    if top:
        raise SourceError(f"--class-from-parent: {fs.join(root, top[0])} has no parent folder below {root}")
    labels = [posixpath.dirname(r) for r in rels]
    classes = pinned or ClassList(sorted(set(labels)), root)
    return labels, [classes.index(lab, fs.join(root, r)) for lab, r in zip(labels, rels)], classes


def folder_source(
    root: str, encoder: RgbEncoder, class_from_parent: bool = False, pinned: ClassList | None = None
) -> Source:
    """Any tree of images; with class_from_parent the class is the parent folder (relative path)."""
    rels = list_images(root)
    if not rels:
        raise SourceError(f"no image files ({', '.join(IMAGE_EXTS)}) found under {root}")
    keys = unique_keys([path_key(r) for r in rels])
    if not class_from_parent:
        if pinned is not None:
            raise SourceError("--classes-from with --src folder needs --class-from-parent (the class of each image)")
        items = [Item(k, r, fs.join(root, r)) for k, r in zip(keys, rels)]
        return Source("folder", root, items, FileMaker(encoder, "class"), _folder_options(encoder, False))
    labels, ids, classes = parent_classes(root, rels, pinned)
    items = [Item(k, r, fs.join(root, r), i, lab) for k, r, i, lab in zip(keys, rels, ids, labels)]
    options = _folder_options(encoder, True)
    return Source("folder", root, items, FileMaker(encoder, "class"), options, cls_classes=classes.names)


def _folder_options(encoder: RgbEncoder, class_from_parent: bool) -> dict:
    return {**encoder_options(encoder), "class_from_parent": class_from_parent}


def _split_member(name: str) -> tuple[str, str] | None:
    """'dir/000123.rgb.jpg' -> ('dir/000123', 'rgb.jpg') as webdataset splits (at the basename's first dot)."""
    m = re.match(r"^((?:.*/|)[^./]+)\.([^/]*)$", name)
    return (m.group(1), m.group(2).lower()) if m else None


def scan_tar(url: str) -> list[tuple[str, dict[str, tuple[int, int] | str]]]:
    """[(input key, {ext: (offset, size)})] of a tar, in member order, by reading headers only.

    Headers are read through `shards.tars` (compressed files refused, reads bounded). A member that is
    not a regular file, is sparse or is over the member limit is never read: its ext maps to the reason
    (a str) instead of a byte range, and the build skips that sample with the reason.
    """
    limit = limits.max_member_bytes()
    samples: list[tuple[str, dict[str, tuple[int, int] | str]]] = []
    try:
        with fs.open_file(url, "rb") as f, open_tar(f, url, limit) as tar:
            while (info := next_member(tar, url)) is not None:
                if info.isdir():
                    continue
                split = _split_member(info.name)
                if split is None or posixpath.basename(split[0]).startswith("__"):
                    continue
                key, ext = split
                if not samples or samples[-1][0] != key:
                    samples.append((key, {}))
                if ext in samples[-1][1]:
                    raise SourceError(f"{url}: member {info.name} appears twice for key {key!r}")
                problem = header_problem(info, limit)
                samples[-1][1][ext] = (info.offset_data, info.size) if problem is None else f"{info.name} {problem}"
    except SourceError:
        raise
    except (FormatError, tarfile.TarError, OSError) as e:
        raise SourceError(f"{url} is not a readable uncompressed tar: {str(e).removeprefix(f'{url}: ')}") from None
    return samples


def webdataset_source(root: str, encoder: RgbEncoder) -> Source:
    """Existing tar shards (img2dataset style: key.jpg/png + optional .cls/.txt/.json), re-sharded.

    `root` is a folder of .tar files, one .tar, or a brace pattern ("data/{00000..00009}.tar").
    """
    import braceexpand

    if "{" in root:
        urls = list(braceexpand.braceexpand(root))
        missing = [u for u in urls if not fs.exists(u)]
        if missing:
            raise SourceError(f"{missing[0]} does not exist ({len(missing)} of {len(urls)} tars of {root} missing)")
    elif root.endswith(".tar"):
        if not fs.exists(root):
            raise SourceError(f"{root} does not exist")
        urls = [root]
    else:
        _fs_root(root)
        urls = [fs.join(root, n) for n in fs.listdir(root) if n.endswith(".tar")]
    if not urls:
        raise SourceError(f"no .tar files in {root}")
    refs, locs = [], []
    for url in urls:
        for key, ranges in scan_tar(url):
            refs.append(f"{posixpath.basename(url)}:{key}")
            locs.append((url, ranges))
    if not refs:
        raise SourceError(f"the tars of {root} hold no samples")
    keys = unique_keys([r.split(":", 1)[1] for r in refs])
    items = [Item(k, r, loc) for k, r, loc in zip(keys, refs, locs)]
    return Source("webdataset", root, items, TarSampleMaker(encoder), encoder_options(encoder))


def synthetic_source(num: int, size: int = 128, seed: int = 0, quality: int = 95, normals: bool = False) -> Source:
    """`num` procedurally rendered scenes (shards/synthetic.py) with exact depth_gt, semseg_gt and cls (and
    normals_gt with `normals`)."""
    from . import synthetic

    if num <= 0:
        raise SourceError("--num must be positive for the synthetic source")
    items = [Item(synthetic.scene_key(seed, i), f"synthetic:{seed}:{i}", i) for i in range(num)]
    meanings = {"rgb": "image", "depth_gt": "metric_m", "semseg_gt": "class_ids"}
    if normals:
        meanings["normals_gt"] = "camera_normals"
    return Source(
        "synthetic",
        None,
        items,
        SceneMaker(seed, size, quality, normals),
        # `normals` recorded only when set, so shard sets built before it existed resume unchanged
        {"num": num, "size": size, "seed": seed, "quality": quality, **({"normals": True} if normals else {})},
        modalities=tuple(meanings),
        cls_classes=list(synthetic.CLS_CLASSES),
        semseg_classes=list(synthetic.SEMSEG_CLASSES),
        meanings=meanings,
    )


def encoder_options(encoder: RgbEncoder) -> dict:
    return {"size": encoder.size, "quality": encoder.quality, "max_pixels": encoder.max_pixels}


def open_source(
    src: str,
    root: str | None = None,
    *,
    num: int | None = None,
    size: int | None = None,
    seed: int = 0,
    quality: int = 95,
    max_pixels: int = MAX_PIXELS,
    class_from_parent: bool = False,
    labels: str | None = None,
    classes_from: str | None = None,
    modalities: dict[str, str] | None = None,
    depth_scale: float | None = None,
    depth_meaning: str = "metric_m",
    semseg_classes: str | None = None,
    shuffle_seed: int | None = None,
    shuffle: bool = True,
    normals: bool = False,
) -> Source:
    """The source named `src`, enumerated and put in build order.

    The order is permuted with `shuffle_seed` (default 0 for imagenet, folder and paired; webdataset and
    synthetic keep their order unless a seed is given; `shuffle=False` keeps the sorted order). `num` then
    keeps the first N samples (synthetic: renders N scenes). `classes_from` (a shard set) pins the class
    indices to its `cls_classes`. The other options belong to one source each (see `multimae-shard build -h`).
    """
    if src not in SOURCES:
        raise SourceError(f"unknown source {src!r}: choose one of {', '.join(SOURCES)}")
    _check_applicable(
        src,
        labels=labels,
        classes_from=classes_from,
        modalities=modalities,
        depth_scale=depth_scale,
        depth_meaning=None if depth_meaning == "metric_m" else depth_meaning,  # metric_m: the default
        semseg_classes=semseg_classes,
        class_from_parent=class_from_parent,
        normals=normals,
    )
    if src == "synthetic":
        source = synthetic_source(1024 if num is None else num, size or 128, seed, quality, normals)
        return _ordered(source, shuffle_seed if shuffle else None, None)
    if not root:
        raise SourceError(f"--src {src} needs --root (the folder to read)")
    if fs.is_local(root):
        root = os.path.abspath(root)  # recorded in the producer: a resume from another directory still matches
    pinned = classes_from_data(classes_from) if classes_from else None
    if src == "paired":
        from .paired import paired_source

        encoder = RgbEncoder(size, quality, max_pixels)  # paired data keeps its native size unless --size
        source = paired_source(
            root,
            encoder,
            modalities or {},
            depth_scale=depth_scale,
            depth_meaning=depth_meaning,
            semseg_classes=semseg_classes,
            class_from_parent=class_from_parent,
            pinned=pinned,
        )
    else:
        encoder = RgbEncoder(256 if size is None else size, quality, max_pixels)
        if src == "imagenet":
            from .imagenet import imagenet_source

            source = imagenet_source(root, encoder, labels=labels, pinned=pinned)
        elif src == "folder":
            source = folder_source(root, encoder, class_from_parent, pinned)
        else:
            source = webdataset_source(root, encoder)
    if pinned is not None:
        digest = hashlib.sha256("\n".join(pinned.names).encode()).hexdigest()
        origin = os.path.abspath(classes_from) if fs.is_local(classes_from) else classes_from
        source.options = {**source.options, "classes_from": origin, "classes_sha256": digest}
    default_seed = 0 if src in SHUFFLED else None
    return _ordered(source, (default_seed if shuffle_seed is None else shuffle_seed) if shuffle else None, num)


# which sources take which option (a user giving one to another source gets told, not ignored)
APPLIES = {
    "labels": ("imagenet",),
    "classes_from": ("imagenet", "folder", "paired"),
    "modalities": ("paired",),
    "depth_scale": ("paired",),
    "depth_meaning": ("paired",),
    "semseg_classes": ("paired",),
    "class_from_parent": ("folder", "paired"),
    "normals": ("synthetic",),
}


def _check_applicable(src: str, **given: Any) -> None:
    for name, value in given.items():
        if value not in (None, False) and src not in APPLIES[name]:
            flag = "--" + name.replace("_", "-")
            raise SourceError(f"{flag} applies to --src {' / '.join(APPLIES[name])}, not --src {src}")


def _ordered(source: Source, shuffle_seed: int | None, num: int | None) -> Source:
    """The items permuted with `shuffle_seed` (None: enumeration order), then the first `num`; both recorded
    in the options, so a resume with another seed or count is refused like any other changed option."""
    if shuffle_seed is not None:
        random.Random(shuffle_seed).shuffle(source.items)
        source.options = {**source.options, "shuffle_seed": shuffle_seed}
    if num is not None:
        source.items = source.items[:num]
        source.options = {**source.options, "num": num}
    return source
