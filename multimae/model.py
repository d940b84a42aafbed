"""The MultiMAE pre-training model and the MultiViT fine-tuning model (MultiMAE paper, Sec. 3).

`MultiMAE`: input adapters -> multi-modal masking -> ViT encoder (pre-norm blocks, no final norm,
global token(s) appended after the modality tokens) -> one spatial decoder per output task.
`MultiViT`: the same input adapters and encoder without masking, plus one fine-tuning head.

Both keep the official module names, so `create_model("multimae-base").state_dict()` has exactly
the keys and shapes of the official pre-training model, and both save/load in Hugging Face Hub
layout (`save_pretrained(dir)` / `from_pretrained(dir)`: `config.json` + `model.safetensors`).
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Sequence

import torch
import torch.nn as nn
from huggingface_hub import PyTorchModelHubMixin

from shards import modalities

from .attention import key_padding_mask, transformer_block
from .heads import ConvNeXtHead, DPTHead, LinearHead, default_hooks
from .input_adapters import SEMSEG_STRIDE, PatchedInputAdapter, SemSegInputAdapter
from .masking import mask_to_ids, random_masks
from .output_adapters import SpatialOutputAdapter
from .tokens import TokenLayout


def default_channels() -> dict[str, int]:
    """Channels of the registered value kinds (rgb 3, depth 1, normals 3, ...); other names need `domain_channels`."""
    entries = [modalities.get(k) for k in modalities.kinds()]
    return {m.kind: m.channels for m in entries if m.channels is not None}


def _class_map(domain: str) -> bool:
    """A domain fed as a class-id map (semseg): class embedding in, per-class logits out, at 1/semseg_stride."""
    entry = modalities.find(domain)
    return entry is not None and entry.input_adapter == "semseg"


HUB_TAGS = dict(library_name="multimae-toolkit", tags=["multimae", "vision"], license="apache-2.0")


def init_weights(model: nn.Module) -> None:
    """The official MultiMAE initialization, applied once to the whole model.

    Linear: xavier-uniform (qkv / kv with the fan of one of q, k, v), zero bias; LayerNorm: 1, 0;
    Conv2d patch projections (`*.proj`): xavier-uniform on the flattened kernel, like nn.Linear.
    """
    for name, m in model.named_modules():
        if isinstance(m, nn.Linear):
            fan_out = (
                m.weight.shape[0] // 3
                if name.endswith("qkv")
                else (m.weight.shape[0] // 2 if name.endswith(".kv") else m.weight.shape[0])
            )
            bound = math.sqrt(6.0 / (fan_out + m.weight.shape[1]))
            nn.init.uniform_(m.weight, -bound, bound)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Conv2d) and ".proj" in name:
            nn.init.xavier_uniform_(m.weight.view(m.weight.shape[0], -1))


class _Backbone(nn.Module):
    """Input adapters, global tokens and the ViT encoder shared by MultiMAE and MultiViT.

    Its keyword arguments are the options both models take (see `MultiMAE`); each model's constructor takes
    them as ``**backbone`` and presents them in its signature (`_takes_backbone_options`). The encoder is built
    by `_build_encoder`, after the model's own adapters or head: the modules keep the official order.
    """

    def __init__(
        self,
        in_domains: Sequence[str],
        *,
        image_size: int = 224,
        patch_size: int = 16,
        dim_tokens: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
        num_global_tokens: int = 1,
        num_semseg_classes: int = 133,
        semseg_stride: int = SEMSEG_STRIDE,
        dim_class_emb: int = 64,
        emb_padding_idx: int | None = None,
        drop_path: float = 0.0,
        domain_channels: dict[str, int] | None = None,
    ) -> None:
        super().__init__()
        self.image_size, self.patch_size, self.dim_tokens, self.depth = image_size, patch_size, dim_tokens, depth
        self.num_semseg_classes, self.semseg_stride = num_semseg_classes, semseg_stride
        self.channels = {**default_channels(), **(domain_channels or {})}
        self._encoder_options = dict(num_heads=num_heads, mlp_ratio=mlp_ratio, drop_path=drop_path)
        adapters = {}
        for domain in in_domains:
            if _class_map(domain):
                adapters[domain] = SemSegInputAdapter(
                    num_semseg_classes,
                    dim_tokens,
                    stride_level=semseg_stride,
                    patch_size_full=patch_size,
                    image_size=image_size,
                    dim_class_emb=dim_class_emb,
                    emb_padding_idx=emb_padding_idx,
                )
            elif domain in self.channels:
                adapters[domain] = PatchedInputAdapter(
                    self.channels[domain], dim_tokens, patch_size_full=patch_size, image_size=image_size
                )
            else:
                known = sorted(self.channels) + [k for k in modalities.kinds() if _class_map(k)]
                raise ValueError(
                    f"unknown input domain '{domain}': give its channel count in domain_channels (known: {known})"
                )
        if not adapters:
            raise ValueError("in_domains must name at least one input modality")
        self.num_global_tokens = num_global_tokens
        self.input_adapters = nn.ModuleDict(adapters)
        self.global_tokens = nn.Parameter(torch.zeros(1, num_global_tokens, dim_tokens))

    def _build_encoder(self) -> None:
        o = self._encoder_options
        dpr = [o["drop_path"] * i / max(self.depth - 1, 1) for i in range(self.depth)]  # stochastic depth decay
        self.encoder = nn.ModuleList(
            [transformer_block(self.dim_tokens, o["num_heads"], o["mlp_ratio"], d) for d in dpr]
        )

    def no_weight_decay(self) -> set[str]:
        """Parameter names excluded from weight decay (official list)."""
        names = {"global_tokens"}
        for group in ("input_adapters", "output_adapters"):
            for task, adapter in getattr(self, group, {}).items():
                if hasattr(adapter, "no_weight_decay"):
                    names |= {f"{group}.{task}.{n}" for n in adapter.no_weight_decay()}
        return names

    def tokenize(self, x: dict[str, torch.Tensor] | torch.Tensor) -> tuple[dict[str, torch.Tensor], TokenLayout]:
        """Run the input adapters on the known modalities of `x` (a bare tensor means rgb).

        Returns {task: (B, n_t, D)} and the token layout; keys of `x` without an input adapter
        are ignored (targets may travel in the same dict).
        """
        x = {"rgb": x} if isinstance(x, torch.Tensor) else x
        present = [d for d in self.input_adapters if d in x]
        if not present:
            raise ValueError(
                f"no input modality of the model ({list(self.input_adapters)}) in the batch keys {list(x)}"
            )
        sizes = {}
        for d in present:
            t, a = x[d], self.input_adapters[d]
            h, w = t.shape[-2:]
            if isinstance(a, SemSegInputAdapter):
                h, w = h * a.stride_level, w * a.stride_level
            sizes[d] = (int(h), int(w))
        if len(set(sizes.values())) > 1:
            raise ValueError(
                f"input modalities imply different image sizes: {sizes} (semseg maps "
                f"are given at 1/stride_level of the image size)"
            )
        tokens = {d: self.input_adapters[d](x[d]) for d in present}
        layout = TokenLayout.from_counts(
            {d: t.shape[1] for d, t in tokens.items()}, sizes[present[0]], self.num_global_tokens
        )
        return tokens, layout

    def encode(
        self, seq: torch.Tensor, attn_mask: torch.Tensor | None = None, return_all_layers: bool = False
    ) -> torch.Tensor | list[torch.Tensor]:
        """(B, L, D) -> (B, L, D) after all blocks, or the list of every block's output."""
        layers = []
        for block in self.encoder:
            seq = block(seq, attn_mask=attn_mask)
            if return_all_layers:
                layers.append(seq)
        return layers if return_all_layers else seq

    def _with_global(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, K, D) -> (B, K + G, D): global tokens appended after the modality tokens."""
        g = self.global_tokens.to(tokens.dtype).expand(tokens.shape[0], -1, -1)
        return torch.cat([tokens, g], dim=1)


def _takes_backbone_options(init: Callable[..., None]) -> Callable[..., None]:
    """Present `_Backbone`'s keyword arguments in place of `init`'s ``**backbone``: one definition of the shared
    options, and a full signature for `help()`, `create_model` and the Hub mixin (which writes config.json
    from it, defaults included, and passes back only the arguments it names)."""
    own = [p for p in inspect.signature(init).parameters.values() if p.kind is not p.VAR_KEYWORD]
    shared = [p for p in inspect.signature(_Backbone.__init__).parameters.values() if p.kind is p.KEYWORD_ONLY]
    init.__signature__ = inspect.signature(init).replace(parameters=own + shared)
    return init


class MultiMAE(_Backbone, PyTorchModelHubMixin, **HUB_TAGS):
    """MultiMAE pre-training model. See `forward` for the call signature (official-compatible).

    Args:
        in_domains / out_domains: modalities encoded / reconstructed; "norm_rgb" adds the
            norm-pixel rgb decoder (official `extra_norm_pix_loss`), built last as officially.
        decoder_dim, decoder_depth, decoder_heads: spatial decoder size (256, 2, 8 in the paper).

    Backbone options (keyword-only, the same in `MultiViT`):
        image_size, patch_size: default image size (position-embedding grid) and patch size at
            full resolution; other sizes work by resampling the position embeddings.
        dim_tokens, depth, num_heads, mlp_ratio: encoder size (see `registry.SIZES`).
        num_global_tokens: learned tokens appended to the encoder input.
        num_semseg_classes, semseg_stride, dim_class_emb, emb_padding_idx: semseg adapter settings.
        drop_path: stochastic depth rate of the encoder.
        domain_channels: channels of extra dense modalities, e.g. {"ir": 1}.
    """

    @_takes_backbone_options
    def __init__(
        self,
        in_domains: Sequence[str] = ("rgb", "depth", "semseg"),
        out_domains: Sequence[str] = ("rgb", "norm_rgb", "depth", "semseg"),
        *,
        decoder_dim: int = 256,
        decoder_depth: int = 2,
        decoder_heads: int = 8,
        **backbone,
    ) -> None:
        in_domains, out_domains = tuple(in_domains), tuple(out_domains)
        super().__init__(in_domains, **backbone)
        channels = {**self.channels, **{d: self.num_semseg_classes for d in out_domains if _class_map(d)}}
        ordered = [d for d in out_domains if d != "norm_rgb"] + (["norm_rgb"] if "norm_rgb" in out_domains else [])
        outputs = {}
        for domain in ordered:
            source = "rgb" if domain == "norm_rgb" else domain
            if source not in channels:
                raise ValueError(f"unknown output domain '{domain}': give its channel count in domain_channels")
            outputs[domain] = SpatialOutputAdapter(
                channels[source],
                self.dim_tokens,
                task=source,
                context_tasks=list(in_domains),
                stride_level=self.semseg_stride if _class_map(source) else 1,
                patch_size_full=self.patch_size,
                dim_tokens=decoder_dim,
                depth=decoder_depth,
                num_heads=decoder_heads,
                image_size=self.image_size,
            )
        self.output_adapters = nn.ModuleDict(outputs)
        self._build_encoder()
        init_weights(self)
        nn.init.trunc_normal_(self.global_tokens, std=0.02)

    def forward(
        self,
        x: dict[str, torch.Tensor] | torch.Tensor,
        mask_inputs: bool = True,
        task_masks: dict[str, torch.Tensor] | None = None,
        num_encoded_tokens: int = 98,
        alphas: float | Sequence[float] = 1.0,
        sample_tasks_uniformly: bool = False,
        generator: torch.Generator | None = None,
        fp32_output_adapters: Sequence[str] = (),
    ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """Mask, encode and decode a batch.

        x: {"rgb": (B,3,H,W) normalized, "depth": (B,1,H,W) standardized,
            "semseg": (B,H/4,W/4) int64} (any subset; a bare tensor means rgb).
        mask_inputs: False encodes every token (masks are all 0).
        task_masks: optional {task: (B, n_t)} masks, 1 = masked, for every input task; samples may
            keep different numbers of tokens. Overrides random masking.
        num_encoded_tokens: visible-token budget per sample, split across input tasks by a
            per-sample Dirichlet(alphas) draw (float, or one alpha per input task).
        sample_tasks_uniformly: first pick a random non-empty subset of input tasks per sample.
        generator: torch.Generator for reproducible masks.
        fp32_output_adapters: tasks whose decoders run with autocast off.

        Returns (preds, masks): preds {task: rgb/norm_rgb (B,3,H,W), depth (B,1,H,W),
        semseg (B,num_classes,H/4,W/4) logits}; masks {input task: (B, n_t) int64, 1 = masked}.
        """
        tokens, layout = self.tokenize(x)
        all_tokens = torch.cat(list(tokens.values()), dim=1)  # (B, N, D)
        B, N, _ = all_tokens.shape
        device = all_tokens.device
        counts = {t: v.shape[1] for t, v in tokens.items()}
        keep_valid = None
        if task_masks is not None:
            masks = self._check_masks(task_masks, counts, B, device)
            ids_keep, ids_restore, keep_valid = mask_to_ids(torch.cat(list(masks.values()), dim=1))
        elif not mask_inputs:
            masks = {t: torch.zeros(B, n, dtype=torch.long, device=device) for t, n in counts.items()}
            ids_restore = torch.arange(N, device=device).expand(B, N)
            ids_keep = ids_restore
        else:
            masks, ids_keep, ids_restore = random_masks(
                counts, B, num_encoded_tokens, alphas, sample_tasks_uniformly, generator, device
            )

        visible = torch.gather(all_tokens, 1, ids_keep[..., None].expand(-1, -1, all_tokens.shape[2]))
        seq = self._with_global(visible)  # (B, K + G, D)
        attn_mask = None
        if keep_valid is not None:
            attn_mask = key_padding_mask(torch.cat([keep_valid, keep_valid.new_ones(B, self.num_global_tokens)], 1))
        encoded = self.encode(seq, attn_mask)

        preds = {}
        for task, adapter in self.output_adapters.items():
            if task in fp32_output_adapters:
                with torch.autocast(device_type=device.type, enabled=False):
                    preds[task] = adapter(encoded.float(), layout, ids_keep, ids_restore, keep_valid)
            else:
                preds[task] = adapter(encoded, layout, ids_keep, ids_restore, keep_valid)
        return preds, masks

    @staticmethod
    def _check_masks(
        task_masks: dict[str, torch.Tensor], counts: dict[str, int], batch: int, device: torch.device
    ) -> dict[str, torch.Tensor]:
        masks = {}
        for task, n in counts.items():
            if task not in task_masks:
                raise KeyError(f"task_masks has no mask for input task '{task}' (got {list(task_masks)})")
            m = torch.as_tensor(task_masks[task], device=device)
            m = m.expand(batch, -1) if m.ndim == 2 and m.shape[0] == 1 else m
            if tuple(m.shape) != (batch, n):
                raise ValueError(f"task_masks['{task}'] has shape {tuple(m.shape)}, expected ({batch}, {n})")
            masks[task] = (m != 0).long()
        if bool((torch.cat(list(masks.values()), 1) == 0).sum(1).eq(0).any()):
            raise ValueError("task_masks leave a sample with no visible token")
        return masks


#: Default head and number of outputs per fine-tuning objective.
OBJECTIVE_DEFAULTS = {"cls": ("linear", 1000), "depth": ("dpt", 1), "semseg": ("convnext", 150), "dense": ("dpt", 1)}


class MultiViT(_Backbone, PyTorchModelHubMixin, **HUB_TAGS):
    """MultiMAE encoder without masking plus one fine-tuning head; `model(x) -> Tensor`.

    Args (the backbone options are MultiMAE's):
        objective: "cls" (logits (B, K)), "depth" ((B, 1, H, W)), "semseg" (logits (B, K, H, W)) or "dense"
            (any dense modality: (B, C, H, W) with C = num_classes, e.g. 3 for normals).
        head: "linear" | "dpt" | "convnext" (default: linear for cls, dpt for depth, convnext for semseg).
        num_classes: outputs of the head (default 1000 / 1 / 150 / 1).
        main_tasks: input tasks whose tokens the dense heads read (default: all in_domains).
        head_kwargs: extra head options, e.g. {"embed_dim": 6144} (ConvNeXt), {"hooks": [...]} (DPT),
            {"use_mean_pooling": False} (linear).
    """

    @_takes_backbone_options
    def __init__(
        self,
        in_domains: Sequence[str] = ("rgb",),
        objective: str = "cls",
        head: str | None = None,
        num_classes: int | None = None,
        *,
        main_tasks: Sequence[str] | None = None,
        head_kwargs: dict | None = None,
        **backbone,
    ) -> None:
        if objective not in OBJECTIVE_DEFAULTS:
            raise ValueError(f"unknown fine-tuning objective '{objective}' (known: {sorted(OBJECTIVE_DEFAULTS)})")
        head = head or OBJECTIVE_DEFAULTS[objective][0]
        num_classes = num_classes if num_classes is not None else OBJECTIVE_DEFAULTS[objective][1]
        in_domains = tuple(in_domains)
        main_tasks = tuple(main_tasks) if main_tasks else in_domains
        super().__init__(in_domains, **backbone)
        self.objective = objective
        kw = dict(head_kwargs or {})
        if head == "linear":
            module = LinearHead(num_classes, self.dim_tokens, **kw)
        elif head == "dpt":
            kw.setdefault("hooks", default_hooks(self.depth))
            kw.setdefault("head_type", "regression" if objective in ("depth", "dense") else "semseg")
            module = DPTHead(num_classes, self.dim_tokens, main_tasks=main_tasks, patch_size=self.patch_size, **kw)
        elif head == "convnext":
            module = ConvNeXtHead(num_classes, self.dim_tokens, main_tasks=main_tasks, patch_size=self.patch_size, **kw)
        else:
            raise ValueError(f"unknown head '{head}' (known: linear, dpt, convnext)")
        self.output_adapters = nn.ModuleDict({objective: module})  # official key: output_adapters.<objective>
        self._build_encoder()
        init_weights(self.input_adapters)
        init_weights(self.encoder)
        nn.init.trunc_normal_(self.global_tokens, std=0.02)

    @property
    def head(self) -> nn.Module:
        return self.output_adapters[self.objective]

    def forward_features(
        self, x: dict[str, torch.Tensor] | torch.Tensor, return_all_layers: bool = False
    ) -> tuple[torch.Tensor | list[torch.Tensor], TokenLayout]:
        """Encoder output (B, N + G, D) (or every layer's) and the token layout, no masking."""
        tokens, layout = self.tokenize(x)
        seq = self._with_global(torch.cat(list(tokens.values()), dim=1))
        return self.encode(seq, return_all_layers=return_all_layers), layout

    def forward(self, x: dict[str, torch.Tensor] | torch.Tensor) -> torch.Tensor:
        """x: {"rgb": (B,3,H,W), ...} (or a bare rgb tensor) -> the head's output tensor."""
        features, layout = self.forward_features(x, return_all_layers=self.head.needs_all_layers)
        return self.head(features, layout)
