"""`multimae-shard show DATA --out FILE.png`: a picture grid of samples, one row per sample, one column per modality.

Each kind is drawn by its picture rule (`shards.modalities`): rgb as stored, depth (and other scalar maps) with
a colour map over the sample's own range (printed above it), normals as the usual normal-map colours
(n + 1) / 2, and segmentation with a fixed palette (class id -> colour, the same in every picture) plus a legend of the
classes present. Samples are decoded with the reader (`shards.reader`), so what you see is what a
trainer gets.
"""

from __future__ import annotations

import posixpath
from collections.abc import Sequence

import numpy as np

from . import fs
from . import modalities as registry
from .format import FormatError, read_manifest
from .reader import decode_members, iter_shard_members

DEPTH_CMAP = "turbo"


def palette(n: int) -> np.ndarray:
    """(n, 3) float colours for class ids: tab20 first, then fixed pseudo-random colours."""
    import matplotlib

    base = np.asarray(matplotlib.colormaps["tab20"].colors)  # (20, 3)
    if n <= len(base):
        return base[:n]
    extra = np.random.default_rng(12345).uniform(0.1, 0.95, size=(n - len(base), 3))
    return np.concatenate([base, extra])


def normals_picture(normals: np.ndarray) -> np.ndarray:
    """(H, W, 3) unit normals -> (H, W, 3) uint8 colours (n + 1) / 2, the usual normal-map colours (a surface
    facing the camera is light blue); missing pixels (zero vectors) are black."""
    colours = np.rint((np.clip(normals, -1.0, 1.0) + 1.0) * 127.5).astype(np.uint8)
    return np.where((normals == 0).all(-1, keepdims=True), 0, colours).astype(np.uint8)


def _pick(root: str, names: list[str], modalities: list[str], keys: Sequence[str] | None, n: int) -> list[dict]:
    """Decoded samples: the given keys (in the order given) or the first n in shard order."""
    wanted = list(dict.fromkeys(keys)) if keys else None
    found: dict[str, dict] = {}
    for name in names:
        for raw in iter_shard_members(root, name, modalities):
            if wanted is None or raw["__key__"] in wanted:
                found[raw["__key__"]] = decode_members(root, raw, modalities)
            if (wanted is None and len(found) >= n) or (wanted is not None and len(found) == len(wanted)):
                break
        else:
            continue
        break
    if wanted is None:
        return list(found.values())
    missing = [k for k in wanted if k not in found]
    if missing:
        raise FormatError(
            f"{root}: no sample with key {missing[0]!r}"
            + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else "")
        )
    return [found[k] for k in wanted]


def show(
    root: str, out: str, *, keys: Sequence[str] | None = None, n: int = 6, modalities: Sequence[str] | None = None
) -> list[str]:
    """Draw the grid to `out` (any matplotlib format by extension); returns the keys shown."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    manifest = read_manifest(root)
    available = manifest["modalities"]
    mods = list(modalities) if modalities else sorted(available, key=registry.display_order)
    unknown = [m for m in mods if m not in available]
    if unknown:
        raise FormatError(f"{root}/manifest.json has no modality {unknown[0]!r} (it has {sorted(available)})")
    names = [s["name"] for s in manifest.get("shards", [])]
    samples = _pick(root, names, mods, keys, n)
    if not samples:
        raise FormatError(f"{root}: the shard set holds no samples")
    cls_classes = manifest.get("cls_classes")

    rows, cols = len(samples), len(mods)
    fig, axes = plt.subplots(rows, cols, figsize=(2.6 * cols, 2.6 * rows + 0.9), squeeze=False)
    present: dict[str, set[int]] = {m: set() for m in mods if registry.of(m).is_classes}
    for r, sample in enumerate(samples):
        for c, m in enumerate(mods):
            ax = axes[r, c]
            value = sample[m]
            picture = registry.of(m).picture
            if picture == "image":
                ax.imshow(value)  # (H, W, 3) uint8
                title = m
            elif picture == "normals":
                ax.imshow(normals_picture(value))  # (H, W, 3) unit vectors -> colours
                title = m
            elif picture == "colormap":
                lo, hi = float(value.min()), float(value.max())
                ax.imshow(value, cmap=DEPTH_CMAP, vmin=lo, vmax=hi)  # (H, W) float32
                title = f"{m} [{lo:.3g}, {hi:.3g}]"
            else:
                n_classes = max(len(available[m].get("classes", [])), int(value.max()) + 1)
                ax.imshow(palette(n_classes)[value], interpolation="nearest")  # (H, W) -> (H, W, 3)
                present[m].update(int(i) for i in np.unique(value))
                title = m
            ax.set_title(title, fontsize=8)
            ax.set_xticks([])
            ax.set_yticks([])
        label = sample["__key__"]
        if "cls" in sample:
            cls = sample["cls"]
            label += f"\ncls {cls}" + (f": {cls_classes[cls]}" if cls_classes and 0 <= cls < len(cls_classes) else "")
        axes[r, 0].set_ylabel(label, fontsize=7)

    handles = []
    for m, ids in present.items():
        classes = available[m].get("classes", [])
        colours = palette(max(len(classes), max(ids) + 1))
        handles += [Patch(color=colours[i], label=(classes[i] if i < len(classes) else f"id {i}")) for i in sorted(ids)]
    if handles:
        uniq = {h.get_label(): h for h in handles}
        fig.legend(handles=list(uniq.values()), loc="lower center", ncol=min(len(uniq), 6), fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.9 / (2.6 * rows + 0.9) if handles else 0, 1, 1))
    with fs.atomic_writer(out) as f:  # a local file or an object (s3://...), whole or not at all
        fig.savefig(f, format=posixpath.splitext(out)[1][1:].lower() or "png", dpi=100)
    plt.close(fig)
    return [s["__key__"] for s in samples]
