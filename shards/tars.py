"""Reading untrusted tars: the one path from a shard tar's bytes to its samples (docs/trust-model.md).

`iter_samples(url)` yields ``(key, {suffix: bytes})`` per sample, in stored order, and serves the training
reader, `verify`, `info` and the labeling job alike. Every member's header is checked before a byte
of its data is read:

- the file must be a plain tar: gzip, bzip2, xz, zstd and lz4 files are refused by their magic bytes,
  whatever their name, and are never inflated;
- a member must be a regular file: links, devices and FIFOs are refused, directory entries ignored;
- sparse members (GNU or PAX sparse: a few KB on disk that expand to any size) are refused;
- a member may hold at most ``max_member_bytes`` (default 64 MiB, see `shards.limits`);
- its name must be ``<key>.<suffix>`` with a valid key (`shards.format.KEY_RE`: no directory, no dot);
  the members of a sample are adjacent, a key never comes back after another, a suffix appears once.

Content digests live in the stats json and are checked per sample by the callers
(`shards.writer.digest_problems`), so a damaged member costs one sample, not the shard.

A refused member raises `MemberError` naming the tar, the member and what to do; with ``on_problem``
it is reported there instead, skipped, and the scan goes on (how `verify` lists every problem). An
unreadable tar (bad header, data cut short) always raises `FormatError`.

On a seekable file (local disk, object stores) the tar is read with seeks, so unwanted members are
never read, and no single read may ask for more than the member limit: tarfile reads the data of a PAX
or GNU long-name header in one call, which would otherwise allocate whatever size the header claims.
"""

from __future__ import annotations

import io
import re
import tarfile
from collections.abc import Callable, Iterator
from typing import IO, Any

from . import fs, limits
from .errors import FormatError, printable, shown
from .format import KEY_RE

MAGIC = {
    b"\x1f\x8b": "gzip",
    b"BZh": "bzip2",
    b"\xfd7zXZ\x00": "xz",
    b"\x28\xb5\x2f\xfd": "zstd",
    b"\x04\x22\x4d\x18": "lz4",
}
MEMBER_RE = re.compile(rf"(?P<key>{KEY_RE.pattern})\.(?P<suffix>[A-Za-z0-9_-]+(?:\.[A-Za-z0-9_-]+)*)")
HEADER_BYTES = 2**20  # reads of header blocks and PAX / long-name data are allowed up to this, whatever the limit
_LINKS = {tarfile.SYMTYPE: "a symbolic link", tarfile.LNKTYPE: "a hard link"}
_SPECIAL = {tarfile.CHRTYPE: "a character device", tarfile.BLKTYPE: "a block device", tarfile.FIFOTYPE: "a FIFO"}
Sample = tuple[str, dict[str, bytes]]


class MemberError(FormatError):
    """A tar member refused by its header or name; `member` and `key` say which (key is None for a bad name)."""

    def __init__(self, message: str, *, member: str | None = None, key: str | None = None):
        super().__init__(message)
        self.member, self.key = member, key


def split_member(name: str) -> tuple[str, str] | None:
    """'000042.rgb.jpg' -> ('000042', 'rgb.jpg'); None when the name is not a valid key plus suffix."""
    m = MEMBER_RE.fullmatch(name)
    return (m.group("key"), m.group("suffix")) if m else None


def compression(head: bytes) -> str | None:
    """The compressed format whose magic bytes start `head`, or None for anything else."""
    return next((kind for magic, kind in MAGIC.items() if head.startswith(magic)), None)


def refuse_compressed(head: bytes, url: str) -> None:
    kind = compression(head)
    if kind is not None:
        raise FormatError(
            f"{url}: is a {kind}-compressed file, not a plain tar: shard sets hold uncompressed tars "
            f"only; decompress it (e.g. `{kind} -d`) and keep the .tar name"
        )


def header_problem(info: tarfile.TarInfo, limit: int) -> str | None:
    """Why a member must not be read, from its header alone; None when it is a regular file within `limit`."""
    if info.issparse():
        return f"is a sparse member that expands to {info.size} bytes: only plain members are read"
    if info.type in _LINKS:
        return f"is {_LINKS[info.type]} to {shown(info.linkname)}, not a regular file: only regular files are read"
    if info.type in _SPECIAL:
        return f"is {_SPECIAL[info.type]}, not a regular file: only regular files are read"
    if not info.isreg():
        return f"has tar type {shown(info.type)}, not a regular file: only regular files are read"
    if info.size > limit:
        return (
            f"is {info.size} bytes, over the {limit}-byte member limit; if the member is genuine, raise the limit "
            "with MULTIMAE_MAX_MEMBER_BYTES"
        )
    return None


class _BoundedReads:
    """A seekable file whose every read() asks for at most `limit` bytes (see the module docstring)."""

    def __init__(self, f: IO[bytes], limit: int, url: str):
        self.f, self.limit, self.url = f, limit, url

    def read(self, n: int = -1) -> bytes:
        if n is None or n < 0 or n > self.limit:
            raise FormatError(
                f"{self.url}: a tar header claims {n} bytes of data, over the {self.limit}-byte member limit"
            )
        return self.f.read(n)

    def seek(self, *args: Any) -> int:
        return self.f.seek(*args)

    def tell(self) -> int:
        return self.f.tell()


def open_tar(f: IO[bytes], url: str, limit: int) -> tarfile.TarFile:
    """A TarFile over an open file: compressed data refused, reads bounded by `limit` (seekable files)."""
    if f.seekable():
        refuse_compressed(f.read(8), url)
        f.seek(0)
        return tarfile.open(fileobj=_BoundedReads(f, max(limit, HEADER_BYTES), url), mode="r:")
    return tarfile.open(fileobj=f, mode="r|")  # a stream: tarfile's own check refuses compressed data


def next_member(tar: tarfile.TarFile, url: str) -> tarfile.TarInfo | None:
    """The next member's header (None at the end); FormatError naming the tar when it cannot be read."""
    try:
        info = tar.next()
    except FormatError:
        raise
    except Exception as e:  # TarError, EOFError, OSError, ValueError on hostile headers, MemoryError
        raise FormatError(f"{url}: cannot read tar ({type(e).__name__}: {printable(str(e))})") from None
    tar.members = []  # tarfile keeps every TarInfo it has read; a stream keeps none
    return info


def _read(tar: tarfile.TarFile, info: tarfile.TarInfo, url: str) -> bytes:
    try:
        data = tar.extractfile(info).read()
    except Exception as e:
        raise FormatError(f"{url}: cannot read member {shown(info.name)} ({type(e).__name__}: {e})") from None
    if len(data) != info.size:
        raise FormatError(f"{url}: member {shown(info.name)} ends after {len(data)} of {info.size} bytes")
    return data


def iter_samples(
    url: str,
    *,
    max_member_bytes: int | None = None,
    want: Callable[[str], bool] | None = None,
    on_problem: Callable[[MemberError], None] | None = None,
    data: bytes | None = None,
) -> Iterator[Sample]:
    """(key, {suffix: bytes}) per sample of the tar at `url`, in stored order, every member checked.

    `want(suffix)` picks the members whose bytes are read (the others are skipped unread; a sample
    whose members are all skipped still yields, with an empty dict). Problems with one member raise
    `MemberError`, or go to `on_problem` and the member is skipped; an unreadable tar raises `FormatError`.
    `data`: the tar's bytes when they were fetched already (the reader's readahead); `url` then only names it.
    """
    limit = limits.max_member_bytes() if max_member_bytes is None else max_member_bytes

    def refuse(name: str, key: str | None, what: str) -> None:
        err = MemberError(f"{url}: member {shown(name)}: {what}", member=name, key=key)
        if on_problem is None:
            raise err
        on_problem(err)

    key, members, done = None, {}, set()
    with fs.open_file(url, "rb") if data is None else io.BytesIO(data) as f:
        try:
            tar = open_tar(f, url, limit)
        except FormatError:
            raise
        except Exception as e:
            raise FormatError(f"{url}: cannot read tar ({type(e).__name__}: {printable(str(e))})") from None
        with tar:
            while (info := next_member(tar, url)) is not None:
                if info.isdir():
                    continue
                split = split_member(info.name)
                problem = header_problem(info, limit)
                if problem is None and split is None:
                    problem = "is not named <key>.<suffix> with a valid key (ASCII letters, digits, '_', '-')"
                if problem is not None:
                    refuse(info.name, split[0] if split else None, problem)
                    continue
                k, suffix = split
                if k != key and k in done:
                    refuse(info.name, k, "its key came earlier in the tar: the members of a sample must be adjacent")
                    continue
                if k != key:
                    if key is not None:
                        yield key, members
                        done.add(key)
                    key, members = k, {}
                if suffix in members:
                    refuse(info.name, k, "appears twice in its sample")
                elif want is None or want(suffix):
                    members[suffix] = _read(tar, info, url)
    if key is not None:
        yield key, members
