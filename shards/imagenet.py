"""The `imagenet` source: ILSVRC train and validation splits with one class index per WordNet id.

Two layouts:

- class folders ``ROOT/<wnid>/*.JPEG``: the train split, and the validation split as many tools re-arrange
  it. The class index is the position of the wnid in the sorted folder names (as torchvision's
  ``ImageFolder``), or in a pinned list (``--classes-from TRAIN_DATA``, the train set's `cls_classes`).
- flat ``ROOT/*.JPEG`` with ``--labels LOC_val_solution.csv``: the validation split as distributed. The CSV's
  rows are ``ImageId,PredictionString``; the first token of PredictionString is the image's wnid. An image
  without a row is skipped with the reason; without ``--classes-from`` the classes are the CSV's sorted wnids.

A root whose folders are not wnids (``n`` and 8 digits), e.g. the ILSVRC root holding ``train/`` and
``val/``, is refused with the likely right root, so a wrong ``--root`` never builds a two-class set.
"""

from __future__ import annotations

import csv
import io
import os
import posixpath
import re

from . import fs
from .errors import FormatError
from .source import (
    IMAGE_EXTS,
    ClassList,
    FileMaker,
    Item,
    Refused,
    RgbEncoder,
    Source,
    SourceError,
    SourceSpec,
    encoder_options,
    list_images,
    list_subdirs,
    path_key,
    unique_keys,
)

WNID_RE = re.compile(r"n[0-9]{8}")
SEARCH_DIRS = 200  # folders looked at when guessing the right root of a refused one


def is_wnid(name: str) -> bool:
    return WNID_RE.fullmatch(name) is not None


def imagenet_source(
    root: str, encoder: RgbEncoder, *, labels: str | None = None, pinned: ClassList | None = None
) -> Source:
    """ILSVRC class folders (train or re-arranged val) or, with `labels`, the flat validation folder."""
    if labels is not None:
        items, classes = _flat_items(root, labels, pinned)
        options = {**encoder_options(encoder), "labels": _absolute(labels)}
    else:
        items, classes = _folder_items(root, pinned)
        options = encoder_options(encoder)
    return Source("imagenet", root, items, FileMaker(encoder, "wnid"), options, cls_classes=classes.names)


def _folder_items(root: str, pinned: ClassList | None) -> tuple[list[Item], ClassList]:
    wnids = list_subdirs(root)
    check_class_root(root, wnids)
    rels = [r for r in list_images(root) if "/" in r]
    if not rels:
        raise SourceError(f"no images found under {root}/<wnid>/ (expected ROOT/<wnid>/*.JPEG)")
    classes = pinned or ClassList(wnids, root)
    index = {w: classes.index(w, fs.join(root, w)) for w in sorted({r.split("/", 1)[0] for r in rels})}
    keys = unique_keys([path_key(r) for r in rels])
    wnid = [r.split("/", 1)[0] for r in rels]
    return [Item(k, r, fs.join(root, r), index[w], w) for k, r, w in zip(keys, rels, wnid)], classes


def check_class_root(root: str, subdirs: list[str]) -> None:
    """SourceError when `root` is not a folder of wnid folders, naming the likely right root."""
    bad = [d for d in subdirs if not is_wnid(d)]
    if not subdirs and any("/" not in r for r in list_images(root)):
        if is_wnid(posixpath.basename(root.rstrip("/"))):
            raise SourceError(f"{root} is one class folder: give its parent as --root (ROOT/<wnid>/*.JPEG)")
        raise SourceError(
            f"{root} holds images but no <wnid> folders: for ImageNet's flat validation folder give "
            "--labels LOC_val_solution.csv (and --classes-from TRAIN_DATA for the train set's class indices)"
        )
    if not bad:
        return
    roots = [r for r in likely_roots(root) if r != root]
    hint = f"; did you mean --root {' or '.join(roots[:2])}?" if roots else ""
    raise SourceError(
        f"{root} holds folders that are not WordNet ids (n + 8 digits), e.g. {bad[0]!r}: --src imagenet reads "
        f"ROOT/<wnid>/*.JPEG{hint} (for other class folders use --src folder --class-from-parent)"
    )


def likely_roots(root: str, depth: int = 4) -> list[str]:
    """Folders at most `depth` levels below `root` whose sub-folders are all wnids holding images, breadth first,
    'train' first among equals (the ILSVRC root holds train/ and val/, Kaggle's ILSVRC/Data/CLS-LOC/train)."""
    found, level, seen = [], [root], 0
    for _ in range(depth + 1):
        below = []
        for folder in level:
            seen += 1
            subdirs = list_subdirs(folder)
            if subdirs and all(is_wnid(d) for d in subdirs):
                if any(n.lower().endswith(IMAGE_EXTS) for n in fs.listdir(fs.join(folder, subdirs[0]))):
                    found.append(folder)  # not e.g. ILSVRC/Annotations/CLS-LOC/train (XML boxes)
            else:
                below += [fs.join(folder, d) for d in subdirs if not is_wnid(d)]
            if seen >= SEARCH_DIRS:
                return _train_first(found)
        level = below
    return _train_first(found)


def _train_first(roots: list[str]) -> list[str]:
    return sorted(roots, key=lambda r: (r.count("/"), posixpath.basename(r) != "train"))


def _flat_items(root: str, labels: str, pinned: ClassList | None) -> tuple[list[Item], ClassList]:
    rows = read_val_labels(labels)
    rels = [r for r in list_images(root) if "/" not in r]
    if not rels:
        raise SourceError(f"no images directly in {root}: --labels reads the flat validation folder ROOT/*.JPEG")
    classes = pinned or ClassList(sorted(set(rows.values())), labels)
    items = []
    for key, rel in zip(unique_keys([path_key(r) for r in rels]), rels):
        image_id = path_key(rel)
        wnid = rows.get(image_id)
        if wnid is None:
            items.append(Item(key, rel, Refused(f"no label: {image_id} has no row in {labels}")))
        else:
            cls = classes.index(wnid, f"{labels} (row {image_id})")
            items.append(Item(key, rel, fs.join(root, rel), cls, wnid))
    return items, classes


def read_val_labels(url: str) -> dict[str, str]:
    """{ImageId: wnid} from LOC_val_solution.csv (the first token of each row's PredictionString)."""
    if not fs.exists(url):
        raise SourceError(f"--labels {url} does not exist")
    try:
        text = fs.read_bytes(url, limit=2**28).decode("utf-8-sig")
    except (UnicodeDecodeError, FormatError) as e:
        raise SourceError(f"--labels {url} is not a UTF-8 CSV file ({e})") from None
    reader = csv.DictReader(io.StringIO(text))
    if not {"ImageId", "PredictionString"} <= set(reader.fieldnames or []):
        raise SourceError(
            f"{url}: expected the header ImageId,PredictionString (ImageNet's LOC_val_solution.csv), "
            f"got {','.join(reader.fieldnames or [])!r}"
        )
    rows = {}
    for line, row in enumerate(reader, start=2):
        tokens = (row["PredictionString"] or "").split()
        if not tokens or not is_wnid(tokens[0]):
            raise SourceError(
                f"{url}, line {line}: PredictionString {row['PredictionString']!r} does not start with a wnid"
            )
        rows[row["ImageId"]] = tokens[0]
    return rows


def _absolute(url: str) -> str:
    return os.path.abspath(url) if fs.is_local(url) else url


IMAGENET = SourceSpec(
    "imagenet",
    lambda root, encoder, **options: imagenet_source(root, encoder, **options),
    ("labels", "classes_from"),
    shuffled=True,
)
