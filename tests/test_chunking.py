"""Chunked scoring equals unchunked scoring (dask-image style: tiny chunks vs one chunk)."""

from __future__ import annotations

import numpy as np
import pytest

from anomaly_dask import AnomalyDetector

from .conftest import FAST, texture


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(backbone="efficientnet_lite0", upsample=2),
        dict(backbone="efficientnet_lite0", upsample=1, weights="imagenet"),
        dict(backbone="resnet18", upsample=1, tile=24, stride=6),
        dict(features="patch", patch_size=64, stride=16),
    ],
    ids=["effnet-up2", "effnet-imagenet-up1", "resnet18-tile24", "patch"],
)
def test_chunked_equals_unchunked(kwargs):
    train = [texture(160, 176, 1), texture(150, 150, 2)]
    params = {**FAST, **kwargs}
    ad = AnomalyDetector(**params).train(train[0], train[1])
    image = texture(203, 157, 3)  # odd shape: not a multiple of stride or chunk
    ad.chunk_size = 10_000
    whole = ad.score_image(image)
    assert whole.shape == (203, 157) and whole.dtype == np.float32
    for chunk in (48, 72):
        ad.chunk_size = chunk
        chunked = ad.score_image(image)
        span = float(whole.max() - whole.min())
        assert span > 0
        assert np.abs(chunked - whole).max() < 1e-3 * span, chunk
