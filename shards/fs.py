"""Storage layer: every shard, stats, manifest and run-folder read or write goes through here.

Locations are local paths or fsspec URLs (``s3://bucket/data``, ``gs://...``, ``memory://...``; see
docs/object-storage.md). A remote filesystem gets its credentials and endpoint from the backend's standard
environment (``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``, ... for S3; ``GOOGLE_APPLICATION_CREDENTIALS`` for
GCS) plus the process-wide `storage options` set once per command (`set_storage_options`), which are passed
as keyword arguments to the fsspec filesystem of every remote location. Listings are never cached: other
processes (pool workers, Ray actors on other nodes) write to the same store while this one reads it.

Atomic commit: on a local disk a file is written under a temporary name and renamed; on an object store
there is no rename, so an object is uploaded whole (one PUT, or one completed multipart upload) from data
or a local temporary file, and appears only once complete.
"""

from __future__ import annotations

import errno
import json
import os
import posixpath
import stat
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import IO, Any

from fsspec import AbstractFileSystem
from fsspec.core import url_to_fs

from .errors import FormatError

# the object stores, and the package extra that brings each one's fsspec backend (pyproject.toml)
EXTRAS = {"s3": "s3", "s3a": "s3", "gs": "gcs", "gcs": "gcs"}
# every remote filesystem sees what other processes wrote a moment ago (no stale directory listings)
DEFAULT_OPTIONS: dict[str, Any] = {"use_listings_cache": False}
_options: dict[str, Any] = {}


class MissingBackend(FormatError):
    """A location whose fsspec backend is not installed; names the package extra that brings it."""


def is_local(url: str) -> bool:
    return "://" not in url or url.startswith("file://")


def set_storage_options(options: dict[str, Any] | None) -> None:
    """Keyword arguments for the fsspec filesystem of every remote location in this process (None: none)."""
    global _options
    if options is not None and not isinstance(options, dict):
        raise FormatError(f"storage options must be a mapping of keyword arguments, got {type(options).__name__}")
    _options = dict(options or {})


def storage_options() -> dict[str, Any]:
    """The storage options set in this process (to hand to another process: a Ray actor, a worker)."""
    return dict(_options)


def parse_storage_options(text: str | None, where: str = "--storage-options") -> dict[str, Any]:
    """A JSON object of storage options from the command line; FormatError naming `where` otherwise."""
    if not text:
        return {}
    try:
        value = json.loads(text)
    except ValueError as e:
        raise FormatError(f"{where}: not valid JSON ({e}): give an object, e.g. '{{\"anon\": true}}'") from None
    if not isinstance(value, dict):
        raise FormatError(f"{where}: expected a JSON object of keyword arguments, got {type(value).__name__}")
    return value


def filesystem(url: str) -> tuple[AbstractFileSystem, str]:
    """(fsspec filesystem, path inside it) of a remote URL, with the storage options of this process.

    A protocol whose backend is not installed raises `MissingBackend` naming the extra to install.
    """
    try:
        return url_to_fs(url, **{**DEFAULT_OPTIONS, **_options})
    except ImportError as e:
        protocol = url.split("://", 1)[0]
        extra = EXTRAS.get(protocol)
        if extra is None:
            raise MissingBackend(f"{url}: the fsspec backend of {protocol}:// is not installed ({e})") from None
        raise MissingBackend(f"{url} needs the {extra} extra: pip install 'multimae-toolkit[{extra}]'") from None
    except ValueError as e:
        if "Protocol not known" not in str(e):
            raise
        raise MissingBackend(f"{url}: unknown storage protocol ({e})") from None


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
    fs, path = filesystem(url)
    return fs.exists(path)


def listdir(url: str) -> list[str]:
    """Sorted basenames in a folder; an empty list when the folder does not exist."""
    if is_local(url):
        path = _local(url)
        return sorted(os.listdir(path)) if os.path.isdir(path) else []
    fs, path = filesystem(url)
    try:
        names = fs.ls(path, detail=False)  # one request on an object store (no existence check first)
    except FileNotFoundError:
        return []
    return sorted(posixpath.basename(p.rstrip("/")) for p in names)


def isdir(url: str) -> bool:
    if is_local(url):
        return os.path.isdir(_local(url))
    fs, path = filesystem(url)
    return fs.isdir(path)


def find(url: str) -> list[str]:
    """All files below a folder, recursively, as sorted full paths/URLs."""
    if is_local(url):
        root = _local(url)
        return sorted(os.path.join(d, f) for d, _, files in os.walk(root) for f in files)
    fs, path = filesystem(url)
    protocol = url.split("://", 1)[0]
    return sorted(f"{protocol}://{p}" for p in fs.find(path))


def makedirs(url: str) -> None:
    """Create a folder and its parents; nothing on an object store, which has no folders (saves a request)."""
    if is_local(url):
        os.makedirs(_local(url), exist_ok=True)
    elif url.split("://", 1)[0] not in EXTRAS:
        fs, path = filesystem(url)
        fs.makedirs(path, exist_ok=True)


def remove(url: str) -> None:
    """Delete a file if it exists."""
    if is_local(url):
        try:
            os.remove(_local(url))
        except FileNotFoundError:
            pass
        return
    fs, path = filesystem(url)
    if fs.exists(path):
        fs.rm(path)


def size(url: str) -> int:
    if is_local(url):
        return os.path.getsize(_local(url))
    fs, path = filesystem(url)
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
    fs, path = filesystem(url)
    return fs.open(path, mode)


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
    """Yield a binary file; the data appears at `url` only when the block exits without error.

    For a remote `url` the data goes to a local temporary file first, then is uploaded as one object.
    """
    if not is_local(url):
        fd, tmp = tempfile.mkstemp(prefix="multimae-upload-")
        try:
            with naming(url):
                with os.fdopen(fd, "wb") as f:
                    yield f
                upload(tmp, url)
        finally:
            os.remove(tmp)
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
    """`data` at `url`, all or nothing (remote: one PUT)."""
    if is_local(url):
        with atomic_writer(url) as f:
            f.write(data)
        return
    fs, path = filesystem(url)
    with naming(url):
        fs.pipe_file(path, data)


def upload(local_path: str, url: str) -> None:
    """Copy a local file to a remote `url` as one object (one PUT, or one multipart upload completed at the end)."""
    fs, path = filesystem(url)
    with naming(url):
        fs.put_file(local_path, path)


def create_exclusive(url: str, data: bytes) -> bool:
    """Write `data` at a remote `url` only if nothing is there; False when something is.

    Atomic where the store has a conditional create (S3 `If-None-Match: *`, GCS `ifGenerationMatch=0`, both
    through fsspec's `mode="create"`); elsewhere an existence check followed by the write, which two writers
    can pass at the same moment.
    """
    fs, path = filesystem(url)
    try:
        with naming(url):
            fs.pipe_file(path, data, mode="create")
    except FileExistsError:
        return False
    return True


def cat_many(urls: list[str], ends: list[int] | None = None) -> list[bytes]:
    """The contents of several files of one store (with `ends`, at most their first ends[i] bytes), fetched
    concurrently where the store is asynchronous (S3, GCS: one ranged GET each, all in flight at once)."""
    if not urls:
        return []
    ends = ends if ends is not None else [None] * len(urls)
    if is_local(urls[0]):
        out = []
        for url, end in zip(urls, ends):
            with open_file(url, "rb") as f:
                out.append(f.read() if end is None else f.read(end))
        return out
    fs, _ = filesystem(urls[0])
    paths = [filesystem(url)[1] for url in urls]
    got = fs.cat_ranges(paths, [0] * len(paths), ends, on_error="raise")
    for item in got:
        if isinstance(item, BaseException):
            raise item
    return got


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
