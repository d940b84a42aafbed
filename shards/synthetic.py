"""Synthetic scene source: a procedural small 3D world ray-cast with numpy.

A scene is a box-shaped room (floor, four walls, ceiling) holding 2-6 primitives that rest on the
floor: spheres, boxes, cylinders, cones, tori and capsules, each with a random size, yaw, pose
(cylinders and capsules may lie on their side, tori may stand on edge) and material. Materials
(flat, checker, stripes or noise; random colours) are drawn per object and per room surface from
one distribution, so colour carries no class information. A directional light with cast shadows
plus hemispheric ambient light shades the scene (Lambertian + a little Blinn-Phong); a pinhole
camera with random height, heading, pitch and field of view looks at one "hero" object.

Each pixel casts one ray through its centre. Room surfaces, spheres, boxes, cylinders, cones and
capsules are intersected analytically; tori by sphere tracing their signed distance (error below
0.1 mm). The first hit gives every output at once, so `rgb`, metric z-depth (`depth_gt`), class
(`semseg_gt`) and surface normal (`normals_gt`) are exactly consistent. Work is vectorised over pixels;
Python loops only run over the few objects (and the sphere-tracing steps of a torus).
"""

from __future__ import annotations

import argparse
import colorsys
import math
import time
from dataclasses import dataclass

import numpy as np

#: The ground truth a scene renders, by modality kind (`render_scene` names them <kind>_gt).
GROUND_TRUTH: tuple[str, ...] = ("depth", "semseg", "normals")
SEMSEG_CLASSES: list[str] = ["floor", "wall", "ceiling", "sphere", "box", "cylinder", "cone", "torus", "capsule"]
CLS_CLASSES: list[str] = SEMSEG_CLASSES[3:]  # image-level class = object type covering most pixels
TEXTURES: tuple[str, ...] = ("flat", "checker", "stripes", "noise")

_FLOOR, _WALL, _CEILING = 0, 1, 2
_FIRST_OBJECT_ID = 3  # semseg id of CLS_CLASSES[0]
_T_MIN = 1e-6  # smallest ray parameter that counts as a hit (m)
_SHADOW_BIAS = 1e-3  # shadow rays start this far off the surface, along its normal (m)
_TORUS_TOL = 1e-4  # sphere tracing stops this close to the torus surface (m)
_TORUS_STEPS = 256  # cap for grazing rays; almost all rays finish in far fewer steps
_NOISE_OCTAVES = np.array([1.0, 2.1, 4.3, 8.9])  # frequency multipliers of the noise texture's waves


# ----------------------------------------------------------------------------- scene description


@dataclass(frozen=True, eq=False)
class Material:
    texture: str  # one of TEXTURES
    color_a: np.ndarray  # (3,) linear RGB albedo in [0, 1]
    color_b: np.ndarray  # (3,) second albedo of the pattern
    frequency: float  # pattern cycles per metre
    offset: np.ndarray  # (3,) pattern phase offset (m); keeps checker edges off exact surface planes
    waves: np.ndarray  # (4, 3) unit vectors: stripes run across waves[0], noise sums all four
    specular: float  # Blinn-Phong highlight strength


@dataclass(frozen=True, eq=False)
class Primitive:
    """A shape in its canonical frame (centred at the origin, symmetry axis along y), placed by
    `rotation` (world-from-local, 3x3) and `center` (world position of the local origin).

    params: sphere (r,), box (hx, hy, hz) half extents, cylinder (r, hh) with hh the half height,
    cone (r, hh) with the base at y=-hh and the apex at y=+hh, torus (R, r) major/minor radius
    with the ring in the xz plane, capsule (r, hh) with hh the half length of its axis segment.
    """

    kind: str  # one of CLS_CLASSES
    params: tuple[float, ...]
    center: np.ndarray  # (3,)
    rotation: np.ndarray  # (3, 3)
    material: Material

    @property
    def bounding_radius(self) -> float:
        p = self.params
        if self.kind == "sphere":
            return p[0]
        if self.kind == "box":
            return math.sqrt(p[0] ** 2 + p[1] ** 2 + p[2] ** 2)
        if self.kind in ("cylinder", "cone"):
            return math.hypot(p[0], p[1])
        return p[0] + p[1]  # torus: R + r, capsule: r + hh


@dataclass(frozen=True, eq=False)
class Room:
    width: float  # walls at x = -width/2 and +width/2
    depth: float  # walls at z = -depth/2 and +depth/2
    height: float  # floor at y = 0, ceiling at y = height
    floor: Material
    ceiling: Material
    walls: tuple[Material, Material, Material, Material]  # at -x, +x, -z, +z


@dataclass(frozen=True)
class Camera:
    """Pinhole camera without roll. yaw 0 looks along +z (positive turns toward +x); pitch < 0
    looks down; fov is the vertical (= horizontal, images are square) field of view. Angles in radians."""

    position: tuple[float, float, float]
    yaw: float
    pitch: float
    fov: float

    def basis(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Unit (forward, right, up) vectors in world coordinates."""
        cy, sy, cp, sp = math.cos(self.yaw), math.sin(self.yaw), math.cos(self.pitch), math.sin(self.pitch)
        forward = np.array([sy * cp, sp, cy * cp])
        right = np.array([cy, 0.0, -sy])
        up = np.array([-sy * sp, cp, -cy * sp])
        return forward, right, up

    def rays(self, size: int) -> tuple[np.ndarray, np.ndarray]:
        """Unit ray directions through pixel centres, row-major with row 0 at the image top, and
        the factor turning a ray parameter t into z-depth: returns (size*size, 3), (size*size,)."""
        forward, right, up = self.basis()
        half = math.tan(self.fov / 2)
        s = ((np.arange(size) + 0.5) / size * 2 - 1) * half  # (size,) tan of the angle off-axis
        d = forward + s[None, :, None] * right + -s[:, None, None] * up  # (size, size, 3), forward part 1
        d = d.reshape(-1, 3)
        inv_norm = 1.0 / np.sqrt(np.einsum("ij,ij->i", d, d))  # (P,) = cosine to the optical axis
        return d * inv_norm[:, None], inv_norm


@dataclass(frozen=True)
class Light:
    direction: np.ndarray  # (3,) unit vector pointing toward the light
    color: np.ndarray  # (3,) directional radiance
    ambient: np.ndarray  # (3,) ambient radiance


@dataclass(frozen=True, eq=False)
class Scene:
    room: Room
    camera: Camera
    light: Light
    objects: tuple[Primitive, ...]
    noise_sigma: float  # sensor noise std in [0, 1] sRGB units
    noise_seed: int


# ----------------------------------------------------------------------------- sampling


def _albedo(rng: np.random.Generator) -> np.ndarray:
    rgb = colorsys.hsv_to_rgb(rng.uniform(), rng.uniform(0.0, 0.85), rng.uniform(0.3, 0.95))
    return np.array(rgb) ** 2.2  # sRGB-ish -> linear


def _material(rng: np.random.Generator, scale: float) -> Material:
    """A random material whose pattern has a few cycles over `scale` metres."""
    texture = TEXTURES[rng.integers(len(TEXTURES))]
    color_a = _albedo(rng)
    color_b = _albedo(rng) if rng.uniform() < 0.5 else color_a * rng.uniform(0.25, 0.6)
    frequency = rng.uniform(1.5, 4.5) / scale
    offset = rng.uniform(0.0, 1.0, 3) / frequency
    waves = rng.normal(size=(4, 3))
    waves /= np.linalg.norm(waves, axis=1, keepdims=True)
    return Material(texture, color_a, color_b, frequency, offset, waves, rng.uniform(0.0, 0.4))


def _rot_y(angle: float) -> np.ndarray:
    c, s = math.cos(angle), math.sin(angle)
    return np.array([[c, 0.0, s], [0.0, 1.0, 0.0], [-s, 0.0, c]])


_LIE_DOWN = np.array([[0.0, -1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])  # 90 deg about z: local y -> world -x


def _shape(rng: np.random.Generator, kind: str, s: float) -> tuple[tuple[float, ...], bool, float, float]:
    """Shape parameters for an object about `s` metres across.

    Returns (params, lying, half_height, footprint): lying = canonical y axis turned horizontal;
    half_height = centre height when resting on the floor; footprint = radius of a circle on the
    floor that contains the object (used to keep objects apart and inside the room)."""
    u = rng.uniform
    r = s / 2
    if kind == "sphere":
        return (r,), False, r, r
    if kind == "box":
        hx, hy, hz = r * u(0.45, 0.9), r * u(0.35, 1.2), r * u(0.45, 0.9)
        return (hx, hy, hz), False, hy, math.hypot(hx, hz)
    if kind == "cylinder":
        rad, hh = r * u(0.45, 1.0), r * u(0.5, 1.6)
        if u() < 0.3:
            return (rad, hh), True, rad, math.hypot(rad, hh)
        return (rad, hh), False, hh, rad
    if kind == "cone":
        rad, hh = r * u(0.7, 1.05), r * u(0.8, 1.7)
        return (rad, hh), False, hh, rad
    if kind == "torus":
        big = r * u(0.85, 1.1)
        small = big * u(0.22, 0.45)
        if u() < 0.4:  # standing on its rim like a wheel
            return (big, small), True, big + small, math.hypot(big + small, small)
        return (big, small), False, small, big + small
    if kind == "capsule":
        rad, hh = r * u(0.35, 0.7), r * u(0.4, 1.3)
        if u() < 0.3:
            return (rad, hh), True, rad, hh + rad
        return (rad, hh), False, hh + rad, rad
    raise ValueError(f"unknown primitive kind {kind!r}; expected one of {CLS_CLASSES}")


def _distance_to_wall(x: float, z: float, heading: float, room: Room) -> float:
    dx, dz = math.sin(heading), math.cos(heading)
    tx = (math.copysign(room.width / 2, dx) - x) / dx if abs(dx) > 1e-9 else math.inf
    tz = (math.copysign(room.depth / 2, dz) - z) / dz if abs(dz) > 1e-9 else math.inf
    return min(tx, tz)


def sample_scene(seed: int, index: int) -> Scene:
    """Draw the scene description for (seed, index); deterministic across runs and processes."""
    if seed < 0 or index < 0:
        raise ValueError(f"seed and index must be non-negative, got seed={seed}, index={index}")
    rng = np.random.default_rng(np.random.SeedSequence([seed, index]))
    u = rng.uniform

    width, depth, height = u(5.0, 9.0), u(5.0, 9.0), u(2.5, 3.4)
    wall_materials = [_material(rng, 1.5)]
    wall_materials += [wall_materials[0] if u() < 0.6 else _material(rng, 1.5) for _ in range(3)]
    room = Room(width, depth, height, _material(rng, 1.5), _material(rng, 2.0), tuple(wall_materials))

    # Camera: somewhere in the room, heading roughly toward the room centre.
    fov = math.radians(u(45.0, 75.0))
    half_fov = fov / 2
    cam_x, cam_z, cam_h = u(-0.4, 0.4) * width, u(-0.4, 0.4) * depth, u(0.9, 2.0)
    heading = math.atan2(-cam_x, -cam_z) + math.radians(u(-40.0, 40.0))

    n_objects = int(rng.integers(2, 7))
    kinds = [CLS_CLASSES[k] for k in rng.integers(len(CLS_CLASSES), size=n_objects)]

    # The hero object sits ahead of the camera, which is then aimed at it (with jitter).
    params, lying, half_h, foot = _shape(rng, kinds[0], u(0.7, 1.2))
    reach = _distance_to_wall(cam_x, cam_z, heading, room) - foot - 0.1
    dist = min(max(u(0.9, 2.6) + foot, foot + 0.5), reach)
    hero_xz = (  # kept inside the room also sideways
        min(max(cam_x + dist * math.sin(heading), foot + 0.05 - width / 2), width / 2 - foot - 0.05),
        min(max(cam_z + dist * math.cos(heading), foot + 0.05 - depth / 2), depth / 2 - foot - 0.05),
    )
    dist = math.hypot(hero_xz[0] - cam_x, hero_xz[1] - cam_z)
    yaw = heading + u(-0.3, 0.3) * half_fov
    pitch = -math.atan2(cam_h - half_h, dist) + u(-0.35, 0.35) * half_fov
    camera = Camera((cam_x, cam_h, cam_z), yaw, min(max(pitch, math.radians(-60.0)), math.radians(10.0)), fov)
    placed = [(kinds[0], params, lying, half_h, foot, hero_xz)]

    # The others: rejection-sample floor positions whose centre projects into (or just past) the frame.
    forward, right, up = camera.basis()
    cam = np.array(camera.position)
    limit = 1.05 * math.tan(half_fov)
    for kind in kinds[1:]:
        params, lying, half_h, foot = _shape(rng, kind, u(0.35, 0.9))
        n = 32
        angle = yaw + np.arctan(u(-1.1, 1.1, n) * math.tan(half_fov))
        ground = u(0.6, 5.5, n) + foot
        xz = np.stack([cam_x + ground * np.sin(angle), cam_z + ground * np.cos(angle)], 1)  # (n, 2)
        rel = np.stack([xz[:, 0], np.full(n, half_h), xz[:, 1]], 1) - cam  # (n, 3) centre - camera
        zc, xc, yc = rel @ forward, rel @ right, rel @ up
        ok = (zc > 0.2) & (np.abs(xc) <= limit * zc) & (np.abs(yc) <= limit * zc)
        ok &= (np.abs(xz[:, 0]) <= width / 2 - foot - 0.05) & (np.abs(xz[:, 1]) <= depth / 2 - foot - 0.05)
        ok &= np.hypot(xz[:, 0] - cam_x, xz[:, 1] - cam_z) >= foot + 0.4
        for *_, other_foot, other_xz in placed:
            ok &= np.hypot(xz[:, 0] - other_xz[0], xz[:, 1] - other_xz[1]) >= foot + other_foot + 0.05
        if ok.any():
            x, z = xz[np.argmax(ok)]
            placed.append((kind, params, lying, half_h, foot, (float(x), float(z))))

    objects = []
    for kind, params, lying, half_h, foot, (x, z) in placed:
        rotation = _rot_y(u(0.0, 2 * math.pi)) @ (_LIE_DOWN if lying else np.eye(3))
        material = _material(rng, 2 * foot)
        objects.append(Primitive(kind, params, np.array([x, half_h, z]), rotation, material))

    elevation, azimuth = math.radians(u(30.0, 75.0)), u(0.0, 2 * math.pi)
    horizontal = math.cos(elevation)
    direction = np.array([horizontal * math.sin(azimuth), math.sin(elevation), horizontal * math.cos(azimuth)])
    light = Light(direction, u(0.6, 1.0) * (1 + u(-0.08, 0.08, 3)), u(0.3, 0.5) * (1 + u(-0.08, 0.08, 3)))
    return Scene(room, camera, light, tuple(objects), u(0.0, 2.5) / 255, int(rng.integers(2**62)))


# ----------------------------------------------------------------------------- ray intersection
# Every _hit_* takes local-frame origins and unit directions o, d (N, 3) and returns t (N,): the
# nearest hit with t > _T_MIN, or inf. Division by ~0 yields inf/nan, which the masks reject.


def _nearest(n: int, *candidates: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
    """Smallest t > _T_MIN among (t, valid) candidate pairs, inf where none."""
    best = np.full(n, np.inf)
    for t, valid in candidates:
        best = np.where(valid & (t > _T_MIN) & (t < best), t, best)
    return best


def _safe(d: np.ndarray) -> np.ndarray:
    return np.where(np.abs(d) < 1e-12, 1e-12, d)


def _hit_sphere(o: np.ndarray, d: np.ndarray, r: float) -> np.ndarray:
    b = np.einsum("ij,ij->i", o, d)
    c = np.einsum("ij,ij->i", o, o) - r * r
    disc = b * b - c
    sq = np.sqrt(np.maximum(disc, 0.0))
    ok = disc >= 0
    return _nearest(len(o), (-b - sq, ok), (-b + sq, ok))


def _hit_box(o: np.ndarray, d: np.ndarray, hx: float, hy: float, hz: float) -> np.ndarray:
    h = np.array([hx, hy, hz])
    inv = 1.0 / _safe(d)
    t1, t2 = (-h - o) * inv, (h - o) * inv  # (N, 3) slab entries/exits
    t_near, t_far = np.minimum(t1, t2).max(1), np.maximum(t1, t2).min(1)
    ok = t_far >= np.maximum(t_near, _T_MIN)
    return _nearest(len(o), (t_near, ok), (t_far, ok))


def _side(o: np.ndarray, d: np.ndarray, r: float, hh: float) -> tuple[tuple[np.ndarray, np.ndarray], ...]:
    """Candidates on the side of the cylinder x^2 + z^2 = r^2, |y| <= hh."""
    a = d[:, 0] ** 2 + d[:, 2] ** 2
    b = o[:, 0] * d[:, 0] + o[:, 2] * d[:, 2]
    c = o[:, 0] ** 2 + o[:, 2] ** 2 - r * r
    disc = b * b - a * c
    sq = np.sqrt(np.maximum(disc, 0.0))
    out = []
    for t in ((-b - sq) / a, (-b + sq) / a):
        out.append((t, (disc >= 0) & (np.abs(o[:, 1] + t * d[:, 1]) <= hh)))
    return tuple(out)


def _disc(o: np.ndarray, d: np.ndarray, y: float, r: float) -> tuple[np.ndarray, np.ndarray]:
    """Candidate on the disc of radius r in the plane at height y."""
    t = (y - o[:, 1]) / _safe(d[:, 1])
    return t, (o[:, 0] + t * d[:, 0]) ** 2 + (o[:, 2] + t * d[:, 2]) ** 2 <= r * r


def _hit_cylinder(o: np.ndarray, d: np.ndarray, r: float, hh: float) -> np.ndarray:
    return _nearest(len(o), *_side(o, d, r, hh), _disc(o, d, hh, r), _disc(o, d, -hh, r))


def _hit_capsule(o: np.ndarray, d: np.ndarray, r: float, hh: float) -> np.ndarray:
    # The union of convex parts: its first hit is the nearest first hit of the parts.
    shift = np.array([0.0, hh, 0.0])
    ends = np.minimum(_hit_sphere(o - shift, d, r), _hit_sphere(o + shift, d, r))
    return np.minimum(_nearest(len(o), *_side(o, d, r, hh)), ends)


def _hit_cone(o: np.ndarray, d: np.ndarray, r: float, hh: float) -> np.ndarray:
    k2 = (r / (2 * hh)) ** 2  # squared radius change per unit of height
    w, dw = hh - o[:, 1], -d[:, 1]  # distance below the apex and its rate along the ray
    a = d[:, 0] ** 2 + d[:, 2] ** 2 - k2 * dw * dw
    b = o[:, 0] * d[:, 0] + o[:, 2] * d[:, 2] - k2 * w * dw
    c = o[:, 0] ** 2 + o[:, 2] ** 2 - k2 * w * w
    disc = b * b - a * c
    sq = np.sqrt(np.maximum(disc, 0.0))
    candidates = [_disc(o, d, -hh, r)]
    for t in ((-b - sq) / a, (-b + sq) / a):
        below_apex = w + t * dw
        candidates.append((t, (disc >= 0) & (below_apex >= 0) & (below_apex <= 2 * hh)))
    return _nearest(len(o), *candidates)


def _torus_sdf(p: np.ndarray, big: float, small: float) -> np.ndarray:
    q = np.sqrt(p[:, 0] ** 2 + p[:, 2] ** 2) - big
    return np.sqrt(q * q + p[:, 1] ** 2) - small


def _hit_torus(o: np.ndarray, d: np.ndarray, big: float, small: float) -> np.ndarray:
    """Sphere tracing of the signed distance, started where the ray enters the bounding sphere."""
    b = np.einsum("ij,ij->i", o, d)
    c = np.einsum("ij,ij->i", o, o) - (big + small) ** 2
    disc = b * b - c
    sq = np.sqrt(np.maximum(disc, 0.0))
    idx = np.flatnonzero((disc > 0) & (-b + sq > _T_MIN))  # rays that reach the bounding sphere
    t = np.maximum(-b - sq, 0.0)[idx]
    t_end = (-b + sq)[idx]
    oo, dd = o[idx], d[idx]
    hit = np.zeros(len(idx), bool)
    active = np.arange(len(idx))
    for _ in range(_TORUS_STEPS):
        dist = _torus_sdf(oo[active] + t[active, None] * dd[active], big, small)
        arrived = dist < _TORUS_TOL
        hit[active[arrived]] = True
        t[active] += np.where(arrived, 0.0, dist)
        active = active[~arrived & (t[active] < t_end[active])]
        if active.size == 0:
            break
    out = np.full(len(o), np.inf)
    ok = hit & (t > _T_MIN)
    out[idx[ok]] = t[ok]
    return out


_HIT = {
    "sphere": _hit_sphere,
    "box": _hit_box,
    "cylinder": _hit_cylinder,
    "cone": _hit_cone,
    "torus": _hit_torus,
    "capsule": _hit_capsule,
}


def _normal(kind: str, params: tuple[float, ...], p: np.ndarray) -> np.ndarray:
    """Outward unit normals (N, 3) at local-frame surface points p (N, 3)."""
    x, y, z = p[:, 0], p[:, 1], p[:, 2]
    rho = np.maximum(np.hypot(x, z), 1e-12)
    zeros = np.zeros_like(x)
    if kind == "sphere":
        n = p
    elif kind == "box":
        scaled = np.abs(p) / np.array(params)  # (N, 3), 1 on the face that was hit
        n = np.zeros_like(p)
        axis = scaled.argmax(1)
        n[np.arange(len(p)), axis] = np.sign(p[np.arange(len(p)), axis])
    elif kind == "cylinder":
        r, hh = params
        cap = np.abs(np.abs(y) - hh) < np.abs(rho - r)
        n = np.where(cap[:, None], np.stack([zeros, np.sign(y), zeros], 1), np.stack([x / rho, zeros, z / rho], 1))
    elif kind == "cone":
        r, hh = params
        k = r / (2 * hh)
        cap = np.abs(y + hh) < np.abs(rho - k * (hh - y))
        side = np.stack([x / rho, np.full_like(x, k), z / rho], 1)
        n = np.where(cap[:, None], np.stack([zeros, -np.ones_like(x), zeros], 1), side)
    elif kind == "torus":
        q = rho - params[0]
        n = np.stack([x / rho * q, y, z / rho * q], 1)
    elif kind == "capsule":
        n = p - np.stack([zeros, np.clip(y, -params[1], params[1]), zeros], 1)
    else:
        raise ValueError(f"unknown primitive kind {kind!r}")
    return n / np.linalg.norm(n, axis=1, keepdims=True)


def _cull(obj: Primitive, origins: np.ndarray, d: np.ndarray, t_max: np.ndarray | None = None) -> np.ndarray:
    """Indices of rays through the object's bounding sphere (entering before t_max, if given).
    Rays share either their origin (origins (1, 3), d (N, 3)) or their direction (the reverse)."""
    oc = origins - obj.center
    b = d @ oc[0] if len(oc) == 1 else oc @ d[0]  # (N,)
    c = np.einsum("ij,ij->i", oc, oc) - obj.bounding_radius**2  # (N,) or (1,)
    disc = b * b - c
    sq = np.sqrt(np.maximum(disc, 0.0))
    ok = (disc > 0) & (sq - b > _T_MIN)
    if t_max is not None:
        ok &= -b - sq < t_max
    return np.flatnonzero(ok)


def _intersect(obj: Primitive, origins: np.ndarray, d: np.ndarray, idx: np.ndarray) -> np.ndarray:
    """Hit distances (len(idx),) of rays `idx` against the object (shapes as in `_cull`)."""
    o_local = (origins if len(origins) == 1 else origins[idx]) - obj.center
    o_local = np.broadcast_to(o_local @ obj.rotation, (len(idx), 3))  # row vectors: R^T (p - c)
    d_local = np.broadcast_to((d if len(d) == 1 else d[idx]) @ obj.rotation, (len(idx), 3))
    return _HIT[obj.kind](o_local, d_local, *obj.params)


def _hit_room(o: np.ndarray, d: np.ndarray, room: Room) -> tuple[np.ndarray, np.ndarray]:
    """Exit distance (P,) from inside the room and the surface index (P,): 0 floor, 1 ceiling,
    2..5 walls at -x, +x, -z, +z."""
    lo = np.array([-room.width / 2, 0.0, -room.depth / 2])
    hi = np.array([room.width / 2, room.height, room.depth / 2])
    with np.errstate(divide="ignore"):
        t_axis = np.where(d > 0, hi - o, lo - o) / d  # (P, 3) distance to the plane ahead on each axis
    t_axis[d == 0] = np.inf
    axis = t_axis.argmin(1)
    t = t_axis[np.arange(len(d)), axis]
    positive = d[np.arange(len(d)), axis] > 0
    surface = np.choose(axis, [2 + positive, 0 + positive, 4 + positive])
    return t, surface


# ----------------------------------------------------------------------------- shading


def _texture(m: Material, p: np.ndarray) -> np.ndarray:
    """Albedo (N, 3) of material m at points p (N, 3) in the surface's own frame."""
    if m.texture == "flat":
        return np.broadcast_to(m.color_a, p.shape)
    q = (p + m.offset) * m.frequency  # (N, 3) in pattern cycles
    if m.texture == "checker":
        mix = np.floor(q).sum(1) % 2
    elif m.texture == "stripes":
        mix = (np.floor(2 * (q @ m.waves[0])) % 2).astype(float)
    elif m.texture == "noise":
        waves = m.waves * _NOISE_OCTAVES[:, None]  # (4, 3)
        v = (np.sin(2 * math.pi * q @ waves.T) / _NOISE_OCTAVES).sum(1)  # (N,) in about [-1.5, 1.5]
        mix = np.clip(0.5 + 0.5 * v, 0.0, 1.0)
    else:
        raise ValueError(f"unknown texture {m.texture!r}; expected one of {TEXTURES}")
    return m.color_a + mix[:, None] * (m.color_b - m.color_a)


def render(scene: Scene, size: int = 128) -> dict[str, np.ndarray | int]:
    """Ray-cast a scene: rgb, depth_gt, semseg_gt and cls as in `render_scene`, plus
    instance (size, size) int16: index into scene.objects, -1 on room surfaces."""
    if size < 1:
        raise ValueError(f"size must be a positive number of pixels, got {size}")
    room, light, objects = scene.room, scene.light, scene.objects
    cam = np.array(scene.camera.position)[None]  # (1, 3)
    d, cos_axis = scene.camera.rays(size)  # (P, 3), (P,)
    n_pix = len(d)

    # First hit: the room encloses the camera, so every ray ends on a room surface at the latest.
    t, surface = _hit_room(cam[0], d, room)
    instance = np.full(n_pix, -1, np.int16)
    for k, obj in enumerate(objects):
        idx = _cull(obj, cam, d, t)
        t_obj = _intersect(obj, cam, d, idx)
        closer = t_obj < t[idx]
        t[idx[closer]] = t_obj[closer]
        instance[idx[closer]] = k
    points = cam + t[:, None] * d  # (P, 3) world hit points

    semseg = np.where(surface == 0, _FLOOR, np.where(surface == 1, _CEILING, _WALL)).astype(np.uint8)
    normal = np.zeros((n_pix, 3))
    albedo = np.zeros((n_pix, 3))
    specular = np.zeros(n_pix)
    on_room = instance < 0
    room_materials = (room.floor, room.ceiling, *room.walls)
    room_normals = np.array([[0, 1, 0], [0, -1, 0], [1, 0, 0], [-1, 0, 0], [0, 0, 1], [0, 0, -1]], float)
    for s, material in enumerate(room_materials):
        sel = np.flatnonzero(on_room & (surface == s))
        normal[sel] = room_normals[s]
        albedo[sel] = _texture(material, points[sel])
    for k, obj in enumerate(objects):
        sel = np.flatnonzero(instance == k)
        local = (points[sel] - obj.center) @ obj.rotation  # (n, 3) hit points in the object frame
        normal[sel] = _normal(obj.kind, obj.params, local) @ obj.rotation.T
        albedo[sel] = _texture(obj.material, local)
        specular[sel] = obj.material.specular
        semseg[sel] = _FIRST_OBJECT_ID + CLS_CLASSES.index(obj.kind)

    # Cast shadows: objects between a lit point and the (directional) light.
    n_dot_l = normal @ light.direction
    lit = n_dot_l > 0
    lit_idx = np.flatnonzero(lit)
    origins = points[lit_idx] + _SHADOW_BIAS * normal[lit_idx]
    to_light = light.direction[None]  # (1, 3)
    for obj in objects:
        idx = _cull(obj, origins, to_light)
        blocked = np.isfinite(_intersect(obj, origins, to_light, idx))
        lit[lit_idx[idx[blocked]]] = False
    diffuse = np.where(lit, n_dot_l, 0.0)
    half_vec = light.direction - d
    half_vec /= np.linalg.norm(half_vec, axis=1, keepdims=True)
    highlight = np.where(lit, specular * np.clip((normal * half_vec).sum(1), 0.0, 1.0) ** 32, 0.0)
    sky = 0.7 + 0.3 * normal[:, 1]  # hemispheric ambient: more light from above
    radiance = (
        albedo * (light.ambient * sky[:, None] + light.color * diffuse[:, None]) + highlight[:, None] * light.color
    )

    srgb = np.clip(radiance, 0.0, 1.0) ** (1 / 2.2)
    srgb += np.random.default_rng(scene.noise_seed).normal(0.0, scene.noise_sigma, srgb.shape)
    rgb = np.clip(np.rint(srgb * 255), 0, 255).astype(np.uint8).reshape(size, size, 3)
    counts = np.bincount(semseg, minlength=len(SEMSEG_CLASSES))[_FIRST_OBJECT_ID:]
    forward, right, up = scene.camera.basis()
    camera_normals = normal @ np.stack([right, up, -forward], 1)  # (P, 3): x right, y up, z toward the camera
    return {
        "rgb": rgb,
        "depth_gt": (t * cos_axis).astype(np.float32).reshape(size, size),  # z-depth = t * cos(angle to axis)
        "semseg_gt": semseg.reshape(size, size),
        "normals_gt": camera_normals.astype(np.float32).reshape(size, size, 3),
        "cls": int(counts.argmax()),
        "instance": instance.reshape(size, size),
    }


# ----------------------------------------------------------------------------- public entry points


def render_scene(seed: int, index: int, size: int = 128) -> dict[str, np.ndarray | int]:
    """Deterministic in (seed, index): returns
    rgb       (size, size, 3) uint8
    depth_gt  (size, size) float32, metric depth in metres along the camera z axis (> 0 everywhere)
    semseg_gt (size, size) uint8 class ids into SEMSEG_CLASSES
    normals_gt (size, size, 3) float32 unit surface normals in camera coordinates (x right, y up, z toward
              the camera): the geometry's exact normal at the first hit
    cls       int, index into CLS_CLASSES: the object type covering the most pixels
    """
    out = render(sample_scene(seed, index), size)
    del out["instance"]
    return out


def scene_key(seed: int, index: int) -> str:
    """Deterministic, dot-free sample key, unique per (seed, index)."""
    if seed < 0 or index < 0:
        raise ValueError(f"seed and index must be non-negative, got seed={seed}, index={index}")
    return f"syn{seed:04d}-{index:09d}"


# ----------------------------------------------------------------------------- CLI: speed and preview


def _palette() -> np.ndarray:
    import matplotlib

    return (np.array(matplotlib.colormaps["tab10"].colors[: len(SEMSEG_CLASSES)]) * 255).astype(np.uint8)


def preview_grid(seed: int, indices: list[int], size: int = 128, columns: int = 4) -> np.ndarray:
    """A uint8 image of tiles [rgb | depth | semseg] for the given scenes, `columns` tiles per row."""
    import matplotlib

    palette, cmap = _palette(), matplotlib.colormaps["magma_r"]
    tiles = []
    for i in indices:
        s = render_scene(seed, i, size)
        depth = s["depth_gt"]
        depth_rgb = (cmap((depth - depth.min()) / max(float(np.ptp(depth)), 1e-6))[..., :3] * 255).astype(np.uint8)
        gap = np.full((size, 2, 3), 255, np.uint8)
        tiles.append(np.concatenate([s["rgb"], gap, depth_rgb, gap, palette[s["semseg_gt"]]], 1))
    rows = []
    for r in range(0, len(tiles), columns):
        row = tiles[r : r + columns] + [np.zeros_like(tiles[0])] * (columns - len(tiles[r : r + columns]))
        gap = np.full((size, 8, 3), 255, np.uint8)
        rows.append(np.concatenate([x for t in row for x in (t, gap)][:-1], 1))
    pad = np.full((8, rows[0].shape[1], 3), 255, np.uint8)
    return np.concatenate([x for row in rows for x in (row, pad)][:-1], 0)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m shards.synthetic", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    speed = sub.add_parser("speed", help="render scenes on this process (one core) and report scenes/min")
    speed.add_argument("--count", type=int, default=200)
    speed.add_argument("--sizes", type=int, nargs="+", default=[64, 128, 224])
    grid = sub.add_parser("grid", help="write a PNG grid of [rgb | depth | semseg] samples")
    grid.add_argument("out")
    grid.add_argument("--count", type=int, default=16)
    grid.add_argument("--size", type=int, default=128)
    for p in (speed, grid):
        p.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    if args.command == "grid":
        from PIL import Image

        Image.fromarray(preview_grid(args.seed, list(range(args.count)), args.size)).save(args.out)
        print(f"wrote {args.out}: {args.count} scenes [rgb | depth | semseg] at {args.size}px")
        return
    render_scene(args.seed, 0, 64)  # warm-up
    # CPU time of this process is the one-core cost even when other jobs share the machine.
    print(f"{'size':>5} {'scenes':>7} {'wall ms':>8} {'cpu ms':>7} {'scenes/min/core':>16} {'vs 1000/min':>12}")
    for size in args.sizes:
        wall, cpu = time.perf_counter(), time.process_time()
        for i in range(args.count):
            render_scene(args.seed, i, size)
        wall_ms = (time.perf_counter() - wall) / args.count * 1000
        cpu_ms = (time.process_time() - cpu) / args.count * 1000
        rate = 60000 / cpu_ms
        print(f"{size:>5} {args.count:>7} {wall_ms:>8.1f} {cpu_ms:>7.1f} {rate:>16.0f} {rate / 1000:>11.2f}x")


if __name__ == "__main__":
    main()
