"""The run folder (`--out`): a local path or an object-store URL (s3://bucket/runs/x, gs://...).

Whole files (checkpoint.pt, config.json, eval.json, summary.json) are written through `shards.fs`, each
atomically: a rename on a local disk, one uploaded object on a store. Files that grow while the run goes
on (metrics.jsonl, TensorBoard events, keys-rank<r>.txt) and files written by libraries that want a local
path (reconstruction PNGs, predictions.zarr) are written to `RunFolder.path(name)`: the run folder itself
on a local disk; for a remote run folder, a local staging folder whose changed files are uploaded, each as
one object, at every checkpoint (before the checkpoint itself) and at the end. A resumed run downloads the
files it appends to (metrics.jsonl, keys files) before it appends, and the logger then drops the lines of
steps after the checkpoint, so every step is logged once.
"""

from __future__ import annotations

import os
import shutil
import tempfile

from shards import fs


class RunFolder:
    """Local paths for the run's growing files, and their upload to a remote run folder."""

    def __init__(self, url: str):
        self.url = url
        self.remote = not fs.is_local(url)
        self.local = tempfile.mkdtemp(prefix="multimae-run-") if self.remote else url
        self._uploaded: dict[str, tuple[int, int]] = {}  # name -> (size, mtime_ns) when last uploaded

    def url_of(self, name: str) -> str:
        """Where run file `name` ("metrics.jsonl", "reconstructions/step-00000100.png") lives for the user."""
        return fs.join(self.url, name)

    def path(self, name: str, *, fetch: bool = False) -> str:
        """Local path to write run file `name` to (its folder exists); with `fetch`, a remote copy of the file
        is downloaded first, so that the run appends to it."""
        local = os.path.join(self.local, *name.split("/"))
        os.makedirs(os.path.dirname(local), exist_ok=True)
        if fetch and self.remote and not os.path.exists(local) and fs.exists(self.url_of(name)):
            with open(local, "wb") as f:
                f.write(fs.read_bytes(self.url_of(name)))
        return local

    def upload(self) -> list[str]:
        """Upload every staged file that changed since its last upload (remote run folders); returns their names."""
        if not self.remote:
            return []
        sent = []
        for folder, _, files in os.walk(self.local):
            for file in sorted(files):
                local = os.path.join(folder, file)
                name = os.path.relpath(local, self.local).replace(os.sep, "/")
                st = os.stat(local)
                if self._uploaded.get(name) != (st.st_size, st.st_mtime_ns):
                    fs.upload(local, self.url_of(name))
                    self._uploaded[name] = (st.st_size, st.st_mtime_ns)
                    sent.append(name)
        return sent

    def close(self) -> None:
        """Upload what changed and remove the staging folder (remote run folders)."""
        if self.remote:
            try:
                self.upload()
            finally:
                shutil.rmtree(self.local, ignore_errors=True)
