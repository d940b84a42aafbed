"""Sources and robust image loading: every bad-input kind, keys, classes, re-sharding."""

from __future__ import annotations

import io
import json
import pickle
import struct
import tarfile
import zlib
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
from PIL import Image

from shards import fs
from shards.build import build
from shards.format import decode_rgb
from shards.images import BadImage, load_rgb
from shards.sources import SourceError, open_source, sanitize_key, unique_keys

RED, BLUE = (255, 0, 0), (0, 0, 255)


# --- file makers ----------------------------------------------------------------------------------


def jpeg(arr: np.ndarray, **kw) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "JPEG", quality=95, **kw)
    return buf.getvalue()


def png(im: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, "PNG", **kw)
    return buf.getvalue()


def raw_png(width: int, height: int, bit_depth: int, color_type: int, raw: bytes) -> bytes:
    """A PNG written by hand (PIL cannot write 16-bit RGB, nor lie about its size)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, color_type, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")


def cmyk_jpeg(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).convert("CMYK").save(buf, "JPEG", quality=95)
    return buf.getvalue()


def halves(h: int = 32, w: int = 64) -> np.ndarray:
    """(h, w, 3): left half red, right half blue."""
    a = np.zeros((h, w, 3), np.uint8)
    a[:, : w // 2] = RED
    a[:, w // 2 :] = BLUE
    return a


def textured(h: int, w: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w]
    base = 127 + 60 * np.sin(x / 7.0 + seed)[..., None] * np.cos(y / 11.0)[..., None]
    return np.clip(base + rng.normal(0, 20, (h, w, 3)), 0, 255).astype(np.uint8)


def huge_jpeg() -> bytes:
    """A small JPEG whose SOF header claims 60000 x 60000 px (a decompression bomb)."""
    data = bytearray(jpeg(halves(16, 16)))
    sof = data.index(b"\xff\xc0")
    data[sof + 5 : sof + 9] = struct.pack(">HH", 60000, 60000)
    return bytes(data)


BAD_FILES = {  # name -> (bytes, expected reason prefix)
    "empty.jpg": (b"", "empty file"),
    "truncated.jpg": (None, "truncated"),
    "text.jpg": (b"this is a text file, not an image\n" * 4, "not an image"),
    "bomb.png": (raw_png(100_000, 100_000, 8, 2, b"\x00" * 64), "too large"),
    "bomb.jpg": (huge_jpeg(), "too large"),
}


def truncated_jpeg() -> bytes:
    data = jpeg(textured(300, 400))
    return data[: len(data) // 2]


# --- load_rgb: each bad kind ----------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(BAD_FILES))
def test_unreadable_files_raise_bad_image_with_reason(name):
    data, reason = BAD_FILES[name]
    if data is None:
        data = truncated_jpeg()
    with pytest.raises(BadImage) as err:
        load_rgb(data, 64)
    assert err.value.reason.startswith(reason), err.value.reason


def test_pixel_limit_is_configurable():
    data = png(Image.fromarray(halves(100, 100)))
    assert load_rgb(data, None, max_pixels=10_000)[0].shape == (100, 100, 3)
    with pytest.raises(BadImage, match="too large: 100x100 px"):
        load_rgb(data, None, max_pixels=9_999)


@pytest.mark.parametrize("size", [None, 16])
@pytest.mark.parametrize(
    "orientation, top_left, bottom_right, shape",
    [
        (1, RED, BLUE, (32, 64)),
        (3, BLUE, RED, (32, 64)),  # rotated 180
        (6, RED, BLUE, (64, 32)),  # 90 clockwise: stored left (red) becomes the top
        (8, BLUE, RED, (64, 32)),  # 90 counter-clockwise: stored left becomes the bottom
    ],
)
def test_exif_orientation_is_applied(orientation, top_left, bottom_right, shape, size):
    exif = Image.Exif()
    exif[0x0112] = orientation
    arr, orig = load_rgb(jpeg(halves(), exif=exif), size)
    assert orig == shape
    h, w = shape if size is None else (shape[0] // 2, shape[1] // 2)  # shorter side 32 -> 16
    assert arr.shape == (h, w, 3)
    assert np.abs(arr[1, 1].astype(int) - top_left).max() <= 3
    assert np.abs(arr[-2, -2].astype(int) - bottom_right).max() <= 3


def test_cmyk_jpeg_is_converted_to_rgb():
    data = cmyk_jpeg(halves())
    assert Image.open(io.BytesIO(data)).mode == "CMYK"
    arr, _ = load_rgb(data)
    assert arr.shape == (32, 64, 3)
    assert np.abs(arr[16, 8].astype(int) - RED).max() <= 3
    assert np.abs(arr[16, 56].astype(int) - BLUE).max() <= 3


def test_palette_with_transparency_is_composited_on_white():
    ids = np.zeros((8, 8), np.uint8)
    ids[:, 4:] = 1
    im = Image.fromarray(ids, "P")
    im.putpalette([0, 0, 0, 255, 0, 0])
    arr, _ = load_rgb(png(im, transparency=0))  # index 0 (black) is fully transparent
    assert (arr[:, :4] == 255).all()
    assert (arr[:, 4:] == RED).all()


def test_rgba_half_alpha_is_blended_on_white():
    rgba = np.zeros((4, 4, 4), np.uint8)
    rgba[...] = (0, 0, 255, 128)
    arr, _ = load_rgb(png(Image.fromarray(rgba, "RGBA")))
    assert np.abs(arr[0, 0].astype(int) - (127, 127, 255)).max() <= 1


def test_16bit_grayscale_png_is_scaled_not_clipped():
    values = (np.arange(256 * 2).reshape(2, 256) * 128).astype(np.uint16)  # 0 .. 65408
    im = Image.fromarray(values)
    assert im.mode == "I;16"
    arr, _ = load_rgb(png(im))
    expected = np.rint(values / 257.0).astype(int)
    assert np.abs(arr[..., 0].astype(int) - expected).max() == 0
    assert (arr[..., 0] == arr[..., 2]).all()


def test_16bit_rgb_png_keeps_the_high_byte():
    rgb16 = np.zeros((2, 3, 3), ">u2")
    rgb16[..., 0] = [[0, 1000, 65535], [30000, 40000, 50000]]
    rgb16[..., 2] = 65535 - rgb16[..., 0]
    raw = b"".join(b"\x00" + row.tobytes() for row in rgb16)
    arr, _ = load_rgb(raw_png(3, 2, 16, 2, raw))
    assert (arr[..., 0] == rgb16[..., 0] >> 8).all()
    assert (arr[..., 2] == rgb16[..., 2] >> 8).all()


def test_resize_shorter_side_without_upscaling():
    big = jpeg(textured(600, 900))
    arr, orig = load_rgb(big, 256)
    assert arr.shape == (256, 384, 3) and orig == (600, 900)
    small = png(Image.fromarray(textured(100, 80)))
    assert load_rgb(small, 256)[0].shape == (100, 80, 3)


def test_draft_decoding_matches_full_decoding():
    src = textured(800, 1200, seed=3)
    fast, _ = load_rgb(jpeg(src), 200)
    full = np.asarray(Image.fromarray(src).resize(fast.shape[1::-1], Image.Resampling.BICUBIC))
    assert np.abs(fast.astype(int) - full.astype(int)).mean() < 8


# --- keys -----------------------------------------------------------------------------------------


def test_keys_are_sanitised_deterministic_and_unique():
    assert sanitize_key("n01440764/n01440764_10026") == "n01440764-n01440764_10026"
    assert sanitize_key("a b.c") == "a_b_c"
    assert sanitize_key("_x") == "k_x"
    assert unique_keys(["a/b c", "a/b_c", "a/b_c", "_x"]) == ["a-b_c", "a-b_c-1", "a-b_c-2", "k_x"]


# --- sources through a real build -----------------------------------------------------------------


def read_rgb_shards(root: Path) -> list[dict]:
    ds = wds.WebDataset(sorted(str(p) for p in (root / "rgb").glob("*.tar")), shardshuffle=False)
    return list(ds)


def test_folder_build_skips_each_bad_kind_and_converts_the_rest(tmp_path):
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    for name, (data, _) in BAD_FILES.items():
        (src / name).write_bytes(truncated_jpeg() if data is None else data)
    exif = Image.Exif()
    exif[0x0112] = 6
    (src / "rotated.jpg").write_bytes(jpeg(halves(), exif=exif))
    (src / "cmyk.jpg").write_bytes(cmyk_jpeg(halves()))
    (src / "sub" / "good image.png").write_bytes(png(Image.fromarray(textured(300, 500))))
    (src / "notes.txt").write_text("ignored: not an image extension")
    (src / ".hidden.jpg").write_bytes(b"")

    source = open_source("folder", str(src), size=128, shuffle=False)  # sorted order, to know each shard's files
    summary = build(source, str(tmp_path / "out"), shard_size=4, progress=False)

    assert summary.samples == 3 and summary.shards == 2
    assert summary.skipped == {"empty file": 1, "truncated": 1, "not an image": 1, "too large": 2}
    samples = read_rgb_shards(tmp_path / "out")
    assert [s["__key__"] for s in samples] == ["cmyk", "rotated", "sub-good_image"]
    rotated = decode_rgb(samples[1]["rgb.jpg"])
    assert rotated.shape == (64, 32, 3)  # shorter side 32 < 128: not upscaled
    assert np.abs(rotated[2, 16].astype(int) - RED).max() <= 3 and np.abs(rotated[-3, 16].astype(int) - BLUE).max() <= 3
    assert decode_rgb(samples[2]["rgb.jpg"]).shape == (128, 213, 3)
    assert json.loads(samples[2]["json"]) == {"source": "sub/good image.png", "orig_size": [300, 500]}
    stats = [json.loads((tmp_path / "out" / "rgb" / f"shard-00000{i}.json").read_text()) for i in (0, 1)]
    skipped = {s["ref"]: s["reason"].split(":")[0] for st in stats for s in st["skipped"]}
    assert skipped == {
        "bomb.jpg": "too large",
        "bomb.png": "too large",
        "empty.jpg": "empty file",
        "text.jpg": "not an image",
        "truncated.jpg": "truncated",
    }
    assert [st["count"] for st in stats] == [
        1,
        2,
    ]  # sorted order: bomb.jpg bomb.png cmyk empty | rotated sub/ text trunc


def make_imagenet(root: Path, per_class: dict[str, int]) -> None:
    for c, (wnid, n) in enumerate(sorted(per_class.items())):
        (root / wnid).mkdir(parents=True)
        for i in range(n):
            (root / wnid / f"{wnid}_{i}.JPEG").write_bytes(jpeg(textured(300 + 10 * i, 400, seed=c * 10 + i)))


def test_imagenet_source_classes_keys_and_meta(tmp_path):
    make_imagenet(tmp_path / "in", {"n00000002": 2, "n00000001": 3, "n00000003": 1})
    (tmp_path / "in" / "README.txt").write_text("not a class")
    source = open_source("imagenet", str(tmp_path / "in"), size=96, shuffle=False)
    assert source.cls_classes == ["n00000001", "n00000002", "n00000003"]
    summary = build(source, str(tmp_path / "out"), shard_size=4, progress=False)
    assert (summary.samples, summary.shards, sum(summary.skipped.values())) == (6, 2, 0)
    samples = read_rgb_shards(tmp_path / "out")
    assert [s["__key__"] for s in samples] == [
        "n00000001-n00000001_0",
        "n00000001-n00000001_1",
        "n00000001-n00000001_2",
        "n00000002-n00000002_0",
        "n00000002-n00000002_1",
        "n00000003-n00000003_0",
    ]
    assert [int(s["cls"]) for s in samples] == [0, 0, 0, 1, 1, 2]
    meta = json.loads(samples[4]["json"])
    assert meta == {"source": "n00000002/n00000002_1.JPEG", "wnid": "n00000002", "orig_size": [310, 400]}
    assert decode_rgb(samples[4]["rgb.jpg"]).shape == (96, 124, 3)
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["cls_classes"] == ["n00000001", "n00000002", "n00000003"] and manifest["total"] == 6
    assert [s["count"] for s in manifest["shards"]] == [4, 2]


def test_folder_class_from_parent(tmp_path):
    for cls, n in (("dogs", 2), ("cats", 1)):
        (tmp_path / "in" / cls).mkdir(parents=True)
        for i in range(n):
            (tmp_path / "in" / cls / f"{i}.png").write_bytes(png(Image.fromarray(textured(40, 40, seed=i))))
    source = open_source("folder", str(tmp_path / "in"), class_from_parent=True)
    assert source.cls_classes == ["cats", "dogs"]
    assert sorted((it.key, it.cls, it.label) for it in source.items) == [
        ("cats-0", 0, "cats"),
        ("dogs-0", 1, "dogs"),
        ("dogs-1", 1, "dogs"),
    ]
    (tmp_path / "in" / "loose.png").write_bytes(png(Image.fromarray(textured(40, 40))))
    with pytest.raises(SourceError, match="loose.png has no parent folder"):
        open_source("folder", str(tmp_path / "in"), class_from_parent=True)


class _Trap:
    """Unpickling this creates a file: proves that a `.pyd` member is never unpickled."""

    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return (Path.touch, (Path(self.path),))


def test_webdataset_source_reshards_and_never_unpickles(tmp_path):
    sentinel = tmp_path / "unpickled"
    src = tmp_path / "wds"
    src.mkdir()
    n = 0
    for t in range(2):
        with wds.TarWriter(str(src / f"part-{t:05d}.tar")) as w:
            for i in range(5):
                sample = {
                    "__key__": f"{t:05d}{i:04d}",
                    "jpg": jpeg(textured(60, 80, seed=n)),
                    "cls": str(n % 3),
                    "txt": f"caption {n}",
                    "json": json.dumps({"url": f"http://x/{n}"}),
                }
                if n == 3:
                    sample["pyd"] = pickle.dumps(_Trap(str(sentinel)))
                if n == 7:
                    del sample["jpg"]  # a sample without an image is skipped, not fatal
                w.write(sample)
                n += 1
    summary = build(open_source("webdataset", str(src)), str(tmp_path / "out"), shard_size=4, progress=False)
    assert not sentinel.exists()
    assert (summary.samples, summary.shards, dict(summary.skipped)) == (
        9,
        3,
        {"no image member (has ['cls', 'json', 'txt'])": 1},
    )
    samples = read_rgb_shards(tmp_path / "out")
    assert [s["__key__"] for s in samples] == [f"{t:05d}{i:04d}" for t in range(2) for i in range(5) if t * 5 + i != 7]
    assert all(sorted(k for k in s if not k.startswith("__")) == ["cls", "json", "rgb.jpg"] for s in samples)
    meta = json.loads(samples[3]["json"])
    assert meta == {
        "source": "part-00000.tar:000000003",
        "caption": "caption 3",
        "meta": {"url": "http://x/3"},
        "orig_size": [60, 80],
    }
    assert [int(s["cls"]) for s in samples] == [i % 3 for i in range(10) if i != 7]
    # the same input through a brace pattern gives the same items
    pattern = open_source("webdataset", str(src / "part-{00000..00001}.tar"))
    assert [it.key for it in pattern.items] == [f"{t:05d}{i:04d}" for t in range(2) for i in range(5)]


def test_the_registry_refuses_an_option_of_another_source_and_an_unknown_one(tmp_path):
    from shards.sources import SOURCES

    assert list(SOURCES) == ["imagenet", "folder", "paired", "webdataset", "synthetic"]
    assert SOURCES["paired"].options[:2] == ("modalities", "depth_scale") and SOURCES["webdataset"].options == ()
    with pytest.raises(SourceError, match="--class-from-parent applies to --src folder / paired, not --src imagenet"):
        open_source("imagenet", str(tmp_path), class_from_parent=True)
    with pytest.raises(SourceError, match="--depth-meaning applies to --src paired, not --src synthetic"):
        open_source("synthetic", depth_meaning="relative")
    with pytest.raises(SourceError, match="unknown source option 'depht_scale'"):
        open_source("paired", str(tmp_path), depht_scale=0.001)
    with pytest.raises(SourceError, match="--src folder needs --root"):
        open_source("folder")
    # not given (None / False) is not refused: the CLI passes every option
    assert len(open_source("synthetic", num=3, labels=None, class_from_parent=False)) == 3


def test_source_errors_name_the_path(tmp_path):
    with pytest.raises(SourceError, match=f"{tmp_path}/missing does not exist"):
        open_source("imagenet", str(tmp_path / "missing"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(SourceError, match="no image"):
        open_source("folder", str(tmp_path / "empty"))
    with pytest.raises(SourceError, match="no .tar files"):
        open_source("webdataset", str(tmp_path / "empty"))
    (tmp_path / "bad.tar").write_bytes(b"not a tar" * 100)
    with pytest.raises(SourceError, match="bad.tar is not a readable uncompressed tar"):
        open_source("webdataset", str(tmp_path / "bad.tar"))
    with pytest.raises(SourceError, match="needs --root"):
        open_source("folder", None)
    with pytest.raises(SourceError, match="unknown source"):
        open_source("laion", "x")


def test_tar_members_read_by_offset_match_tarfile(tmp_path):
    path = tmp_path / "x.tar"
    with wds.TarWriter(str(path)) as w:
        for i in range(3):
            w.write({"__key__": f"dir/k{i}", "png": png(Image.fromarray(textured(10, 10, seed=i))), "cls": str(i)})
    from shards.sources import scan_tar

    scanned = scan_tar(str(path))
    assert [k for k, _ in scanned] == ["dir/k0", "dir/k1", "dir/k2"]
    with tarfile.open(path) as tar, fs.open_file(str(path)) as f:
        for key, ranges in scanned:
            for ext, (offset, size) in ranges.items():
                f.seek(offset)
                assert f.read(size) == tar.extractfile(f"{key}.{ext}").read()
