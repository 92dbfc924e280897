"""Gain flattening: each pixel divided by the mean brightness of the valid pixels around it."""

from __future__ import annotations

import numpy as np
import pytest

from anomaly_dask.intensity import GAIN_FLOOR, GAIN_LEVEL, Intensity, flatten_gain, local_mean, to_unit_rgb


def _brute_mean(values: np.ndarray, valid: np.ndarray, radius: int) -> np.ndarray:
    h, w = values.shape
    out = np.full((h, w), np.nan)
    for y in range(h):
        for x in range(w):
            ys, xs = slice(max(0, y - radius), y + radius + 1), slice(max(0, x - radius), x + radius + 1)
            v = values[ys, xs][valid[ys, xs]]
            if v.size:
                out[y, x] = v.mean()
    return out


@pytest.mark.parametrize("radius", [1, 3, 7])
def test_local_mean_matches_a_brute_force_box_mean_of_valid_pixels(radius):
    rng = np.random.default_rng(radius)
    values = rng.random((13, 17))
    valid = rng.random((13, 17)) > 0.3
    valid[:6, :6] = False  # a corner whose boxes hold no valid pixel at radius 1
    np.testing.assert_allclose(local_mean(values, valid, radius), _brute_mean(values, valid, radius), rtol=1e-12)
    np.testing.assert_allclose(local_mean(values, None, radius), _brute_mean(values, np.ones_like(valid), radius))


def test_flattening_takes_out_a_smooth_gain_and_keeps_texture():
    rng = np.random.default_rng(0)
    texture = (0.3 + 0.1 * rng.random((96, 160))).astype(np.float32)
    gain = np.linspace(0.5, 2.0, 160, dtype=np.float32)[None, :]  # range fall-off, ~1 % per px
    flat = flatten_gain(texture[:, :, None].copy(), None, 12)[:, :, 0]
    graded = flatten_gain((texture * gain)[:, :, None].copy(), None, 12)[:, :, 0]
    inner = (slice(12, -12), slice(12, -12))
    # the gain is gone (up to its change across one box), the texture is kept
    assert np.abs(graded[inner] - flat[inner]).max() < 0.03
    assert abs(float(flat[inner].mean()) - GAIN_LEVEL) < 0.01
    assert np.corrcoef(flat[inner].ravel(), texture[inner].ravel())[0, 1] > 0.99
    # a single bright object smaller than the box stays bright against its surroundings
    spot = texture.copy()
    spot[40:44, 80:84] = 0.9
    out = flatten_gain(spot[:, :, None].copy(), None, 12)[:, :, 0]
    assert out[40:44, 80:84].min() > 2 * out[inner].mean()


def test_flattening_ignores_invalid_pixels_and_floors_dark_surroundings():
    x = np.full((20, 20, 1), 0.2, dtype=np.float32)
    valid = np.ones((20, 20), dtype=bool)
    x[:, 10:] = 0.9  # no-data holding a bright value: must not count
    valid[:, 10:] = False
    out = flatten_gain(x.copy(), valid, 3)
    np.testing.assert_allclose(out[:, :10, 0], GAIN_LEVEL, rtol=1e-6)
    dark = np.full((8, 8, 1), GAIN_FLOOR / 4, dtype=np.float32)
    np.testing.assert_allclose(flatten_gain(dark, None, 2), GAIN_LEVEL / 4, rtol=1e-5)  # floor, not x / x


def test_to_unit_rgb_flattens_before_the_fill_and_fills_with_the_level():
    rng = np.random.default_rng(1)
    raw = (rng.random((30, 30, 1)) * 100 + 50).astype(np.float32)
    valid = np.ones((30, 30), dtype=bool)
    valid[:, 20:] = False
    intensity = Intensity(0.0, 255.0, gray=True, fill=0.9)
    out = to_unit_rgb(raw, intensity, valid, mirror=0, gain_radius=5)
    assert out.shape == (30, 30, 3)
    assert (out[:, 20:] == GAIN_LEVEL).all()
    expected = flatten_gain(np.clip(raw / 255.0, 0, 1), valid, 5)[:, :20, 0]
    np.testing.assert_allclose(out[:, :20, 0], expected, rtol=1e-6)
    # radius 0 is the plain map
    np.testing.assert_allclose(to_unit_rgb(raw, intensity, gain_radius=0)[:, :, 0], np.clip(raw / 255.0, 0, 1)[:, :, 0], rtol=1e-6)
