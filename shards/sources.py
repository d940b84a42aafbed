"""The sources of `multimae-shard build` and their registry: imagenet, folder, paired, webdataset, synthetic.

Each source is a `SourceSpec` (`shards.source`) in `SOURCES`: its opener and the options it takes. `open_source`
checks the options against the spec (an option of another source is refused, naming the sources that take it),
opens the source and puts its items in build order. This module holds the folder, webdataset and synthetic
sources; imagenet (`shards.imagenet`) and paired (`shards.paired`) have their own modules.
"""

from __future__ import annotations

import hashlib
import json
import os
import posixpath
import random
import re
import tarfile
from dataclasses import dataclass
from typing import Any

from . import fs, limits
from .errors import printable
from .format import FormatError, encode_rgb, encode_sample
from .imagenet import IMAGENET
from .images import MAX_PIXELS, BadImage
from .paired import PAIRED
from .source import (
    IMAGE_EXTS,
    ClassList,
    FileMaker,
    Item,
    Members,
    RgbEncoder,
    Source,
    SourceError,
    SourceSpec,
    classes_from_data,
    encoder_options,
    folder_root,
    list_images,
    parent_classes,
    path_key,
    sanitize_key,
    unique_keys,
)
from .tars import header_problem, next_member, open_tar

# base names also reachable from here, where callers of `open_source` catch or build on them
__all__ = ["Item", "Source", "SourceError", "SourceSpec", "open_source", "sanitize_key", "unique_keys"]


# --- makers (run in pool workers) -----------------------------------------------------------------


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
        folder_root(root)
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


def _open_folder(root: str, encoder: RgbEncoder, class_from_parent: bool = False, pinned: ClassList | None = None
                 ) -> Source:  # fmt: skip
    return folder_source(root, encoder, class_from_parent, pinned)


def _open_synthetic(root: str | None, encoder: RgbEncoder, num: int | None = None, seed: int = 0,
                    normals: bool = False) -> Source:  # fmt: skip
    return synthetic_source(1024 if num is None else num, encoder.size or 128, seed, encoder.quality, normals)


SOURCES: dict[str, SourceSpec] = {
    spec.name: spec
    for spec in (
        IMAGENET,
        SourceSpec("folder", _open_folder, ("class_from_parent", "classes_from"), shuffled=True),
        PAIRED,
        SourceSpec("webdataset", lambda root, encoder: webdataset_source(root, encoder)),
        SourceSpec(
            "synthetic", _open_synthetic, ("seed", "normals"), needs_root=False, default_size=128, generates=True
        ),  # fmt: skip
    )
}


def open_source(
    src: str,
    root: str | None = None,
    *,
    num: int | None = None,
    size: int | None = None,
    quality: int = 95,
    max_pixels: int = MAX_PIXELS,
    shuffle_seed: int | None = None,
    shuffle: bool = True,
    **options: Any,
) -> Source:
    """The source named `src`, enumerated and put in build order.

    The order is permuted with `shuffle_seed` (default 0 for the sources whose order is class order: imagenet,
    folder and paired; webdataset and synthetic keep their order unless a seed is given; `shuffle=False` keeps
    the sorted order). `num` then keeps the first N samples (synthetic: renders N scenes). `options` belong
    to one source each (`SOURCES[src].options`, see `multimae-shard build -h`); None and False mean not given.
    `classes_from` (a shard set) pins the class indices to its `cls_classes`.
    """
    if src not in SOURCES:
        raise SourceError(f"unknown source {src!r}: choose one of {', '.join(SOURCES)}")
    spec = SOURCES[src]
    given = {name: value for name, value in options.items() if value is not None and value is not False}
    for name in given:
        if name not in spec.options:
            takers = [s for s, other in SOURCES.items() if name in other.options]
            flag = "--" + name.replace("_", "-")
            if not takers:
                raise SourceError(f"unknown source option {name!r}")
            raise SourceError(f"{flag} applies to --src {' / '.join(takers)}, not --src {src}")
    if spec.needs_root and not root:
        raise SourceError(f"--src {src} needs --root (the folder to read)")
    if root and fs.is_local(root):
        root = os.path.abspath(root)  # recorded in the producer: a resume from another directory still matches
    classes_from = given.pop("classes_from", None)
    if classes_from is not None:
        given["pinned"] = classes_from_data(classes_from)
    if spec.generates:
        given["num"] = num
    encoder = RgbEncoder(spec.default_size if size is None else size, quality, max_pixels)
    source = spec.open(root, encoder, **given)
    if classes_from is not None:
        digest = hashlib.sha256("\n".join(given["pinned"].names).encode()).hexdigest()
        origin = os.path.abspath(classes_from) if fs.is_local(classes_from) else classes_from
        source.options = {**source.options, "classes_from": origin, "classes_sha256": digest}
    default_seed = 0 if spec.shuffled else None
    seed = (default_seed if shuffle_seed is None else shuffle_seed) if shuffle else None
    return _ordered(source, seed, None if spec.generates else num)


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
