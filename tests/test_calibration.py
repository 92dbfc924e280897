"""Calibration: conformal p-values per group against plain numpy, fallbacks, held-out rates."""

from __future__ import annotations

import numpy as np
import pytest

from anomaly_dask import AnomalyDetector
from anomaly_dask.calibration import decision_rule, distance_classes, fit_calibration, threshold_for_rate
from anomaly_dask.errors import ParameterError

from .conftest import FAST, texture


def _reference(calibration_scores: np.ndarray, s: np.ndarray) -> np.ndarray:
    """-log10 of the split-conformal p-value (1 + #{x >= s}) / (n + 1), by brute force."""
    x = np.asarray(calibration_scores, dtype=np.float64)
    at_least = (x[None, :] >= np.asarray(s, dtype=np.float64)[:, None]).sum(axis=1)
    return -np.log10((1.0 + at_least) / (len(x) + 1.0))


def test_calibrated_scores_match_a_numpy_reference_in_the_body():
    rng = np.random.default_rng(0)
    x = rng.gamma(2.0, 1.0, 3000)
    cal = fit_calibration(x, np.zeros(len(x), np.int64), np.zeros(len(x), np.int64), 1, np.zeros(0), tail=30)
    body = np.sort(x)[: len(x) - 31]  # below the exponential tail
    got = cal.apply(body, np.zeros(len(body), np.int64), None)
    want = _reference(x, body)
    # linear interpolation between 96 log-spaced knots: a few hundredths of a decade at most
    assert np.abs(got - want).max() < 0.05
    # at the knots themselves it is exact
    knots = cal.knots[0][cal.knots[0] <= body.max()]
    np.testing.assert_allclose(cal.apply(knots, np.zeros(len(knots), np.int64), None), _reference(x, knots), atol=1e-5)


def test_the_tail_keeps_scores_ordered_beyond_the_largest_sample():
    rng = np.random.default_rng(1)
    x = rng.exponential(1.0, 20_000)
    zeros = np.zeros(len(x), np.int64)
    cal = fit_calibration(x, zeros, zeros, 1, np.zeros(0), tail=2000)
    q = np.linspace(x.max(), x.max() + 10, 50)
    v = cal.apply(q, np.zeros(50, np.int64), None)
    assert (np.diff(v) > 0).all()
    # exponential data: the fitted tail is about exponential (shape near 0) and decays about
    # as fast as the truth, log10(e) per unit
    assert abs(cal.tail_shape[0]) < 0.1
    assert (v[-1] - v[0]) / 10 == pytest.approx(np.log10(np.e), rel=0.3)
    assert np.isnan(cal.apply(np.array([np.nan]), np.zeros(1, np.int64), None)).all()


def test_a_light_tail_is_not_extrapolated_as_an_exponential_one():
    rng = np.random.default_rng(5)
    x = np.abs(rng.normal(0.0, 1.0, 200_000))  # half-normal: lighter than exponential
    zeros = np.zeros(len(x), np.int64)
    cal = fit_calibration(x, zeros, zeros, 1, np.zeros(0), tail=20_000)  # the tail from p = 0.1
    assert cal.tail_shape[0] < -0.05
    # at the true 1e-4 quantile the calibrated value is about 4 (an exponential fit gives less)
    from scipy.stats import halfnorm

    q = halfnorm.isf(1e-4)
    assert cal.apply(np.array([q]), np.zeros(1, np.int64), None)[0] == pytest.approx(4.0, abs=0.5)


def test_groups_fall_back_to_their_distance_class_then_to_all():
    rng = np.random.default_rng(2)
    labels = np.r_[np.zeros(5000), np.ones(5000), np.full(50, 2), np.zeros(50)].astype(np.int64)
    classes = np.r_[np.zeros(10_050), np.ones(50)].astype(np.int64)
    scores = rng.random(len(labels))
    cal = fit_calibration(scores, labels, classes, 3, np.array([64.0]), min_samples=1000)
    # pooled, class 0, (0, centroid 0), (0, centroid 1); class 1 too small
    assert cal.n_groups == 4
    t = cal.table
    assert t[0, 0] != t[0, 1] and t[0, 2] == 1  # centroid 2 falls back to its class
    assert (t[1] == 0).all()  # class 1 falls back to all pixels
    g = cal.groups(np.array([0, 2, 0]), np.array([100.0, 100.0, 10.0]))
    assert g.tolist() == [t[0, 0], 1, 0]
    for grouping, n in (("distance", 2), ("global", 1)):
        assert fit_calibration(scores, labels, classes, 3, np.array([64.0]), grouping=grouping, min_samples=1000).n_groups == n


@pytest.mark.parametrize("rate", [1e-2, 1e-3])
def test_rare_varied_pixels_are_marked_at_the_rate_on_fresh_samples(rate):
    """Two kinds of normal pixel on different scales: a pooled calibration marks the rare,
    broad kind far more often than the rate; with groups, fresh samples of it are marked
    at the rate, and no group more often than its parent allows."""
    rng = np.random.default_rng(3)

    def draw(n: int) -> tuple[np.ndarray, np.ndarray]:
        labels = (rng.random(n) < 0.1).astype(np.int64)  # 10 %: rare, varied appearance
        scores = np.where(labels == 1, rng.gamma(2.0, 3.0, n), rng.gamma(2.0, 1.0, n))
        return scores, labels

    s, lab = draw(400_000)
    cal = fit_calibration(s, lab, np.zeros(len(s), np.int64), 2, np.zeros(0), min_samples=1000)
    t = threshold_for_rate(rate)
    fresh, fl = draw(400_000)
    marked = cal.apply(fresh, fl, None) >= t
    assert rate / 2 <= marked[fl == 1].mean() <= 2 * rate
    assert marked[fl == 0].mean() <= 2 * rate and marked.mean() <= 2 * rate
    pooled = fit_calibration(s, lab, np.zeros(len(s), np.int64), 2, np.zeros(0), grouping="global")
    by_pool = pooled.apply(fresh, fl, None) >= t
    assert by_pool[fl == 1].mean() > 5 * rate  # what grouping fixes


def test_a_group_value_never_exceeds_its_parents():
    rng = np.random.default_rng(4)
    labels = rng.integers(0, 3, 30_000)
    scores = rng.gamma(2.0, 1.0 + labels)
    cal = fit_calibration(scores, labels, np.zeros(len(scores), np.int64), 3, np.zeros(0), min_samples=1000)
    assert cal.n_groups == 5 and cal.parents.tolist() == [-1, -1, 1, 1, 1]
    q = np.linspace(0, 40, 400)
    pooled = fit_calibration(scores, labels, np.zeros(len(scores), np.int64), 3, np.zeros(0), grouping="global")
    for c in range(3):
        own = cal.apply(q, np.full(len(q), c), None)
        assert (own <= pooled.apply(q, np.full(len(q), c), None) + 1e-6).all()
        assert (np.diff(own) >= -1e-9).all()  # still a monotone map of the raw score


def test_distance_classes_count_the_edges_a_pixel_is_nearer_than():
    edges = np.array([128.0, 64.0, 32.0, 16.0, 8.0])
    d = np.array([[np.inf, 128, 127.9, 64], [40, 32, 20, 16], [10, 8, 3, 0]])
    assert distance_classes(d, edges).tolist() == [[0, 0, 1, 1], [2, 2, 3, 3], [4, 4, 5, 5]]
    assert distance_classes(None, edges, (2, 3)).tolist() == [[0] * 3] * 2


def test_the_seed_rules_are_false_alarm_rates():
    assert decision_rule(None, 1e-3, 0.95, 1.645, None) == pytest.approx((3.0, 1e-3))
    assert decision_rule("cdf", 1e-3, 0.95, 1.645, None) == pytest.approx((-np.log10(0.05), 0.05))
    thr, rate = decision_rule("zscore", 1e-3, 0.95, 1.645, None)
    assert rate == pytest.approx(0.05, abs=1e-4) and thr == pytest.approx(-np.log10(rate))
    assert decision_rule("manual", 1e-3, 0.95, 1.645, 2.0) == pytest.approx((2.0, 1e-2))
    with pytest.raises(ParameterError, match="manual"):
        decision_rule("manual", 1e-3, 0.95, 1.645, None)
    with pytest.raises(ParameterError, match="false_alarm_rate"):
        AnomalyDetector(false_alarm_rate=0.0)._settings()


@pytest.fixture(scope="module")
def stationary() -> dict[str, object]:
    """A FAST model calibrated on 9 validation images of a stationary texture, and 8 more
    normal images of it (same size: image borders score a little higher) that neither
    training nor calibration saw. The texture has rare extreme blobs, so fewer validation
    images leave the tail under-sampled (3 images: 1-10x the rate at 1e-3)."""
    train = [texture(384, 384, s) for s in (1, 2)]
    val = [texture(384, 384, s) for s in range(3, 12)]
    held_out = [texture(384, 384, s) for s in range(12, 20)]
    ad = AnomalyDetector(**{**FAST, "chunk_size": 384}).train(train, val)
    return {"model": ad, "held_out": [ad.score_image(im) for im in held_out]}


@pytest.mark.parametrize("rate", [1e-2, 1e-3])
def test_normal_images_not_calibrated_on_are_marked_at_the_requested_rate(stationary, rate):
    ad = stationary["model"]
    scores = np.concatenate([s.ravel() for s in stationary["held_out"]])
    thr, promised = decision_rule(None, rate, 0.95, 1.645, None)
    marked = float((scores >= thr).mean())
    print(f"requested {rate:g}: held-out normal pixels marked {marked:.5f}")
    assert rate / 2 <= marked <= 2 * rate
    assert promised == rate and ad.false_alarm_rate_ == 1e-3


def test_a_loaded_model_takes_a_new_rate_without_retraining(stationary, tmp_path):
    ad = stationary["model"]
    path = str(tmp_path / "m.safetensors")
    ad.save(path)
    again = AnomalyDetector.load(path)
    assert again.threshold_ == ad.threshold_ and again.false_alarm_rate_ == ad.false_alarm_rate_
    looser = AnomalyDetector.load(path, false_alarm_rate=0.01)
    assert looser.threshold_ == pytest.approx(2.0) and looser.false_alarm_rate_ == 0.01


def test_calibration_once_per_run_equals_calibration_of_every_pixel():
    """Scores constant over runs of alike pixels except near no-data (pixel-level values,
    NaN, other distance classes): calibrated once per run where a pixel agrees with its
    run's first pixel, and pixel by pixel elsewhere, the values are those of every pixel."""
    from anomaly_dask.grid import expand_runs, pixel_runs
    from anomaly_dask.scoring import calibrate_by_runs

    rng = np.random.default_rng(7)
    n = 20_000
    cal = fit_calibration(rng.random(n), rng.integers(0, 3, n), rng.integers(0, 3, n), 3, np.array([64.0, 16.0]), min_samples=500)
    rows, cols = pixel_runs(3, 203, 8, 32, 30), pixel_runs(0, 150, 8, 32, 20)
    shape = (len(rows.first), len(cols.first))
    scores = expand_runs(rng.random(shape).astype(np.float32) * 1.3, rows, cols)
    labels = expand_runs(rng.integers(0, 3, shape), rows, cols)
    distance = np.full(scores.shape, 500.0, dtype=np.float32)
    distance[:, :40] = np.linspace(0.0, 90.0, 40, dtype=np.float32)  # classes change inside runs
    distance[:, 29] = 10.0  # inside the run of columns 28-31, away from pixel-level scores
    edge = np.zeros(scores.shape, dtype=bool)
    edge[:, :25] = rng.random((scores.shape[0], 25)) < 0.5
    scores[edge] = rng.random(int(edge.sum())).astype(np.float32)  # pixel-level scores near no-data
    scores[:, :3] = np.nan
    got = calibrate_by_runs(cal, scores, labels, distance, rows, cols)
    np.testing.assert_array_equal(got, cal.apply(scores, labels, distance))
    np.testing.assert_array_equal(
        calibrate_by_runs(cal, scores[:, 50:], labels[:, 50:], None, rows, pixel_runs(50, 150, 8, 32, 20)),
        cal.apply(scores[:, 50:], labels[:, 50:], None),
    )
