"""Trainer checkpoints: the state of a run as plain data, written atomically, read weights-only.

A checkpoint is a dict of tensors and primitives only, so `torch.load(path, weights_only=True)` reads it:

    {"format": "multimae-train-checkpoint", "version": 2, "step": int,
     "model": state dict of the unwrapped module, "optimizer": optimizer.state_dict(),
     "model_spec": {"name": "multimae-tiny", "kwargs": {...}},   # rebuilds the model without the data
     "labels": {"cls": [...], "semseg": [...]},                    # class names the heads were trained on
     "scheduler": {the lr schedule's parameters}, "config": RunConfig as a dict,
     "data": {"seed", "chunk_steps", "world_size"}, "run": {"shards": ..., "init": ...}}

No RNG state is needed: every step re-seeds torch from (seed, step, rank) and the data stream is a function
of (seed, step) (see data.py), so these fields are all an exact resume requires. Checkpoints of other tools
(official MultiMAE, timm) load through `multimae.interop`.
"""

from __future__ import annotations

import os
from typing import Any

import torch

import multimae
from multimae.interop import CheckpointError, load_torch_file
from shards import fs

CHECKPOINT = "checkpoint.pt"
FORMAT = "multimae-train-checkpoint"
VERSION = 2


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The plain module under DDP and/or torch.compile wrappers (so saved keys carry no prefix)."""
    while True:
        if isinstance(model, torch.nn.parallel.DistributedDataParallel):
            model = model.module
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod
        else:
            return model


def save_checkpoint(
    url: str, *, model: torch.nn.Module, optimizer: torch.optim.Optimizer, step: int, **fields: Any
) -> None:
    """Write the checkpoint to `url` atomically (temporary name + rename; one put on object stores).

    fields: the plain-data entries of the format above (config, scheduler, data, model_spec, labels, run).
    """
    state = {"format": FORMAT, "version": VERSION, "step": int(step)}
    state.update(model=unwrap(model).state_dict(), optimizer=optimizer.state_dict(), **fields)
    with fs.atomic_writer(url) as f:
        torch.save(state, f)


def load_checkpoint_file(url: str) -> dict[str, Any]:
    """Read a checkpoint (tensors and primitives only); FileNotFoundError / CheckpointError name the file."""
    if not fs.exists(url):
        raise FileNotFoundError(f"checkpoint not found: {url}")
    with fs.open_file(url, "rb") as f:
        state = load_torch_file(f, url)
    if not isinstance(state, dict):
        raise CheckpointError(f"{url} holds a {type(state).__name__}, not a checkpoint")
    return state


def is_training_checkpoint(state: dict[str, Any]) -> bool:
    return state.get("format") == FORMAT


def checkpoint_url(path: str) -> str:
    """A run folder -> its checkpoint.pt; a file path stays as it is."""
    return fs.join(path, CHECKPOINT) if fs.isdir(path) else path


def load_model(path: str) -> tuple[torch.nn.Module, dict[str, Any]]:
    """The trained model of a run folder or checkpoint file, rebuilt from its `model_spec`, and the checkpoint.

    The model is in eval mode on the CPU; the checkpoint dict gives its config, step and class names.
    """
    url = checkpoint_url(path)
    state = load_checkpoint_file(url)
    if not is_training_checkpoint(state) or "model_spec" not in state:
        raise CheckpointError(f"{url} is not a multimae-train checkpoint of this version (no model_spec)")
    spec = state["model_spec"]
    model = multimae.create_model(spec["name"], **spec["kwargs"])
    model.load_state_dict(state["model"])
    return model.eval(), state


def remove_stale_temporaries(out_dir: str) -> int:
    """Delete checkpoint temporaries of killed runs (`*.tmp-xxxxxxxx` in a local run folder); returns how many."""
    if not fs.is_local(out_dir) or not os.path.isdir(out_dir):
        return 0
    return fs.remove_stale_temporaries(out_dir)
