"""Hostile and broken inputs, built at test time: crafted tars (sparse, links, devices, bad names), damaged
shard sets, PostScript disguised as JPEG, a fake Ghostscript that leaves a trace, bounded child processes.

Nothing here is large on disk: a sparse member is a 512-byte header that claims gigabytes.
"""

from __future__ import annotations

import json
import os
import resource
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np

from shards import format as F
from shards.writer import ShardWriter, tar_path

BIN = Path(sys.executable).parent
CLI = str(BIN / "multimae-shard")
GiB = 2**30

# A valid EPS file: Pillow's EPS plugin identifies it and renders it by running Ghostscript (`gs`).
POSTSCRIPT = (
    b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 16 16\n%%EndComments\n"
    b"newpath 0 0 moveto 16 16 lineto stroke\nshowpage\n%%EOF\n"
)


def image(seed: int, h: int = 16, w: int = 16) -> np.ndarray:
    """(h, w, 3) uint8, smooth enough that JPEG keeps it recognisable."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w]
    base = rng.integers(40, 200, 3)[None, None, :] + 3 * (x + y)[..., None]
    return np.clip(base, 0, 255).astype(np.uint8)


def key_of(shard: int, i: int) -> str:
    return f"{shard:02d}{i:04d}"


def rgb_set(root: str | Path, counts: list[int] = (4,), depth: bool = False) -> list[list[str]]:
    """A valid shard set (rgb + cls, optionally depth) written by the real writer; keys per shard."""
    root, keys = str(root), []
    mods = ["rgb", "depth"] if depth else ["rgb"]
    for s, n in enumerate(counts):
        keys.append([key_of(s, i) for i in range(n)])
        with ShardWriter(root, F.shard_name(s), mods, producer={"source": "test"}) as w:
            for i, k in enumerate(keys[-1]):
                members = {"rgb": {**F.encode_sample("rgb", image(100 * s + i)), "cls": str(i % 2).encode()}}
                if depth:
                    members["depth"] = F.encode_sample(
                        "depth", np.linspace(1, 2, 256, dtype=np.float32).reshape(16, 16)
                    )
                w.write(k, members)
    entries = {m: F.modality_entry(m, {"source": "test"}, meaning="test") for m in mods}
    shards = [{"name": F.shard_name(s), "count": n} for s, n in enumerate(counts)]
    F.update_manifest(root, entries, shards, cls_classes=["a", "b"])
    return keys


# --- crafted tars ---------------------------------------------------------------------------------


def member(name: str, data: bytes = b"", **fields) -> tuple[tarfile.TarInfo, bytes]:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), 0, 0o644
    for k, v in fields.items():
        setattr(info, k, v)
    return info, data


def tar_bytes(items: list, fmt: int = tarfile.GNU_FORMAT) -> bytes:
    """A tar from (TarInfo, data) pairs and raw header+data blobs, in order, with the end-of-archive blocks."""
    out = bytearray()
    for item in items:
        if isinstance(item, bytes):
            out += item
            continue
        info, data = item
        out += info.tobuf(fmt, "utf-8", "surrogateescape") + data + b"\0" * (-len(data) % 512)
    return bytes(out + b"\0" * 1024)


def sparse_gnu(name: str, real: int, stored: bytes = b"x" * 512) -> bytes:
    """An old-GNU sparse member ('S'): a header claiming `real` bytes, of which only `stored` are on disk."""
    info = tarfile.TarInfo(name)
    info.size, info.mtime = len(stored), 0
    buf = bytearray(info.tobuf(tarfile.GNU_FORMAT))
    buf[156:157] = b"S"
    buf[386:398] = tarfile.itn(real - len(stored), 12, tarfile.GNU_FORMAT)  # one data chunk, at the end
    buf[398:410] = tarfile.itn(len(stored), 12, tarfile.GNU_FORMAT)
    buf[482] = 0  # no extension blocks
    buf[483:495] = tarfile.itn(real, 12, tarfile.GNU_FORMAT)  # the size it expands to
    buf[148:156] = b" " * 8
    buf[148:156] = b"%06o\0 " % sum(buf)
    return bytes(buf) + stored + b"\0" * (-len(stored) % 512)


def sparse_pax(name: str, real: int, stored: bytes = b"x" * 512) -> bytes:
    """A PAX 1.0 sparse member (GNU tar --sparse --format=posix): the map travels in the data."""
    sparse_map = f"1\n{real - len(stored)}\n{len(stored)}\n".encode().ljust(512, b"\0")
    info, data = member(f"GNUSparseFile.0/{name}", sparse_map + stored)
    info.pax_headers = {
        "GNU.sparse.major": "1",
        "GNU.sparse.minor": "0",
        "GNU.sparse.name": name,
        "GNU.sparse.realsize": str(real),
    }
    return tar_bytes([(info, data)], tarfile.PAX_FORMAT)[:-1024]


def members_of(path: str) -> list[tuple[tarfile.TarInfo, bytes]]:
    """The (header, bytes) of every member of a valid tar, to rebuild it with changes."""
    with tarfile.open(path) as t:
        return [(i, t.extractfile(i).read()) for i in t.getmembers()]


def replace_tar(root: str, shard: int, items: list, modality: str = "rgb", fmt: int = tarfile.GNU_FORMAT) -> str:
    """Overwrite one shard's tar with crafted content (its stats json stays as written); returns its path."""
    path = tar_path(root, modality, F.shard_name(shard))
    Path(path).write_bytes(tar_bytes(items, fmt))
    return path


def edit_stats(root: str, shard: int, change, modality: str = "rgb") -> None:
    path = Path(root) / modality / f"{F.shard_name(shard)}.json"
    stats = json.loads(path.read_text())
    change(stats)
    path.write_text(json.dumps(stats))


# --- processes ------------------------------------------------------------------------------------


def fake_ghostscript(folder: Path) -> tuple[dict, Path]:
    """A `gs` that records each call in a marker file; returns (environment with it first on PATH, marker)."""
    folder.mkdir(parents=True, exist_ok=True)
    marker = folder / "gs-ran"
    gs = folder / "gs"
    gs.write_text(f'#!/bin/sh\necho "$@" >> {marker}\n')
    gs.chmod(0o755)
    return {**os.environ, "PATH": f"{folder}:{os.environ['PATH']}"}, marker


def run_bounded(args: list[str], *, env: dict | None = None, timeout: float = 180, data_limit: int = 4 * GiB):
    """Run a child with its data segment capped (a regression cannot take the machine down) and a timeout.

    Returns (exit code, or None when it timed out and was killed; stdout; stderr; peak RSS in bytes).
    """

    def cap() -> None:
        resource.setrlimit(resource.RLIMIT_DATA, (data_limit, data_limit))
        os.setsid()  # its own process group, killed whole on timeout

    with tempfile.TemporaryFile() as fo, tempfile.TemporaryFile() as fe:
        proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=fo, stderr=fe, env=env, preexec_fn=cap)
        code, usage = _wait(proc, timeout)
        fo.seek(0)
        fe.seek(0)
        return code, fo.read().decode(errors="replace"), fe.read().decode(errors="replace"), usage.ru_maxrss * 1024


def _wait(proc: subprocess.Popen, timeout: float):
    """(exit code or None, rusage of the child alone) -- os.wait4 gives this child's own peak RSS."""
    deadline = time.monotonic() + timeout
    while True:
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            proc.returncode = os.waitstatus_to_exitcode(status)
            return proc.returncode, usage
        if time.monotonic() > deadline:
            os.killpg(proc.pid, signal.SIGKILL)
            _, _, usage = os.wait4(proc.pid, 0)
            proc.returncode = -9
            return None, usage
        time.sleep(0.05)
