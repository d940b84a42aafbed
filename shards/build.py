"""Parallel, resumable shard building: `multimae-shard build`.

The source's items are cut by position into shards of `shard_size` (item i -> shard i // shard_size),
so shard contents do not depend on the worker count. One pool task builds one whole shard of every
modality with `ShardWriter` and commits it atomically; a bad input file is skipped inside its shard and
recorded in the stats with its reason, as is an item the source refused at enumeration (`Refused`: no label
row, a modality's file missing). An output folder holding a manifest.json that is not a shard set's is
refused before anything is written. Re-running on the same output keeps shards whose stats json
exists in every modality (after checking they were made from the same source, options and keys) and
redoes the rest, so a killed build loses at most the shards in flight. The manifest is written last.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import threading
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field

from tqdm import tqdm

from . import fs
from .format import MANIFEST, FormatError, read_manifest, shard_name, update_manifest
from .images import BadImage
from .lock import output_lock
from .source import Item, Members, Refused, Source
from .writer import ShardWriter, keys_digest, read_stats, stats_path, tar_path


class BuildError(FormatError):
    """The output cannot be built or resumed as asked (e.g. it holds shards of a different build)."""


@dataclass(frozen=True)
class ShardTask:
    out: str
    name: str
    modalities: tuple[str, ...]
    producer: dict
    maker: Callable[[Item], Members]
    items: list[Item]


@dataclass
class BuildSummary:
    out: str
    samples: int = 0  # samples in the output (kept + built)
    new_samples: int = 0  # samples written by this run
    shards: int = 0
    built: int = 0
    kept: int = 0
    bytes: int = 0
    skipped: Counter = field(default_factory=Counter)  # reason category -> count, whole output
    skipped_new: Counter = field(default_factory=Counter)  # the same, for the shards built by this run
    seconds: float = 0.0

    def format(self) -> str:
        rate = (self.new_samples + sum(self.skipped_new.values())) / self.seconds if self.seconds > 0 else 0.0
        skipped = sum(self.skipped.values())
        reasons = ", ".join(f"{r}: {n}" for r, n in sorted(self.skipped.items(), key=lambda x: (-x[1], x[0])))
        return (
            f"wrote {self.samples} samples in {self.shards} shards to {self.out} "
            f"({self.built} built, {self.kept} kept from an earlier run), "
            f"skipped {skipped}{f' ({reasons})' if reasons else ''}, {self.bytes / 1e6:.1f} MB, "
            f"{rate:.1f} samples/s over {self.seconds:.1f} s"
        )


def reason_category(reason: str) -> str:
    """'too large: 20000x20000 px' -> 'too large' (summaries group by category)."""
    return reason.split(":", 1)[0]


# --- worker side ----------------------------------------------------------------------------------

_tick: Callable[[int], None] | None = None


def _watch_parent(parent: int) -> None:
    """Exit when the build process is gone (killed): an idle pool worker would otherwise wait forever."""
    while os.getppid() == parent:
        time.sleep(0.5)
    os._exit(1)  # temporaries of a shard in flight are removed by the next (resuming) run


def _init_worker(counter, parent: int) -> None:  # runs in each pool process
    global _tick

    def tick(n: int) -> None:
        with counter.get_lock():
            counter.value += n

    _tick = tick
    threading.Thread(target=_watch_parent, args=(parent,), daemon=True).start()


def build_shard(task: ShardTask) -> dict:
    """Write one shard of every modality; returns {"count", "bytes", "skipped": [...]}."""
    writer = ShardWriter(task.out, task.name, list(task.modalities), task.producer)
    with writer:  # aborts (drops the temporaries) on any exception
        for item in task.items:
            try:
                if isinstance(item.loc, Refused):
                    raise BadImage(item.loc.reason)
                members = task.maker(item)
            except BadImage as e:
                writer.skip(item.ref, e.reason)
            else:
                writer.write(item.key, members)
            if _tick is not None:
                _tick(1)
        stats = writer.commit()
    first = stats[task.modalities[0]]
    return {"count": first["count"], "bytes": sum(s["bytes"] for s in stats.values()), "skipped": first["skipped"]}


# --- main side ------------------------------------------------------------------------------------


def _comparable(producer: dict) -> dict:
    return {k: v for k, v in producer.items() if k != "code_version"}


def check_output(out: str) -> None:
    """BuildError when `out` holds a manifest.json this toolkit cannot extend (another tool's, or damaged)."""
    if not fs.exists(fs.join(out, MANIFEST)):
        return
    try:
        read_manifest(out)
    except FormatError as e:
        raise BuildError(f"{e}; --out {out} holds another tool's files: use an empty --out") from None


def _plan(source: Source, out: str, shard_size: int) -> tuple[list[ShardTask], dict[str, dict]]:
    """Tasks for the shards still to build, and the stats of complete shards that are kept."""
    producer = source.producer()
    names = [shard_name(i) for i in range((len(source) + shard_size - 1) // shard_size)]
    present = {}  # one listing per modality folder: an object store answers one request, not one per shard
    for m in source.modalities:
        fs.remove_stale_temporaries(fs.join(out, m))
        present[m] = set(fs.listdir(fs.join(out, m)))
        extra = sorted(set(n.rsplit(".", 1)[0] for n in present[m] if n.endswith((".json", ".tar"))) - set(names))
        if extra:
            raise BuildError(
                f"{fs.join(out, m)} holds {extra[0]} (and {len(extra) - 1} more) that this build would "
                f"not produce: it was made by a different build; use an empty --out"
            )
    tasks, kept = [], {}
    for i, name in enumerate(names):
        items = source.items[i * shard_size : (i + 1) * shard_size]
        if all({f"{name}.json", f"{name}.tar"} <= present[m] for m in source.modalities):
            path = stats_path(out, source.modalities[0], name)
            stats = read_stats(out, source.modalities[0], name)
            if _comparable(stats.get("producer", {})) != _comparable(producer):
                raise BuildError(
                    f"{path} was built with {_comparable(stats.get('producer', {}))}, not "
                    f"{_comparable(producer)}: use a new --out to build with other options"
                )
            skipped = {s["ref"] for s in stats["skipped"]}
            expected = [it.key for it in items if it.ref not in skipped]
            if stats.get("keys_digest") != keys_digest(expected):
                raise BuildError(
                    f"{path}: its keys differ from what the source gives now (did the source change?); use a new --out"
                )
            kept[name] = {
                "count": stats["count"],
                "skipped": stats["skipped"],
                "bytes": sum(read_stats(out, m, name).get("bytes", 0) for m in source.modalities),
            }
            continue
        for m in source.modalities:  # partial leftovers of a killed run: stats first, so nothing looks complete
            for path, file in ((stats_path(out, m, name), f"{name}.json"), (tar_path(out, m, name), f"{name}.tar")):
                if file in present[m]:
                    fs.remove(path)
        tasks.append(ShardTask(out, name, tuple(source.modalities), producer, source.maker, items))
    return tasks, kept


def _run_pool(tasks: list[ShardTask], workers: int, bar: tqdm) -> dict[str, dict]:
    # fork: workers inherit the imported modules (webdataset pulls in torch: seconds per spawned process)
    ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
    counter = ctx.Value("q", 0)
    results: dict[str, dict] = {}
    start_n = bar.n
    with ProcessPoolExecutor(
        workers, mp_context=ctx, initializer=_init_worker, initargs=(counter, os.getpid())
    ) as pool:
        futures = {pool.submit(build_shard, t): t.name for t in tasks}
        pending = set(futures)
        try:
            while pending:
                done, pending = wait(pending, timeout=0.25, return_when=FIRST_COMPLETED)
                bar.update(start_n + counter.get_obj().value - bar.n)  # lock-free read; only workers lock
                for f in done:
                    results[futures[f]] = f.result()
        except BrokenProcessPool:
            pool.shutdown(cancel_futures=True)
            raise BuildError(
                "a build worker died (out of memory or killed); re-run the same command to resume"
            ) from None
        except BaseException:
            pool.shutdown(cancel_futures=True)
            raise
    return results


def build(source: Source, out: str, *, shard_size: int = 1000, workers: int = 1, progress: bool = True) -> BuildSummary:
    """Build (or resume building) the shard set of `source` under `out`; returns the summary.

    The build holds the lock of `out` (shards.lock): a second job writing into the same output stops with
    LockHeld instead of interleaving its shards with this one's.
    """
    if shard_size <= 0:
        raise BuildError("--shard-size must be positive")
    if workers <= 0:
        raise BuildError("--workers must be positive")
    check_output(out)
    fs.makedirs(out)
    with output_lock(out, "multimae-shard build"):
        return _build_locked(source, out, shard_size=shard_size, workers=workers, progress=progress)


def _build_locked(source: Source, out: str, *, shard_size: int, workers: int, progress: bool) -> BuildSummary:
    global _tick
    start = time.time()
    tasks, kept = _plan(source, out, shard_size)
    todo = sum(len(t.items) for t in tasks)
    bar = tqdm(
        total=len(source),
        initial=len(source) - todo,
        unit="img",
        desc=f"build {source.name}",
        disable=not progress,
        smoothing=0.1,
        mininterval=0.5,
    )
    try:
        if workers == 1 or len(tasks) <= 1:
            _tick = bar.update
            try:
                built = {t.name: build_shard(t) for t in tasks}
            finally:
                _tick = None
        else:
            built = _run_pool(tasks, min(workers, len(tasks)), bar)
    finally:
        bar.close()
    results = {**kept, **built}
    names = sorted(results)
    shards = [{"name": n, "count": results[n]["count"]} for n in names]
    update_manifest(out, source.modality_entries(), shards=shards, cls_classes=source.cls_classes)
    summary = BuildSummary(out=out, shards=len(names), built=len(built), kept=len(kept), seconds=time.time() - start)
    for name, r in results.items():
        summary.samples += r["count"]
        summary.bytes += r["bytes"]
        reasons = Counter(reason_category(s["reason"]) for s in r["skipped"])
        summary.skipped += reasons
        if name in built:
            summary.new_samples += r["count"]
            summary.skipped_new += reasons
    return summary
