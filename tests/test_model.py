"""MultiMAE model: official key/shape parity, shapes for every adapter/size/head, gradients,
forward invariants (masked patches are unseen), bf16 autocast, torch.compile, overfitting."""

from pathlib import Path

import pytest
import torch

import multimae
from multimae.pos_embed import build_2d_sincos_pos_emb

pytestmark = pytest.mark.usefixtures("one_thread")

REF = Path(__file__).parent / "data" / "official_multimae_keys.md"


def official_keys(section: int) -> list[tuple[str, tuple[int, ...]]]:
    """(key, shape) list of a section of the official key reference, in state-dict order."""
    block = REF.read_text().split(f"## {section}.")[1].split("```")[1].strip().splitlines()
    out = []
    for line in block:
        key, shape = line.split("  ")
        out.append((key, tuple(int(s) for s in shape.strip("()").split(",") if s.strip())))
    return out


def batch(b=2, size=32, classes=133, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {
        "rgb": torch.randn(b, 3, size, size, generator=g),
        "depth": torch.randn(b, 1, size, size, generator=g),
        "semseg": torch.randint(0, classes, (b, size // 4, size // 4), generator=g),
    }


# ---------------------------------------------------------------- official parity


def test_multimae_base_state_dict_equals_official_pretraining_model():
    model = multimae.create_model("multimae-base")
    sd = model.state_dict()
    assert [(k, tuple(v.shape)) for k, v in sd.items()] == official_keys(1)
    assert len(sd) == 351
    assert sum(v.numel() for v in sd.values()) == 98_569_360
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == 97_917_072
    frozen = sorted(n for n, p in model.named_parameters() if not p.requires_grad)
    assert frozen == sorted(k for k in sd if k.endswith("pos_emb")) and len(frozen) == 7
    assert not list(model.buffers())


@pytest.mark.parametrize(
    "section,kwargs,total,unique",
    [
        (2, dict(objective="depth", image_size=256), 115_937_857, 105_908_353),  # DPT head
        (3, dict(objective="semseg", image_size=512, num_classes=150), 96_020_886, 96_020_886),  # ConvNeXt head
    ],
)
def test_multivit_base_heads_equal_official_finetuning_models(section, kwargs, total, unique):
    model = multimae.create_model("multivit-base", **kwargs)
    sd = model.state_dict()
    assert [(k, tuple(v.shape)) for k, v in sd.items()] == official_keys(section)
    assert sum(v.numel() for v in sd.values()) == total
    assert sum(p.numel() for p in model.parameters()) == unique


def test_sincos_pos_emb_equals_official_formula():
    def official(h, w, dim, temperature=10000.0):  # transcription of the official MoCo-v3 code
        grid_w, grid_h = torch.meshgrid(
            torch.arange(w, dtype=torch.float32), torch.arange(h, dtype=torch.float32), indexing="ij"
        )
        omega = 1.0 / temperature ** (torch.arange(dim // 4, dtype=torch.float32) / (dim // 4))
        out_w = grid_w.flatten()[:, None] * omega
        out_h = grid_h.flatten()[:, None] * omega
        emb = torch.cat([out_w.sin(), out_w.cos(), out_h.sin(), out_h.cos()], dim=1)
        return emb.reshape(1, h, w, dim).permute(0, 3, 1, 2)

    for n, dim in [(14, 768), (32, 256), (7, 64)]:
        assert torch.equal(build_2d_sincos_pos_emb(n, n, dim), official(n, n, dim))
    rect = build_2d_sincos_pos_emb(3, 5, 8)  # rows in the first half, columns in the second
    assert torch.equal(rect[0, :2, 2, :], rect[0, :2, 2, :1].expand(2, 5))
    assert torch.equal(rect[0, 4:, :, 1], rect[0, 4:, :1, 1].expand(4, 3))


# ---------------------------------------------------------------- shapes


@pytest.mark.parametrize("size", ["tiny", "small", "base", "large"])
def test_pretraining_shapes_for_every_size(size):
    dims = multimae.SIZES[size]
    with torch.device("meta"):  # full depth, no memory
        full = multimae.create_model(f"multimae-{size}")
    assert len(full.encoder) == dims["depth"]
    assert full.encoder[0].attn.qkv.weight.shape == (3 * dims["dim_tokens"], dims["dim_tokens"])
    assert full.encoder[0].attn.num_heads == dims["num_heads"]
    model = multimae.create_model(f"multimae-{size}", image_size=32, depth=1)  # real forward, 1 block
    with torch.no_grad():
        preds, masks = model(batch(1), num_encoded_tokens=5)
    assert {k: tuple(v.shape) for k, v in preds.items()} == {
        "rgb": (1, 3, 32, 32),
        "depth": (1, 1, 32, 32),
        "semseg": (1, 133, 8, 8),
        "norm_rgb": (1, 3, 32, 32),
    }
    assert {k: tuple(v.shape) for k, v in masks.items()} == {"rgb": (1, 4), "depth": (1, 4), "semseg": (1, 4)}


def test_input_adapters_any_channels_rectangular_images_and_padding_index():
    for c in (1, 3, 5):
        a = multimae.PatchedInputAdapter(c, 64, patch_size_full=8, image_size=32)
        assert a(torch.randn(2, c, 32, 48)).shape == (2, 4 * 6, 64)  # pos emb resampled to 4x6
    s = multimae.SemSegInputAdapter(10, 64, stride_level=4, patch_size_full=16, emb_padding_idx=10)
    assert s.class_emb.weight.shape == (11, 64) and s.proj.kernel_size == (4, 4)
    assert torch.all(s.class_emb.weight[10] == 0)
    assert s(torch.randint(0, 11, (2, 16, 24))).shape == (2, 4 * 6, 64)
    with pytest.raises(ValueError, match="integer class map"):
        s(torch.randn(2, 16, 16))
    with pytest.raises(ValueError, match="not divisible"):
        a(torch.randn(1, 5, 30, 32))


def test_output_shapes_on_rectangular_images_and_subsets_of_modalities():
    model = multimae.create_model(
        "multimae-tiny",
        depth=2,
        image_size=32,
        in_domains=("rgb", "semseg"),
        out_domains=("depth", "semseg"),
        num_semseg_classes=7,
    )
    x = {"rgb": torch.randn(2, 3, 32, 48), "semseg": torch.randint(0, 7, (2, 8, 12))}
    preds, masks = model(x, num_encoded_tokens=4)
    assert preds["depth"].shape == (2, 1, 32, 48) and preds["semseg"].shape == (2, 7, 8, 12)
    assert set(masks) == {"rgb", "semseg"}
    preds, masks = model({"semseg": x["semseg"]}, num_encoded_tokens=4)  # semseg alone: 4x size
    assert preds["depth"].shape == (2, 1, 32, 48)
    with pytest.raises(ValueError, match="different image sizes"):
        model({"rgb": x["rgb"], "semseg": x["semseg"][:, :4]})


@pytest.mark.parametrize(
    "kwargs,shape",
    [
        (dict(objective="cls", num_classes=10), (2, 10)),
        (dict(objective="depth"), (2, 1, 32, 32)),
        (dict(objective="depth", patch_size=8), (2, 1, 32, 32)),  # DPT's reassembly assumes 16 px patches: resized back
        (
            dict(objective="semseg", num_classes=5, in_domains=("rgb", "depth"), head_kwargs={"embed_dim": 256}),
            (2, 5, 32, 32),
        ),
        (dict(objective="semseg", head="dpt", num_classes=5), (2, 5, 32, 32)),
    ],
)
def test_finetuning_heads_shapes_and_gradients(kwargs, shape):
    model = multimae.create_model("multivit-tiny", image_size=32, depth=4, **kwargs)
    out = model(batch())
    assert out.shape == shape
    out.float().square().mean().backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    # as in the official DPT, the deepest fusion block has no skip input: its first unit is unused
    assert [n for n in missing if ".refinenet4.resConfUnit1." not in n] == []
    assert len(missing) == (4 if model.head.needs_all_layers else 0)


def test_multivit_accepts_bare_rgb_tensor_and_matches_dict_input():
    model = multimae.create_model("multivit-tiny", depth=2, image_size=32, num_classes=3).eval()
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(model(x), model({"rgb": x}))


# ---------------------------------------------------------------- forward behaviour


def test_gradient_reaches_every_trainable_parameter():
    model = multimae.create_model("multimae-tiny", depth=2, image_size=32)
    x = batch()
    preds, masks = model(x, num_encoded_tokens=6)
    multimae.pretraining_loss(preds, x, masks)["total"].backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert missing == []
    assert all(p.grad is None for n, p in model.named_parameters() if n.endswith("pos_emb"))


def test_masked_patches_are_invisible_to_the_model():
    model = multimae.create_model("multimae-tiny", depth=2, image_size=32).eval()
    x = batch(1)
    masks = {
        "rgb": torch.tensor([[0, 1, 1, 0]]),
        "depth": torch.tensor([[1, 1, 1, 0]]),
        "semseg": torch.tensor([[1, 0, 1, 1]]),
    }
    with torch.no_grad():
        preds, out_masks = model(x, task_masks=masks)
        y = {k: v.clone() for k, v in x.items()}
        y["rgb"][:, :, :16, 16:] += 5.0  # patch 1 of rgb: masked
        y["depth"][:, :, 16:, :16] -= 3.0  # patch 2 of depth: masked
        preds2, _ = model(y, task_masks=masks)
        y["rgb"][:, :, :16, :16] += 1.0  # patch 0 of rgb: visible
        preds3, _ = model(y, task_masks=masks)
    assert all(torch.equal(out_masks[t], masks[t]) for t in masks)
    assert all(torch.allclose(preds[t], preds2[t], atol=1e-6) for t in preds)
    assert not torch.allclose(preds["depth"], preds3["depth"], atol=1e-4)


def test_task_masks_with_unequal_visible_counts_equal_per_sample_runs():
    model = multimae.create_model("multimae-tiny", depth=2, image_size=32).eval()
    x = batch(2)
    masks = {
        "rgb": torch.tensor([[0, 1, 1, 1], [0, 0, 0, 1]]),
        "depth": torch.tensor([[1, 1, 1, 1], [0, 1, 0, 1]]),
        "semseg": torch.tensor([[1, 1, 0, 1], [0, 0, 1, 0]]),
    }  # 2 vs 8 visible tokens
    with torch.no_grad():
        preds, _ = model(x, task_masks=masks)
        for i in range(2):
            alone, _ = model(
                {k: v[i : i + 1] for k, v in x.items()}, task_masks={k: v[i : i + 1] for k, v in masks.items()}
            )
            for t in preds:
                torch.testing.assert_close(preds[t][i : i + 1], alone[t], atol=1e-5, rtol=1e-5)
    with pytest.raises(KeyError, match="semseg"):
        model(x, task_masks={"rgb": masks["rgb"], "depth": masks["depth"]})
    with pytest.raises(ValueError, match="no visible token"):
        model(x, task_masks={k: torch.ones_like(v) for k, v in masks.items()})


def test_no_masking_sees_every_token_and_random_masks_keep_the_budget():
    model = multimae.create_model("multimae-tiny", depth=2, image_size=32)
    x = batch(3)
    _, masks = model(x, mask_inputs=False)
    assert all(int(m.sum()) == 0 for m in masks.values())
    g = torch.Generator().manual_seed(1)
    _, masks = model(x, num_encoded_tokens=7, generator=g)
    visible = sum((m == 0).sum(1) for m in masks.values())
    assert visible.tolist() == [7, 7, 7]


def test_bf16_autocast_forward_backward_is_finite():
    model = multimae.create_model("multimae-tiny", depth=2, image_size=32)
    x = batch()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        preds, masks = model(x, num_encoded_tokens=6, fp32_output_adapters=("semseg",))
        losses = multimae.pretraining_loss(preds, x, masks)
    assert preds["rgb"].dtype == torch.bfloat16 and preds["semseg"].dtype == torch.float32
    losses["total"].backward()
    assert torch.isfinite(losses["total"]) and all(
        torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None
    )


def test_sdpa_and_explicit_softmax_attention_agree():
    model = multimae.create_model("multimae-tiny", depth=2, image_size=32).eval()
    x = batch()
    masks = {
        "rgb": torch.tensor([[0, 1, 1, 1], [0, 0, 0, 1]]),
        "depth": torch.tensor([[1, 0, 1, 1], [0, 1, 0, 1]]),
        "semseg": torch.tensor([[1, 1, 0, 1], [0, 0, 1, 0]]),
    }
    with torch.no_grad():
        fused, _ = model(x, task_masks=masks)
        assert multimae.set_fused_attn(model, False) == 2 + 4 * 3  # encoder + 4 decoders x (xattn + 2 blocks)
        explicit, _ = model(x, task_masks=masks)
    for t in fused:
        torch.testing.assert_close(fused[t], explicit[t], atol=1e-5, rtol=1e-4)


@pytest.mark.slow
def test_torch_compile_matches_eager():
    model = multimae.create_model(
        "multimae-tiny", depth=2, image_size=32, in_domains=("rgb", "depth"), out_domains=("rgb",)
    ).eval()
    x = batch()
    masks = {k: torch.tensor([[0, 1, 1, 0], [1, 0, 1, 1]]) for k in ("rgb", "depth")}  # unequal counts
    compiled = torch.compile(model, backend="aot_eager")
    with torch.no_grad():
        eager, _ = model(x, task_masks=masks)
        comp, _ = compiled(x, task_masks=masks)
    for t in eager:
        torch.testing.assert_close(eager[t], comp[t], atol=1e-5, rtol=1e-5)


def test_param_groups_decay_rules_and_layer_decay():
    model = multimae.create_model("multivit-tiny", depth=4, image_size=32, num_classes=3)
    groups = multimae.param_groups(model, weight_decay=0.05, layer_decay=0.5)
    by_name = {n: g for g in groups for n in g["names"]}
    assert by_name["global_tokens"]["weight_decay"] == 0.0
    assert by_name["encoder.0.attn.qkv.bias"]["weight_decay"] == 0.0
    assert by_name["encoder.0.attn.qkv.weight"]["weight_decay"] == 0.05
    assert by_name["input_adapters.rgb.proj.weight"]["lr_scale"] == 0.5**5
    assert by_name["encoder.3.mlp.fc1.weight"]["lr_scale"] == 0.5**1
    assert by_name["output_adapters.cls.head.weight"]["lr_scale"] == 1.0
    assert "input_adapters.rgb.pos_emb" not in by_name  # frozen
    n_trainable = sum(p.requires_grad for p in model.parameters())
    assert sum(len(g["params"]) for g in groups) == n_trainable
    torch.optim.AdamW(groups, lr=1e-3)  # accepted as optimizer groups


def test_create_model_rejects_unknown_names_and_options():
    with pytest.raises(ValueError, match="unknown model"):
        multimae.create_model("multimae-huge")
    with pytest.raises(ValueError, match="num_layers"):
        multimae.create_model("multimae-tiny", num_layers=3)
    with pytest.raises(ValueError, match="domain_channels"):
        multimae.create_model("multimae-tiny", in_domains=("rgb", "ir"))


@pytest.mark.slow
def test_tiny_model_overfits_one_batch():
    torch.manual_seed(0)
    model = multimae.create_model(
        "multimae-tiny", depth=2, image_size=32, num_semseg_classes=5, decoder_dim=64, decoder_heads=4, decoder_depth=1
    )
    x = batch(4, classes=5)
    x["depth"] = multimae.robust_standardize_depth(x["depth"])
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
    losses = []
    for _ in range(150):  # the same masks every step: memorize one batch
        preds, masks = model(x, num_encoded_tokens=6, generator=torch.Generator().manual_seed(0))
        loss = multimae.pretraining_loss(preds, x, masks)["total"]
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] / 10, (losses[0], losses[-1])
