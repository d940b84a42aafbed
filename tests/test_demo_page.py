"""The interactive page `multimae-demo` (multimae/demo/): prediction functions, the served page, a real browser.

A tiny pre-training run (64-d, 32 px, patch 8: 16 tokens per modality, 2 steps on real synthetic shards) and the
shipped small teachers; the page is served on a free loopback port and driven by `gradio_client` and headless
Chromium. Nothing reaches any address but 127.0.0.1.
"""

import io
import logging
import os
import shutil
import socket
import struct
import subprocess
import zlib
from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image
from test_train import PRETRAIN, ROOT, cfg_of

from multimae.demo import (
    DemoError,
    ModelSource,
    NoCheckpoint,
    check_teachers,
    load_demo_model,
    load_teachers,
    model_inputs,
    pictures,
    predict,
    sample_targets,
    scene_sample,
    upload_sample,
    visible_masks,
)
from multimae.demo.app import PICTURES, ROWS
from multimae.demo.cli import main as cli_main
from multimae.demo.loading import KINDS
from multimae.demo.predict import MASK_GREY
from multimae.train.checkpoints import CHECKPOINT
from multimae.train.export import export_run
from multimae.train.main import run
from shards.build import build
from shards.sources import synthetic_source
from shards.synthetic import SEMSEG_CLASSES

GRID = 4  # 32 px / patch 8
TOKENS = GRID * GRID


@pytest.fixture(scope="module", autouse=True)
def _threads(one_thread):
    yield


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> str:
    """A 2-step pre-training run on rgb + depth_gt + semseg_gt (the trainer's own test settings)."""
    root = tmp_path_factory.mktemp("demo")
    data = str(root / "data")
    build(synthetic_source(40, size=64, seed=3), data, shard_size=8, progress=False)
    out = str(root / "run")
    run(cfg_of("pretrain-demo.yaml", PRETRAIN + ["train.steps=2"]), data, out)
    return out


@pytest.fixture(scope="module")
def model(run_dir):
    return load_demo_model(run_dir)


@pytest.fixture(scope="module")
def teachers():
    return load_teachers()


@pytest.fixture(scope="module")
def scene(teachers):
    sample = scene_sample(3)
    images = model_inputs(sample, teachers)
    targets, classes = sample_targets(sample, images)
    return sample, images, targets, classes


def png_claiming(width: int, height: int) -> bytes:
    """A tiny PNG whose header claims width x height pixels (a decompression bomb's header)."""
    buf = io.BytesIO()
    Image.new("L", (1, 1)).save(buf, "PNG")
    data = bytearray(buf.getvalue())
    data[16:24] = struct.pack(">II", width, height)  # IHDR width, height
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))  # IHDR CRC over type + data
    return bytes(data)


def truncated_png() -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()[: len(buf.getvalue()) // 2]


def grey_patches(picture: np.ndarray, grid: int = GRID) -> np.ndarray:
    """(grid, grid) bool: which patches of a masked-input picture are entirely the mask grey."""
    p = picture.shape[0] // grid
    tiles = picture.reshape(grid, p, grid, p, 3).transpose(0, 2, 1, 3, 4)  # (grid, grid, p, p, 3)
    return (tiles == MASK_GREY).all(axis=(2, 3, 4))


# ------------------------------------------------------------------------------------------------ functions


def test_model_geometry_and_class_names(model, teachers):
    assert (model.image_size, model.patch_size, model.grid) == (32, 8, GRID)
    assert model.tokens == {"rgb": TOKENS, "depth": TOKENS, "semseg": TOKENS}
    assert model.semseg_classes == SEMSEG_CLASSES and model.step == 2
    assert set(model.out_domains) == {"rgb", "depth", "semseg"}
    check_teachers(model, teachers)  # the shipped semseg teacher has the scenes' classes


def test_predict_shapes_and_exact_visible_tokens(model, scene):
    _, images, targets, classes = scene
    visible = {"rgb": 3, "depth": 5, "semseg": 1}
    pred = predict(model, images, visible, seed=7, targets=targets, target_classes=classes)
    assert pred.visible == visible
    for d, k in visible.items():
        assert pred.masks[d].shape == (GRID, GRID) and int((~pred.masks[d]).sum()) == k
    assert pred.inputs["rgb"].shape == (32, 32, 3) and pred.inputs["rgb"].dtype == np.uint8
    assert pred.inputs["depth"].shape == (32, 32) and pred.inputs["semseg"].shape == (8, 8)
    masked = pred.masked_inputs  # masked patches: 8 x 8 pixels (rgb, depth), 2 x 2 class ids (semseg at 1/4)
    assert int(np.isnan(masked["depth"]).sum()) == (TOKENS - 5) * 64
    assert int((masked["semseg"] == -1).sum()) == (TOKENS - 1) * 4 and not np.isnan(pred.inputs["depth"]).any()
    assert pred.predictions["rgb"].shape == (32, 32, 3) and pred.predictions["rgb"].dtype == np.uint8
    assert pred.predictions["depth"].shape == (32, 32) and np.isfinite(pred.predictions["depth"]).all()
    semseg = pred.predictions["semseg"]
    assert semseg.shape == (8, 8) and semseg.min() >= 0 and semseg.max() < len(SEMSEG_CLASSES)
    # targets: the scene's ground truth (not the teachers' labels), depth standardized like the model's space
    assert pred.targets["semseg"].shape == (32, 32) and set(np.unique(pred.targets["semseg"])) <= set(range(9))
    depth = pred.targets["depth"]
    trimmed = np.sort(depth.ravel())[int(0.1 * depth.size) : int(0.9 * depth.size)]
    assert abs(trimmed.mean()) < 1e-4 and trimmed.std(ddof=1) == pytest.approx(1.0, abs=1e-3)
    pics = pictures(model, pred)
    assert set(pics) == {f"{d} {w}" for d in visible for w in ("input", "prediction", "target")}
    for name, pic in pics.items():
        assert pic.shape == (256, 256, 3) and pic.dtype == np.uint8 and pic.std() > 0, name
    for d in visible:  # masked patches grey, visible ones not
        assert (grey_patches(pics[f"{d} input"]) == pred.masks[d]).all(), d


def test_same_seed_same_result_and_more_tokens_only_add_patches(model, scene):
    _, images, _, _ = scene
    a = predict(model, images, {"rgb": 4, "depth": 2, "semseg": 2}, seed=11)
    b = predict(model, images, {"rgb": 4, "depth": 2, "semseg": 2}, seed=11)
    for d in a.predictions:
        np.testing.assert_array_equal(a.predictions[d], b.predictions[d])
    for d in a.masks:
        np.testing.assert_array_equal(a.masks[d], b.masks[d])
    c = predict(model, images, {"rgb": 9, "depth": 2, "semseg": 2}, seed=11)
    assert (~c.masks["rgb"] >= ~a.masks["rgb"]).all() and int((~c.masks["rgb"]).sum()) == 9
    np.testing.assert_array_equal(c.masks["depth"], a.masks["depth"])  # rgb's count leaves depth's patches
    other = predict(model, images, {"rgb": 4, "depth": 2, "semseg": 2}, seed=12)
    assert any((other.masks[d] != a.masks[d]).any() for d in a.masks)


def test_rgb_only_masks_depth_and_semseg_fully_and_ignores_their_values(model, scene):
    _, images, _, _ = scene
    with_labels = predict(model, images, {"rgb": 6}, seed=3)
    assert with_labels.masks["depth"].all() and with_labels.masks["semseg"].all()
    assert with_labels.visible == {"rgb": 6, "depth": 0, "semseg": 0}
    # fully masked inputs never reach the encoder: leaving them out (zeros) predicts the same
    rgb_alone = predict(model, {"rgb": images["rgb"]}, {"rgb": 6}, seed=3)
    for d in with_labels.predictions:
        np.testing.assert_allclose(with_labels.predictions[d], rgb_alone.predictions[d], atol=1e-5)


def test_masks_are_exact_and_bad_counts_are_refused():
    masks = visible_masks({"rgb": 16, "depth": 16}, {"rgb": 16, "depth": 0}, seed=0)
    assert int(masks["rgb"].sum()) == 0 and int(masks["depth"].sum()) == 16
    with pytest.raises(DemoError, match="17 visible tokens asked, the model has 16"):
        visible_masks({"rgb": 16}, {"rgb": 17}, seed=0)
    with pytest.raises(DemoError, match="every modality is fully masked"):
        visible_masks({"rgb": 16, "depth": 16}, {}, seed=0)


@pytest.mark.parametrize(
    "data, reason",
    [
        (b"", "empty file"),
        (b"this is not an image", "not an image"),
        (png_claiming(12_000, 12_000), "too large: 12000x12000 px"),
        (truncated_png(), "truncated"),
    ],
    ids=["empty", "not-an-image", "huge", "truncated"],
)
def test_bad_images_are_refused_with_the_reason(data, reason):
    with pytest.raises(DemoError, match=f"photo.png: cannot use this image \\({reason}"):
        upload_sample(data, "photo.png")


def test_upload_is_shrunk_and_labelled_by_the_teachers(model, teachers):
    buf = io.BytesIO()
    Image.fromarray(scene_sample(5, size=256).rgb).resize((512, 384)).save(buf, "JPEG")
    sample = upload_sample(buf.getvalue())
    assert sample.rgb.shape == (256, 341, 3) and not sample.truth
    images = model_inputs(sample, teachers)
    assert images["depth"].shape == (256, 341) and images["semseg"].shape == (256, 341)
    with pytest.raises(DemoError, match="no ground-truth depth"):
        model_inputs(sample, teachers, from_truth=True)
    pred = predict(model, images, {"rgb": 4, "depth": 4}, seed=0)  # targets: the pseudo labels
    assert pred.targets["semseg"].shape == (32, 32) and pred.targets["semseg"].min() >= 0


def test_depth_inputs_follow_the_model_depth_space(teachers):
    sample = scene_sample(3, size=64)
    truth = model_inputs(sample, teachers, from_truth=True)["depth"]
    inverse = model_inputs(sample, teachers, from_truth=True, depth_space="inverse_depth")["depth"]
    assert np.allclose(truth, sample.truth["depth"]) and np.allclose(inverse * truth, 1.0, rtol=1e-5)


def test_hub_folder_predicts_like_its_run(model, run_dir, scene, tmp_path):
    hub = export_run(run_dir, str(tmp_path / "hub"))
    from_hub = load_demo_model(hub)
    assert from_hub.tokens == model.tokens and from_hub.semseg_classes == SEMSEG_CLASSES
    _, images, _, _ = scene
    a = predict(model, images, {"rgb": 5, "semseg": 3}, seed=1)
    b = predict(from_hub, images, {"rgb": 5, "semseg": 3}, seed=1)
    for d in a.predictions:
        np.testing.assert_allclose(a.predictions[d], b.predictions[d], atol=1e-5)


def test_model_source_waits_for_and_reloads_the_checkpoint(run_dir, tmp_path):
    folder = tmp_path / "run"
    folder.mkdir()
    source = ModelSource(str(folder))
    with pytest.raises(NoCheckpoint, match=f"{CHECKPOINT} does not exist yet"):
        source.get()
    state = torch.load(os.path.join(run_dir, CHECKPOINT), weights_only=True)
    torch.save(state, folder / CHECKPOINT)
    assert source.get().step == 2 and source.get() is source.get()
    torch.save({**state, "step": 5}, folder / "next.tmp")  # training wrote a newer one (temporary name + rename)
    os.replace(folder / "next.tmp", folder / CHECKPOINT)
    assert source.get().step == 5
    with pytest.raises(DemoError, match="not found"):
        load_demo_model(str(tmp_path / "missing"))


def test_teachers_that_do_not_fit_the_model_are_named(model, teachers):
    other = replace(model, semseg_classes=["sky", "road"])
    with pytest.raises(DemoError, match=r"trained on \[sky, road\] \(2\); pass --teachers"):
        check_teachers(other, teachers)
    with pytest.raises(DemoError, match="the shipped teachers: no depth teacher, but"):
        check_teachers(model, {"semseg": teachers["semseg"]})


def test_teachers_of_a_labeling_config(model, teachers, tmp_path):
    shipped = load_teachers(os.path.join(ROOT, "pipelines", "pseudolabel.yaml"))  # model: default
    assert {k: t.producer["model"] for k, t in shipped.items()} == {k: teachers[k].producer["model"] for k in shipped}
    assert set(shipped) == {"depth", "semseg"} and set(teachers) == {"depth", "semseg", "normals"}
    check_teachers(model, shipped)
    with_normals = tmp_path / "with-normals.yaml"
    with_normals.write_text("teachers:\n  depth: {model: default}\n  normals_dpt: {from: depth, fov_deg: 50}\n")
    both = load_teachers(str(with_normals))
    assert both["normals"].depth is both["depth"] and both["normals"].fov_deg == 50.0  # one depth network


def test_cli_start_up_errors_are_one_line_exit_2(run_dir, tmp_path, capsys):
    depth_only = tmp_path / "depth-only.yaml"
    depth_only.write_text("teachers:\n  depth: {kind: depth, model: default}\n")
    for argv, message in [
        (["/no/such/run"], "/no/such/run not found"),
        ([run_dir, "--teachers", "/no/such.yaml"], "--teachers /no/such.yaml: no such file"),
        ([run_dir, "--teachers", str(depth_only)], f"{depth_only}: no semseg teacher, but {run_dir} takes semseg"),
    ]:
        with pytest.raises(SystemExit) as e:
            cli_main(argv)
        assert e.value.code == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("multimae-demo: error: ") and message in err[0]


# ------------------------------------------------------------------------------------------------ the page


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(run_dir, teachers, tmp_path_factory):
    """The page on a free loopback port, over a copy of the run folder (so tests can take its checkpoint away)."""
    from multimae.demo.app import build_page, serve

    folder = str(tmp_path_factory.mktemp("served") / "run")
    shutil.copytree(run_dir, folder)
    blocks = build_page(ModelSource(folder), teachers)
    url = serve(blocks, "127.0.0.1", free_port(), block=False)
    assert url.startswith("http://127.0.0.1:")
    yield url, folder
    blocks.close()


@pytest.fixture(scope="module")
def client(server, tmp_path_factory):
    from gradio_client import Client
    from huggingface_hub import constants

    with pytest.MonkeyPatch.context() as mp:
        # gradio_client otherwise asks huggingface.co for an agent registry and sends it telemetry
        mp.setattr(constants, "HF_HUB_OFFLINE", True)
        mp.setattr(constants, "HF_HUB_DISABLE_TELEMETRY", True)
        yield Client(server[0], verbose=False, download_files=str(tmp_path_factory.mktemp("downloads")))


def ask(
    client,
    *,
    choice="synthetic scene",
    scene=3,
    upload=None,
    inputs_from="teachers",
    rgb_only=False,
    seed=0,
    visible=(3, 2, 1),
):
    visible = (*visible, *[0] * (len(KINDS) - len(visible)))  # one slider per kind the page draws
    return client.predict(choice, scene, upload, inputs_from, rgb_only, seed, *visible, api_name="/predict")


STATUS, LEGEND = len(PICTURES), len(PICTURES) + 1  # the outputs after the pictures


def picture(result, index: int | str) -> np.ndarray:
    """A picture of the page's outputs, by position or by name ("depth input")."""
    index = PICTURES.index(index) if isinstance(index, str) else index
    path = result[index] if isinstance(result[index], str) else result[index]["path"]
    return np.asarray(Image.open(path).convert("RGB"))


def test_page_predicts_a_scene(client):
    result = ask(client, visible=(3, 2, 1), seed=5)
    assert len(result) == len(PICTURES) + 2  # pictures (inputs, predictions, targets x each kind), status, legend
    drawn = [f"{d} {what}" for what in ROWS for d in ("rgb", "depth", "semseg")]  # the model's modalities
    assert all(result[PICTURES.index(k)] is None for k in PICTURES if k not in drawn)  # normals: not this model's
    pics = [picture(result, k) for k in drawn]
    for pic in pics:
        assert pic.shape == (256, 256, 3) and pic.std() > 0
    for i, k in enumerate((3, 2, 1)):  # the input row: exactly the chosen visible patches
        assert int((~grey_patches(pics[i])).sum()) == k
    assert "scene 3" in result[STATUS] and "rgb 3/16, depth 2/16, semseg 1/16" in result[STATUS]
    assert "floor" in result[LEGEND]
    rgb_only = ask(client, rgb_only=True, visible=(5, 7, 7), inputs_from="scene ground truth")
    assert int((~grey_patches(picture(rgb_only, "rgb input"))).sum()) == 5
    assert all(grey_patches(picture(rgb_only, f"{d} input")).all() for d in ("depth", "semseg"))
    assert "inputs from scene ground truth" in rgb_only[STATUS]


def test_page_reports_bad_input_and_keeps_serving(client, server, tmp_path, caplog):
    from gradio_client import handle_file
    from gradio_client.exceptions import AppError

    _, folder = server
    caplog.set_level(logging.WARNING, logger="multimae.demo")
    cases = [(b"GIF89a but not really", "not an image"), (png_claiming(12_000, 12_000), "too large")]
    for i, (data, reason) in enumerate(cases):
        path = tmp_path / f"bad{i}.png"
        path.write_bytes(data)
        with pytest.raises(AppError, match=f"cannot use this image \\({reason}"):
            ask(client, choice="uploaded image", upload=handle_file(str(path)))
    moved = os.path.join(folder, "moved.pt")
    os.replace(os.path.join(folder, CHECKPOINT), moved)
    try:
        with pytest.raises(AppError, match="does not exist yet"):
            ask(client)
    finally:
        os.replace(moved, os.path.join(folder, CHECKPOINT))
    lines = [r.getMessage() for r in caplog.records if r.name == "multimae.demo" and r.levelno >= logging.WARNING]
    assert len(lines) == 3 and "not an image" in lines[0] and "too large" in lines[1] and CHECKPOINT in lines[2]
    good = tmp_path / "good.jpg"
    Image.fromarray(scene_sample(8).rgb).save(good)
    result = ask(client, choice="uploaded image", upload=handle_file(str(good)))  # still serving
    assert "**good.jpg**" in result[STATUS] and "targets: teacher labels" in result[STATUS]
    assert picture(result, "semseg target").std() > 0


@pytest.mark.slow
def test_page_renders_in_a_real_browser(server, tmp_path):
    chromium = shutil.which("chromium")
    if chromium is None:
        pytest.skip("chromium is not installed (Debian: apt-get install -y chromium; .ci/run installs it)")
    url, _ = server
    flags = [
        chromium,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={tmp_path / 'profile'}",
        "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",  # loopback only
        "--window-size=1280,1600",
        "--virtual-time-budget=10000",  # let the page's scripts render it
    ]
    shot = tmp_path / "page.png"
    subprocess.run([*flags, f"--screenshot={shot}", url], check=True, capture_output=True, timeout=180)
    dom = subprocess.run([*flags, "--dump-dom", url], check=True, capture_output=True, text=True, timeout=180).stdout
    assert "MultiMAE cross-modal demo" in dom and "visible rgb tokens (of 16)" in dom
    pixels = np.asarray(Image.open(shot).convert("RGB"))
    assert pixels.shape == (1600, 1280, 3)
    assert len(np.unique(pixels.reshape(-1, 3), axis=0)) > 1000  # rendered pictures, not a blank page


def test_a_model_with_normals_gets_normals_rows(tmp_path, teachers):
    """A run pre-trained on rgb + normals_gt: the page feeds the scene's exact normals and draws their rows."""
    data = str(tmp_path / "data")
    build(synthetic_source(16, size=64, seed=4, normals=True), data, shard_size=8, progress=False)
    out = str(tmp_path / "run")
    over = [*PRETRAIN, "data.inputs={rgb: rgb, normals: normals_gt}", "model.out_domains=[rgb, normals]"]
    over += ["train.steps=1"]
    run(cfg_of("pretrain-demo.yaml", over), data, out)
    model = load_demo_model(out)
    assert model.in_domains == ["rgb", "normals"] and set(model.out_domains) == {"rgb", "normals"}
    with pytest.raises(DemoError, match="no normals teacher"):
        check_teachers(model, {})
    sample = scene_sample(3)
    assert sample.truth["normals"].shape == (128, 128, 3)
    images = model_inputs(sample, {}, from_truth=True, kinds=("normals",))
    pred = predict(model, images, {"rgb": 4, "normals": 3}, seed=1)
    assert pred.inputs["normals"].shape == (32, 32, 3) and pred.predictions["normals"].shape == (32, 32, 3)
    np.testing.assert_allclose(np.linalg.norm(pred.targets["normals"], axis=-1), 1.0, atol=1e-5)
    masked = pred.masked_inputs["normals"]
    assert np.isnan(masked).any(axis=-1).sum() == (32 * 32) - 3 * 8 * 8  # 3 visible 8 px patches
    pics = pictures(model, pred)
    assert {"normals input", "normals prediction", "normals target"} <= set(pics)
    assert pics["normals target"].shape == (256, 256, 3) and pics["normals target"].std() > 0
    # the shipped normals teacher turns the shipped depth teacher's depth map into normals: one depth network
    check_teachers(model, teachers)
    labels = model_inputs(sample, teachers)
    assert teachers["normals"].depth is teachers["depth"]
    again = teachers["normals"].from_depth([torch.from_numpy(labels["depth"])])[0].numpy()
    np.testing.assert_array_equal(labels["normals"], again)
    norms = np.linalg.norm(labels["normals"], axis=-1)
    assert labels["normals"].shape == (128, 128, 3) and np.allclose(norms[norms > 0], 1.0, atol=1e-5)
