"""Dictionary maths: raw scores, labels and persistence."""

from __future__ import annotations

import numpy as np
import pytest

from anomaly_dask.calibration import fit_calibration
from anomaly_dask.dictionary import Dictionary


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


def test_arrays_round_trip_with_the_calibration():
    d = _dictionary()
    rng = np.random.default_rng(0)
    d.calibration = fit_calibration(
        rng.random(5000), rng.integers(0, 2, 5000), np.zeros(5000, np.int64), 2, np.array([64.0]), min_samples=100
    )
    arrays = d.arrays()
    assert {"centroids", "calibration.knots", "calibration.table"} <= set(arrays)
    back = Dictionary.from_arrays(arrays)
    np.testing.assert_array_equal(back.centroids, d.centroids)
    q = rng.random(100) * 1.2
    labels = rng.integers(0, 2, 100)
    np.testing.assert_array_equal(back.calibration.apply(q, labels, None), d.calibration.apply(q, labels, None))


def test_memory_scores_by_the_nearest_member_and_centroids_still_label():
    d = _dictionary()
    d.memory = np.array([[0.0, 0.0], [10.0, 0.0], [20.0, 20.0]])
    s, labels = d.score_and_label(np.array([[19.0, 20.0], [1.0, 0.0]]))
    np.testing.assert_allclose(s, [1.0, 1.0], rtol=1e-6)  # centroids alone: hypot(9, 20) and 1
    assert labels.tolist() == [1, 0]
    back = Dictionary.from_arrays(d.arrays())
    np.testing.assert_array_equal(back.memory, d.memory)


def test_coreset_keeps_rare_appearance_that_random_sampling_misses():
    from anomaly_dask.dictionary import coreset

    rng = np.random.default_rng(0)
    common = rng.normal(0.0, 1.0, (20_000, 40))
    rare = rng.normal(0.0, 1.0, (40, 40)) + 12.0  # 0.2 %: a nadir band, say
    x = np.concatenate([common, rare]).astype(np.float32)
    kept = coreset(x, 200, random_state=0)
    assert kept.shape == (200, 40)
    assert (kept.mean(axis=1) > 6).sum() >= 10  # greedy cover reaches the rare group
    random_pick = x[rng.choice(len(x), 200, replace=False)]
    assert (random_pick.mean(axis=1) > 6).sum() <= 3
    assert coreset(x[:50], 200, random_state=0).shape == (50, 40)  # fewer rows than asked: all


def plain_greedy(x: np.ndarray, size: int, first: int) -> np.ndarray:
    """Farthest-first selection, one full distance update per step (float64)."""
    x = x.astype(np.float64)
    chosen = [first]
    nearest = ((x - x[first]) ** 2).sum(1)
    for _ in range(size - 1):
        c = int(nearest.argmax())
        chosen.append(c)
        nearest = np.minimum(nearest, ((x - x[c]) ** 2).sum(1))
    return np.sort(chosen)


@pytest.mark.parametrize("candidates", [1, 7, 64, 5000])
def test_coreset_rounds_choose_what_plain_greedy_selection_chooses(candidates):
    from anomaly_dask.dictionary import coreset

    rng = np.random.default_rng(4)
    centres = rng.normal(0.0, 4.0, (12, 20))
    x = (centres[rng.integers(0, 12, 3000)] + rng.normal(0.0, 1.0, (3000, 20)) * rng.uniform(0.3, 2, (3000, 1)))
    x = x.astype(np.float32)
    kept = coreset(x, 400, random_state=3, dims=32, candidates=candidates)  # 20 dims: no projection
    first = int(np.random.default_rng(3).integers(len(x)))
    np.testing.assert_array_equal(kept, x[plain_greedy(x, 400, first)])


def test_kmeans_seeding_runs_on_a_bounded_subset(monkeypatch):
    """The restarts see at most max(SEED_ROWS, SEED_ROWS_PER_CLUSTER * k) rows; partial_fit
    then starts from their solution."""
    import sklearn.cluster

    import anomaly_dask.dictionary as dictionary_module

    seen: list[int] = []
    real = sklearn.cluster.KMeans

    class Recording(real):
        def fit(self, x, *args, **kwargs):
            assert self.max_iter == dictionary_module.SEED_MAX_ITER
            seen.append(len(x))
            return super().fit(x, *args, **kwargs)

    monkeypatch.setattr(sklearn.cluster, "KMeans", Recording)  # imported when seeding
    monkeypatch.setattr(dictionary_module, "SEED_ROWS", 500)
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(3, 4)) * 10
    x = (centres[rng.integers(0, 3, 5000)] + rng.normal(size=(5000, 4))).astype(np.float32)
    mbk = dictionary_module.init_kmeans(x, 3, 2, 0, 256)
    assert seen == [600]  # 200 rows per cluster beat SEED_ROWS here
    # the seed still finds the three groups
    found = np.sort(np.linalg.norm(mbk.cluster_centers_[:, None] - centres[None], axis=2).min(axis=0))
    assert found.max() < 1.0
    seen.clear()
    dictionary_module.init_kmeans(x, 20, 1, 0, 256)  # 200 rows per cluster: 4000
    assert seen == [4000]
