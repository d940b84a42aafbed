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
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from .limits import MAX_PIXELS

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
        import torch
        from torchvision.io import ImageReadMode, decode_png

        try:
            planes = decode_png(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.UNCHANGED)
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
