"""Writing one shard of several aligned modalities atomically (DESIGN.md section 2).

Each modality's tar is written to a temporary file and renamed into place on `commit()`; the
per-shard stats json is written after its tar, so "stats json exists" means "shard complete".
Tars are deterministic: members sorted within a sample, mtime 0, fixed owner.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import time

from . import fs
from .format import FormatError, check_key, modality_kind

_UMASK = os.umask(0)
os.umask(_UMASK)


def stats_path(root: str, modality: str, name: str) -> str:
    return fs.join(root, modality, f"{name}.json")


def tar_path(root: str, modality: str, name: str) -> str:
    return fs.join(root, modality, f"{name}.tar")


def shard_is_complete(root: str, modality: str, name: str) -> bool:
    return fs.exists(stats_path(root, modality, name)) and fs.exists(tar_path(root, modality, name))


def keys_digest(keys: list[str]) -> str:
    return hashlib.sha256("\n".join(keys).encode()).hexdigest()


class ShardWriter:
    """Writes shard `name` of several modalities under `root`; nothing is visible until `commit()`."""

    def __init__(self, root: str, name: str, modalities: list[str], producer: dict | None = None):
        for m in modalities:
            modality_kind(m)
        self.root, self.name, self.modalities = root, name, list(modalities)
        self.producer = producer or {}
        self.keys: list[str] = []
        self.skipped: list[dict] = []
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
            self._tars[m].write({"__key__": key, **members[m]})
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
            self._tars[m].close()  # also closes f
            final = tar_path(self.root, m, self.name)
            os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600; a shard is as readable as any file
            if fs.is_local(final):
                os.replace(tmp, final)
            else:
                fs.url_to_fs(final)[0].put_file(tmp, fs.url_to_fs(final)[1])
                os.remove(tmp)
            stats[m] = {
                "shard": self.name,
                "modality": m,
                "count": len(self.keys),
                "bytes": fs.size(final),
                "keys_digest": keys_digest(self.keys),
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
