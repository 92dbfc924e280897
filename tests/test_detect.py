"""detect(): huge-image scoring into a zarr store — no-data, resume after a kill, GeoTIFF, S3."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import zarr

from anomaly_dask import AnomalyDetector
from anomaly_dask.datasets import SonarScene, write_tiff
from anomaly_dask.errors import OutputExistsError
from anomaly_dask.store import OutputStore

from .conftest import FAST, REPO


@pytest.fixture(scope="module")
def sonar(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    """A trained FAST model (saved) and a small GeoTIFF sonar mosaic with no-data."""
    root = tmp_path_factory.mktemp("sonar")
    write_tiff(str(root / "train.tif"), SonarScene(384, 512, seed=1, n_objects=0))
    write_tiff(str(root / "val.tif"), SonarScene(256, 512, seed=2, n_objects=0))
    scene = SonarScene(520, 610, seed=3, n_objects=4)
    write_tiff(str(root / "test.tif"), scene)
    ad = AnomalyDetector(**{**FAST, "chunk_size": 128}).train(str(root / "train.tif"), str(root / "val.tif"))
    ad.save(str(root / "model.safetensors"))
    return {"root": root, "model": ad, "scene": scene, "test": str(root / "test.tif")}


def assert_close_scores(a: np.ndarray, b: np.ndarray) -> None:
    """Same no-data pixels; scores equal to float rounding (1e-6 of their range): `detect`,
    `test` and `score_image` cut an image into the same chunks."""
    np.testing.assert_array_equal(np.isnan(a), np.isnan(b))
    span = np.nanmax(b) - np.nanmin(b)
    assert np.nanmax(np.abs(a - b)) <= 1e-6 * span


def test_store_contents_and_nodata(sonar, tmp_path):
    ad, scene = sonar["model"], sonar["scene"]
    summary = ad.detect(sonar["test"], str(tmp_path / "out.zarr"))
    g = zarr.open_group(str(tmp_path / "out.zarr"), mode="r")
    score, mask, overlay = g["score"][:], g["mask"][:], g["overlay"][:]
    assert score.shape == mask.shape == (520, 610) and overlay.shape == (520, 610, 3)
    assert g["score"].chunks == (128, 128)
    valid = scene.valid(0, 520, 0, 610)
    assert not valid.all()
    assert np.isnan(score[~valid]).all() and np.isfinite(score[valid]).all()
    assert (mask[~valid] == 0).all()  # no-data is never anomalous
    np.testing.assert_array_equal(mask > 0, np.nan_to_num(score, nan=-np.inf) >= ad.threshold_)
    attrs = dict(g.attrs)
    assert attrs["complete"] is True
    assert attrs["threshold"] == ad.threshold_
    assert attrs["model_fingerprint"] == ad.fingerprint_
    assert attrs["georef"]["crs_epsg"] == 32631
    assert summary["computed_chunks"] == summary["chunks"] == 5 * 5
    assert summary["anomalous_pixels"] == int((mask > 0).sum())
    # the store equals in-memory scoring of the same image
    direct = ad.score_image(sonar["test"])
    assert_close_scores(score, direct)
    assert (tmp_path / "out_quicklook.png").exists()


def test_pixels_near_nodata_are_calibrated_against_their_own_kind(sonar, tmp_path):
    """Calibration groups by distance to no-data: on the validation mosaic, pixels near
    swath edges are marked about as often as interior ones, where one pooled calibration
    marks them far more often."""
    from scipy.ndimage import distance_transform_edt

    for name, seed in (("train", 11), ("val", 12)):
        write_tiff(str(tmp_path / f"{name}.tif"), SonarScene(1024, 1024, seed=seed, n_objects=0))
    kw = {**FAST, "weights": "imagenet", "kmeans_clusters": 16, "chunk_size": 512, "false_alarm_rate": 0.01,
          "runtime": "auto"}  # OpenVINO where installed: 1 Mpx mosaics, converted once
    ad, pooled = (
        AnomalyDetector(**kw, calibration_groups=g).train(str(tmp_path / "train.tif"), str(tmp_path / "val.tif"))
        for g in ("distance", "global")
    )
    cal = ad.dictionary_.calibration
    assert cal.distance_edges.tolist() == [128, 64, 32, 16, 8]
    assert cal.n_groups > 2 and pooled.dictionary_.calibration.n_groups == 1
    scene = SonarScene(1024, 1024, seed=12, n_objects=0)
    valid = scene.valid(0, 1024, 0, 1024)
    dist = distance_transform_edt(valid)
    near, inside = valid & (dist <= 32), dist >= 128
    rate = lambda s, sel: float((s[sel] >= ad.threshold_).mean())  # noqa: E731
    grouped, plain = (m.score_image(str(tmp_path / "val.tif")) for m in (ad, pooled))
    print(
        f"validation mosaic: marked {rate(grouped, near):.4f} within 32 px of no-data "
        f"({rate(plain, near):.4f} pooled), {rate(grouped, inside):.4f} beyond 128 px"
    )
    assert rate(grouped, near) <= 2 * 0.01 and rate(grouped, inside) <= 2 * 0.01
    assert rate(plain, near) > 2 * rate(grouped, near)

def test_other_model_into_same_store_is_refused(sonar, tmp_path):
    out = str(tmp_path / "out.zarr")
    sonar["model"].detect(sonar["test"], out, quicklook=False)
    other = AnomalyDetector(**{**FAST, "chunk_size": 128, "kmeans_clusters": 5}).train(
        sonar["scene"].render(0, 256, 0, 256)
    )
    with pytest.raises(OutputExistsError, match="overwrite=True"):
        other.detect(sonar["test"], out, quicklook=False)
    other.detect(sonar["test"], out, quicklook=False, overwrite=True)
    assert zarr.open_group(out, mode="r").attrs["threshold"] == other.threshold_


def test_geotiff_keeps_the_input_georeference(sonar, tmp_path):
    rasterio = pytest.importorskip("rasterio")
    out = tmp_path / "out.zarr"
    sonar["model"].detect(sonar["test"], str(out), geotiff=("mask", "score"), quicklook=False)
    with rasterio.open(sonar["test"]) as src:
        transform, crs = src.transform, src.crs
    for name in ("mask", "score"):
        with rasterio.open(tmp_path / f"out_{name}.tif") as tif:
            assert tif.transform == transform
            assert tif.crs == crs and tif.crs.to_epsg() == 32631
            assert (tif.height, tif.width) == (520, 610)
    g = zarr.open_group(str(out), mode="r")
    with rasterio.open(tmp_path / "out_mask.tif") as tif:
        # 1 anomalous, 0 normal, 255 (the file's no-data) where the store's score is NaN
        assert tif.nodata == 255 and tif.overviews(1) and tif.tags()["model_fingerprint"] == sonar["model"].fingerprint_
        want = np.where(np.isnan(g["score"][:]), 255, g["mask"][:] > 0)
        assert (want == 255).any() and (want == 1).any()
        np.testing.assert_array_equal(tif.read(1), want)


def test_geotiff_keeps_a_projected_crs_with_a_low_epsg_code(sonar, tmp_path):
    """EPSG:4087 is projected although its code lies among geographic ones (4000-4999)."""
    rasterio = pytest.importorskip("rasterio")
    moved = tmp_path / "test_4087.tif"
    with rasterio.open(sonar["test"]) as src:
        profile = {**src.profile, "crs": rasterio.crs.CRS.from_epsg(4087)}
        with rasterio.open(moved, "w", **profile) as dst:
            dst.write(src.read())
    out = tmp_path / "out.zarr"
    sonar["model"].detect(str(moved), str(out), geotiff=("mask", "score"), quicklook=False)
    assert zarr.open_group(str(out), mode="r").attrs["georef"]["crs_epsg"] == 4087
    with rasterio.open(moved) as src:
        transform, crs = src.transform, src.crs
    for name, nodata in (("mask", 255), ("score", None)):
        with rasterio.open(tmp_path / f"out_{name}.tif") as tif:
            assert tif.crs == crs and tif.crs.is_projected and tif.crs.to_epsg() == 4087
            assert tif.transform == transform
            assert tif.nodata == nodata if nodata is not None else np.isnan(tif.nodata)
            assert tif.descriptions[0].startswith(f"anomaly {name}")


def test_outputs_to_s3(sonar, s3):
    import s3fs

    options, bucket = s3
    url = f"s3://{bucket}/survey/out.zarr"
    # 256 px chunks: each object costs a request to the S3 server, and 9 chunks show as much as 25
    ad = AnomalyDetector.load(str(sonar["root"] / "model.safetensors"), chunk_size=256, verbose=0, runtime="torch")
    summary = ad.detect(sonar["test"], url, storage_options=options, png_tiles=True)
    g = zarr.open_group(url, mode="r", storage_options=options)
    assert g.attrs["complete"] is True and g["score"].chunks == (256, 256)
    assert_close_scores(g["score"][:], ad.score_image(sonar["test"]))
    fs = s3fs.S3FileSystem(**options)
    assert fs.exists(f"{bucket}/survey/out_quicklook.png")
    assert fs.exists(f"{bucket}/survey/out_contacts.geojson")
    assert summary["png_tiles"] == 9
    with pytest.raises(FileNotFoundError, match="no-such-bucket"):
        ad.detect(sonar["test"], "s3://no-such-bucket/out.zarr", storage_options=options)
    assert not fs.exists("no-such-bucket")


CHILD = """
import sys
from anomaly_dask import AnomalyDetector
ad = AnomalyDetector.load(sys.argv[1], chunk_size=96, verbose=0, runtime="torch")
ad.detect(sys.argv[2], sys.argv[3], quicklook=False)
"""


def test_killed_run_resumes_without_recomputing(sonar, tmp_path):
    model, image = str(sonar["root"] / "model.safetensors"), str(tmp_path / "line.tif")
    write_tiff(image, SonarScene(384, 480, seed=3, n_objects=2))
    killed, clean = tmp_path / "killed.zarr", tmp_path / "clean.zarr"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-c", CHILD, model, image, str(killed)], env=env)
    deadline = time.time() + 120
    done_dir = tmp_path / "killed.zarr.done"
    while time.time() < deadline and proc.poll() is None:
        if done_dir.exists() and len(list(done_dir.iterdir())) >= 5:
            break
        time.sleep(0.05)
    assert proc.poll() is None, "the run finished before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    n_before = len(OutputStore.open(str(killed)).done_chunks())
    total = 4 * 5  # 384 x 480 px in 96 px chunks
    assert 3 <= n_before < total
    assert zarr.open_group(str(killed), mode="r").attrs["complete"] is False
    ad = AnomalyDetector.load(model, chunk_size=96, verbose=0, runtime="torch")
    resumed = ad.detect(image, str(killed), quicklook=False)
    assert resumed["computed_chunks"] == total - n_before
    full = ad.detect(image, str(clean), quicklook=False)
    assert full["computed_chunks"] == total
    a, b = zarr.open_group(str(killed), mode="r"), zarr.open_group(str(clean), mode="r")
    for name in ("score", "mask", "overlay"):
        np.testing.assert_array_equal(a[name][:], b[name][:])
    assert a.attrs["complete"] is True
