"""Pixel and region metrics (evaluation.py) and the evaluation report (report.py)."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage

from anomaly_dask.errors import AnomalyDaskError, GroundTruthError, ParameterError
from anomaly_dask.evaluation import MetricsAccumulator, image_metrics
from anomaly_dask.metrics import aupro_from_curve, pro_curve, read_ground_truth, roc_curve_from_hist
from anomaly_dask.regions import near_anomalies
from anomaly_dask.report import gt_overlay, write_report

EIGHT = np.ones((3, 3), dtype=bool)

# A 4x4 case small enough to check by hand. Integer scores with lo=0, hi=4, bins=4 put each
# score value in its own bin, so the binned figures are exact.
TINY_SCORES = np.array(
    [
        [3, 3, 0, 0],
        [3, 1, 0, 2],
        [0, 0, 0, 0],
        [2, 0, 1, 0],
    ],
    dtype=np.float64,
)
TINY_GT = np.array(
    [
        [1, 1, 0, 0],
        [1, 1, 0, 0],
        [0, 0, 0, 0],
        [0, 0, 0, 1],
    ],
    dtype=bool,
)
TINY_KW = dict(lo=0.0, hi=4.0, bins=4)


def blobs(shape: tuple[int, int], seed: int) -> np.ndarray:
    """Ground truth with a few rectangles and a diagonal chain."""
    rng = np.random.default_rng(seed)
    gt = np.zeros(shape, dtype=bool)
    h, w = shape
    for _ in range(5):
        y, x = rng.integers(0, h - 12), rng.integers(0, w - 12)
        gt[y : y + rng.integers(2, 12), x : x + rng.integers(2, 12)] = True
    return gt


# ---------------------------------------------------------------------------------------
# Extreme score maps
# ---------------------------------------------------------------------------------------


def test_perfect_score_map() -> None:
    gt = blobs((48, 48), 0)
    scores = np.where(gt, 10.0, 1.0)
    m = image_metrics(scores, gt, threshold=5.0)
    assert m["auroc"] == pytest.approx(1.0)
    assert m["aupro"] == pytest.approx(1.0)
    assert m["best_f1"] == pytest.approx(1.0)
    assert 1.0 < m["best_threshold"] <= 10.0
    assert m["f1"] == m["precision"] == m["recall"] == pytest.approx(1.0)
    assert m["normal_marked"] == 0.0
    assert m["false_regions"] == 0
    assert m["regions_hit"] == m["regions"] == ndimage.label(gt, EIGHT)[1]


def test_inverted_score_map() -> None:
    gt = blobs((48, 48), 1)
    scores = np.where(gt, 1.0, 10.0)
    m = image_metrics(scores, gt, threshold=5.0)
    assert m["auroc"] == pytest.approx(0.0)
    assert m["aupro"] == pytest.approx(0.0)
    assert m["recall"] == 0.0
    assert m["regions_hit"] == 0
    assert m["regions_missed"] == m["regions"]
    assert m["normal_marked"] == 1.0


def test_random_scores_give_auroc_one_half() -> None:
    rng = np.random.default_rng(2)
    gt = rng.random((128, 128)) < 0.2
    scores = rng.random((128, 128)) * 10
    m = image_metrics(scores, gt, threshold=5.0)
    assert abs(m["auroc"] - 0.5) < 0.02
    # A random map overlaps each region by about the share of normal pixels it marks.
    assert abs(m["aupro"] - 0.15) < 0.03


# ---------------------------------------------------------------------------------------
# Hand-computed case
# ---------------------------------------------------------------------------------------


def test_tiny_case_by_hand() -> None:
    m = image_metrics(TINY_SCORES, TINY_GT, threshold=2.0, **TINY_KW)
    # Anomalous scores 3, 3, 3, 1, 0; normal scores 2, 2, 1 and eight 0s.
    # AUROC: three 3s beat all 11 normals; the 1 beats 8 and ties 1; the 0 ties 8.
    assert m["auroc"] == pytest.approx((3 * 11 + 8 + 0.5 + 4) / (5 * 11))
    # Marked (>= 2): three pixels of the top-left region, (1, 3) and (3, 0).
    assert m["marked_pixels"] == 5
    assert m["precision"] == pytest.approx(3 / 5)
    assert m["recall"] == pytest.approx(3 / 5)
    assert m["f1"] == pytest.approx(2 * 3 / (2 * 3 + 2 + 2))
    assert m["normal_marked"] == pytest.approx(2 / 11)
    assert (m["valid_pixels"], m["anomalous_pixels"], m["normal_pixels"]) == (16, 5, 11)
    # The 2x2 region is hit, the single pixel (3, 3) (score 0) is missed.
    assert (m["regions"], m["regions_hit"], m["regions_missed"]) == (2, 1, 1)
    # (1, 3) and (3, 0) are isolated mask components outside the ground truth.
    assert m["false_regions"] == 2
    assert m["false_regions_per_mpx"] == pytest.approx(2 / 16e-6)
    assert m["false_regions_per_km2"] is None
    # F1 at thresholds 3, 2, 1, 0: 6/8, 6/10, 8/12, 10/21.
    assert m["best_f1"] == pytest.approx(0.75)
    assert m["best_threshold"] == 3.0
    # PRO curve (FPR, PRO): (0, 0), (0, 3/8), (2/11, 3/8), (3/11, 1/2), (1, 1); the PRO
    # at FPR 0.3 lies on the last segment, 1/2 + (0.3 - 3/11) * (1/2) / (8/11).
    end = 0.5 + (0.3 - 3 / 11) * 0.5 / (8 / 11)
    area = 2 / 11 * 3 / 8 + 1 / 11 * (3 / 8 + 1 / 2) / 2 + (0.3 - 3 / 11) * (0.5 + end) / 2
    assert m["aupro"] == pytest.approx(area / 0.3)


def test_tiny_case_per_km2() -> None:
    m = image_metrics(TINY_SCORES, TINY_GT, threshold=2.0, pixel_area_m2=0.25, **TINY_KW)
    # 16 pixels of 0.25 m^2 are 4e-6 km^2.
    assert m["false_regions_per_km2"] == pytest.approx(2 / 4e-6)


def test_curves_have_the_expected_points() -> None:
    normal = np.array([8, 1, 2, 0])
    anomalous = np.array([1, 1, 0, 3])
    fpr, tpr = roc_curve_from_hist(normal, anomalous)
    np.testing.assert_allclose(fpr, [0, 0, 2 / 11, 3 / 11, 1])
    np.testing.assert_allclose(tpr, [0, 3 / 5, 3 / 5, 4 / 5, 1])
    # Two regions: one with fractions 1/4 in bin 1 and 3/4 in bin 3, one all in bin 0.
    fpr, pro = pro_curve(normal, np.array([1.0, 0.25, 0.0, 0.75]), 2)
    np.testing.assert_allclose(pro, [0, 3 / 8, 3 / 8, 1 / 2, 1])
    assert aupro_from_curve(np.array([0.0, 1.0]), np.array([1.0, 1.0]), 0.3) == pytest.approx(1.0)
    assert aupro_from_curve(np.array([0.0, 1.0]), np.array([0.0, 1.0]), 0.5) == pytest.approx(0.25)


# ---------------------------------------------------------------------------------------
# Agreement with scikit-learn, NaN
# ---------------------------------------------------------------------------------------


def test_auroc_agrees_with_sklearn() -> None:
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(3)
    gt = blobs((96, 96), 3)
    scores = rng.gamma(2.0, 1.0, gt.shape) + gt * rng.normal(1.5, 1.0, gt.shape)
    m = image_metrics(scores, gt, threshold=4.0)
    expected = roc_auc_score(gt.ravel(), scores.ravel())
    assert 0.7 < expected < 0.95
    assert m["auroc"] == pytest.approx(expected, abs=1e-3)


def test_nan_pixels_are_ignored() -> None:
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(4)
    gt = np.zeros((40, 40), dtype=bool)
    gt[5:15, 5:15] = True
    gt[30:33, 30:33] = True  # all no-data below: this region must not count
    scores = rng.random(gt.shape) * 4 + gt * 2
    scores[20:, :] = np.where(rng.random((20, 40)) < 0.5, np.nan, scores[20:, :])
    scores[30:33, 30:33] = np.nan
    valid = ~np.isnan(scores)
    m = image_metrics(scores, gt, threshold=3.0)
    assert m["valid_pixels"] == int(valid.sum())
    assert m["anomalous_pixels"] == 100
    assert m["regions"] == 1
    assert m["marked_pixels"] == int(np.count_nonzero(scores[valid] >= 3.0))
    assert m["auroc"] == pytest.approx(roc_auc_score(gt[valid], scores[valid]), abs=1e-3)
    assert m["normal_marked"] == pytest.approx(
        np.count_nonzero((scores >= 3.0) & ~gt & valid) / np.count_nonzero(~gt & valid)
    )


# ---------------------------------------------------------------------------------------
# Block-wise accumulation
# ---------------------------------------------------------------------------------------


def mosaic_case() -> tuple[np.ndarray, np.ndarray]:
    """A 64x64 map whose regions cross the block borders used below."""
    rng = np.random.default_rng(5)
    gt = np.zeros((64, 64), dtype=bool)
    gt[15:25, 10:45] = True  # crosses the row border at 20 and column borders at 16 and 41
    gt[37:60, 30] = True  # U shape: two arms in one block, separate there ...
    gt[37:60, 36] = True
    gt[36, 30:37] = True  # ... joined only in the block above
    for k in range(5):  # diagonal steps across the block corner at (37, 16)
        gt[34 + k, 13 + k] = True
    gt[5, 40] = gt[4, 41] = True  # a diagonal pair across the column border at 41
    scores = rng.random(gt.shape) * 5 + gt * 2.0
    scores[0:3, 0:64] = np.nan
    return scores, gt


ROW_EDGES = (0, 20, 37, 64)
COL_EDGES = (0, 16, 41, 64)


def blocks_of(scores: np.ndarray, gt: np.ndarray) -> list[tuple[np.ndarray, np.ndarray, tuple[int, int]]]:
    """The blocks of an irregular 3x3 grid, in a shuffled order."""
    out = []
    for y0, y1 in zip(ROW_EDGES[:-1], ROW_EDGES[1:]):
        for x0, x1 in zip(COL_EDGES[:-1], COL_EDGES[1:]):
            out.append((scores[y0:y1, x0:x1], gt[y0:y1, x0:x1], (y0, x0)))
    order = np.random.default_rng(6).permutation(len(out))
    return [out[i] for i in order]


def test_blocks_give_the_whole_image_result() -> None:
    scores, gt = mosaic_case()
    whole = MetricsAccumulator(threshold=4.5, pixel_area_m2=0.01, margin=3)
    whole.add(scores, gt, image="mosaic")
    expected = whole.result()
    assert expected["normal_marked_far"] is not None

    acc = MetricsAccumulator(threshold=4.5, pixel_area_m2=0.01, margin=3)
    near = near_anomalies(gt, 3)  # from the whole mask, as evaluate() reads it with a margin
    for s, g, offset in blocks_of(scores, gt):
        y, x = offset
        acc.add(s, g, image="mosaic", offset=offset, shape=gt.shape, near=near[y : y + s.shape[0], x : x + s.shape[1]])
    got = acc.result()

    regions = ndimage.label(gt, EIGHT)[1]
    assert regions == 4  # the band, the U, the diagonal chain, the pair
    mask = ~np.isnan(scores) & (np.nan_to_num(scores) >= 4.5)
    mask_lab, n_mask = ndimage.label(mask, EIGHT)
    false = n_mask - len(np.unique(mask_lab[mask & gt]))
    assert false > 10  # plenty of mask components cross the borders too
    assert got["regions"] == expected["regions"] == regions
    assert got["false_regions"] == expected["false_regions"] == false
    for key, value in expected.items():
        if key == "images":
            continue
        if isinstance(value, float):
            assert got[key] == pytest.approx(value, rel=1e-12), key
        else:
            assert got[key] == value, key
    assert got["images"]["mosaic"]["aupro"] == pytest.approx(expected["images"]["mosaic"]["aupro"])


def test_blocks_of_two_images_interleaved() -> None:
    scores, gt = mosaic_case()
    single = MetricsAccumulator(threshold=4.5)
    single.add(scores, gt, image="a")
    single.add(scores.T.copy(), gt.T.copy(), image="b")
    expected = single.result()

    acc = MetricsAccumulator(threshold=4.5)
    a = blocks_of(scores, gt)
    b = blocks_of(scores.T.copy(), gt.T.copy())
    for (sa, ga, oa), (sb, gb, ob) in zip(a, b):
        acc.add(sb, gb, image="b", offset=ob, shape=(64, 64))
        acc.add(sa, ga, image="a", offset=oa, shape=(64, 64))
    got = acc.result()
    assert got["regions"] == expected["regions"] == 8
    assert got["aupro"] == pytest.approx(expected["aupro"])
    assert got["auroc"] == pytest.approx(expected["auroc"])
    assert got["false_regions"] == expected["false_regions"]
    assert got["images"]["b"]["regions"] == 4


def test_incomplete_image_warns() -> None:
    scores, gt = mosaic_case()
    acc = MetricsAccumulator(threshold=4.5)
    acc.add(scores[20:, :], gt[20:, :], image="m", offset=(20, 0), shape=(64, 64))
    with pytest.warns(UserWarning, match="blocks missing"):
        r = acc.result()
    assert r["images"]["m"]["coverage"] == pytest.approx(44 / 64)


def test_overlapping_blocks_are_refused() -> None:
    scores, gt = mosaic_case()
    acc = MetricsAccumulator(threshold=4.5)
    acc.add(scores[:32], gt[:32], image="m", offset=(0, 0), shape=(64, 64))
    with pytest.raises(ParameterError, match="overlaps"):
        acc.add(scores[:32], gt[:32], image="m", offset=(0, 0), shape=(64, 64))
    with pytest.raises(ParameterError, match="does not fit"):
        acc.add(scores[:32], gt[:32], image="m", offset=(40, 0), shape=(64, 64))
    acc.add(scores[32:], gt[32:], image="m", offset=(32, 0), shape=(64, 64))
    with pytest.raises(ParameterError, match="already complete"):
        acc.add(scores[:8], gt[:8], image="m", offset=(0, 0), shape=(64, 64))


# ---------------------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------------------


def test_ground_truth_of_another_shape() -> None:
    with pytest.raises(GroundTruthError, match=r"\(4, 5\).*\(4, 4\)") as info:
        image_metrics(TINY_SCORES, np.zeros((4, 5), bool), threshold=2.0)
    assert isinstance(info.value, ValueError) and isinstance(info.value, AnomalyDaskError)


def test_ground_truth_not_binary() -> None:
    gt = TINY_GT.astype(np.uint8)
    gt[2, 2] = 2
    with pytest.raises(GroundTruthError, match=r"not binary.*\(0, 1, 2\)"):
        image_metrics(TINY_SCORES, gt, threshold=2.0)
    with pytest.raises(GroundTruthError, match="not binary"):
        read_ground_truth(np.array([[0, -1], [0, 0]]))


@pytest.mark.parametrize("positive", [1, 255, 7])
def test_ground_truth_values_accepted(positive: int) -> None:
    gt = TINY_GT.astype(np.uint8) * positive
    np.testing.assert_array_equal(read_ground_truth(gt), TINY_GT)
    np.testing.assert_array_equal(read_ground_truth(gt[:, :, None]), TINY_GT)
    m = image_metrics(TINY_SCORES, gt, threshold=2.0, **TINY_KW)
    assert m["anomalous_pixels"] == 5


def test_no_anomalous_pixel_anywhere() -> None:
    acc = MetricsAccumulator(threshold=2.0)
    acc.add(TINY_SCORES, np.zeros((4, 4), bool), image="a")
    acc.add(TINY_SCORES, np.zeros((4, 4), np.uint8), image="b")
    with pytest.raises(GroundTruthError, match="no anomalous pixel") as info:
        acc.result()
    assert isinstance(info.value, ValueError)
    # One normal image on its own is fine: the metrics that need anomalies are None.
    m = image_metrics(TINY_SCORES, np.zeros((4, 4), bool), threshold=2.0)
    assert m["auroc"] is None and m["aupro"] is None and m["recall"] is None
    assert m["false_regions"] == 3 and m["normal_marked"] == pytest.approx(5 / 16)


def test_scores_not_two_dimensional() -> None:
    with pytest.raises(ParameterError, match=r"2-D.*\(4, 4, 3\)") as info:
        image_metrics(np.zeros((4, 4, 3)), TINY_GT, threshold=2.0)
    assert isinstance(info.value, ValueError)


def test_bad_parameters() -> None:
    with pytest.raises(ParameterError, match="lo < hi"):
        MetricsAccumulator(1.0, lo=2.0, hi=1.0)
    with pytest.raises(ParameterError, match="max_fpr"):
        MetricsAccumulator(1.0, max_fpr=0.0)


# ---------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------


def test_report_files(tmp_path) -> None:
    scores, gt = mosaic_case()
    acc = MetricsAccumulator(threshold=4.5)
    acc.add(scores, gt, image="sub/mosaic")
    rgb = np.full(gt.shape + (3,), 100, dtype=np.uint8)
    mask = np.nan_to_num(scores) >= 4.5
    paths = write_report(acc, str(tmp_path), overlays=[("sub/mosaic", rgb, gt, mask)])

    assert set(paths) == {"metrics", "roc", "pro", "histogram", "overlay:sub/mosaic"}
    for key in ("roc", "pro", "histogram"):
        with Image.open(paths[key]) as im:
            assert im.format == "PNG" and im.size[0] > 200
    with Image.open(paths["overlay:sub/mosaic"]) as im:
        assert im.size == (64, 64)
        over = np.asarray(im.convert("RGB"))
    assert paths["overlay:sub/mosaic"].endswith("sub_mosaic_gt_overlay.png")
    assert tuple(over[15, 20]) == (0, 255, 0)  # top edge of the band: contour
    inside = gt & ndimage.binary_erosion(gt)
    assert np.all(over[~mask & ~gt] == 100)
    assert np.all(over[mask & inside][:, 0] > 150) and np.all(over[mask & inside][:, 1] < 100)
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["auroc"] == pytest.approx(acc.result()["auroc"])
    assert metrics["images"]["sub/mosaic"]["regions"] == 4
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "histogram.png", "metrics.json", "pro.png", "roc.png", "sub_mosaic_gt_overlay.png",
    ]


def test_report_from_result_dict(tmp_path) -> None:
    acc = MetricsAccumulator(threshold=2.0, **TINY_KW)
    acc.add(TINY_SCORES, TINY_GT)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        paths = write_report({**acc.result(), "histograms": acc.histograms()}, str(tmp_path / "a"))
    assert set(paths) == {"metrics", "roc", "pro", "histogram"}
    with pytest.warns(UserWarning, match="no histograms"):
        paths = write_report(acc.result(), str(tmp_path / "b"))
    assert set(paths) == {"metrics"}
    assert json.loads((tmp_path / "b" / "metrics.json").read_text())["f1"] == pytest.approx(0.6)


def test_gt_overlay_checks_shapes() -> None:
    with pytest.raises(ParameterError, match="same height and width"):
        gt_overlay(np.zeros((4, 4, 3), np.uint8), np.zeros((4, 5), bool), np.zeros((4, 4), bool))


# ----------------------------------------------------------------------------------------
# AnomalyDetector.evaluate and the CLI
# ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory):
    """A FAST model, a test folder with masks named after its images, and its report."""
    from PIL import Image

    from anomaly_dask import AnomalyDetector

    from .conftest import FAST, texture

    root = tmp_path_factory.mktemp("evaluate")
    (root / "test").mkdir()
    (root / "gt").mkdir()
    for k in range(2):
        img = texture(160, 192, 30 + k)
        gt = np.zeros((160, 192), np.uint8)
        img[40:80, 60:110] = (np.indices((40, 50)).sum(axis=0) % 2 * 255)[..., None]  # fine checkerboard
        gt[40:80, 60:110] = 255
        Image.fromarray(img).save(root / "test" / f"t{k}.png")
        Image.fromarray(gt).save(root / "gt" / f"t{k}_mask.png")
    ad = AnomalyDetector(**{**FAST, "chunk_size": 64, "false_alarm_rate": 0.05}).train(
        [texture(160, 192, 1), texture(160, 192, 2)], [texture(160, 192, 3)]
    )
    result = ad.evaluate(str(root / "test"), str(root / "gt"), str(root / "report"))
    return {"root": root, "model": ad, "result": result}


def test_evaluate_scores_chunk_by_chunk_and_writes_the_report(evaluated):
    from PIL import Image

    r, ad = evaluated["result"], evaluated["model"]
    assert r["auroc"] > 0.75 and r["regions"] == 2 and r["regions_hit"] == 2
    assert set(r["images"]) == {"t0", "t1"}
    assert r["false_alarm_rate"] == ad.false_alarm_rate_ and r["threshold"] == ad.threshold_
    # the same figures as one whole image scored in memory
    whole = MetricsAccumulator(ad.threshold_, lo=0.0, hi=20.0, bins=8192)
    for k in range(2):
        gt = np.asarray(Image.open(evaluated["root"] / "gt" / f"t{k}_mask.png")) > 0
        whole.add(ad.score_image(str(evaluated["root"] / "test" / f"t{k}.png")), gt, image=f"t{k}")
    ref = whole.result()
    for key in ("auroc", "aupro", "f1", "normal_marked", "normal_marked_far", "false_regions"):
        assert r[key] == pytest.approx(ref[key], abs=1e-6), key
    for name in ("metrics.json", "roc.png", "pro.png", "histogram.png", "t0_gt_overlay.png"):
        assert (evaluated["root"] / "report" / name).stat().st_size > 0


def test_evaluate_refuses_bad_ground_truth_before_scoring(evaluated, tmp_path):
    from PIL import Image

    ad, root = evaluated["model"], evaluated["root"]
    image = str(root / "test" / "t0.png")
    partial = tmp_path / "partial_gt"
    partial.mkdir()
    Image.fromarray(np.zeros((160, 192), np.uint8)).save(partial / "t0.png")  # none for t1
    with pytest.raises(GroundTruthError, match="no ground truth .* for 1 test image"):
        ad.evaluate(str(root / "test"), str(partial))
    Image.fromarray(np.zeros((100, 100), np.uint8)).save(tmp_path / "small.png")
    with pytest.raises(GroundTruthError, match="100x100 px but its test image"):
        ad.evaluate(image, str(tmp_path / "small.png"))
    grey = np.zeros((160, 192), np.uint8)
    grey[:10, :10] = 7
    grey[20:30, :10] = 9
    Image.fromarray(grey).save(tmp_path / "grey.png")
    with pytest.raises(GroundTruthError, match="binary"):
        ad.evaluate(image, str(tmp_path / "grey.png"))
    Image.fromarray(np.zeros((160, 192), np.uint8)).save(tmp_path / "none.png")
    with pytest.raises(GroundTruthError, match="no anomalous pixel"):
        ad.evaluate(image, str(tmp_path / "none.png"))


def test_cli_evaluate_prints_metrics_and_writes_the_report(evaluated, tmp_path, capsys, scheduler_args):
    import json

    from anomaly_dask.cli import main

    root = evaluated["root"]
    model = str(tmp_path / "m.safetensors")
    evaluated["model"].save(model)
    code = main(["evaluate", model, str(root / "test"), "--ground-truth", str(root / "gt"),
                 "--output", str(tmp_path / "rep"), *scheduler_args, "-q"])
    assert code == 0
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert printed["auroc"] == pytest.approx(evaluated["result"]["auroc"], abs=1e-9)
    assert (tmp_path / "rep" / "metrics.json").exists()
    code = main(["evaluate", model, str(root / "test"), "--ground-truth", str(tmp_path), "--output",
                 str(tmp_path / "rep2"), *scheduler_args, "-q"])
    assert code == 1 and "no ground truth" in capsys.readouterr().err


def test_normal_marked_far_leaves_out_pixels_beside_anomalies():
    gt = np.zeros((100, 100), bool)
    gt[40:50, 40:50] = True
    scores = np.zeros((100, 100))
    scores[35:55, 35:55] = 5.0  # the anomaly and a 5 px halo around it
    scores[0, :10] = 5.0  # 10 false alarms far from it
    m = image_metrics(scores, gt, threshold=1.0, margin=8)
    normal = 100 * 100 - 100
    assert m["normal_marked"] == pytest.approx((20 * 20 - 100 + 10) / normal)
    far = normal - int(((ndimage.distance_transform_edt(~gt) <= 8) & ~gt).sum())
    assert m["normal_marked_far"] == pytest.approx(10 / far)
    # blocks with their own near masks give the same as the whole image
    acc = MetricsAccumulator(threshold=1.0, margin=8)
    near = near_anomalies(gt, 8)
    for y in (0, 50):
        for x in (0, 50):
            acc.add(scores[y : y + 50, x : x + 50], gt[y : y + 50, x : x + 50], image="i", offset=(y, x),
                    shape=(100, 100), near=near[y : y + 50, x : x + 50])
    assert acc.result()["normal_marked_far"] == pytest.approx(m["normal_marked_far"])
