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

The rules of a run's weights live here too: `load_init` (what `--init` loads into a new model),
`resume_state` and `check_resume` (which checkpoint in OUT continues which run).
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

import torch

import multimae
from multimae.interop import CheckpointError, load_torch_file
from shards import fs

from .state import TrainingError

if TYPE_CHECKING:
    from .config import RunConfig

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


# ---------------------------------------------------------------- init and resume rules


def uses_depth_input(config: dict) -> bool:
    return any(m.split("_", 1)[0] == "depth" for m in config["data"]["inputs"].values())


def check_depth_space(state: dict[str, Any], cfg: RunConfig, init: str) -> None:
    """A depth input adapter trained on one depth space must not be fed the other."""
    saved = state["config"]
    space = saved["data"].get("depth_space", "depth")
    if uses_depth_input(saved) and uses_depth_input(cfg.to_dict()) and space != cfg.data.depth_space:
        raise TrainingError(
            f"--init {init} was trained with depth inputs in space {space!r}, this run feeds "
            f"{cfg.data.depth_space!r}: set data.depth_space={space} (the data is converted)"
        )


def load_init(model: torch.nn.Module, init: str, cfg: RunConfig, main: bool) -> int:
    """Initialise from a multimae-train checkpoint or an official / timm / Hub checkpoint.

    A checkpoint of the same objective (e.g. a fine-tuned run) loads whole; otherwise, for fine-tuning, only
    the encoder (global tokens, input adapters, blocks) is taken and the head starts fresh; input adapters the
    checkpoint has but this model lacks (e.g. depth/semseg when fine-tuning on rgb) are reported, not loaded.
    Returns the checkpoint's step (0 when it does not record one).
    """
    if os.path.isdir(init) or init.endswith(".safetensors"):  # Hugging Face Hub folder / safetensors file
        state = multimae.read_state_dict(init)
    else:
        state = load_checkpoint_file(init)
    ours = is_training_checkpoint(state)
    if ours:
        check_depth_space(state, cfg, init)
    sd = multimae.read_state_dict(state["model"] if ours else state)
    same = ours and state["config"].get("objective", state["config"].get("task")) == cfg.objective
    try:
        if same or cfg.pretraining:
            result = multimae.load_checkpoint(model, sd, strict=same)
        else:
            result = multimae.load_checkpoint(model, sd, encoder_only=True)
    except (RuntimeError, ValueError) as e:
        detail = " ".join(str(e).split())[:300]
        raise TrainingError(
            f"--init {init} does not fit this model (check model.name and the model size "
            f"fields against the checkpoint's): {detail}"
        ) from None
    if main:
        print(
            f"initialised from {init}: {len(result.missing_keys)} missing keys {result.missing_keys[:4]}, "
            f"{len(result.unexpected_keys)} unexpected",
            flush=True,
        )
    return int(state.get("step", 0)) if ours else 0


def run_identity(cfg: RunConfig, shards_root: str, init: str | None) -> dict[str, Any]:
    """What makes two invocations the same run: the config, the shard set and the initial weights."""
    where = lambda p: os.path.abspath(p) if p and fs.is_local(p) else p  # noqa: E731
    return {"config": cfg.to_dict(), "shards": where(shards_root), "init": where(init)}


def _differences(saved: dict[str, Any], now: dict[str, Any]) -> list[str]:
    diffs = [f"--{k} {saved.get(k)} (now {now[k]})" for k in ("shards", "init") if saved.get(k) != now[k]]

    def walk(a: Any, b: Any, key: str) -> None:
        if isinstance(a, dict) and isinstance(b, dict):
            for k in sorted(set(a) | set(b)):
                walk(a.get(k), b.get(k), f"{key}.{k}" if key else k)
        elif a != b:
            diffs.append(f"{key}={a!r} (now {b!r})")

    walk(saved.get("config", {}), now["config"], "")
    return diffs


def check_resume(
    state: dict[str, Any], cfg: RunConfig, identity: dict[str, Any], world: int, out_dir: str, url: str, explicit: bool
) -> None:
    """A checkpoint in OUT resumes only the same run (`identity`, see `run_identity`), or any run with --resume
    (`explicit`) where exactness allows: the same batch size, seed, inputs, objective and world size."""
    diffs = _differences(state.get("run", {}), identity)
    if diffs and not explicit:
        shown = "; ".join(diffs[:4]) + (f"; and {len(diffs) - 4} more" if len(diffs) > 4 else "")
        raise TrainingError(
            f"{out_dir} holds another run (step {state['step']}) made with {shown}: use "
            "another --out, --resume to continue it with these settings, or --no-resume to "
            "start over"
        )
    saved = state["config"]
    for section, key in (("train", "batch_size"), ("train", "seed"), ("data", "inputs"), (None, "objective")):
        a = (saved if section is None else saved[section]).get(key)
        b = getattr(cfg if section is None else getattr(cfg, section), key)
        if a != b:
            name = key if section is None else f"{section}.{key}"
            raise TrainingError(
                f"{url} was written with {name}={a!r}, this run has {b!r}: use another --out "
                "or the same config to resume"
            )
    if state["data"]["world_size"] != world:
        raise TrainingError(
            f"{url} was written by {state['data']['world_size']} ranks, this run has "
            f"{world}: exact resume needs the same world size (the data split depends on it)"
        )


def resume_state(resume: str | bool | None, ckpt_url: str) -> tuple[str, dict[str, Any] | None]:
    """(the checkpoint a run continues from, its state or None): `resume` a path, or OUT/checkpoint.pt when it
    exists and resume is not False; TrainingError for a file that is not a trainer checkpoint."""
    url = resume if isinstance(resume, str) else ckpt_url
    if not (isinstance(resume, str) or (resume is not False and fs.exists(url))):
        return url, None
    state = load_checkpoint_file(url)
    if not is_training_checkpoint(state):
        raise TrainingError(f"{url} is not a multimae-train checkpoint; give it as --init instead")
    return url, state
