"""`multimae-shard info DATA`: a one-screen summary of a shard set.

Modalities with their producer, shards (complete / listed), samples, bytes and skips come from the
manifest and the per-shard stats jsons. The `cls` histogram reads only the tiny ``.cls`` members of
the rgb tars (tar headers are skipped by seeking, image bytes are never read); semseg class shares
decode the first `semseg_samples` label maps of each semseg modality.
"""

from __future__ import annotations

from collections import Counter

import numpy as np

from . import modalities as registry
from .format import FormatError, decode_semseg, parse_cls, read_manifest
from .tars import iter_samples
from .writer import read_stats, shard_is_complete, tar_path

BAR_WIDTH = 30


def _mb(n: int) -> str:
    return f"{n / 1e6:.1f} MB"


def producer_text(producer: dict, width: int = 60) -> str:
    """A short one-line description of a producer dict (source + options, or a teacher's model id)."""
    head = producer.get("source") or producer.get("model") or producer.get("teacher") or ""
    options = producer.get("options", {})
    extras = {
        k: v
        for k, v in producer.items()
        if k not in ("source", "model", "teacher", "options", "code_version")
        and isinstance(v, (str, int, float))
        and v is not None
    }
    parts = [str(head)] + [f"{k}={v}" for k, v in {**extras, **options}.items() if v is not None]
    text = " ".join(p for p in parts if p)
    return text if len(text) <= width else text[: width - 3] + "..."


def modality_stats(root: str, modality: str, names: list[str]) -> dict:
    """Totals over the stats jsons of one modality: complete shards, samples, bytes, skips by reason, and the
    skips themselves as (shard, ref, reason) (a build records each skip in all of its modalities)."""
    out = {"complete": 0, "samples": 0, "bytes": 0, "skipped": Counter(), "skips": set()}
    for name in names:
        if not shard_is_complete(root, modality, name):
            continue
        stats = read_stats(root, modality, name)
        out["complete"] += 1
        out["samples"] += stats["count"]
        out["bytes"] += stats["bytes"]
        out["skipped"].update(s["reason"].split(":", 1)[0] for s in stats.get("skipped", []))
        out["skips"].update((name, s["ref"], s["reason"]) for s in stats.get("skipped", []))
    return out


def _members(url: str, suffix: str, decode, limit: int | None = None):
    """`decode(bytes)` of the `suffix` members of one tar, in order (read through shards.tars, which seeks over
    the others); FormatError naming the tar and key when one does not decode."""
    n = 0
    for key, members in iter_samples(url, want=lambda s: s == suffix):
        if suffix not in members:
            continue
        try:
            yield decode(members[suffix])
        except Exception as e:  # a damaged member: name it, do not print a traceback
            raise FormatError(f"{url}: sample {key!r}: {suffix} does not decode ({type(e).__name__}: {e})") from None
        n += 1
        if limit is not None and n >= limit:
            return


def cls_histogram(root: str, names: list[str]) -> Counter:
    hist: Counter = Counter()
    for name in names:
        if shard_is_complete(root, "rgb", name):
            hist.update(_members(tar_path(root, "rgb", name), "cls", parse_cls))
    return hist


def semseg_shares(root: str, modality: str, names: list[str], samples: int) -> tuple[np.ndarray, int]:
    """Pixel counts per class id over the first `samples` label maps, and how many maps were read."""
    counts = np.zeros(0, dtype=np.int64)
    seen = 0
    for name in names:
        if seen >= samples:
            break
        if not shard_is_complete(root, modality, name):
            continue
        for ids in _members(tar_path(root, modality, name), f"{modality}.png", decode_semseg, samples - seen):
            c = np.bincount(ids.ravel())
            counts = np.pad(counts, (0, max(0, len(c) - len(counts))))
            counts[: len(c)] += c
            seen += 1
    return counts, seen


def _histogram_lines(labels: list[str], values: list[float], fmt) -> list[str]:
    top = max(values) if values else 0
    width = max((len(s) for s in labels), default=0)
    return [
        f"  {lab:<{width}} {fmt(v):>8} {'#' * (round(BAR_WIDTH * v / top) if top else 0)}"
        for lab, v in zip(labels, values)
    ]


def info_text(root: str, semseg_samples: int = 256, max_classes: int = 12) -> str:
    """The `multimae-shard info` screen."""
    manifest = read_manifest(root)
    names = [s["name"] for s in manifest.get("shards", [])]
    lines = [
        f"{root}: {manifest.get('total', 0)} samples in {len(names)} shards "
        f"(format {manifest['format_version']}, {manifest.get('created_by', '?')})",
        "",
    ]
    rows = [("modality", "kind", "shards", "samples", "bytes", "skipped", "meaning", "producer")]
    skips: set[tuple[str, str, str]] = set()
    order = sorted(manifest["modalities"], key=registry.display_order)
    for m in order:
        entry = manifest["modalities"][m]
        st = modality_stats(root, m, names)
        skips |= st["skips"]
        rows.append(
            (
                m,
                entry["kind"],
                f"{st['complete']}/{len(names)}",
                str(st["samples"]),
                _mb(st["bytes"]),
                str(sum(st["skipped"].values())),
                entry.get("meaning", ""),
                producer_text(entry.get("producer", {})),
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    skipped_all = Counter(reason.split(":", 1)[0] for _, _, reason in skips)
    if skipped_all:
        lines.append("skipped by reason: " + ", ".join(f"{r}: {n}" for r, n in skipped_all.most_common()))

    classes = manifest.get("cls_classes")
    if "rgb" in manifest["modalities"]:
        hist = cls_histogram(root, names)
        if hist:
            ids = sorted(hist, key=lambda c: (-hist[c], c))
            shown = ids[:max_classes]
            labels = [classes[c] if classes and 0 <= c < len(classes) else str(c) for c in shown]
            lines += ["", f"cls histogram ({sum(hist.values())} samples, {len(hist)} classes):"]
            lines += _histogram_lines(labels, [hist[c] for c in shown], lambda v: str(int(v)))
            if len(ids) > len(shown):
                lines.append(
                    f"  ... {len(ids) - len(shown)} more classes, {sum(hist[c] for c in ids[len(shown) :])} samples"
                )

    for m in order:
        entry = manifest["modalities"][m]
        if not registry.of(m).is_classes or semseg_samples <= 0:
            continue
        counts, seen = semseg_shares(root, m, names, semseg_samples)
        if not seen:
            continue
        seg_classes = entry.get("classes", [])
        ids = [int(c) for c in np.argsort(-counts, kind="stable") if counts[c] > 0][:max_classes]
        total = counts.sum()
        labels = [seg_classes[c] if c < len(seg_classes) else f"id {c}" for c in ids]
        lines += ["", f"{m} pixel share by class (first {seen} samples):"]
        lines += _histogram_lines(labels, [100.0 * counts[c] / total for c in ids], lambda v: f"{v:.1f}%")
    return "\n".join(lines)
