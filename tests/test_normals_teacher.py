"""Normals from depth (labeling.teachers.normals_from_depth, NormalsTeacher) and their labeling settings.

The geometry is checked on literal surfaces built from the same pinhole: planes give their analytic normal,
scale does not matter, disparity is inverted first, missing depth gives zero vectors. Then the teacher from the
shipped synthetic-dpt folder, the job's shared depth pass (outside Ray) and the config rules.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from labeling.config import TEACHER_KINDS, ConfigError, load_label_config
from labeling.teachers import (
    DEFAULT_FOV_DEG,
    DEFAULT_TEACHERS,
    KINDS,
    TEACHERS,
    NormalsTeacher,
    depth_for_normals,
    load_teacher,
    normals_from_depth,
)
from shards.synthetic import render_scene, sample_scene

REPO = Path(__file__).resolve().parents[1]
CONFIG = str(REPO / "pipelines" / "pseudolabel.yaml")


def rays(h: int, w: int, fov_deg: float) -> tuple[torch.Tensor, torch.Tensor]:
    """x / z and y / z (H, W) float64 of each pixel centre: the pinhole normals_from_depth assumes."""
    focal = (w / 2) / math.tan(math.radians(fov_deg) / 2)
    x = (torch.arange(w, dtype=torch.float64) + 0.5 - w / 2) / focal
    y = (h / 2 - 0.5 - torch.arange(h, dtype=torch.float64)) / focal
    return x[None, :].expand(h, w), y[:, None].expand(h, w)


def plane_depth(h: int, w: int, fov_deg: float, a: float, bx: float, by: float) -> torch.Tensor:
    """z-depth (H, W) of the plane z = a + bx * X + by * Y (camera coordinates, z = distance along the axis)."""
    x, y = rays(h, w, fov_deg)
    return a / (1 - bx * x - by * y)  # z = a + bx * (x z) + by * (y z)


def angles_deg(n: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    return torch.rad2deg(torch.acos((n.double() * m.double()).sum(-1).clamp(-1, 1)))


# --- geometry ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [(16, 16), (12, 20)])
def test_fronto_parallel_plane_faces_the_camera(size):
    n = normals_from_depth(torch.full(size, 3.5), 60.0)
    assert n.shape == (*size, 3) and n.dtype == torch.float32
    torch.testing.assert_close(n, torch.tensor([0.0, 0.0, 1.0]).expand(*size, 3), rtol=0, atol=1e-6)


@pytest.mark.parametrize("size", [(24, 24), (18, 30)])  # non-square: the vertical fov follows from square pixels
@pytest.mark.parametrize("fov", [40.0, 75.0])
@pytest.mark.parametrize("bx, by", [(0.5, 0.0), (0.0, -0.8), (0.3, 0.4)])
def test_tilted_plane_gives_its_analytic_normal(size, fov, bx, by):
    # -Z - bx X - by Y = a in camera coordinates (Z toward the camera) -> normal (bx, by, 1), facing the camera
    n = normals_from_depth(plane_depth(*size, fov, 2.0, bx, by), fov)
    expected = torch.tensor([bx, by, 1.0]) / math.sqrt(bx * bx + by * by + 1)
    torch.testing.assert_close(n, expected.expand(*size, 3), rtol=0, atol=1e-4)  # border pixels included


def test_global_depth_scale_does_not_change_normals():
    z = 2 + 0.3 * torch.rand(20, 20, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    torch.testing.assert_close(normals_from_depth(7 * z, 55.0), normals_from_depth(z, 55.0), rtol=0, atol=1e-6)


def test_inverse_relative_depth_is_inverted_first():
    z = plane_depth(20, 20, 60.0, 2.0, 0.4, -0.2)
    disparity = (5.0 / z).float()  # inverse relative depth: larger = nearer, unknown scale
    n = normals_from_depth(depth_for_normals(disparity, "inverse_relative"), 60.0)
    torch.testing.assert_close(n, normals_from_depth(z, 60.0), rtol=0, atol=1e-4)
    for meaning in ("metric_m", "relative"):  # depth-like meanings are used as they are
        assert torch.equal(depth_for_normals(z.float(), meaning), z.float())


def test_missing_depth_gives_zero_vectors_and_neighbours_stay_exact():
    z = plane_depth(16, 16, 60.0, 2.0, 0.5, 0.0).float()
    for r, c, v in [(3, 3, 0.0), (8, 9, float("nan")), (12, 4, -1.0), (5, 12, float("inf"))]:
        z[r, c] = v
    n = normals_from_depth(z, 60.0)
    zero = n.norm(dim=-1) == 0
    assert zero.nonzero().tolist() == [[3, 3], [5, 12], [8, 9], [12, 4]]  # exactly the invalid pixels
    expected = torch.tensor([0.5, 0.0, 1.0]) / math.sqrt(1.25)
    torch.testing.assert_close(n[~zero], expected.expand(int((~zero).sum()), 3), rtol=0, atol=1e-4)
    # a valid pixel without a valid neighbour along an axis has no normal; nor has a one-pixel image
    lone = torch.zeros(5, 5)
    lone[2, 2] = 1.0
    assert not normals_from_depth(lone, 60.0).any() and not normals_from_depth(torch.ones(1, 1), 60.0).any()


def test_normals_face_the_camera_and_have_unit_length():
    gen = torch.Generator().manual_seed(1)
    z = 1 + torch.rand(32, 32, generator=gen, dtype=torch.float64)  # rough surface, steep slopes included
    n = normals_from_depth(z, 70.0)
    x, y = rays(32, 32, 70.0)
    to_camera = -torch.stack([x * z, y * z, -z], dim=-1)  # from each point to the camera at the origin
    assert ((n.double() * to_camera).sum(-1) > 0).all()
    torch.testing.assert_close(n.norm(dim=-1), torch.ones(32, 32), rtol=0, atol=1e-6)


def test_exact_synthetic_depth_gives_the_rendered_normals():
    """The camera convention is the synthetic world's: depth_gt and its true fov reproduce normals_gt."""
    scene = render_scene(7, 3, size=96)
    fov = math.degrees(sample_scene(7, 3).camera.fov)
    n = normals_from_depth(torch.from_numpy(scene["depth_gt"]), fov)
    err = angles_deg(n, torch.from_numpy(scene["normals_gt"]))
    assert err.median() < 0.05 and (err < 1).float().mean() > 0.9  # all but the pixels at object edges


# --- the teacher -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def depth_teacher(one_thread):
    return load_teacher("depth", DEFAULT_TEACHERS["depth"], dtype="float32")


def _images() -> list[torch.Tensor]:
    rgb = [render_scene(7, 200 + i, size=64)["rgb"] for i in range(2)]
    return [torch.from_numpy(rgb[0]), torch.from_numpy(np.ascontiguousarray(rgb[1][8:56]))]  # 64x64, 48x64


def test_normals_teacher_from_the_shipped_depth_folder(depth_teacher):
    teacher = load_teacher("normals", DEFAULT_TEACHERS["depth"], dtype="float32", modality="normals_dpt")
    assert isinstance(teacher, NormalsTeacher)
    assert (teacher.kind, teacher.modality, teacher.meaning, teacher.classes) == (
        "normals", "normals_dpt", "camera_normals", None,
    )  # fmt: skip
    p = teacher.producer
    assert (p["meaning"], p["depth_meaning"], p["fov_deg"]) == ("camera_normals", "metric_m", DEFAULT_FOV_DEG)
    assert p["weights_sha256"] == depth_teacher.producer["weights_sha256"] and p["model"] == DEFAULT_TEACHERS["depth"]
    images = _images()
    out = teacher(images)
    assert [tuple(o.shape) for o in out] == [(64, 64, 3), (48, 64, 3)]
    for o in out:
        length = o.norm(dim=-1)
        assert o.dtype == torch.float32 and ((length - 1).abs() < 1e-5).float().mean() > 0.99
        assert ((length - 1).abs() < 1e-5).logical_or(length == 0).all() and o[..., 2].mean() > 0
    # normals from the depth teacher's own output are the same labels (the job's shared depth pass)
    shared = NormalsTeacher(depth_teacher).from_depth(depth_teacher(images))
    assert all(torch.equal(a, b) for a, b in zip(out, shared))
    assert load_teacher("normals", DEFAULT_TEACHERS["depth"], fov_deg=45).producer["fov_deg"] == 45.0


def test_teacher_kinds_come_from_the_teacher_classes():
    assert KINDS == tuple(TEACHERS) and set(TEACHERS) == set(TEACHER_KINDS) == {"depth", "semseg", "normals"}
    assert all(cls.kind == kind for kind, cls in TEACHERS.items())
    with pytest.raises(ValueError, match="fov_deg must be in"):
        load_teacher("normals", DEFAULT_TEACHERS["depth"], fov_deg=180)
    with pytest.raises(ValueError, match="fov_deg is a setting of normals teachers"):
        load_teacher("depth", DEFAULT_TEACHERS["depth"], fov_deg=60)
    with pytest.raises(ValueError, match="is it a depth model|cannot be loaded as depth"):
        load_teacher("normals", DEFAULT_TEACHERS["semseg"])


def test_job_runs_the_depth_network_once_for_depth_and_normals(one_thread):
    """A ShardLabeler (the body of each Ray actor) labeling depth and normals from one depth teacher."""
    from labeling.job import ShardLabeler

    cfg = load_label_config(CONFIG, ["teachers.semseg=null", "teachers.normals.from=depth", "progress=false"])
    labeler = ShardLabeler(cfg)
    assert labeler.teachers["normals"].depth is labeler.teachers["depth"]
    calls = []
    labeler.teachers["depth"].model.register_forward_hook(lambda *_: calls.append(1))
    images = [torch.from_numpy(render_scene(7, i, size=64)["rgb"]) for i in range(3)]
    both, failed = labeler._label(["normals", "depth"], images)  # normals listed first: depth still runs first
    assert failed == {} and len(calls) == 1
    alone, _ = labeler._label(["normals"], images)  # depth committed already: normals run the network themselves
    assert len(calls) == 2 and all(torch.equal(a, b) for a, b in zip(both["normals"], alone["normals"]))


# --- settings --------------------------------------------------------------------------------------


def config(*overrides: str):
    return load_label_config(CONFIG, ["progress=false", *overrides])


def test_from_names_the_depth_teacher(tmp_path):
    cfg = config("teachers.normals.from=depth", "teachers.normals.fov_deg=55")
    t = cfg.teachers["normals"]
    assert (t.kind, t.source, t.fov_deg, cfg.depth_source("normals")) == ("normals", "depth", 55.0, "depth")
    from shards.config import to_yaml

    assert "from: depth" in to_yaml(cfg) and "source" not in to_yaml(cfg)  # YAML says `from`, as written
    # a job without a `depth` teacher: `from: depth` runs the entry's own depth model (default: the shipped one)
    path = tmp_path / "normals.yaml"
    path.write_text("teachers:\n  normals_dpt: {kind: normals, from: depth, fov_deg: 60}\n")
    alone = load_label_config(str(path))
    assert list(alone.teachers) == ["normals_dpt"] and alone.depth_source("normals_dpt") is None
    from labeling.config import resolve_model

    assert resolve_model(alone.teachers["normals_dpt"]) == DEFAULT_TEACHERS["depth"]
    named = config("teachers.depth_b.model=default", "teachers.normals.from=depth_b")
    assert named.depth_source("normals") == "depth_b"


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["teachers.normals.kind=normals"], "teachers.normals.from: a normals teacher needs `from`"),
        (["teachers.normals.from=banana"], "teachers.normals.from: 'banana' is not a depth teacher of this job"),
        (["teachers.normals.from=depth_x"], "'depth_x' is not a depth teacher of this job (its depth teachers: depth)"),
        (["teachers.normals.from=semseg"], "teachers.normals.from: teachers.semseg is a semseg teacher"),
        (["teachers.normals.from=depth", "teachers.normals.fov_deg=0"], "teachers.normals.fov_deg: a field of view"),
        (["teachers.normals.from=depth", "teachers.normals.fov_deg=200"], "0 < fov_deg < 180, got 200"),
        (["teachers.normals.from=depth", "teachers.normals.fov_deg=wide"], "fov_deg: expected a number"),
        (["teachers.depth.fov_deg=60"], "teachers.depth: `from` and `fov_deg` are settings of normals teachers"),
        (["teachers.semseg.from=depth"], "teachers.semseg: `from` and `fov_deg` are settings of normals teachers"),
        (
            ["teachers.normals.from=depth", "teachers.normals.dtype=float32"],
            "teachers.normals: its depth comes from teachers.depth: set model, resolution and dtype there",
        ),
        (["teachers.normals.kind=depth", "teachers.normals.from=depth"], "'normals' is of kind 'normals'"),
    ],
)
def test_bad_normals_settings_name_the_key(overrides, message):
    with pytest.raises(ConfigError) as err:
        config(*overrides)
    assert message in str(err.value)


def test_check_inputs_checks_a_standalone_normals_model(tmp_path):
    from labeling.config import check_inputs
    from shards.format import encode_sample, shard_name, update_manifest
    from shards.writer import ShardWriter

    data = tmp_path / "data"
    with ShardWriter(str(data), shard_name(0), ["rgb"], producer={"source": "synthetic"}) as w:
        w.write("k0", {"rgb": encode_sample("rgb", render_scene(7, 0, size=32)["rgb"])})
    entry = {"kind": "rgb", "ext": "jpg", "dtype": "uint8", "meaning": "srgb", "producer": {"source": "synthetic"}}
    update_manifest(str(data), {"rgb": entry}, shards=[{"name": shard_name(0), "count": 1}], cls_classes=None)
    base = [f"input={data}", "teachers.depth=null", "teachers.semseg=null", "teachers.normals.from=depth"]
    assert check_inputs(config(*base)) == []
    with pytest.raises(ConfigError, match="teachers.normals.model: a 'mask2former' model .* is not a depth model"):
        check_inputs(config(*base, f"teachers.normals.model={DEFAULT_TEACHERS['semseg']}"))


def test_normals_scores_pool_pixels_in_percent():
    """train_teachers.normals_scores: multimae.metrics' angle scores over every pixel, within_* in percent."""
    from labeling.train_teachers import normals_scores

    gt = torch.tensor([0.0, 0.0, 1.0]).expand(4, 4, 3)
    tilted = torch.tensor([math.sin(math.radians(20)), 0.0, math.cos(math.radians(20))]).expand(4, 4, 3)
    s = normals_scores([gt, tilted], [gt, gt])
    assert (s["within_11.25"], s["within_22.5"], s["within_30"]) == (50.0, 100.0, 100.0)
    assert abs(s["mean_angle_deg"] - 10) < 1e-3
