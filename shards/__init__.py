"""Aligned per-modality WebDataset shard sets: format, writer, reader, sources and the `multimae-shard` CLI."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("multimae-toolkit")
except PackageNotFoundError:  # running from a source tree without install
    __version__ = "0.0.0+src"
