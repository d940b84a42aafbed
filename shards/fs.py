"""Storage layer: every shard, stats and manifest read or write goes through here (DESIGN.md section 7).

Locations are local paths or fsspec URLs (``s3://bucket/data``, ``gs://...``, ``memory://...``).
Atomic commit: on a local disk a file is written under a temporary name and renamed; on an object
store a single ``put`` is already atomic, so the object is written in one go.
"""

from __future__ import annotations

import json
import os
import posixpath
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import IO, Any

import fsspec
from fsspec.core import url_to_fs


def is_local(url: str) -> bool:
    return "://" not in url or url.startswith("file://")


def _local(url: str) -> str:
    return url[len("file://") :] if url.startswith("file://") else url


def join(*parts: str) -> str:
    """Join path parts with '/' (works for local paths and URLs)."""
    if is_local(parts[0]):
        return os.path.join(*parts)
    return posixpath.join(*parts)


def exists(url: str) -> bool:
    if is_local(url):
        return os.path.exists(_local(url))
    fs, path = url_to_fs(url)
    return fs.exists(path)


def listdir(url: str) -> list[str]:
    """Sorted basenames in a folder; an empty list when the folder does not exist."""
    if is_local(url):
        path = _local(url)
        return sorted(os.listdir(path)) if os.path.isdir(path) else []
    fs, path = url_to_fs(url)
    if not fs.exists(path):
        return []
    return sorted(posixpath.basename(p.rstrip("/")) for p in fs.ls(path, detail=False))


def isdir(url: str) -> bool:
    if is_local(url):
        return os.path.isdir(_local(url))
    fs, path = url_to_fs(url)
    return fs.isdir(path)


def find(url: str) -> list[str]:
    """All files below a folder, recursively, as sorted full paths/URLs."""
    if is_local(url):
        root = _local(url)
        return sorted(os.path.join(d, f) for d, _, files in os.walk(root) for f in files)
    fs, path = url_to_fs(url)
    protocol = url.split("://", 1)[0]
    return sorted(f"{protocol}://{p}" for p in fs.find(path))


def makedirs(url: str) -> None:
    if is_local(url):
        os.makedirs(_local(url), exist_ok=True)
    else:
        fs, path = url_to_fs(url)
        fs.makedirs(path, exist_ok=True)


def remove(url: str) -> None:
    """Delete a file if it exists."""
    if is_local(url):
        try:
            os.remove(_local(url))
        except FileNotFoundError:
            pass
        return
    fs, path = url_to_fs(url)
    if fs.exists(path):
        fs.rm(path)


def size(url: str) -> int:
    if is_local(url):
        return os.path.getsize(_local(url))
    fs, path = url_to_fs(url)
    return int(fs.size(path))


def open_file(url: str, mode: str = "rb") -> Any:
    """A context manager yielding a file object (local file or fsspec stream)."""
    if is_local(url):
        return open(_local(url), mode)
    return fsspec.open(url, mode)


def read_bytes(url: str) -> bytes:
    with open_file(url, "rb") as f:
        return f.read()


def read_json(url: str) -> Any:
    return json.loads(read_bytes(url))


@contextmanager
def atomic_writer(url: str) -> Iterator[IO[bytes]]:
    """Yield a binary file; the data appears at `url` only when the block exits without error."""
    if not is_local(url):
        with fsspec.open(url, "wb") as f:
            yield f
        return
    path = _local(url)
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        with open(tmp, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def write_atomic(url: str, data: bytes) -> None:
    with atomic_writer(url) as f:
        f.write(data)


def dumps_json(obj: Any) -> bytes:
    """Stable JSON bytes: sorted keys, one-space indent, trailing newline."""
    return (json.dumps(obj, sort_keys=True, indent=1) + "\n").encode()


def write_json_atomic(url: str, obj: Any) -> None:
    write_atomic(url, dumps_json(obj))


def remove_stale_temporaries(folder: str) -> int:
    """Delete leftovers of killed writers (``*.tmp-xxxxxxxx``) in a local folder; returns how many."""
    if not is_local(folder):
        return 0
    n = 0
    for name in listdir(folder):
        if ".tmp-" in name:
            remove(join(folder, name))
            n += 1
    return n
