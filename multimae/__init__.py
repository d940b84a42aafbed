"""MultiMAE (Bachmann et al., ECCV 2022): model, masking, losses, heads and checkpoint interop.

Public API::

    model = multimae.create_model("multimae-base")                  # pre-training (MultiMAE)
    preds, masks = model({"rgb": rgb, "depth": depth, "semseg": semseg}, num_encoded_tokens=98)
    losses = multimae.pretraining_loss(preds, targets, masks)      # {"rgb", "norm_rgb", ..., "total"}
    multimae.load_checkpoint(model, "multimae-b_98_rgb+-depth-semseg_1600e.pth")
    vit = multimae.create_model("multivit-base", task="depth")      # fine-tuning: encoder + head
    multimae.load_checkpoint(vit, "pretrained.pth", encoder_only=True)
    model.save_pretrained("out/"); multimae.MultiMAE.from_pretrained("out/")

The trainer lives in `multimae.train` (see README); this package's model part does not import it.
"""

from .attention import set_fused_attn
from .checkpoint import clean_state_dict, from_timm, load_checkpoint, read_state_dict, to_timm
from .heads import ConvNeXtHead, DPTHead, LinearHead
from .input_adapters import PatchedInputAdapter, SemSegInputAdapter
from .losses import (
    UncertaintyWeighting,
    masked_cross_entropy,
    masked_l1_loss,
    masked_mse_loss,
    pretraining_loss,
    robust_standardize_depth,
)
from .masking import dirichlet_proportions, mask_to_ids, random_masks, select_visible, split_budget
from .model import MultiMAE, MultiViT
from .output_adapters import SpatialOutputAdapter
from .param_groups import param_groups
from .pos_embed import build_2d_sincos_pos_emb
from .registry import SIZES, create_model, list_models
from .tokens import TokenLayout

__all__ = [
    "ConvNeXtHead",
    "DPTHead",
    "LinearHead",
    "MultiMAE",
    "MultiViT",
    "PatchedInputAdapter",
    "SIZES",
    "SemSegInputAdapter",
    "SpatialOutputAdapter",
    "TokenLayout",
    "UncertaintyWeighting",
    "build_2d_sincos_pos_emb",
    "clean_state_dict",
    "create_model",
    "dirichlet_proportions",
    "from_timm",
    "list_models",
    "load_checkpoint",
    "mask_to_ids",
    "masked_cross_entropy",
    "masked_l1_loss",
    "masked_mse_loss",
    "param_groups",
    "pretraining_loss",
    "random_masks",
    "read_state_dict",
    "robust_standardize_depth",
    "select_visible",
    "set_fused_attn",
    "split_budget",
    "to_timm",
]
