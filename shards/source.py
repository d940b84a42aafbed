"""What a source of `multimae-shard build` is made of: its items, its maker, its manifest facts.

A source does two things, split so that only small objects cross process boundaries:

- in the main process it enumerates its samples in a fixed order (sorted paths, tar order, scene index)
  as small picklable `Item`s, which `open_source` then permutes with a seeded shuffle (on by default for
  the file sources, whose sorted order is class order): sample i of the final order goes to shard
  i // shard_size, whatever the worker count; an item whose `loc` is `Refused` is recorded as skipped;
- its `maker` (a small picklable callable, run in pool workers) turns one item into the tar members
  of every modality, or raises `BadImage` with a reason, which the build records as a skip.

`SourceSpec` declares a source to the registry of `shards.sources`: its name, how it opens, the options it
takes. The helpers every source shares live here too: keys, image listing, the rgb encoder, class lists.

Keys are deterministic and dot-free. File sources derive them from the relative path without its
extension, '/' -> '-' and any character outside [A-Za-z0-9_-] -> '_' (``n01440764/n01440764_10026.JPEG``
-> ``n01440764-n01440764_10026``); webdataset sources from the input key the same way; a key that
repeats gets ``-1``, ``-2``, ... in enumeration order. Synthetic keys come from `synthetic.scene_key`.
"""

from __future__ import annotations

import posixpath
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import numpy as np

from . import __version__, fs, limits
from .format import FormatError, encode_rgb, modality_entry, read_manifest
from .images import MAX_PIXELS, BadImage, load_rgb
from .modalities import of

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff", ".ppm", ".pgm", ".pnm")
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


def folder_root(root: str):
    """(filesystem, path) of a source root that must be an existing folder; SourceError otherwise."""
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
    filesystem, path = folder_root(root)
    rels = (posixpath.relpath(p, path) for p in filesystem.find(path, withdirs=False))
    return sorted(r for r in rels if r.lower().endswith(IMAGE_EXTS) and not _hidden(r))


def list_subdirs(root: str) -> list[str]:
    filesystem, path = folder_root(root)
    dirs = (e["name"] for e in filesystem.ls(path, detail=True) if e["type"] == "directory")
    return sorted(n for n in (posixpath.basename(d.rstrip("/")) for d in dirs) if not n.startswith("."))


# --- the rgb encoder and file reading (run in pool workers) -----------------------------------


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


# --- a source ------------------------------------------------------------------------------------


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


def encoder_options(encoder: RgbEncoder) -> dict:
    return {"size": encoder.size, "quality": encoder.quality, "max_pixels": encoder.max_pixels}


@dataclass(frozen=True)
class SourceSpec:
    """A source as the registry knows it.

    open(root, encoder, **options) enumerates it (`encoder`: the rgb encoder at the build's size, quality and
    pixel limit); options: the names of the options it takes besides those every source has (`--num`,
    `--size`, `--quality`, `--max-pixels`, the order), each a `multimae-shard build` flag (`depth_scale` is
    `--depth-scale`); a value given to a source that does not take it is refused, never ignored.
    """

    name: str
    open: Callable[..., Source]
    options: tuple[str, ...] = ()
    needs_root: bool = True
    shuffled: bool = False  # its enumeration order is class order: shuffled before sharding unless told not to
    default_size: int | None = 256  # shorter side of the stored rgb without --size (None: native)
    generates: bool = False  # makes `num` samples itself (synthetic) instead of keeping the first `num`
