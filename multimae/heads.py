"""Fine-tuning heads on the MultiViT encoder (MultiMAE paper, Sec. 4 and Appendix C).

* `LinearHead`: LayerNorm + linear classifier on the mean of all encoder tokens (or the last,
  global, token), the official `LinearOutputAdapter`.
* `DPTHead`: the DPT dense head (Ranftl et al., 2021) on four encoder layers, for depth
  (`head_type="regression"`) or segmentation (`head_type="semseg"`), the official
  `DPTOutputAdapter`. Like the official module it registers its reassembly convolutions under two
  names (`act_{i}_postprocess` and `act_postprocess.{i-1}`, `scratch.layer{i}_rn` and
  `scratch.layer_rn.{i-1}`); the same tensors appear under both keys, so official fine-tuned
  checkpoints load strictly and parameters are counted once. As officially, `refinenet4` gets
  no skip input, so its `resConfUnit1` is never used (DDP needs `find_unused_parameters=True`
  or `static_graph=True`).
* `ConvNeXtHead`: token projection to 16 sub-patch predictions, 4 ConvNeXt blocks and a 1x1
  classifier, the official `ConvNeXtAdapter` for semantic segmentation.

Every head takes (encoder output, TokenLayout) and returns a tensor: (B, K) logits or
(B, C, H, W) maps at the input image resolution.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import DropPath

from .attention import LayerNorm
from .tokens import TokenLayout


def task_tokens(tokens: torch.Tensor, layout: TokenLayout, tasks: tuple[str, ...]) -> torch.Tensor:
    """(B, N_all + G, D) -> (B, n, D * len(tasks)): the tokens of `tasks`, concatenated channel-wise."""
    missing = [t for t in tasks if t not in layout.tasks]
    if missing:
        raise ValueError(f"head needs input task(s) {missing}, got inputs {list(layout.tasks)}")
    return torch.cat([tokens[:, slice(*layout.tasks[t])] for t in tasks], dim=-1)


class LinearHead(nn.Module):
    """(B, N + G, D) encoder tokens -> (B, num_classes) logits."""

    needs_all_layers = False

    def __init__(
        self, num_classes: int, dim_tokens_enc: int, use_mean_pooling: bool = True, init_scale: float = 1.0
    ) -> None:
        super().__init__()
        self.use_mean_pooling = use_mean_pooling
        self.norm = LayerNorm(dim_tokens_enc)
        self.head = nn.Linear(dim_tokens_enc, num_classes)
        nn.init.trunc_normal_(self.head.weight, std=0.02)
        nn.init.zeros_(self.head.bias)
        self.head.weight.data.mul_(init_scale)

    def forward(self, tokens: torch.Tensor, layout: TokenLayout) -> torch.Tensor:
        x = tokens.mean(dim=1) if self.use_mean_pooling else tokens[:, -1]  # (B, D)
        return self.head(self.norm(x))


class ConvNeXtBlock(nn.Module):
    """Isotropic ConvNeXt block (Liu et al., 2022): dw 7x7 conv, LayerNorm, MLP, residual."""

    def __init__(self, dim: int, drop_path: float = 0.0, layer_scale_init_value: float = 0.0) -> None:
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, kernel_size=7, padding=3, groups=dim)
        self.norm = LayerNorm(dim)
        self.pwconv1 = nn.Linear(dim, 4 * dim)
        self.act = nn.GELU()
        self.pwconv2 = nn.Linear(4 * dim, dim)
        self.gamma = nn.Parameter(layer_scale_init_value * torch.ones(dim)) if layer_scale_init_value > 0 else None
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.dwconv(x).permute(0, 2, 3, 1)  # (B, H, W, C)
        y = self.pwconv2(self.act(self.pwconv1(self.norm(y))))
        if self.gamma is not None:
            y = self.gamma * y
        return x + self.drop_path(y.permute(0, 3, 1, 2))


class ConvNeXtHead(nn.Module):
    """(B, N + G, D) encoder tokens -> (B, num_classes, H, W) segmentation logits."""

    needs_all_layers = False

    def __init__(
        self,
        num_classes: int,
        dim_tokens_enc: int,
        embed_dim: int = 6144,
        preds_per_patch: int = 16,
        main_tasks: tuple[str, ...] = ("rgb",),
        patch_size: int = 16,
        depth: int = 4,
        interpolate_mode: str = "bilinear",
    ) -> None:
        super().__init__()
        side = int(round(preds_per_patch**0.5))
        if side * side != preds_per_patch or embed_dim % preds_per_patch:
            raise ValueError(f"preds_per_patch ({preds_per_patch}) must be a square dividing embed_dim ({embed_dim})")
        self.main_tasks = tuple(main_tasks)
        self.patch_size = patch_size
        self.side = side
        self.class_dim = embed_dim // preds_per_patch
        self.interpolate_mode = interpolate_mode
        self.blocks = nn.Sequential(*[ConvNeXtBlock(self.class_dim) for _ in range(depth)])
        self.final_layer = nn.Conv2d(self.class_dim, num_classes, 1)
        self.proj_dec = nn.Linear(dim_tokens_enc * len(self.main_tasks), embed_dim)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)

    def forward(self, tokens: torch.Tensor, layout: TokenLayout) -> torch.Tensor:
        H, W = layout.image_size
        nh, nw, s = H // self.patch_size, W // self.patch_size, self.side
        x = self.proj_dec(task_tokens(tokens, layout, self.main_tasks))  # (B, nh*nw, p*c)
        B = x.shape[0]
        x = x.reshape(B, nh, nw, s, s, self.class_dim).permute(0, 5, 1, 3, 2, 4)  # (B, c, nh, s, nw, s)
        x = self.final_layer(self.blocks(x.reshape(B, self.class_dim, nh * s, nw * s)))
        return F.interpolate(x, size=(H, W), mode=self.interpolate_mode)


class _ResidualConvUnit(nn.Module):
    def __init__(self, features: int, use_bn: bool) -> None:
        super().__init__()
        self.use_bn = use_bn
        self.conv1 = nn.Conv2d(features, features, 3, padding=1, bias=not use_bn)
        self.conv2 = nn.Conv2d(features, features, 3, padding=1, bias=not use_bn)
        if use_bn:
            self.bn1, self.bn2 = nn.BatchNorm2d(features), nn.BatchNorm2d(features)
        self.activation = nn.ReLU(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv1(self.activation(x))
        if self.use_bn:
            out = self.bn1(out)
        out = self.conv2(self.activation(out))
        if self.use_bn:
            out = self.bn2(out)
        return out + x


class _FeatureFusionBlock(nn.Module):
    """Adds the skip feature (after a residual unit), refines, upsamples 2x, 1x1 conv."""

    def __init__(self, features: int, use_bn: bool) -> None:
        super().__init__()
        self.out_conv = nn.Conv2d(features, features, kernel_size=1)
        self.resConfUnit1 = _ResidualConvUnit(features, use_bn)
        self.resConfUnit2 = _ResidualConvUnit(features, use_bn)

    def forward(self, x: torch.Tensor, skip: torch.Tensor | None = None) -> torch.Tensor:
        if skip is not None:
            x = x + self.resConfUnit1(skip)
        x = self.resConfUnit2(x)
        x = F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=True)
        return self.out_conv(x)


class _Interpolate(nn.Module):
    def __init__(self, scale_factor: float) -> None:
        super().__init__()
        self.scale_factor = scale_factor

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.interpolate(x, scale_factor=self.scale_factor, mode="bilinear", align_corners=True)


def default_hooks(depth: int) -> list[int]:
    """The four encoder layers DPT reads: [2, 5, 8, 11] for depth 12, [5, 11, 17, 23] for 24 ([0, 0, 0, 1] for 2)."""
    return [max(0, depth // 4 - 1), max(0, depth // 2 - 1), max(0, 3 * depth // 4 - 1), depth - 1]


class DPTHead(nn.Module):
    """List of per-layer encoder outputs (B, N + G, D) -> (B, num_classes, H, W)."""

    needs_all_layers = True

    def __init__(
        self,
        num_classes: int,
        dim_tokens_enc: int,
        hooks: list[int],
        main_tasks: tuple[str, ...] = ("rgb",),
        patch_size: int = 16,
        layer_dims: tuple[int, ...] = (96, 192, 384, 768),
        feature_dim: int = 256,
        use_bn: bool = False,
        head_type: str = "regression",
    ) -> None:
        super().__init__()
        if len(hooks) != 4 or len(layer_dims) != 4:
            raise ValueError(f"DPT needs 4 hooks and 4 layer_dims, got {hooks} and {layer_dims}")
        self.main_tasks = tuple(main_tasks)
        self.patch_size = patch_size
        self.hooks = list(hooks)
        self.scratch = nn.Module()
        for i, d in enumerate(layer_dims, start=1):
            setattr(self.scratch, f"layer{i}_rn", nn.Conv2d(d, feature_dim, 3, padding=1, bias=False))
        self.scratch.layer_rn = nn.ModuleList([getattr(self.scratch, f"layer{i}_rn") for i in range(1, 5)])
        for i in range(1, 5):
            setattr(self.scratch, f"refinenet{i}", _FeatureFusionBlock(feature_dim, use_bn))

        if head_type == "regression":
            self.head = nn.Sequential(
                nn.Conv2d(feature_dim, feature_dim // 2, 3, padding=1),
                _Interpolate(2),
                nn.Conv2d(feature_dim // 2, 32, 3, padding=1),
                nn.ReLU(True),
                nn.Conv2d(32, num_classes, 1),
            )
        elif head_type == "semseg":
            self.head = nn.Sequential(
                nn.Conv2d(feature_dim, feature_dim, 3, padding=1, bias=False),
                nn.BatchNorm2d(feature_dim) if use_bn else nn.Identity(),
                nn.ReLU(True),
                nn.Dropout(0.1, False),
                nn.Conv2d(feature_dim, num_classes, 1),
                _Interpolate(2),
            )
        else:
            raise ValueError(f"DPT head_type must be 'regression' or 'semseg', got '{head_type}'")

        d_in = dim_tokens_enc * len(self.main_tasks)
        self.act_1_postprocess = nn.Sequential(  # 4x upsampling
            nn.Conv2d(d_in, layer_dims[0], 1), nn.ConvTranspose2d(layer_dims[0], layer_dims[0], 4, stride=4)
        )
        self.act_2_postprocess = nn.Sequential(  # 2x upsampling
            nn.Conv2d(d_in, layer_dims[1], 1), nn.ConvTranspose2d(layer_dims[1], layer_dims[1], 2, stride=2)
        )
        self.act_3_postprocess = nn.Sequential(nn.Conv2d(d_in, layer_dims[2], 1))
        self.act_4_postprocess = nn.Sequential(  # 2x downsampling
            nn.Conv2d(d_in, layer_dims[3], 1), nn.Conv2d(layer_dims[3], layer_dims[3], 3, stride=2, padding=1)
        )
        self.act_postprocess = nn.ModuleList(
            [self.act_1_postprocess, self.act_2_postprocess, self.act_3_postprocess, self.act_4_postprocess]
        )

    def forward(self, layers: list[torch.Tensor], layout: TokenLayout) -> torch.Tensor:
        H, W = layout.image_size
        nh, nw = H // self.patch_size, W // self.patch_size
        feats = []
        for i, hook in enumerate(self.hooks):
            x = task_tokens(layers[hook], layout, self.main_tasks)  # (B, nh*nw, D')
            x = x.transpose(1, 2).reshape(x.shape[0], -1, nh, nw)  # (B, D', nh, nw)
            feats.append(self.scratch.layer_rn[i](self.act_postprocess[i](x)))
        # feats are at 1/4, 1/8, 1/16 and 1/32 of the image (patch size 16)
        path = self.scratch.refinenet4(feats[3])  # (B, F, H/16, W/16)
        path = self.scratch.refinenet3(path, feats[2])  # (B, F, H/8, W/8)
        path = self.scratch.refinenet2(path, feats[1])  # (B, F, H/4, W/4)
        path = self.scratch.refinenet1(path, feats[0])  # (B, F, H/2, W/2)
        out = self.head(path)  # (B, num_classes, H, W) at patch 16; (32 / patch) x that otherwise
        if out.shape[-2:] != (H, W):  # the fixed 4x/2x/1x/0.5x reassembly assumes 16 px patches
            out = F.interpolate(out, size=(H, W), mode="bilinear", align_corners=False)
        return out
