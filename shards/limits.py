"""Size limits on untrusted input (docs/trust-model.md): bytes per tar member and per JSON file, pixels per image.

Shards, image folders and stats files come from the web, so every read is bounded before it allocates:

- ``max_member_bytes()``  a tar member (or a source image file) larger than this is refused by its header
  size, before a byte of it is read; default 64 MiB, ``MULTIMAE_MAX_MEMBER_BYTES`` overrides it;
- ``max_pixels()``        an image whose header claims more pixels is refused before decoding; default
  PIL's decompression-bomb threshold (~89.5 MP), ``MULTIMAE_MAX_PIXELS`` overrides it (the build's
  ``--max-pixels`` applies to source images);
- ``MAX_JSON_BYTES``      a manifest or stats json larger than 256 MiB is refused unread.

The environment variables reach every process that reads shards (DataLoader workers inherit them; on a Ray
cluster set them in the job's ``runtime_env``).
"""

from __future__ import annotations

import os

from PIL import Image

from .errors import FormatError

MAX_MEMBER_BYTES = 64 * 2**20
MAX_PIXELS = Image.MAX_IMAGE_PIXELS or 89_478_485
MAX_JSON_BYTES = 256 * 2**20
MEMBER_BYTES_ENV = "MULTIMAE_MAX_MEMBER_BYTES"
PIXELS_ENV = "MULTIMAE_MAX_PIXELS"


def _from_env(name: str, default: int) -> int:
    text = os.environ.get(name, "").strip()
    if not text:
        return default
    if not text.isdigit() or int(text) <= 0:
        raise FormatError(f"environment variable {name}={text!r} must be a positive integer (unset it for {default})")
    return int(text)


def max_member_bytes() -> int:
    """Largest tar member (or source file) that is read, in bytes."""
    return _from_env(MEMBER_BYTES_ENV, MAX_MEMBER_BYTES)


def max_pixels() -> int:
    """Largest image (width x height) that is decoded from a shard."""
    return _from_env(PIXELS_ENV, MAX_PIXELS)
