"""Named model sizes and `create_model` (like timm's `@register_model`).

Names: "multimae-{tiny,small,base,large}" (pre-training, `MultiMAE`) and
"multivit-{tiny,small,base,large}" (fine-tuning, `MultiViT`); keyword overrides go to the
model's constructor, e.g. `create_model("multimae-small", in_domains=("rgb", "depth"), image_size=128)`
or `create_model("multivit-base", objective="semseg", num_classes=40, image_size=512)`.
"""

from __future__ import annotations

import inspect

import torch.nn as nn

from .model import MultiMAE, MultiViT
from .sizes import SIZES

CLASSES: dict[str, type[nn.Module]] = {"multimae": MultiMAE, "multivit": MultiViT}


def list_models() -> list[str]:
    """All registered model names."""
    return [f"{family}-{size}" for family in CLASSES for size in SIZES]


def create_model(name: str, **overrides) -> nn.Module:
    """Build a registered model; `overrides` replace any constructor argument (also the size)."""
    family, _, size = name.partition("-")
    if family not in CLASSES or size not in SIZES:
        raise ValueError(f"unknown model '{name}'; known: {', '.join(list_models())}")
    cls = CLASSES[family]
    allowed = set(inspect.signature(cls.__init__).parameters) - {"self"}
    unknown = sorted(set(overrides) - allowed)
    if unknown:
        raise ValueError(f"unknown option(s) {unknown} for '{name}'; allowed: {sorted(allowed)}")
    return cls(**{**SIZES[size], **overrides})
