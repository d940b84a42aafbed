"""Storage layer: every shard, stats and manifest read or write goes through here.

Locations are local paths or fsspec URLs (``s3://bucket/data``, ``gs://...``, ``memory://...``).
Atomic commit: on a local disk a file is written under a temporary name and renamed; on an object
store a single ``put`` is already atomic, so the object is written in one go.
"""

from __future__ import annotations

import errno
import json
import os
import posixpath
import stat
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import IO, Any

import fsspec
from fsspec.core import url_to_fs

from .errors import FormatError


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


_KINDS = {stat.S_IFIFO: "a FIFO", stat.S_IFCHR: "a character device", stat.S_IFBLK: "a block device"}
_KINDS.update({stat.S_IFSOCK: "a socket", stat.S_IFDIR: "a directory"})


class NotRegularFile(FormatError):
    """A path to read is a FIFO, device, socket or directory (perhaps behind a symlink): it is never opened."""

    def __init__(self, message: str, *, kind: str = "not a regular file"):
        super().__init__(message)
        self.kind = kind


def _open_regular(path: str) -> IO[bytes]:
    """Open a local file for reading only when it is (or links to) a regular file.

    A FIFO would block the open forever and a device (/dev/zero) never ends, so the type is checked
    before opening, and again on the open descriptor (O_NONBLOCK: a FIFO swapped in meanwhile cannot block).
    """

    def check(mode: int) -> None:
        if not stat.S_ISREG(mode):
            kind = _KINDS.get(stat.S_IFMT(mode), "not a regular file")
            raise NotRegularFile(f"{path} is {kind}, not a regular file: only regular files are read", kind=kind)

    check(os.stat(path).st_mode)
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    try:
        check(os.fstat(fd).st_mode)
    except BaseException:
        os.close(fd)
        raise
    return os.fdopen(fd, "rb")


def open_file(url: str, mode: str = "rb") -> Any:
    """A context manager yielding a file object (local file or fsspec stream); local reads open regular files only."""
    if is_local(url):
        return _open_regular(_local(url)) if mode == "rb" else open(_local(url), mode)
    return fsspec.open(url, mode)


def read_bytes(url: str, limit: int | None = None) -> bytes:
    """A whole file; with `limit`, a file larger than `limit` bytes raises FormatError before it is read."""
    with open_file(url, "rb") as f:
        if limit is None:
            return f.read()
        size = os.fstat(f.fileno()).st_size if is_local(url) else getattr(f, "size", None)
        if size is not None and size > limit:
            raise FormatError(f"{url} is {size} bytes, over the {limit}-byte limit")
        # ask for the size it says it has (a buffer of `limit` bytes per small file is slow), bounded if it grows
        data = f.read(limit + 1 if size is None else size + 1)
        if len(data) > (size or 0):
            data += f.read(limit + 1 - len(data))
    if len(data) > limit:
        raise FormatError(f"{url} is over the {limit}-byte limit")
    return data


def read_json(url: str) -> Any:
    return json.loads(read_bytes(url))


@contextmanager
def naming(url: str) -> Iterator[None]:
    """Give an OSError raised inside the block the path being written when it names none.

    A failed write() (disk full, quota, I/O error) says only "[Errno 28] No space left on device"; the
    message that reaches the user must say where.
    """
    try:
        yield
    except OSError as e:
        if e.filename is not None or e.errno is None:
            raise
        hint = "; free space there or write elsewhere" if e.errno == errno.ENOSPC else ""
        raise OSError(e.errno, f"{e.strerror} while writing{hint}", url) from None


@contextmanager
def atomic_writer(url: str) -> Iterator[IO[bytes]]:
    """Yield a binary file; the data appears at `url` only when the block exits without error."""
    if not is_local(url):
        with naming(url), fsspec.open(url, "wb") as f:
            yield f
        return
    path = _local(url)
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        with naming(url):
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
