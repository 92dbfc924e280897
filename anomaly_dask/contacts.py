"""Contacts: the connected anomalous regions of a detection, one record each.

A *contact* is an 8-connected region of anomalous pixels, a pixel being anomalous where
its score is finite and at least the threshold (NaN, no data, never is). The score image
arrives as blocks that tile it (the chunks of an output store, in practice); each block is
labelled on its own with :func:`scipy.ndimage.label` and the pieces that touch across block
borders, diagonally included, are joined afterwards (:class:`~anomaly_dask.regions.BorderJoin`).
The regions are therefore exactly those of labelling the whole mask at once, while the
memory is that of one block plus a few numbers per piece and the anomalous border pixels.

Coordinates
-----------
Pixel coordinates are continuous: pixel ``(row r, column c)`` covers ``[r, r + 1) x
[c, c + 1)``, so its centre is at ``(r + 0.5, c + 0.5)``. Centroids are means of pixel
centres. Bounding boxes are half-open pixel index ranges ``[y0, y1) x [x0, x1)``. Peaks are
given as pixel indices (``peak_row``, ``peak_col``); their map position is the pixel's
centre. With a georeference, the GDAL transform maps continuous pixel coordinates
``(column, row)`` to map coordinates ``(x, y)``; without one, files use ``x = column``,
``y = row`` (:mod:`anomaly_dask.contact_files`).

Fields of a contact
-------------------
``id`` (1 .. n, by peak score descending), ``image``, ``area_px``, ``bbox_y0``, ``bbox_x0``,
``bbox_y1``, ``bbox_x1``, ``centroid_row``, ``centroid_col``, ``peak_score``, ``peak_row``,
``peak_col``, ``mean_score`` and ``false_alarm_rate_at_peak`` (``min(1, 10 ** -peak)``:
scores are calibrated so that a share ``10 ** -s`` of normal pixels scores ``s`` or more).
When a transform is known, also ``centroid_x``, ``centroid_y``, ``peak_x``, ``peak_y``, the
area in map units squared -- named ``area_m2`` when the CRS is projected in metres, else
``area_map_units2`` -- and ``map_units`` (the CRS's linear unit, ``"degree"`` for a
geographic CRS, ``"unknown"`` without a CRS). With ``outlines=True``, ``outline``: a shapely
(Multi)Polygon of the region's pixels, in map coordinates when a transform is known.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import TYPE_CHECKING, Any

import numpy as np
from scipy import ndimage

from .errors import OutputIncompleteError, ParameterError
from .georef import from_attrs, to_rasterio
from .regions import EIGHT, BorderJoin

if TYPE_CHECKING:
    from affine import Affine
    from rasterio.crs import CRS

    from .store import OutputStore

__all__ = ["BASE_FIELDS", "MAP_FIELDS", "area_field", "contacts_from_store", "find_contacts", "store_blocks"]

#: Fields of every contact, in file column order.
BASE_FIELDS = (
    "id", "image", "area_px", "bbox_y0", "bbox_x0", "bbox_y1", "bbox_x1",
    "centroid_row", "centroid_col", "peak_score", "peak_row", "peak_col",
    "mean_score", "false_alarm_rate_at_peak",
)  # fmt: skip
#: Fields added when the contacts are placed by a transform (plus :func:`area_field`).
MAP_FIELDS = ("centroid_x", "centroid_y", "peak_x", "peak_y")

#: Per-piece statistics collected block by block.
_STATS = ("area", "sum_y", "sum_x", "sum_s", "ymin", "ymax", "xmin", "xmax", "peak", "peak_y", "peak_x")


def area_field(crs: CRS | None) -> tuple[str, str]:
    """Name of the map-area field for a CRS, and the CRS's linear unit.

    Parameters
    ----------
    crs : rasterio.crs.CRS or None
        The coordinate reference system of the map coordinates.

    Returns
    -------
    (str, str)
        ``("area_m2", "metre")`` for a CRS projected in metres; otherwise
        ``("area_map_units2", unit)`` with ``unit`` the linear unit, ``"degree"`` for a
        geographic CRS, or ``"unknown"`` when there is no CRS.
    """
    if crs is None:
        return "area_map_units2", "unknown"
    if crs.is_geographic:
        return "area_map_units2", "degree"
    unit = str(crs.linear_units or "unknown")
    if crs.is_projected:
        try:
            name, factor = crs.units_factor
        except Exception:  # noqa: BLE001 - GDAL cannot say: not metres as far as we know
            name, factor = unit, 0.0
        if factor == 1.0 and str(name).lower() in ("metre", "meter", "m"):
            return "area_m2", "metre"
    return "area_map_units2", unit


def _anomalous(block: np.ndarray, threshold: float) -> np.ndarray:
    with np.errstate(invalid="ignore"):
        return np.isfinite(block) & (block >= threshold)


class _Collector:
    """Statistics of the pieces of the regions, gathered block by block."""

    def __init__(self, height: int, width: int, threshold: float) -> None:
        self.height, self.width, self.threshold = height, width, threshold
        self.join = BorderJoin()
        self.stats: dict[str, list[np.ndarray]] = {k: [] for k in _STATS}
        self.pixels = 0

    def add(self, y0: int, x0: int, block: np.ndarray) -> None:
        block = np.asarray(block)
        if block.ndim != 2:
            raise ParameterError(f"score blocks must be 2-D, got shape {block.shape} at ({y0}, {x0})")
        h, w = block.shape
        if y0 < 0 or x0 < 0 or y0 + h > self.height or x0 + w > self.width:
            raise ParameterError(
                f"block at ({y0}, {x0}) of shape {block.shape} lies outside the "
                f"{self.height} x {self.width} image"
            )
        self.pixels += h * w
        labels, n = ndimage.label(_anomalous(block, self.threshold), structure=EIGHT)
        if n == 0:
            return
        self.join.add_block(labels, n, y0, x0)
        ys, xs = np.nonzero(labels)  # row-major
        lab = labels[ys, xs]
        vals = block[ys, xs].astype(np.float64)
        # by label, then score descending; ties keep row-major order (lexsort is stable)
        order = np.lexsort((-vals, lab))
        ys, xs, vals = ys[order], xs[order], vals[order]
        area = np.bincount(lab, minlength=n + 1)[1:]
        starts = np.concatenate([[0], np.cumsum(area)[:-1]])
        s = self.stats
        s["area"].append(area.astype(np.int64))
        s["sum_y"].append(np.add.reduceat(ys.astype(np.float64), starts) + area * float(y0))
        s["sum_x"].append(np.add.reduceat(xs.astype(np.float64), starts) + area * float(x0))
        s["sum_s"].append(np.add.reduceat(vals, starts))
        s["ymin"].append(np.minimum.reduceat(ys, starts) + y0)
        s["ymax"].append(np.maximum.reduceat(ys, starts) + y0)
        s["xmin"].append(np.minimum.reduceat(xs, starts) + x0)
        s["xmax"].append(np.maximum.reduceat(xs, starts) + x0)
        s["peak"].append(vals[starts])
        s["peak_y"].append(ys[starts] + y0)
        s["peak_x"].append(xs[starts] + x0)

    def regions(self) -> dict[str, np.ndarray]:
        """Per region (joined across borders): the statistics of :data:`_STATS`."""
        if self.pixels != self.height * self.width:
            raise ParameterError(
                f"the blocks hold {self.pixels} pixels, the {self.height} x {self.width} image "
                f"{self.height * self.width}: they must tile the image, each pixel once"
            )
        if self.join.n_nodes == 0:
            return {k: np.zeros(0, np.float64 if k in ("sum_y", "sum_x", "sum_s", "peak") else np.int64)
                    for k in _STATS}  # fmt: skip
        node = {k: np.concatenate(v) for k, v in self.stats.items()}
        comp, count = self.join.roots(self.width)
        out = {k: np.bincount(comp, node[k], minlength=count) for k in ("sum_y", "sum_x", "sum_s")}
        out["area"] = np.bincount(comp, node["area"], minlength=count).astype(np.int64)
        for key, ufunc, start in (("ymin", np.minimum, self.height), ("xmin", np.minimum, self.width),
                                  ("ymax", np.maximum, -1), ("xmax", np.maximum, -1)):  # fmt: skip
            acc = np.full(count, start, dtype=np.int64)
            ufunc.at(acc, comp, node[key])
            out[key] = acc
        # the peak of a region: its highest piece peak, ties to the first pixel (row-major)
        flat = node["peak_y"] * self.width + node["peak_x"]
        order = np.lexsort((flat, -node["peak"], comp))
        first = np.flatnonzero(np.concatenate([[True], np.diff(comp[order]) != 0]))
        pick = order[first]
        for key in ("peak", "peak_y", "peak_x"):
            out[key] = node[key][pick]
        return out


def _outline(
    read_region: Callable[[int, int, int, int], np.ndarray],
    box: tuple[int, int, int, int],
    peak: tuple[int, int],
    threshold: float,
    transform: Affine,
) -> Any:
    """The region holding pixel ``peak`` as a shapely geometry, from its bounding-box crop."""
    import shapely
    from affine import Affine
    from rasterio.features import shapes

    y0, x0, y1, x1 = box
    crop = np.asarray(read_region(y0, y1, x0, x1))
    if crop.shape != (y1 - y0, x1 - x0):
        raise ParameterError(f"read_region({y0}, {y1}, {x0}, {x1}) gave shape {crop.shape}")
    labels, _ = ndimage.label(_anomalous(crop, threshold), structure=EIGHT)
    # the bounding box may hold other regions: keep the one connected to the peak (a region
    # lies inside its bounding box, so it is connected inside the crop too)
    own = labels[peak[0] - y0, peak[1] - x0]
    if own == 0:
        raise ParameterError(f"read_region gave a crop where the peak pixel {peak} is not anomalous")
    region = (labels == own).astype(np.uint8)
    # 4-connected polygons, merged: pixels touching at a corner become parts of a
    # MultiPolygon that meet at a point (valid), not a self-touching ring
    parts = [
        shapely.geometry.shape(geom)
        for geom, value in shapes(region, mask=region.astype(bool), connectivity=4,
                                  transform=transform @ Affine.translation(x0, y0))
        if value == 1
    ]  # fmt: skip
    return shapely.union_all(parts) if len(parts) > 1 else parts[0]


def find_contacts(
    score_blocks: Iterable[tuple[int, int, np.ndarray]],
    height: int,
    width: int,
    threshold: float,
    *,
    min_area: int = 1,
    georef: Mapping[str, Any] | None = None,
    image: str | None = None,
    outlines: bool = False,
    read_region: Callable[[int, int, int, int], np.ndarray] | None = None,
) -> list[dict[str, Any]]:
    """The contacts (connected anomalous regions) of a score image given block by block.

    Parameters
    ----------
    score_blocks : iterable of (int, int, numpy.ndarray)
        ``(y0, x0, scores)`` blocks that tile the image, each pixel in exactly one block,
        in any order and on any grid. Only one block is held at a time.
    height, width : int
        Image size in pixels.
    threshold : float
        A pixel is anomalous where its score is finite and ``>= threshold``.
    min_area : int
        Contacts of fewer pixels are dropped (before ids are given).
    georef : Georef or mapping, optional
        Places the image (:mod:`anomaly_dask.georef`); with a transform, map coordinates
        and areas are added. A CRS without a transform adds nothing.
    image : str, optional
        Name of the image, recorded in every contact.
    outlines : bool
        Also give each contact's ``outline`` polygon; needs ``read_region``. Each contact's
        bounding-box crop is read once, so a huge region costs its bounding box in memory.
    read_region : callable, optional
        ``read_region(y0, y1, x0, x1)`` returns the scores of rows ``y0:y1``, columns
        ``x0:x1``.

    Returns
    -------
    list of dict
        One dict per contact (fields in the module documentation), sorted by peak score
        descending (ties: peak position, row-major); ``id`` is the 1-based rank.

    Raises
    ------
    ParameterError
        Bad sizes, threshold or ``min_area``; blocks that leave the image or do not tile it;
        ``outlines`` without ``read_region``; a malformed georeference.
    """
    for key, value in (("height", height), ("width", width)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
            raise ParameterError(f"{key} must be a positive integer, got {value!r}")
    if isinstance(min_area, bool) or not isinstance(min_area, (int, np.integer)) or min_area < 1:
        raise ParameterError(f"min_area must be a positive integer, got {min_area!r}")
    try:
        threshold = float(threshold)
    except (TypeError, ValueError):
        threshold = math.nan
    if not math.isfinite(threshold):
        raise ParameterError(f"threshold must be a finite number, got {threshold!r}")
    if outlines and read_region is None:
        raise ParameterError("outlines=True needs read_region(y0, y1, x0, x1) to read the regions' pixels")
    crs, transform = to_rasterio(georef)

    collector = _Collector(int(height), int(width), threshold)
    for y0, x0, block in score_blocks:
        collector.add(int(y0), int(x0), block)
    r = collector.regions()

    keep = np.flatnonzero(r["area"] >= min_area)
    keep = keep[np.lexsort((r["peak_x"][keep], r["peak_y"][keep], -r["peak"][keep]))]
    area_key, units = area_field(crs)
    pixel_area = None if transform is None else abs(transform.determinant)
    contacts: list[dict[str, Any]] = []
    for rank, i in enumerate(keep, start=1):
        area = int(r["area"][i])
        peak = float(r["peak"][i])
        row, col = float(r["sum_y"][i] / area + 0.5), float(r["sum_x"][i] / area + 0.5)
        c: dict[str, Any] = {
            "id": rank, "image": image, "area_px": area,
            "bbox_y0": int(r["ymin"][i]), "bbox_x0": int(r["xmin"][i]),
            "bbox_y1": int(r["ymax"][i]) + 1, "bbox_x1": int(r["xmax"][i]) + 1,
            "centroid_row": row, "centroid_col": col,
            "peak_score": peak, "peak_row": int(r["peak_y"][i]), "peak_col": int(r["peak_x"][i]),
            "mean_score": float(r["sum_s"][i] / area),
            "false_alarm_rate_at_peak": min(1.0, 10.0 ** -peak),
        }  # fmt: skip
        if transform is not None:
            cx, cy = transform @ (col, row)
            px, py = transform @ (c["peak_col"] + 0.5, c["peak_row"] + 0.5)
            c.update(centroid_x=float(cx), centroid_y=float(cy), peak_x=float(px), peak_y=float(py))
            c[area_key] = area * pixel_area
            c["map_units"] = units
        contacts.append(c)
    if outlines:
        from affine import Affine

        place = Affine.identity() if transform is None else transform
        for c in contacts:
            box = (c["bbox_y0"], c["bbox_x0"], c["bbox_y1"], c["bbox_x1"])
            c["outline"] = _outline(read_region, box, (c["peak_row"], c["peak_col"]), threshold, place)
    return contacts


def store_blocks(store: OutputStore, name: str = "score") -> Iterator[tuple[int, int, np.ndarray]]:
    """The chunks of a store's array as ``(y0, x0, block)``, read one at a time, row-major.

    Parameters
    ----------
    store : OutputStore
        The output store.
    name : str
        Array to read.

    Yields
    ------
    (int, int, numpy.ndarray)
        Top-left pixel of the chunk and its pixels.
    """
    arr = store.read(name)
    for iy, ix in store.all_chunks():
        y0, y1, x0, x1 = store.chunk_bounds(iy, ix)
        yield y0, x0, np.asarray(arr[y0:y1, x0:x1])


def contacts_from_store(
    store: OutputStore,
    threshold: float | None = None,
    *,
    min_area: int = 1,
    outlines: bool = False,
    image: str | None = None,
    georef: Mapping[str, Any] | None = None,
) -> list[dict[str, Any]]:
    """The contacts of a finished output store, reading its ``score`` chunk by chunk.

    Parameters
    ----------
    store : OutputStore
        A complete output store (:class:`~anomaly_dask.store.OutputStore`).
    threshold : float, optional
        Score threshold; None takes the store's attribute ``threshold`` (the model's).
    min_area : int
        Smallest contact kept, in pixels.
    outlines : bool
        Also give each contact's outline polygon (read back from the store).
    image : str, optional
        Name recorded in the contacts; None takes the store's attribute ``input``.
    georef : Georef or mapping, optional
        Georeference; None takes the one recorded in the store
        (:func:`anomaly_dask.georef.from_attrs`).

    Returns
    -------
    list of dict
        As :func:`find_contacts`.

    Raises
    ------
    OutputIncompleteError
        Some chunks have no scores yet (they would read as no data).
    ParameterError
        No threshold given and none recorded; see also :func:`find_contacts`.
    """
    attrs = store.attrs
    missing = store.missing_chunks()
    if missing:
        raise OutputIncompleteError(
            f"{store.url}: {len(missing)} of {store.n_chunks} chunks have no scores yet; resume the "
            "run (detect with the same model and input) before listing contacts"
        )
    if threshold is None:
        threshold = attrs.get("threshold")
        if threshold is None:
            raise ParameterError(f"{store.url} records no threshold: pass threshold=")
    if image is None:
        image = attrs.get("input")
    if georef is None:
        georef = from_attrs(attrs)
    arr = store.read("score") if outlines else None

    def read_region(y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
        return np.asarray(arr[y0:y1, x0:x1])

    return find_contacts(
        store_blocks(store), store.height, store.width, threshold, min_area=min_area,
        georef=georef, image=image, outlines=outlines, read_region=read_region if outlines else None,
    )  # fmt: skip
