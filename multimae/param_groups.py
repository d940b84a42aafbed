"""Optimizer parameter groups: no weight decay for norms, biases and embeddings; optional
layer-wise learning-rate decay for fine-tuning (BEiT/MAE recipe, used by the official scripts).
"""

from __future__ import annotations

import torch.nn as nn


def layer_id(name: str, num_layers: int) -> int:
    """0 for tokens and input adapters, i + 1 for encoder block i, num_layers + 1 for heads/decoders."""
    if name.startswith(("global_tokens", "input_adapters.")):
        return 0
    if name.startswith("encoder."):
        return int(name.split(".")[1]) + 1
    return num_layers + 1


def param_groups(
    model: nn.Module, weight_decay: float, layer_decay: float | None = None, decay_everything: bool = False
) -> list[dict]:
    """AdamW groups: {"params", "weight_decay", "lr_scale", "names"}.

    Weight decay skips 1-D parameters (norms, biases) and the model's `no_weight_decay()` names
    (global tokens, position/task/class embeddings, mask tokens) unless `decay_everything`.
    With `layer_decay`, a parameter of layer l (see `layer_id`) gets lr_scale = layer_decay **
    (num_layers + 1 - l); without it every lr_scale is 1. Frozen parameters are left out.
    The trainer multiplies its learning rate by each group's "lr_scale".
    """
    skip = model.no_weight_decay() if hasattr(model, "no_weight_decay") else set()
    num_layers = len(getattr(model, "encoder", []))
    groups: dict[tuple[int, bool], dict] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        no_decay = not decay_everything and (
            p.ndim <= 1 or name.endswith(".bias") or name in skip or any(name.startswith(s + ".") for s in skip)
        )
        lid = layer_id(name, num_layers) if layer_decay is not None else 0
        scale = layer_decay ** (num_layers + 1 - lid) if layer_decay is not None else 1.0
        g = groups.setdefault(
            (lid, no_decay),
            {"params": [], "names": [], "lr_scale": scale, "weight_decay": 0.0 if no_decay else weight_decay},
        )
        g["params"].append(p)
        g["names"].append(name)
    return list(groups.values())
