"""Streaming reader over an aligned shard set, built on webdataset.

One epoch is a webdataset pipeline of iterator-to-iterator stages:

    shard names     manifest order, shuffled by (seed, epoch); or drawn with replacement (resampled)
    split by node   every world_size-th shard from rank          (explicit rank/world_size or torch.distributed)
    split by worker every num_workers-th shard from worker id    (torch DataLoader worker)
    readahead       remote shard sets: the stats jsons and tars of the next `readahead` shards downloaded
                    concurrently, in background threads, while the current one is read (bounded memory)
    aligned shard   the tars of every chosen modality opened together (shards.tars: plain tars, bounded
                    regular members, valid keys, member digests) and zipped by key; a key mismatch raises
                    AlignmentError naming the shard and both keys
    shuffle         bounded buffer of raw member bytes, seeded by (seed, epoch, rank, worker)
    decode          shards.format.decode_sample: rgb uint8 (H, W, 3), depth float32 (H, W) in
                    teacher units via the stored range, semseg int64 (H, W), cls int
    transform       the user's function on the decoded dict

Only members the format names are decoded; anything else in a tar (e.g. ``.pyd`` / ``.pickle``) is
ignored as bytes, so nothing found in a shard is ever unpickled.

Splitting is by shard, so ranks see unequal sample counts when shards do not divide evenly, and
DDP stalls on the rank that runs out first. For training use ``resampled=True`` (every rank and
worker draws shards with its own seed, endlessly) and stop after a fixed number of steps per epoch.
"""

from __future__ import annotations

import json
import logging
import os
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from itertools import islice
from typing import Any, Literal, NamedTuple

import numpy as np
import torch
import torch.distributed as dist
import webdataset as wds
from webdataset.utils import make_seed

from . import fs
from .format import CODECS, FormatError, codec, decode_sample, modality_kind, parse_cls, read_manifest
from .images import preload_decoders
from .limits import MAX_JSON_BYTES
from .nvjpeg import encoded_jpeg
from .tars import iter_samples
from .writer import (
    check_stats,
    digest_problems,
    digests_by_key,
    keys_digest,
    read_stats,
    skipped_refs,
    stats_path,
    tar_path,
)

log = logging.getLogger(__name__)

OnError = Literal["raise", "skip"]
READAHEAD = 2  # default shards downloaded ahead per reader (remote shard sets)
READAHEAD_MAX_TAR_BYTES = 512 * 2**20  # a larger tar is streamed (read with seeks) rather than fetched whole


class Fetched(NamedTuple):
    """A shard downloaded ahead of its reading: checked stats per modality, and the tars' bytes (None: stream)."""

    stats: dict[str, dict]
    tars: dict[str, bytes | None]


class AlignmentError(FormatError):
    """Modality shards disagree on keys, order or shard names; never skipped, whatever the error policy."""


# --- one shard ------------------------------------------------------------------------------------


def _read_stats(root: str, modality: str, name: str) -> dict:
    path = stats_path(root, modality, name)
    if not fs.exists(path):
        raise FormatError(
            f"{path} not found: shard {name} of {modality!r} is incomplete (its stats json is written last)"
        )
    return read_stats(root, modality, name)


def _check_modalities(modalities: Sequence[str]) -> list[str]:
    if isinstance(modalities, str):
        modalities = [modalities]
    modalities = list(modalities)
    if not modalities or len(set(modalities)) != len(modalities):
        raise ValueError(f"modalities must be a non-empty list without repeats, got {modalities}")
    for m in modalities:
        modality_kind(m)
    return modalities


def fetch_shard(root: str, name: str, modalities: Sequence[str]) -> Fetched:
    """Download one shard's stats jsons, then its tars, each batch with concurrent requests.

    A tar is fetched as the byte range its stats json declares, plus one byte: a tar of another size is
    caught here (the reading then fails on the count check), and no claim makes the download unbounded.
    """
    modalities = _check_modalities(modalities)
    paths = [stats_path(root, m, name) for m in modalities]
    try:
        blobs = fs.cat_many(paths, ends=[MAX_JSON_BYTES + 1] * len(paths))
    except FileNotFoundError:
        missing = next(p for p in paths if not fs.exists(p))
        raise FormatError(f"{missing} not found: shard {name} is incomplete (its stats json is written last)") from None
    stats = {}
    for m, path, data in zip(modalities, paths, blobs):
        if len(data) > MAX_JSON_BYTES:
            raise FormatError(f"{path}: {len(data)} bytes, over the {MAX_JSON_BYTES}-byte limit of a json file")
        try:
            stats[m] = check_stats(json.loads(data), path, m, name)
        except (ValueError, RecursionError) as e:
            raise FormatError(f"{path}: not valid JSON ({e}): the file is damaged; restore or rebuild it") from None
    sizes = {m: stats[m].get("bytes") for m in modalities}
    whole = [m for m in modalities if type(sizes[m]) is int and 0 <= sizes[m] <= READAHEAD_MAX_TAR_BYTES]
    data = fs.cat_many([tar_path(root, m, name) for m in whole], ends=[sizes[m] + 1 for m in whole])
    tars: dict[str, bytes | None] = {m: None for m in modalities}
    tars.update(zip(whole, data))
    return Fetched(stats, tars)


def iter_shard_members(
    root: str, name: str, modalities: Sequence[str], *, verify_digests: bool = True, fetched: Fetched | None = None
) -> Iterator[dict[str, Any]]:
    """Raw aligned members of one shard, in order, without decoding.

    Yields {"__key__": key, "__shard__": name, "<modality>": {"rgb.jpg": b"...", "cls": b"3", ...}, ...}.
    Every tar is read through `shards.tars.iter_samples` (plain tars, bounded regular members, valid keys).
    With `verify_digests`, each member is checked against its digest in the stats json (BLAKE3, or SHA-256 in
    stats of earlier versions; stats written without digests are read unchecked); a sample with a damaged member carries
    "__damaged__": {modality: [what]}, and `decode_members` refuses it, so it costs one sample. Raises
    AlignmentError when the modality tars disagree on keys or length, FormatError when a tar is unreadable,
    a member is refused, or a tar holds other samples than its stats json says (count or keys digest,
    checked once the shard has been read to its end). `fetched`: the shard as `fetch_shard` downloaded it.
    """
    modalities = _check_modalities(modalities)
    urls = {m: tar_path(root, m, name) for m in modalities}
    stats = fetched.stats if fetched is not None else {m: _read_stats(root, m, name) for m in modalities}
    # A sample a modality recorded as skipped (e.g. an image its teacher could not label) is dropped
    # from every modality: an explicit, recorded gap, not a misalignment.
    dropped = {m: skipped_refs(stats[m]) for m in modalities}
    dropped_by_others = {m: set().union(*(dropped[o] for o in modalities if o != m)) for m in modalities}
    digests = {m: digests_by_key(stats[m]) if verify_digests else None for m in modalities}
    streams = {m: iter_samples(urls[m], data=fetched.tars[m] if fetched else None) for m in modalities}
    keys: dict[str, list[str]] = {m: [] for m in modalities}  # every key read from each tar, in order
    seen: set[str] = set()
    n = 0

    def advance(m: str) -> tuple[str, dict[str, bytes]] | None:
        row = next(streams[m], None)
        if row is not None:
            keys[m].append(row[0])
        return row

    def gap(m: str, row: tuple | None) -> bool:  # this row is a sample another modality skipped
        return row is not None and row[0] in dropped_by_others[m]

    try:
        row = {m: advance(m) for m in modalities}
        while True:
            for m in modalities:
                while gap(m, row[m]):
                    row[m] = advance(m)
            ended = [m for m in modalities if row[m] is None]
            if ended:
                going = [m for m in modalities if row[m] is not None]
                if going:
                    raise AlignmentError(
                        f"shard {name} misaligned: {', '.join(urls[m] for m in ended)} ended after {n} samples but "
                        f"{urls[going[0]]} goes on with key {row[going[0]][0]!r}"
                    )
                break
            ref = modalities[0]
            key = row[ref][0]
            for m in modalities[1:]:
                if row[m][0] != key:
                    raise AlignmentError(
                        f"shard {name} misaligned at sample {n}: {urls[ref]} has key {key!r} "
                        f"but {urls[m]} has key {row[m][0]!r}"
                    )
            if key in seen:
                raise AlignmentError(f"shard {name}: key {key!r} appears twice in {urls[ref]}")
            seen.add(key)
            sample: dict[str, Any] = {"__key__": key, "__shard__": name}
            for m in modalities:
                sample[m] = row[m][1]
                if digests[m] is not None and (damage := digest_problems(key, row[m][1], digests[m])):
                    sample.setdefault("__damaged__", {})[m] = damage
            n += 1
            yield sample
            row = {m: advance(m) for m in modalities}
    finally:
        for st in streams.values():
            st.close()
    for m in modalities:
        _check_against_stats(urls[m], stats_path(root, m, name), keys[m], stats[m])


def _check_against_stats(url: str, path: str, keys: list[str], stats: dict) -> None:
    """A tar read to its end holds exactly the samples its stats json describes: same count, same keys in order."""
    if len(keys) != stats["count"]:
        raise FormatError(
            f"{url}: read {len(keys)} samples but {path} says {stats['count']}: the tar is truncated or corrupt"
        )
    if keys_digest(keys) != stats.get("keys_digest"):
        raise FormatError(f"{url}: its keys differ from the keys_digest in {path}: the tar was altered after writing")


def decode_members(
    root: str, sample: dict[str, Any], modalities: Sequence[str], defer_jpeg: Sequence[str] = ()
) -> dict[str, Any]:
    """Decode one aligned raw sample (from iter_shard_members) into numpy arrays (+ "cls": int when stored).

    A modality in `defer_jpeg` whose member is a JPEG a device decoder takes stays encoded, as a
    `shards.nvjpeg.EncodedJpeg` (its digest and header checked). Raises FormatError naming the tar and key
    when a member is damaged (digest), does not decode, or shapes disagree.
    """
    key, name = sample["__key__"], sample["__shard__"]
    out: dict[str, Any] = {"__key__": key, "__shard__": name}
    for m, damage in sample.get("__damaged__", {}).items():
        raise FormatError(
            f"{tar_path(root, m, name)}: sample {key!r} does not decode: {damage[0]}"
            + (f" (and {len(damage) - 1} more)" if len(damage) > 1 else "")
            + "; rebuild the shard or restore it from a copy"
        )
    for m in modalities:
        members = sample[m]
        try:
            jpeg = members.get(f"{m}.jpg") if m in defer_jpeg else None
            encoded = encoded_jpeg(jpeg) if jpeg is not None else None
            out[m] = encoded if encoded is not None else decode_sample(m, members)
            if "cls" in members and "cls" not in out:
                out["cls"] = parse_cls(members["cls"])
        except Exception as exc:  # PIL / zlib / json / FormatError from the codec
            raise FormatError(
                f"{tar_path(root, m, name)}: sample {key!r} does not decode ({type(exc).__name__}: {exc})"
            ) from exc
    shapes = {m: out[m].shape[:2] for m in modalities}
    if len(set(shapes.values())) > 1:
        raise FormatError(f"shard {name} sample {key!r}: modalities differ in size {shapes}")
    return out


def iter_shard(
    root: str,
    name: str,
    modalities: Sequence[str],
    on_error: OnError = "raise",
    skipped: dict | None = None,
    *,
    verify_digests: bool = True,
) -> Iterator[dict[str, Any]]:
    """Decoded samples of one shard, in stored order, aligned by key (used by the labeling job).

    With on_error="skip" a sample that does not decode is dropped and a corrupt tar ends the shard;
    both are counted in `skipped` ({"shards": n, "samples": n}) when given. Misalignment always raises.
    """
    _check_on_error(on_error)
    modalities = _check_modalities(modalities)
    counters = skipped if skipped is not None else {}
    yield from wds.DataPipeline(
        wds.SimpleShardList([name]),
        _aligned(root, modalities, on_error, counters, verify_digests),
        _decoded(root, modalities, on_error, counters),
    )


# --- pipeline stages ------------------------------------------------------------------------------


def _check_on_error(on_error: str) -> None:
    if on_error not in ("raise", "skip"):
        raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")


def _count(counters: dict, what: str, exc: Exception) -> None:
    counters[what] = counters.get(what, 0) + 1
    log.warning("skipping %s: %s", "rest of shard" if what == "shards" else "sample", exc)


def _readahead_(names, root: str, modalities: list[str], depth: int):
    """{"url": shard name} -> the same with "fetched": its download, started `depth` shards ahead in threads.

    At most `depth` downloads run at once and at most `depth` + 1 shards are held in memory. A download's
    error reaches the reader with its shard (`_aligned_` decides whether it is skipped).
    """
    pending: deque = deque()
    with ThreadPoolExecutor(depth, thread_name_prefix="shard-readahead") as pool:
        try:
            for item in names:
                pending.append((item, pool.submit(fetch_shard, root, item["url"], modalities)))
                if len(pending) > depth:
                    item, future = pending.popleft()
                    yield {**item, "fetched": future}
            while pending:
                item, future = pending.popleft()
                yield {**item, "fetched": future}
        finally:
            for _, future in pending:
                future.cancel()


def _aligned_(names, root: str, modalities: list[str], on_error: OnError, counters: dict, verify_digests: bool):
    """{"url": shard name} -> raw aligned samples; a corrupt shard ends that shard under "skip"."""
    for item in names:
        try:
            fetched = item["fetched"].result() if "fetched" in item else None
            yield from iter_shard_members(root, item["url"], modalities, verify_digests=verify_digests, fetched=fetched)
        except AlignmentError:
            raise
        except FormatError as exc:
            if on_error == "raise":
                raise
            _count(counters, "shards", exc)


def _decoded_(samples, root: str, modalities: list[str], on_error: OnError, counters: dict, defer_jpeg=()):
    """Raw aligned samples -> decoded numpy samples; a sample that does not decode is dropped under "skip"."""
    for sample in samples:
        try:
            out = decode_members(root, sample, modalities, defer_jpeg)
        except FormatError as exc:
            if on_error == "raise":
                raise
            _count(counters, "samples", exc)
            continue
        yield out


def _every_(src, offset: int, step: int):
    """Items offset, offset + step, ... (node and worker splitting)."""
    yield from islice(src, offset, None, step)


_readahead = wds.pipelinefilter(_readahead_)
_aligned = wds.pipelinefilter(_aligned_)
_decoded = wds.pipelinefilter(_decoded_)
_every = wds.pipelinefilter(_every_)


def _constant(value: int) -> int:
    return value


# --- the dataset ----------------------------------------------------------------------------------


class ShardDataset(torch.utils.data.IterableDataset):
    """Aligned samples of the chosen modalities of a shard set, streamed as numpy dicts.

    Yields {"__key__": str, "__shard__": str, "<modality>": array, ..., "cls": int (when rgb has it)}
    with modality names as stored (e.g. "depth_gt"). Call `set_epoch(epoch)` before each epoch to
    reshuffle; with a DataLoader keep `persistent_workers=False` so workers see the new epoch.
    `skipped` counts {"shards", "samples"} skipped under on_error="skip" in this process (a
    DataLoader worker counts its own; the warnings in the log name each one).

    Without resampling, each rank takes every world_size-th shard and each DataLoader worker every
    num_workers-th of those, so one epoch reads every sample exactly once over all ranks and workers.
    With `resampled=True` the stream is endless and every rank and worker draws shards with its own
    seed, whatever the split flags say.

    `verify_digests` (default on) checks every member read against the digest its stats json records,
    so a flipped byte or an edited depth range raises FormatError instead of training on wrong values;
    shards written without digests are read unchecked.

    `readahead` (remote shard sets only; local disk needs none): how many shards each reader downloads
    ahead, concurrently, while it reads the current one; 0 streams each tar when it is reached. Memory per
    reader grows by up to `readahead` + 1 shards (all chosen modalities). The storage options of the
    process that builds the dataset travel with it into DataLoader workers.

    `defer_jpeg`: modalities whose JPEG members come out encoded, as `shards.nvjpeg.EncodedJpeg` (digest and
    header checked), for a consumer that decodes them in batches on its GPU; other members of those
    modalities (PNG, WebP, CMYK or 12-bit JPEGs) are decoded here as usual.
    """

    def __init__(
        self,
        root: str,
        modalities: Sequence[str],
        *,
        shuffle_shards: bool = False,
        shuffle_buffer: int = 0,
        seed: int = 0,
        resampled: bool = False,
        split_by_node: bool = True,
        split_by_worker: bool = True,
        on_error: OnError = "raise",
        shards: Sequence[str] | None = None,
        transform: Callable[[dict], dict] | None = None,
        rank: int | None = None,
        world_size: int | None = None,
        verify_digests: bool = True,
        readahead: int = READAHEAD,
        defer_jpeg: Sequence[str] = (),
    ):
        super().__init__()
        _check_on_error(on_error)
        if readahead < 0:
            raise ValueError(f"readahead must be >= 0, got {readahead}")
        if (rank is None) != (world_size is None) or (world_size is not None and not 0 <= rank < world_size):
            raise ValueError(f"give both rank and world_size with 0 <= rank < world_size, got {rank}, {world_size}")
        if shuffle_buffer < 0:
            raise ValueError(f"shuffle_buffer must be >= 0, got {shuffle_buffer}")
        self.root = root
        self.modalities = _check_modalities(modalities)
        self.shuffle_shards, self.shuffle_buffer, self.seed = shuffle_shards, shuffle_buffer, seed
        self.resampled, self.split_by_node, self.split_by_worker = resampled, split_by_node, split_by_worker
        self.on_error, self.transform, self.verify_digests = on_error, transform, verify_digests
        self.rank, self.world_size = rank, world_size
        self.readahead = readahead if not fs.is_local(root) else 0
        self.defer_jpeg = tuple(defer_jpeg)
        self.storage_options = fs.storage_options()
        self.epoch = 0
        self.skipped: dict[str, int] = {"shards": 0, "samples": 0}

        manifest = read_manifest(root)
        stored = manifest.get("modalities", {})
        missing = [m for m in self.modalities if m not in stored]
        if missing:
            raise FormatError(f"{fs.join(root, 'manifest.json')}: no modality {missing} (stored: {sorted(stored)})")
        counts = {s["name"]: int(s["count"]) for s in manifest.get("shards", [])}
        names = list(counts) if shards is None else list(shards)
        unknown = [n for n in names if n not in counts]
        if unknown:
            raise FormatError(f"{fs.join(root, 'manifest.json')}: shards {unknown[:5]} are not in the manifest")
        if not names:
            raise FormatError(f"{root}: no shards to read")
        _check_shard_files(root, self.modalities, names, set(counts))
        if any(codec(m) is CODECS["jpeg"] for m in self.modalities):
            preload_decoders()  # here, once, rather than in every DataLoader worker of every epoch
        self.shard_names = names
        self.num_samples = sum(counts[n] for n in names)  # over all ranks and workers

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _node(self) -> tuple[int, int]:
        if self.world_size is not None:
            return self.rank, self.world_size
        if dist.is_available() and dist.is_initialized():
            return dist.get_rank(), dist.get_world_size()
        if "RANK" in os.environ and "WORLD_SIZE" in os.environ:  # torchrun, before init_process_group
            return int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        return 0, 1

    def __iter__(self) -> Iterator[dict[str, Any]]:
        fs.set_storage_options(self.storage_options)  # a spawned DataLoader worker starts without them
        rank, world_size = self._node()
        info = torch.utils.data.get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        if self.resampled:
            # every rank and worker draws its own endless shard sequence (seeded by seed, epoch, rank, worker)
            source = wds.ResampledShards(
                self.shard_names,
                seed=self.seed,
                deterministic=True,
                worker_seed=partial(_constant, make_seed(rank, worker)),
            )
            source.epoch = self.epoch - 1  # ResampledShards counts one up when iterated
            splitters = []
        else:
            order_seed = make_seed(self.seed, self.epoch) if self.shuffle_shards else None
            source = wds.SimpleShardList(self.shard_names, seed=order_seed)  # same order on every rank/worker
            splitters = []
            if self.split_by_node:
                splitters.append(_every(rank, world_size))
            if self.split_by_worker:
                splitters.append(_every(worker, num_workers))
            readers = (world_size if self.split_by_node else 1) * (num_workers if self.split_by_worker else 1)
            if readers > len(self.shard_names) and worker == 0 and rank == 0:
                log.warning(
                    "%d shards for %d readers (ranks x workers): some read nothing", len(self.shard_names), readers
                )
        stages = [source, *splitters]
        if self.readahead:
            stages.append(_readahead(self.root, self.modalities, self.readahead))
        stages.append(_aligned(self.root, self.modalities, self.on_error, self.skipped, self.verify_digests))
        if self.shuffle_buffer > 1:
            seed = make_seed(self.seed, self.epoch, rank, worker)
            stages.append(wds.shuffle(self.shuffle_buffer, self.shuffle_buffer, seed=seed))
        stages.append(_decoded(self.root, self.modalities, self.on_error, self.skipped, self.defer_jpeg))
        if self.transform is not None:
            stages.append(wds.map(self.transform))
        return iter(wds.DataPipeline(*stages))


def _check_shard_files(root: str, modalities: list[str], names: list[str], manifest_names: set[str]) -> None:
    """Every chosen shard exists and is complete in every modality; no modality has shards the manifest lacks.

    A tar without its stats json is an uncommitted write (a killed or running writer): it does not count.
    """
    for m in modalities:
        files = set(fs.listdir(fs.join(root, m)))
        tars = {f[: -len(".tar")] for f in files if f.endswith(".tar") and f"{f[: -len('.tar')]}.json" in files}
        extra = sorted(tars - manifest_names)
        if extra:
            raise AlignmentError(f"{fs.join(root, m)} has shards {extra[:5]} that the manifest does not list")
        absent = [n for n in names if f"{n}.tar" not in files or f"{n}.json" not in files]
        if absent:
            raise FormatError(
                f"{fs.join(root, m)}: shards {absent[:5]} missing or incomplete (no tar or no stats json)"
                + (f" and {len(absent) - 5} more" if len(absent) > 5 else "")
            )


def to_torch(sample: dict[str, Any]) -> dict[str, Any]:
    """numpy arrays -> torch tensors (rgb stays uint8 (H, W, 3)), "cls" -> int64 scalar tensor; other keys kept."""
    out: dict[str, Any] = {}
    for k, v in sample.items():
        if isinstance(v, np.ndarray):
            out[k] = torch.from_numpy(v if v.flags.writeable else v.copy())
        elif k == "cls":
            out[k] = torch.tensor(v, dtype=torch.int64)
        else:
            out[k] = v
    return out
