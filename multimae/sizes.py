"""Named model sizes (no torch import: configs are checked against these names before any model is built).

Encoder sizes are ViT-Ti / S / B / L (the paper trains B and L); a name is `<family>-<size>`, where the
family is `multimae` (pre-training model) or `multivit` (encoder + fine-tuning head).
"""

from __future__ import annotations

SIZES: dict[str, dict[str, int]] = {
    "tiny": dict(dim_tokens=192, depth=12, num_heads=3),
    "small": dict(dim_tokens=384, depth=12, num_heads=6),
    "base": dict(dim_tokens=768, depth=12, num_heads=12),
    "large": dict(dim_tokens=1024, depth=24, num_heads=16),
}
FAMILIES = ("multimae", "multivit")
MODEL_NAMES = tuple(f"{family}-{size}" for family in FAMILIES for size in SIZES)
