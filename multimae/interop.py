"""Checkpoint interop: official MultiMAE files, timm ViT weights, this project's own files.

* `load_checkpoint(model, source)` accepts a path (`.pth`/`.pt` torch file, `.safetensors`, or a
  `save_pretrained` directory) or a state dict. Official checkpoints (`{"model": state_dict}`, the
  pre-training and fine-tuned ones), DDP/`torch.compile` prefixes (`module.`, `_orig_mod.`) and
  timm ViT layouts (detected by their `cls_token` / `blocks.` keys) are recognized. Fixed sin-cos
  position embeddings of another grid are rebuilt, learned ones are resampled bicubically.
* `to_timm(sd)` / `from_timm(sd)`: the official converters' key maps (`global_tokens` <->
  `cls_token`, rgb `pos_emb` (1, D, h, w) <-> `pos_embed` (1, 1 + h*w, D) with a zero class
  position, `input_adapters.rgb.proj` <-> `patch_embed.proj`, `encoder.` <-> `blocks.`). A timm
  class-token position embedding is folded into the global token, as the official converter does.
"""

from __future__ import annotations

import math
import os
import pickle
from collections.abc import Mapping
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

ENCODER_PREFIXES = ("global_tokens", "input_adapters.", "encoder.")


class LoadResult(NamedTuple):
    missing_keys: list[str]
    unexpected_keys: list[str]


class CheckpointError(ValueError):
    """A weights file that cannot be loaded safely (pickled objects, truncated, not a torch file); names the file."""


def load_torch_file(f, name: str | os.PathLike) -> dict:
    """`torch.load(f, weights_only=True)`: tensors and primitives only, never unpickled Python objects.

    f: a path or a binary file object; name: what the error messages call it.
    """
    try:
        return torch.load(f, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise CheckpointError(
            f"{name} is not a weights-only checkpoint: it holds pickled Python objects, which are never loaded "
            "(they can run code); re-save it as a state dict of tensors (or safetensors) from a trusted environment"
        ) from None
    except (RuntimeError, EOFError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(
            f"{name} is not a readable torch checkpoint (truncated or another format: {first})"
        ) from None


def read_state_dict(source: str | os.PathLike | Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Load a state dict from a file/directory or unwrap a checkpoint dict ("model"/"state_dict"/"module")."""
    if isinstance(source, Mapping):
        sd = source
    else:
        path = Path(source)
        if path.is_dir():
            path = path / "model.safetensors"
        if not path.is_file():
            raise FileNotFoundError(f"checkpoint not found: {path}")
        if path.suffix == ".safetensors":
            from safetensors import SafetensorError
            from safetensors.torch import load_file

            try:
                sd = load_file(str(path))
            except SafetensorError as e:
                raise CheckpointError(f"{path} is not a readable safetensors file ({e})") from None
        else:
            sd = load_torch_file(path, path)
    if not isinstance(sd, Mapping):
        raise CheckpointError(f"{source} holds a {type(sd).__name__}, not a state dict")
    for key in ("model", "state_dict", "module"):
        if key in sd and isinstance(sd[key], Mapping):
            sd = sd[key]
            break
    return clean_state_dict(sd)


def clean_state_dict(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Strip DDP (`module.`) and torch.compile (`_orig_mod.`) prefixes."""
    out = {}
    for k, v in sd.items():
        for prefix in ("module.", "_orig_mod."):
            k = k[len(prefix) :] if k.startswith(prefix) else k
        out[k.replace("._orig_mod.", ".")] = v
    return out


def is_timm_layout(sd: Mapping[str, torch.Tensor]) -> bool:
    return "cls_token" in sd or any(k.startswith("blocks.") for k in sd)


def to_timm(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """MultiMAE/MultiViT state dict -> timm `VisionTransformer` (class token, no final norm weights).

    Needs exactly one global token and an rgb input adapter. MultiMAE has no final norm: build the
    timm model without one, `timm.create_model(name, final_norm=False, num_classes=0)`, and load with
    `strict=True` (fine-tuning heads bring their own norm).
    """
    if "global_tokens" not in sd or sd["global_tokens"].shape[1] != 1:
        raise ValueError("to_timm needs a model with exactly one global token (timm has one cls_token)")
    if "input_adapters.rgb.proj.weight" not in sd:
        raise ValueError("to_timm needs an rgb input adapter (input_adapters.rgb.*)")
    out = {"cls_token": sd["global_tokens"]}
    pos = sd["input_adapters.rgb.pos_emb"].flatten(2).transpose(1, 2)  # (1, h*w, D)
    out["pos_embed"] = F.pad(pos, (0, 0, 1, 0))  # zero position for the class token
    out["patch_embed.proj.weight"] = sd["input_adapters.rgb.proj.weight"]
    out["patch_embed.proj.bias"] = sd["input_adapters.rgb.proj.bias"]
    out.update({"blocks." + k[len("encoder.") :]: v for k, v in sd.items() if k.startswith("encoder.")})
    return out


def from_timm(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """timm ViT state dict (class token, learned or fixed pos_embed) -> MultiMAE encoder keys.

    timm's `norm.*`, `fc_norm.*` and `head.*` have no MultiMAE counterpart and are dropped.
    """
    sd = clean_state_dict(sd)
    if "pos_embed" not in sd or "patch_embed.proj.weight" not in sd:
        raise ValueError("not a timm ViT state dict: 'pos_embed' / 'patch_embed.proj.weight' missing")
    pos = sd["pos_embed"]  # (1, [1 +] h*w, D)
    has_cls = "cls_token" in sd
    n_prefix = pos.shape[1] - int(round(math.sqrt(pos.shape[1] - 1))) ** 2 if has_cls else 0
    if n_prefix not in (0, 1):
        raise ValueError(f"pos_embed of shape {tuple(pos.shape)} is not a square grid (+1 class token)")
    grid = pos[:, n_prefix:]
    n = int(round(math.sqrt(grid.shape[1])))
    if n * n != grid.shape[1]:
        raise ValueError(f"pos_embed of shape {tuple(pos.shape)} is not a square grid")
    out = {}
    if has_cls:
        cls = sd["cls_token"]
        out["global_tokens"] = cls + pos[:, :1] if n_prefix == 1 else cls.clone()
    out["input_adapters.rgb.pos_emb"] = grid.transpose(1, 2).reshape(1, -1, n, n)
    out["input_adapters.rgb.proj.weight"] = sd["patch_embed.proj.weight"]
    out["input_adapters.rgb.proj.bias"] = sd["patch_embed.proj.bias"]
    out.update({"encoder." + k[len("blocks.") :]: v for k, v in sd.items() if k.startswith("blocks.")})
    return out


def _resample_pos_embs(sd: dict[str, torch.Tensor], model: nn.Module) -> None:
    """Resample `*.pos_emb` of another grid to the model's (bicubic; fixed sin-cos ones are rebuilt)."""
    params = dict(model.named_parameters())
    for k, v in list(sd.items()):
        if not k.endswith("pos_emb") or k not in params or params[k].shape == v.shape:
            continue
        target = params[k]
        if v.ndim != 4 or v.shape[:2] != target.shape[:2]:
            raise ValueError(f"'{k}': checkpoint shape {tuple(v.shape)} cannot be resampled to {tuple(target.shape)}")
        if not target.requires_grad:  # fixed sin-cos: the model's own tensor is the exact one
            sd[k] = target.detach().clone()
        else:
            sd[k] = F.interpolate(v.float(), size=target.shape[-2:], mode="bicubic", align_corners=False).to(v.dtype)


def load_checkpoint(
    model: nn.Module,
    source: str | os.PathLike | Mapping[str, torch.Tensor],
    strict: bool = True,
    encoder_only: bool = False,
) -> LoadResult:
    """Load official / timm / own weights into a MultiMAE or MultiViT.

    encoder_only: load only global tokens, input adapters and encoder (e.g. a pre-trained
        MultiMAE into a MultiViT with a fresh head). `strict` then applies to the global tokens
        and encoder blocks; input adapters present on one side only (fine-tuning may drop or add
        modalities) are reported in the result, not raised.
    Returns (missing_keys, unexpected_keys).
    """
    sd = read_state_dict(source)
    if is_timm_layout(sd):
        sd = from_timm(sd)
        encoder_only = True
    _resample_pos_embs(sd, model)
    if not encoder_only:
        result = model.load_state_dict(sd, strict=strict)
        return LoadResult(list(result.missing_keys), list(result.unexpected_keys))
    sd = {k: v for k, v in sd.items() if k.startswith(ENCODER_PREFIXES)}
    own = [k for k in model.state_dict() if k.startswith(ENCODER_PREFIXES)]
    result = model.load_state_dict(sd, strict=False)
    missing = [k for k in result.missing_keys if k in own]
    unexpected = list(result.unexpected_keys)
    hard = [k for k in missing + unexpected if not k.startswith("input_adapters.")]
    if strict and hard:
        raise RuntimeError(
            f"checkpoint does not fit the encoder: missing "
            f"{[k for k in missing if k in hard][:8]}, unexpected {[k for k in unexpected if k in hard][:8]}"
        )
    return LoadResult(missing, unexpected)
