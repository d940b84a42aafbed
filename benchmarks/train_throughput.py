"""Training throughput: the full step (shard loader + augmentation + model) vs the model step alone.

Baseline, measured in the same run: forward + backward + AdamW step of MultiMAE pre-training on one batch
kept in device memory. Full: the same step fed by the trainer's streaming loader (multimae/data.py:
reader -> joint crop/flip -> normalization, `--workers` DataLoader workers). The ratio full / baseline says
whether the data path keeps up (1.0 = the model is the only cost; target >= 0.9).

    python benchmarks/train_throughput.py                                  # tiny demo config, CPU
    python benchmarks/train_throughput.py --device cuda --dtype bf16 --size base --batch 64 --workers 12
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import multimae  # noqa: E402
from multimae import data as mdata  # noqa: E402
from multimae.config import load_config  # noqa: E402
from multimae.train import _transform_args, build_model, forward_loss, standardize_depth_inputs, to_device  # noqa: E402
from shards import format as fmt  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


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


def main() -> None:
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
    p.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    args = p.parse_args()

    overrides = [
        "data.inputs={rgb: rgb, depth: depth_gt, semseg: semseg_gt}",
        f"train.batch_size={args.batch}",
        f"data.num_workers={args.workers}",
        "train.steps=1000000",
        f"train.dtype={'bfloat16' if args.dtype == 'bf16' else 'float32'}",
    ]
    if args.size == "base":
        overrides += [
            "model.name=multimae-base",
            "model.kwargs={}",
            "data.image_size=224",
            "model.num_encoded_tokens=98",
            "model.fp32_output_adapters=[semseg]",
        ]
    cfg = load_config(os.path.join(ROOT, "pipelines", "pretrain-demo.yaml"), overrides)
    root = args.shards or make_data(args.num, 224 if args.size == "base" else 128)
    manifest = fmt.read_manifest(root)
    device = torch.device(args.device)

    torch.manual_seed(0)
    model = build_model(cfg, manifest).to(device).train()
    optimizer = torch.optim.AdamW(multimae.param_groups(model, 0.05), lr=1e-4, betas=(0.9, 0.95))
    use_bf16 = args.dtype == "bf16"

    def step(batch):
        batch = to_device(batch, device)
        standardize_depth_inputs(batch, cfg)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16):
            losses, _ = forward_loss(model, batch, cfg)
        losses["total"].backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    names = [s["name"] for s in manifest["shards"]]
    loader = mdata.train_loader(
        root,
        names,
        _transform_args(cfg),
        micro_batch=args.batch,
        num_workers=args.workers,
        shuffle_buffer=cfg.data.shuffle_buffer,
        seed=0,
        chunk=0,
        rank=0,
    )
    stream = iter(loader)
    fixed = next(stream)
    fixed_dev = to_device(fixed, device)

    def repeat():
        while True:
            yield fixed_dev

    model_s = timed_steps(step, repeat(), args.steps, args.warmup, sync)
    full_s = timed_steps(step, stream, args.steps, args.warmup, sync)
    n = args.steps * args.batch
    model_rate, full_rate = n / model_s, n / full_s
    print(
        f"device {device} ({torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'}), "
        f"model {cfg.model.name} {cfg.data.image_size}px, batch {args.batch}, {args.dtype}, "
        f"{args.workers} loader workers, {args.steps} timed steps, torch threads {torch.get_num_threads()}"
    )
    print(f"model step on an in-memory batch : {model_rate:8.1f} samples/s")
    print(f"full step (shard loader + model) : {full_rate:8.1f} samples/s")
    print(f"ratio full / model               : {full_rate / model_rate:8.3f}  (target >= 0.9)")


if __name__ == "__main__":
    main()
