"""Spatial output adapter: the per-task MultiMAE decoder (MultiMAE paper, Sec. 3.3, Fig. 2).

For one output task the decoder
1. projects the encoder's visible tokens and global token(s) to the decoder width (256),
2. puts them back on the full token grid of every input task, filling masked places with a
   learned mask token, and adds task embeddings + fixed sin-cos position embeddings,
3. takes as queries its own task's full grid (visible + mask tokens) -- or mask tokens with
   position and task embedding when the task was not an input -- and cross-attends to the
   visible tokens of all tasks plus the global token(s),
4. runs an MLP, `depth` self-attention blocks, and a linear layer to the pixels of each patch.

Attribute names and order reproduce the official `SpatialOutputAdapter` state-dict keys.
"""

from __future__ import annotations

import torch
import torch.nn as nn
from timm.layers import Mlp

from .attention import CrossAttention, LayerNorm, key_padding_mask, transformer_block
from .input_adapters import to_pair
from .pos_embed import build_2d_sincos_pos_emb, resize_pos_emb
from .tokens import TokenLayout


def unpatchify(x: torch.Tensor, nh: int, nw: int, c: int, ph: int, pw: int) -> torch.Tensor:
    """(B, nh*nw, c*ph*pw) -> (B, c, nh*ph, nw*pw); channel-major inside a patch, as official."""
    B = x.shape[0]
    x = x.reshape(B, nh, nw, c, ph, pw).permute(0, 3, 1, 4, 2, 5)  # (B, c, nh, ph, nw, pw)
    return x.reshape(B, c, nh * ph, nw * pw)


class SpatialOutputAdapter(nn.Module):
    """Cross-attention decoder for one dense output task -> (B, C, H/stride, W/stride)."""

    def __init__(
        self,
        num_channels: int,
        dim_tokens_enc: int,
        task: str,
        context_tasks: list[str],
        stride_level: int = 1,
        patch_size_full: int | tuple[int, int] = 16,
        dim_tokens: int = 256,
        depth: int = 2,
        num_heads: int = 8,
        mlp_ratio: float = 4.0,
        image_size: int | tuple[int, int] = 224,
        use_task_queries: bool = True,
        drop_path: float = 0.0,
    ) -> None:
        super().__init__()
        self.num_channels = num_channels
        self.task = task
        self.stride_level = stride_level
        self.use_task_queries = use_task_queries
        patch = to_pair(patch_size_full)
        self.P_H, self.P_W = max(1, patch[0] // stride_level), max(1, patch[1] // stride_level)
        size = to_pair(image_size)
        grid = (size[0] // (stride_level * self.P_H), size[1] // (stride_level * self.P_W))

        # sorted, as the official ParameterDict lists them
        self.task_embeddings = nn.ParameterDict(
            {t: nn.Parameter(torch.zeros(1, 1, dim_tokens)) for t in sorted(context_tasks)}
        )
        for emb in self.task_embeddings.values():
            nn.init.trunc_normal_(emb, std=0.02)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim_tokens))
        self.pos_emb = nn.Parameter(build_2d_sincos_pos_emb(*grid, dim_tokens), requires_grad=False)

        self.decoder = CrossAttention(dim_tokens, num_heads=num_heads)
        self.context_norm = LayerNorm(dim_tokens)
        self.query_norm = LayerNorm(dim_tokens)
        self.out_norm = LayerNorm(dim_tokens)
        self.mlp = Mlp(dim_tokens, int(dim_tokens * mlp_ratio))
        dpr = [drop_path * i / max(depth - 1, 1) for i in range(depth)]  # stochastic depth decay rule
        self.decoder_transformer = (
            nn.Sequential(*[transformer_block(dim_tokens, num_heads, mlp_ratio, d) for d in dpr])
            if depth > 0
            else nn.Identity()
        )
        self.out_proj = nn.Linear(dim_tokens, num_channels * self.P_H * self.P_W)
        self.proj_context = nn.Linear(dim_tokens_enc, dim_tokens)

    def no_weight_decay(self) -> set[str]:
        return {"pos_emb", "mask_token", "task_embeddings"}

    def _embeddings(self, layout: TokenLayout, grid: tuple[int, int]) -> torch.Tensor:
        """(1, N_all, Dd) task + position embeddings for every input task's token grid."""
        pos = resize_pos_emb(self.pos_emb, grid, "bilinear")  # (1, n, Dd)
        parts = []
        for task, (start, end) in layout.tasks.items():
            if end - start != pos.shape[1]:
                raise ValueError(
                    f"task '{task}' has {end - start} tokens, decoder '{self.task}' expects a {grid[0]}x{grid[1]} grid"
                )
            parts.append(pos + self.task_embeddings[task] if task in self.task_embeddings else pos)
        return torch.cat(parts, dim=1)

    def forward(
        self,
        encoder_tokens: torch.Tensor,
        layout: TokenLayout,
        ids_keep: torch.Tensor,
        ids_restore: torch.Tensor,
        keep_valid: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """encoder_tokens (B, K + G, D_enc) for the K kept tokens and G global tokens;
        ids_keep (B, K), ids_restore (B, N_all); keep_valid (B, K) bool marks padding (False)
        when samples keep different numbers of tokens. Returns (B, C, nh*P_H, nw*P_W)."""
        B, G = encoder_tokens.shape[0], layout.num_global_tokens
        H, W = layout.image_size
        grid = (H // (self.stride_level * self.P_H), W // (self.stride_level * self.P_W))
        ctx = self.proj_context(encoder_tokens)  # (B, K + G, Dd)
        Dd = ctx.shape[-1]
        visible, global_ctx = ctx[:, : ctx.shape[1] - G], ctx[:, ctx.shape[1] - G :]
        mask_token = self.mask_token.to(ctx.dtype)
        if keep_valid is not None:
            visible = torch.where(keep_valid[..., None], visible, mask_token)

        # back on the full grid of all input tasks, mask tokens at masked places
        n_masked = layout.num_task_tokens - visible.shape[1]
        full = torch.cat([visible, mask_token.expand(B, n_masked, Dd)], dim=1)
        full = torch.gather(full, 1, ids_restore[..., None].expand(-1, -1, Dd))  # (B, N_all, Dd)
        emb = self._embeddings(layout, grid)  # (1, N_all, Dd)
        full = full + emb.to(full.dtype)

        if self.use_task_queries and self.task in layout.tasks:
            start, end = layout.tasks[self.task]
            queries = full[:, start:end]  # (B, n, Dd)
        else:
            queries = mask_token + resize_pos_emb(self.pos_emb, grid, "bilinear").to(ctx.dtype)
            if self.task in self.task_embeddings:
                queries = queries + self.task_embeddings[self.task].to(ctx.dtype)
            queries = queries.expand(B, -1, -1)

        context = torch.gather(full, 1, ids_keep[..., None].expand(-1, -1, Dd))  # (B, K, Dd)
        context = torch.cat([context, global_ctx], dim=1)  # (B, K + G, Dd)
        attn_mask = None
        if keep_valid is not None:
            attn_mask = key_padding_mask(torch.cat([keep_valid, keep_valid.new_ones(B, G)], dim=1))

        x = self.decoder(self.query_norm(queries), self.context_norm(context), attn_mask)  # (B, n, Dd)
        x = x + self.mlp(self.out_norm(x))
        x = self.decoder_transformer(x)
        x = self.out_proj(x)  # (B, n, C * P_H * P_W)
        return unpatchify(x, grid[0], grid[1], self.num_channels, self.P_H, self.P_W)
