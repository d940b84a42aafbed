"""Fixed 2D sine-cosine position embeddings (MultiMAE paper, Sec. 3.1; MoCo-v3 formula).

The official implementation builds the embedding with `torch.meshgrid(grid_w, grid_h)` and then
reads the flattened grid back as (h, w); for the square grids it is used with, this puts the
row coordinate into the first half of the channels and the column coordinate into the second
half. `build_2d_sincos_pos_emb` writes that layout directly, so it equals the official tensors on
square grids and stays well defined on rectangular ones.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def build_2d_sincos_pos_emb(h: int, w: int, dim: int, temperature: float = 10000.0) -> torch.Tensor:
    """Return the (1, dim, h, w) embedding [sin(r*w_k), cos(r*w_k), sin(c*w_k), cos(c*w_k)].

    r/c are the row/column indices and w_k = temperature ** (-k / (dim / 4)), k < dim / 4.
    """
    if dim % 4 != 0:
        raise ValueError(f"2D sin-cos position embedding needs dim divisible by 4, got {dim}")
    omega = 1.0 / temperature ** (torch.arange(dim // 4, dtype=torch.float32) / (dim // 4))  # (dim/4,)
    rows = torch.arange(h, dtype=torch.float32)[:, None] * omega  # (h, dim/4)
    cols = torch.arange(w, dtype=torch.float32)[:, None] * omega  # (w, dim/4)
    row_part = torch.cat([rows.sin(), rows.cos()], dim=1)[:, None, :].expand(h, w, dim // 2)
    col_part = torch.cat([cols.sin(), cols.cos()], dim=1)[None, :, :].expand(h, w, dim // 2)
    emb = torch.cat([row_part, col_part], dim=2)  # (h, w, dim)
    return emb.permute(2, 0, 1).unsqueeze(0).contiguous()  # (1, dim, h, w)


def resize_pos_emb(pos_emb: torch.Tensor, size: tuple[int, int], mode: str) -> torch.Tensor:
    """Interpolate a (1, D, h, w) embedding to `size` and flatten it to (1, size[0]*size[1], D).

    `mode` is "bicubic" for patch input adapters and "bilinear" for the semseg input adapter and
    the output adapters, as in the official code (align_corners=False). Same-size calls skip the
    interpolation, which is the identity there.
    """
    if tuple(pos_emb.shape[-2:]) != tuple(size):
        pos_emb = F.interpolate(pos_emb, size=size, mode=mode, align_corners=False)
    return pos_emb.flatten(2).transpose(1, 2)  # (1, N, D)
