"""Targets of a synthetic sidescan-sonar mosaic: bright bodies and their acoustic shadows.

A target is drawn as a small height map (boulder, debris cluster, wreck-like hull or an
elongated pipe or log), turned into a reflectivity raster lit from the sonar's side and a
shadow cast away from the track, longer at far range. :func:`place_targets` draws targets
until enough of them fit on valid, non-nadir seabed of the line they are seen from.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from .noise import F32
from .sonar_geometry import SurveyLine, SwathGeometry, profile

__all__ = [
    "TARGET_KINDS",
    "SonarTarget",
    "body_reflectivity",
    "cast_shadow",
    "overlap",
    "place_targets",
    "target_boxes",
    "targets_in",
]

TARGET_KINDS = ("boulder", "debris", "wreck", "elongated")
_TARGET_WEIGHTS = (0.35, 0.25, 0.15, 0.25)

#: ``geometry(ys, xs)`` of the scene the targets are placed in.
GeometryFn = Callable[[np.ndarray, np.ndarray], SwathGeometry]
#: ``cell x cell`` block -> margin-padded boxes ``(y0, y1, x0, x1)`` already placed there.
Occupancy = dict[tuple[int, int], list[tuple[int, int, int, int]]]


@dataclass(frozen=True, eq=False)
class SonarTarget:
    """One anomaly: a bright body and its acoustic shadow, as small rasters.

    Attributes
    ----------
    kind : str
        ``"boulder"``, ``"debris"``, ``"wreck"`` or ``"elongated"``.
    y0, x0 : int
        Absolute position of the rasters' top-left pixel.
    body : numpy.ndarray
        float32 reflectivity of the body (relative to sand = 1), 0 outside the body.
    shadow : numpy.ndarray
        bool, the acoustic shadow (never overlapping the body).
    line : int
        Survey line the target is seen from.
    side : int
        +1 starboard (shadow towards larger y), -1 port.
    """

    kind: str
    y0: int
    x0: int
    body: np.ndarray
    shadow: np.ndarray
    line: int
    side: int

    @property
    def bbox(self) -> tuple[int, int, int, int]:
        """``(y0, y1, x0, x1)`` of body plus shadow, half-open."""
        return self.y0, self.y0 + self.body.shape[0], self.x0, self.x0 + self.body.shape[1]

    @property
    def mask(self) -> np.ndarray:
        """bool raster of body plus shadow (the ground truth)."""
        return (self.body > 0) | self.shadow


# ---- shapes: height maps in pixels on offsets (yy, xx) from the target centre ---------------


def _shape_boulder(yy: np.ndarray, xx: np.ndarray, size: float, rng: np.random.Generator) -> np.ndarray:
    """Height map of an irregular, rounded boulder."""
    a = size / 2 * rng.uniform(0.65, 1.0)
    b = a * rng.uniform(0.55, 1.0)
    ang = rng.uniform(0, np.pi)
    u = xx * np.cos(ang) + yy * np.sin(ang)
    v = -xx * np.sin(ang) + yy * np.cos(ang)
    theta = np.arctan2(v, u)
    edge = 1.0 + sum(rng.uniform(-0.12, 0.12) * np.cos(k * theta + rng.uniform(0, 6.3)) for k in (2, 3, 5))
    q = np.hypot(u / a, v / b) / edge
    return np.where(q < 1, rng.uniform(0.3, 0.6) * size * np.sqrt(np.clip(1 - q * q, 0, 1)), 0.0)


def _shape_debris(yy: np.ndarray, xx: np.ndarray, size: float, rng: np.random.Generator) -> np.ndarray:
    """Height map of a cluster of small pieces."""
    h = np.zeros_like(yy)
    for _ in range(rng.integers(3, 9)):
        cy, cx = rng.uniform(-size / 2.4, size / 2.4, 2)
        r = rng.uniform(1.5, max(2.5, size / 7))
        q = np.hypot(yy - cy, xx - cx) / r
        h = np.maximum(h, np.where(q < 1, rng.uniform(1.0, 2.5) * r * np.sqrt(np.clip(1 - q * q, 0, 1)), 0))
    return h


def _shape_wreck(yy: np.ndarray, xx: np.ndarray, size: float, rng: np.random.Generator) -> np.ndarray:
    """Height map of a wreck-like hull: a tapered rectangle carrying a superstructure."""
    length = size
    half_w = length * rng.uniform(0.11, 0.2)
    ang = rng.uniform(0, np.pi)
    u = xx * np.cos(ang) + yy * np.sin(ang)
    v = -xx * np.sin(ang) + yy * np.cos(ang)
    bow = np.clip((length / 2 - u) / (0.25 * length), 0.25, 1.0)
    hull = (np.abs(u) <= length / 2) & (np.abs(v) <= half_w * np.sqrt(bow))
    base = rng.uniform(3.0, 6.0)
    house = (np.abs(u - rng.uniform(-0.2, 0.1) * length) < 0.12 * length) & (np.abs(v) < 0.6 * half_w)
    return np.where(hull, base + np.where(house, rng.uniform(3.0, 7.0), 0.0), 0.0)


def _shape_elongated(yy: np.ndarray, xx: np.ndarray, size: float, rng: np.random.Generator) -> np.ndarray:
    """Height map of a pipe, log or cable segment: a slightly bent capsule."""
    half_w = rng.uniform(1.3, 3.2)
    ang = rng.uniform(0, np.pi)
    u = xx * np.cos(ang) + yy * np.sin(ang)
    v = -xx * np.sin(ang) + yy * np.cos(ang) - rng.uniform(-1, 1) * (u / size) ** 2 * size * 0.15
    along = np.clip(np.abs(u) - size / 2, 0, None)
    q = np.hypot(along, v) / half_w
    return np.where(q < 1, 2 * half_w * rng.uniform(0.6, 1.0) * np.sqrt(np.clip(1 - q * q, 0, 1)), 0.0)


_SHAPES: dict[str, Callable[[np.ndarray, np.ndarray, float, np.random.Generator], np.ndarray]] = {
    "boulder": _shape_boulder,
    "debris": _shape_debris,
    "wreck": _shape_wreck,
    "elongated": _shape_elongated,
}


# ---- reflectivity and shadow ------------------------------------------------------------------


def body_reflectivity(height: np.ndarray, side: int, rng: np.random.Generator) -> np.ndarray:
    """Reflectivity of a body seen from ``side``: bright where it faces the sonar.

    Parameters
    ----------
    height : numpy.ndarray
        Height map, rows in image order.
    side : int
        +1 if the sonar lies towards smaller rows, -1 if towards larger rows.
    rng : numpy.random.Generator
        Source of the body's brightness and texture.

    Returns
    -------
    numpy.ndarray
        float32 reflectivity (sand = 1), 0 outside the body.
    """
    body = height > 0
    facing = -side * np.gradient(height, axis=0)  # slope rising away from the sonar faces it
    oriented = body if side > 0 else body[::-1]
    depth = np.cumsum(oriented, axis=0) - 1.0
    depth = depth if side > 0 else depth[::-1]
    lead = 1.0 / (1.0 + (depth / 2.5) ** 2)
    level = rng.uniform(2.5, 5.0)
    refl = level * (0.55 + 0.8 * lead + 0.5 * np.tanh(facing)) * rng.uniform(0.8, 1.2, height.shape)
    return np.where(body, np.clip(refl, 0.4, None), 0.0).astype(F32)


def cast_shadow(
    height: np.ndarray, rows_range: np.ndarray, side: int, altitude: float, max_len: float
) -> np.ndarray:
    """Acoustic shadow behind a height map, on the side away from the track.

    Parameters
    ----------
    height : numpy.ndarray
        Height map in pixels, rows in image order.
    rows_range : numpy.ndarray
        Ground range (distance to the track) of each row, pixels.
    side : int
        +1 if the shadow extends towards larger row indices, -1 otherwise.
    altitude : float
        Effective altitude of the towfish, pixels.
    max_len : float
        Longest shadow, pixels.

    Returns
    -------
    numpy.ndarray
        bool shadow mask, disjoint from the body.
    """
    h, r = (height, rows_range) if side > 0 else (height[::-1], rows_range[::-1])
    i = np.arange(h.shape[0], dtype=np.float64)[:, None]
    reach = np.where(h > 0, i + np.minimum(h * r[:, None] / altitude, max_len), -np.inf)
    reach = np.maximum.accumulate(reach, axis=0)
    shadow = (h <= 0) & (i <= reach)
    return shadow if side > 0 else shadow[::-1]


# ---- placement ----------------------------------------------------------------------------------


def _propose_target(
    rng: np.random.Generator,
    line: SurveyLine,
    width: int,
    object_size: tuple[float, float],
    wobble: float,
    nadir_limits: tuple[float, float],
) -> SonarTarget | None:
    """Draw one target seen from ``line``, not yet checked against the scene (None: no room)."""
    kind = str(rng.choice(TARGET_KINDS, p=_TARGET_WEIGHTS))
    size = float(rng.uniform(*object_size))
    side = int(rng.choice([-1, 1]))
    xc = int(rng.integers(0, width))
    p = profile(line, np.array([xc]), wobble, nadir_limits)
    reach = float((p.range_starboard if side > 0 else p.range_port)[0])
    near = float(p.nadir_half[0]) + size
    far = reach - size
    if far <= near:
        return None
    yc = float(p.yc[0])
    rho = rng.uniform(0.08, 0.85)
    ycen = int(round(yc + side * (near + rho * (far - near))))
    half = int(np.ceil(size * 0.62)) + 2
    shadow_room = int(np.ceil(min(150.0, 1.0 * size * (abs(ycen - yc) + half) / line.altitude))) + 2
    top = ycen - half - (shadow_room if side < 0 else 0)
    bottom = ycen + half + 1 + (shadow_room if side > 0 else 0)
    yy, xx = np.mgrid[top - ycen : bottom - ycen, -half : half + 1].astype(np.float64)
    height = _SHAPES[kind](yy, xx, size, rng)
    if not (height > 0).any():
        return None
    rows_range = np.abs(np.arange(top, bottom) - yc)
    shadow = cast_shadow(height, rows_range, side, line.altitude, shadow_room - 2)
    body = body_reflectivity(height, side, rng)
    used = (body > 0) | shadow
    rr = np.flatnonzero(used.any(axis=1))
    cc = np.flatnonzero(used.any(axis=0))
    sl = (slice(rr[0], rr[-1] + 1), slice(cc[0], cc[-1] + 1))
    return SonarTarget(kind, top + int(rr[0]), xc - half + int(cc[0]), body[sl], shadow[sl], line.index, side)


def _fits(
    target: SonarTarget,
    occupied: Occupancy,
    height: int,
    width: int,
    geometry: GeometryFn,
    margin: int = 4,
    cell: int = 256,
) -> bool:
    """Whether a target lies inside the scene, apart from the others, on valid, non-nadir
    seabed of its own line and side; its padded box is added to ``occupied`` when it does."""
    y0, y1, x0, x1 = target.bbox
    box = (y0 - margin, y1 + margin, x0 - margin, x1 + margin)
    y0, y1, x0, x1 = box
    if y0 < 0 or x0 < 0 or y1 > height or x1 > width:
        return False
    cells = [
        (cy, cx) for cy in range(y0 // cell, (y1 - 1) // cell + 1) for cx in range(x0 // cell, (x1 - 1) // cell + 1)
    ]
    for key in cells:
        for oy0, oy1, ox0, ox1 in occupied.get(key, ()):
            if oy0 < y1 and y0 < oy1 and ox0 < x1 and x0 < ox1:
                return False
    geo = geometry(np.arange(y0, y1), np.arange(x0, x1))
    ok = geo.valid & ~geo.nadir & (geo.line == target.line) & (geo.side == target.side)
    if not ok.all():
        return False
    for key in cells:
        occupied.setdefault(key, []).append(box)
    return True


def place_targets(
    n: int,
    rng: np.random.Generator,
    lines: tuple[SurveyLine, ...],
    *,
    height: int,
    width: int,
    object_size: tuple[float, float],
    wobble: float,
    nadir_limits: tuple[float, float],
    geometry: GeometryFn,
) -> tuple[SonarTarget, ...]:
    """Place up to ``n`` targets on a scene's valid, non-nadir seabed.

    Parameters
    ----------
    n : int
        Number of targets wanted.
    rng : numpy.random.Generator
        The scene's ``"targets"`` stream.
    lines : tuple of SurveyLine
        The scene's survey lines.
    height, width : int
        Scene size in pixels.
    object_size : tuple of float
        ``(min, max)`` target size, pixels.
    wobble : float
        Track wander amplitude of the lines.
    nadir_limits : tuple of float
        ``(min, max)`` full width of the nadir gap.
    geometry : callable
        ``geometry(ys, xs)`` returning the scene's :class:`SwathGeometry` of a grid.

    Returns
    -------
    tuple of SonarTarget
        The targets placed, fewer than ``n`` when the tries run out.
    """
    placed: list[SonarTarget] = []
    occupied: Occupancy = {}
    for _ in range(60 * n + 50):
        if len(placed) >= n or not lines:
            break
        line = lines[rng.integers(len(lines))]
        target = _propose_target(rng, line, width, object_size, wobble, nadir_limits)
        if target is not None and _fits(target, occupied, height, width, geometry):
            placed.append(target)
    return tuple(placed)


# ---- windows --------------------------------------------------------------------------------------


def target_boxes(targets: tuple[SonarTarget, ...]) -> np.ndarray:
    """``(len(targets), 4)`` int64 array of the targets' :attr:`SonarTarget.bbox`."""
    boxes = [t.bbox for t in targets]
    return np.array(boxes, dtype=np.int64).reshape(-1, 4)


def targets_in(
    targets: tuple[SonarTarget, ...], boxes: np.ndarray, y0: int, y1: int, x0: int, x1: int
) -> list[SonarTarget]:
    """The targets whose rasters intersect the window ``[y0, y1) x [x0, x1)``.

    Parameters
    ----------
    targets : tuple of SonarTarget
        All targets.
    boxes : numpy.ndarray
        Their :func:`target_boxes`.
    y0, y1, x0, x1 : int
        The window.

    Returns
    -------
    list of SonarTarget
        The intersecting targets, in order.
    """
    hit = (boxes[:, 0] < y1) & (boxes[:, 1] > y0) & (boxes[:, 2] < x1) & (boxes[:, 3] > x0)
    return [targets[i] for i in np.flatnonzero(hit)]


def overlap(target: SonarTarget, y0: int, y1: int, x0: int, x1: int) -> tuple[slice, slice, slice, slice]:
    """Where a target's rasters and a window intersect.

    Parameters
    ----------
    target : SonarTarget
        The target.
    y0, y1, x0, x1 : int
        The window.

    Returns
    -------
    tuple of slice
        ``(window rows, window columns, raster rows, raster columns)``.
    """
    ty0, ty1, tx0, tx1 = target.bbox
    a0, a1 = max(y0, ty0), min(y1, ty1)
    b0, b1 = max(x0, tx0), min(x1, tx1)
    return (
        slice(a0 - y0, a1 - y0),
        slice(b0 - x0, b1 - x0),
        slice(a0 - ty0, a1 - ty0),
        slice(b0 - tx0, b1 - tx0),
    )
