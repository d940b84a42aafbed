"""One writer per output: the lock that `multimae-shard build` and `multimae-label` hold on their output folder.

Two jobs writing into the same shard set would each see the other's half-made shards as leftovers of a killed
run and overwrite them; the second job instead stops with one line naming the lock, its holder and how to
clear a stale one. The lock is the file or object ``OUTPUT/.multimae-lock``, a JSON record of its holder
(owner id, command, host, boot id, process id and start time):

- local disk: an exclusive `flock` on the file, taken without waiting. The kernel drops it when the holder
  exits, however it dies, so a killed job never leaves a stale lock behind.
- object stores: the object is created only if absent (S3 ``If-None-Match: *``, GCS ``ifGenerationMatch=0``)
  and deleted when the job ends. A job killed before it could delete it leaves it behind: a new job on the
  same host (same boot) whose holder process is gone takes the stale lock over (on S3 with ``If-Match`` on
  the stale object's ETag, so two takers cannot both win); on another host it stops and names the holder, and
  `multimae-shard unlock OUTPUT` clears it. Stores without a conditional create fall back to check-then-write,
  which two jobs starting at the same instant can both pass.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from . import fs
from .errors import FormatError

LOCK = ".multimae-lock"


class LockHeld(FormatError):
    """Another job holds the output's lock; the message names it and how to clear a stale one."""


def lock_url(root: str) -> str:
    return fs.join(root, LOCK)


def _boot_id() -> str:
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip()
    except OSError:
        return ""


def _start_ticks(pid: int) -> str:
    """The start time of process `pid` in clock ticks since boot ('' when unknown): tells a reused pid apart."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return ""


def holder_record(job: str) -> dict[str, Any]:
    """Who holds a lock: this process."""
    pid = os.getpid()
    return {
        "owner": uuid.uuid4().hex,
        "job": job,
        "command": " ".join(sys.argv)[:300],
        "host": socket.gethostname(),
        "boot_id": _boot_id(),
        "pid": pid,
        "pid_start": _start_ticks(pid),
        "since": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def holder_is_gone(record: dict[str, Any]) -> bool:
    """True when the holder ran on this very host and boot and its process no longer exists."""
    if not record.get("boot_id") or record.get("boot_id") != _boot_id() or record.get("host") != socket.gethostname():
        return False
    pid = record.get("pid")
    if not isinstance(pid, int):
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return bool(record.get("pid_start")) and _start_ticks(pid) != record["pid_start"]


def describe(record: dict[str, Any] | None) -> str:
    if not record:
        return "another job (its record is not written yet)"
    return (
        f"{record.get('job', '?')} (pid {record.get('pid', '?')} on {record.get('host', '?')}, "
        f"since {record.get('since', '?')}, owner {record.get('owner', '?')})"
    )


def _held(root: str, record: dict[str, Any] | None) -> LockHeld:
    return LockHeld(
        f"{lock_url(root)} is held by {describe(record)}: two jobs must not write into one output; wait for it "
        f"to finish, or if it is no longer running, clear the stale lock with `multimae-shard unlock {root}`"
    )


def _parse(data: bytes) -> dict[str, Any] | None:
    try:
        record = json.loads(data)
    except ValueError:
        return None
    return record if isinstance(record, dict) else None


# --- local disk: flock ----------------------------------------------------------------------------


def _acquire_local(root: str, record: dict[str, Any]) -> int:
    import fcntl

    path = fs._local(lock_url(root))
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            with os.fdopen(fd, "rb") as f:
                raise _held(root, _parse(f.read())) from None
        try:
            same = os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:  # else the holder removed the file between our open and our flock: lock the new one
            os.ftruncate(fd, 0)
            os.write(fd, fs.dumps_json(record))
            return fd
        os.close(fd)


def _release_local(root: str, fd: int) -> None:
    try:
        os.remove(fs._local(lock_url(root)))
    finally:
        os.close(fd)  # drops the flock


# --- object stores: conditional create ------------------------------------------------------------


def _read_remote(url: str) -> tuple[dict[str, Any] | None, str | None]:
    """A lock object's record and the ETag of exactly those bytes (None where the store has no ETag)."""
    filesystem, path = fs.filesystem(url)
    with filesystem.open(path, "rb") as f:  # s3fs reads the version whose ETag it saw when opening
        return _parse(f.read()), getattr(f, "details", {}).get("ETag")


def _take_over(url: str, record: dict[str, Any], etag: str | None) -> bool:
    """Replace the stale lock object (the version with `etag`) by ours; False when another job changed it first."""
    data = fs.dumps_json(record)
    if etag is not None and url.startswith("s3://"):
        filesystem, path = fs.filesystem(url)
        try:
            filesystem.pipe_file(path, data, IfMatch=etag)
        except FileNotFoundError:
            return fs.create_exclusive(url, data)
        except OSError:  # 412 Precondition Failed: another job's object now
            return False
        return True
    fs.remove(url)
    return fs.create_exclusive(url, data)


def _acquire_remote(root: str, record: dict[str, Any]) -> None:
    url = lock_url(root)
    for _ in range(3):
        if fs.create_exclusive(url, fs.dumps_json(record)):
            return
        try:
            current, etag = _read_remote(url)
        except FileNotFoundError:
            continue  # released meanwhile: try again
        if current is None or not holder_is_gone(current):
            raise _held(root, current)
        print(f"{url}: taking over the stale lock of {describe(current)}: its process is gone", file=sys.stderr)
        if _take_over(url, record, etag):
            return
    raise _held(root, None)


def _release_remote(root: str, record: dict[str, Any]) -> None:
    url = lock_url(root)
    try:
        current = _parse(fs.read_bytes(url))
    except FileNotFoundError:
        return
    if current is not None and current.get("owner") == record["owner"]:
        fs.remove(url)


# --- the lock -------------------------------------------------------------------------------------


@contextmanager
def output_lock(root: str, job: str) -> Iterator[dict[str, Any]]:
    """Hold the lock of output folder `root` for the block; LockHeld when another job holds it."""
    record = holder_record(job)
    if fs.is_local(root):
        fd = _acquire_local(root, record)
        try:
            yield record
        finally:
            _release_local(root, fd)
        return
    fs.makedirs(root)
    _acquire_remote(root, record)
    try:
        yield record
    finally:
        _release_remote(root, record)


def unlock(root: str) -> dict[str, Any] | None:
    """Remove the lock of `root` left by a job that is gone; returns its record ({} when unreadable, None when
    there was no lock).

    A local lock held by a running process cannot be removed (LockHeld): that job is still writing.
    """
    url = lock_url(root)
    if not fs.exists(url):
        return None
    record = _parse(fs.read_bytes(url)) or {}
    if fs.is_local(root):
        _release_local(root, _acquire_local(root, holder_record("multimae-shard unlock")))  # LockHeld if live
    else:
        fs.remove(url)
    return record
