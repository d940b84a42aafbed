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
There, the plain ustar headers of regular files (what the shard writer produces) are parsed here with byte
slicing, at a fifth of tarfile's cost; from the first other header (the end of the archive, PAX or GNU
extensions, a bad checksum or field) tarfile reads the rest, as it would have from the start.
"""

from __future__ import annotations

import io
import re
import tarfile
from collections.abc import Callable, Iterator
from functools import partial
from typing import IO, Any
from zlib import adler32

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
BLOCK = tarfile.BLOCKSIZE
# the numeric fields of a header: mode, uid, gid, size, mtime, checksum (bytes 100-156), devmajor, devminor
# (329-345); tarfile reads each up to its first NUL, stripped, as octal. Held to octal digits, spaces and NULs
# with no space between two digits, every field reads so.
_OCTAL_FIELDS = b" 01234567\0"
_SPACED = re.compile(rb"[0-7] +[0-7]")
_PLAIN = (tarfile.REGTYPE, tarfile.AREGTYPE)
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
    return m.group("key", "suffix") if m else None


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
    if info.type in _PLAIN and info.sparse is None and info.size <= limit:
        return None  # what every member of a shard is: the checks below, all passed, in one test
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


def open_tar(f: IO[bytes], url: str, limit: int, at: int = 0) -> tarfile.TarFile:
    """A TarFile over an open file: compressed data refused, reads bounded by `limit` (seekable files); `at`:
    the offset of the header it starts from (seekable files, after the headers `iter_members` parsed)."""
    if f.seekable():
        if at == 0:
            refuse_compressed(f.read(8), url)
        f.seek(at)
        return tarfile.open(fileobj=_BoundedReads(f, max(limit, HEADER_BYTES), url), mode="r:")
    return tarfile.open(fileobj=f, mode="r|")  # a stream: tarfile's own check refuses compressed data


def _open_checked(f: IO[bytes], url: str, limit: int, at: int = 0) -> tarfile.TarFile:
    """open_tar, with whatever tarfile raises on a hostile header as a FormatError naming the tar."""
    try:
        return open_tar(f, url, limit, at)
    except FormatError:
        raise
    except Exception as e:
        raise FormatError(f"{url}: cannot read tar ({type(e).__name__}: {printable(str(e))})") from None


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
    return _whole(data, info, url)


def _read_at(f: IO[bytes], info: tarfile.TarInfo, url: str) -> bytes:
    try:
        f.seek(info.offset_data)
        data = f.read(info.size)
    except Exception as e:
        raise FormatError(f"{url}: cannot read member {shown(info.name)} ({type(e).__name__}: {e})") from None
    return _whole(data, info, url)


def _whole(data: bytes, info: tarfile.TarInfo, url: str) -> bytes:
    if len(data) != info.size:
        raise FormatError(f"{url}: member {shown(info.name)} ends after {len(data)} of {info.size} bytes")
    return data


def _octal(block: bytes, start: int, end: int) -> int:
    """A numeric field already held to `_OCTAL_FIELDS`, as tarfile reads it."""
    return int(block[start:end].partition(b"\0")[0].strip() or b"0", 8)


def _byte_sum(block: bytes) -> int:
    """sum(block) less its checksum field (bytes 148-156), at a fifth of sum's cost: adler32 started from 0
    holds the sum of the bytes in its low 16 bits, exactly for pieces of at most 256 bytes (below 65521)."""
    head, middle, tail = adler32(block[:148], 0), adler32(block[156:356], 0), adler32(block[356:], 0)
    return (head & 0xFFFF) + (middle & 0xFFFF) + (tail & 0xFFFF)


def plain_header(block: bytes, offset: int) -> tarfile.TarInfo | None:
    """The TarInfo tarfile would make of the 512-byte header `block` at `offset`, when that header is a regular
    file in plain ustar / GNU form: type '0', numeric fields of octal digits, spaces and NULs (`_OCTAL_FIELDS`),
    no name prefix, valid (unsigned) checksum. None for any other header, which tarfile then reads."""
    if len(block) != BLOCK or block[156] not in b"0\0" or block[345]:
        return None  # short (the end of the file), another type, or a ustar name prefix
    numbers = block[100:156] + block[329:345]
    if numbers.translate(None, _OCTAL_FIELDS) or _SPACED.search(numbers):
        return None  # base-256, malformed, or a form tarfile reads as well: tarfile decides
    if _octal(block, 148, 156) != _byte_sum(block) + 8 * 0x20:  # the checksum field counts as 8 spaces
        return None  # an all-zero block (the end of the archive), a signed checksum, damage
    info = tarfile.TarInfo(block[:100].partition(b"\0")[0].decode(tarfile.ENCODING, "surrogateescape"))
    if info.name.endswith("/"):
        return None  # a directory in the old V7 form
    info.size = _octal(block, 124, 136)
    info.offset, info.offset_data = offset, offset + BLOCK
    return info


def iter_members(f: IO[bytes], url: str, limit: int) -> Iterator[tuple[tarfile.TarInfo, Callable[[], bytes]]]:
    """(header, read its data) for every member of the tar in `f`, in order; call read before taking the next
    member, or not at all (the data is then skipped unread). read() asks for the header's size: check the
    header (`header_problem`) first. FormatError when the tar cannot be read."""
    if not f.seekable():
        with _open_checked(f, url, limit) as tar:
            while (info := next_member(tar, url)) is not None:
                yield info, partial(_read, tar, info, url)
        return
    refuse_compressed(f.read(8), url)
    offset = 0
    while True:
        f.seek(offset)
        info = plain_header(f.read(BLOCK), offset)
        if info is None:
            break
        yield info, partial(_read_at, f, info, url)
        offset = info.offset_data + -(-info.size // BLOCK) * BLOCK
    if offset:  # tarfile's own check when it moves to the next header
        f.seek(offset - 1)
        if not f.read(1):
            raise FormatError(f"{url}: cannot read tar (ReadError: unexpected end of data)")
    with _open_checked(f, url, limit, at=offset) as tar:  # a TarFile starts where its file stands
        while (info := next_member(tar, url)) is not None:
            yield info, partial(_read, tar, info, url)


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
        for info, read in iter_members(f, url, limit):
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
                members[suffix] = read()
    if key is not None:
        yield key, members
