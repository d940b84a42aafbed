"""Pre-training step speed of MultiMAE: float32 vs bfloat16 autocast, fused vs looped AdamW, SDPA vs softmax.

For each size, times forward + backward + fused AdamW step of the pre-training model (rgb, depth, semseg in;
rgb, norm_rgb, depth, semseg out; 98 visible tokens) in float32 and under bfloat16 autocast, interleaved step
by step so both see the same machine load. In the same run: the optimizer step alone with `fused=True` vs
PyTorch's per-parameter loop, and attention through `F.scaled_dot_product_attention` vs the explicit
`softmax(q k^T) v` path. FLOPs per step come from `torch.utils.flop_counter`; achieved FLOP/s is reported as
a fraction of this machine's measured matmul peak in the same dtype (model FLOP utilisation, MFU).

    python benchmarks/model_speed.py --threads 1                                   # CPU, tiny + small
    python benchmarks/model_speed.py --size base --batch 8 --threads 1             # ViT-B on CPU
    python benchmarks/model_speed.py --device cuda --size base --batch 64 --json out.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

import multimae
from shards.precision import cpu_bf16_units

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def matmul_peak(device: torch.device, dtype: torch.dtype, n: int, reps: int) -> float:
    """Best FLOP/s of an n x n @ n x n matmul in `dtype` on `device`."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(2):
        a @ b
    best = float("inf")
    for _ in range(reps):
        sync(device)
        t = time.perf_counter()
        a @ b
        sync(device)
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best


def make_batch(b: int, size: int, device: torch.device) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    x = {
        "rgb": torch.randn(b, 3, size, size, generator=g),
        "depth": multimae.robust_standardize_depth(torch.rand(b, 1, size, size, generator=g)),
        "semseg": torch.randint(0, 133, (b, size // 4, size // 4), generator=g),
    }
    return {k: v.to(device) for k, v in x.items()}


def step_fn(model, opt, x, dtype, device, tokens):
    def step():
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            preds, masks = model(x, num_encoded_tokens=tokens)
            loss = multimae.pretraining_loss(preds, x, masks)["total"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step


def timed(fn, device) -> float:
    sync(device)
    t = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t


def interleaved(fns: dict, steps: int, warmup: int, device) -> dict[str, float]:
    """Median seconds of each function, run in turn so every variant sees the same machine load."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times = {k: [] for k in fns}
    for _ in range(steps):
        for k, fn in fns.items():
            times[k].append(timed(fn, device))
    return {k: statistics.median(v) for k, v in times.items()}


def optimizer_steps(model, device, steps: int) -> dict[str, float]:
    """Seconds of one AdamW step over the model's parameters: fused kernel vs the per-parameter loop."""
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    opts = {
        "fused": torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True),
        "loop": torch.optim.AdamW(model.parameters(), lr=1e-4, foreach=False),
    }
    with torch.no_grad():
        return interleaved({k: o.step for k, o in opts.items()}, steps, 1, device)


def measure(size: str, args, device: torch.device, dtypes: list[str], peaks: dict[str, float]) -> dict:
    torch.manual_seed(0)
    model = multimae.create_model(f"multimae-{size}", image_size=args.image_size).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    x = make_batch(args.batch, args.image_size, device)
    run = torch.compile(model) if args.compile else model
    steps = {d: step_fn(run, opt, x, DTYPES[d], device, args.tokens) for d in dtypes}
    with FlopCounterMode(display=False) as counter:
        steps[dtypes[0]]()
    flops = counter.get_total_flops()
    out: dict = {"gflop_per_step": flops / 1e9, "dtypes": {}}
    for d, t in interleaved(steps, args.steps, args.warmup, device).items():
        out["dtypes"][d] = {
            "ms_per_step": 1e3 * t,
            "samples_per_s": args.batch / t,
            "tflops": flops / t / 1e12,
            "mfu": flops / t / peaks[d],
        }
    if {"float32", "bfloat16"} <= set(dtypes):
        out["bf16_speedup"] = out["dtypes"]["float32"]["ms_per_step"] / out["dtypes"]["bfloat16"]["ms_per_step"]
    out["adamw_s"] = optimizer_steps(model, device, args.steps)
    att = {}  # one model for both attention paths: each timed as a block
    for name, fused in (("sdpa", True), ("explicit", False)):
        multimae.set_fused_attn(model, fused)
        att[name] = interleaved({name: steps[dtypes[0]]}, args.steps, args.warmup, device)[name]
    multimae.set_fused_attn(model, True)
    out["attention_ms"] = {k: 1e3 * v for k, v in att.items()}
    if device.type == "cuda":
        out["peak_mem_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtypes", nargs="+", choices=list(DTYPES), default=list(DTYPES))
    ap.add_argument("--size", default="tiny,small", help="comma-separated: tiny,small,base,large")
    ap.add_argument("--batch", type=int, default=None, help="default: 8 on CPU, 64 on CUDA")
    ap.add_argument("--image-size", type=int, default=224)
    ap.add_argument("--tokens", type=int, default=98, help="visible tokens per sample")
    ap.add_argument("--steps", type=int, default=None, help="timed steps per variant (default 4 CPU / 20 CUDA)")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--compile", action="store_true", help="torch.compile the model")
    ap.add_argument("--threads", type=int, default=None, help="CPU intra-op threads (default: torch's)")
    ap.add_argument("--json", help="also write the results as JSON here")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    args.batch = args.batch or (64 if cuda else 8)
    args.steps = args.steps or (20 if cuda else 4)
    name = (
        torch.cuda.get_device_name(device)
        if cuda
        else (f"CPU x{torch.get_num_threads()} threads, bf16 matrix units: {cpu_bf16_units() or 'none'}")
    )
    peaks = {d: matmul_peak(device, DTYPES[d], 8192 if cuda else 1024, 10 if cuda else 3) for d in args.dtypes}
    print(
        f"device {name} | batch {args.batch} | image {args.image_size} | visible tokens {args.tokens} | "
        f"torch {torch.__version__}"
    )
    print("matmul peak: " + ", ".join(f"{d} {p / 1e12:.3f} TFLOP/s" for d, p in peaks.items()))
    results = {
        "device": name,
        "batch": args.batch,
        "image_size": args.image_size,
        "peaks_tflops": {d: p / 1e12 for d, p in peaks.items()},
        "sizes": {},
    }
    for size in args.size.split(","):
        r = results["sizes"][size] = measure(size, args, device, args.dtypes, peaks)
        mem = f"  peak mem {r['peak_mem_gib']:.1f} GiB" if "peak_mem_gib" in r else ""
        print(f"multimae-{size}: {r['gflop_per_step']:.1f} GFLOP/step{mem}")
        for d, m in r["dtypes"].items():
            print(
                f"  {d:9s} {m['ms_per_step']:9.1f} ms/step  {m['samples_per_s']:8.1f} samples/s  "
                f"{m['tflops']:7.3f} TFLOP/s  MFU {m['mfu']:6.1%} of the {d} matmul peak"
            )
        if "bf16_speedup" in r:
            print(f"  bf16 / float32 step speed: {r['bf16_speedup']:.2f}x")
        adam = r["adamw_s"]
        print(
            f"  AdamW step: fused {1e3 * adam['fused']:.1f} ms, per-parameter loop {1e3 * adam['loop']:.1f} ms "
            f"({adam['loop'] / adam['fused']:.2f}x)"
        )
        att = r["attention_ms"]
        print(
            f"  attention ({args.dtypes[0]}): SDPA {att['sdpa']:.1f} ms/step, explicit softmax "
            f"{att['explicit']:.1f} ms/step ({att['explicit'] / att['sdpa']:.2f}x)"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
