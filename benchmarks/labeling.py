"""Labeling throughput: the job end to end vs bare teacher forwards vs a naive transformers-pipeline loop,
in float32 and in bfloat16 (teacher autocast), all in the same run.

    python benchmarks/labeling.py                      # CPU, shipped small teachers, through Ray
    python benchmarks/labeling.py --device cuda --real-size --no-ray --json out.json

Per dtype, measured in the same run on the same synthetic shards:
- job:      samples/s of the labeling job (read, decode, all teachers, encode, commit shards); Ray startup
            and teacher loading excluded (the job's own `labeling_s`). `--no-ray` runs the same per-shard
            code (`ShardLabeler.label_shard`, the body of each actor) in this process, for machines without Ray.
- bare:     the same teachers on the same batches of pre-decoded tensors, nothing else (the ceiling).
- naive:    a per-image loop of `transformers.pipeline("depth-estimation")` and
            `pipeline("image-segmentation", subtask="semantic")` on PIL images.
Prints efficiency = job / bare (target >= 0.85), speedup = job / naive (target >= 3; the naive loop runs in
float32) and the job's bfloat16 / float32 ratio.

`--null-teachers` measures the host side alone: the actor's per-shard code (read, decode, batch, encode, write,
commit) with every teacher replaced by a same-shape, near-free computation, in this process; it prints the CPU
ms per sample of the whole process (every thread) and the samples/s, for the default and for more host threads
(target <= 4 ms per sample at 256 px, so 8 host cores feed 2000 samples/s to one GPU's teachers).

    python benchmarks/labeling.py --null-teachers --size 256 --num 512
`--real-size` uses random-weight DPT-Hybrid and Mask2Former Swin-S (COCO panoptic, 133 classes) models
built from config objects (no download), saved with save_pretrained and loaded like any checkpoint.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

# `python benchmarks/labeling.py` puts benchmarks/ first on sys.path, where this file would shadow the
# `labeling` package it measures
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != os.path.dirname(os.path.abspath(__file__))]

import torch  # noqa: E402

from labeling.config import LabelConfig, TeacherConfig  # noqa: E402
from labeling.job import ShardLabeler, decoded_batches, run  # noqa: E402
from labeling.teachers import DEFAULT_TEACHERS, load_teacher  # noqa: E402
from shards.format import encode_sample, modality_entry, shard_name, update_manifest  # noqa: E402
from shards.synthetic import render_scene, scene_key  # noqa: E402
from shards.writer import ShardWriter  # noqa: E402


def make_input(root: Path, num: int, shard_size: int, size: int) -> list[str]:
    shards = []
    for s in range(0, num, shard_size):
        name = shard_name(len(shards))
        with ShardWriter(str(root), name, ["rgb"]) as w:
            for i in range(s, min(num, s + shard_size)):
                w.write(scene_key(3, i), {"rgb": encode_sample("rgb", render_scene(3, i, size=size)["rgb"])})
        shards.append({"name": name, "count": min(shard_size, num - s)})
    update_manifest(str(root), {"rgb": modality_entry("rgb", {}, meaning="srgb")}, shards=shards)
    return [e["name"] for e in shards]


def real_size_teachers(folder: Path) -> dict[str, str]:
    """Random-weight DPT-Hybrid (MiDaS) and Mask2Former Swin-S (133 classes) saved in HF format."""
    from transformers import (
        DPTConfig,
        DPTForDepthEstimation,
        DPTImageProcessor,
        Mask2FormerConfig,
        Mask2FormerForUniversalSegmentation,
        Mask2FormerImageProcessor,
        SwinConfig,
    )

    torch.manual_seed(0)
    dpt = DPTForDepthEstimation(
        DPTConfig(
            is_hybrid=True,
            image_size=384,
            neck_hidden_sizes=[256, 512, 768, 768],
            reassemble_factors=[1, 1, 1, 0.5],
            backbone_out_indices=[2, 5, 8, 11],
        )
    )
    dpt.save_pretrained(folder / "dpt-hybrid")
    DPTImageProcessor(
        size={"height": 384, "width": 384},
        keep_aspect_ratio=False,
        ensure_multiple_of=1,
        do_normalize=True,
        image_mean=[0.5] * 3,
        image_std=[0.5] * 3,
    ).save_pretrained(folder / "dpt-hybrid")
    swin = SwinConfig(
        embed_dim=96,
        depths=[2, 2, 18, 2],
        num_heads=[3, 6, 12, 24],
        window_size=7,
        out_features=["stage1", "stage2", "stage3", "stage4"],
    )
    m2f = Mask2FormerForUniversalSegmentation(
        Mask2FormerConfig(
            backbone_config=swin,
            num_labels=133,
            id2label={i: f"class{i}" for i in range(133)},
            label2id={f"class{i}": i for i in range(133)},
        )
    )
    m2f.save_pretrained(folder / "m2f-swin-s")
    Mask2FormerImageProcessor(
        size={"shortest_edge": 384, "longest_edge": 1333}, size_divisor=32, ignore_index=255, do_reduce_labels=False
    ).save_pretrained(folder / "m2f-swin-s")
    return {"depth": str(folder / "dpt-hybrid"), "semseg": str(folder / "m2f-swin-s")}


def _bare_worker(cfg: LabelConfig, names: list[str], device: str, threads: int, barrier, results) -> None:
    torch.set_num_threads(threads)
    teachers = [load_teacher(t.kind, t.model, device=device, dtype=t.dtype) for t in cfg.teachers.values()]
    batches = [[img for _, img, _ in b] for n in names for b in decoded_batches(cfg.input, n, cfg.rgb, cfg.batch_size)]
    for t in teachers:  # warm-up
        t(batches[0])
    sync(device)
    barrier.wait()  # every worker has loaded and decoded: time the forwards only
    start = time.time()
    for b in batches:
        for t in teachers:
            t(b)
    sync(device)
    results.put((sum(len(b) for b in batches), start, time.time()))


def bare(cfg: LabelConfig, names: list[str], device: str, workers: int, threads: int) -> float:
    """Samples/s of the teachers alone on the same batches, decoded beforehand, in the job's layout:
    `workers` processes (one per actor) with `threads` torch threads each, shards split round-robin."""
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    barrier, results = ctx.Barrier(workers), ctx.Queue()
    procs = [
        ctx.Process(target=_bare_worker, args=(cfg, names[i::workers], device, threads, barrier, results))
        for i in range(workers)
    ]
    for p in procs:
        p.start()
    done = [results.get() for _ in procs]
    for p in procs:
        p.join()
    return sum(n for n, _, _ in done) / (max(e for _, _, e in done) - min(s for _, s, _ in done))


def naive(cfg: LabelConfig, names: list[str], device: str, limit: int) -> float:
    """Samples/s of a per-image loop over the transformers pipelines (PIL in, PIL/tensors out)."""
    from PIL import Image
    from transformers import pipeline

    kw = {
        "device": device,
        "dtype": {"bfloat16": torch.bfloat16, "float16": torch.float16}.get(cfg.teachers["depth"].dtype, torch.float32),
    }
    depth = pipeline("depth-estimation", model=cfg.teachers["depth"].model, **kw)
    seg = pipeline("image-segmentation", model=cfg.teachers["semseg"].model, **kw)
    images = [
        Image.fromarray(img.numpy()) for b in decoded_batches(cfg.input, names[0], cfg.rgb, 1) for _, img, _ in b
    ][:limit]
    depth(images[0]), seg(images[0], subtask="semantic")  # warm-up
    sync(device)
    start = time.perf_counter()
    for im in images:
        depth(im)
        seg(im, subtask="semantic")
    sync(device)
    return len(images) / (time.perf_counter() - start)


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def job_rate(cfg: LabelConfig, names: list[str], args) -> float:
    """Samples/s of the labeling job, through Ray or (--no-ray) the actor's code in this process."""
    if not args.no_ray:
        cfg.ray.address, cfg.ray.num_cpus = "local", args.actors
        return run(cfg)["samples_per_s"]
    labeler = ShardLabeler(cfg, args.device)
    labeler.label_shard(names[0], ["depth", "semseg"])  # warm-up (rewrites shard 0)
    sync(args.device)
    start = time.perf_counter()
    for n in names:
        labeler.label_shard(n, ["depth", "semseg"])
    sync(args.device)
    return args.num / (time.perf_counter() - start)


class NullTeacher:
    """A teacher's stand-in: outputs of the same shapes and dtypes (depth float32 (H, W), class ids int64 (H, W),
    normals float32 (H, W, 3)) for almost no computation, and the teacher's producer, classes and meaning."""

    def __init__(self, teacher: Any) -> None:
        self.kind, self.classes, self.producer = teacher.kind, teacher.classes, teacher.producer
        self.meaning, self.dtype_reason = teacher.meaning, teacher.dtype_reason

    def __call__(self, images: list[torch.Tensor]) -> list[torch.Tensor]:
        if self.classes is not None:
            return [(img[..., 0] // 64).long() for img in images]  # 4 classes
        if self.kind == "normals":
            return [torch.nn.functional.normalize(img.float() - 127.5, dim=-1) for img in images]
        return [img[..., 0].float() + 1.0 for img in images]


def null_teacher_cost(work: Path, names: list[str], args) -> dict:
    """Host CPU ms per sample of the actor's per-shard code with null teachers, per (decode, encode) threads and
    decode device (on a GPU: the CPU's libjpeg-turbo vs batched nvJPEG)."""
    out = {}
    for threads, decode in [(t, dev) for t in args.host_threads for dev in args.decode_devices]:
        cfg = LabelConfig(
            input=str(work / "data"),
            batch_size=args.batch_size,
            progress=False,
            decode_threads=threads,
            encode_threads=threads,
            decode_device=decode,
            teachers={m: TeacherConfig(m) for m in ("depth", "semseg")},
        )
        labeler = ShardLabeler(cfg, args.device)
        labeler.teachers = {m: NullTeacher(t) for m, t in labeler.teachers.items()}
        labeler.label_shard(names[0], list(labeler.teachers))  # warm-up (rewrites shard 0)
        sync(args.device)
        cpu, wall = time.process_time(), time.perf_counter()
        for n in names:
            labeler.label_shard(n, list(labeler.teachers))
        sync(args.device)
        cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
        result = {"cpu_ms_per_sample": 1000 * cpu / args.num, "samples_per_s": args.num / wall}
        out[f"threads {threads}, decode on {labeler.decode_device}"] = result
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--num", type=int, default=256, help="synthetic scenes to label")
    p.add_argument("--shard-size", type=int, default=64)
    p.add_argument("--size", type=int, default=128, help="stored rgb size")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"], choices=["float32", "bfloat16", "float16"])
    p.add_argument("--actors", type=int, default=2, help="CPU actors of the job (the bare baseline: as many processes)")
    p.add_argument("--real-size", action="store_true", help="random-weight DPT-Hybrid + Mask2Former Swin-S")
    p.add_argument("--no-ray", action="store_true", help="run the actor's per-shard code in this process")
    p.add_argument("--naive-num", type=int, default=32, help="images for the naive pipeline loop (0: skip it)")
    p.add_argument("--json", help="also write the results as JSON here")
    p.add_argument("--null-teachers", action="store_true", help="the host side alone (see above)")
    p.add_argument("--host-threads", type=int, nargs="+", default=[1, 2], help="--null-teachers: decode/encode threads")
    p.add_argument(
        "--decode-devices", nargs="+", default=["cpu"], choices=["auto", "cpu", "cuda"], help="--null-teachers"
    )
    args = p.parse_args(argv)
    if args.null_teachers:
        work = Path(tempfile.mkdtemp(prefix="bench-label-"))
        try:
            names = make_input(work / "data", args.num, args.shard_size, args.size)
            results = null_teacher_cost(work, names, args)
        finally:
            shutil.rmtree(work, ignore_errors=True)
        print(f"null teachers | {args.num} images {args.size}px | batch {args.batch_size} | in-process, {args.device}")
        for setting, r in results.items():
            print(
                f"{setting}: host {r['cpu_ms_per_sample']:.2f} ms CPU per sample (target <= 4), "
                f"{r['samples_per_s']:.0f} samples/s"
            )
        if args.json:
            import json

            with open(args.json, "w") as f:
                json.dump({"null_teachers": True, "size": args.size, "num": args.num, **results}, f, indent=1)
        return

    work = Path(tempfile.mkdtemp(prefix="bench-label-"))
    results: dict = {}
    threads = 1 if args.device.startswith("cuda") else args.actors
    try:
        names = make_input(work / "data", args.num, args.shard_size, args.size)
        models = (
            real_size_teachers(work / "teachers")
            if args.real_size
            else {k: str(v) for k, v in DEFAULT_TEACHERS.items()}
        )
        if args.naive_num:  # first, while nothing else (Ray, the bare workers) has run in this machine's session
            base_cfg = LabelConfig(
                input=str(work / "data"),
                teachers={m: TeacherConfig(m, model=models[m], dtype="float32") for m in ("depth", "semseg")},
            )
            torch.set_num_threads(threads)  # the naive loop gets the whole machine
            results["naive_float32_samples_per_s"] = naive(base_cfg, names, args.device, args.naive_num)
        for dtype in args.dtypes:
            cfg = LabelConfig(
                input=str(work / "data"),
                batch_size=args.batch_size,
                progress=False,
                device=args.device,
                actors=1 if args.no_ray else args.actors,
                teachers={m: TeacherConfig(m, model=models[m], dtype=dtype) for m in ("depth", "semseg")},
            )
            if args.no_ray:
                cfg.threads_per_actor = threads
            for m in ("depth", "semseg"):  # each dtype labels from scratch
                shutil.rmtree(work / "data" / m, ignore_errors=True)
            job = job_rate(cfg, names, args)
            if args.no_ray or args.device.startswith("cuda"):  # one process, like the in-process job
                base = bare(cfg, names, args.device, 1, threads)
            else:  # the job's layout: `actors` processes with threads_per_actor threads each
                base = bare(cfg, names, args.device, args.actors, cfg.threads_per_actor)
            results[dtype] = {"job_samples_per_s": job, "bare_samples_per_s": base, "efficiency": job / base}
    finally:
        shutil.rmtree(work, ignore_errors=True)
    dev = torch.cuda.get_device_name() if args.device.startswith("cuda") else f"CPU x{torch.get_num_threads()}"
    print(
        f"device {dev} | teachers {'real-size (random weights)' if args.real_size else 'shipped small'} | "
        f"{args.num} images {args.size}px | batch {args.batch_size} | {'in-process' if args.no_ray else 'Ray'}"
    )
    slow = results.get("naive_float32_samples_per_s")
    for dtype in args.dtypes:
        r = results[dtype]
        print(f"{dtype:9s} job (end to end)      {r['job_samples_per_s']:8.1f} samples/s")
        print(
            f"{dtype:9s} bare teacher forwards {r['bare_samples_per_s']:8.1f} samples/s   "
            f"efficiency job/bare = {r['efficiency']:.2f}  (target >= 0.85)"
        )
        if slow:
            r["speedup_over_naive"] = r["job_samples_per_s"] / slow
            print(f"{dtype:9s} speedup job/naive     {r['speedup_over_naive']:8.1f}x (target >= 3x)")
    if slow:
        print(f"naive float32 pipeline loop     {slow:8.1f} samples/s")
    if {"float32", "bfloat16"} <= set(results):
        results["bf16_over_float32_job"] = (
            results["bfloat16"]["job_samples_per_s"] / results["float32"]["job_samples_per_s"]
        )
        print(
            f"job bfloat16 / float32: {results['bf16_over_float32_job']:.2f}x (target >= 1.5x on CPUs with bf16 units)"
        )
    if args.json:
        import json

        with open(args.json, "w") as f:
            json.dump({"device": dev, "real_size": args.real_size, "num": args.num, **results}, f, indent=1)


if __name__ == "__main__":
    main()
