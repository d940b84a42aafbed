"""Named model sizes and `create_model` (like timm's `@register_model`).

Names: "multimae-{tiny,small,base,large}" (pre-training, `MultiMAE`) and
"multivit-{tiny,small,base,large}" (fine-tuning, `MultiViT`); keyword overrides go to the
model's constructor, e.g. `create_model("multimae-small", in_domains=("rgb", "depth"), image_size=128)`
or `create_model("multivit-base", task="semseg", num_classes=40, image_size=512)`.
"""

from __future__ import annotations

import inspect

import torch.nn as nn

from .model import MultiMAE, MultiViT

#: Encoder sizes: ViT-Ti / S / B / L (the paper trains B and L).
SIZES: dict[str, dict[str, int]] = {
    "tiny": dict(dim_tokens=192, depth=12, num_heads=3),
    "small": dict(dim_tokens=384, depth=12, num_heads=6),
    "base": dict(dim_tokens=768, depth=12, num_heads=12),
    "large": dict(dim_tokens=1024, depth=24, num_heads=16),
}
FAMILIES: dict[str, type[nn.Module]] = {"multimae": MultiMAE, "multivit": MultiViT}


def list_models() -> list[str]:
    """All registered model names."""
    return [f"{family}-{size}" for family in FAMILIES for size in SIZES]


def create_model(name: str, **overrides) -> nn.Module:
    """Build a registered model; `overrides` replace any constructor argument (also the size)."""
    family, _, size = name.partition("-")
    if family not in FAMILIES or size not in SIZES:
        raise ValueError(f"unknown model '{name}'; known: {', '.join(list_models())}")
    cls = FAMILIES[family]
    allowed = set(inspect.signature(cls.__init__).parameters) - {"self"}
    unknown = sorted(set(overrides) - allowed)
    if unknown:
        raise ValueError(f"unknown option(s) {unknown} for '{name}'; allowed: {sorted(allowed)}")
    return cls(**{**SIZES[size], **overrides})
