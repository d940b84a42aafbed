"""The Ray pseudo-labeling job: RGB shards in, aligned teacher-label shards out.

One Ray task per input shard, run by a pool of teacher actors (one per GPU, or `actors` on CPU).
Inside an actor a shard flows through three overlapped stages:

    reader thread   shards.reader -> (key, decoded uint8 (H, W, 3) tensor | error), batched (bounded queue);
                    `decode_threads` samples decoded at once
    main thread     every configured teacher on the same decoded batch                      (torch)
    encoder thread  16-bit depth / 8-bit semseg / RGB normals PNGs (`encode_threads` samples at once) -> one
                    ShardWriter per output modality (in key order)

On a GPU the decode and encode stages default to half each of the node's CPUs per GPU, so one GPU's teachers
are fed at their own speed; on CPU they get one thread each (the cores run the teachers).

Normals derived from a depth teacher of the same job (`from:`) reuse that teacher's depth of the batch, so
the depth network runs once for both outputs.

Output shards are committed with `shards.writer.ShardWriter` (temp name + rename, or one uploaded object
on object storage; stats json last), so a re-run skips committed shards and a killed run loses only the
shards in flight. Input and output may be local paths (shared by every node) or object-store URLs; an actor
reads and writes them itself, and the driver holds the output's lock (`shards.lock`) for the whole job.
Actors are spread over the cluster's nodes. A crashed actor (or one on a node that died) is restarted by Ray
where resources allow, and its shard retried on any live actor (at most `max_retries` times). A sample that cannot be
decoded, labeled or encoded is recorded in the stats of every output modality and left out of all
of them, so the output shards stay aligned with each other; the rest of the shard is kept.
The manifest is updated atomically once every shard of a new modality is complete.
"""

from __future__ import annotations

import os
import queue
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import torch

from shards import fs, modalities
from shards.format import FormatError, encode_sample, modality_entry, read_manifest, update_manifest
from shards.lock import output_lock
from shards.nvjpeg import EncodedJpeg, decode_jpegs, nvjpeg_works
from shards.reader import decode_members, iter_shard_members
from shards.writer import ShardWriter, committed_shards, read_stats, stats_path

from .config import ConfigError, LabelConfig, check_inputs, input_shards, resolve_model

Event = dict[str, Any]


class JobError(RuntimeError):
    """The job could not run at all (e.g. Ray did not start); one line saying why."""


# (key, uint8 (H, W, 3) image, an `EncodedJpeg` left for `device_decode`, or None; error or None)
Sample = tuple[str, "torch.Tensor | EncodedJpeg | None", "str | None"]


# --- the work of one actor ------------------------------------------------------------------------


def stage_threads(cfg: LabelConfig, device: str) -> tuple[int, int]:
    """(decode, encode) host threads of one actor: the config's, else on a GPU half each of the node's CPUs per
    GPU (its teachers run on the GPU; the host's share of cores feeds them), on CPU 1 each (the cores run the
    teachers themselves)."""
    share = 1
    if device.startswith("cuda"):
        cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        share = max(1, cpus // max(1, torch.cuda.device_count()) // 2)
    return cfg.decode_threads or share, cfg.encode_threads or share


def decoded_batches(
    root: str, name: str, modality: str, batch_size: int, threads: int = 1, defer_jpeg: bool = False
) -> Iterator[list[Sample]]:
    """Batches of decoded samples of input shard `name`; a sample that fails to decode carries its error.

    The shard is read by `shards.reader.iter_shard_members`, the training reader's own path: plain tars,
    bounded regular members, valid adjacent keys, member digests, and, once the tar has been read to its
    end, the count and keys digest of its stats json. A tar that breaks any of these raises FormatError
    (after the batches read so far), and the caller commits nothing for the shard. `threads` samples are
    decoded at once (the decoders release the GIL), in key order. With `defer_jpeg`, a JPEG member that passes
    the header checks (8-bit colour, within the pixel limit) and its digest stays encoded, as an `EncodedJpeg`
    for `device_decode`; the others are decoded here.
    """

    def decode(raw: dict) -> Sample:
        try:
            img = decode_members(root, raw, [modality], [modality] if defer_jpeg else ())[modality]
            if isinstance(img, EncodedJpeg):
                return raw["__key__"], img, None
            return raw["__key__"], torch.from_numpy(img.copy()), None  # uint8 (H, W, 3)
        except FormatError as e:  # corrupt, damaged or missing member: recorded, not fatal
            return raw["__key__"], None, f"decode {modality}: {e}"

    batch: list[Sample] = []
    with ThreadPoolExecutor(threads) as pool:
        for sample in ordered_map(pool, decode, iter_shard_members(root, name, [modality]), ahead=2 * threads):
            batch.append(sample)
            if len(batch) == batch_size:
                yield batch
                batch = []
    if batch:
        yield batch


def decode_device(setting: str, device: str) -> str:
    """Where an actor decodes its input JPEGs: `cpu`, `cuda`, or `auto` = the actor's GPU when it runs on CUDA
    and nvJPEG decodes there, else the CPU (PNG and WebP members are always decoded on the CPU)."""
    on_gpu = device.startswith("cuda")
    if setting == "cuda" and not on_gpu:
        raise ConfigError(f"decode_device: cuda needs teacher actors on a GPU, this one runs on {device}")
    if setting == "cpu" or not on_gpu:
        return "cpu"
    return device if setting == "cuda" or nvjpeg_works(device) else "cpu"


def device_decode(batch: list[Sample], device: str, modality: str) -> list[Sample]:
    """The batch with its `EncodedJpeg`s decoded on `device` in one batched call ((H, W, 3) uint8 tensors there;
    `shards.nvjpeg.decode_jpegs`); one that does not decode carries its error."""
    todo = [i for i, (_, img, _) in enumerate(batch) if isinstance(img, EncodedJpeg)]
    out = list(batch)
    for i, img in zip(todo, decode_jpegs([batch[i][1] for i in todo], device)):
        key = batch[i][0]
        if isinstance(img, Exception):
            out[i] = (key, None, f"decode {modality}: {img}")
        else:
            out[i] = (key, img.permute(1, 2, 0), None)
    return out


def ordered_map(pool: ThreadPoolExecutor, fn: Callable, items: Iterator, ahead: int) -> Iterator:
    """fn(item) for each item, run on `pool` at most `ahead` at a time, yielded in the items' order."""
    window: deque[Future] = deque()
    try:
        for item in items:
            window.append(pool.submit(fn, item))
            if len(window) >= ahead:
                yield window.popleft().result()
        while window:
            yield window.popleft().result()
    finally:
        for f in window:
            f.cancel()


def prefetch(it: Iterator, depth: int) -> Iterator:
    """Run `it` in a background thread, at most `depth` items ahead; its exceptions re-raise here."""
    q: queue.Queue = queue.Queue(maxsize=depth)
    done, stop = object(), threading.Event()

    def put(item: Any) -> bool:
        while not stop.is_set():
            try:
                q.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def worker() -> None:
        try:
            for item in it:
                if not put(item):
                    return
            put(done)
        except BaseException as e:  # handed to the consumer
            put(e)

    thread = threading.Thread(target=worker, daemon=True)
    thread.start()
    try:
        while (item := q.get()) is not done:
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        thread.join()


class ShardLabeler:
    """Loads the configured teachers once and labels whole shards (the body of each Ray actor)."""

    def __init__(self, cfg: LabelConfig, device: str = "cpu"):
        from .teachers import NormalsTeacher, load_teacher

        fs.set_storage_options(cfg.storage_options)  # this actor's process, maybe on another node
        if device == "cpu":
            torch.set_num_threads(cfg.threads_per_actor)  # fixed thread count -> identical bytes across runs
        torch.manual_seed(0)
        self.cfg, self.device = cfg, device
        self.decode_threads, self.encode_threads = stage_threads(cfg, device)
        self.decode_device = decode_device(cfg.decode_device, device)
        self.encode_pool = ThreadPoolExecutor(self.encode_threads)
        # normals teacher -> the job's depth teacher it derives from (one depth network for both outputs)
        self.depth_source = {m: src for m in cfg.teachers if (src := cfg.depth_source(m)) is not None}
        teachers = {}
        for mod, t in sorted(cfg.teachers.items(), key=lambda item: item[0] in self.depth_source):
            if mod in self.depth_source:  # after its depth teacher, by the sort
                teachers[mod] = NormalsTeacher(teachers[self.depth_source[mod]], fov_deg=t.fov_deg, modality=mod)
            else:
                teachers[mod] = load_teacher(
                    t.kind,
                    resolve_model(t),
                    device=device,
                    dtype=t.dtype,
                    resolution=t.resolution,
                    modality=mod,
                    fov_deg=t.fov_deg,
                )
        self.teachers = {mod: teachers[mod] for mod in cfg.teachers}  # in config order (the manifest's)
        # One throw-away batch: first-call costs (kernel selection, weight packing, CUDA context) are paid
        # here, while the actor starts, not on the first shard. The processor resizes to the working resolution,
        # so every later batch runs the same model shapes but for its batch size.
        for teacher in self.teachers.values():
            teacher([torch.zeros(128, 128, 3, dtype=torch.uint8)] * 2)

    def describe(self) -> dict:
        """Process id, Ray node, device and, per output modality, the manifest entry of its teacher."""
        import ray

        entries = {  # a kind with one meaning (semseg: class_ids) takes the registry's
            mod: modality_entry(
                mod, t.producer, meaning=t.meaning or modalities.get(t.kind).meanings[0], classes=t.classes
            )
            for mod, t in self.teachers.items()
        }
        dtypes = {f"{t.producer['dtype']} ({t.dtype_reason})" for t in self.teachers.values()}
        return {
            "pid": os.getpid(),
            "node": ray.get_runtime_context().get_node_id(),
            "device": self.device,
            "dtype": "; ".join(sorted(dtypes)),
            "modalities": entries,
        }

    def _label(self, mods: list[str], images: list[torch.Tensor]) -> tuple[dict[str, list], dict[int, str]]:
        """Run each teacher on the batch; a failing batch is redone per image to isolate the bad samples."""
        outputs, failed = {}, {}
        for mod in sorted(mods, key=lambda m: m in self.depth_source):  # depth before the normals made from it
            label = self._labeler(mod, outputs)
            try:
                outputs[mod] = label(list(range(len(images))), images)
            except Exception:
                outputs[mod] = []
                for i, img in enumerate(images):
                    try:
                        outputs[mod].append(label([i], [img])[0])
                    except Exception as e:
                        outputs[mod].append(None)
                        failed.setdefault(i, f"{mod} teacher: {type(e).__name__}: {e}")
        return outputs, failed

    def _labeler(self, mod: str, outputs: dict[str, list]) -> Callable[[list[int], list[torch.Tensor]], list]:
        """label(batch indices, images) -> labels of `mod`: its teacher on the images or, for normals whose depth
        teacher has labeled this batch already, that depth turned into normals (no second depth network)."""
        teacher, source = self.teachers[mod], self.depth_source.get(mod)
        depth = outputs.get(source) if source is not None else None
        if depth is None:
            return lambda idx, imgs: teacher(imgs)
        return lambda idx, imgs: teacher.from_depth([depth[i] for i in idx])  # a failed depth (None) raises here

    def _encode(self, mod: str, value: torch.Tensor) -> dict[str, bytes]:
        teacher = self.teachers[mod]
        n = len(teacher.classes) if teacher.classes is not None else None
        return encode_sample(mod, value.cpu().numpy(), num_classes=n)

    def _write(
        self, writers: dict[str, ShardWriter], batch: list[Sample], outputs: dict[str, list], failed: dict[int, str]
    ) -> None:
        """Encode one labeled batch (`encode_threads` samples at once) and write it in key order; failures are
        skipped in every modality."""

        def encode(j: int) -> tuple[dict[str, dict[str, bytes]] | None, str | None]:
            """The members of decoded sample j of the batch in every output modality, or why there are none."""
            if j in failed:
                return None, failed[j]
            try:
                return {mod: self._encode(mod, outputs[mod][j]) for mod in writers}, None
            except Exception as e:
                return None, f"encode: {type(e).__name__}: {e}"

        decoded = sum(error is None for _, _, error in batch)
        encoded = iter(self.encode_pool.map(encode, range(decoded)))  # in order: the teachers' outputs
        for key, _, error in batch:
            members = None
            if error is None:
                members, error = next(encoded)
            if error is None:
                for mod, w in writers.items():
                    w.write(key, {mod: members[mod]})
            else:
                for w in writers.values():
                    w.skip(key, error)

    def label_shard(self, name: str, modalities: list[str]) -> dict:
        """Label input shard `name` into the output `modalities`; returns counts (raises on shard-level errors)."""
        cfg = self.cfg
        start = time.time()
        for m in modalities:  # local leftovers of an earlier attempt at this shard (its actor was killed)
            folder = fs.join(cfg.output_root, m)
            for stale in fs.listdir(folder) if fs.is_local(folder) else []:
                if stale.startswith(f"{name}.tar.tmp-"):
                    fs.remove(fs.join(folder, stale))
        writers = {m: ShardWriter(cfg.output_root, name, [m], producer=self.teachers[m].producer) for m in modalities}
        encoder = ThreadPoolExecutor(1)
        pending: Future | None = None
        try:
            on_device = self.decode_device != "cpu"
            batches = decoded_batches(cfg.input, name, cfg.rgb, cfg.batch_size, self.decode_threads, on_device)
            for batch in prefetch(batches, cfg.prefetch):
                if on_device:
                    batch = device_decode(batch, self.decode_device, cfg.rgb)
                images = [img for _, img, err in batch if err is None]
                outputs, failed = self._label(modalities, images) if images else ({}, {})
                if pending is not None:
                    pending.result()  # keeps writes in key order and at most one batch in the encoder
                pending = encoder.submit(self._write, writers, batch, outputs, failed)
            if pending is not None:
                pending.result()
            stats = [w.commit()[m] for m, w in writers.items()]
        except BaseException:
            for w in writers.values():
                w.abort()
            raise
        finally:
            encoder.shutdown()
        return {
            "shard": name,
            "modalities": list(modalities),
            "count": stats[0]["count"],
            "skipped": stats[0]["skipped"],
            "duration_s": round(time.time() - start, 3),
            "pid": os.getpid(),
        }


# --- the driver -----------------------------------------------------------------------------------


def plan(cfg: LabelConfig) -> tuple[list[dict], dict[str, list[str]]]:
    """(input shard entries, {shard: output modalities still missing}) — committed shards are skipped."""
    entries = input_shards(cfg)
    done = {m: committed_shards(cfg.output_root, m) for m in cfg.teachers}
    todo = {}
    for e in entries:
        missing = [m for m in cfg.teachers if e["name"] not in done[m]]
        if missing:
            todo[e["name"]] = missing
    return entries, todo


def _connect(cfg: LabelConfig) -> bool:
    """ray.init unless already connected; True when this call did it (and so must shut it down)."""
    if "RAY_AUTH_MODE" not in os.environ and os.path.exists(os.path.expanduser("~/.ray/auth_token")):
        # `ray start` turns token auth on when this token file exists, a driver connecting by address does
        # not; Ray reads the mode when first imported, so this must precede `import ray` (true for the CLI)
        os.environ["RAY_AUTH_MODE"] = "token"
    import ray

    if ray.is_initialized():
        return False
    kwargs: dict[str, Any] = {"address": cfg.ray.address, "log_to_driver": True}
    if cfg.ray.address == "local" and cfg.ray.num_cpus is not None:
        kwargs["num_cpus"] = cfg.ray.num_cpus
    try:
        ray.init(**kwargs)
    except Exception as e:  # no cluster at the address, a start-up timeout on a loaded machine, ...
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise JobError(f"could not start or reach Ray (ray.address={cfg.ray.address}): {first}") from None
    return True


def _start_actors(cfg: LabelConfig) -> tuple[list, list[dict]]:
    import ray

    gpus = int(ray.cluster_resources().get("GPU", 0))
    device = cfg.device if cfg.device != "auto" else ("cuda" if gpus else "cpu")
    if device == "cuda" and not gpus:
        raise ConfigError("device: cuda requested but the Ray cluster has no GPU")
    n = gpus if device == "cuda" else cfg.actors
    actor_cls = ray.remote(ShardLabeler).options(
        num_cpus=cfg.cpus_per_actor,
        num_gpus=1 if device == "cuda" else 0,
        max_restarts=-1,  # restarts are unbounded; shard retries are bounded in _dispatch
        max_task_retries=0,
        scheduling_strategy="SPREAD",  # over every node: a node that dies takes as few actors as possible
    )
    actors = [actor_cls.remote(cfg, device) for _ in range(n)]
    try:
        infos = ray.get([a.describe.remote() for a in actors])
    except ray.exceptions.RayActorError as e:
        raise RuntimeError(f"a teacher actor failed to start: {e}") from None
    return actors, infos


def _same_producer(a: dict | None, b: dict) -> bool:
    """Equal provenance; the same weights hash counts as the same model wherever its folder lies."""
    if a is None:
        return False
    if a.get("weights_sha256") and a.get("weights_sha256") == b.get("weights_sha256"):
        a, b = {k: v for k, v in a.items() if k != "model"}, {k: v for k, v in b.items() if k != "model"}
    return a == b


def _check_producers(cfg: LabelConfig, entries: list[dict], todo: dict, info: dict) -> None:
    """Committed shards must come from the configured teacher, or a re-run would mix two teachers."""
    for mod, entry in info["modalities"].items():
        for e in entries:
            if mod in todo.get(e["name"], []):
                continue
            old = read_stats(cfg.output_root, mod, e["name"]).get("producer")
            if not _same_producer(old, entry["producer"]):
                raise ConfigError(
                    f"teachers.{mod}: {stats_path(cfg.output_root, mod, e['name'])} was produced by "
                    f"{old}, not by the configured teacher {entry['producer']}: label into another "
                    f"output modality name or delete {fs.join(cfg.output_root, mod)}"
                )


def print_event(event: Event) -> None:
    """Default progress printer: one line per finished, retried or failed shard."""
    kind = event["event"]
    if kind == "shard_done":
        eta = event["eta_s"]
        print(
            f"[multimae-label] shards {event['done']}/{event['total']} | samples {event['samples']}/"
            f"{event['samples_total']} | {event['rate']:.1f} samples/s | ETA "
            f"{'?' if eta is None else time.strftime('%H:%M:%S', time.gmtime(eta))} | {event['shard']}: "
            f"{event['count']} labeled, {len(event['skipped'])} skipped",
            file=sys.stderr,
            flush=True,
        )
    elif kind == "shard_retry":
        print(
            f"[multimae-label] {event['shard']}: actor died ({event['error']}); retry "
            f"{event['attempt']}/{event['max_retries']}",
            file=sys.stderr,
            flush=True,
        )
    elif kind == "shard_failed":
        print(f"[multimae-label] {event['shard']}: FAILED: {event['error']}", file=sys.stderr, flush=True)
    elif kind == "actors_ready":
        print(
            f"[multimae-label] {len(event['actors'])} teacher actor(s) on {event['actors'][0]['device']}, "
            f"{event['actors'][0]['dtype']}; "
            f"{event['todo']} shard(s) to label, {event['already']} already complete",
            file=sys.stderr,
            flush=True,
        )


def _dispatch(
    cfg: LabelConfig,
    actors: list,
    infos: list[dict],
    todo: dict[str, list[str]],
    counts: dict[str, int],
    emit: Callable[[Event], None],
) -> tuple[list[dict], dict[str, str], int]:
    """Feed shards to idle actors, one in flight per actor; retry (bounded) shards whose actor died.

    Each hand-over is a `shard_started` event naming the actor (index, pid, node). A dead actor is restarted by
    Ray; it gets work again only once a `describe` ping answers (with the new process's pid and node).
    """
    import ray
    from ray.exceptions import ActorUnavailableError, RayActorError, RayTaskError

    queue_ = deque(todo)
    idle = list(actors)
    inflight: dict[Any, tuple[Any, str | None]] = {}  # ref -> (actor, shard name | None for a ping)
    attempts: dict[str, int] = {}
    results, failed, retries = [], {}, 0
    samples_total = sum(counts[n] for n in todo)
    samples, start = 0, time.time()

    where = {
        actor: {"actor": i, "pid": info["pid"], "node": info["node"]}
        for i, (actor, info) in enumerate(zip(actors, infos))
    }

    def ping(actor: Any) -> None:
        inflight[actor.describe.remote()] = (actor, None)

    while queue_ or any(name is not None for _, name in inflight.values()):
        while idle and queue_:
            actor, name = idle.pop(0), queue_.popleft()
            inflight[actor.label_shard.remote(name, todo[name])] = (actor, name)
            emit(
                {
                    "event": "shard_started",
                    "shard": name,
                    **where[actor],
                    "attempt": attempts.get(name, 0) + 1,
                }
            )
        if not inflight:  # every actor is gone for good
            for name in queue_:
                failed[name] = "no teacher actor left"
            break
        ready, _ = ray.wait(list(inflight), num_returns=1)
        for ref in ready:
            actor, name = inflight.pop(ref)
            try:
                res = ray.get(ref)
            except RayActorError as e:  # the actor process died (or is restarting after a death)
                if name is None:  # a ping: wait while Ray restarts the actor, drop it if it is gone for good
                    if isinstance(e, ActorUnavailableError):
                        time.sleep(0.2)
                        ping(actor)
                    continue
                attempts[name] = attempts.get(name, 0) + 1
                error = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
                if attempts[name] <= cfg.max_retries:
                    retries += 1
                    queue_.appendleft(name)
                    emit(
                        {
                            "event": "shard_retry",
                            "shard": name,
                            "attempt": attempts[name],
                            "max_retries": cfg.max_retries,
                            "error": error,
                        }
                    )
                else:
                    failed[name] = f"actor died {attempts[name]} times: {error}"
                    emit({"event": "shard_failed", "shard": name, "error": failed[name]})
                ping(actor)
                continue
            except RayTaskError as e:  # an error raised by the shard itself (bad tar, disk full)
                cause = e.cause if getattr(e, "cause", None) is not None else e
                failed[name] = f"{type(cause).__name__}: {cause}"
                emit({"event": "shard_failed", "shard": name, "error": failed[name]})
                idle.append(actor)
                continue
            idle.append(actor)
            if name is None:  # a restarted actor answered its ping
                where[actor].update(pid=res["pid"], node=res["node"])
                continue
            results.append(res)
            samples += counts[name]
            elapsed = time.time() - start
            rate = samples / elapsed if elapsed > 0 else 0.0
            left = samples_total - samples
            emit(
                {
                    "event": "shard_done",
                    **res,
                    "done": len(results),
                    "total": len(todo),
                    "samples": samples,
                    "samples_total": samples_total,
                    "rate": rate,
                    "eta_s": left / rate if rate > 0 else None,
                }
            )
    return results, failed, retries


def run(cfg: LabelConfig, on_event: Callable[[Event], None] | None = None) -> dict:
    """Label every input shard not yet labeled; returns the summary (also the Python API of `multimae-label`)."""
    fs.set_storage_options(cfg.storage_options)
    warnings = check_inputs(cfg)  # teacher weights and input shards, before Ray starts
    for warning in warnings:
        print(f"[multimae-label] warning: {warning}", file=sys.stderr, flush=True)
    with output_lock(cfg.output_root, "multimae-label"):  # one job writes into an output at a time
        return _run_locked(cfg, warnings, on_event or (print_event if cfg.progress else (lambda e: None)))


def _run_locked(cfg: LabelConfig, warnings: list[str], emit: Callable[[Event], None]) -> dict:
    start = time.time()
    out = cfg.output_root
    entries, todo = plan(cfg)
    counts = {e["name"]: e["count"] for e in entries}
    manifest_mods = read_manifest(out)["modalities"] if fs.exists(fs.join(out, "manifest.json")) else {}
    summary: dict[str, Any] = {
        "warnings": warnings,
        "input": cfg.input,
        "output": out,
        "modalities": list(cfg.teachers),
        "shards_total": len(entries),
        "shards_already_complete": len(entries) - len(todo),
        "shards_labeled": 0,
        "shards_failed": {},
        "samples_labeled": 0,
        "samples_skipped": [],
        "retries": 0,
        "actors": 0,
        "device": None,
        "manifest_updated": False,
    }
    if not todo and all(m in manifest_mods for m in cfg.teachers):
        summary["duration_s"] = round(time.time() - start, 3)
        summary["samples_per_s"] = 0.0
        return summary

    for mod in cfg.teachers:  # leftovers of killed writers are never visible as shards, but take space
        fs.remove_stale_temporaries(fs.join(out, mod))
    started = _connect(cfg)
    import ray

    actors: list = []
    try:
        actors, infos = _start_actors(cfg)
        _check_producers(cfg, entries, todo, infos[0])
        emit(
            {
                "event": "actors_ready",
                "actors": [{k: i[k] for k in ("pid", "node", "device", "dtype")} for i in infos],
                "todo": len(todo),
                "already": len(entries) - len(todo),
            }
        )
        label_start = time.time()
        results, failed, retries = _dispatch(cfg, actors, infos, todo, counts, emit)
        label_s = time.time() - label_start
    finally:
        for a in actors:
            ray.kill(a)
        if started:
            ray.shutdown()

    done = {m: committed_shards(out, m) for m in cfg.teachers}
    complete = all(e["name"] in done[m] for m in cfg.teachers for e in entries)
    if complete and not failed:
        shards = None if out == cfg.input else read_manifest(cfg.input)["shards"]
        update_manifest(out, infos[0]["modalities"], shards=shards)
    labeled = sum(r["count"] for r in results)
    summary.update(
        {
            "shards_labeled": len(results),
            "shards_failed": failed,
            "samples_labeled": labeled,
            "samples_skipped": [dict(s, shard=r["shard"]) for r in results for s in r["skipped"]],
            "retries": retries,
            "actors": len(infos),
            "device": infos[0]["device"],
            "manifest_updated": complete and not failed,
            "labeling_s": round(label_s, 3),
            "samples_per_s": round((labeled + sum(len(r["skipped"]) for r in results)) / label_s, 2)
            if label_s
            else 0.0,
            "duration_s": round(time.time() - start, 3),
        }
    )
    return summary


def format_summary(summary: dict) -> str:
    """The one-screen end-of-run summary."""
    lines = [
        f"multimae-label: {'done' if not summary['shards_failed'] else 'FINISHED WITH FAILURES'} in "
        f"{summary['duration_s']:.1f} s",
        f"  input    {summary['input']}   output {summary['output']}   modalities {', '.join(summary['modalities'])}",
        f"  shards   {summary['shards_labeled']} labeled, {summary['shards_already_complete']} already complete, "
        f"{len(summary['shards_failed'])} failed (of {summary['shards_total']}); {summary['retries']} retried",
        f"  samples  {summary['samples_labeled']} labeled, {len(summary['samples_skipped'])} skipped; "
        f"{summary['samples_per_s']:.1f} samples/s on {summary['actors']} actor(s) ({summary['device'] or '-'})",
        f"  manifest {'updated' if summary['manifest_updated'] else 'unchanged'}: "
        f"{fs.join(summary['output'], 'manifest.json')}",
    ]
    for s in summary["samples_skipped"][:10]:
        lines.append(f"  skipped  {s['shard']}/{s['ref']}: {s['reason']}")
    for name, err in summary["shards_failed"].items():
        lines.append(f"  FAILED   {name}: {err}")
    return "\n".join(lines)
