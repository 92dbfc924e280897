"""Image readers (anomaly_dask.io): TIFF and zarr window reads, metadata, pickling, byte counts, errors."""

from __future__ import annotations

import io
import json
import pickle
import subprocess
import sys
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import fsspec
import numpy as np
import pytest
import tifffile
import zarr
from fsspec.spec import AbstractFileSystem

from anomaly_dask.datasets import SonarScene, write_tiff
from anomaly_dask.errors import ImageReadError, InputNotFoundError, ParameterError
from anomaly_dask.io import (
    ImageSource,
    TiffSource,
    ZarrSource,
    clear_cache,
    is_raster,
    open_raster,
    read_window,
)

H, W = 300, 500
#: windows of a 300 x 500 image with 64 px tiles: inside one tile, across tile boundaries,
#: touching the right/bottom edges, one pixel, a whole row band, the whole image
WINDOWS = [
    (5, 40, 6, 50),
    (60, 130, 60, 200),
    (250, 300, 430, 500),
    (63, 65, 127, 129),
    (299, 300, 499, 500),
    (100, 164, 0, 500),
    (0, H, 0, W),
]


def _image(dtype: str, bands: int = 1, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    shape = (H, W) if bands == 1 else (H, W, bands)
    if np.dtype(dtype).kind == "f":
        return rng.normal(0, 100, shape).astype(dtype)
    info = np.iinfo(dtype)
    return rng.integers(info.min, info.max, shape, dtype=dtype, endpoint=True)


def _check_windows(src: ImageSource, ref: np.ndarray) -> None:
    ref3 = ref if ref.ndim == 3 else ref[:, :, None]
    assert (src.height, src.width, src.channels) == ref3.shape
    for y0, y1, x0, x1 in WINDOWS:
        got = src.read(y0, y1, x0, x1)
        assert got.dtype == src.dtype and got.dtype.isnative
        np.testing.assert_array_equal(got, ref3[y0:y1, x0:x1], err_msg=f"window {(y0, y1, x0, x1)}")


@pytest.fixture(autouse=True)
def _fresh_cache():
    clear_cache()
    yield
    clear_cache()


# --------------------------------------------------------------------------------------
# TIFF round trips
# --------------------------------------------------------------------------------------

LAYOUTS = {
    "tiled-zlib": dict(tile=(64, 64), compression="zlib"),
    "tiled-raw": dict(tile=(64, 64)),
    "striped-zlib": dict(rowsperstrip=37, compression="zlib"),
    "striped-raw": dict(rowsperstrip=37),
    "one-strip-raw": dict(),
    "bigtiff-tiled": dict(tile=(64, 64), bigtiff=True, compression="zlib"),
    "bigtiff-one-strip": dict(bigtiff=True),
    "big-endian-tiled": dict(tile=(32, 48), byteorder=">"),
    "big-endian-raw": dict(byteorder=">"),
}


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", ["uint8", "uint16", "int16", "float32"])
def test_tiff_gray_round_trip(tmp_path: Path, layout: str, dtype: str) -> None:
    ref = _image(dtype)
    path = tmp_path / "img.tif"
    tifffile.imwrite(path, ref, photometric="minisblack", **LAYOUTS[layout])
    src = open_raster(str(path))
    assert isinstance(src, TiffSource) and isinstance(src, ImageSource)
    assert src.name == str(path) and src.dtype == np.dtype(dtype)
    assert src.nodata is None and src.georef is None
    _check_windows(src, ref)


@pytest.mark.parametrize("dtype", ["uint32", "int32", "float64"])
def test_tiff_other_dtypes(tmp_path: Path, dtype: str) -> None:
    ref = _image(dtype)
    path = tmp_path / "img.tiff"
    tifffile.imwrite(path, ref, tile=(64, 64), compression="zlib")
    _check_windows(open_raster(str(path)), ref)


@pytest.mark.parametrize(
    "kw",
    [
        dict(planarconfig="contig", tile=(64, 64), compression="zlib"),
        dict(planarconfig="contig", rowsperstrip=10),
        dict(planarconfig="contig"),
        dict(planarconfig="separate", tile=(64, 64), compression="zlib"),
        dict(planarconfig="separate", rowsperstrip=50, compression="zlib"),
        dict(planarconfig="separate"),
    ],
    ids=["contig-tiled", "contig-strips", "contig-raw", "separate-tiled", "separate-strips", "separate-raw"],
)
@pytest.mark.parametrize("dtype", ["uint8", "uint16"])
def test_tiff_rgb(tmp_path: Path, kw: dict, dtype: str) -> None:
    ref = _image(dtype, bands=3, seed=1)
    data = np.moveaxis(ref, 2, 0) if kw["planarconfig"] == "separate" else ref
    path = tmp_path / "rgb.tif"
    tifffile.imwrite(path, data, photometric="rgb", **kw)
    src = open_raster(str(path))
    assert src.channels == 3
    _check_windows(src, ref)


@pytest.mark.parametrize("planar", ["contig", "separate"])
def test_tiff_four_bands_use_first_three(tmp_path: Path, planar: str) -> None:
    ref = _image("uint8", bands=4, seed=2)
    data = np.moveaxis(ref, 2, 0) if planar == "separate" else ref
    path = tmp_path / "rgba.tif"
    tifffile.imwrite(
        path, data, photometric="rgb", planarconfig=planar, extrasamples=["unassalpha"], tile=(64, 64)
    )
    src = open_raster(str(path))
    assert src.channels == 3
    _check_windows(src, ref[:, :, :3])


def test_tiff_palette_expands_to_rgb(tmp_path: Path) -> None:
    index = _image("uint8", seed=3)
    cmap = np.random.default_rng(4).integers(0, 256, (3, 256)).astype(np.uint16) * 257
    path = tmp_path / "palette.tif"
    tifffile.imwrite(path, index, photometric="palette", colormap=cmap, tile=(64, 64))
    src = open_raster(str(path))
    assert (src.channels, src.dtype) == (3, np.uint8)
    _check_windows(src, (cmap // 257).T.astype(np.uint8)[index])


def test_tiff_multipage_reads_first_page(tmp_path: Path) -> None:
    ref = _image("uint16")
    path = tmp_path / "stack.tif"
    tifffile.imwrite(path, np.stack([ref, ref // 2, ref // 3]), photometric="minisblack", tile=(64, 64))
    with pytest.warns(UserWarning, match="reading only the first"):
        src = open_raster(str(path))
    _check_windows(src, ref)


def test_tiff_concurrent_reads(tmp_path: Path) -> None:
    ref = _image("uint16")
    for name, kw in (("tiled.tif", dict(tile=(64, 64), compression="zlib")), ("raw.tif", {})):
        tifffile.imwrite(tmp_path / name, ref, **kw)
        src = open_raster(str(tmp_path / name))
        boxes = [(y, y + 70, x, x + 90) for y in range(0, H - 70, 23) for x in range(0, W - 90, 41)]
        with ThreadPoolExecutor(8) as pool:
            outs = list(pool.map(lambda b: src.read(*b), boxes))  # noqa: B023 - used at once
        for (y0, y1, x0, x1), got in zip(boxes, outs):
            np.testing.assert_array_equal(got[:, :, 0], ref[y0:y1, x0:x1])


def test_window_checks_and_read_window_padding(tmp_path: Path) -> None:
    ref = _image("uint8")
    tifffile.imwrite(tmp_path / "a.tif", ref, tile=(64, 64))
    src = open_raster(str(tmp_path / "a.tif"))
    assert src.read(10, 10, 0, 5).shape == (0, 5, 1)
    with pytest.raises(ParameterError, match="not inside the image"):
        src.read(0, H + 1, 0, 10)
    padded = read_window(src, -4, 20, W - 10, W + 6)
    np.testing.assert_array_equal(
        padded[:, :, 0], np.pad(ref[0:20, W - 10 : W], ((4, 0), (0, 6)), mode="reflect")
    )


# --------------------------------------------------------------------------------------
# GeoTIFF metadata
# --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sonar_tiff(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, SonarScene]:
    scene = SonarScene(
        320, 400, seed=5, dtype="uint16", nodata=7, pixel_size=0.25, origin=(500000.0, 6000000.0)
    )
    path = tmp_path_factory.mktemp("geo") / "sonar.tif"
    write_tiff(path, scene, tile=128)
    return path, scene


def test_synthetic_georef_and_nodata(sonar_tiff: tuple[Path, SonarScene]) -> None:
    path, scene = sonar_tiff
    src = open_raster(str(path))
    assert (src.height, src.width, src.channels, src.dtype) == (320, 400, 1, np.uint16)
    assert src.nodata == 7.0
    geo = src.georef
    assert geo == {
        "crs_epsg": scene.epsg, "crs_wkt": None, "transform": [500000.0, 0.25, 0.0, 6000000.0, 0.0, -0.25],
    }  # fmt: skip
    assert json.loads(json.dumps(geo)) == geo
    for y0, y1, x0, x1 in [(100, 260, 90, 300), (0, 320, 0, 400)]:
        np.testing.assert_array_equal(src.read(y0, y1, x0, x1)[:, :, 0], scene.render(y0, y1, x0, x1))


# --------------------------------------------------------------------------------------
# zarr
# --------------------------------------------------------------------------------------


def test_zarr_v3_group_and_array(tmp_path: Path) -> None:
    ref = _image("uint16")
    store = tmp_path / "store.zarr"
    group = zarr.open_group(store, mode="w")
    arr = group.create_array(
        "image", shape=ref.shape, chunks=(64, 64), dtype=ref.dtype, dimension_names=("y", "x")
    )
    arr[:] = ref
    arr.attrs["nodata"] = 0
    group.create_array("other", shape=(2,), dtype="u1")
    for url in (str(store), str(store / "image")):
        src = open_raster(url)
        assert isinstance(src, ZarrSource) and isinstance(src, ImageSource)
        assert src.name == str(store / "image") and src.nodata == 0.0
        _check_windows(src, ref)
    src = ZarrSource.open(str(store), path="image")
    _check_windows(pickle.loads(pickle.dumps(src)), ref)


def test_zarr_memory_url_pickled() -> None:
    ref = _image("uint8")
    url = "memory://rasters-test/mem.zarr"
    arr = zarr.open_array(url, mode="w", shape=ref.shape, chunks=(64, 64), dtype=ref.dtype)
    arr[:] = ref
    try:
        src = pickle.loads(pickle.dumps(open_raster(url)))
        clear_cache()
        _check_windows(src, ref)
    finally:
        fsspec.filesystem("memory").rm(url, recursive=True)


def test_zarr_v2_bands_and_layouts(tmp_path: Path) -> None:
    ref = _image("float32", bands=3)
    v2 = zarr.open_array(
        tmp_path / "v2.zarr", mode="w", shape=ref.shape, chunks=(50, 50, 3), dtype=ref.dtype, zarr_format=2
    )
    v2[:] = ref
    v2.attrs["_ARRAY_DIMENSIONS"] = ["y", "x", "band"]
    _check_windows(open_raster(str(tmp_path / "v2.zarr")), ref)
    # band-first, named and unnamed; 4 bands use the first 3
    rgba = _image("uint8", bands=4)
    named = zarr.create_array(
        tmp_path / "named.zarr",
        shape=(4, H, W),
        chunks=(4, 64, 64),
        dtype="u1",
        dimension_names=("band", "y", "x"),
    )
    named[:] = np.moveaxis(rgba, 2, 0)
    _check_windows(open_raster(str(tmp_path / "named.zarr")), rgba[:, :, :3])
    plain = zarr.create_array(tmp_path / "plain.zarr", shape=(3, H, W), chunks=(3, 64, 64), dtype="u1")
    plain[:] = np.moveaxis(rgba[:, :, :3], 2, 0)
    _check_windows(open_raster(str(tmp_path / "plain.zarr")), rgba[:, :, :3])


def test_zarr_errors(tmp_path: Path) -> None:
    group = zarr.open_group(tmp_path / "g.zarr", mode="w")
    group.create_array("a", shape=(10, 10), dtype="u1")
    group.create_array("b", shape=(10, 10), dtype="u1")
    with pytest.raises(ImageReadError, match=r"no array named 'image' \(arrays: a, b\)"):
        open_raster(str(tmp_path / "g.zarr"))
    zarr.create_array(tmp_path / "4d.zarr", shape=(2, 2, 10, 10), dtype="u1")
    with pytest.raises(ImageReadError, match="not an image"):
        open_raster(str(tmp_path / "4d.zarr"))
    zarr.create_array(tmp_path / "c.zarr", shape=(10, 10), dtype="complex64")
    with pytest.raises(ImageReadError, match="complex"):
        open_raster(str(tmp_path / "c.zarr"))
    with pytest.raises(InputNotFoundError):
        open_raster(str(tmp_path / "missing.zarr"))


# --------------------------------------------------------------------------------------
# Pickling, fsspec, bytes read
# --------------------------------------------------------------------------------------


def test_pickle_and_read_in_fresh_process(tmp_path: Path, sonar_tiff: tuple[Path, SonarScene]) -> None:
    path, scene = sonar_tiff
    src = open_raster(str(path))
    blob = pickle.dumps(src)
    assert len(blob) < 4000
    clear_cache()
    again = pickle.loads(blob)
    assert again == src
    np.testing.assert_array_equal(again.read(10, 90, 20, 200)[:, :, 0], scene.render(10, 90, 20, 200))
    (tmp_path / "src.pkl").write_bytes(blob)
    code = (
        "import pickle, sys, numpy as np\n"
        "src = pickle.loads(open(sys.argv[1], 'rb').read())\n"
        "np.save(sys.argv[2], src.read(200, 320, 300, 400))\n"
    )
    out = tmp_path / "win.npy"
    subprocess.run([sys.executable, "-c", code, str(tmp_path / "src.pkl"), str(out)], check=True, timeout=120)
    np.testing.assert_array_equal(np.load(out)[:, :, 0], scene.render(200, 320, 300, 400))


def test_memory_filesystem(sonar_tiff: tuple[Path, SonarScene]) -> None:
    path, scene = sonar_tiff
    url = "memory://rasters-test/sonar.tif"
    with fsspec.open(url, "wb") as f:
        f.write(path.read_bytes())
    try:
        src = open_raster(url)
        assert isinstance(src, TiffSource) and src.georef["crs_epsg"] == scene.epsg
        np.testing.assert_array_equal(src.read(120, 250, 100, 330)[:, :, 0], scene.render(120, 250, 100, 330))
    finally:
        fsspec.filesystem("memory").rm(url)


class _CountingFile(io.RawIOBase):
    """A local file that counts the bytes read through it (and has no fileno)."""

    def __init__(self, path: str) -> None:
        self._f = open(path, "rb")  # noqa: SIM115 - closed in close()

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def seek(self, offset: int, whence: int = 0) -> int:
        return self._f.seek(offset, whence)

    def tell(self) -> int:
        return self._f.tell()

    def readinto(self, buffer) -> int:  # type: ignore[override]
        n = self._f.readinto(buffer)
        _CountingFS.bytes_read += n
        return n

    def close(self) -> None:
        self._f.close()
        super().close()


class _CountingFS(AbstractFileSystem):
    protocol = "countingfile"
    bytes_read = 0

    def _open(self, path: str, mode: str = "rb", **kwargs) -> _CountingFile:
        if not Path(path).exists():
            raise FileNotFoundError(path)
        return _CountingFile(path)


@pytest.mark.parametrize(
    "kw", [dict(tile=(256, 256)), dict(tile=(256, 256), compression="zlib"), dict(), dict(rowsperstrip=64)]
)
def test_window_read_touches_only_its_tiles(tmp_path: Path, kw: dict) -> None:
    fsspec.register_implementation("countingfile", _CountingFS, clobber=True)
    ref = np.random.default_rng(6).integers(0, 256, (4096, 4096), dtype=np.uint8)
    path = tmp_path / "large.tif"
    tifffile.imwrite(path, ref, **kw)
    size = path.stat().st_size
    _CountingFS.bytes_read = 0
    src = TiffSource.open(f"countingfile://{path}")
    opened = _CountingFS.bytes_read
    win = src.read(1000, 1300, 2000, 2300)  # crosses 2 x 2 tiles of 256 px
    np.testing.assert_array_equal(win[:, :, 0], ref[1000:1300, 2000:2300])
    window = _CountingFS.bytes_read - opened
    assert opened < 0.01 * size, (opened, size)
    assert window < 0.03 * size, (window, size)


# --------------------------------------------------------------------------------------
# Errors and dispatch
# --------------------------------------------------------------------------------------


def test_truncated_tiff(tmp_path: Path) -> None:
    path = tmp_path / "full.tif"
    tifffile.imwrite(path, _image("uint16"), tile=(64, 64), compression="zlib")
    data = path.read_bytes()
    cut = tmp_path / "cut.tif"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageReadError, match=r"cut\.tif: truncated TIFF.*copy the file again"):
        open_raster(str(cut))
    cut.write_bytes(data[:12])
    with pytest.raises(ImageReadError, match=r"cut\.tif"):
        open_raster(str(cut))


def test_corrupt_tile_fails_on_read(tmp_path: Path) -> None:
    path = tmp_path / "bad.tif"
    tifffile.imwrite(path, _image("uint16"), tile=(64, 64), compression="zlib")
    src = open_raster(str(path))
    clear_cache()
    tif = tifffile.TiffFile(path)
    offset, count = tif.pages[0].dataoffsets[-1], tif.pages[0].databytecounts[-1]
    tif.close()
    data = bytearray(path.read_bytes())
    data[offset : offset + count] = b"\xff" * count
    path.write_bytes(bytes(data))
    src.read(0, 10, 0, 10)
    with pytest.raises(ImageReadError, match=r"bad\.tif: reading window y 290:300, x 490:500 failed"):
        src.read(290, 300, 490, 500)


def test_not_a_tiff(tmp_path: Path) -> None:
    path = tmp_path / "fake.tif"
    path.write_bytes(b"PK\x03\x04 this is a zip file, not a TIFF" * 20)
    with pytest.raises(ImageReadError, match=r"fake\.tif: not a readable TIFF file.*not a TIFF despite"):
        open_raster(str(path))


def test_unsupported_dtype_and_bands(tmp_path: Path) -> None:
    tifffile.imwrite(tmp_path / "c.tif", np.ones((20, 20), np.complex64))
    with pytest.raises(ImageReadError, match=r"c\.tif: complex \(complex64\) pixels are not supported"):
        open_raster(str(tmp_path / "c.tif"))
    tifffile.imwrite(
        tmp_path / "b.tif", np.ones((20, 20, 5), np.uint8), photometric="minisblack", planarconfig="contig"
    )
    with pytest.raises(ImageReadError, match=r"b\.tif: 5 bands are not supported"):
        open_raster(str(tmp_path / "b.tif"))
    tifffile.imwrite(
        tmp_path / "two.tif", np.ones((20, 20, 2), np.uint8), photometric="minisblack", planarconfig="contig"
    )
    with pytest.raises(ImageReadError, match="2 bands"):
        open_raster(str(tmp_path / "two.tif"))
    tifffile.imwrite(tmp_path / "f16.tif", np.ones((20, 20), np.float16))
    with pytest.raises(ImageReadError, match="float16"):
        open_raster(str(tmp_path / "f16.tif"))


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(InputNotFoundError, match="does not exist"):
        open_raster(str(tmp_path / "nope.tif"))
    with pytest.raises(InputNotFoundError):
        TiffSource.open("memory://rasters-test/nope.tif")


def test_lzw_tiff_is_read_lazily_with_imagecodecs(tmp_path: Path) -> None:
    from PIL import Image

    path = tmp_path / "lzw.tif"
    data = _image("uint8")
    Image.fromarray(data).save(path, compression="tiff_lzw")
    source = open_raster(str(path))
    assert isinstance(source, TiffSource)
    np.testing.assert_array_equal(source.read(3, 20, 5, 30)[..., 0], data[3:20, 5:30])


def test_is_raster_and_dispatch(tmp_path: Path) -> None:
    assert is_raster("a/b.TIF") and is_raster("s3://bucket/x.tiff?versionId=3")
    assert is_raster("s3://bucket/store.zarr") and is_raster("store.zarr/image/")
    assert not is_raster("a/b.png") and not is_raster(str(tmp_path / "missing"))
    zarr.create_array(tmp_path / "noext", shape=(4, 4), dtype="u1")
    assert is_raster(str(tmp_path / "noext"))
    assert isinstance(open_raster(str(tmp_path / "noext")), ZarrSource)
    (tmp_path / "x.png").write_bytes(b"")
    assert open_raster(str(tmp_path / "x.png")) is None


def test_sources_are_small_and_hashable(sonar_tiff: tuple[Path, SonarScene]) -> None:
    src = open_raster(str(sonar_tiff[0]), {"anon": True})
    assert hash(src) == hash(pickle.loads(pickle.dumps(src)))
    assert "anon" not in repr(src)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert TiffSource.open(str(sonar_tiff[0])).georef == src.georef
