"""MultiMAE (Bachmann et al., ECCV 2022): model, masking, losses, metrics, heads and checkpoint interop.

Public API::

    model = multimae.create_model("multimae-base")                  # pre-training (MultiMAE)
    preds, masks = model({"rgb": rgb, "depth": depth, "semseg": semseg}, num_encoded_tokens=98)
    losses = multimae.pretraining_loss(preds, targets, masks)      # {"rgb", "norm_rgb", ..., "total"}
    multimae.load_checkpoint(model, "multimae-b_98_rgb+-depth-semseg_1600e.pth")
    vit = multimae.create_model("multivit-base", objective="depth")  # fine-tuning: encoder + head
    multimae.load_checkpoint(vit, "pretrained.pth", encoder_only=True)
    model.save_pretrained("out/"); multimae.MultiMAE.from_pretrained("out/")

Vocabulary: a *task* is a modality the model encodes or predicts (rgb, depth, semseg), as in the paper and
the official code (`task_masks`, `sample_tasks_uniformly`, `task_embeddings`); an *objective* is what a run
trains for (pretrain, cls, semseg, depth). The trainer lives in `multimae.train`; the model never imports it.

Names are imported on first use, so `import multimae.train.cli` (config checks) does not load torch.
"""

from importlib import import_module
from typing import Any

_EXPORTS = {
    "attention": ["set_fused_attn"],
    "heads": ["ConvNeXtHead", "DPTHead", "LinearHead"],
    "input_adapters": ["PatchedInputAdapter", "SemSegInputAdapter"],
    "interop": ["CheckpointError", "clean_state_dict", "from_timm", "load_checkpoint", "read_state_dict", "to_timm"],
    "losses": [
        "UncertaintyWeighting",
        "berhu_loss",
        "finetune_loss",
        "masked_cross_entropy",
        "masked_l1_loss",
        "masked_mse_loss",
        "pretraining_loss",
        "robust_standardize_depth",
    ],
    "masking": ["dirichlet_proportions", "mask_to_ids", "random_masks", "select_visible", "split_budget"],
    "model": ["MultiMAE", "MultiViT"],
    "output_adapters": ["SpatialOutputAdapter"],
    "param_groups": ["param_groups"],
    "pos_embed": ["build_2d_sincos_pos_emb"],
    "precision": ["autocast_dtype"],
    "registry": ["SIZES", "create_model", "list_models"],
    "tokens": ["TokenLayout"],
}
_WHERE = {name: module for module, names in _EXPORTS.items() for name in names}
__all__ = sorted(_WHERE)


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module 'multimae' has no attribute {name!r}")
    value = getattr(import_module(f".{_WHERE[name]}", __name__), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return __all__
