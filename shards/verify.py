"""`multimae-shard verify DATA`: a full integrity check of an aligned shard set.

For every shard of every modality in the manifest: the tar and its stats json exist and the tar
reads to the end through `shards.tars` (plain tar, regular members within the size limit, valid
adjacent keys); every member the format names decodes through its kind's codec (rgb JPEG, 16-bit depth PNG
with a valid range, class ids within the class list or `IGNORE_ID`, normals RGB PNG, cls within
`cls_classes`) and no other member is present;
keys are aligned across modalities (same keys, same order, same image size); counts agree between
tar, stats json and manifest, and the stats' keys digest matches. With `deep`, every member's bytes
are also checked against the digest its stats json records (shards written without digests are
counted by `shards_without_digests`, not reported). No modality folder holds a shard the manifest
does not list. A tar without its stats json (the commit marker) is an unfinished write: it is never
read, and reported only where the manifest lists its shard. Every problem is reported as (file, key,
what); nothing stops the scan, and no input, however broken, raises.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import NamedTuple

from . import fs
from . import modalities as registry
from .errors import printable
from .format import (
    IGNORE_ID,
    MANIFEST,
    FormatError,
    codec,
    decode_sample,
    member_name,
    modality_kind,
    parse_cls,
    read_json_file,
    read_manifest,
)
from .tars import MemberError, iter_samples
from .writer import (
    digest_field,
    digest_problems,
    digests_by_key,
    keys_digest,
    read_stats,
    skipped_refs,
    stats_path,
    tar_path,
)

MAX_KEY_PROBLEMS = 10  # per shard and modality, for missing / extra keys


class Problem(NamedTuple):
    file: str
    key: str | None
    what: str

    def __str__(self) -> str:
        parts = (self.file, self.key, self.what) if self.key else (self.file, self.what)
        return ": ".join(printable(str(p)) for p in parts)


class _Scan(NamedTuple):
    """What one modality tar of one shard holds: keys in order and each key's image size."""

    keys: list[str]
    sizes: dict[str, tuple[int, int]]
    readable: bool


def _allowed_members(modality: str) -> tuple[set[str], set[str]]:
    """(required, optional) member suffixes of one sample in this modality's tar."""
    required = {member_name(modality)}
    if codec(modality).meta is not None:
        required.add(f"{modality}.json")
    optional = {"cls", "json"} if modality_kind(modality) == "rgb" else set()  # rgb carries the sample's cls
    return required, optional


def _check_sample(
    modality: str, members: dict[str, bytes], entry: dict, cls_classes: list | None
) -> tuple[list[str], tuple[int, int] | None]:
    """Problems with one sample's members (empty when it decodes and its values are in range), and its (H, W)."""
    what = []
    required, optional = _allowed_members(modality)
    for suffix in sorted(set(members) - required - optional):
        what.append(f"unexpected member .{suffix} (not part of the format; not decoded)")
    missing = required - set(members)
    if missing:
        return what + [f"missing member(s) {sorted('.' + s for s in missing)}"], None
    kind = modality_kind(modality)
    try:
        value = decode_sample(modality, members)
    except Exception as exc:
        return what + [f"{modality} does not decode ({type(exc).__name__}: {exc})"], None
    labelled = value[value != IGNORE_ID] if registry.get(kind).is_classes else value[:0]
    if labelled.size:
        classes = entry.get("classes") or []
        if labelled.min() < 0 or labelled.max() >= len(classes):
            what.append(
                f"class ids [{labelled.min()}, {labelled.max()}] outside the {len(classes)} manifest classes "
                f"(and {IGNORE_ID}, unlabelled)"
            )
    if "cls" in members:
        try:
            cls = parse_cls(members["cls"])
            if cls_classes is not None and not 0 <= cls < len(cls_classes):
                what.append(f"cls {cls} outside the {len(cls_classes)} cls_classes")
        except Exception as exc:
            what.append(f"cls does not decode ({exc})")
    if "json" in members:
        try:
            json.loads(members["json"])
        except Exception as exc:
            what.append(f"sample json does not parse ({exc})")
    if min(value.shape[:2]) == 0:
        what.append(f"empty image of shape {value.shape}")
    return what, tuple(value.shape[:2])


def _scan_tar(
    root: str, modality: str, name: str, manifest: dict, stats: dict | None, deep: bool, problems: list[Problem]
) -> _Scan:
    url = tar_path(root, modality, name)
    entry = manifest["modalities"][modality]
    digests = digests_by_key(stats) if deep and stats is not None else None
    keys: list[str] = []
    sizes: dict[str, tuple[int, int]] = {}
    readable = True

    def refused(err: MemberError) -> None:
        problems.append(Problem(url, err.key, str(err).removeprefix(f"{url}: ")))

    try:
        for key, members in iter_samples(url, on_problem=refused):
            keys.append(key)
            found, size = _check_sample(modality, members, entry, manifest.get("cls_classes"))
            if digests is not None:
                found += digest_problems(key, members, digests)
            problems.extend(Problem(url, key, what) for what in found)
            if size is not None:
                sizes[key] = size
    except FormatError as exc:
        problems.append(Problem(url, keys[-1] if keys else None, f"tar unreadable after {len(keys)} samples: {exc}"))
        readable = False
    return _Scan(keys, sizes, readable)


def _read_stats(root: str, modality: str, name: str, problems: list[Problem]) -> dict | None:
    path = stats_path(root, modality, name)
    try:
        return read_stats(root, modality, name)
    except FormatError as exc:
        problems.append(Problem(path, None, f"stats json unreadable ({str(exc).removeprefix(f'{path}: ')})"))
        return None


def _check_counts(
    root: str, modality: str, name: str, count: int, scan: _Scan, stats: dict, problems: list[Problem]
) -> None:
    path = stats_path(root, modality, name)
    if stats.get("count") != count:
        problems.append(Problem(path, None, f"count {stats.get('count')} but the manifest says {count}"))
    if scan.readable and len(scan.keys) != stats.get("count"):
        problems.append(
            Problem(
                tar_path(root, modality, name),
                None,
                f"holds {len(scan.keys)} samples but its stats json says {stats.get('count')}",
            )
        )
    if scan.readable and stats.get("keys_digest") != keys_digest(scan.keys):
        problems.append(Problem(path, None, "keys_digest does not match the keys in the tar"))


def _reference(scans: dict[str, _Scan]) -> str:
    return "rgb" if "rgb" in scans else next(iter(scans))


def _check_alignment(
    root: str, name: str, scans: dict[str, _Scan], dropped: dict[str, set[str]], problems: list[Problem]
) -> None:
    """Every modality holds the reference's keys in its order, less the samples it records as skipped."""
    if not scans:
        return
    ref = _reference(scans)
    ref_url, ref_scan = tar_path(root, ref, name), scans[ref]
    for m, scan in scans.items():
        if m == ref:
            continue
        url = tar_path(root, m, name)
        expected = [k for k in ref_scan.keys if k not in dropped.get(m, set())]
        ref_set = set(expected)
        if scan.keys != expected:
            here = set(scan.keys)
            missing = [k for k in expected if k not in here]
            extra = [k for k in scan.keys if k not in ref_set]
            for k in missing[:MAX_KEY_PROBLEMS]:
                problems.append(Problem(url, k, f"key missing (present in {ref_url})"))
            for k in extra[:MAX_KEY_PROBLEMS]:
                problems.append(Problem(url, k, f"extra key (absent from {ref_url})"))
            hidden = len(missing) + len(extra) - len(missing[:MAX_KEY_PROBLEMS]) - len(extra[:MAX_KEY_PROBLEMS])
            if hidden:
                problems.append(Problem(url, None, f"{hidden} more missing/extra keys not listed"))
            if not missing and not extra:
                i = next((i for i, (a, b) in enumerate(zip(scan.keys, expected)) if a != b), None)
                if i is not None:
                    problems.append(
                        Problem(url, scan.keys[i], f"key order differs: sample {i} is {expected[i]!r} in {ref_url}")
                    )
        for k, size in scan.sizes.items():
            if k in ref_scan.sizes and ref_scan.sizes[k] != size:
                problems.append(Problem(url, k, f"size {size} differs from {ref_scan.sizes[k]} in {ref_url}"))


def _verify_shard(root: str, manifest: dict, shard: dict, deep: bool) -> list[Problem]:
    problems: list[Problem] = []
    name, count = shard["name"], int(shard["count"])
    scans, stats = {}, {}
    for m in manifest["modalities"]:
        tar, stats_url = tar_path(root, m, name), stats_path(root, m, name)
        if not fs.exists(tar):
            problems.append(Problem(tar, None, "shard missing"))
            continue
        if not fs.exists(stats_url):  # the commit marker: without it the tar is an unfinished write, never read
            what = (
                "stats json missing: the shard was never committed (its tar is not read); rerun the job that writes it"
            )
            problems.append(Problem(stats_url, None, what))
            continue
        if (st := _read_stats(root, m, name, problems)) is not None:
            stats[m] = st
        scans[m] = _scan_tar(root, m, name, manifest, stats.get(m), deep, problems)
    # samples a derived modality (e.g. a teacher's) recorded as skipped: keys of the reference modality
    ref_keys = set(scans[_reference(scans)].keys) if scans else set()
    dropped = {m: skipped_refs(st) & ref_keys for m, st in stats.items()}
    for m, st in stats.items():  # the manifest counts the reference modality's samples
        _check_counts(root, m, name, count - len(dropped[m]), scans[m], st, problems)
    _check_alignment(root, name, scans, dropped, problems)
    return problems


def _verify_shard_safely(root: str, manifest: dict, shard: dict, deep: bool) -> list[Problem]:
    """`_verify_shard`, with anything it did not foresee reported as a problem of the shard, never raised."""
    try:
        return _verify_shard(root, manifest, shard, deep)
    except Exception as exc:  # the promise is one line per problem and no traceback, whatever the input
        where = fs.join(root, f"*/{shard['name']}.tar")
        return [Problem(where, None, f"cannot be checked ({type(exc).__name__}: {exc})")]


def _unlisted(root: str, manifest: dict, names: set[str]) -> list[Problem]:
    """Modality folders and shard tars on disk that the manifest does not list."""
    problems = []
    modalities = manifest["modalities"]
    for d in fs.listdir(root):
        if d not in modalities and "." not in d and any(f.endswith(".tar") for f in fs.listdir(fs.join(root, d))):
            problems.append(Problem(fs.join(root, d), None, "shards of a modality the manifest does not list"))
    for m in modalities:
        files = fs.listdir(fs.join(root, m))
        for f in files:  # a tar without its stats json was never committed: a running or killed writer's, ignored
            if f.endswith(".tar") and f[: -len(".tar")] not in names and f"{f[: -len('.tar')]}.json" in files:
                problems.append(Problem(fs.join(root, m, f), None, "extra shard: not listed in the manifest"))
    return problems


def verify(
    root: str, workers: int = 1, progress: Callable[[str, int], None] | None = None, *, deep: bool = False
) -> list[Problem]:
    """Check the whole shard set under `root`; returns every problem found (empty list = valid).

    `workers` threads check shards in parallel; `progress(shard_name, n_problems)` is called per shard.
    `deep` also checks every member against its digest in the stats json.
    """
    manifest_path = fs.join(root, MANIFEST)
    try:
        manifest = read_manifest(root)
    except (FormatError, OSError) as exc:
        what = str(exc).removeprefix(f"{manifest_path}: ")
        return [Problem(manifest_path, None, f"manifest unusable ({type(exc).__name__}: {what})")]

    shards = manifest["shards"]
    problems: list[Problem] = []
    if manifest.get("total") != sum(s["count"] for s in shards):
        problems.append(Problem(manifest_path, None, f"total {manifest.get('total')} is not the sum of shard counts"))
    problems += _unlisted(root, manifest, {s["name"] for s in shards})
    with ThreadPoolExecutor(max(1, workers)) as pool:
        found_per_shard = pool.map(lambda s: _verify_shard_safely(root, manifest, s, deep), shards)
        for shard, found in zip(shards, found_per_shard):
            problems.extend(found)
            if progress is not None:
                progress(shard["name"], len(found))
    return problems


def shards_without_digests(root: str) -> list[str]:
    """Stats jsons of the shard set written before per-member digests existed (their deep check is unavailable)."""
    manifest = read_manifest(root)
    paths = [stats_path(root, m, s["name"]) for m in manifest["modalities"] for s in manifest["shards"]]
    out = []
    for path in paths:
        try:
            if digest_field(read_json_file(path)) is None:
                out.append(path)
        except Exception:  # missing or damaged: verify reports it
            continue
    return out
