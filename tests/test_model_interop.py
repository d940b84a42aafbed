"""Checkpoint interop: official `{'model': ...}` files, DDP/compile prefixes, timm ViT round trip,
Hugging Face Hub layout (config.json + model.safetensors), encoder-only loading for fine-tuning."""

import inspect
import json

import pytest
import timm
import torch

import multimae
from multimae.model import _Backbone

pytestmark = pytest.mark.usefixtures("one_thread")


def test_official_style_checkpoint_loads_strictly(tmp_path):
    src = multimae.create_model("multimae-tiny", depth=2, image_size=32)
    dst = multimae.create_model("multimae-tiny", depth=2, image_size=32)
    path = tmp_path / "checkpoint-1599.pth"
    torch.save({"model": {f"module.{k}": v for k, v in src.state_dict().items()}, "epoch": 1599}, path)
    result = multimae.load_checkpoint(dst, path)
    assert result.missing_keys == [] and result.unexpected_keys == []
    assert all(torch.equal(a, b) for a, b in zip(src.state_dict().values(), dst.state_dict().values()))
    with pytest.raises(RuntimeError, match="Missing key"):
        multimae.load_checkpoint(multimae.create_model("multimae-tiny", depth=3, image_size=32), path)
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        multimae.load_checkpoint(dst, tmp_path / "nope.pth")


def test_pretrained_encoder_loads_into_finetuning_model_at_another_resolution(tmp_path):
    pre = multimae.create_model("multimae-tiny", depth=2, image_size=32)
    pre.save_pretrained(tmp_path)
    vit = multimae.create_model("multivit-tiny", depth=2, image_size=64, objective="depth")
    result = multimae.load_checkpoint(vit, tmp_path, encoder_only=True)
    assert result.missing_keys == []
    assert {k.split(".")[1] for k in result.unexpected_keys} == {"depth", "semseg"}  # adapters vit lacks
    sd = vit.state_dict()
    assert torch.equal(sd["encoder.1.mlp.fc2.weight"], pre.state_dict()["encoder.1.mlp.fc2.weight"])
    assert sd["input_adapters.rgb.pos_emb"].shape == (1, 192, 4, 4)  # fixed sin-cos kept at the new grid
    with pytest.raises(RuntimeError, match="missing"):
        multimae.load_checkpoint(
            multimae.create_model("multivit-tiny", depth=3, image_size=32), tmp_path, encoder_only=True
        )


def test_timm_round_trip_features_equal():
    ours = multimae.create_model("multivit-base", num_classes=5).eval()
    vit = timm.create_model("vit_base_patch16_224", pretrained=False, num_classes=0).eval()
    result = vit.load_state_dict(multimae.to_timm(ours.state_dict()), strict=False)
    assert sorted(result.missing_keys) == ["norm.bias", "norm.weight"]  # MultiMAE has no final norm
    assert result.unexpected_keys == []
    vit.norm = torch.nn.Identity()
    x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        theirs = vit.forward_features(x)  # (B, 1 + 196, D): class token first
        mine, _ = ours.forward_features(x)  # (B, 196 + 1, D): global token last
    torch.testing.assert_close(theirs[:, 1:], mine[:, :-1], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(theirs[:, 0], mine[:, -1], atol=1e-4, rtol=1e-4)
    # and back: timm -> MultiMAE reproduces the encoder (class position folded into the global token)
    back = multimae.create_model("multivit-base", num_classes=5)
    result = multimae.load_checkpoint(back, vit.state_dict())
    assert result.unexpected_keys == []
    mine_sd, back_sd = ours.state_dict(), back.state_dict()
    assert all(torch.equal(mine_sd[k], back_sd[k]) for k in mine_sd if not k.startswith("output_adapters."))


def test_from_timm_folds_class_position_into_global_token():
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=64)
    sd = vit.state_dict()
    with torch.no_grad():
        sd["pos_embed"][:, 0] = 0.25
    out = multimae.from_timm(sd)
    torch.testing.assert_close(out["global_tokens"], sd["cls_token"] + 0.25)
    assert out["input_adapters.rgb.pos_emb"].shape == (1, 192, 4, 4)
    torch.testing.assert_close(out["input_adapters.rgb.pos_emb"][0, :, 1, 2], sd["pos_embed"][0, 1 + 1 * 4 + 2])
    assert not any(k.startswith(("norm.", "head.")) for k in out)


def test_save_pretrained_round_trip_in_hub_layout(tmp_path):
    model = multimae.create_model(
        "multimae-tiny", depth=2, image_size=32, in_domains=("rgb", "depth"), out_domains=("rgb", "depth")
    )
    model.save_pretrained(tmp_path)
    assert {"config.json", "model.safetensors"} <= {p.name for p in tmp_path.iterdir()}
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["in_domains"] == ["rgb", "depth"] and config["depth"] == 2 and config["dim_tokens"] == 192
    loaded = multimae.MultiMAE.from_pretrained(tmp_path)
    x = {"rgb": torch.randn(1, 3, 32, 32), "depth": torch.randn(1, 1, 32, 32)}
    masks = {"rgb": torch.tensor([[0, 1, 1, 0]]), "depth": torch.tensor([[1, 0, 1, 1]])}
    with torch.no_grad():
        a, _ = model.eval()(x, task_masks=masks)
        b, _ = loaded(x, task_masks=masks)
    assert all(torch.equal(a[t], b[t]) for t in a)


def test_backbone_options_are_declared_once_and_reach_signature_config_and_loading(tmp_path):
    backbone = inspect.signature(_Backbone.__init__).parameters
    shared = {n: p.default for n, p in backbone.items() if p.kind is p.KEYWORD_ONLY}
    assert {"image_size", "dim_tokens", "depth", "semseg_stride", "domain_channels"} <= set(shared)
    for cls in (multimae.MultiMAE, multimae.MultiViT):
        presented = inspect.signature(cls.__init__).parameters
        assert {n: presented[n].default for n in shared} == shared  # every option, with its one default
        assert not any(p.kind is p.VAR_KEYWORD for p in presented.values())
        with pytest.raises(TypeError, match="num_layers"):
            cls(num_layers=2)
    with pytest.raises(TypeError):  # the options are keyword-only: no positional argument changes meaning
        multimae.MultiMAE(("rgb",), ("rgb",), 32)
    model = multimae.MultiViT(("rgb",), "dense", None, 3, dim_tokens=64, depth=2, num_heads=2, image_size=32)
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert {**shared, "dim_tokens": 64, "depth": 2, "num_heads": 2, "image_size": 32}.items() <= config.items()
    assert config["objective"] == "dense" and config["num_classes"] == 3
    config.update(model_name="multivit-tiny", training={"steps": 1})  # what an export adds: not passed back
    (tmp_path / "config.json").write_text(json.dumps(config))
    loaded = multimae.MultiViT.from_pretrained(tmp_path)
    assert loaded.dim_tokens == 64 and len(loaded.encoder) == 2 and loaded.objective == "dense"
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), loaded.state_dict().values()))


def test_dpt_aliases_survive_safetensors_round_trip(tmp_path):
    model = multimae.create_model("multivit-tiny", depth=4, image_size=32, objective="depth")
    model.save_pretrained(tmp_path)
    loaded = multimae.MultiViT.from_pretrained(tmp_path)
    head = loaded.head
    assert head.act_postprocess[0] is head.act_1_postprocess and head.scratch.layer_rn[3] is head.scratch.layer4_rn
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), loaded.state_dict().values()))
