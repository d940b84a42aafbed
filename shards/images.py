"""Robust image loading for shard building.

`load_rgb(data, size)` turns the bytes of any image file into a correct (H, W, 3) uint8 RGB array,
resized so the shorter side is `size` (never upscaled):

- JPEGs are decoded at reduced size with PIL's ``draft()`` (DCT scaling by 1/2, 1/4 or 1/8), which
  is where most of the build speed comes from.
- EXIF orientation is applied; CMYK (also Adobe-inverted) is converted to RGB; palette, LA and RGBA
  images with transparency are composited onto white; 16-bit grayscale is scaled to 8 bits
  (PIL's own ``convert`` would clip it).
- Embedded ICC profiles are not applied (pixels are taken as sRGB, CMYK by PIL's plain formula).
- Files that cannot become an image raise `BadImage` with a short reason: "empty file",
  "not an image", "truncated", "too large: WxH px" (checked from the header, before any decoding,
  so decompression bombs never allocate), "corrupt: ...".

`load_plane(data, max_pixels)` decodes a single-channel file (a depth or label map of the paired source) as
it is stored: (H, W) uint8, uint16, int32 or float32, never rescaled, no EXIF rotation; anything else raises
`BadImage` with the same reasons.

`load_vectors(data, max_pixels)` decodes an RGB PNG of per-pixel vectors (surface normals) as stored: (H, W, 3)
uint8 or uint16.

`open_image(data, formats, max_pixels)` is the one way the toolkit opens image bytes (sources here, shard
members in `shards.format`): only the Pillow plugins named in `formats` may identify the data, and the
pixel count in the header is checked before anything is decoded. The allow-lists hold plugins that
decode in-process only; EPS (which runs Ghostscript) and the other formats Pillow knows never see
untrusted bytes:

- ``SOURCE_FORMATS``  image files of the folder, imagenet and webdataset sources: JPEG, PNG, WebP, BMP,
  GIF, TIFF and PPM/PGM/PBM/PNM
- ``RGB_FORMATS``     a shard's rgb member: JPEG, PNG, WebP
- ``LABEL_FORMATS``   a shard's depth and semseg members: PNG
- ``PLANE_FORMATS``   depth and label files of the paired source: PNG, TIFF

`fast_jpeg(data, max_pixels)` decodes the JPEGs the shard writer stores (8-bit, 3 components, Huffman-coded)
straight into an array through torchvision's libjpeg-turbo, with no copy out of a PIL image: only data whose
header it parses itself (the magic bytes, then the markers up to the SOF, pixel count within `max_pixels`). For
anything else, and when libjpeg reports an error, it returns None and the caller opens the data with
`open_image`: Pillow then decides, so outputs and errors are the ones it gives. `fast_png(data, max_pixels,
bits)` does the same for the grayscale PNGs the shard writer stores, with an inflate and numpy alone. torchvision's
`decode_png` is not used that way: in torchvision 0.29 it crashes the process on any libpng error (a bad CRC, a
damaged deflate stream), so it only ever sees 16-bit RGB PNGs (which Pillow cannot hold), after `load_vectors`
has checked everything libpng would report.
"""

from __future__ import annotations

import functools
import io
import struct
import warnings
import zlib
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from types import ModuleType
from typing import TYPE_CHECKING

import numpy as np
from isal import isal_zlib  # ISA-L's inflate: the same bytes as zlib's, in less than half the time
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from .limits import MAX_PIXELS

if TYPE_CHECKING:
    import torch

SOURCE_FORMATS = ("JPEG", "PNG", "WEBP", "BMP", "GIF", "TIFF", "PPM")
RGB_FORMATS = ("JPEG", "PNG", "WEBP")
LABEL_FORMATS = ("PNG",)
PLANE_FORMATS = ("PNG", "TIFF")
# single-channel PIL modes -> the dtype their values are kept in (16-bit PNGs open as I;16, some TIFFs as I or F)
PLANE_DTYPES = {
    "1": np.uint8,
    "L": np.uint8,
    "P": np.uint8,
    "I;16": np.uint16,
    "I;16B": np.uint16,
    "I;16L": np.uint16,
    "I;16N": np.uint16,
    "I": np.int32,
    "F": np.float32,
}
RESAMPLE = Image.Resampling.BICUBIC
BACKGROUND = (255, 255, 255)
# EXIF orientations 5..8 swap width and height.
_TRANSPOSED = {5, 6, 7, 8}


class BadImage(Exception):
    """An input file that cannot be turned into an RGB image; `reason` is the short category + detail."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


def target_size(w: int, h: int, size: int | None) -> tuple[int, int]:
    """(w, h) scaled so the shorter side is `size`; unchanged when already smaller or size is None."""
    if size is None or min(w, h) <= size:
        return w, h
    scale = size / min(w, h)
    if w <= h:
        return size, max(1, round(h * scale))
    return max(1, round(w * scale)), size


def _to_rgb(im: Image.Image) -> Image.Image:
    """Any PIL mode -> RGB, with correct handling of 16-bit and transparency."""
    if im.mode == "RGB":
        return im
    if im.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        # 16-bit grayscale (PNG/TIFF): scale 0..65535 to 0..255 (PIL's convert would clip at 255).
        a = np.asarray(im).astype(np.float64)  # (H, W)
        a = np.clip(np.rint(a / 257.0), 0, 255).astype(np.uint8)
        return Image.fromarray(np.stack([a] * 3, axis=-1))
    if im.mode == "F":
        a = np.clip(np.rint(np.asarray(im)), 0, 255).astype(np.uint8)
        return Image.fromarray(np.stack([a] * 3, axis=-1))
    if (im.mode == "P" and "transparency" in im.info) or im.mode in ("PA", "LA", "RGBA", "La", "RGBa"):
        rgba = im.convert("RGBA")
        bg = Image.new("RGBA", rgba.size, BACKGROUND + (255,))
        return Image.alpha_composite(bg, rgba).convert("RGB")
    return im.convert("RGB")  # L, 1, P, CMYK (incl. Adobe-inverted, handled by the JPEG plugin), YCbCr, LAB, ...


def open_image(data: bytes, formats: Sequence[str], max_pixels: int) -> Image.Image:
    """Identify image bytes with the plugins in `formats` only; raises BadImage before decoding when the
    header claims more than `max_pixels` pixels (or a zero size). The pixels are decoded on first use."""
    if not data:
        raise BadImage("empty file")
    try:
        im = Image.open(io.BytesIO(data), formats=list(formats))
    except Image.DecompressionBombError as e:
        raise BadImage(f"too large: {e}") from None
    except UnidentifiedImageError:
        raise BadImage(f"not an image: none of the accepted formats {', '.join(formats)}") from None
    w, h = im.size
    if w * h > max_pixels:
        raise BadImage(f"too large: {w}x{h} px (limit {max_pixels} px)")
    if w == 0 or h == 0:
        raise BadImage("corrupt: zero-size image")
    return im


# --- direct decoding into arrays -------------------------------------------------------------------

_SOF = {0xC0, 0xC1, 0xC2}  # baseline, extended and progressive Huffman JPEG: what Pillow and torchvision share
_JPEG_SEGMENTS = {*range(0xE0, 0xF0), 0xDB, 0xC4, 0xDD, 0xFE}  # APPn, DQT, DHT, DRI, COM: skipped by length
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_INFLATE_ERRORS = (zlib.error, isal_zlib.IsalError)
_PNG_MAX_SIDE = 1_000_000  # libpng's default user limit on width and height


@functools.cache
def _torchvision_io() -> ModuleType | None:
    """torchvision.io where it has the libjpeg / libpng decoders (deprecated since torchvision 0.29), else None."""
    try:
        from torchvision import io as tvio
    except ImportError:
        return None
    # torchvision 0.29 warns on every decode call that TorchCodec will take these over; the toolkit pins
    # torchvision <= 0.29.1, where they are the libjpeg-turbo / libpng decoders it measures: not a warning here
    warnings.filterwarnings("ignore", message="The image decoding and encoding capabilities of TorchVision")
    return tvio if all(hasattr(tvio, n) for n in ("decode_jpeg", "decode_png", "ImageReadMode")) else None


@functools.cache
def _jpeg_op() -> tuple[Callable[..., torch.Tensor], int] | None:
    """(op, RGB mode) where op(data, mode, apply_exif_orientation) is the operator `torchvision.io.decode_jpeg`
    runs for one CPU tensor: called directly, without that wrapper's per-call deprecation warning and device
    checks (10 us of a 300 us decode); None where torchvision lacks it."""
    tvio = _torchvision_io()
    if tvio is None:
        return None
    import torch

    if not hasattr(torch.ops.image, "decode_jpeg"):
        return None
    return torch.ops.image.decode_jpeg, tvio.ImageReadMode.RGB.value


def preload_decoders() -> bool:
    """Import torchvision's decoders now (about 2 s of CPU): a process that forks DataLoader workers calls this
    first, so that each worker inherits them instead of importing them again every epoch. False: none here."""
    return _torchvision_io() is not None


def _tensor(data: bytes) -> torch.Tensor:
    """A uint8 tensor over a writable copy of `data` (a few microseconds), as torch.frombuffer wants."""
    import torch

    return torch.frombuffer(bytearray(data), dtype=torch.uint8)


def jpeg_header(data: bytes) -> tuple[int, int, int, int] | None:
    """(width, height, bits per sample, components) from the SOF of a Huffman-coded JPEG; None when the markers
    before it are anything but the segments libjpeg skips by their length (it then finds the same SOF)."""
    if data[:3] != b"\xff\xd8\xff":
        return None
    pos, end = 2, len(data) - 4
    while pos <= end:
        if data[pos] != 0xFF:
            return None  # bytes between segments: libjpeg would skip them with a warning, Pillow decides
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
        elif marker in _SOF:
            if pos + 10 > len(data):
                return None
            bits, h, w, components = struct.unpack_from(">BHHB", data, pos + 4)
            return w, h, bits, components
        elif marker in _JPEG_SEGMENTS:
            pos += 2 + (data[pos + 2] << 8 | data[pos + 3])
        else:
            return None  # SOS before a frame, arithmetic or lossless coding, a standalone marker
    return None


def plain_jpeg_size(data: bytes, max_pixels: int) -> tuple[int, int] | None:
    """(width, height) of an 8-bit, 3-component Huffman JPEG within the direct decoders' size limit: the JPEGs
    libjpeg-turbo (here, or nvJPEG on a GPU) decodes as Pillow would; None for anything Pillow must decide.
    Grayscale and CMYK JPEGs, 12-bit and arithmetic-coded ones are left to Pillow (its conversions differ)."""
    header = jpeg_header(data)
    if header is None or header[2:] != (8, 3) or not _fast_size(header[0], header[1], max_pixels):
        return None
    return header[0], header[1]


def fast_jpeg(data: bytes, max_pixels: int) -> np.ndarray | None:
    """An 8-bit YCbCr / RGB JPEG -> (H, W, 3) uint8 through libjpeg-turbo, or None (see the module docstring
    and `plain_jpeg_size`)."""
    if plain_jpeg_size(data, max_pixels) is None:
        return None
    jpeg = _jpeg_op()
    if jpeg is None:
        return None
    decode, rgb = jpeg
    try:
        planes = decode(_tensor(data), rgb, False)  # (3, H, W), an (H, W, 3) view
    except Exception:  # RuntimeError on damaged data, or a warning made an error: Pillow decides
        return None
    return planes.permute(1, 2, 0).numpy()  # (H, W, 3), the decoder's own buffer


def fast_png(data: bytes, max_pixels: int, bits: tuple[int, ...]) -> np.ndarray | None:
    """A grayscale PNG in the shard writer's layout -> (H, W) of its stored values, uint8 or big-endian uint16
    (a view, as stored); None for anything else (see the module docstring).

    The layout: IHDR, one IDAT, IEND, `bits` 8 or 16, no interlace, and every row with the same filter: None or
    Up (what `shards.format` writes), or Sub. The image data inflates through ISA-L, bounded by the size the header
    implies, the stream complete and its checksum right; the filter is undone by prefix sums, down the columns
    (Up) or along the rows (Sub), in log2(side) vector adds. The values are
    the stored ones, as Pillow gives them; nothing is interpreted.
    """
    if data[:16] != _PNG_SIGNATURE + b"\x00\x00\x00\x0dIHDR" or data[37:41] != b"IDAT":
        return None
    if struct.unpack_from(">I", data, 29)[0] != zlib.crc32(data[12:29]):
        return None  # a damaged IHDR: Pillow reports it
    w, h, depth, colour, compression, filtering, interlace = struct.unpack_from(">IIBBBBB", data, 16)
    if depth not in bits or (colour, compression, filtering, interlace) != (0, 0, 0, 0):
        return None
    if not _fast_size(w, h, max_pixels):
        return None
    (length,) = struct.unpack_from(">I", data, 33)
    if data[45 + length : 53 + length] != b"\x00\x00\x00\x00IEND":
        return None
    sample = depth // 8
    row = 1 + w * sample  # the filter type byte, then the samples
    inflate = isal_zlib.decompressobj()
    try:
        raw = inflate.decompress(memoryview(data)[41 : 41 + length], h * row + 1)
    except _INFLATE_ERRORS:
        return None
    if len(raw) != h * row or not inflate.eof:
        return None
    rows = np.frombuffer(raw, np.uint8).reshape(h, row)
    kind = rows[0, 0]
    if kind not in (0, 1, 2) or not (rows[:, 0] == kind).all():  # other filters: Pillow undoes them
        return None
    if kind == 0:  # no filter: the bytes are the values
        values = rows[:, 1:]
        return values.view(">u2") if depth == 16 else values

    # each byte becomes the sum, modulo 256, of its column (Up) or row (Sub) so far: steps 1, 2, 4 ... between
    # two buffers (in place, numpy would copy the overlapping operand on every step)
    def along(a: np.ndarray) -> np.ndarray:
        return a if kind == 2 else a.swapaxes(0, 1)

    buffers = (np.empty((h, w, sample), np.uint8), np.empty((h, w, sample), np.uint8))
    prev, step, i = along(rows[:, 1:].reshape(h, w, sample)), 1, 0
    axis_len = prev.shape[0]
    while True:
        cur = along(buffers[i])
        cur[:step] = prev[:step]
        np.add(prev[step:], prev[:-step], out=cur[step:])
        step *= 2
        if step >= axis_len:
            break
        prev, i = cur, 1 - i
    values = buffers[i].reshape(h, w * sample)
    return values.view(">u2") if depth == 16 else values


def _fast_size(w: int, h: int, max_pixels: int) -> bool:
    """Small enough for the direct decoders: within `max_pixels` and below Pillow's own bomb warning (Pillow
    keeps deciding, and warning about, anything larger)."""
    return 0 < w * h <= min(max_pixels, Image.MAX_IMAGE_PIXELS or max_pixels)


def _checked_rgb16_png(data: bytes, max_pixels: int) -> bytes:
    """A 16-bit RGB PNG reduced to IHDR, its IDAT data and IEND, once every check libpng would fail on has
    passed here: torchvision 0.29's decode_png crashes the process on any libpng error (a bad CRC, a damaged
    deflate stream, a bad filter byte), so none may reach it. Raises BadImage naming the problem.

    Checks: chunk lengths and CRCs, IHDR first with 16-bit RGB, no interlace, both sides within libpng's limit;
    the image data inflates (bounded: never beyond the size the header implies) to at least every row, and each
    row starts with a filter type 0-4. Ancillary chunks are dropped (the stored values do not depend on them).
    """
    if not data.startswith(_PNG_SIGNATURE):
        raise BadImage("not an image: not a PNG")
    pos, chunks = len(_PNG_SIGNATURE), []
    while True:
        if pos + 12 > len(data):
            raise BadImage("truncated")
        length, tag = struct.unpack_from(">I4s", data, pos)
        body = data[pos + 8 : pos + 8 + length]
        if length > 2**31 - 1 or len(body) != length or pos + 12 + length > len(data):
            raise BadImage("truncated")
        (crc,) = struct.unpack_from(">I", data, pos + 8 + length)
        if zlib.crc32(tag + body) != crc:
            raise BadImage(f"corrupt: bad CRC in chunk {tag!r}")
        chunks.append((tag, body))
        pos += 12 + length
        if tag == b"IEND":
            break
    tags = [t for t, _ in chunks]
    if tags[0] != b"IHDR" or len(chunks[0][1]) != 13 or b"IDAT" not in tags:
        raise BadImage("corrupt: a PNG starts with IHDR and holds image data")
    w, h, depth, colour, compression, filtering, interlace = struct.unpack(">IIBBBBB", chunks[0][1])
    if (depth, colour, compression, filtering) != (16, 2, 0, 0):
        raise BadImage("corrupt: not a 16-bit RGB PNG")
    if interlace:
        raise BadImage("unsupported: an interlaced 16-bit RGB PNG (store it without interlacing)")
    if w * h > max_pixels:
        raise BadImage(f"too large: {w}x{h} px (limit {max_pixels} px)")
    if w == 0 or h == 0:
        raise BadImage("corrupt: zero-size image")
    if max(w, h) > _PNG_MAX_SIDE:
        raise BadImage(f"too large: {w}x{h} px (libpng reads at most {_PNG_MAX_SIDE} px a side)")
    idat_tags = [i for i, t in enumerate(tags) if t == b"IDAT"]
    if idat_tags != list(range(idat_tags[0], idat_tags[-1] + 1)):
        raise BadImage("corrupt: IDAT chunks are not consecutive")
    if any(t[0] & 0x20 == 0 and t not in (b"IHDR", b"PLTE", b"IDAT", b"IEND") for t in tags):
        raise BadImage("corrupt: unknown critical chunk")
    compressed = b"".join(chunks[i][1] for i in idat_tags)
    row = 1 + 6 * w
    try:
        inflate = zlib.decompressobj()
        rows = inflate.decompress(compressed, h * row + 1)  # never more than one byte past the image
    except zlib.error as e:
        raise BadImage(f"corrupt: image data does not inflate ({e})") from None
    if len(rows) < h * row:
        raise BadImage("truncated")
    if max(rows[: h * row : row]) > 4:
        raise BadImage("corrupt: bad PNG filter type")

    return _PNG_SIGNATURE + png_chunk(b"IHDR", chunks[0][1]) + png_chunk(b"IDAT", compressed) + png_chunk(b"IEND", b"")


def png_chunk(tag: bytes, body: bytes) -> bytes:
    """One PNG chunk: length, tag, body, CRC-32 of tag and body (ISA-L's crc32, zlib's value)."""
    crc = isal_zlib.crc32(body, isal_zlib.crc32(tag))
    return struct.pack(">I", len(body)) + tag + body + struct.pack(">I", crc)


@contextmanager
def _decoding() -> Iterator[None]:
    """Turn whatever PIL raises while decoding untrusted bytes into BadImage with a short reason."""
    if ImageFile.LOAD_TRUNCATED_IMAGES:
        raise RuntimeError("PIL.ImageFile.LOAD_TRUNCATED_IMAGES is set: truncated files would pass as images")
    with warnings.catch_warnings():
        # Corrupt EXIF / ICC chunks only warn; the decode itself decides whether the file is usable.
        warnings.simplefilter("ignore")
        try:
            yield
        except BadImage:
            raise
        except OSError as e:
            msg = str(e)
            if "truncated" in msg.lower() or "premature" in msg.lower():
                raise BadImage("truncated") from None
            raise BadImage(f"corrupt: {msg}") from None
        except Exception as e:  # PIL plugins raise SyntaxError, ValueError, struct.error, ... on broken data
            raise BadImage(f"corrupt: {type(e).__name__}: {e}") from None


def load_rgb(data: bytes, size: int | None = None, max_pixels: int = MAX_PIXELS) -> tuple[np.ndarray, tuple[int, int]]:
    """Image file bytes -> ((H, W, 3) uint8 RGB with shorter side `size`, original (h, w) after EXIF rotation).

    Raises BadImage for anything that is not a decodable image within `max_pixels`.
    """
    with _decoding():
        return _decode(open_image(data, SOURCE_FORMATS, max_pixels), size)


def load_plane(data: bytes, max_pixels: int = MAX_PIXELS, formats: Sequence[str] = PLANE_FORMATS) -> np.ndarray:
    """Single-channel image bytes -> (H, W) array of the stored values (uint8, uint16, int32 or float32).

    Raises BadImage for undecodable data and for images with colour channels (a label map stored as colours).
    """
    with _decoding():
        im = open_image(data, formats, max_pixels)
        dtype = PLANE_DTYPES.get(im.mode)
        if dtype is None:
            raise BadImage(f"not single-channel: mode {im.mode} (store one value per pixel: ids or depth levels)")
        im.load()
        return np.asarray(im).astype(dtype, copy=False)  # (H, W)


def load_vectors(data: bytes, max_pixels: int = MAX_PIXELS) -> np.ndarray:
    """An RGB PNG holding one vector per pixel (surface normals) -> (H, W, 3) of the stored values: uint8, or
    uint16 for a 16-bit PNG (Pillow keeps only 8 of its 16 bits, so those are decoded by libpng through
    torchvision). Raises BadImage as `load_plane` does, and for images that are not 3-channel RGB."""
    with _decoding():
        im = open_image(data, ("PNG",), max_pixels)
        if im.mode != "RGB":
            raise BadImage(f"not an RGB vector map: mode {im.mode} (store x, y, z as the R, G, B of a PNG)")
        if data[24] != 16:  # IHDR (the first chunk) bit depth
            im.load()
            return np.asarray(im)
        tvio = _torchvision_io()  # libpng, its deprecation warning silenced
        if tvio is None:
            raise BadImage("unsupported: a 16-bit RGB PNG needs torchvision's PNG decoder")
        checked = _checked_rgb16_png(data, max_pixels)
        try:
            planes = tvio.decode_png(_tensor(checked), mode=tvio.ImageReadMode.UNCHANGED)
        except RuntimeError as e:
            raise BadImage(f"corrupt: {str(e).splitlines()[0][:200]}") from None
        return planes.permute(1, 2, 0).numpy().astype(np.uint16)  # (H, W, 3)


def _decode(im: Image.Image, size: int | None) -> tuple[np.ndarray, tuple[int, int]]:
    w, h = im.size
    try:
        orientation = im.getexif().get(0x0112, 1)
    except Exception:  # unreadable EXIF block: the pixels may still be fine, keep them unrotated
        orientation = 1
    ow, oh = (h, w) if orientation in _TRANSPOSED else (w, h)  # displayed size, after EXIF rotation
    tw, th = target_size(ow, oh, size)
    if im.format == "JPEG" and (tw, th) != (ow, oh):
        # Reduced-size DCT decoding: PIL picks the largest 1/2^k scale that keeps both sides >= the request.
        im.draft("RGB", target_size(w, h, size))
    im.load()
    im = ImageOps.exif_transpose(im)
    im = _to_rgb(im)
    if im.size != (tw, th):
        im = im.resize((tw, th), RESAMPLE)
    arr = np.asarray(im, dtype=np.uint8)  # (H, W, 3)
    if arr.ndim != 3 or arr.shape[2] != 3:
        raise BadImage(f"corrupt: unexpected decoded shape {arr.shape}")
    return arr, (oh, ow)
