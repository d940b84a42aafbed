"""Member decoding (shards.format.decode_*): JPEGs through libjpeg-turbo straight into arrays where the header
allows, Pillow otherwise; the values are Pillow's (PNG exactly, JPEG within 1), and the safety checks come first;
the PNGs the shard writer stores (Up-filtered depth, unfiltered label maps, ISA-L deflate); 16-bit RGB PNGs checked
before libpng sees them."""

from __future__ import annotations

import io
import struct
import subprocess
import sys
import zlib

import numpy as np
import pytest
import torchvision.io
from PIL import Image

from shards import format as F
from shards import images
from shards.images import BadImage, fast_jpeg, fast_png, jpeg_header, load_vectors
from shards.reader import decode_members

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")  # torchvision 0.29 deprecates its decoders


def pillow_png(a: np.ndarray, **params) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, format="PNG", **params)
    return buf.getvalue()


def pillow_jpeg(a: np.ndarray, **params) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, format="JPEG", **params)
    return buf.getvalue()


def planes(seed: int, h: int, w: int, top: int) -> np.ndarray:
    """A (h, w) map in 0..top: smooth ramps, blocks and noise, so that every PNG filter shows up."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w]
    smooth = (x * 3 + y * 5) * top / (3 * w + 5 * h)
    blocks = np.kron(rng.integers(0, top + 1, (h // 4 + 1, w // 4 + 1)), np.ones((4, 4)))[:h, :w]
    noise = rng.integers(0, top + 1, (h, w))
    kind = seed % 3
    return (smooth if kind == 0 else blocks if kind == 1 else (smooth + noise) / 2).astype(np.int64)


def pillow_reference(data: bytes) -> np.ndarray:
    """The values today's Pillow path gives: np.asarray of the opened image, nothing converted."""
    with Image.open(io.BytesIO(data), formats=["PNG"]) as im:
        return np.asarray(im)


def chunk(tag: bytes, body: bytes) -> bytes:
    """One PNG chunk: length, tag, body, CRC."""
    return struct.pack(">I", len(body)) + tag + body + struct.pack(">I", zlib.crc32(tag + body))


def idat_of(png: bytes) -> bytes:
    """The image data of a PNG whose IDAT follows its IHDR (the 8-byte signature, then 25 bytes)."""
    (n,) = struct.unpack(">I", png[33:37])
    return png[41 : 41 + n]


def with_idat(png: bytes, body: bytes) -> bytes:
    """`png`'s signature and IHDR, then `body` as its one IDAT, then IEND."""
    return png[:33] + chunk(b"IDAT", body) + chunk(b"IEND", b"")


def sub_png(values: np.ndarray) -> bytes:
    """The writer's layout with the Sub filter on every row instead of Up (the other filter fast_png undoes)."""
    h, w = values.shape
    size = values.dtype.itemsize
    rows = np.ascontiguousarray(values, values.dtype.newbyteorder(">")).view(np.uint8).reshape(h, w * size)
    filtered = np.empty((h, 1 + w * size), np.uint8)
    filtered[:, 0], filtered[:, 1 : 1 + size] = 1, rows[:, :size]
    np.subtract(rows[:, size:], rows[:, :-size], out=filtered[:, 1 + size :])
    ihdr = struct.pack(">IIBBBBB", w, h, 8 * size, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + with_idat(bytes(33), zlib.compress(filtered.tobytes()))[33:]


def calls(monkeypatch) -> dict[str, int]:
    """Counts of calls to the direct decoders: torchvision's (fast_jpeg calls its CPU JPEG operator), and ISA-L's
    inflate (fast_png), by name."""
    counts = {"decode_jpeg": 0, "decode_png": 0, "decompressobj": 0}

    def counting(real, name):
        def counted(*args, **kw):
            counts[name] += 1
            return real(*args, **kw)

        return counted

    decoders = ((torchvision.io, "decode_jpeg"), (torchvision.io, "decode_png"), (images.isal_zlib, "decompressobj"))
    for module, name in decoders:
        monkeypatch.setattr(module, name, counting(getattr(module, name), name))
    op, rgb = images._jpeg_op()
    monkeypatch.setattr(images, "_jpeg_op", lambda: (counting(op, "decode_jpeg"), rgb))
    return counts


# --- PNG: identical values ------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(12))
@pytest.mark.parametrize("writer", ["shards", "sub", "pillow level 1", "pillow level 9"])
def test_gray_png_members_decode_to_the_stored_values_exactly(seed, writer):
    h, w = 17 + seed * 7, 33 + seed * 5
    depth_q, ids8, ids16 = planes(seed, h, w, 65535), planes(seed + 1, h, w, 254), planes(seed + 2, h, w, 3000)
    for q, dtype in ((depth_q, np.uint16), (ids8, np.uint8), (ids16, np.uint16)):
        stored = q.astype(dtype)
        if writer in ("shards", "sub"):
            png = F._png(stored) if writer == "shards" else sub_png(stored)
        else:
            png = pillow_png(stored, compress_level=int(writer[-1]))
        assert np.array_equal(pillow_reference(png), stored)
        fast = fast_png(png, 2**30, (8, 16))  # one IDAT, all rows Up or all Sub; Pillow decodes the others
        assert fast is not None or writer.startswith("pillow")  # Pillow's rows may happen to qualify too
        assert fast is None or np.array_equal(fast, stored)
        assert np.array_equal(F.decode_semseg(png), q)
        if dtype == np.uint16:
            lo, hi = 0.25 * seed, 0.25 * seed + 7.5
            expected = (lo + stored.astype(np.float64) / F.DEPTH_LEVELS * (hi - lo)).astype(np.float32)
            assert F.decode_depth(png, [lo, hi]).tobytes() == expected.tobytes()  # bit for bit


@pytest.mark.parametrize("seed", range(8))
def test_rgb_png_normals_decode_exactly_8_and_16_bit(seed):
    h, w = 20 + seed, 31 + 2 * seed
    v8 = np.stack([planes(seed + c, h, w, 255) for c in range(3)], -1).astype(np.uint8)
    v16 = np.stack([planes(seed + c, h, w, 65535) for c in range(3)], -1).astype(np.uint16)
    for png in (F.encode_normals_levels(v8), pillow_png(v8, compress_level=9), F._png(v8)):
        assert np.array_equal(F.normals_levels(png), v8)
    assert np.array_equal(F.normals_levels(F.encode_normals_levels(v16)), v16)
    n = F.decode_normals(F.encode_normals_levels(v16))
    assert n.dtype == np.float32 and n.shape == (h, w, 3)


def test_shard_pngs_are_up_filtered_or_unfiltered_and_open_in_pillow_as_before():
    q = planes(0, 40, 50, 65535).astype(np.uint16)
    png, _ = F.encode_depth(q.astype(np.float32))
    raw = zlib.decompress(idat_of(png))
    assert set(raw[:: 1 + 2 * 50]) == {2}  # every row's filter byte: Up
    with Image.open(io.BytesIO(png)) as im:
        assert im.mode == "I;16" and im.size == (50, 40)
    ids = planes(1, 40, 50, 8)
    for num_classes, mode in ((9, "L"), (300, "I;16")):
        png = F.encode_semseg(ids, num_classes)
        raw = zlib.decompress(idat_of(png))
        assert set(raw[:: 1 + 50 * (1 if mode == "L" else 2)]) == {0}  # label maps: no filter
        assert np.array_equal(pillow_reference(png), ids) and np.array_equal(F.decode_semseg(png), ids)
        with Image.open(io.BytesIO(png)) as im:
            assert im.mode == mode
    with pytest.raises(F.FormatError, match="empty image"):
        F._png(np.zeros((0, 4), np.uint16))


def test_damaged_shard_pngs_leave_the_fast_path_and_decode_or_fail_as_before(monkeypatch):
    good = F._png(planes(5, 30, 41, 65535).astype(np.uint16))
    idat = idat_of(good)
    raw = bytearray(zlib.decompress(idat))
    raw[1 + 2 * 41] = 1  # the second row Sub-filtered: still a valid PNG
    unfiltered = F.encode_semseg(planes(6, 30, 41, 8), 9)
    mixed = bytearray(zlib.decompress(idat_of(unfiltered)))
    mixed[1 + 41] = 2  # the second row of an unfiltered label map Up-filtered
    damaged = {
        "bad IHDR CRC": good[:29] + bytes(4) + good[33:],
        "bad adler32": with_idat(good, idat[:-4] + bytes(4)),
        "stream cut": with_idat(good, idat[: len(idat) // 2]),
        "another filter": with_idat(good, zlib.compress(bytes(raw))),
        "extra rows": with_idat(good, zlib.compress(zlib.decompress(idat) + bytes(1 + 2 * 41))),
        "no IEND": good[:-12],
        "an unfiltered map with one Up row": with_idat(unfiltered, zlib.compress(bytes(mixed))),
    }

    def outcome(decode, data: bytes) -> tuple[str, object]:
        try:
            return "ok", decode(data).tolist()
        except Exception as e:
            return "error", f"{type(e).__name__}: {e}"

    for name, data in damaged.items():
        assert fast_png(data, 2**30, (8, 16)) is None, name
        got = outcome(F.decode_semseg, data), outcome(lambda d: F.decode_depth(d, [0.0, 1.0]), data)
        with monkeypatch.context() as m:
            m.setattr(F, "fast_png", lambda *args, **kw: None)  # the Pillow path alone, as before
            before = outcome(F.decode_semseg, data), outcome(lambda d: F.decode_depth(d, [0.0, 1.0]), data)
        assert got == before, name


def rgb16_variants() -> dict[str, bytes]:
    """A 16-bit RGB normals PNG damaged in each way libpng reports as an error."""
    v = np.stack([planes(c, 24, 20, 65535) for c in range(3)], -1).astype(np.uint16)
    good = F.encode_normals_levels(v)
    idat = idat_of(good)
    raw = bytearray(zlib.decompress(idat))
    raw[0] = 9
    crc_at = 41 + len(idat)
    return {
        "bad adler32": with_idat(good, idat[:-4] + bytes(4)),
        "bad CRC": good[:crc_at] + bytes(4) + good[crc_at + 4 :],
        "stream cut": with_idat(good, idat[: len(idat) // 2]),
        "filter type 9": with_idat(good, zlib.compress(bytes(raw))),
        "file cut": good[: len(good) // 2],
        "deflate bomb": with_idat(good, zlib.compress(bytes(len(raw) * 50))),
    }


def test_damaged_16_bit_rgb_pngs_are_refused_before_libpng_sees_them():
    """torchvision 0.29's decode_png crashes the process on any libpng error: run the cases in a child."""
    code = (
        "import sys, warnings; warnings.simplefilter('ignore'); sys.path.insert(0, 'tests')\n"
        "from test_decode import rgb16_variants\n"
        "from shards.images import BadImage, load_vectors\n"
        "for name, data in rgb16_variants().items():\n"
        "    try:\n"
        "        load_vectors(data)\n"
        "        print(name, '-> decoded')\n"
        "    except BadImage as e:\n"
        "        print(name, '->', e.reason)\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    lines = dict(line.split(" -> ") for line in res.stdout.splitlines())
    assert lines == {
        "bad adler32": "corrupt: image data does not inflate (Error -3 while decompressing data: incorrect data check)",
        "bad CRC": "corrupt: bad CRC in chunk b'IDAT'",
        "stream cut": "truncated",
        "filter type 9": "corrupt: bad PNG filter type",
        "file cut": "truncated",
        "deflate bomb": "decoded",  # extra data past the image is ignored, and never inflated whole
    }


def test_16_bit_rgb_png_checks_keep_the_values():
    v = np.stack([planes(c, 24, 20, 65535) for c in range(3)], -1).astype(np.uint16)
    png = F.encode_normals_levels(v)
    with_text = png[:33] + chunk(b"tEXt", b"a=bc") + png[33:]  # an ancillary chunk: dropped, the values stay
    assert np.array_equal(load_vectors(with_text), v)
    with pytest.raises(BadImage, match="too large: 20x24 px"):
        load_vectors(png, max_pixels=100)


# --- JPEG: within 1 -------------------------------------------------------------------------------


@pytest.mark.parametrize("quality", [75, 95])
@pytest.mark.parametrize("subsampling", [0, 1, 2])
@pytest.mark.parametrize("progressive", [False, True])
def test_jpeg_members_decode_within_one_of_pillow(quality, subsampling, progressive, monkeypatch):
    count = calls(monkeypatch)
    rng = np.random.default_rng(quality + subsampling)
    y, x = np.mgrid[0:45, 0:67]
    img = np.stack([x * 3, y * 5, x + y], -1) + rng.normal(0, 8, (45, 67, 3))
    data = pillow_jpeg(img.clip(0, 255).astype(np.uint8), quality=quality, subsampling=subsampling,
                       progressive=progressive)  # fmt: skip
    with Image.open(io.BytesIO(data)) as im:
        ref = np.asarray(im.convert("RGB"))
    out = F.decode_rgb(data)
    assert count["decode_jpeg"] == 1  # the fast path took it
    assert out.shape == ref.shape and out.dtype == np.uint8 and out.flags.c_contiguous and out.flags.writeable
    assert np.abs(out.astype(int) - ref).max() <= 1


def test_jpeg_header_walks_the_markers_libjpeg_reads():
    data = F.encode_rgb(np.zeros((21, 34, 3), np.uint8))
    assert jpeg_header(data) == (34, 21, 8, 3)
    soi, rest = data[:2], data[2:]
    comment = b"\xff\xfe" + struct.pack(">H", 7) + b"hello"
    assert jpeg_header(soi + comment + b"\xff" + rest) == (34, 21, 8, 3)  # COM segment and a fill byte
    assert jpeg_header(soi + b"junk" + rest) is None  # bytes between segments: Pillow decides
    assert jpeg_header(soi + b"\xff\xda" + rest) is None  # a scan before any frame
    assert jpeg_header(data[:12]) is None and jpeg_header(b"\x89PNG") is None


# --- the pixel limit comes before any decoding ----------------------------------------------------


def png_claiming(w: int, h: int, depth: int = 16, colour: int = 0) -> bytes:
    """A PNG whose IHDR claims w x h pixels, followed by a few bytes of image data."""
    ihdr = struct.pack(">IIBBBBB", w, h, depth, colour, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def jpeg_claiming(w: int, h: int) -> bytes:
    """A real JPEG whose SOF is edited to claim w x h pixels."""
    data = bytearray(F.encode_rgb(np.zeros((8, 8, 3), np.uint8)))
    at = data.index(b"\xff\xc0") + 5
    data[at : at + 4] = struct.pack(">HH", h, w)
    return bytes(data)


def test_too_many_pixels_are_refused_from_the_header_before_decoding(monkeypatch):
    count = calls(monkeypatch)
    for side, reason in ((10000, "too large: 10000x10000 px"), (60000, "too large: Image size .3600000000 pixels")):
        # 0.1 and 3.6 gigapixels: libjpeg or libpng would allocate 0.3 to 11 GB
        with pytest.raises(F.FormatError, match=reason):
            F.decode_depth(png_claiming(side, side), [0.0, 1.0])
        with pytest.raises(F.FormatError, match=reason):
            F.decode_semseg(png_claiming(side, side, depth=8))
        with pytest.raises(F.FormatError, match=reason):
            F.decode_rgb(jpeg_claiming(side, side))
        with pytest.raises(F.FormatError, match=reason):
            F.decode_normals(png_claiming(side, side, colour=2))
    monkeypatch.setenv("MULTIMAE_MAX_PIXELS", "1000")
    with pytest.raises(F.FormatError, match=r"too large: 64x64 px \(limit 1000 px\)"):
        F.decode_rgb(F.encode_rgb(np.zeros((64, 64, 3), np.uint8)))
    with pytest.raises(F.FormatError, match=r"too large: 40x30 px \(limit 1000 px\)"):
        F.decode_depth(F.encode_depth(np.ones((30, 40), np.float32))[0], [0.0, 1.0])
    assert count == {"decode_jpeg": 0, "decode_png": 0, "decompressobj": 0}
    monkeypatch.delenv("MULTIMAE_MAX_PIXELS")
    F.decode_depth(F.encode_depth(np.ones((30, 40), np.float32))[0], [0.0, 1.0])
    F.decode_rgb(F.encode_rgb(np.zeros((64, 64, 3), np.uint8)))
    assert count == {"decode_jpeg": 1, "decode_png": 0, "decompressobj": 1}  # what the limits kept from them


# --- what the fast path leaves to Pillow ----------------------------------------------------------


def test_webp_gray_cmyk_and_png_rgb_members_take_pillows_path(monkeypatch):
    img = np.random.default_rng(0).integers(0, 256, (24, 40, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="WEBP", lossless=True)
    gray = pillow_jpeg(img[..., 0])
    cmyk = io.BytesIO()
    Image.fromarray(img).convert("CMYK").save(cmyk, format="JPEG")
    png_rgb = pillow_png(img)
    count = calls(monkeypatch)
    for data in (buf.getvalue(), gray, cmyk.getvalue(), png_rgb):
        assert fast_jpeg(data, 2**30) is None
        with Image.open(io.BytesIO(data)) as im:
            assert np.array_equal(F.decode_rgb(data), np.asarray(im.convert("RGB")))
    assert np.array_equal(F.decode_rgb(buf.getvalue()), img)  # lossless WebP
    assert count["decode_jpeg"] == 0


def test_palette_one_bit_and_transparent_pngs_decode_as_before():
    ids = planes(1, 23, 31, 9).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(ids, mode="L").convert("P").save(buf, format="PNG")
    assert np.array_equal(F.decode_semseg(buf.getvalue()), ids)  # the palette indices, as before
    buf = io.BytesIO()
    Image.fromarray(ids > 4).convert("1").save(buf, format="PNG")
    with pytest.raises(F.FormatError, match="semseg PNG must be single-channel, got mode 1"):
        F.decode_semseg(buf.getvalue())
    with_text = pillow_png(ids, pnginfo=_text_chunk())  # a chunk between IHDR and IDAT
    transparent = pillow_png(ids, transparency=3)
    for data in (with_text, transparent):
        assert np.array_equal(F.decode_semseg(data), ids)
    with pytest.raises(F.FormatError, match="depth PNG must be 16-bit grayscale, got mode L"):
        F.decode_depth(F._png(ids), [0.0, 1.0])


def _text_chunk():
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    info.add_text("Comment", "made by a test")
    return info


def test_label_pngs_are_standard_zlib_streams_and_zlib_pngs_decode_the_same():
    """The writer deflates with ISA-L, the reader inflates with ISA-L: zlib (any PNG reader) reads the writer's
    streams, and the reader reads zlib's at every level."""
    q = planes(7, 33, 45, 65535).astype(np.uint16)
    for values in (q, q.astype(np.uint8), np.stack([q, q // 3, q // 7], -1).astype(np.uint16)):
        png = F._png(values)
        raw = zlib.decompress(idat_of(png))
        assert len(raw) == values.shape[0] * (1 + values[0].size * values.dtype.itemsize)
        with Image.open(io.BytesIO(png)) as im:
            im.load()  # Pillow's zlib checks the stream (adler32) and the chunk CRCs
        for level in (1, 6, 9):
            again = with_idat(png, zlib.compress(raw, level))
            if values.ndim == 2:
                assert np.array_equal(fast_png(again, 2**30, (8, 16)), fast_png(png, 2**30, (8, 16)))
                assert np.array_equal(fast_png(png, 2**30, (8, 16)), values)
    gray = F._png(q)
    assert fast_png(gray, 2**30, (16,)) is not None
    assert fast_png(with_idat(gray, idat_of(gray)[:-4] + bytes(4)), 2**30, (16,)) is None  # bad adler32


def test_without_torchvision_decoders_pillow_decodes_the_same(monkeypatch):
    jpg = F.encode_rgb(np.random.default_rng(0).integers(0, 256, (16, 24, 3), dtype=np.uint8))
    fast = F.decode_rgb(jpg)
    monkeypatch.setattr(images, "_torchvision_io", lambda: None)
    monkeypatch.setattr(images, "_jpeg_op", lambda: None)
    assert fast_jpeg(jpg, 2**30) is None
    assert np.abs(fast.astype(int) - F.decode_rgb(jpg)).max() <= 1


# --- damaged members ------------------------------------------------------------------------------


def test_truncated_and_corrupt_members_raise_format_error_with_the_reason():
    jpg = F.encode_rgb(np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8))
    png, rng = F.encode_depth(planes(3, 32, 32, 1000).astype(np.float32))
    ids = F.encode_semseg(planes(4, 32, 32, 5), 6)
    at = jpg.index(b"\xff\xc4")  # the first Huffman table
    cases = {
        ("rgb", "rgb.jpg", jpg[: len(jpg) // 2]): r"OSError: image file is truncated \(\d+ bytes not processed\)",
        ("rgb", "rgb.jpg", jpg[:at] + b"\xff\xc4\x00\x03\x99" + jpg[at + 5 :]): "OSError: broken data stream",
        ("depth", "depth.png", png[: len(png) // 2]): r"OSError: image file is truncated\)",
        ("semseg", "semseg.png", ids[:-20] + bytes(20)): "OSError: broken data stream",
        ("semseg", "semseg.png", ids[:30]): "not an image: none of the accepted formats PNG",
    }
    for (m, name, data), reason in cases.items():
        members = {name: data, "depth.json": F.fs.dumps_json({"depth_range": rng})} if m == "depth" else {name: data}
        sample = {"__key__": "k", "__shard__": "shard-000000", m: members}
        with pytest.raises(F.FormatError, match=f"shard-000000.tar: sample 'k' does not decode .*{reason}"):
            decode_members("/data", sample, [m])
