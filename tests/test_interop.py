"""Outputs opened by the tools analysts use: rasterio (GDAL), xarray + rioxarray, the
ome-zarr reader behind napari, geopandas; re-thresholding without the CNN; the CLI's
``contacts`` command and its refusals."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import rasterio
import zarr

from anomaly_dask import AnomalyDetector, cli
from anomaly_dask.datasets import SonarScene, write_tiff
from anomaly_dask.scoring import Extractor

from .conftest import FAST

H, W = 300, 350


@pytest.fixture(scope="module")
def georeferenced(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A FAST sonar model (saved) and a GeoTIFF test mosaic in EPSG:32631 with no-data."""
    root = tmp_path_factory.mktemp("interop")
    write_tiff(str(root / "train.tif"), SonarScene(256, 384, seed=1, n_objects=0))
    write_tiff(str(root / "val.tif"), SonarScene(192, 384, seed=2, n_objects=0))
    write_tiff(str(root / "test.tif"), SonarScene(H, W, seed=3, n_objects=3))
    ad = AnomalyDetector(**{**FAST, "chunk_size": 128, "false_alarm_rate": 0.01}).train(
        str(root / "train.tif"), str(root / "val.tif")
    )
    ad.save(str(root / "model.safetensors"))
    return {"root": root, "model": ad, "test": str(root / "test.tif"), "path": str(root / "model.safetensors")}


@pytest.fixture(scope="module")
def detected(georeferenced: dict[str, Any]) -> dict[str, Any]:
    root = georeferenced["root"]
    out = root / "out" / "test.zarr"
    out.parent.mkdir()
    summary = georeferenced["model"].detect(
        georeferenced["test"], str(out), geotiff=("mask", "score", "overlay"), outlines=True
    )
    return {"out": out, "summary": summary}


def test_geotiffs_read_by_gdal_with_crs_transform_nodata_overviews_and_bands(georeferenced, detected):
    with rasterio.open(georeferenced["test"]) as src:
        crs, transform = src.crs, src.transform
    for name, bands in (("mask", 1), ("score", 1), ("overlay", 3)):
        path = detected["out"].parent / f"test_{name}.tif"
        assert detected["summary"][f"geotiff_{name}"] == str(path)
        with rasterio.open(path) as ds:
            assert ds.crs == crs and ds.transform == transform and ds.count == bands
            assert ds.tags(ns="IMAGE_STRUCTURE")["LAYOUT"] == "COG" and ds.overviews(1) == []  # < 1 tile
            assert all(ds.descriptions) and float(ds.tags()["threshold"]) == georeferenced["model"].threshold_
        with rasterio.open(path) as ds:
            if name == "mask":
                assert ds.nodata == 255 and set(np.unique(ds.read(1))) <= {0, 1, 255}
            elif name == "score":
                assert np.isnan(ds.nodata)


def test_xarray_and_rioxarray_see_the_crs_coordinates_and_nan_fill(georeferenced, detected):
    xr = pytest.importorskip("xarray")
    pytest.importorskip("rioxarray")
    with rasterio.open(georeferenced["test"]) as src:
        crs, transform = src.crs, src.transform
    ds = xr.open_zarr(str(detected["out"]), consolidated=False)
    assert set(ds.data_vars) == {"score", "mask", "overlay"}
    assert ds.rio.crs.to_epsg() == crs.to_epsg() == 32631
    assert ds.score.rio.transform().almost_equals(transform)
    assert ds.x.size == W and ds.y.size == H
    assert float(ds.x[0]) == pytest.approx(transform.c + transform.a / 2)
    assert float(ds.y[0]) == pytest.approx(transform.f + transform.e / 2)
    assert np.isnan(zarr.open_array(str(detected["out"]), path="score", mode="r").fill_value)
    assert ds.score.attrs["grid_mapping"] == "spatial_ref"
    assert not any(name.startswith("_") for name in zarr.open_group(str(detected["out"]), mode="r"))


def test_zarr_v2_store_opens_in_xarray_with_the_same_pixels(georeferenced, detected, tmp_path):
    xr = pytest.importorskip("xarray")
    pytest.importorskip("rioxarray")
    out = tmp_path / "v2.zarr"
    georeferenced["model"].detect(georeferenced["test"], str(out), zarr_format=2, quicklook=False, contacts=())
    assert (out / ".zgroup").exists() and not (out / "zarr.json").exists()
    ds = xr.open_zarr(str(out), consolidated=False)
    v3 = xr.open_zarr(str(detected["out"]), consolidated=False)
    assert ds.rio.crs == v3.rio.crs and ds.mask.dtype == np.uint8
    np.testing.assert_array_equal(ds.score.values, v3.score.values)
    np.testing.assert_array_equal(ds.mask.values, v3.mask.values)


def test_ome_zarr_reader_opens_the_score_pyramid(detected):
    pytest.importorskip("ome_zarr")
    from ome_zarr.io import parse_url
    from ome_zarr.reader import Multiscales, Reader

    nodes = list(Reader(parse_url(str(detected["out"])))())
    assert nodes and any(isinstance(spec, Multiscales) for spec in nodes[0].specs)
    shapes = [tuple(level.shape) for level in nodes[0].data]
    assert shapes == [(H, W), (150, 175)]
    top = np.asarray(nodes[0].data[0])
    half = np.asarray(nodes[0].data[1])
    assert np.nanmax(half) == pytest.approx(np.nanmax(top))  # max of 2x2 keeps the peak


def test_contacts_in_the_input_crs_sorted_by_peak(georeferenced, detected):
    gpd = pytest.importorskip("geopandas")
    out = detected["out"].parent
    points = gpd.read_file(out / "test_contacts.geojson")
    package = gpd.read_file(out / "test_contacts.gpkg")
    assert len(points) == len(package) == detected["summary"]["contacts"] > 0
    assert package.crs.to_epsg() == 32631
    assert list(package["peak_score"]) == sorted(package["peak_score"], reverse=True)
    outlines = gpd.read_file(out / "test_outlines.geojson")
    assert len(outlines) == len(points)


def count_backbone_calls(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    calls: list[int] = []
    original = Extractor.features

    def counted(self: Extractor, *args: Any, **kwargs: Any) -> Any:
        calls.append(1)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(Extractor, "features", counted)
    return calls


def test_rethreshold_redraws_from_scores_without_the_cnn(georeferenced, tmp_path, monkeypatch):
    out = str(tmp_path / "r.zarr")
    first = georeferenced["model"].detect(georeferenced["test"], out, quicklook=False)
    calls = count_backbone_calls(monkeypatch)
    looser = AnomalyDetector.load(georeferenced["path"], false_alarm_rate=0.1, chunk_size=128, verbose=0)
    again = looser.detect(georeferenced["test"], out, quicklook=False)
    assert calls == [] and again["computed_chunks"] == 0 and again["redrawn_chunks"] == first["chunks"]
    g = zarr.open_group(out, mode="r")
    want = np.nan_to_num(g["score"][:], nan=-np.inf) >= looser.threshold_
    np.testing.assert_array_equal(g["mask"][:] > 0, want)
    assert again["anomalous_pixels"] > first["anomalous_pixels"]
    assert again["contacts"] >= 1 and g.attrs["complete"] is True


def test_cli_contacts_rethresholds_a_store_and_refuses_bad_requests(detected, tmp_path, capsys, monkeypatch):
    calls = count_backbone_calls(monkeypatch)
    store = str(detected["out"])
    assert cli.main(["contacts", store, "--false-alarm-rate", "0.2", "--json", "--min-area", "4"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert calls == [] and summary["threshold"] == pytest.approx(-np.log10(0.2))
    assert Path(summary["files"]["geojson"]).name == f"test_t{summary['threshold']:g}_contacts.geojson"
    # same request again: the files exist
    assert cli.main(["contacts", store, "--false-alarm-rate", "0.2", "--min-area", "4"]) == 1
    assert "--overwrite" in capsys.readouterr().err
    assert cli.main(["contacts", store, "--threshold", "400"]) == 1
    assert "[0, 300]" in capsys.readouterr().err
    assert cli.main(["contacts", store, "--false-alarm-rate", "0"]) == 1
    assert "(0, 1]" in capsys.readouterr().err
    assert cli.main(["contacts", str(tmp_path / "nothing.zarr")]) == 1
    assert "no anomaly_dask output store" in capsys.readouterr().err


def test_contacts_of_an_incomplete_store_and_exports_of_another_run_are_refused(
    georeferenced, tmp_path, capsys
):
    out = tmp_path / "part.zarr"
    georeferenced["model"].detect(georeferenced["test"], str(out), quicklook=False)
    for marker in sorted((tmp_path / "part.zarr.done").iterdir())[:2]:
        if marker.is_file():
            marker.unlink()
    assert cli.main(["contacts", str(out)]) == 1
    err = capsys.readouterr().err
    assert "chunks have no scores" in err and len(err.strip().splitlines()) == 1
    # a file beside a new store that this store did not write is never replaced silently
    (tmp_path / "fresh_mask.tif").write_bytes(b"someone else's")
    from anomaly_dask.errors import OutputExistsError

    with pytest.raises(OutputExistsError, match="fresh_mask.tif exists"):
        georeferenced["model"].detect(georeferenced["test"], str(tmp_path / "fresh.zarr"), geotiff="mask")
    assert not (tmp_path / "fresh.zarr").exists()
    assert (tmp_path / "fresh_mask.tif").read_bytes() == b"someone else's"
