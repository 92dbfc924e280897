"""Survey lines and swath geometry of a synthetic sidescan-sonar mosaic.

Survey lines run along the x axis and are stacked in y. Each line's track wanders slowly
about its base row; per ping (column) it has a port and a starboard range with ragged outer
edges, a nadir gap of varying width and a gain. :func:`swath_geometry` resolves, for every
pixel of a window, which line it is taken from (the nearest covering track) and where in
that line's swath it lies.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .noise import F32, hash1, noise1, stream_key, unit

__all__ = [
    "Profile",
    "SurveyLine",
    "SwathGeometry",
    "candidate_lines",
    "profile",
    "survey_lines",
    "swath_geometry",
]


@dataclass(frozen=True)
class SurveyLine:
    """The random constants of one survey line; its per-ping values come from :func:`profile`.

    Attributes
    ----------
    index : int
        Position of the line, counted from the top of the mosaic.
    y_base : float
        Mean row of the track.
    x_start, x_end : float
        Columns where the line starts and ends (pings outside have no data).
    halfwidth : float
        Mean range of one side of the swath, pixels.
    nadir_half : float
        Mean half-width of the nadir gap, pixels.
    gain_port, gain_starboard : float
        Gain of each side.
    altitude : float
        Effective towfish altitude, pixels (sets the shadow lengths).
    key : int
        Key of the line's noise streams.
    """

    index: int
    y_base: float
    x_start: float
    x_end: float
    halfwidth: float
    nadir_half: float
    gain_port: float
    gain_starboard: float
    altitude: float
    key: int


@dataclass(frozen=True)
class Profile:
    """Per-ping (per column) values of one line; 1-D arrays over the requested columns.

    Attributes
    ----------
    yc : numpy.ndarray
        float32 row of the track.
    range_port, range_starboard : numpy.ndarray
        float32 range of each side, track to outer edge.
    nadir_half : numpy.ndarray
        float32 half-width of the nadir gap.
    ping_gain : numpy.ndarray
        float32 gain of the ping.
    inside : numpy.ndarray
        bool, whether the line has a ping in the column.
    """

    yc: np.ndarray
    range_port: np.ndarray
    range_starboard: np.ndarray
    nadir_half: np.ndarray
    ping_gain: np.ndarray
    inside: np.ndarray


@dataclass(frozen=True)
class SwathGeometry:
    """Per-pixel swath geometry of a window.

    Attributes
    ----------
    valid, nadir : numpy.ndarray
        bool, data present / inside the nadir gap.
    line : numpy.ndarray
        int32 index of the line the pixel is taken from, -1 where no data.
    side : numpy.ndarray
        float32, +1 starboard (below the track, larger y), -1 port.
    rho : numpy.ndarray
        float32 ground range fraction, 0 at the nadir edge and 1 at the swath edge.
    gain : numpy.ndarray
        float32 ping gain times side gain.
    nadir_half : numpy.ndarray
        float32 half-width of the nadir gap of the pixel's line at its ping, 0 where no data.
    """

    valid: np.ndarray
    nadir: np.ndarray
    line: np.ndarray
    side: np.ndarray
    rho: np.ndarray
    gain: np.ndarray
    nadir_half: np.ndarray


def survey_lines(
    rng: np.random.Generator,
    seed: int,
    height: int,
    width: int,
    line_spacing: float,
    swath_halfwidth: float,
    nadir_width: tuple[float, float],
) -> tuple[SurveyLine, ...]:
    """Draw the survey lines that cross a mosaic, top to bottom.

    Parameters
    ----------
    rng : numpy.random.Generator
        The scene's ``"lines"`` stream.
    seed : int
        Scene seed (for the lines' noise keys).
    height, width : int
        Mosaic size in pixels.
    line_spacing : float
        Mean distance between neighbouring lines.
    swath_halfwidth : float
        Mean range of one side of a swath.
    nadir_width : tuple of float
        ``(min, max)`` full width of the nadir gap.

    Returns
    -------
    tuple of SurveyLine
        Lines until one's swath lies wholly below the mosaic.
    """
    lines = []
    y = rng.uniform(0.3, 0.7) * line_spacing
    k = 0
    while y - 1.5 * swath_halfwidth < height:
        span = rng.uniform(0.0, 0.05, 2) * width * (rng.random(2) < 0.6)
        lines.append(
            SurveyLine(
                index=k,
                y_base=float(y),
                x_start=float(span[0]),
                x_end=float(width - span[1]),
                halfwidth=float(swath_halfwidth * rng.uniform(0.92, 1.08)),
                nadir_half=float(rng.uniform(*nadir_width) / 2),
                gain_port=float(rng.uniform(0.85, 1.12)),
                gain_starboard=float(rng.uniform(0.85, 1.12)),
                altitude=float(rng.uniform(0.12, 0.2) * swath_halfwidth),
                key=stream_key(seed, "line", k),
            )
        )
        y += line_spacing * rng.uniform(0.94, 1.06)
        k += 1
    return tuple(lines)


def profile(line: SurveyLine, xs: np.ndarray, wobble: float, nadir_limits: tuple[float, float]) -> Profile:
    """Evaluate a line's track, ranges, nadir width and gains at some pings.

    Parameters
    ----------
    line : SurveyLine
        The line.
    xs : numpy.ndarray
        Absolute columns (pings), int64.
    wobble : float
        Amplitude of the track's wander about ``line.y_base``, pixels.
    nadir_limits : tuple of float
        ``(min, max)`` full width of the nadir gap.

    Returns
    -------
    Profile
        The line's values at ``xs``.
    """
    k = line.key
    yc = line.y_base + wobble * (noise1(xs, 3100.0, k ^ 1) + F32(0.35) * noise1(xs, 850.0, k ^ 2))
    ranges = []
    for side in (3, 7):
        slow = F32(line.halfwidth) * (F32(1.0) + F32(0.06) * noise1(xs, 2600.0, k ^ side))
        ragged = (
            F32(0.015 * line.halfwidth) * noise1(xs, 70.0, k ^ (side + 1))
            + F32(2.5) * noise1(xs, 9.0, k ^ (side + 2))
            + F32(1.5) * unit(hash1(xs, k ^ (side + 3)))
        )
        ranges.append(slow + ragged)
    half = F32(line.nadir_half) * (F32(1.0) + F32(0.5) * noise1(xs, 1700.0, k ^ 11))
    half = half + F32(1.2) * noise1(xs, 23.0, k ^ 12) + F32(0.8) * unit(hash1(xs, k ^ 16))
    half = np.clip(half, F32(nadir_limits[0] / 2), F32(nadir_limits[1] / 2))
    gain = (
        F32(1.0)
        + F32(0.08) * noise1(xs, 380.0, k ^ 13)
        + F32(0.05) * noise1(xs, 3.0, k ^ 14)
        + F32(0.03) * unit(hash1(xs, k ^ 15))
    )
    inside = (xs >= line.x_start) & (xs < line.x_end)
    return Profile(yc.astype(F32), ranges[0], ranges[1], half, gain, inside)


def candidate_lines(lines: tuple[SurveyLine, ...], y0: float, y1: float, wobble: float) -> list[SurveyLine]:
    """The lines whose swath may reach rows ``[y0, y1)`` (a safe over-estimate).

    Parameters
    ----------
    lines : tuple of SurveyLine
        All lines of the mosaic.
    y0, y1 : float
        Row range.
    wobble : float
        Track wander amplitude, as for :func:`profile`.

    Returns
    -------
    list of SurveyLine
        The lines to consider, in order.
    """
    reach = 1.35 * wobble + 10.0
    return [
        ln
        for ln in lines
        if ln.y_base - 1.15 * ln.halfwidth - reach < y1 and ln.y_base + 1.15 * ln.halfwidth + reach > y0
    ]


def swath_geometry(
    lines: tuple[SurveyLine, ...],
    ys: np.ndarray,
    xs: np.ndarray,
    wobble: float,
    nadir_limits: tuple[float, float],
) -> SwathGeometry:
    """Swath geometry of the grid ``ys x xs``; where swaths overlap, the nearest track wins.

    Parameters
    ----------
    lines : tuple of SurveyLine
        All lines of the mosaic.
    ys, xs : numpy.ndarray
        Non-empty absolute row and column coordinates (1-D, int64, ascending).
    wobble : float
        Track wander amplitude.
    nadir_limits : tuple of float
        ``(min, max)`` full width of the nadir gap.

    Returns
    -------
    SwathGeometry
        ``(len(ys), len(xs))`` rasters.
    """
    shape = (ys.size, xs.size)
    yf = ys.astype(F32)[:, None]
    best = np.full(shape, np.inf, dtype=F32)
    line = np.full(shape, -1, dtype=np.int32)
    side = np.ones(shape, dtype=F32)
    rng_max = np.ones(shape, dtype=F32)
    nadir_half = np.zeros(shape, dtype=F32)
    gain = np.ones(shape, dtype=F32)
    for ln in candidate_lines(lines, float(ys[0]), float(ys[-1]) + 1, wobble):
        p = profile(ln, xs, wobble, nadir_limits)
        d = yf - p.yc[None, :]
        r = np.abs(d)
        starboard = d >= 0
        reach = np.where(starboard, p.range_starboard[None, :], p.range_port[None, :])
        win = (r <= reach) & p.inside[None, :] & (r < best)
        best = np.where(win, r, best)
        line = np.where(win, ln.index, line)
        side = np.where(win, np.where(starboard, F32(1), F32(-1)), side)
        rng_max = np.where(win, reach, rng_max)
        nadir_half = np.where(win, p.nadir_half[None, :], nadir_half)
        side_gain = np.where(starboard, F32(ln.gain_starboard), F32(ln.gain_port))
        gain = np.where(win, side_gain * p.ping_gain[None, :], gain)
    valid = line >= 0
    dist = np.where(valid, best, F32(0))
    rho = np.clip((dist - nadir_half) / np.maximum(rng_max - nadir_half, F32(1)), F32(0), F32(1))
    nadir = valid & (dist < nadir_half)
    return SwathGeometry(valid, nadir, line, side, rho, gain, np.where(valid, nadir_half, F32(0)))
