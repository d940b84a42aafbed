"""JPEG members decoded in batches on the consumer's GPU (nvJPEG through `torchvision.io.decode_jpeg`).

The reader checks a member as for any decode (its digest, then the JPEG markers up to the frame header: 8-bit,
3 components, within the pixel limit) and leaves it encoded as an `EncodedJpeg`; the consumer (the trainer's
batch step, a labeling actor) decodes a whole batch of them in one call on its device. A batch the device
cannot decode is decoded image by image on the CPU (`shards.format.decode_rgb`), so a damaged member fails
with the reader's own error. PNG and WebP members are always decoded on the CPU.
"""

from __future__ import annotations

import functools
import io
from typing import NamedTuple

import torch

from . import images
from .errors import FormatError
from .limits import max_pixels


class EncodedJpeg(NamedTuple):
    """A JPEG member whose header passed the checks, left encoded for `decode_jpegs`."""

    data: bytes
    height: int
    width: int

    @property
    def shape(self) -> tuple[int, int, int]:
        """(H, W, 3): the shape the decoded array will have (the reader's alignment checks compare it)."""
        return self.height, self.width, 3


def encoded_jpeg(data: bytes) -> EncodedJpeg | None:
    """`data` as an EncodedJpeg when a device decoder takes it: the JPEGs the CPU decodes with libjpeg-turbo
    (`shards.images.plain_jpeg_size`); else None (the CPU decodes it, with its own checks and errors)."""
    size = images.plain_jpeg_size(data, max_pixels())
    return None if size is None else EncodedJpeg(data, size[1], size[0])


@functools.cache
def nvjpeg_works(device: str) -> bool:
    """torchvision's batched JPEG decoder runs on `device` (a CUDA build with nvJPEG)."""
    from PIL import Image

    tvio = images._torchvision_io()  # the decoders, their deprecation warning silenced
    if tvio is None:
        return False
    buf = io.BytesIO()
    Image.new("RGB", (16, 16), (90, 120, 150)).save(buf, "JPEG")
    try:
        tvio.decode_jpeg([images._tensor(buf.getvalue())], device=device)
    except (RuntimeError, ValueError, TypeError):
        return False
    return True


def decode_jpegs(jpegs: list[EncodedJpeg], device: str | torch.device) -> list[torch.Tensor | FormatError]:
    """(3, H, W) uint8 tensors on `device`, in order, from one batched `decode_jpeg` call; when that call fails,
    each JPEG is decoded on the CPU and moved there, and one that does not decode gives its FormatError in
    its place. On `device="cpu"` the batched call is libjpeg-turbo's, the reader's own decoder."""
    from .format import decode_rgb

    if not jpegs:
        return []
    tvio = images._torchvision_io()  # the decoders, their deprecation warning silenced
    if tvio is not None:
        try:
            datas = [images._tensor(j.data) for j in jpegs]
            return list(tvio.decode_jpeg(datas, mode=tvio.ImageReadMode.RGB, device=device))
        except RuntimeError:
            pass
    out: list[torch.Tensor | FormatError] = []
    for j in jpegs:
        try:
            out.append(torch.from_numpy(decode_rgb(j.data).copy()).permute(2, 0, 1).to(device))
        except Exception as e:  # FormatError, or Pillow's errors on a damaged image, as the reader reports them
            out.append(e if isinstance(e, FormatError) else FormatError(f"does not decode ({type(e).__name__}: {e})"))
    return out
