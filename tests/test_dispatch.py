"""Image inputs besides lazy rasters: Pillow images, arrays, listing folders, bit depth, layout."""

from __future__ import annotations

import ast
import pickle
from pathlib import Path

import numpy as np
import pytest
import tifffile
import zarr
from PIL import Image

from anomaly_dask.errors import ImageReadError, InputNotFoundError
from anomaly_dask.io import (
    ArraySource,
    PILSource,
    ScaledSource,
    list_images,
    match_bit_depth,
    open_source,
    output_names,
)

from .test_io import _check_windows, _image


def test_pillow_image_is_decoded_once_and_pickles(tmp_path: Path) -> None:
    ref = _image("uint8", bands=3, seed=7)
    Image.fromarray(ref).save(tmp_path / "rgb.png")
    src = open_source(str(tmp_path / "rgb.png"))
    assert isinstance(src, PILSource) and src.georef is None
    _check_windows(pickle.loads(pickle.dumps(src)), ref)
    np.testing.assert_array_equal(src.read_all(), ref)


def test_pillow_decompression_bomb_guard_stays_on(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    Image.fromarray(np.zeros((40, 40), np.uint8)).save(tmp_path / "bomb.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)
    with pytest.raises(ImageReadError, match=r"bomb\.png: too large for Pillow.*tiled TIFF or zarr"):
        open_source(str(tmp_path / "bomb.png"))
    (tmp_path / "junk.png").write_bytes(b"not a png at all")
    with pytest.raises(ImageReadError, match=r"junk\.png: cannot be read as an image"):
        open_source(str(tmp_path / "junk.png"))


def test_arrays_are_checked() -> None:
    rgba = _image("uint8", bands=4)
    src = open_source(rgba)
    assert isinstance(src, ArraySource) and src.channels == 3 and src.georef is None
    _check_windows(src, rgba[:, :, :3])
    with pytest.raises(ImageReadError, match="2 channels are not supported"):
        open_source(np.zeros((4, 4, 2), np.uint8))
    with pytest.raises(ImageReadError, match="pixel dtype bool"):
        open_source(np.zeros((4, 4), bool))


def test_list_images_and_output_names(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    tifffile.imwrite(tmp_path / "a" / "x.tif", np.zeros((4, 4), np.uint8))
    tifffile.imwrite(tmp_path / "y.tiff", np.zeros((4, 4), np.uint8))
    zarr.create_array(tmp_path / "z.zarr", shape=(4, 4), dtype="u1")
    (tmp_path / "notes.txt").write_text("not an image")
    with pytest.warns(UserWarning, match=r"skipping .*notes\.txt"):
        files = list_images(str(tmp_path))
    assert files == [str(tmp_path / "z.zarr"), str(tmp_path / "a" / "x.tif"), str(tmp_path / "y.tiff")]
    assert output_names(str(tmp_path), files) == ["z", "a/x", "y"]
    assert list_images(str(tmp_path / "y.tiff")) == [str(tmp_path / "y.tiff")]
    with pytest.raises(InputNotFoundError, match="does not exist"):
        list_images(str(tmp_path / "missing"))


def test_match_bit_depth() -> None:
    eight = ArraySource(np.array([[0, 100], [200, 255]], np.uint8)[:, :, None])
    with pytest.warns(UserWarning, match="multiplied by 257"):
        scaled = match_bit_depth(eight, "uint16", None)
    assert isinstance(scaled, ScaledSource) and scaled.dtype == np.float32
    np.testing.assert_array_equal(scaled.read(0, 2, 0, 2)[:, :, 0], [[0, 25700], [51400, 65535]])
    unit = ArraySource(np.array([[0.0, 0.5], [1.0, 0.25]], np.float32)[:, :, None])
    with pytest.warns(UserWarning, match="multiplied by 255"):
        got = match_bit_depth(unit, "uint8", None).read(0, 2, 0, 2)[:, :, 0]
    np.testing.assert_allclose(got, [[0, 127.5], [255, 63.75]])
    low16 = ArraySource(np.array([[3, 7]], np.uint16)[:, :, None], name="low16")
    with pytest.warns(UserWarning, match="used as they are"):
        assert match_bit_depth(low16, "uint8", None) is low16
    assert match_bit_depth(eight, "uint8", None) is eight and match_bit_depth(eight, None, None) is eight
    with pytest.raises(ImageReadError, match="values up to 4000.*trained on uint8"):
        match_bit_depth(ArraySource(np.full((2, 2, 1), 4000.0, np.float32)), "uint8", None)
    # no-data in the stored units reads as NaN once scaled
    with pytest.warns(UserWarning):
        nd = match_bit_depth(ArraySource(np.array([[0, 9]], np.uint8)[:, :, None]), "uint16", 0)
    out = nd.read(0, 1, 0, 2)[0, :, 0]
    assert np.isnan(out[0]) and out[1] == 9 * 257 and np.isnan(nd.nodata)


def test_io_dependencies_point_one_way() -> None:
    """base imports no reader; readers import base (and georef) only; dispatch imports readers;
    nothing in the package below dispatch imports it back."""
    root = Path(__file__).resolve().parents[1] / "anomaly_dask"
    allowed = {
        "base": set(),
        "pillow": {"base"},
        "tiff": {"base"},
        "zarr_source": {"base"},
        "bit_depth": {"base"},
        "dispatch": {"base", "pillow", "tiff", "zarr_source"},
    }
    for module, may in allowed.items():
        tree = ast.parse((root / "io" / f"{module}.py").read_text())
        siblings = {
            node.module.split(".")[0]
            for node in ast.walk(tree)
            if isinstance(node, ast.ImportFrom) and node.level == 1 and node.module
        }
        assert siblings <= may, (module, siblings - may)
    georef_tree = ast.parse((root / "georef.py").read_text())
    imported = [n.module or "" for n in ast.walk(georef_tree) if isinstance(n, ast.ImportFrom) and n.level]
    assert not [m for m in imported if m.startswith("io")]


def test_a_folder_with_zarr_metadata_is_one_image(tmp_path: Path) -> None:
    """A zarr store without the .zarr suffix is an image, given alone or found in a folder."""
    zarr.create_array(tmp_path / "scan", shape=(4, 4), dtype="u1")
    tifffile.imwrite(tmp_path / "x.tif", np.zeros((4, 4), np.uint8))
    assert list_images(str(tmp_path / "scan")) == [str(tmp_path / "scan")]
    assert list_images(str(tmp_path)) == [str(tmp_path / "scan"), str(tmp_path / "x.tif")]
