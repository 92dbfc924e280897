"""No-data fill: data mirrored across the nearest edge, the same in every window."""

from __future__ import annotations

import numpy as np

from anomaly_dask.intensity import Intensity, mirror_fill, to_unit_rgb


def test_straight_edge_is_mirrored_and_far_pixels_take_the_fill():
    rng = np.random.default_rng(0)
    x = rng.random((6, 20, 1)).astype(np.float32)
    valid = np.ones((6, 20), dtype=bool)
    valid[:, 12:] = False
    out = mirror_fill(x.copy(), valid, reach=5, fill=-1.0)
    # column 12 + k has its nearest data in column 11, so it mirrors column 2 * 11 - (12 + k)
    for k in range(5):
        np.testing.assert_array_equal(out[:, 12 + k], x[:, 10 - k])
    assert (out[:, 17:] == -1.0).all()  # farther than reach
    np.testing.assert_array_equal(out[:, :12], x[:, :12])  # data untouched


def test_reflection_falling_outside_the_data_takes_the_nearest_pixel():
    x = np.arange(10, dtype=np.float32).reshape(1, 10, 1)
    valid = np.zeros((1, 10), dtype=bool)
    valid[0, 4:6] = True  # two data pixels
    out = mirror_fill(x.copy(), valid, reach=3, fill=-1.0)
    # x=6 mirrors x=4 and x=3 mirrors x=5 (data); x=7 and x=2 would mirror no-data, so they
    # take their nearest data pixel
    assert out[0, 6, 0] == 4 and out[0, 3, 0] == 5 and out[0, 7, 0] == 5 and out[0, 2, 0] == 4
    assert out[0, 9, 0] == -1.0


def test_fill_of_overlapping_windows_agrees_where_they_overlap_by_twice_the_reach():
    rng = np.random.default_rng(1)
    h, w, reach = 90, 120, 6
    x = rng.random((h, w, 1)).astype(np.float32)
    valid = rng.random((h // 6 + 1, w // 6 + 1)) > 0.4
    valid = np.kron(valid, np.ones((6, 6), dtype=bool))[:h, :w] & (rng.random((h, w)) > 0.05)
    whole = mirror_fill(x.copy(), valid, reach, 0.5)
    for y0, x0 in [(0, 0), (17, 33), (40, 61)]:
        part = mirror_fill(x[y0 : y0 + 50, x0 : x0 + 55].copy(), valid[y0 : y0 + 50, x0 : x0 + 55], reach, 0.5)
        m = 2 * reach
        inner = (slice(m, 50 - m), slice(m, 55 - m))
        np.testing.assert_array_equal(part[inner], whole[y0 : y0 + 50, x0 : x0 + 55][inner])


def test_to_unit_rgb_fills_with_the_median_unless_mirroring():
    raw = np.full((4, 6, 1), 200, dtype=np.uint8)
    raw[:, 3:] = 0
    valid = raw[:, :, 0] > 0
    intensity = Intensity(0.0, 255.0, True, 0.25)
    flat = to_unit_rgb(raw, intensity, valid)
    assert flat.shape == (4, 6, 3) and np.allclose(flat[:, 3:], 0.25)
    mirrored = to_unit_rgb(raw, intensity, valid, mirror=4)
    assert np.allclose(mirrored, 200 / 255)


def _fill_whole(x: np.ndarray, valid: np.ndarray, reach: int, fill: float) -> np.ndarray:
    """Reference: one feature transform of the whole array."""
    from scipy.ndimage import distance_transform_edt

    hole = ~valid
    dist, (ny, nx) = distance_transform_edt(hole, return_indices=True)
    py, px = np.nonzero(hole & (dist <= reach))
    by, bx = ny[py, px], nx[py, px]
    ry, rx = 2 * by - py, 2 * bx - px
    ok = (ry >= 0) & (ry < valid.shape[0]) & (rx >= 0) & (rx < valid.shape[1])
    ok[ok] = valid[ry[ok], rx[ok]]
    out = x.copy()
    out[py, px] = x[np.where(ok, ry, by), np.where(ok, rx, bx)]
    out[hole & (dist > reach)] = fill
    return out


def test_fill_block_by_block_equals_one_transform_of_the_whole_array():
    rng = np.random.default_rng(3)
    h, w = 150, 170
    yy, xx = np.mgrid[:h, :w]
    masks = []
    for _ in range(6):
        band = np.abs(yy - 40 - xx // rng.integers(3, 9)) < rng.integers(1, 12)  # a wavy nadir band
        edge = xx > w - rng.integers(1, 20)  # a swath edge
        holes = rng.random((h, w)) < 0.002  # drop-outs
        disc = (yy - rng.integers(0, h)) ** 2 + (xx - rng.integers(0, w)) ** 2 < rng.integers(2, 40) ** 2
        masks += [~(band | edge), ~(band | holes), ~(edge | disc), ~disc, rng.random((h, w)) > 0.5]
    for valid in masks:
        x = rng.random((h, w, 2)).astype(np.float32)
        expected = _fill_whole(x, valid, 9, -1.0)
        for block in (5, 16, 64):
            np.testing.assert_array_equal(mirror_fill(x.copy(), valid, 9, -1.0, block=block), expected)
