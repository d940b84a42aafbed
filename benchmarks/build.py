"""Build speed: `multimae-shard build --src imagenet` vs a naive open -> convert -> resize -> save loop, per core.

Generates an ImageNet-like tree of full-size JPEGs (long side 1000-1600 px, smooth shapes + texture +
noise so file sizes are realistic) in a temp dir, then times, on one core each and on the same files:

- baseline: for each file, PIL open -> convert("RGB") -> resize (shorter side 256, bicubic) -> save JPEG q95;
- ours:     shards.build.build(open_source("imagenet", ...), workers=1): draft-mode (reduced DCT) decoding,
            EXIF/mode handling, resize, JPEG q95, tar + stats + manifest.

Prints both rates, the speed-up ratio (target >= 1.5x), the mean pixel difference between the two
outputs (draft decoding must not cost quality), the CPU share of the build's safety work (regular-file
and bounded reads of source files, a digest per stored member), and the peak RSS of a build process at
two dataset sizes (it must not grow with the dataset).

With `--remote s3` it measures building to object storage instead: the same build (`--workers`, default 1)
to local disk and to S3 (moto's server on 127.0.0.1 behind a proxy that delays every request by
`--latency-ms`, see s3_local.py), interleaved, each into a fresh output; it prints the S3 / local throughput
ratio (target >= 0.8).

    .venv/bin/python benchmarks/build.py [--num 200] [--keep DIR]
    .venv/bin/python benchmarks/build.py --remote s3 [--num 200] [--workers 1]
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import resource
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from shards.build import build
from shards.format import decode_rgb
from shards.sources import open_source

SIZE = 256


def make_image(rng: np.random.Generator, grain: np.ndarray) -> Image.Image:
    """A photo-like RGB image: smooth colour field, shapes with soft edges, sensor grain (cut from `grain`)."""
    long_side = int(rng.integers(1000, 1601))
    w, h = (long_side, long_side * 3 // 4) if rng.random() < 0.75 else (long_side * 3 // 4, long_side)
    field = rng.uniform(0, 255, (6, 8, 3)).astype(np.uint8)  # (6, 8, 3) colour field, upsampled smoothly
    img = Image.fromarray(field).resize((w, h), Image.Resampling.BICUBIC)
    draw = ImageDraw.Draw(img)
    for _ in range(int(rng.integers(8, 20))):
        x0, y0 = rng.uniform(0, w), rng.uniform(0, h)
        r = rng.uniform(0.03, 0.25) * long_side
        colour = tuple(int(v) for v in rng.integers(0, 256, 3))
        box = [x0 - r, y0 - r * rng.uniform(0.5, 1.5), x0 + r, y0 + r]
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)(box, fill=colour)
    img = img.filter(ImageFilter.BoxBlur(1))
    y0, x0 = int(rng.integers(0, grain.shape[0] - h + 1)), int(rng.integers(0, grain.shape[1] - w + 1))
    a = np.asarray(img, dtype=np.int16) + grain[y0 : y0 + h, x0 : x0 + w]  # (H, W, 3)
    return Image.fromarray(np.clip(a, 0, 255).astype(np.uint8))


def make_tree(root: Path, num: int, classes: int = 10, seed: int = 0) -> int:
    rng = np.random.default_rng(seed)
    grain = rng.integers(-12, 13, (1700, 1700, 3), dtype=np.int16)  # shared sensor grain, cut at random offsets
    total = 0
    for i in range(num):
        folder = root / f"n{i % classes:08d}"
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"n{i % classes:08d}_{i}.JPEG"
        make_image(rng, grain).save(path, quality=int(rng.integers(85, 96)))
        total += path.stat().st_size
    return total


def naive(files: list[Path], out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    for i, f in enumerate(files):
        im = Image.open(f).convert("RGB")
        w, h = im.size
        s = SIZE / min(w, h)
        im = im.resize((max(1, round(w * s)), max(1, round(h * s))), Image.Resampling.BICUBIC)
        im.save(out / f"{i:06d}.jpg", quality=95)


def ours(root: Path, out: Path | str, num: int | None = None, workers: int = 1) -> None:
    source = open_source("imagenet", str(root), size=SIZE, num=num)
    build(source, str(out), shard_size=1000, workers=workers, progress=False)


def remote_report(root: Path, tmp: Path, args: argparse.Namespace) -> None:
    """Build to local disk vs to S3 with `args.latency_ms` per request: same source, same workers."""
    import sys

    sys.path.insert(0, str(Path(__file__).parent))
    from s3_local import local_s3

    from shards import fs

    n = len(list(root.rglob("*.JPEG")))
    with local_s3(args.latency_ms) as (direct, delayed):
        import boto3

        boto3.client("s3", endpoint_url=direct).create_bucket(Bucket="bench")
        fs.set_storage_options({"endpoint_url": delayed})
        ours(root, tmp / "warm", num=10, workers=args.workers)  # page cache, imports
        ours(root, "s3://bench/warm", num=10, workers=args.workers)  # the S3 client's first connection
        times: dict[str, list[float]] = {"local disk": [], "S3": []}
        for i in range(args.repeats):  # interleaved, each into a fresh output
            for name, out in (("local disk", tmp / f"out{i}"), ("S3", f"s3://bench/out{i}")):
                t0 = time.perf_counter()
                ours(root, out, workers=args.workers)
                times[name].append(time.perf_counter() - t0)
        assert fs.read_json(f"s3://bench/out{args.repeats - 1}/manifest.json")["total"] == n
    rate = {k: n / min(v) for k, v in times.items()}
    print(f"build {n} images, {args.workers} worker(s), best of {args.repeats}; S3 latency {args.latency_ms:.0f} ms")
    for k, v in times.items():
        print(f"  to {k:<11} {rate[k]:6.1f} img/s   passes: {', '.join(f'{t:.1f} s' for t in v)}")
    print(f"ratio S3 / local disk: {rate['S3'] / rate['local disk']:.2f} (target >= 0.8)")


def safety_cost(files: list[Path], out: Path, repeats: int = 5) -> tuple[float, float]:
    """CPU seconds per image a build spends on its safety work, measured against the plain operation:
    reading a source file through `read_image_file` (stat + fstat, regular files only, bounded) instead of
    open().read(), and hashing every stored member for the stats json."""
    from shards.source import read_image_file
    from shards.tars import iter_samples
    from shards.writer import member_digest

    members = [data for _, sample in iter_samples(str(out / "rgb" / "shard-000000.tar")) for data in sample.values()]

    def plain() -> None:
        for f in files:
            with open(f, "rb") as fh:
                fh.read()

    def checked() -> None:
        for f in files:
            read_image_file(str(f))

    def hashed() -> None:
        for data in members:
            member_digest(data)

    best = {}
    for _ in range(repeats):  # interleaved; the least CPU of each is the least disturbed
        for fn in (plain, checked, hashed):
            c0 = time.process_time()
            fn()
            best[fn.__name__] = min(best.get(fn.__name__, float("inf")), time.process_time() - c0)
    return max(0.0, best["checked"] - best["plain"]) / len(files), best["hashed"] / len(files)


def _peak_rss_child(root: str, out: str, num: int, queue) -> None:
    ours(Path(root), Path(out), num)
    queue.put(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)  # KiB -> MiB


def peak_rss(root: Path, out: Path, num: int) -> float:
    ctx = mp.get_context("fork")
    queue = ctx.Queue()
    proc = ctx.Process(target=_peak_rss_child, args=(str(root), str(out), num, queue))
    proc.start()
    value = queue.get()
    proc.join()
    return value


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--num", type=int, default=200, help="images in the generated tree (200)")
    ap.add_argument("--keep", help="generate into this folder and keep it (default: a temp dir)")
    ap.add_argument("--remote", choices=["s3"], help="measure building to object storage instead (see above)")
    ap.add_argument("--latency-ms", type=float, default=20.0, help="--remote: added latency per request")
    ap.add_argument("--workers", type=int, default=1, help="--remote: build workers (both builds)")
    ap.add_argument("--repeats", type=int, default=2, help="--remote: timed builds per target; the best is kept")
    args = ap.parse_args()

    tmp = Path(args.keep or tempfile.mkdtemp(prefix="bench_build_"))
    root = tmp / "imagenet"
    t0 = time.perf_counter()
    nbytes = make_tree(root, args.num) if not root.exists() else sum(p.stat().st_size for p in root.rglob("*.JPEG"))
    files = sorted(root.rglob("*.JPEG"))
    sizes = [Image.open(f).size for f in files]
    print(
        f"tree: {len(files)} JPEGs, {nbytes / 1e6:.1f} MB, mean {np.mean([s[0] for s in sizes]):.0f}x"
        f"{np.mean([s[1] for s in sizes]):.0f} px (generated in {time.perf_counter() - t0:.1f} s)"
    )
    if args.remote:
        remote_report(root, tmp, args)
        if not args.keep:
            shutil.rmtree(tmp)
        return

    naive(files[:10], tmp / "warm_naive")  # warm-up: page cache, imports, allocator
    ours(root, tmp / "warm_ours", num=10)

    t0 = time.perf_counter()
    naive(files, tmp / "naive")
    t_naive = time.perf_counter() - t0
    t0, c0 = time.perf_counter(), time.process_time()
    ours(root, tmp / "ours")
    t_ours, c_ours = time.perf_counter() - t0, time.process_time() - c0

    import webdataset as wds

    stored = [
        decode_rgb(s["rgb.jpg"])
        for s in wds.WebDataset(str(tmp / "ours" / "rgb" / "shard-000000.tar"), shardshuffle=False)
    ]
    diffs = [
        np.abs(a.astype(int) - np.asarray(Image.open(tmp / "naive" / f"{i:06d}.jpg")).astype(int)).mean()
        for i, a in enumerate(stored)
        if a.shape == np.asarray(Image.open(tmp / "naive" / f"{i:06d}.jpg")).shape
    ]
    print(f"naive open->convert->resize->save: {len(files) / t_naive:6.1f} img/s per core ({t_naive:.1f} s)")
    print(f"multimae-shard build (1 worker):   {len(files) / t_ours:6.1f} img/s per core ({t_ours:.1f} s)")
    print(
        f"speed-up: {t_naive / t_ours:.2f}x (target >= 1.5x); mean |ours - naive| pixel difference "
        f"{np.mean(diffs):.2f} / 255 over {len(diffs)} same-size images"
    )

    checks, digests = safety_cost(files, tmp / "ours")
    print(
        f"safety checks (regular-file, bounded reads; per-member digest) cost {1e6 * checks:.0f} + "
        f"{1e6 * digests:.0f} us CPU per image: {100 * (checks + digests) / (c_ours / len(files)):.2f} % of the "
        f"build's {1e3 * c_ours / len(files):.1f} ms"
    )

    half = max(1, len(files) // 2)
    rss_half = peak_rss(root, tmp / "rss_half", half)
    rss_full = peak_rss(root, tmp / "rss_full", len(files))
    print(
        f"peak RSS of a build process: {rss_half:.0f} MiB at {half} images, {rss_full:.0f} MiB at {len(files)} "
        f"images (ratio {rss_full / rss_half:.2f})"
    )
    if not args.keep:
        shutil.rmtree(tmp)


if __name__ == "__main__":
    main()
