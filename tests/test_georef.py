"""Georeference: read from GeoTIFF inputs by GDAL, written to GeoTIFF outputs and zarr attributes."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import rasterio
import tifffile
import zarr
from affine import Affine
from rasterio.crs import CRS

from anomaly_dask import georef as georef_module
from anomaly_dask.errors import InputNotFoundError, ParameterError
from anomaly_dask.export import BAND_DESCRIPTIONS, write_geotiff
from anomaly_dask.georef import (
    as_georef,
    from_attrs,
    georef_from_tiff,
    make_georef,
    scale_georef,
    to_attrs,
    to_rasterio,
)
from anomaly_dask.io import TiffSource, clear_cache, open_source

from .test_store import H, W, expected, full_store, mask_tif

CUSTOM_TMERC = "+proj=tmerc +lat_0=0 +lon_0=3.3 +k=0.9996 +x_0=500000 +y_0=0 +datum=WGS84 +units=m +no_defs"

#: CRS of an input -> EPSG code expected in its georef (None: kept as WKT). EPSG:4087 lies in
#: 4000-4999, the range an earlier writer took for geographic CRSs: it is projected.
CRSS = {
    "EPSG:4087": 4087,  # WGS 84 / World Equidistant Cylindrical
    "EPSG:3857": 3857,  # WGS 84 / Pseudo-Mercator
    "EPSG:32633": 32633,  # WGS 84 / UTM zone 33N
    "EPSG:32755": 32755,  # WGS 84 / UTM zone 55S
    "EPSG:4326": 4326,  # geographic
    CUSTOM_TMERC: None,  # user-defined projection, no EPSG code
}


@pytest.fixture(autouse=True)
def _fresh_cache():
    clear_cache()
    yield
    clear_cache()


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory):
    return full_store(str(tmp_path_factory.mktemp("geo") / "run.zarr"))


def _north_up(x0: float, y0: float, size: float) -> Affine:
    return Affine(size, 0.0, x0, 0.0, -size, y0)


def _input_tiff(path: Path, crs: str, transform: Affine) -> None:
    """An input GeoTIFF of the store's size written by rasterio (GDAL)."""
    with rasterio.open(
        path, "w", driver="GTiff", height=H, width=W, count=1, dtype="uint16", crs=crs,
        transform=transform, nodata=0, tiled=True, blockxsize=64, blockysize=64,
    ) as ds:  # fmt: skip
        ds.write(np.arange(H * W, dtype=np.uint16).reshape(1, H, W) % 5000 + 1)


# ---------------------------------------------------------------------------- input -> outputs


@pytest.mark.parametrize("crs", CRSS, ids=lambda c: c if c.startswith("EPSG") else "custom-tmerc")
def test_input_crs_and_transform_reach_the_geotiff_outputs(store, tmp_path: Path, crs: str) -> None:
    geographic = CRS.from_user_input(crs).is_geographic
    transform = _north_up(3.5, 51.25, 1e-4) if geographic else _north_up(412345.5, 5678901.0, 0.25)
    src_path = tmp_path / "input.tif"
    _input_tiff(src_path, crs, transform)

    source = open_source(str(src_path))
    assert isinstance(source, TiffSource)
    geo = source.georef
    assert geo["crs_epsg"] == CRSS[crs]
    assert (geo["crs_wkt"] is None) == (CRSS[crs] is not None)
    assert json.loads(json.dumps(geo)) == geo
    with rasterio.open(src_path) as ds:
        in_crs, in_transform = ds.crs, ds.transform
    assert to_rasterio(geo) == (in_crs, in_transform)

    for name, nodata in (("mask", 255), ("score", float("nan"))):
        out = tmp_path / f"{name}.tif"
        write_geotiff(store, str(out), name, geo, nodata=nodata, tile=64, cog=False)
        with rasterio.open(out) as ds:
            assert ds.crs == in_crs and ds.crs.is_projected == in_crs.is_projected
            assert ds.transform == in_transform
            assert ds.nodata == nodata or (np.isnan(nodata) and np.isnan(ds.nodata))
            assert ds.descriptions == BAND_DESCRIPTIONS[name]
            np.testing.assert_array_equal(ds.read(1), mask_tif(store) if name == "mask" else expected(store)[name])
        assert georef_from_tiff(str(out)) == geo
        if CRSS[crs] is not None:
            with tifffile.TiffFile(out) as tif:
                keys = tif.pages.first.geotiff_tags
            kind, code_key = (2, "GeographicTypeGeoKey") if geographic else (1, "ProjectedCSTypeGeoKey")
            assert int(keys["GTModelTypeGeoKey"]) == kind and int(keys[code_key]) == CRSS[crs]


def test_tiff_written_tag_by_tag_reads_as_gdal_reads_it(tmp_path: Path) -> None:
    """A GeoTIFF written tag by tag (tifffile) reads like GDAL reads it, EPSG kept as a code."""
    from anomaly_dask.datasets import SonarScene, write_tiff

    scene = SonarScene(96, 128, seed=2, pixel_size=0.5, origin=(431000.0, 5412000.0))
    path = tmp_path / "sonar.tif"
    write_tiff(path, scene, tile=32)
    geo = open_source(str(path)).georef
    assert geo == {
        "crs_epsg": scene.epsg, "crs_wkt": None, "transform": [431000.0, 0.5, 0.0, 5412000.0, 0.0, -0.5],
    }  # fmt: skip
    with rasterio.open(path) as ds:
        assert to_rasterio(geo) == (ds.crs, ds.transform)


# ---------------------------------------------------------------------------- reading special cases


def test_model_transformation_and_pixel_is_point(tmp_path: Path) -> None:
    matrix = (2.0, 0.0, 0.0, 1000.0, 0.0, -3.0, 0.0, 5000.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 1.0)
    keys = (1, 1, 0, 3, 1024, 0, 1, 2, 1025, 0, 1, 2, 2048, 0, 1, 4326)
    path = tmp_path / "point.tif"
    tifffile.imwrite(
        path,
        np.zeros((40, 60), np.float32),
        extratags=[
            (34264, "d", 16, matrix, True),
            (34735, "H", len(keys), keys, True),
            (42113, "s", 0, "nan", True),
        ],
    )
    src = open_source(str(path))
    assert np.isnan(src.nodata)
    # GDAL convention: corner of the top-left pixel, half a pixel before its centre
    assert src.georef == {
        "crs_epsg": 4326, "crs_wkt": None, "transform": [999.0, 2.0, 0.0, 5001.5, 0.0, -3.0],
    }  # fmt: skip
    with rasterio.open(path) as ds:
        assert to_rasterio(src.georef) == (ds.crs, ds.transform)


def test_control_points_only_keep_the_crs(tmp_path: Path) -> None:
    keys = (1, 1, 0, 3, 1024, 0, 1, 1, 1025, 0, 1, 1, 3072, 0, 1, 32631)
    ties = (0, 0, 0, 5e5, 6e6, 0, 100, 0, 0, 500250, 6e6, 0, 0, 100, 0, 5e5, 5999750, 0)
    path = tmp_path / "gcps.tif"
    tifffile.imwrite(
        path, np.zeros((100, 100), np.uint8), metadata=None,
        extratags=[(33922, "d", len(ties), ties, True), (34735, "H", len(keys), keys, True)],
    )  # fmt: skip
    assert georef_from_tiff(str(path)) == {"crs_epsg": 32631, "crs_wkt": None, "transform": None}


def test_plain_tiff_and_missing_file(tmp_path: Path) -> None:
    tifffile.imwrite(tmp_path / "plain.tif", np.zeros((8, 8), np.uint8))
    assert georef_from_tiff(str(tmp_path / "plain.tif")) is None
    assert open_source(str(tmp_path / "plain.tif")).georef is None
    with pytest.raises(InputNotFoundError, match="does not exist"):
        georef_from_tiff(str(tmp_path / "nope.tif"))


def test_overview_level_georef_is_scaled(tmp_path: Path) -> None:
    keys = (1, 1, 0, 3, 1024, 0, 1, 1, 1025, 0, 1, 1, 3072, 0, 1, 32631)
    tags = [
        (33550, "d", 3, (0.5, 0.5, 0.0), True),
        (33922, "d", 6, (0.0, 0.0, 0.0, 5e5, 6e6, 0.0), True),
        (34735, "H", len(keys), keys, True),
    ]
    data = np.arange(300 * 400, dtype=np.uint16).reshape(300, 400)
    path = tmp_path / "pyramid.tif"
    with tifffile.TiffWriter(path) as tw:
        tw.write(data, subifds=1, tile=(64, 64), extratags=tags, metadata=None)
        tw.write(data[::2, ::2], subfiletype=1, tile=(64, 64))
    full, half = TiffSource.open(str(path)), TiffSource.open(str(path), level=1)
    assert full.georef["transform"] == [5e5, 0.5, 0.0, 6e6, 0.0, -0.5]
    assert half.georef == {"crs_epsg": 32631, "crs_wkt": None, "transform": [5e5, 1.0, 0.0, 6e6, 0.0, -1.0]}
    np.testing.assert_array_equal(half.read(0, 150, 0, 200)[:, :, 0], data[::2, ::2])


def test_undecodable_tags_warn_and_pixels_stay_readable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(tags):
        raise RuntimeError("bad GeoKey directory")

    monkeypatch.setattr(georef_module, "_decode_with_gdal", broken)
    keys = (1, 1, 0, 1, 3072, 0, 1, 32631)
    path = tmp_path / "bad.tif"
    tifffile.imwrite(path, np.full((8, 8), 7, np.uint8), extratags=[(34735, "H", len(keys), keys, True)])
    with pytest.warns(UserWarning, match=r"bad\.tif: its GeoTIFF tags cannot be decoded.*without georef"):
        src = open_source(str(path))
    assert src.georef is None and (src.read(0, 8, 0, 8) == 7).all()


# ---------------------------------------------------------------------------- the one form


def test_as_georef_checks_and_normalises() -> None:
    assert as_georef(None) is None
    assert as_georef({"crs_epsg": None, "transform": None}) is None
    assert as_georef({"crs_epsg": np.int64(3857), "transform": (1, 2, 0, 3, 0, -2)}) == {
        "crs_epsg": 3857, "crs_wkt": None, "transform": [1.0, 2.0, 0.0, 3.0, 0.0, -2.0],
    }  # fmt: skip
    for bad, match in [
        ({"transform": (1, 2, 3)}, "6 numbers"),
        ({"transform": (1, 2, 0, 3, 0, float("nan"))}, "6 numbers"),
        ({"crs_epsg": "3857"}, "positive integer"),
        ({"crs_epsg": -1}, "positive integer"),
        ({"crs_wkt": ""}, "WKT string"),
        ({"crs_epsg": 3857, "crs_wkt": CRS.from_epsg(3857).to_wkt()}, "one of them"),
        ({"crs": 3857}, r"unknown keys \['crs'\]"),
        ([1, 2], "must be a dict"),
    ]:
        with pytest.raises(ParameterError, match=match):
            as_georef(bad)


def test_make_georef_and_scale() -> None:
    geo = make_georef("EPSG:4087", Affine(2.0, 0.0, 100.0, 0.0, -2.0, 900.0))
    assert geo == {"crs_epsg": 4087, "crs_wkt": None, "transform": [100.0, 2.0, 0.0, 900.0, 0.0, -2.0]}
    custom = make_georef(CUSTOM_TMERC)
    assert custom["crs_epsg"] is None and custom["transform"] is None
    assert CRS.from_wkt(custom["crs_wkt"]) == CRS.from_user_input(CUSTOM_TMERC)
    assert make_georef() is None
    with pytest.raises(ParameterError, match="not a coordinate reference system"):
        make_georef("EPSG:999999")
    assert scale_georef(geo, 4, 2) == {
        "crs_epsg": 4087, "crs_wkt": None, "transform": [100.0, 4.0, 0.0, 900.0, 0.0, -8.0],
    }  # fmt: skip
    assert scale_georef(None, 2, 2) is None
    with pytest.raises(ParameterError):
        scale_georef(geo, 0, 1)


def test_zarr_attributes_round_trip(tmp_path: Path) -> None:
    geo = make_georef(CUSTOM_TMERC, (5e5, 0.5, 0.0, 6e6, 0.0, -0.5))
    group = zarr.open_group(tmp_path / "g.zarr", mode="w")
    group.attrs.update(to_attrs(geo))
    assert from_attrs(zarr.open_group(tmp_path / "g.zarr", mode="r").attrs.asdict()) == geo
    assert to_attrs(None) == {"georef": None} and from_attrs({}) is None


def test_reading_needs_no_warning_filter(tmp_path: Path) -> None:
    path = tmp_path / "in.tif"
    _input_tiff(path, "EPSG:3857", _north_up(-20000.0, 10000.0, 10.0))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert open_source(str(path)).georef["crs_epsg"] == 3857
