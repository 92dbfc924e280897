"""Exporters of a finished store: GeoTIFF (through rasterio), PNG tiles and the quick-look."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
import rasterio
import tifffile
from PIL import Image

from anomaly_dask import export
from anomaly_dask.errors import OutputLocationError, ParameterError
from anomaly_dask.export import BAND_DESCRIPTIONS, write_geotiff, write_png_tiles, write_quicklook
from anomaly_dask.georef import from_attrs, georef_from_tiff, to_attrs
from anomaly_dask.store import OutputStore

from .test_store import CHUNK, H, W, chunk_data, expected, full_store, mask_tif

UTM_GEOREF = {"transform": (431000.0, 0.1, 0.0, 5412000.0, 0.0, -0.1), "crs_epsg": 32631}


@pytest.fixture(scope="module")
def done_store(tmp_path_factory: pytest.TempPathFactory) -> OutputStore:
    return full_store(str(tmp_path_factory.mktemp("exp") / "run.zarr"))


# ---------------------------------------------------------------------------- GeoTIFF


@pytest.mark.parametrize("name", ["mask", "score"])
def test_geotiff_from_epsg(done_store: OutputStore, tmp_path: Path, name: str) -> None:
    out = tmp_path / f"{name}.tif"
    write_geotiff(done_store, str(out), name, UTM_GEOREF, tile=64, cog=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == [out.name]  # no temporary left over
    with rasterio.open(out) as ds:
        assert ds.crs.to_epsg() == 32631
        assert ds.transform.to_gdal() == pytest.approx(UTM_GEOREF["transform"])
        assert (ds.height, ds.width) == (H, W) and ds.block_shapes == [(64, 64)]
        assert ds.nodata == 255 if name == "mask" else np.isnan(ds.nodata)
        assert ds.descriptions == BAND_DESCRIPTIONS[name]
        assert ds.compression.name == "deflate"
        want = mask_tif(done_store) if name == "mask" else expected(done_store)[name]
        np.testing.assert_array_equal(ds.read(1), want)


@pytest.mark.parametrize("name", ["mask", "score", "overlay"])
def test_cloud_optimized_geotiff_has_overviews_tags_and_nodata(tmp_path: Path, name: str) -> None:
    """The default GeoTIFF is a COG: overviews, the run's tags, band descriptions; the
    mask's no-data (255) is distinct from normal (0), and no-data pixels hold it."""
    store = OutputStore.create(str(tmp_path / "big.zarr"), 700, 600, 128, "run-1", {})
    want = {"score": np.zeros((700, 600), np.float32), "mask": np.zeros((700, 600), np.uint8),
            "overlay": np.zeros((700, 600, 3), np.uint8)}
    for iy, ix in store.all_chunks():
        score, mask, overlay = chunk_data(store, iy, ix)
        y0, y1, x0, x1 = store.chunk_bounds(iy, ix)
        yy, xx = np.mgrid[y0:y1, x0:x1]
        hole = (yy - 350) ** 2 + (xx - 300) ** 2 < 150**2
        score[hole], mask[hole] = np.nan, 0
        store.write_chunk(iy, ix, score, mask, overlay)
        for k, v in (("score", score), ("mask", mask), ("overlay", overlay)):
            want[k][y0:y1, x0:x1] = v
    store.finalize({})
    out = tmp_path / f"{name}.tif"
    write_geotiff(store, str(out), name, UTM_GEOREF, tags={"threshold": 3.0, "model_fingerprint": "abc"})
    with rasterio.open(out) as ds:
        assert ds.tags(ns="IMAGE_STRUCTURE").get("LAYOUT") == "COG"
        assert ds.overviews(1) == [2] and ds.block_shapes[0] == (512, 512)
        assert ds.tags()["threshold"] == "3.0" and ds.tags()["model_fingerprint"] == "abc"
        assert ds.descriptions == BAND_DESCRIPTIONS[name]
        assert ds.crs.to_epsg() == 32631
        holes = np.isnan(want["score"])
        assert holes.any() and (~holes).any()
        if name == "mask":
            assert ds.nodata == 255
            np.testing.assert_array_equal(ds.read(1), np.where(holes, 255, want["mask"] > 0))
        elif name == "score":
            assert np.isnan(ds.nodata)
            np.testing.assert_array_equal(ds.read(1), want["score"])
        else:
            assert ds.nodata is None
            np.testing.assert_array_equal(np.moveaxis(ds.read(), 0, -1), want["overlay"])
            np.testing.assert_array_equal(ds.read_masks(1) == 0, holes)  # internal validity mask


def test_geotiff_geographic_and_overlay(done_store: OutputStore, tmp_path: Path) -> None:
    georef = {"transform": (2.0, 1e-5, 0.0, 48.0, 0.0, -1e-5), "crs_epsg": 4326}
    write_geotiff(done_store, str(tmp_path / "ov.tif"), "overlay", georef, tile=128)
    with rasterio.open(tmp_path / "ov.tif") as ds:
        assert ds.crs.to_epsg() == 4326 and ds.crs.is_geographic
        assert ds.transform.to_gdal() == pytest.approx(georef["transform"])
        assert ds.count == 3 and ds.descriptions == ("red", "green", "blue")
        np.testing.assert_array_equal(np.moveaxis(ds.read(), 0, -1), expected(done_store)["overlay"])
    with tifffile.TiffFile(tmp_path / "ov.tif") as tif:
        assert tif.pages.first.photometric == tifffile.PHOTOMETRIC.RGB


def test_geotiff_without_crs(done_store: OutputStore, tmp_path: Path) -> None:
    rotated = (10.0, 2.0, 0.5, 20.0, 0.25, -2.0)
    for transform in ((10.0, 2.0, 0.0, 20.0, 0.0, -2.0), rotated):
        write_geotiff(done_store, str(tmp_path / "m.tif"), "mask", {"transform": transform, "crs_epsg": None})
        with rasterio.open(tmp_path / "m.tif") as ds:
            assert ds.crs is None
            assert ds.transform.to_gdal() == pytest.approx(transform)
        geo = georef_from_tiff(str(tmp_path / "m.tif"))
        assert geo["crs_epsg"] is None and geo["crs_wkt"] is None
        assert geo["transform"] == pytest.approx(transform)


def test_geotiff_without_georef_is_a_plain_tiff(done_store: OutputStore, tmp_path: Path) -> None:
    out = tmp_path / "plain.tif"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        write_geotiff(done_store, str(out), "score", compression=None)
    assert georef_from_tiff(str(out)) is None
    with tifffile.TiffFile(out) as tif:
        assert tif.pages.first.compression == 1
        np.testing.assert_array_equal(tif.asarray(), expected(done_store)["score"])


def test_geotiff_keeps_the_crs_of_an_input_written_with_raw_tags(
    done_store: OutputStore, tmp_path: Path
) -> None:
    # an "input" GeoTIFF in EPSG:3857 with a citation, written tag by tag as some tools do
    citation = "WGS 84 / Pseudo-Mercator|"
    keys = [
        (1, 1, 0, 4), (1024, 0, 1, 1), (1025, 0, 1, 1), (1026, 34737, len(citation), 0), (3072, 0, 1, 3857),
    ]  # fmt: skip
    tags = [
        (33550, "d", 3, (0.25, 0.25, 0.0), True),
        (33922, "d", 6, (0.0, 0.0, 0.0, 250000.0, 6250000.0, 0.0), True),
        (34735, "H", 20, tuple(v for k in keys for v in k), True),
        (34737, "s", 0, citation, True),
    ]
    src = tmp_path / "input.tif"
    tifffile.imwrite(src, np.zeros((H, W), np.uint8), extratags=tags, metadata=None)

    georef = georef_from_tiff(str(src))
    assert georef == {
        "crs_epsg": 3857, "crs_wkt": None, "transform": [250000.0, 0.25, 0.0, 6250000.0, 0.0, -0.25],
    }  # fmt: skip
    out = tmp_path / "score.tif"
    write_geotiff(done_store, str(out), "score", georef, nodata=float("nan"), tile=64, cog=False)
    with rasterio.open(src) as a, rasterio.open(out) as b:
        assert b.crs == a.crs and b.crs.to_epsg() == 3857
        assert b.transform == a.transform
        assert np.isnan(b.nodata)
    assert georef_from_tiff(str(out)) == georef


def test_geotiff_from_the_georef_recorded_in_store_attributes(tmp_path: Path) -> None:
    store = full_store(str(tmp_path / "run.zarr"))
    assert from_attrs(store.attrs) is None
    recorded = OutputStore.create(
        str(tmp_path / "geo.zarr"), H, W, CHUNK, "run-2", {"input": "x.tif", **to_attrs(UTM_GEOREF)}
    )
    reopened = OutputStore.open(recorded.url)
    georef = from_attrs(reopened.attrs)
    assert georef == {"crs_epsg": 32631, "crs_wkt": None, "transform": list(UTM_GEOREF["transform"])}
    write_geotiff(store, str(tmp_path / "mask.tif"), "mask", georef, nodata=0)
    with rasterio.open(tmp_path / "mask.tif") as ds:
        assert ds.crs.to_epsg() == 32631 and ds.transform.to_gdal() == pytest.approx(UTM_GEOREF["transform"])


def test_geotiff_streams_in_bands_and_writes_bigtiff_when_large(
    done_store: OutputStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "mask.tif"
    write_geotiff(done_store, str(out), "mask", UTM_GEOREF, tile=32, max_band_bytes=1, compression="zstd", cog=False)
    with tifffile.TiffFile(out) as tif:
        assert not tif.is_bigtiff
    monkeypatch.setattr(export, "_BIGTIFF_BYTES", 0)
    write_geotiff(done_store, str(out), "mask", UTM_GEOREF, tile=32, max_band_bytes=1, compression="lzw", cog=False)
    with tifffile.TiffFile(out) as tif:
        assert tif.is_bigtiff
    with rasterio.open(out) as ds:
        assert ds.compression.name == "lzw" and ds.block_shapes == [(32, 32)]
        np.testing.assert_array_equal(ds.read(1), mask_tif(done_store))


def test_geotiff_refusals(done_store: OutputStore, tmp_path: Path) -> None:
    out = str(tmp_path / "x.tif")
    with pytest.raises(ParameterError, match="name must be one of"):
        write_geotiff(done_store, out, "image")
    with pytest.raises(ParameterError, match="multiple of 16"):
        write_geotiff(done_store, out, "mask", tile=40)
    with pytest.raises(ParameterError, match="compression 'rle' is not supported"):
        write_geotiff(done_store, out, "mask", compression="rle")
    with pytest.raises(ParameterError, match="not representable in mask"):
        write_geotiff(done_store, out, "mask", nodata=float("nan"))
    with pytest.raises(ParameterError, match="6 numbers"):
        write_geotiff(done_store, out, "mask", {"transform": (1, 2, 3)})
    with pytest.raises(ParameterError, match="EPSG:999999 is not a coordinate reference system"):
        write_geotiff(done_store, out, "mask", {"crs_epsg": 999999, "transform": (0, 1, 0, 0, 0, -1)})
    with pytest.raises(OutputLocationError, match="parent folder"):
        write_geotiff(done_store, str(tmp_path / "missing" / "x.tif"), "mask")
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # nothing was made


# ---------------------------------------------------------------------------- PNG


def test_png_tiles_and_quicklook(done_store: OutputStore, tmp_path: Path) -> None:
    urls = write_png_tiles(done_store, "overlay")
    assert len(urls) == done_store.n_chunks
    assert urls[-1] == done_store.url[: -len(".zarr")] + "_tiles/overlay/3/2.png"
    want = expected(done_store)["overlay"]
    with Image.open(urls[-1]) as img:
        assert img.size == (W - 2 * CHUNK, H - 3 * CHUNK)
        np.testing.assert_array_equal(np.asarray(img), want[3 * CHUNK :, 2 * CHUNK :])
    with Image.open(done_store.url[: -len(".zarr")] + "_tiles/overlay/0/1.png") as img:
        assert img.size == (CHUNK, CHUNK)

    masks = write_png_tiles(done_store, "mask", tile=100, prefix=str(tmp_path / "tiles"))
    assert len(masks) == 3 * 2 and masks[0] == str(tmp_path / "tiles" / "0" / "0.png")
    with Image.open(masks[-1]) as img:
        assert img.size == (57, 3)

    shape = write_quicklook(done_store, str(tmp_path / "ql.png"), max_size=50)
    assert shape == (41, 32)  # factor ceil(203 / 50) = 5
    with Image.open(tmp_path / "ql.png") as img:
        assert img.size == (32, 41) and img.mode == "RGB"
        small = np.asarray(img).astype(float)
    block = want[:5, :5].reshape(-1, 3).mean(axis=0)
    np.testing.assert_allclose(small[0, 0], np.rint(block))
    edge = want[200:, 155:].reshape(-1, 3).mean(axis=0)  # partial edge block: its own mean
    np.testing.assert_allclose(small[-1, -1], np.rint(edge))
    with pytest.raises(ParameterError):
        write_quicklook(done_store, str(tmp_path / "q2.png"), name="score")
