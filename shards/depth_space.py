"""What a depth value means and how depth maps are brought to one space.

A depth modality's manifest `meaning` says what its values are: `metric_m` (metres), `relative` (depth up to a
scale) or `inverse_relative` (MiDaS / DPT-style disparity, larger = nearer). The trainer brings every depth
input to one space (`data.depth_space`), the normals teacher turns disparity into depth before differentiating
it, and the demo page feeds depth as its model was trained: all with `to_depth_space`.
"""

from __future__ import annotations

import numpy as np

from .errors import FormatError

#: Depth meanings (manifest) that grow with distance; `inverse_relative` (MiDaS / DPT disparity) shrinks.
DEPTH_LIKE = ("metric_m", "relative")
DEPTH_SPACES = ("depth", "inverse_depth")
#: Inverting disparity: values under this share of the image's largest one are clipped first, so the farthest
#: pixels come out at 1 / DISPARITY_CLIP = 100x the nearest depth instead of infinity.
DISPARITY_CLIP = 0.01


def to_depth_space(depth: np.ndarray, meaning: str, space: str = "depth") -> np.ndarray:
    """A depth map (H, W) whose manifest meaning is `meaning`, in `space` ("depth": larger = farther).

    A map already in the space is returned as is (missing pixels, stored as 0, stay 0). Otherwise it is
    inverted: 1 / max(v, DISPARITY_CLIP * max(v)) per image, up to the unknown scale of relative depth; a map
    without a positive value becomes all 0 (missing).
    """
    if meaning not in DEPTH_LIKE + ("inverse_relative",):
        raise FormatError(f"unknown depth meaning {meaning!r} (known: {', '.join(DEPTH_LIKE)}, inverse_relative)")
    if (meaning in DEPTH_LIKE) == (space == "depth"):
        return depth
    top = float(np.max(depth)) if depth.size else 0.0
    if not top > 0:
        return np.zeros_like(depth, dtype=np.float32)
    return (1.0 / np.maximum(depth, DISPARITY_CLIP * top)).astype(np.float32)
