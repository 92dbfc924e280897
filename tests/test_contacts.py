"""Tests of contact lists: regions joined across blocks, map figures, outlines and files."""

from __future__ import annotations

import csv
import math
from collections.abc import Iterator
from pathlib import Path

import fsspec
import numpy as np
import pytest
from scipy import ndimage

from anomaly_dask.contact_files import write_contacts
from anomaly_dask.contacts import contacts_from_store, find_contacts
from anomaly_dask.errors import OutputIncompleteError, OutputLocationError, ParameterError
from anomaly_dask.store import OutputStore

UTM = {"crs_epsg": 32631, "crs_wkt": None, "transform": [500000.0, 2.0, 0.0, 6000000.0, 0.0, -2.0]}


def blocks(score: np.ndarray, by: int, bx: int | None = None, reverse: bool = False) -> Iterator:
    """``(y0, x0, block)`` tiles of ``score`` on a ``by`` x ``bx`` grid."""
    bx = by if bx is None else bx
    tiles = [(y, x) for y in range(0, score.shape[0], by) for x in range(0, score.shape[1], bx)]
    for y, x in reversed(tiles) if reverse else tiles:
        yield y, x, score[y : y + by, x : x + bx]


def blobby(seed: int, h: int = 120, w: int = 150, sigma: float = 2.5) -> np.ndarray:
    """Smooth random scores whose top part forms blobs of many shapes; a few NaN holes."""
    rng = np.random.default_rng(seed)
    s = ndimage.gaussian_filter(rng.normal(size=(h, w)), sigma)
    s = ((s - s.mean()) / s.std()).astype(np.float32)
    s[rng.random((h, w)) < 0.01] = np.nan
    return s


def reference(score: np.ndarray, threshold: float) -> list[tuple]:
    """Every region of the whole mask: (bbox, area, centroid row, centroid col, peak)."""
    with np.errstate(invalid="ignore"):
        mask = np.isfinite(score) & (score >= threshold)
    labels, n = ndimage.label(mask, structure=np.ones((3, 3)))
    out = []
    for i, sl in enumerate(ndimage.find_objects(labels), start=1):
        ys, xs = np.nonzero(labels == i)
        bbox = (sl[0].start, sl[1].start, sl[0].stop, sl[1].stop)
        out.append((bbox, ys.size, ys.mean() + 0.5, xs.mean() + 0.5, float(score[ys, xs].max())))
    assert len(out) == n
    return sorted(out)


def summary(contacts: list[dict]) -> list[tuple]:
    return sorted(
        ((c["bbox_y0"], c["bbox_x0"], c["bbox_y1"], c["bbox_x1"]), c["area_px"], c["centroid_row"],
         c["centroid_col"], c["peak_score"])
        for c in contacts
    )  # fmt: skip


def assert_same(got: list[tuple], want: list[tuple]) -> None:
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert g[:2] == w[:2]
        assert g[2] == pytest.approx(w[2], abs=1e-9) and g[3] == pytest.approx(w[3], abs=1e-9)
        assert g[4] == w[4]


# ------------------------------------------------------------------------------ labelling


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("grid", [(1, 1), (7, 7), (16, 16), (13, 40), (64, 64), (500, 500)])
def test_matches_whole_mask_labelling(seed: int, grid: tuple[int, int]) -> None:
    score = blobby(seed)
    threshold = 1.2
    want = reference(score, threshold)
    assert len(want) > 15
    got = find_contacts(blocks(score, *grid), *score.shape, threshold)
    assert_same(summary(got), want)
    # the per-contact fields agree among themselves
    for c in got:
        ys, xs = c["peak_row"], c["peak_col"]
        assert score[ys, xs] == c["peak_score"]
        assert c["bbox_y0"] <= ys < c["bbox_y1"] and c["bbox_x0"] <= xs < c["bbox_x1"]
        assert c["false_alarm_rate_at_peak"] == pytest.approx(10 ** -c["peak_score"])
        assert threshold <= c["mean_score"] <= c["peak_score"]


def test_order_ids_and_block_order() -> None:
    score = blobby(3)
    got = find_contacts(blocks(score, 16), *score.shape, 1.0, image="a.tif")
    assert [c["id"] for c in got] == list(range(1, len(got) + 1))
    peaks = [c["peak_score"] for c in got]
    assert peaks == sorted(peaks, reverse=True)
    assert {c["image"] for c in got} == {"a.tif"}
    # blocks in another order give the same list
    again = find_contacts(blocks(score, 16, reverse=True), *score.shape, 1.0, image="a.tif")
    assert again == got


def test_mean_score_of_a_region_across_blocks() -> None:
    score = np.zeros((20, 20), np.float32)
    score[6:10, 6:10] = np.arange(16, dtype=np.float32).reshape(4, 4) + 5  # crosses the corner at (8, 8)
    (c,) = find_contacts(blocks(score, 8), 20, 20, 1.0)
    assert c["area_px"] == 16
    assert (c["bbox_y0"], c["bbox_x0"], c["bbox_y1"], c["bbox_x1"]) == (6, 6, 10, 10)
    assert (c["centroid_row"], c["centroid_col"]) == (8.0, 8.0)
    assert c["mean_score"] == pytest.approx(12.5)
    assert (c["peak_score"], c["peak_row"], c["peak_col"]) == (20.0, 9, 9)


def test_diagonal_touches_across_borders() -> None:
    score = np.zeros((16, 24), np.float32)
    score[7, 7] = score[8, 8] = 3.0  # diagonal across the corner of four 8 x 8 blocks
    score[2, 15] = score[3, 16] = 2.0  # diagonal across a vertical border
    score[7, 20] = score[8, 21] = 1.5  # diagonal across a horizontal border
    score[0, 23] = score[15, 0] = 1.0  # lone pixels in image corners
    got = find_contacts(blocks(score, 8), 16, 24, 0.5)
    assert [c["area_px"] for c in got] == [2, 2, 2, 1, 1]
    assert [(c["bbox_y0"], c["bbox_x0"], c["bbox_y1"], c["bbox_x1"]) for c in got][:3] == [
        (7, 7, 9, 9), (2, 15, 4, 17), (7, 20, 9, 22),
    ]  # fmt: skip
    assert_same(summary(got), reference(score, 0.5))


def test_snake_through_many_blocks() -> None:
    """A region that leaves and re-enters blocks joins into one, whatever the grid."""
    score = np.zeros((40, 40), np.float32)
    score[5, 2:38] = 2.0
    score[5:35, 37] = 2.0
    score[34, 2:38] = 2.0
    score[20:35, 2] = 2.0
    score[20, 2:30] = 2.0
    for b in (3, 5, 8, 11):
        (c,) = find_contacts(blocks(score, b), 40, 40, 1.0)
        assert c["area_px"] == int((score > 0).sum())


def test_min_area() -> None:
    score = blobby(4)
    all_ = find_contacts(blocks(score, 32), *score.shape, 1.0)
    big = find_contacts(blocks(score, 32), *score.shape, 1.0, min_area=20)
    assert 0 < len(big) < len(all_)
    assert [c["area_px"] for c in big] == [c["area_px"] for c in all_ if c["area_px"] >= 20]
    assert [c["id"] for c in big] == list(range(1, len(big) + 1))
    with pytest.raises(ParameterError, match="min_area"):
        find_contacts(blocks(score, 32), *score.shape, 1.0, min_area=0)


def test_nan_and_inf_are_never_anomalous() -> None:
    score = np.full((10, 10), 5.0, np.float32)
    score[:, 4] = np.nan  # splits the image in two
    score[0, 0] = np.inf
    got = find_contacts(blocks(score, 3), 10, 10, -1e30)
    assert sorted(c["area_px"] for c in got) == [39, 50]
    assert find_contacts(blocks(np.full((5, 5), np.nan, np.float32), 2), 5, 5, 0.0) == []


def test_bad_input() -> None:
    score = np.zeros((10, 10), np.float32)
    with pytest.raises(ParameterError, match="tile"):
        find_contacts(list(blocks(score, 5))[:3], 10, 10, 1.0)
    with pytest.raises(ParameterError, match="outside"):
        find_contacts([(8, 0, score[:5])], 10, 10, 1.0)
    with pytest.raises(ParameterError, match="threshold"):
        find_contacts(blocks(score, 5), 10, 10, float("nan"))
    with pytest.raises(ParameterError, match="read_region"):
        find_contacts(blocks(score, 5), 10, 10, 1.0, outlines=True)


# ------------------------------------------------------------------------------ map figures


def test_georeferenced_projected() -> None:
    score = np.zeros((30, 40), np.float32)
    score[10:13, 20:24] = 2.0  # 3 x 4 pixels, centroid (11.5, 22.0)
    score[11, 22] = 4.0
    (c,) = find_contacts(blocks(score, 16), 30, 40, 1.0, georef=UTM)
    assert (c["centroid_row"], c["centroid_col"]) == (11.5, 22.0)
    assert (c["centroid_x"], c["centroid_y"]) == (500000.0 + 2 * 22.0, 6000000.0 - 2 * 11.5)
    assert (c["peak_x"], c["peak_y"]) == (500000.0 + 2 * 22.5, 6000000.0 - 2 * 11.5)
    assert c["area_m2"] == 12 * 4.0 and "area_map_units2" not in c
    assert c["map_units"] == "metre"


def test_georeferenced_geographic_and_crs_only() -> None:
    score = np.zeros((10, 10), np.float32)
    score[2:4, 2:4] = 1.0
    geo = {"crs_epsg": 4326, "crs_wkt": None, "transform": [3.0, 0.001, 0.0, 50.0, 0.0, -0.001]}
    (c,) = find_contacts(blocks(score, 4), 10, 10, 0.5, georef=geo)
    assert "area_m2" not in c and c["map_units"] == "degree"
    assert c["area_map_units2"] == pytest.approx(4 * 1e-6)
    assert c["centroid_x"] == pytest.approx(3.003) and c["centroid_y"] == pytest.approx(49.997)
    # a CRS without a transform places nothing
    (c,) = find_contacts(blocks(score, 4), 10, 10, 0.5, georef={"crs_epsg": 32631})
    assert "centroid_x" not in c


# ------------------------------------------------------------------------------ outlines


def test_outlines_have_the_pixel_area() -> None:
    score = blobby(5)
    got = find_contacts(
        blocks(score, 24), *score.shape, 1.0, outlines=True,
        read_region=lambda y0, y1, x0, x1: score[y0:y1, x0:x1],
    )  # fmt: skip
    assert len(got) > 10
    for c in got:
        geom = c["outline"]
        assert geom.is_valid
        assert geom.area == c["area_px"]
        minx, miny, maxx, maxy = geom.bounds
        assert (miny, minx, maxy, maxx) == (c["bbox_y0"], c["bbox_x0"], c["bbox_y1"], c["bbox_x1"])


def test_outline_ignores_other_regions_in_its_box() -> None:
    score = np.zeros((12, 12), np.float32)
    score[1, 1:11] = score[1:11, 10] = score[10, 1:11] = 2.0  # a U around ...
    score[4:7, 4:7] = 3.0  # ... a separate square inside its bounding box
    score[3, 3] = 1.5  # touches the square diagonally: part of it
    got = find_contacts(
        blocks(score, 5), 12, 12, 1.0, outlines=True, read_region=lambda y0, y1, x0, x1: score[y0:y1, x0:x1]
    )
    square, u = got
    assert square["area_px"] == 10 and square["outline"].area == 10
    assert square["outline"].geom_type == "MultiPolygon"  # the diagonal pixel meets at a corner
    assert u["area_px"] == 28 and u["outline"].area == 28


def test_outlines_in_map_coordinates() -> None:
    score = np.zeros((30, 40), np.float32)
    score[10:13, 20:24] = 2.0
    (c,) = find_contacts(
        blocks(score, 16), 30, 40, 1.0, georef=UTM, outlines=True,
        read_region=lambda y0, y1, x0, x1: score[y0:y1, x0:x1],
    )  # fmt: skip
    assert c["outline"].area == pytest.approx(c["area_m2"])
    assert c["outline"].bounds == (500040.0, 5999974.0, 500048.0, 5999980.0)


# ------------------------------------------------------------------------------ files


def _georeferenced_contacts() -> list[dict]:
    score = blobby(6)
    return find_contacts(
        blocks(score, 32), *score.shape, 1.0, georef=UTM, image="survey.tif", outlines=True,
        read_region=lambda y0, y1, x0, x1: score[y0:y1, x0:x1],
    )  # fmt: skip


def test_files_in_the_input_crs(tmp_path: Path) -> None:
    gpd = pytest.importorskip("geopandas")
    contacts = _georeferenced_contacts()
    written = write_contacts(contacts, tmp_path / "run", crs=UTM)
    assert set(written) == {"geojson", "csv", "gpkg", "outlines_geojson"}
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "run_contacts.csv", "run_contacts.geojson", "run_contacts.gpkg", "run_outlines.geojson",
    ]  # fmt: skip
    for key in ("geojson", "gpkg"):
        df = gpd.read_file(written[key], layer="contacts")
        assert df.crs.to_epsg() == 32631
        assert len(df) == len(contacts)
        assert df["id"].tolist() == [c["id"] for c in contacts]
        assert df["area_m2"].tolist() == [c["area_m2"] for c in contacts]
        assert df["peak_score"].tolist() == pytest.approx([c["peak_score"] for c in contacts])
        assert set(df["image"]) == {"survey.tif"}
        np.testing.assert_allclose(df.geometry.x, [c["centroid_x"] for c in contacts])
        np.testing.assert_allclose(df.geometry.y, [c["centroid_y"] for c in contacts])
    for url, layer in ((written["gpkg"], "outlines"), (written["outlines_geojson"], None)):
        out = gpd.read_file(url, layer=layer)
        assert out.crs.to_epsg() == 32631
        np.testing.assert_allclose(out.area, [c["area_m2"] for c in contacts])
        assert out["id"].tolist() == [c["id"] for c in contacts]


def test_csv_reads_back(tmp_path: Path) -> None:
    contacts = _georeferenced_contacts()
    written = write_contacts(contacts, tmp_path / "run", crs=32631, formats=["csv"])
    assert list(written) == ["csv"]
    with open(written["csv"], newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == len(contacts)
    assert "outline" not in rows[0]
    for row, c in zip(rows, contacts):
        assert int(row["id"]) == c["id"] and int(row["area_px"]) == c["area_px"]
        assert float(row["centroid_x"]) == c["centroid_x"]  # repr round-trips exactly
        assert float(row["false_alarm_rate_at_peak"]) == c["false_alarm_rate_at_peak"]
        assert row["image"] == "survey.tif" and row["map_units"] == "metre"


def test_pixel_coordinates_without_crs(tmp_path: Path) -> None:
    gpd = pytest.importorskip("geopandas")
    score = blobby(7)
    contacts = find_contacts(blocks(score, 40), *score.shape, 1.0)
    written = write_contacts(contacts, tmp_path / "px", formats=("gpkg",))
    df = gpd.read_file(written["gpkg"])
    assert df.crs is None
    np.testing.assert_allclose(df.geometry.x, [c["centroid_col"] for c in contacts])
    np.testing.assert_allclose(df.geometry.y, [c["centroid_row"] for c in contacts])
    assert df["image"].isna().all()
    with pytest.raises(ParameterError, match="pixel coordinates"):
        write_contacts(contacts, tmp_path / "px2", crs=32631)


def test_empty_list_writes_valid_files(tmp_path: Path) -> None:
    gpd = pytest.importorskip("geopandas")
    written = write_contacts([], tmp_path / "none", crs="EPSG:32631")
    for key in ("geojson", "gpkg"):
        df = gpd.read_file(written[key])
        assert len(df) == 0
    with open(written["csv"], newline="") as f:
        rows = list(csv.reader(f))
    assert rows[0][:3] == ["id", "image", "area_px"] and "area_m2" in rows[0] and len(rows) == 1


def test_remote_and_bad_destinations(tmp_path: Path) -> None:
    contacts = _georeferenced_contacts()
    written = write_contacts(contacts, "memory://contacts-test/run", crs=UTM, formats=("csv", "gpkg"))
    fs = fsspec.filesystem("memory")
    assert sorted(p.rsplit("/", 1)[-1] for p in fs.ls("/contacts-test", detail=False)) == [
        "run_contacts.csv", "run_contacts.gpkg",
    ]  # fmt: skip
    with fsspec.open(written["csv"], "rt") as f:
        assert len(f.read().splitlines()) == len(contacts) + 1
    with pytest.raises(ParameterError, match="formats"):
        write_contacts(contacts, tmp_path / "x", formats=("shp",))
    with pytest.raises(OutputLocationError, match="does not exist"):
        write_contacts(contacts, tmp_path / "missing" / "x", crs=UTM)


# ------------------------------------------------------------------------------ store


def _store(tmp_path: Path, score: np.ndarray, chunk: int, finalize: bool = True, skip: int = 0) -> OutputStore:
    h, w = score.shape
    attrs = {"threshold": 1.1, "georef": UTM, "input": "survey.tif"}
    store = OutputStore.create(tmp_path / "run.zarr", h, w, chunk, "run-1", attrs)
    for iy, ix in store.all_chunks()[skip:]:
        y0, y1, x0, x1 = store.chunk_bounds(iy, ix)
        s = score[y0:y1, x0:x1]
        with np.errstate(invalid="ignore"):
            mask = s >= 1.1
        store.write_chunk(iy, ix, s, mask, np.zeros(s.shape + (3,), np.uint8))
    if finalize:
        store.finalize({})
    return store


def test_contacts_from_store(tmp_path: Path) -> None:
    score = blobby(8, 90, 70)
    store = _store(tmp_path, score, 16)
    got = contacts_from_store(store, outlines=True)
    assert_same(summary(got), reference(score, 1.1))
    assert {c["image"] for c in got} == {"survey.tif"}
    assert all(c["area_m2"] == 4.0 * c["area_px"] for c in got)
    assert all(c["outline"].area == pytest.approx(c["area_m2"]) for c in got)
    assert len(contacts_from_store(store, 2.0)) < len(got)
    reopened = OutputStore.open(store.url)
    assert contacts_from_store(reopened, min_area=5, image="other") == [
        {**c, "id": i, "image": "other"}
        for i, c in enumerate((c for c in find_contacts(
            blocks(score, 16), 90, 70, 1.1, georef=UTM) if c["area_px"] >= 5), start=1)
    ]  # fmt: skip


def test_incomplete_store_is_refused(tmp_path: Path) -> None:
    store = _store(tmp_path, blobby(9, 40, 40), 16, finalize=False, skip=2)
    with pytest.raises(OutputIncompleteError, match="2 of 9 chunks have no scores"):
        contacts_from_store(store)


def test_threshold_is_rounded_nowhere() -> None:
    score = np.array([[1.0, math.nextafter(1.0, 0.0)]], np.float64)
    (c,) = find_contacts([(0, 0, score)], 1, 2, 1.0)
    assert c["area_px"] == 1
