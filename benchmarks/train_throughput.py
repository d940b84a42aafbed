"""Training throughput: the full step (shard loader + augmentation + model) vs the model step alone, per dtype.

For each dtype (float32 and bfloat16 autocast, in the same run): the baseline is forward + backward + fused AdamW
of MultiMAE pre-training on one batch kept in device memory; "full" is the same step fed by the trainer's
streaming loader (reader -> joint crop/flip -> normalization, `--workers` DataLoader workers). Both use the
trainer's own setup (`multimae.train.main.setup`) and step (`engine.forward_loss`). Printed: samples/s, the
ratio full / model (does the data path keep up? target >= 0.95: within 5 %), the data path alone (loader and
batch step without the model: samples/s against the model step's, CPU ms per sample in the workers and in the
main process) and the ratio bf16 / float32.
`--decode-devices cpu cuda` times the full step with rgb decoded by the loader workers and by nvJPEG on the GPU
(`data.decode_device`).

    python benchmarks/train_throughput.py                                   # tiny demo config, CPU
    python benchmarks/train_throughput.py --size base --batch 8 --workers 2 # ViT-B/16 at 224 px, CPU
    python benchmarks/train_throughput.py --device cuda --size base --batch 64 --workers 12 --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from multimae.train import data as mdata  # noqa: E402
from multimae.train.config import ConfigError, load_run_config  # noqa: E402
from multimae.train.distributed import Dist  # noqa: E402
from multimae.train.engine import forward_loss  # noqa: E402
from multimae.train.main import setup  # noqa: E402
from shards.precision import cpu_bf16_units  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DTYPES = ("float32", "bfloat16")


def make_data(num: int, size: int) -> str:
    from shards.build import build
    from shards.sources import synthetic_source

    out = os.path.join(tempfile.mkdtemp(prefix="train-bench-"), "data")
    build(
        synthetic_source(num, size=size), out, shard_size=max(8, num // 8), workers=os.cpu_count() or 1, progress=False
    )
    return out


def timed_steps(step, batches, n: int, warmup: int, sync) -> float:
    """Seconds for n steps after `warmup` untimed ones."""
    for _ in range(warmup):
        step(next(batches))
    sync()
    t = time.perf_counter()
    for _ in range(n):
        step(next(batches))
    sync()
    return time.perf_counter() - t


def worker_cpu_seconds(it) -> float:
    """CPU seconds so far of a DataLoader iterator's live worker processes (Linux /proc; 0 without workers)."""
    total = 0
    for w in getattr(it, "_workers", []):
        with open(f"/proc/{w.pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        total += int(fields[11]) + int(fields[12])  # utime, stime (fields 14 and 15 of stat)
    return total / os.sysconf("SC_CLK_TCK")


def loader_alone(it, prepare, args, sync) -> dict[str, float]:
    """The data path without the model, after `args.warmup` batches: samples/s of loader + batch step
    (`prepare_batch`) over `args.steps` batches of the iterator `it`, and the CPU ms per sample of its workers
    and of this process over the same batches (the workers' prefetch queue is full at both ends, so what they
    decoded ahead is not counted)."""
    for _ in range(args.warmup):
        prepare(next(it))
    sync()
    workers, me, start = worker_cpu_seconds(it), time.process_time(), time.perf_counter()
    for _ in range(args.steps):
        prepare(next(it))
    sync()
    seconds, n = time.perf_counter() - start, args.steps * args.batch
    return {"samples_per_s": n / seconds, "worker_cpu_ms": (worker_cpu_seconds(it) - workers) / n * 1e3,
            "main_cpu_ms": (time.process_time() - me) / n * 1e3}  # fmt: skip


def measure(cfg, root: str, device: torch.device, args) -> dict[str, float]:
    """samples/s of the model step on a fixed batch and of the full step, for one config (one dtype)."""
    torch.manual_seed(0)
    run, _ = setup(cfg, root, tempfile.mkdtemp(prefix="train-bench-run-"), Dist(device=device), resume=False)
    run.model.train()

    def step(batch):
        with run.autocast():
            losses, _ = forward_loss(run, run.model, run.prepare_batch(batch))
        losses["total"].backward()
        run.optimizer.step()
        run.optimizer.zero_grad(set_to_none=True)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    def loader(defer_rgb: bool):
        return mdata.train_loader(
            root,
            run.plan.train_shards,
            run.transform_args,
            micro_batch=args.batch,
            num_workers=args.workers,
            shuffle_buffer=cfg.data.shuffle_buffer,
            seed=0,
            chunk=0,
            rank=0,
            pin_memory=device.type == "cuda",
            defer_rgb=defer_rgb,
        )

    fixed = next(iter(loader(False)))  # decoded by the workers: the model step alone

    def repeat():
        while True:
            yield fixed

    n = args.steps * args.batch
    out = {"model_samples_per_s": n / timed_steps(step, repeat(), args.steps, args.warmup, sync), "full": {}}
    transform = mdata.SampleTransform(train=True, **run.transform_args)
    for setting in args.decode_devices:
        try:
            where = mdata.rgb_decode_device(setting, device, transform)
        except ConfigError as e:  # e.g. cuda without nvJPEG: recorded, the other settings still run
            out["full"][setting] = {"error": str(e)}
            continue
        full_s = timed_steps(step, iter(loader(where != "cpu")), args.steps, args.warmup, sync)
        alone = loader_alone(iter(loader(where != "cpu")), run.prepare_batch, args, sync)
        out["full"][setting] = {"rgb_decoded_on": where, "samples_per_s": n / full_s, "loader": alone}
    timed = [f["samples_per_s"] for f in out["full"].values() if "samples_per_s" in f]
    out["full_samples_per_s"] = timed[0] if timed else float("nan")
    out["dtype"] = str(run.dtype)
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shards", help="shard set with rgb, depth_gt, semseg_gt (default: build a synthetic one)")
    p.add_argument("--num", type=int, default=256, help="samples of the synthetic set built when --shards is absent")
    p.add_argument(
        "--size",
        choices=["tiny", "base"],
        default="tiny",
        help="tiny: pipelines/pretrain-demo.yaml; base: ViT-B/16 at 224 px (the paper's model)",
    )
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtypes", nargs="+", choices=DTYPES, default=list(DTYPES))
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--image-size", type=int, help="training crop size (default: the config's)")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument(
        "--decode-devices",
        nargs="+",
        choices=["auto", "cpu", "cuda"],
        default=["auto"],
        help="data.decode_device settings to time the full step with (the ratio line uses the first)",
    )
    p.add_argument("--json", help="also write the results as JSON here")
    args = p.parse_args(argv)

    overrides = [
        "data.inputs={rgb: rgb, depth: depth_gt, semseg: semseg_gt}",
        f"train.batch_size={args.batch}",
        f"data.num_workers={args.workers}",
        "train.steps=1000000",
        f"train.device={args.device}",
        "log.tensorboard=false",
    ]
    if args.size == "base":
        overrides += [
            "model.name=multimae-base",
            "model.num_blocks=null",
            "model.decoder_blocks=2",
            "data.image_size=224",
            "model.num_encoded_tokens=98",
            "model.fp32_output_adapters=[semseg]",
        ]
    if args.image_size:
        overrides.append(f"data.image_size={args.image_size}")
    root = args.shards or make_data(args.num, 224 if args.size == "base" else 128)
    device = torch.device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU (bf16 units: {cpu_bf16_units()})"
    print(
        f"device {name}, {args.size} model, batch {args.batch}, {args.workers} loader workers, {args.steps} timed "
        f"steps, torch threads {torch.get_num_threads()}"
    )
    results = {}
    for label in args.dtypes:
        cfg = load_run_config(
            os.path.join(ROOT, "pipelines", "pretrain-demo.yaml"), overrides + [f"train.dtype={label}"]
        )
        r = results[label] = measure(cfg, root, device, args)
        print(f"{label:9s} model step on an in-memory batch : {r['model_samples_per_s']:8.1f} samples/s")
        for setting, f in r["full"].items():
            if "error" in f:
                print(f"{label:9s} full step, data.decode_device={setting}: not run ({f['error']})")
                continue
            where = f"data.decode_device={setting}: rgb decoded on {f['rgb_decoded_on']}"
            print(f"{label:9s} full step (shard loader + model) : {f['samples_per_s']:8.1f} samples/s  ({where})")
            a = f["loader"]
            print(
                f"{label:9s} loader + batch step, no model    : {a['samples_per_s']:8.1f} samples/s, "
                f"{a['samples_per_s'] / r['model_samples_per_s']:.2f}x the model step; CPU per sample: workers "
                f"{a['worker_cpu_ms']:.2f} ms, main {a['main_cpu_ms']:.2f} ms"
            )
        print(
            f"{label:9s} ratio full / model               : "
            f"{r['full_samples_per_s'] / r['model_samples_per_s']:8.3f}  (target >= 0.95)"
        )
    if {"float32", "bfloat16"} <= set(results):
        speedup = results["bfloat16"]["model_samples_per_s"] / results["float32"]["model_samples_per_s"]
        full = results["bfloat16"]["full_samples_per_s"] / results["float32"]["full_samples_per_s"]
        results["bf16_over_float32"] = {"model": speedup, "full": full}
        print(f"bf16 / float32: model step {speedup:.2f}x, full step {full:.2f}x")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"size": args.size, "batch": args.batch, "device": name, **results}, f, indent=1)


if __name__ == "__main__":
    main()
