"""Transformer pieces shared by the encoder and the decoders (MultiMAE paper, Sec. 3.1 and 3.3).

Encoder and decoder self-attention blocks are timm's pre-norm ViT `Block` (its state-dict keys,
`norm1 / attn.qkv / attn.proj / norm2 / mlp.fc1 / mlp.fc2`, equal the official ones). The
decoder's cross-attention (`q / kv / proj`) has no timm counterpart and is defined here. Every
attention layer runs through `F.scaled_dot_product_attention` unless its `fused_attn` flag is
switched off (`set_fused_attn`), which selects the explicit-softmax path the benchmark compares.
"""

from __future__ import annotations

from functools import partial

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.models.vision_transformer import Block

#: LayerNorm of the official model (eps 1e-6 everywhere).
LayerNorm = partial(nn.LayerNorm, eps=1e-6)


def transformer_block(
    dim: int, num_heads: int, mlp_ratio: float = 4.0, drop_path: float = 0.0, qkv_bias: bool = True
) -> Block:
    """A pre-norm ViT block (timm) with the official settings: GELU MLP, LayerNorm eps 1e-6."""
    return Block(
        dim=dim, num_heads=num_heads, mlp_ratio=mlp_ratio, qkv_bias=qkv_bias, drop_path=drop_path, norm_layer=LayerNorm
    )


def key_padding_mask(keep: torch.Tensor | None) -> torch.Tensor | None:
    """(B, M) bool "key is a real token" -> (B, 1, 1, M) boolean attention mask (True = attend)."""
    return None if keep is None else keep[:, None, None, :]


class CrossAttention(nn.Module):
    """Multi-head attention of N queries to M context tokens: (B, N, C), (B, M, C) -> (B, N, C)."""

    def __init__(self, dim: int, num_heads: int = 8, qkv_bias: bool = True) -> None:
        super().__init__()
        if dim % num_heads != 0:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim**-0.5
        self.fused_attn = True
        self.q = nn.Linear(dim, dim, bias=qkv_bias)
        self.kv = nn.Linear(dim, dim * 2, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        """attn_mask: optional (B, 1, 1, M) bool, True where a context token may be attended."""
        B, N, C = x.shape
        M = context.shape[1]
        q = self.q(x).reshape(B, N, self.num_heads, self.head_dim).transpose(1, 2)  # (B, h, N, d)
        kv = self.kv(context).reshape(B, M, 2, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        k, v = kv.unbind(0)  # (B, h, M, d) each
        if self.fused_attn:
            x = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
        else:
            attn = (q * self.scale) @ k.transpose(-2, -1)  # (B, h, N, M)
            if attn_mask is not None:
                attn = attn.masked_fill(~attn_mask, float("-inf"))
            x = attn.softmax(dim=-1) @ v
        return self.proj(x.transpose(1, 2).reshape(B, N, C))


def set_fused_attn(module: nn.Module, enabled: bool) -> int:
    """Switch every attention layer under `module` between SDPA (True) and explicit softmax.

    Returns the number of layers switched.
    """
    n = 0
    for m in module.modules():
        if hasattr(m, "fused_attn") and isinstance(m.fused_attn, bool):
            m.fused_attn = enabled
            n += 1
    return n
