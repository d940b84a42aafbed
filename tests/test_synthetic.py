"""Tests for the synthetic scene source (shards/synthetic.py): determinism, exact geometry, statistics."""

import dataclasses
import hashlib
import math
import subprocess
import sys

import numpy as np
import pytest

from shards.synthetic import (
    CLS_CLASSES,
    SEMSEG_CLASSES,
    Camera,
    Primitive,
    Scene,
    render,
    render_scene,
    sample_scene,
    scene_key,
)

N_SCENES = 50
SIZE = 64
OBJECT0 = SEMSEG_CLASSES.index(CLS_CLASSES[0])


@pytest.fixture(scope="module")
def rendered() -> list[tuple[Scene, dict]]:
    scenes = [sample_scene(11, i) for i in range(N_SCENES)]
    return [(s, render(s, SIZE)) for s in scenes]


def _digest(out: dict) -> str:
    h = hashlib.sha256()
    for key in ("rgb", "depth_gt", "semseg_gt"):
        h.update(np.ascontiguousarray(out[key]).tobytes())
    h.update(str(out["cls"]).encode())
    return h.hexdigest()


def _pixel_rays(camera: Camera, size: int) -> np.ndarray:
    """(size, size, 3) ray directions whose component along the optical axis is 1, from the documented
    camera model: yaw 0 looks along +z and turns toward +x, pitch < 0 looks down, no roll, row 0 on top."""
    cy, sy, cp, sp = math.cos(camera.yaw), math.sin(camera.yaw), math.cos(camera.pitch), math.sin(camera.pitch)
    forward = np.array([sy * cp, sp, cy * cp])
    right = np.array([cy, 0.0, -sy])
    up = np.cross(forward, right)
    assert up[1] > 0
    half = math.tan(camera.fov / 2)
    col = ((np.arange(size) + 0.5) / size * 2 - 1) * half
    row = (1 - (np.arange(size) + 0.5) / size * 2) * half
    return forward + col[None, :, None] * right + row[:, None, None] * up


def _room_depth(scene: Scene, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Independent z-depth to the room's six planes (size, size) and the class of the plane hit."""
    d = _pixel_rays(scene.camera, size)
    o = np.array(scene.camera.position)
    room = scene.room
    with np.errstate(divide="ignore"):
        tx = np.where(d[..., 0] > 0, room.width / 2 - o[0], -room.width / 2 - o[0]) / d[..., 0]
        ty = np.where(d[..., 1] > 0, room.height - o[1], -o[1]) / d[..., 1]
        tz = np.where(d[..., 2] > 0, room.depth / 2 - o[2], -room.depth / 2 - o[2]) / d[..., 2]
    depth = np.minimum(np.minimum(tx, ty), tz)
    cls = np.where(ty <= np.minimum(tx, tz), np.where(d[..., 1] > 0, 2, 0), 1)  # ceiling / floor / wall
    return depth, cls


def _sdf(obj: Primitive, p: np.ndarray) -> np.ndarray:
    """Signed distance (N,) of local-frame points to the primitive surface, written from the
    shape definitions in the Primitive docstring."""
    x, y, z = p[:, 0], p[:, 1], p[:, 2]
    rho = np.hypot(x, z)
    if obj.kind == "sphere":
        return np.linalg.norm(p, axis=1) - obj.params[0]
    if obj.kind == "box":
        q = np.abs(p) - np.array(obj.params)
        return np.linalg.norm(np.maximum(q, 0), axis=1) + np.minimum(q.max(1), 0)
    if obj.kind == "cylinder":
        r, hh = obj.params
        q = np.stack([rho - r, np.abs(y) - hh], 1)
        return np.linalg.norm(np.maximum(q, 0), axis=1) + np.minimum(q.max(1), 0)
    if obj.kind == "capsule":
        r, hh = obj.params
        return np.hypot(rho, y - np.clip(y, -hh, hh)) - r
    if obj.kind == "torus":
        big, small = obj.params
        return np.hypot(rho - big, y) - small
    if obj.kind == "cone":  # intersection of the cone's half-space bounds: zero exactly on the surface
        r, hh = obj.params
        side = (rho - r * (hh - y) / (2 * hh)) / math.hypot(1, r / (2 * hh))
        return np.maximum(side, -hh - y)
    raise AssertionError(obj.kind)


# ----------------------------------------------------------------------------- determinism and API


def test_same_seed_and_index_give_identical_arrays() -> None:
    a, b = render_scene(3, 7, SIZE), render_scene(3, 7, SIZE)
    assert a.keys() == b.keys() == {"rgb", "depth_gt", "semseg_gt", "normals_gt", "cls"}
    for key in ("rgb", "depth_gt", "semseg_gt", "normals_gt"):
        np.testing.assert_array_equal(a[key], b[key])
    assert a["cls"] == b["cls"]
    assert _digest(render_scene(3, 8, SIZE)) != _digest(a)
    assert _digest(render_scene(4, 7, SIZE)) != _digest(a)


def test_normals_gt_are_the_geometry_normals_in_camera_coordinates() -> None:
    scene = sample_scene(3, 7)
    out = render(scene, SIZE)
    n = out["normals_gt"]
    assert n.shape == (SIZE, SIZE, 3) and n.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(n, axis=-1), 1.0, atol=1e-5)
    forward, right, up = scene.camera.basis()
    floor = out["semseg_gt"] == 0
    assert floor.sum() > 50
    world_up = np.array([right[1], up[1], -forward[1]])  # (0, 1, 0) in camera coordinates (x right, y up, z back)
    np.testing.assert_allclose(n[floor], np.broadcast_to(world_up, n[floor].shape), atol=1e-6)
    # every visible surface faces the camera: its normal points against the pixel's ray (x right, y up, -z ahead)
    half = np.tan(scene.camera.fov / 2)
    s = ((np.arange(SIZE) + 0.5) / SIZE * 2 - 1) * half
    rays = np.stack(np.broadcast_arrays(s[None, :], -s[:, None], -1.0), -1)  # (H, W, 3)
    assert ((n * rays).sum(-1) < 1e-3).all()


def test_same_output_in_another_process() -> None:
    code = (
        "import sys; sys.path.insert(0, sys.argv[1]); from tests.test_synthetic import _digest; "
        "from shards.synthetic import render_scene; print(_digest(render_scene(5, 123, 64)))"
    )
    import pathlib

    root = str(pathlib.Path(__file__).resolve().parents[1])
    child = subprocess.run([sys.executable, "-c", code, root], capture_output=True, text=True, check=True)
    assert child.stdout.strip() == _digest(render_scene(5, 123, 64))


def test_render_scene_equals_render_of_sampled_scene() -> None:
    full = render(sample_scene(9, 4), 96)
    public = render_scene(9, 4, 96)
    for key in public:
        np.testing.assert_array_equal(public[key], full[key])


@pytest.mark.parametrize("size", [64, 96, 128, 224])
def test_shapes_dtypes_and_ranges(size: int) -> None:
    out = render_scene(0, size, size)
    assert out["rgb"].shape == (size, size, 3) and out["rgb"].dtype == np.uint8
    assert out["depth_gt"].shape == (size, size) and out["depth_gt"].dtype == np.float32
    assert out["semseg_gt"].shape == (size, size) and out["semseg_gt"].dtype == np.uint8
    assert isinstance(out["cls"], int) and 0 <= out["cls"] < len(CLS_CLASSES)
    assert np.isfinite(out["depth_gt"]).all() and (out["depth_gt"] > 0).all()
    assert out["depth_gt"].max() < 15.0  # rooms are at most 9 x 9 x 3.4 m
    assert out["semseg_gt"].max() < len(SEMSEG_CLASSES)
    assert out["rgb"].std() > 10  # a real picture, not a constant


def test_scene_keys_are_dot_free_unique_and_deterministic() -> None:
    keys = [scene_key(seed, index) for seed in (0, 1, 12345) for index in (0, 1, 10**9, 7)]
    assert len(set(keys)) == len(keys)
    assert all("." not in k and "/" not in k for k in keys)
    assert scene_key(1, 7) == scene_key(1, 7) == "syn0001-000000007"


def test_bad_arguments_raise_clear_errors() -> None:
    with pytest.raises(ValueError, match="non-negative"):
        render_scene(-1, 0)
    with pytest.raises(ValueError, match="non-negative"):
        scene_key(0, -5)
    with pytest.raises(ValueError, match="size"):
        render_scene(0, 0, size=0)


# ----------------------------------------------------------------------------- exact geometry


def test_room_pixels_have_exact_plane_depth_and_class(rendered) -> None:
    for scene, out in rendered:
        depth, cls = _room_depth(scene, SIZE)
        room = out["instance"] < 0
        assert room.any()
        np.testing.assert_allclose(out["depth_gt"][room], depth[room], rtol=1e-5)
        # corners of the room are ties between two planes; everywhere else the class must match
        np.testing.assert_array_equal(out["semseg_gt"][room], cls[room])
        # objects are in front of the room surface behind them
        assert (out["depth_gt"][~room] <= depth[~room] * (1 + 1e-6)).all()
        assert (out["semseg_gt"][~room] >= OBJECT0).all() and (out["semseg_gt"][room] < OBJECT0).all()


def test_object_pixels_lie_on_their_object_surface(rendered) -> None:
    kinds_checked = set()
    for scene, out in rendered:
        rays = _pixel_rays(scene.camera, SIZE)
        points = np.array(scene.camera.position) + out["depth_gt"][..., None].astype(np.float64) * rays
        for k, obj in enumerate(scene.objects):
            mask = out["instance"] == k
            if not mask.any():
                continue
            local = (points[mask] - obj.center) @ obj.rotation
            tolerance = 2e-4 if obj.kind == "torus" else 1e-5  # tori are sphere-traced to 1e-4 m
            assert np.abs(_sdf(obj, local)).max() < tolerance, (obj.kind, np.abs(_sdf(obj, local)).max())
            assert (out["semseg_gt"][mask] == SEMSEG_CLASSES.index(obj.kind)).all()
            kinds_checked.add(obj.kind)
    assert kinds_checked == set(CLS_CLASSES)


def test_objects_rest_on_the_floor_inside_the_room(rendered) -> None:
    for scene, _ in rendered:
        for obj in scene.objects:
            r = obj.bounding_radius
            g = np.linspace(-r, r, 81)
            gx, gz = np.meshgrid(g + obj.center[0], g + obj.center[2])
            for height, touches in ((-1e-3, False), (1e-2, True)):  # just below / just above the floor
                world = np.stack([gx.ravel(), np.full(gx.size, height), gz.ravel()], 1)
                inside = _sdf(obj, (world - obj.center) @ obj.rotation) < 0
                assert inside.any() == touches, (obj.kind, height)
            solid = world[inside]
            assert (np.abs(solid[:, 0]) < scene.room.width / 2).all() and (
                np.abs(solid[:, 2]) < scene.room.depth / 2
            ).all()


def test_floor_depth_increases_toward_image_top(rendered) -> None:
    checked = 0
    for _, out in rendered:
        floor = out["semseg_gt"] == SEMSEG_CLASSES.index("floor")
        for col in range(SIZE):
            rows = np.flatnonzero(floor[:, col])  # top to bottom
            if len(rows) > 1:
                assert (np.diff(out["depth_gt"][rows, col]) < 0).all()
                checked += 1
    assert checked > N_SCENES * SIZE // 2


def test_hand_built_scene_has_exact_depths() -> None:
    base = sample_scene(0, 0)
    base = dataclasses.replace(base, room=dataclasses.replace(base.room, width=6.0, depth=8.0, height=3.0))
    camera = Camera(position=(0.0, 1.0, -3.0), yaw=0.0, pitch=0.0, fov=math.radians(60))
    material = base.objects[0].material
    sphere = Primitive("sphere", (0.5,), np.array([0.0, 1.0, 0.0]), np.eye(3), material)
    out = render(dataclasses.replace(base, camera=camera, objects=(sphere,)), 65)
    assert out["depth_gt"][32, 32] == pytest.approx(2.5, abs=1e-6)  # centre ray hits the sphere front
    assert out["semseg_gt"][32, 32] == SEMSEG_CLASSES.index("sphere") and out["cls"] == CLS_CLASSES.index("sphere")

    # A standing torus (ring in the camera's image plane): the centre ray passes through the hole
    # to the wall at z = depth/2, while the ray at the ring's mid-radius hits it at 3 - r.
    lie_down = np.array([[0.0, 0.0, 1.0], [0.0, 1.0, 0.0], [-1.0, 0.0, 0.0]]) @ np.array(
        [[0.0, -1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]]
    )  # ring plane = world xy
    torus = Primitive("torus", (0.5, 0.15), np.array([0.0, 1.0, 0.0]), lie_down, material)
    out = render(dataclasses.replace(base, camera=camera, objects=(torus,)), 65)
    assert out["depth_gt"][32, 32] == pytest.approx(base.room.depth / 2 + 3.0, rel=1e-6)
    assert out["semseg_gt"][32, 32] == SEMSEG_CLASSES.index("wall")
    # column of the pixel whose ray crosses x = 0.5 at z = 0, i.e. tan = 0.5 / 3
    col = int((0.5 / 3 / math.tan(math.radians(30)) + 1) / 2 * 65)
    assert out["semseg_gt"][32, col] == SEMSEG_CLASSES.index("torus")
    assert out["depth_gt"][32, col] == pytest.approx(3.0 - 0.15, abs=0.02)

    box = Primitive("box", (0.4, 0.3, 0.2), np.array([0.0, 1.0, 0.0]), np.eye(3), material)
    out = render(dataclasses.replace(base, camera=camera, objects=(box,)), 65)
    assert out["depth_gt"][32, 32] == pytest.approx(2.8, abs=1e-6)  # front face at z = -0.2


# ----------------------------------------------------------------------------- statistics over scenes


def test_cls_is_the_majority_object_type(rendered) -> None:
    for _, out in rendered:
        counts = np.bincount(out["semseg_gt"].ravel(), minlength=len(SEMSEG_CLASSES))[OBJECT0:]
        assert out["cls"] == int(np.argmax(counts))
        assert counts.max() >= 0.01 * SIZE * SIZE  # at least one object is reasonably visible


def test_every_class_appears(rendered) -> None:
    seen = set()
    for _, out in rendered:
        seen.update(np.unique(out["semseg_gt"]).tolist())
    assert seen == set(range(len(SEMSEG_CLASSES)))
    cls = np.bincount([out["cls"] for _, out in rendered], minlength=len(CLS_CLASSES))
    assert (cls > 0).all(), cls


def test_object_colour_does_not_predict_class(rendered) -> None:
    colours, labels = [], []
    for _, out in rendered:
        for k in np.unique(out["instance"][out["instance"] >= 0]):
            mask = out["instance"] == k
            if mask.sum() >= 20:
                colours.append(out["rgb"][mask].mean(0))
                labels.append(int(out["semseg_gt"][mask][0]))
    colours, labels = np.array(colours), np.array(labels)
    assert len(labels) >= 100
    # nearest class-mean colour, fit on even and scored on odd instances, is close to chance (1/6)
    train, test = np.arange(len(labels)) % 2 == 0, np.arange(len(labels)) % 2 == 1
    classes = np.unique(labels)
    centroids = np.array([colours[train & (labels == c)].mean(0) for c in classes])
    predicted = classes[np.argmin(((colours[test, None] - centroids[None]) ** 2).sum(-1), 1)]
    assert (predicted == labels[test]).mean() < 0.35
    # and each class spans most of the colour range: the class means differ less than their spreads
    spread = np.array([colours[labels == c].std(0).mean() for c in classes])
    assert np.ptp(centroids, axis=0).max() < spread.min()


def test_objects_occlude_each_other(rendered) -> None:
    partially_hidden = 0
    for scene, out in rendered[:20]:
        visible = np.bincount(out["instance"].ravel() + 1, minlength=len(scene.objects) + 1)[1:]
        for k, obj in enumerate(scene.objects):
            alone = (render(dataclasses.replace(scene, objects=(obj,)), SIZE)["instance"] == 0).sum()
            assert visible[k] <= alone
            partially_hidden += int(0 < visible[k] < alone)
    assert partially_hidden >= 5
