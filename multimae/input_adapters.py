"""Input adapters: one per modality, image -> tokens (MultiMAE paper, Sec. 3.1).

* `PatchedInputAdapter` (rgb, depth, any channel count): a Conv2d with kernel = stride = patch
  size, plus the fixed 2D sin-cos position embedding resampled bicubically to the token grid.
* `SemSegInputAdapter`: a 64-d learned class embedding per pixel, then a Conv2d patch projection,
  plus the position embedding resampled bilinearly. The semantic map is given at 1/`stride_level`
  of the image resolution (default 4: a 224 px image comes with a (B, 56, 56) int64 map), so the
  projection kernel is `patch_size // stride_level` (4x4 at stride 4).

Attribute names and creation order (`pos_emb`, [`class_emb`], `proj`) reproduce the official
state-dict keys, so official checkpoints load with `strict=True`.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from .pos_embed import build_2d_sincos_pos_emb, resize_pos_emb

#: Semantic maps enter the model at 1/4 of the image resolution (official); the one place this is set.
SEMSEG_STRIDE = 4


def to_pair(x: int | tuple[int, int]) -> tuple[int, int]:
    return (x, x) if isinstance(x, int) else (int(x[0]), int(x[1]))


class _GridAdapter(nn.Module):
    """Shared geometry: patch size at this modality's stride and the position-embedding grid."""

    pos_mode = "bicubic"

    def __init__(
        self,
        dim_tokens: int,
        stride_level: int,
        patch_size_full: int | tuple[int, int],
        image_size: int | tuple[int, int],
        learnable_pos_emb: bool,
    ) -> None:
        super().__init__()
        self.dim_tokens = dim_tokens
        self.stride_level = stride_level
        self.patch_size_full = to_pair(patch_size_full)
        self.image_size = to_pair(image_size)
        self.P_H = max(1, self.patch_size_full[0] // stride_level)
        self.P_W = max(1, self.patch_size_full[1] // stride_level)
        h = self.image_size[0] // (stride_level * self.P_H)
        w = self.image_size[1] // (stride_level * self.P_W)
        pos = build_2d_sincos_pos_emb(h, w, dim_tokens)  # (1, D, h, w)
        if learnable_pos_emb:
            pos = torch.zeros_like(pos)
            nn.init.trunc_normal_(pos, std=0.02)
        self.pos_emb = nn.Parameter(pos, requires_grad=learnable_pos_emb)

    def token_grid(self, h: int, w: int, name: str) -> tuple[int, int]:
        if h % self.P_H or w % self.P_W:
            raise ValueError(f"input '{name}' of size {h}x{w} is not divisible by its patch size {self.P_H}x{self.P_W}")
        return h // self.P_H, w // self.P_W

    def add_pos_emb(self, x: torch.Tensor) -> torch.Tensor:
        """(B, D, nh, nw) projected patches -> (B, nh*nw, D) tokens with position embedding."""
        nh, nw = x.shape[-2:]
        pos = resize_pos_emb(self.pos_emb, (nh, nw), self.pos_mode).to(x.dtype)  # (1, N, D)
        return x.flatten(2).transpose(1, 2) + pos

    def no_weight_decay(self) -> set[str]:
        return {"pos_emb"}


class PatchedInputAdapter(_GridAdapter):
    """(B, C, H, W) float image -> (B, H/P * W/P, D) tokens."""

    def __init__(
        self,
        num_channels: int,
        dim_tokens: int,
        stride_level: int = 1,
        patch_size_full: int | tuple[int, int] = 16,
        image_size: int | tuple[int, int] = 224,
        learnable_pos_emb: bool = False,
    ) -> None:
        super().__init__(dim_tokens, stride_level, patch_size_full, image_size, learnable_pos_emb)
        self.num_channels = num_channels
        self.proj = nn.Conv2d(num_channels, dim_tokens, kernel_size=(self.P_H, self.P_W), stride=(self.P_H, self.P_W))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 4 or x.shape[1] != self.num_channels:
            raise ValueError(f"expected a (B, {self.num_channels}, H, W) tensor, got {tuple(x.shape)}")
        self.token_grid(x.shape[2], x.shape[3], "image")
        return self.add_pos_emb(self.proj(x))  # (B, N, D)


class SemSegInputAdapter(_GridAdapter):
    """(B, H/stride, W/stride) int64 class map -> (B, H/P * W/P, D) tokens.

    `emb_padding_idx` (optional) adds one extra class id whose embedding stays zero, e.g. for image
    borders; valid ids are then 0..num_classes (inclusive).
    """

    pos_mode = "bilinear"

    def __init__(
        self,
        num_classes: int,
        dim_tokens: int,
        stride_level: int = SEMSEG_STRIDE,
        patch_size_full: int | tuple[int, int] = 16,
        image_size: int | tuple[int, int] = 224,
        dim_class_emb: int = 64,
        interpolate_class_emb: bool = False,
        emb_padding_idx: int | None = None,
        learnable_pos_emb: bool = False,
    ) -> None:
        super().__init__(dim_tokens, stride_level, patch_size_full, image_size, learnable_pos_emb)
        self.num_classes = num_classes + (1 if emb_padding_idx is not None else 0)
        self.class_emb = nn.Embedding(self.num_classes, dim_class_emb, padding_idx=emb_padding_idx)
        nn.init.trunc_normal_(self.class_emb.weight, std=0.02)
        if emb_padding_idx is not None:
            with torch.no_grad():
                self.class_emb.weight[emb_padding_idx].zero_()
        if interpolate_class_emb:  # average the class embeddings of a patch, then a 1x1 conv
            self.proj = nn.Sequential(
                nn.Upsample(scale_factor=(1 / self.P_H, 1 / self.P_W), mode="bilinear"),
                nn.Conv2d(dim_class_emb, dim_tokens, kernel_size=1),
            )
        else:
            self.proj = nn.Conv2d(
                dim_class_emb, dim_tokens, kernel_size=(self.P_H, self.P_W), stride=(self.P_H, self.P_W)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 3 or x.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8):
            raise ValueError(
                f"semseg input must be a (B, H/{self.stride_level}, W/{self.stride_level}) "
                f"integer class map, got {tuple(x.shape)} {x.dtype}"
            )
        self.token_grid(x.shape[1], x.shape[2], "semseg")
        emb = self.class_emb(x.long()).permute(0, 3, 1, 2)  # (B, E, h, w)
        return self.add_pos_emb(self.proj(emb))  # (B, N, D)

    def no_weight_decay(self) -> set[str]:
        return {"pos_emb", "class_emb"}
