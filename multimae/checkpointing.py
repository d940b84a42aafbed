"""Training checkpoints as plain data, written atomically (DESIGN.md section 6).

A checkpoint is a dict of tensors and primitives only, so `torch.load(path, weights_only=True)` reads it:
  {"model": state_dict of the unwrapped module, "optimizer": optimizer.state_dict(),
   "scheduler": {the lr schedule's parameters}, "step": int, "config": RunConfig as a dict,
   "data": {"seed", "chunk_steps", "world_size"}, "format": "multimae-train-checkpoint", "version": 1}
No RNG state is needed: every step re-seeds torch from (seed, step, rank) and the data stream is a function
of (seed, step) (see data.py), so these fields are all an exact resume requires.
"""

from __future__ import annotations

from typing import Any

import torch

from shards import fs

CHECKPOINT = "checkpoint.pt"
FORMAT = "multimae-train-checkpoint"


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
    url: str,
    *,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    step: int,
    config: dict[str, Any],
    scheduler: dict[str, Any],
    data: dict[str, Any],
) -> None:
    """Write the checkpoint to `url` atomically (temporary name + rename; one put on object stores)."""
    state = {
        "format": FORMAT,
        "version": 1,
        "step": int(step),
        "model": unwrap(model).state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": dict(scheduler),
        "config": config,
        "data": dict(data),
    }
    with fs.atomic_writer(url) as f:
        torch.save(state, f)


def load_checkpoint_file(url: str) -> dict[str, Any]:
    """Read a checkpoint (tensors and primitives only); raises FileNotFoundError naming the path."""
    if not fs.exists(url):
        raise FileNotFoundError(f"checkpoint not found: {url}")
    with fs.open_file(url, "rb") as f:
        return torch.load(f, map_location="cpu", weights_only=True)


def is_training_checkpoint(state: dict[str, Any]) -> bool:
    return state.get("format") == FORMAT
