"""Pre-training step speed of MultiMAE: SDPA attention vs an explicit-softmax baseline.

For each size, times forward + backward (+ AdamW step) of the pre-training model (rgb, depth,
semseg in; rgb, norm_rgb, depth, semseg out; 98 visible tokens) with every attention layer on
`F.scaled_dot_product_attention` and, in the same run and interleaved step by step, on the
explicit `softmax(q k^T) v` path. FLOPs per step are counted with `torch.utils.flop_counter`;
achieved FLOP/s is reported as a fraction of this machine's measured matmul peak (same dtype).

    python benchmarks/model_speed.py --threads 1                       # CPU fp32, tiny + small
    python benchmarks/model_speed.py --device cuda --dtype bf16 --size base --batch 64
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

import multimae

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


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


def timed(step, device) -> float:
    sync(device)
    t = time.perf_counter()
    step()
    sync(device)
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    ap.add_argument("--size", default="tiny,small", help="comma-separated: tiny,small,base,large")
    ap.add_argument("--batch", type=int, default=None, help="default: 8 on CPU, 64 on CUDA")
    ap.add_argument("--image-size", type=int, default=224)
    ap.add_argument("--tokens", type=int, default=98, help="visible tokens per sample")
    ap.add_argument("--steps", type=int, default=None, help="timed steps per variant (default 4 CPU / 20 CUDA)")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--compile", action="store_true", help="torch.compile the model (both variants)")
    ap.add_argument("--threads", type=int, default=None, help="CPU intra-op threads (default: torch's)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    device = torch.device(args.device)
    dtype = DTYPES[args.dtype]
    cuda = device.type == "cuda"
    batch = args.batch or (64 if cuda else 8)
    steps = args.steps or (20 if cuda else 4)
    peak = matmul_peak(device, dtype, 8192 if cuda else 1024, 10 if cuda else 5)
    name = torch.cuda.get_device_name(device) if cuda else f"CPU x{torch.get_num_threads()} threads"
    print(
        f"device {name}  dtype {args.dtype}  batch {batch}  image {args.image_size}  "
        f"visible tokens {args.tokens}  torch {torch.__version__}"
    )
    print(f"matmul peak ({args.dtype}): {peak / 1e12:.3f} TFLOP/s")

    for size in args.size.split(","):
        torch.manual_seed(0)
        model = multimae.create_model(f"multimae-{size}", image_size=args.image_size).to(device)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=cuda)
        x = make_batch(batch, args.image_size, device)
        run = torch.compile(model) if args.compile else model
        step = step_fn(run, opt, x, dtype, device, args.tokens)
        with FlopCounterMode(display=False) as counter:
            step()
        flops = counter.get_total_flops()
        times = {True: [], False: []}
        for fused in (True, False):
            multimae.set_fused_attn(model, fused)
            for _ in range(args.warmup):
                step()
        for _ in range(steps):  # interleaved so both variants see the same machine load
            for fused in (True, False):
                multimae.set_fused_attn(model, fused)
                times[fused].append(timed(step, device))
        sdpa, expl = statistics.median(times[True]), statistics.median(times[False])
        mem = f"  peak mem {torch.cuda.max_memory_allocated(device) / 2**30:.1f} GiB" if cuda else ""
        print(f"multimae-{size}: {flops / 1e9:.1f} GFLOP/step{mem}")
        for label, t in (("SDPA", sdpa), ("explicit softmax", expl)):
            print(
                f"  {label:17s} {t * 1e3:9.1f} ms/step  {batch / t:8.1f} img/s  "
                f"{flops / t / 1e12:7.3f} TFLOP/s  = {flops / t / peak:6.1%} of matmul peak"
            )
        print(f"  speed-up SDPA vs explicit softmax: {expl / sdpa:.2f}x")
        del model, opt, run
        if cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)


if __name__ == "__main__":
    main()
