"""Dictionary maths: scores, labels, per-cluster and context offsets, thresholds."""

from __future__ import annotations

import numpy as np
import pytest

from anomaly_dask.dictionary import (
    Dictionary,
    context_classes,
    distance_classes,
    distance_offsets,
    group_offsets,
    rate_offsets,
    threshold_from_scores,
)


def _dictionary() -> Dictionary:
    eye = np.eye(2, dtype=np.float32)
    return Dictionary(
        pca_mean=np.zeros(2), pca_components=eye, scaler_mean=np.zeros(2), scaler_scale=np.ones(2),
        centroids=np.array([[0.0, 0.0], [10.0, 0.0]]),
    )


def test_scores_are_distances_to_the_nearest_centroid():
    d = _dictionary()
    s, labels = d.score_and_label(np.array([[1.0, 0.0], [9.0, 0.0], [5.0, 3.0]]))
    np.testing.assert_allclose(s, [1.0, 1.0, np.hypot(5, 3)], rtol=1e-6)
    assert labels.tolist() == [0, 1, 0]
    assert d.score(np.array([[3.0, 4.0]]), n_neighbors=2)[0] == pytest.approx((5 + np.hypot(7, 4)) / 2)


def test_offsets_judge_a_broad_cluster_against_its_own_spread():
    rng = np.random.default_rng(0)
    tight = rng.normal(0, 0.1, 2000)  # cluster 0: small distances
    broad = np.abs(rng.normal(0, 3.0, 2000))  # cluster 1: rare, varied normal appearance
    scores = np.abs(np.concatenate([tight, broad])).astype(np.float32)
    labels = np.repeat([0, 1], 2000)
    t = threshold_from_scores(scores, "cdf", 0.95, 1.645, None)
    off = group_offsets(scores, labels, 3, t, "cdf", 0.95, 1.645, min_tiles=100)
    assert off[0] == 0.0 and off[2] == 0.0  # tight cluster never stricter; empty cluster untouched
    assert off[1] > 0
    # after the offsets each populated cluster flags about 5 % of its own tiles at most
    shifted = scores - off[labels]
    assert (shifted[labels == 1] >= t).mean() == pytest.approx(0.05, abs=0.01)
    assert (shifted[labels == 0] >= t).mean() <= 0.05
    assert not group_offsets(scores, labels, 3, t, "manual", 0.95, 1.645).any()


def test_offsets_apply_by_nearest_centroid_and_persist():
    d = _dictionary()
    d.offsets = np.array([0.0, 0.5])
    np.testing.assert_allclose(d.score(np.array([[1.0, 0.0], [9.0, 0.0]])), [1.0, 0.5], rtol=1e-6)
    assert set(d.arrays()) >= {"centroids", "offsets"}
    np.testing.assert_array_equal(Dictionary(**d.arrays()).offsets, d.offsets)


def test_context_classes_split_full_and_partial_tiles_by_their_surroundings():
    levels = np.array([1.0, 0.9, 0.75, 0.6])
    context = np.array([1.0, 0.95, 0.8, 0.7, 0.3, 0.95, 0.8, 0.7, 0.3])
    partial = np.array([False] * 5 + [True] * 4)
    assert context_classes(context, partial, levels).tolist() == [0, 1, 2, 3, 4, 5, 6, 7, 8]
    assert context_classes(context[:5], None, levels).tolist() == [0, 1, 2, 3, 4]


def test_context_offsets_apply_by_class_after_centroid_offsets_and_persist():
    d = _dictionary()
    d.offsets = np.array([0.0, 0.5])
    d.context_levels = np.array([1.0, 0.9, 0.75, 0.6])
    d.context_offsets = np.array([0.0, 0.25, 1.0, 0, 0, 0, 0, 0, 0])
    f = np.array([[1.0, 0.0], [9.0, 0.0], [1.0, 0.0], [1.0, 0.0]])
    ctx = np.array([1.0, 0.95, 0.8, 0.8])
    part = np.array([False, False, False, True])
    np.testing.assert_allclose(d.score(f, 1, ctx, part), [1.0, 0.25, 0.0, 1.0], atol=1e-6)
    np.testing.assert_allclose(d.score(f), [1.0, 0.5, 1.0, 1.0], atol=1e-6)  # no context given
    back = Dictionary(**d.arrays())
    np.testing.assert_array_equal(back.context_offsets, d.context_offsets)
    np.testing.assert_array_equal(back.context_levels, d.context_levels)


def test_distance_classes_count_the_edges_a_pixel_is_nearer_than():
    edges = np.array([128.0, 64.0, 32.0, 16.0, 8.0])
    d = np.array([[np.inf, 128, 127.9, 64], [40, 32, 20, 16], [10, 8, 3, 0]])
    assert distance_classes(d, edges).tolist() == [[0, 0, 1, 1], [2, 2, 3, 3], [4, 4, 5, 5]]


def test_distance_offsets_mark_each_class_as_often_as_the_interior():
    rng = np.random.default_rng(0)
    interior = rng.normal(0.0, 1.0, 200_000)
    heavy = rng.normal(1.0, 1.5, 20_000)  # near no-data: higher and wider
    light = rng.normal(-1.0, 0.5, 20_000)  # lower: never judged more strictly
    few = rng.normal(5.0, 1.0, 500)  # too few samples for its own offset
    scores = np.concatenate([interior, heavy, light, few])
    classes = np.repeat([0, 1, 2, 3], [len(interior), len(heavy), len(light), len(few)])
    threshold = float(np.quantile(interior, 0.99))
    off = distance_offsets(scores, classes, 5, threshold)
    assert off[0] == 0 and off[2] == 0 and off[3] == 0 and off[4] == 0
    assert off[1] > 0
    assert np.mean(heavy - off[1] >= threshold) == pytest.approx(0.01, abs=0.002)
    assert np.mean(heavy >= threshold) > 0.05
    # without enough interior samples there is nothing to match: no offsets at all
    assert not distance_offsets(scores[len(interior) - 10 :], classes[len(interior) - 10 :], 5, threshold).any()


def test_pixel_offsets_persist_with_the_dictionary():
    d = _dictionary()
    d.distance_edges = np.array([64.0, 32.0])
    d.distance_offsets = np.array([0.0, 0.5, 1.5])
    d.pixel_offsets = np.array([0.25, 0.0])
    back = Dictionary(**d.arrays())
    for name in ("distance_edges", "distance_offsets", "pixel_offsets"):
        np.testing.assert_array_equal(getattr(back, name), getattr(d, name))


def test_rate_offsets_bring_each_group_down_to_the_target_rate():
    rng = np.random.default_rng(1)
    scores = np.concatenate([rng.normal(0, 1, 50_000), rng.normal(2, 1, 50_000), rng.normal(9, 1, 999)])
    groups = np.repeat([0, 1, 2], [50_000, 50_000, 999])
    off = rate_offsets(scores, groups, 4, threshold=2.0, below=0.99)
    assert off[2] == 0 and off[3] == 0  # too few scores; none at all
    assert off[0] == pytest.approx(max(0.0, np.quantile(scores[:50_000], 0.99) - 2.0))
    assert np.mean(scores[groups == 1] - off[1] < 2.0) == pytest.approx(0.99, abs=1e-3)
