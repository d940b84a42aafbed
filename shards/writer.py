"""Writing one shard of several aligned modalities atomically, and reading its stats back.

The commit protocol (docs/object-storage.md): each modality's tar is written to a temporary file and, on
`commit()`, renamed into place (local disk) or uploaded as one object (object stores: one PUT, or one
multipart upload that appears only when completed); then the per-shard stats json of every modality is
written, after all the tars. The stats json is the commit marker: "stats json exists" means "shard
complete", and a tar without its stats json is invisible to readers, `verify` and resume (which
overwrites it). Tars are deterministic: members sorted within a sample, mtime 0, fixed owner.

The stats json of a shard: ``count``, ``bytes``, ``keys_digest`` (sha256 of the keys in order),
``member_blake3`` (``{"<key>.<suffix>": BLAKE3 hex}`` of every member's bytes, so a flipped byte or an
edited ``depth_range`` is detected), ``skipped`` (``[{"ref", "reason"}]``), ``duration_s``, ``producer``.
BLAKE3 is the digest: cryptographic like SHA-256, and 7 us for a 32 KB member where hashlib's SHA-256
takes 17. Stats written by earlier versions carry ``member_sha256`` (SHA-256 hex) instead, and are checked
with SHA-256; stats written before either existed still read, their digest check unavailable.
"""

from __future__ import annotations

import hashlib
import os
import re
import tempfile
import time
from collections.abc import Callable
from typing import Any, NamedTuple

from blake3 import blake3

from . import fs
from .errors import shown
from .format import FormatError, check_key, check_shard_name, modality_kind, read_json_file

_UMASK = os.umask(0)
os.umask(_UMASK)
DIGESTS = "member_blake3"  # the stats field the writer records the per-member content digests in
# every stats field of per-member digests that is read, and its hash: hex digest of bytes
HASHES: dict[str, tuple[str, Callable[[bytes], str]]] = {
    "member_blake3": ("blake3", lambda data: blake3(data).hexdigest()),
    "member_sha256": ("sha256", lambda data: hashlib.sha256(data).hexdigest()),  # stats of earlier versions
}
_HEX64 = re.compile(r"[0-9a-f]{64}")


class MemberDigests(NamedTuple):
    """The per-member digests of one stats json: the field they came from, and {key: {suffix: hex}}."""

    field: str
    by_key: dict[str, dict[str, str]]


def _file(root: str, modality: str, name: str, ext: str) -> str:
    """DATA/<modality>/<name>.<ext>, with both names checked first: no name from a manifest leaves DATA."""
    modality_kind(modality)
    check_shard_name(name)
    return fs.join(root, modality, f"{name}.{ext}")


def stats_path(root: str, modality: str, name: str) -> str:
    return _file(root, modality, name, "json")


def tar_path(root: str, modality: str, name: str) -> str:
    return _file(root, modality, name, "tar")


def shard_is_complete(root: str, modality: str, name: str) -> bool:
    return fs.exists(stats_path(root, modality, name)) and fs.exists(tar_path(root, modality, name))


def committed_shards(root: str, modality: str) -> set[str]:
    """Names of the shards of one modality whose tar and stats json both exist, from one folder listing
    (an object store answers one request instead of two per shard)."""
    files = set(fs.listdir(fs.join(root, modality)))
    return {f[: -len(".json")] for f in files if f.endswith(".json") and f"{f[: -len('.json')]}.tar" in files}


def keys_digest(keys: list[str]) -> str:
    return hashlib.sha256("\n".join(keys).encode()).hexdigest()


def member_digest(data: bytes, field: str = DIGESTS) -> str:
    """The content digest of one tar member, as stored under `field` (`HASHES`) in the stats json."""
    return HASHES[field][1](data)


def digest_field(stats: dict[str, Any]) -> str | None:
    """The field of `HASHES` a stats json records its member digests in; None for stats written without
    (a field that is null counts as absent)."""
    return next((field for field in HASHES if stats.get(field) is not None), None)


def digests_by_key(stats: dict[str, Any]) -> MemberDigests | None:
    """The stats' member digests, grouped by key; None for stats written without digests."""
    field = digest_field(stats)
    if field is None:
        return None
    out: dict[str, dict[str, str]] = {}
    for member, digest in stats[field].items():
        key, _, suffix = member.partition(".")
        out.setdefault(key, {})[suffix] = digest
    return MemberDigests(field, out)


def digest_problems(key: str, members: dict[str, bytes], digests: MemberDigests) -> list[str]:
    """What differs between one sample's members and the digests its stats json records for it ([] = intact)."""
    field, expected = digests.field, digests.by_key.get(key, {})
    problems = []
    for suffix, data in members.items():
        digest = expected.get(suffix)
        if digest is None:
            problems.append(f"member {key}.{suffix} is not in the stats json's {field}: it was added after writing")
        elif member_digest(data, field) != digest:
            problems.append(
                f"member {key}.{suffix} differs from its {HASHES[field][0]} in the stats json: its bytes are damaged"
            )
    for suffix in sorted(set(expected) - set(members)):
        problems.append(f"member {key}.{suffix} is in the stats json's {field} but missing from the tar")
    return problems


def skipped_refs(stats: dict) -> set[str]:
    """Refs a shard's stats record as skipped; for derived modalities (labeling) these are sample keys."""
    return {str(s.get("ref", s.get("key", ""))) for s in stats.get("skipped", [])}


def read_stats(root: str, modality: str, name: str) -> dict[str, Any]:
    """A shard's stats json, checked: FormatError naming the file and the offending value otherwise."""
    path = stats_path(root, modality, name)
    return check_stats(read_json_file(path), path, modality, name)


def check_stats(stats: Any, path: str, modality: str, name: str) -> dict[str, Any]:
    """The fields readers rely on have the right types; member names in the digests are valid keys."""

    def bad(what: str) -> FormatError:
        return FormatError(f"{path}: {what}")

    if not isinstance(stats, dict):
        raise bad(f"expected a JSON object, got {type(stats).__name__}")
    for field, want in (("shard", name), ("modality", modality)):
        if field in stats and stats[field] != want:
            raise bad(f"{field} is {shown(stats[field])}, not {want!r}: the file belongs to another shard")
    count = stats.get("count")
    if type(count) is not int or count < 0:
        raise bad(f"count {shown(count)} is not a non-negative integer")
    if "keys_digest" in stats and not (
        isinstance(stats["keys_digest"], str) and _HEX64.fullmatch(stats["keys_digest"])
    ):
        raise bad(f"keys_digest {shown(stats['keys_digest'])} is not a sha256 hex digest")
    skipped = stats.setdefault("skipped", [])
    if not isinstance(skipped, list) or not all(
        isinstance(s, dict) and isinstance(s.get("ref"), str) and isinstance(s.get("reason"), str) for s in skipped
    ):
        raise bad(f"skipped must be a list of {{'ref': str, 'reason': str}}, got {shown(skipped)}")
    fields = [field for field in HASHES if stats.get(field) is not None]
    if len(fields) > 1:
        raise bad(f"has both {' and '.join(fields)}: a stats json records its member digests in one of them")
    for field in fields:
        digests, name = stats[field], HASHES[field][0]
        if not isinstance(digests, dict):
            raise bad(f"{field} must be an object, got {shown(digests)}")
        for member, digest in digests.items():
            key, _, suffix = member.partition(".")
            try:
                check_key(key)
            except FormatError as e:
                raise bad(f"{field}: member {shown(member)}: {e}") from None
            if not suffix or not (isinstance(digest, str) and _HEX64.fullmatch(digest)):
                raise bad(f"{field}: member {shown(member)} has digest {shown(digest)}, not a {name} hex digest")
    return stats


class ShardWriter:
    """Writes shard `name` of several modalities under `root`; nothing is visible until `commit()`."""

    def __init__(self, root: str, name: str, modalities: list[str], producer: dict | None = None):
        for m in modalities:
            modality_kind(m)
        self.root, self.name, self.modalities = root, name, list(modalities)
        self.producer = producer or {}
        self.keys: list[str] = []
        self.skipped: list[dict] = []
        self.digests: dict[str, dict[str, str]] = {m: {} for m in self.modalities}
        self._seen: set[str] = set()
        self._start = time.time()
        self._files = {}
        self._tars = {}
        import webdataset as wds  # imported here: it pulls in torch, which path helpers above don't need

        for m in self.modalities:
            folder = fs.join(root, m)
            fs.makedirs(folder)
            tmp_dir = folder if fs.is_local(folder) else None
            fd, tmp = tempfile.mkstemp(prefix=f"{name}.tar.tmp-", dir=tmp_dir)
            f = os.fdopen(fd, "wb")
            self._files[m] = (tmp, f)
            self._tars[m] = wds.TarWriter(f, encoder=False, mtime=0, user="multimae", group="multimae", mode=0o644)

    def write(self, key: str, members: dict[str, dict[str, bytes]]) -> None:
        """members[modality] = {"rgb.jpg": b"...", "cls": b"3", ...} for every modality of this writer."""
        check_key(key)
        if key in self._seen:
            raise FormatError(f"duplicate key {key!r} in shard {self.name}")
        missing = set(self.modalities) - set(members)
        if missing:
            raise FormatError(f"sample {key!r} lacks modalities {sorted(missing)} for shard {self.name}")
        for m in self.modalities:
            with fs.naming(tar_path(self.root, m, self.name)):
                self._tars[m].write({"__key__": key, **members[m]})
            self.digests[m].update({f"{key}.{suffix}": member_digest(data) for suffix, data in members[m].items()})
        self._seen.add(key)
        self.keys.append(key)

    def skip(self, ref: str, reason: str) -> None:
        """Record a sample that could not be written (bad input), with the reason."""
        self.skipped.append({"ref": ref, "reason": reason})

    def commit(self) -> dict[str, dict]:
        """Rename every tar into place, then write each stats json. Returns the stats per modality."""
        stats = {}
        duration = round(time.time() - self._start, 3)
        for m in self.modalities:
            tmp, f = self._files[m]
            final = tar_path(self.root, m, self.name)
            with fs.naming(final):
                self._tars[m].close()  # also closes f
                os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600; a shard is as readable as any file
                size = os.path.getsize(tmp)
                if fs.is_local(final):
                    os.replace(tmp, final)
                else:
                    fs.upload(tmp, final)
                    os.remove(tmp)
            stats[m] = {
                "shard": self.name,
                "modality": m,
                "count": len(self.keys),
                "bytes": size,
                "keys_digest": keys_digest(self.keys),
                DIGESTS: self.digests[m],
                "skipped": self.skipped,
                "duration_s": duration,
                "producer": self.producer,
            }
        for m in self.modalities:
            fs.write_json_atomic(stats_path(self.root, m, self.name), stats[m])
        self._files.clear()
        return stats

    def abort(self) -> None:
        """Drop everything written so far."""
        for m, (tmp, _) in self._files.items():
            try:
                self._tars[m].close()
            except Exception:
                pass
            if os.path.exists(tmp):
                os.remove(tmp)
        self._files.clear()

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if self._files:
            self.abort() if exc_type else self.commit()
