"""The lean MultiMAE trainer: streaming pre-training, fine-tuning and evaluation on aligned shard sets.

Modules, in the order a run uses them:
  config.py       the typed run config (YAML + dotted overrides), no torch import
  cli.py          `multimae-train` (also `python -m multimae.train`, `torchrun -m multimae.train`)
  main.py         `run()`: setup (distributed, plan, model, precision, optimizer, resume) -> loop -> finish
  state.py        `Plan`, `Run` (everything a job holds, built once) and `TrainingError`
  engine.py       the step loop: schedule, accumulation, autocast, clipping, logging, checkpoints
  data.py         shard stream -> joint crop/flip -> normalization -> batches, exact resume by chunks
  evaluate.py     a run's evaluation: metric sums, eval.json, predictions.zarr
  checkpoints.py  trainer checkpoints (weights-only), `load_model(run)`, the --init and resume rules
  export.py       a run -> a Hugging Face Hub folder
  distributed.py, logger.py, visualize.py

`from multimae.train import run, load_model` is the Python API; names load on first use.
"""

from importlib import import_module
from typing import Any

_EXPORTS = {
    "run": "main",
    "setup": "main",
    "TrainingError": "state",
    "load_model": "checkpoints",
    "RunConfig": "config",
    "load_run_config": "config",
    "export_run": "export",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'multimae.train' has no attribute {name!r}")
    return getattr(import_module(f".{_EXPORTS[name]}", __name__), name)
