"""Real-dataset sources: class mix per shard with and without the build's shuffle, the shuffle's cost at
ImageNet scale, and the paired source's build rate against the rgb files alone.

Generates in a temp dir (or --keep DIR):

- an ImageNet-style tree, 10 classes x 40 JPEGs of 320x240, built with --shard-size 50 sorted and shuffled;
- an NYUv2-style paired tree, 60 samples of 640x480: rgb JPEG, 16-bit depth in millimetres (a floor-like
  ramp with sensor noise and holes), 8-bit labels (41 classes in blocks, a 255 border).

    .venv/bin/python benchmarks/sources.py [--keep DIR]
"""

from __future__ import annotations

import argparse
import random
import tempfile
import time
from pathlib import Path

import numpy as np
import webdataset as wds
from PIL import Image

from shards.build import build
from shards.sources import Item, open_source

PAIRED = {"rgb": "rgb", "depth_gt": "depth", "semseg_gt": "labels"}


def photo(rng: np.random.Generator, h: int, w: int) -> Image.Image:
    """A colour ramp in a random direction with sensor-like noise."""
    y, x = np.mgrid[0:h, 0:w] / max(h, w)
    angle = rng.uniform(0, 2 * np.pi)
    ramp = (np.cos(angle) * x + np.sin(angle) * y)[..., None]  # (h, w, 1)
    lo, hi = rng.uniform(30, 225, (2, 3))
    return Image.fromarray(np.clip(lo + (hi - lo) * ramp + rng.normal(0, 6, (h, w, 3)), 0, 255).astype(np.uint8))


def imagenet_tree(root: Path, classes: int = 10, per_class: int = 40) -> None:
    rng = np.random.default_rng(0)
    for c in range(classes):
        (root / f"n{c:08d}").mkdir(parents=True)
        for i in range(per_class):
            photo(rng, 240, 320).save(root / f"n{c:08d}" / f"{i}.JPEG", quality=90)


def paired_tree(root: Path, num: int = 60, h: int = 480, w: int = 640) -> None:
    rng = np.random.default_rng(0)
    for folder in ("rgb", "depth", "labels"):
        (root / folder).mkdir(parents=True)
    y, x = np.mgrid[0:h, 0:w]
    for i in range(num):
        photo(rng, h, w).save(root / "rgb" / f"{i:04d}.jpg", quality=95)
        depth = 1500 + 8 * y + 3 * x + rng.normal(0, 5, (h, w))  # (h, w) millimetres
        depth[(x // 160 + y // 120 + i) % 5 == 0] = 0  # holes = missing
        Image.fromarray(depth.astype(np.uint16)).save(root / "depth" / f"{i:04d}.png")
        labels = ((x // 80 + (y // 60) * 8 + i) % 41).astype(np.uint8)  # (h, w) class ids
        labels[:, :8] = 255  # unlabelled border
        Image.fromarray(labels).save(root / "labels" / f"{i:04d}.png")
    (root / "classes.txt").write_text("\n".join(["unlabeled"] + [f"class{i}" for i in range(1, 41)]) + "\n")


def classes_per_shard(out: Path) -> list[int]:
    tars = sorted((out / "rgb").glob("*.tar"))
    return [len({int(s["cls"]) for s in wds.WebDataset(str(t), shardshuffle=False)}) for t in tars]


def timed_build(source, out: Path) -> str:
    t = time.perf_counter()
    summary = build(source, str(out), shard_size=30, workers=1, progress=False)
    rate = summary.samples / (time.perf_counter() - t)
    return f"{rate:.1f} samples/s ({summary.bytes / 1e6:.1f} MB for {summary.samples} samples)"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--keep", help="generate into this folder and keep it (default: a temp dir)")
    tmp = Path(ap.parse_args().keep or tempfile.mkdtemp(prefix="bench_sources_"))
    imagenet, nyu = tmp / "imagenet", tmp / "nyu"
    if not imagenet.exists():
        imagenet_tree(imagenet)
    if not nyu.exists():
        paired_tree(nyu)
    stamp = time.strftime("%H%M%S")
    for shuffle in (False, True):
        out = tmp / f"in-{shuffle}-{stamp}"
        build(open_source("imagenet", str(imagenet), size=64, shuffle=shuffle), str(out), shard_size=50, progress=False)
        print(f"classes per shard, {'shuffled' if shuffle else 'sorted'}: {classes_per_shard(out)}")

    items = [Item(f"k{i}", f"n{i % 1000:08d}/{i}.JPEG", f"/data/{i}.JPEG", i % 1000, "n") for i in range(1_281_167)]
    t = time.perf_counter()
    random.Random(0).shuffle(items)
    print(f"shuffle of 1,281,167 items: {time.perf_counter() - t:.2f} s")

    t = time.perf_counter()
    open_source("paired", str(nyu), modalities=PAIRED, depth_scale=0.001)
    scanned = time.perf_counter() - t
    t = time.perf_counter()
    paired = open_source(
        "paired", str(nyu), modalities=PAIRED, depth_scale=0.001, semseg_classes=str(nyu / "classes.txt")
    )
    print(f"paired enumeration: {time.perf_counter() - t:.2f} s with --semseg-classes, {scanned:.2f} s without")
    print(f"paired rgb + depth_gt + semseg_gt, native 640x480, 1 worker: {timed_build(paired, tmp / f'p-{stamp}')}")
    rgb_only = open_source("folder", str(nyu / "rgb"), size=480)  # 480: the native shorter side, as paired keeps
    print(f"the rgb files alone (--src folder), 1 worker:           {timed_build(rgb_only, tmp / f'f-{stamp}')}")


if __name__ == "__main__":
    main()
