"""Open every output of a ``detect`` run with GDAL's own command-line tools, as QGIS would.

Builds a small georeferenced sonar GeoTIFF (EPSG:32631, no-data 0), trains a quick model
(``weights=None``, a false-alarm rate of 1 % so that there are contacts: this checks
files, not quality), runs ``detect`` with every export, then
for each GeoTIFF prints what ``gdalinfo -json`` reports (CRS, geotransform, no-data,
overviews, band descriptions, metadata) next to the input's, for the contact files what
``ogrinfo`` reports (layers, feature counts, CRS), and for a ``--zarr-format 2`` store what
GDAL's Zarr driver sees. Each line ends in ``ok`` or ``MISMATCH``; the exit code is the
number of mismatches. Without GDAL's command line (``apt-get install gdal-bin``) the
GeoTIFFs are read through rasterio (GDAL inside its wheel) instead.

Run: ``python jobs/check_gis_outputs.py [--size 1024] [--keep DIR]``
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any


def gdalinfo(path: str) -> dict[str, Any]:
    """``gdalinfo -json`` of ``path`` (rasterio's view when the tool is missing)."""
    if shutil.which("gdalinfo"):
        out = subprocess.run(["gdalinfo", "-json", path], check=True, capture_output=True, text=True).stdout
        info = json.loads(out)
        wkt = info.get("coordinateSystem", {}).get("wkt", "")
        bands = info.get("bands", [])
        return {
            "tool": "gdalinfo", "epsg": _epsg(wkt), "transform": [round(v, 6) for v in info.get("geoTransform", [])],
            "nodata": [b.get("noDataValue") for b in bands], "overviews": [len(b.get("overviews", [])) for b in bands],
            "descriptions": [b.get("description", "") for b in bands],
            "layout": info.get("metadata", {}).get("IMAGE_STRUCTURE", {}).get("LAYOUT"),
            "tags": info.get("metadata", {}).get("", {}),
        }
    import rasterio

    with rasterio.open(path) as ds:
        return {
            "tool": "rasterio", "epsg": ds.crs.to_epsg() if ds.crs else None,
            "transform": [round(v, 6) for v in ds.transform.to_gdal()],
            "nodata": [ds.nodata] * ds.count, "overviews": [len(ds.overviews(b)) for b in ds.indexes],
            "descriptions": list(ds.descriptions), "layout": ds.tags(ns="IMAGE_STRUCTURE").get("LAYOUT"),
            "tags": ds.tags(),
        }


def _epsg(wkt: str) -> int | None:
    from pyproj import CRS

    return CRS.from_wkt(wkt).to_epsg() if wkt else None


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=1024, help="side of the test mosaic (default: 1024)")
    ap.add_argument("--keep", metavar="DIR", help="write into DIR and keep it (default: a temporary folder)")
    args = ap.parse_args()

    from anomaly_dask import AnomalyDetector
    from anomaly_dask.datasets import SonarScene, write_tiff

    root = Path(args.keep or tempfile.mkdtemp(prefix="gis_check_"))
    root.mkdir(parents=True, exist_ok=True)
    write_tiff(str(root / "train.tif"), SonarScene(512, args.size, seed=1, n_objects=0))
    write_tiff(str(root / "val.tif"), SonarScene(384, args.size, seed=2, n_objects=0))
    write_tiff(str(root / "survey.tif"), SonarScene(args.size, args.size, seed=3, n_objects=6))
    ad = AnomalyDetector(weights=None, kmeans_clusters=16, random_state=0, chunk_size=256, verbose=0,
                         false_alarm_rate=0.01).train(
        str(root / "train.tif"), str(root / "val.tif")
    )
    (root / "out").mkdir(exist_ok=True)
    store = root / "out" / "survey.zarr"
    summary = ad.detect(str(root / "survey.tif"), str(store), geotiff=("mask", "score", "overlay"),
                        outlines=True, overwrite=True)
    ad.detect(str(root / "survey.tif"), str(root / "out" / "survey_v2.zarr"), zarr_format=2,
              quicklook=False, contacts=(), overwrite=True)

    bad = 0

    def say(what: str, good: bool) -> None:
        nonlocal bad
        bad += not good
        print(f"  {what}: {'ok' if good else 'MISMATCH'}")

    ref = gdalinfo(str(root / "survey.tif"))
    print(f"input survey.tif ({ref['tool']}): EPSG:{ref['epsg']}, geotransform {ref['transform']}")
    for name, nodata, bands in (("mask", 255.0, 1), ("score", "NaN", 1), ("overlay", None, 3)):
        info = gdalinfo(summary[f"geotiff_{name}"])
        print(f"{Path(summary[f'geotiff_{name}']).name}: EPSG:{info['epsg']}, nodata {info['nodata']}, "
              f"overviews {info['overviews']}, layout {info['layout']}, bands {info['descriptions']}, "
              f"threshold {info['tags'].get('threshold')}, model {str(info['tags'].get('model_fingerprint'))[:12]}")
        say("CRS", info["epsg"] == ref["epsg"] == 32631)
        say("geotransform", info["transform"] == ref["transform"])
        want = [nodata] * bands
        got = ["NaN" if isinstance(v, float) and v != v else v for v in info["nodata"]]
        say(f"nodata {want}", got == want if name != "score" else got in (want, [float("nan")]))
        say("overviews", all(n >= 1 for n in info["overviews"]))
        say("band descriptions", all(info["descriptions"]) and len(info["descriptions"]) == bands)
        say("COG layout and run metadata", info["layout"] == "COG" and "model_fingerprint" in info["tags"])
    if shutil.which("ogrinfo"):
        for suffix in ("contacts.gpkg", "contacts.geojson", "outlines.geojson"):
            path = root / "out" / f"survey_{suffix}"
            text = subprocess.run(["ogrinfo", "-so", "-al", "-ro", str(path)], check=True,
                                  capture_output=True, text=True).stdout
            count = next((int(line.split(":")[1]) for line in text.splitlines() if line.startswith("Feature Count")), -1)
            utm = "31N" in text or "32631" in text
            print(f"{path.name} (ogrinfo): {count} features, CRS UTM 31N: {utm}")
            say("feature count", count == summary["contacts"])
            say("CRS", utm)
        path = root / "out" / "survey_v2.zarr"
        proc = subprocess.run(["gdalinfo", "-json", f'ZARR:"{path}":/score'], capture_output=True, text=True)
        if proc.returncode == 0:
            info = json.loads(proc.stdout)
            print(f"survey_v2.zarr/score (GDAL Zarr driver): size {info.get('size')}, "
                  f"CRS in WKT: {'WGS 84 / UTM zone 31N' in json.dumps(info)}")
            say("size", info.get("size") == [args.size, args.size])
        else:
            print(f"survey_v2.zarr: GDAL's Zarr driver could not open it ({proc.stderr.strip()[:120]})")
    else:
        print("ogrinfo not found: contact files not checked with GDAL's tools (apt-get install gdal-bin)")
    print(f"{bad} mismatch(es); outputs in {root}")
    if not args.keep:
        shutil.rmtree(root, ignore_errors=True)
    return bad


if __name__ == "__main__":
    sys.exit(main())
