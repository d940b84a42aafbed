"""Member decoding: the shard reader's decoders (shards.format) against Pillow, on the same bytes.

For each member kind of ray-cast scenes, one process and one thread: CPU ms per member of Pillow
(`np.asarray(Image.open(...))` and the reader's conversions: depth to float32 metres, ids to int64) and of
`shards.format.decode_*` (JPEG through libjpeg-turbo via torchvision where the header allows; PNG through
Pillow), best of `--repeats` interleaved passes. Then the largest difference between the two JPEG decoders over
`--n` JPEGs: ray-cast scenes, grainy photo-like images, gradients and noise, at qualities 70 to 95, chroma
subsampling 4:4:4, 4:2:2 and 4:2:0, baseline and progressive, odd and even sizes. Last, the label PNG writer:
CPU ms per member and file size of `shards.format` (ISA-L deflate level 2; depth Up-filtered, semseg unfiltered)
against the same rows deflated by zlib (level 1 for depth, 6 for semseg) and against Pillow's PNG encoder.

    .venv/bin/python benchmarks/decode.py                 # 256 px, 300 JPEGs
    .venv/bin/python benchmarks/decode.py --n 600 --size 320
"""

from __future__ import annotations

import argparse
import io
import itertools
import os
import sys
import time
import warnings
import zlib

import numpy as np
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from shards import format as F  # noqa: E402
from shards.images import fast_jpeg  # noqa: E402


def images(n: int, size: int) -> list[np.ndarray]:
    """`n` (H, W, 3) uint8 images of four looks, sizes size +- a few pixels (odd sides included)."""
    from shards.synthetic import render_scene

    rng = np.random.default_rng(0)
    out = []
    for i in range(n):
        h, w = size - i % 3, size + i % 5
        look = i % 4
        if look == 0:  # ray-cast scene, cropped to (h, w)
            img = render_scene(1, i, size + 4)["rgb"][:h, :w]
        elif look == 1:  # grainy smooth colours, like a photo
            low = rng.integers(0, 256, (6, 6, 3), dtype=np.uint8)
            smooth = np.asarray(Image.fromarray(low).resize((w, h), Image.BICUBIC)).astype(float)
            img = smooth + rng.normal(0, 12, (h, w, 3))
        elif look == 2:  # gradients: the smooth areas where rounding shows
            y, x = np.mgrid[0:h, 0:w]
            img = np.stack([x * 255 / w, y * 255 / h, (x + y) * 127 / (h + w) + 64], -1)
        else:  # noise: every coefficient coded
            img = rng.integers(0, 256, (h, w, 3))
        out.append(np.clip(img, 0, 255).astype(np.uint8))
    return out


def jpegs(imgs: list[np.ndarray]) -> list[bytes]:
    """Each image as a JPEG, cycling through quality, subsampling and progressive coding."""
    settings = itertools.cycle(itertools.product((70, 85, 95), (0, 1, 2), (False, True)))
    out = []
    for img, (quality, subsampling, progressive) in zip(imgs, settings):
        # Pillow cannot write pure noise as a progressive 4:4:4 JPEG into memory ("Suspension not allowed")
        progressive = progressive and not (subsampling == 0 and img.std() > 60)
        buf = io.BytesIO()
        Image.fromarray(img).save(buf, "JPEG", quality=quality, subsampling=subsampling, progressive=progressive)
        out.append(buf.getvalue())
    return out


def pil_rgb(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data), formats=["JPEG"]) as im:
        return np.asarray(im.convert("RGB"))


def pil_depth(data: bytes, depth_range: list[float]) -> np.ndarray:
    with Image.open(io.BytesIO(data), formats=["PNG"]) as im:
        lo, hi = depth_range
        return (lo + np.asarray(im).astype(np.float64) / F.DEPTH_LEVELS * (hi - lo)).astype(np.float32)


def pil_ids(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data), formats=["PNG"]) as im:
        return np.asarray(im).astype(np.int64)


def pil_png(values: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(values).save(buf, "PNG")  # Pillow's default: level 6, its own filter per row
    return buf.getvalue()


def encode_report(scenes: list[dict], repeats: int) -> None:
    """The label PNG writer against zlib on the same rows and against Pillow's encoder, on the same maps."""
    rng = np.random.default_rng(0)
    smooth = [np.rint(s["depth_gt"] / s["depth_gt"].max() * F.DEPTH_LEVELS).astype(np.uint16) for s in scenes]
    noisy = [np.clip(q + rng.normal(0, 30, q.shape), 0, F.DEPTH_LEVELS).astype(np.uint16) for q in smooth]
    ids = [s["semseg_gt"].astype(np.uint8) for s in scenes]
    print(f"\nlabel PNG writer, per member: CPU ms (best of {repeats}) / KB")
    print(f"  {'map':<30}{'shards.format':>16}{'zlib, same rows':>18}{'Pillow':>16}")
    for name, maps, up, level in (
        ("depth of ray-cast scenes", smooth, True, 1),
        ("depth + noise (sigma 30 levels)", noisy, True, 1),
        ("semseg of ray-cast scenes", ids, False, 6),
    ):
        fns = {
            "ours": lambda v, up=up: F._png(v, up=up),
            "zlib": lambda v, up=up, level=level: F._png(v, up=up, deflate=lambda b: zlib.compress(b, level)),
            "pil": pil_png,
        }
        ms = best_ms(fns, maps, repeats)
        kb = {k: np.mean([len(fn(v)) for v in maps]) / 1024 for k, fn in fns.items()}
        cells = [f"{ms[k]:.3f} / {kb[k]:.1f}" for k in fns]
        print(f"  {name:<30}{cells[0]:>16}{cells[1]:>18}{cells[2]:>16}")


def best_ms(fns: dict, items: list, repeats: int) -> dict[str, float]:
    """Least CPU ms per item of each function over `repeats` interleaved passes (load hits each alike)."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.process_time()
            for item in items:
                fn(item)
            times[name].append(time.process_time() - start)
    return {name: min(t) / len(items) * 1e3 for name, t in times.items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=300, help="JPEGs to compare (and members to time)")
    p.add_argument("--size", type=int, default=256, help="image side (px)")
    p.add_argument("--repeats", type=int, default=9)
    a = p.parse_args()
    warnings.simplefilter("ignore", DeprecationWarning)  # torchvision 0.29 deprecates its decoders (docs/format.md)
    import torch

    torch.set_num_threads(1)
    from shards.synthetic import render_scene

    scenes = [render_scene(0, i, a.size) for i in range(min(a.n, 64))]
    rgb = [F.encode_rgb(s["rgb"]) for s in scenes]
    depth = [F.encode_depth(s["depth_gt"]) for s in scenes]
    semseg = [F.encode_semseg(s["semseg_gt"], 9) for s in scenes]
    print(f"{len(scenes)} ray-cast scenes at {a.size} px; CPU ms per member, one thread, best of {a.repeats}:")
    print(f"  {'member':<22}{'Pillow':>8}{'shards.format':>15}")
    rows = (
        ("rgb JPEG q95", rgb, pil_rgb, F.decode_rgb),
        ("depth 16-bit PNG", depth, lambda d: pil_depth(*d), lambda d: F.decode_depth(*d)),
        ("semseg 8-bit PNG", semseg, pil_ids, F.decode_semseg),
    )
    for name, items, pil, ours in rows:
        ms = best_ms({"pil": pil, "ours": ours}, items, a.repeats)
        print(f"  {name:<22}{ms['pil']:>8.3f}{ms['ours']:>15.3f}")

    data = jpegs(images(a.n, a.size))
    diffs = []
    for d in data:
        fast = fast_jpeg(d, 2**31)
        assert fast is not None, "a plain JPEG left the fast path"
        diffs.append(int(np.abs(fast.astype(np.int16) - pil_rgb(d)).max()))
    counts = np.bincount(diffs)
    print(f"\nJPEG: {len(data)} images, largest |libjpeg-turbo via torchvision - Pillow| = {max(diffs)}; images by")
    print("  largest difference: " + ", ".join(f"{v}: {c}" for v, c in enumerate(counts) if c))
    encode_report(scenes, a.repeats)


if __name__ == "__main__":
    main()
