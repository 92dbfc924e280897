"""Chunked scoring equals unchunked scoring (dask-image style: tiny chunks vs one chunk)."""

from __future__ import annotations

import numpy as np
import pytest

from anomaly_dask import AnomalyDetector
from anomaly_dask.calibration import fit_calibration

from .conftest import FAST, texture


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(backbone="efficientnet_lite0", upsample=2),
        dict(backbone="efficientnet_lite0", upsample=1, weights="imagenet"),
        dict(backbone="resnet18", upsample=1, tile=24, stride=6),
        dict(features="patch", patch_size=64, stride=16),
        dict(backbone="efficientnet_lite0", upsample=2, gain_radius=24),
    ],
    ids=["effnet-up2", "effnet-imagenet-up1", "resnet18-tile24", "patch", "effnet-gain24"],
)
def test_chunked_equals_unchunked(kwargs):
    train = [texture(160, 176, 1), texture(150, 150, 2)]
    params = {**FAST, **kwargs}
    ad = AnomalyDetector(**params).train(train[0], train[1])
    image = texture(203, 157, 3)  # odd shape: not a multiple of stride or chunk
    ad.chunk_size = 10_000
    whole = ad.score_image(image)
    assert whole.shape == (203, 157) and whole.dtype == np.float32
    for chunk in (48, 50):  # 50: not a multiple of any stride here
        ad.chunk_size = chunk
        chunked = ad.score_image(image)
        span = float(whole.max() - whole.min())
        assert span > 0
        assert np.abs(chunked - whole).max() < 1e-3 * span, chunk


def test_detect_store_chunks_need_not_be_a_multiple_of_the_stride(tmp_path):
    """A 50 px chunk with stride 6: the store's chunks are the processing chunks, its scores
    are ``score_image``'s with the same chunks, and the whole image's up to chunking."""
    import zarr

    ad = AnomalyDetector(**{**FAST, "tile": 24, "stride": 6}).train(texture(160, 176, 1), texture(150, 150, 2))
    image = texture(203, 157, 3)
    ad.chunk_size = 10_000
    whole = ad.score_image(image)
    ad.chunk_size = 50
    ad.detect(image, str(tmp_path / "out.zarr"), quicklook=False, contacts=(), pyramid=False)
    g = zarr.open_group(str(tmp_path / "out.zarr"), mode="r")
    assert g.attrs["complete"] is True and g["score"].chunks == (50, 50)
    span = float(whole.max() - whole.min())
    assert np.abs(g["score"][:] - ad.score_image(image)).max() <= 1e-6 * span
    assert np.abs(g["score"][:] - whole).max() < 1e-3 * span


def _with_nodata(image: np.ndarray, seed: int) -> np.ndarray:
    """Float copy of ``image`` with NaN no-data: a ragged band and a straight strip."""
    out = image.astype(np.float32)
    h, w = out.shape[:2]
    rng = np.random.default_rng(seed)
    edge = (h // 3 + np.cumsum(rng.integers(-2, 3, w))).clip(0, h)
    out[np.arange(h)[:, None] < edge[None, :]] = np.nan
    out[:, : w // 7] = np.nan
    return out


@pytest.mark.parametrize("gain_radius", [0, 24])
def test_chunked_equals_unchunked_near_nodata(gain_radius):
    """Edge handling (scores borrowed from covered pixels, calibration groups by distance
    to no-data, gain flattening over valid pixels) is chunk-free."""
    train = [_with_nodata(texture(220, 240, 1), 1), _with_nodata(texture(200, 200, 2), 2)]
    ad = AnomalyDetector(**FAST, gain_radius=gain_radius).train(train[0], train[1])
    # a calibration group per distance class, whatever validation gave (too few pixels here)
    cal = ad.dictionary_.calibration
    assert len(cal.distance_edges)
    rng = np.random.default_rng(0)
    n = 40_000
    classes = np.arange(n) % (len(cal.distance_edges) + 1)
    k = len(ad.dictionary_.centroids)
    labels = rng.integers(0, k, n)
    raw = rng.gamma(2.0, 1.0 + classes + labels / k, n) * float(cal.knots[0, -1]) / 10
    ad.dictionary_.calibration = fit_calibration(raw, labels, classes, k, cal.distance_edges, min_samples=600)
    assert ad.dictionary_.calibration.n_groups > len(cal.distance_edges) + 2  # centroid groups too
    image = _with_nodata(texture(203, 157, 3), 3)
    ad.chunk_size = 10_000
    whole = ad.score_image(image)
    valid = ~np.isnan(image).any(axis=-1) if image.ndim == 3 else ~np.isnan(image)
    np.testing.assert_array_equal(np.isfinite(whole), valid)
    span = float(np.nanmax(whole) - np.nanmin(whole))
    for chunk in (48, 72):
        ad.chunk_size = chunk
        chunked = ad.score_image(image)
        np.testing.assert_array_equal(np.isnan(chunked), np.isnan(whole))
        assert np.nanmax(np.abs(chunked - whole)) < 1e-3 * span, chunk
