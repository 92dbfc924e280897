"""Tests of the chunked output store (local, memory://, moto S3); exporters: test_export.py."""

from __future__ import annotations

import io
import os
import pickle
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from anomaly_dask.errors import (
    AnomalyDaskError,
    InputNotFoundError,
    OutputExistsError,
    OutputIncompleteError,
    OutputLocationError,
    OutputLockedError,
    ParameterError,
)
from anomaly_dask.export import write_geotiff
from anomaly_dask.lease import StoreLease
from anomaly_dask.lease_records import lease_url
from anomaly_dask.store import OutputStore

H, W, CHUNK = 203, 157, 64  # 4 x 3 chunks, the last row and column partial


def chunk_data(store: OutputStore, iy: int, ix: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Deterministic score/mask/overlay of a chunk: a function of absolute pixel coordinates."""
    y0, y1, x0, x1 = store.chunk_bounds(iy, ix)
    yy, xx = np.mgrid[y0:y1, x0:x1]
    score = (np.sin(yy * 0.07) * np.cos(xx * 0.05) + yy * 1e-3).astype(np.float32)
    mask = np.where(score > 0.5, 255, 0).astype(np.uint8)
    overlay = np.stack([(yy * 3) % 256, (xx * 5) % 256, (yy + xx) % 256], axis=-1).astype(np.uint8)
    return score, mask, overlay


def expected(store: OutputStore) -> dict[str, np.ndarray]:
    full = {
        "score": np.zeros((store.height, store.width), np.float32),
        "mask": np.zeros((store.height, store.width), np.uint8),
        "overlay": np.zeros((store.height, store.width, 3), np.uint8),
    }
    for iy, ix in store.all_chunks():
        y0, y1, x0, x1 = store.chunk_bounds(iy, ix)
        for name, arr in zip(("score", "mask", "overlay"), chunk_data(store, iy, ix)):
            full[name][y0:y1, x0:x1] = arr
    return full


def mask_tif(store: OutputStore) -> np.ndarray:
    """What ``mask.tif`` holds for a store written by :func:`write_all`: 1 anomalous, 0
    normal, 255 where the score is NaN."""
    want = expected(store)
    return np.where(np.isnan(want["score"]), 255, want["mask"] > 0).astype(np.uint8)


def write_all(store: OutputStore, chunks: list[tuple[int, int]] | None = None) -> None:
    for iy, ix in store.all_chunks() if chunks is None else chunks:
        store.write_chunk(iy, ix, *chunk_data(store, iy, ix))


def full_store(url: str, **kw: Any) -> OutputStore:
    store = OutputStore.create(url, H, W, CHUNK, "run-1", {"input": "x.tif"}, **kw)
    write_all(store)
    store.finalize({"n": store.n_chunks})
    return store


def check_equal(store: OutputStore) -> None:
    want = expected(store)
    for name, arr in want.items():
        np.testing.assert_array_equal(store.read(name)[:], arr, err_msg=name)


# ---------------------------------------------------------------------------- local store


def test_local_roundtrip(tmp_path: Path) -> None:
    store = OutputStore.create(tmp_path / "run.zarr", H, W, CHUNK, "run-1", {"input": "x.tif"})
    assert (store.n_rows, store.n_cols) == (4, 3)
    assert store.chunk_bounds(3, 2) == (192, 203, 128, 157)
    assert store.done_chunks() == set()
    # workers get a pickled copy and write in any order, concurrently
    copy = pickle.loads(pickle.dumps(store))
    assert copy == store
    order = store.all_chunks()[::-1]
    with ThreadPoolExecutor(4) as pool:
        list(pool.map(lambda c: copy.write_chunk(*c, *chunk_data(copy, *c)), order))
    assert store.done_chunks() == set(store.all_chunks())
    assert store.is_done(3, 2)
    store.finalize({"seconds": 1.5})
    check_equal(store)
    attrs = store.attrs
    assert attrs["run_id"] == "run-1" and attrs["complete"] is True
    assert attrs["input"] == "x.tif" and attrs["summary"] == {"seconds": 1.5}
    assert store.read("score").chunks == (CHUNK, CHUNK)
    assert store.read("overlay").chunks == (CHUNK, CHUNK, 3)
    assert OutputStore.open(str(tmp_path / "run.zarr")) == store


def test_write_chunk_checks_shapes(tmp_path: Path) -> None:
    store = OutputStore.create(tmp_path / "run.zarr", H, W, CHUNK, "r", {})
    score, mask, overlay = chunk_data(store, 0, 0)
    with pytest.raises(ParameterError, match="shape"):
        store.write_chunk(3, 2, score, mask, overlay)  # the last chunk is smaller
    with pytest.raises(ParameterError, match="outside"):
        store.write_chunk(4, 0, score, mask, overlay)
    assert store.done_chunks() == set()


def test_resume_keeps_done_chunks_and_refuses_other_runs(tmp_path: Path) -> None:
    url = str(tmp_path / "run.zarr")
    store = OutputStore.create(url, H, W, CHUNK, "run-1", {})
    first = [(0, 0), (1, 2), (3, 1)]
    write_all(store, first)
    del store  # "crash"

    again = OutputStore.create(url, H, W, CHUNK, "run-1", {})
    assert again.done_chunks() == set(first)
    assert [c for c in again.all_chunks() if c not in first] == again.missing_chunks()
    want = expected(again)
    for iy, ix in again.all_chunks():
        y0, y1, x0, x1 = again.chunk_bounds(iy, ix)
        got = again.read("score")[y0:y1, x0:x1]
        if (iy, ix) in first:
            np.testing.assert_array_equal(got, want["score"][y0:y1, x0:x1])
        else:
            assert np.isnan(got).all()  # unwritten scores read as no data, not as normal
            assert not again.is_done(iy, ix)

    with pytest.raises(OutputExistsError, match="overwrite=True") as info:
        OutputStore.create(url, H, W, CHUNK, "run-2", {})
    assert "run-1" in str(info.value) and "run-2" in str(info.value)
    assert isinstance(info.value, FileExistsError) and isinstance(info.value, AnomalyDaskError)
    with pytest.raises(OutputExistsError, match="layout"):
        OutputStore.create(url, H, W, 32, "run-1", {})
    assert again.done_chunks() == set(first)  # refusals change nothing

    fresh = OutputStore.create(url, H, W, 32, "run-2", {"k": 1}, overwrite=True)
    assert fresh.done_chunks() == set()
    assert fresh.attrs["run_id"] == "run-2" and fresh.attrs["complete"] is False
    assert np.isnan(fresh.read("score")[:]).all()
    assert fresh.read("mask").chunks == (32, 32)


def test_identity_is_recorded_and_differences_named(tmp_path: Path) -> None:
    url = str(tmp_path / "run.zarr")
    ident = {
        "model": "m" * 64,
        "overlay_color": (255, 0, 0),
        "input_content": {"size": 10, "pixels_sha256": "a"},
    }
    OutputStore.create(url, H, W, CHUNK, "run-1", {}, identity=ident)
    assert OutputStore.open(url).attrs["identity"]["overlay_color"] == [255, 0, 0]
    other = {**ident, "overlay_color": (0, 0, 255), "input_content": {"size": 10, "pixels_sha256": "b"}}
    with pytest.raises(OutputExistsError) as info:
        OutputStore.create(url, H, W, CHUNK, "run-2", {}, identity=other)
    text = str(info.value)
    assert "the input changed (sampled pixels)" in text and "overlay_color differs" in text
    assert "overwrite=True" in text
    old = str(tmp_path / "old.zarr")  # a store of an earlier version: no identity recorded
    OutputStore.create(old, H, W, CHUNK, "run-1", {})
    with pytest.raises(OutputExistsError, match="records no identity"):
        OutputStore.create(old, H, W, CHUNK, "run-2", {}, identity=other)


def test_live_lease_blocks_create_and_overwrite(tmp_path: Path) -> None:
    url = str(tmp_path / "run.zarr")
    full_store(url)
    with StoreLease(url, "run-1") as lease:
        assert os.path.isfile(lease_url(url)) and lease.lock_url == lease_url(url)
        for run_id, overwrite in (("run-1", False), ("run-2", True)):
            with pytest.raises(OutputLockedError, match="being written by run run-1") as info:
                OutputStore.create(url, H, W, CHUNK, run_id, {}, overwrite=overwrite)
            assert isinstance(info.value, OutputExistsError)
        assert OutputStore.open(url).attrs["complete"] is True  # nothing deleted
        resumed = OutputStore.create(url, H, W, CHUNK, "run-1", {}, lease=lease)  # its own lease
        assert resumed.done_chunks() == set(resumed.all_chunks())
        with pytest.raises(ParameterError, match="lease"):
            OutputStore.create(str(tmp_path / "other.zarr"), H, W, CHUNK, "run-1", {}, lease=lease)
    assert not os.path.exists(lease_url(url))
    fresh = OutputStore.create(url, H, W, CHUNK, "run-2", {}, overwrite=True)
    assert fresh.done_chunks() == set()


def test_all_zero_chunk_is_done_and_written(tmp_path: Path) -> None:
    store = OutputStore.create(tmp_path / "run.zarr", H, W, CHUNK, "r", {})
    y0, y1, x0, x1 = store.chunk_bounds(1, 1)
    shape = (y1 - y0, x1 - x0)
    store.write_chunk(1, 1, np.zeros(shape), np.zeros(shape, bool), np.zeros(shape + (3,)))
    assert store.done_chunks() == {(1, 1)}
    assert store.is_done(1, 1) and not store.is_done(0, 0)
    assert not store.read("overlay")[y0:y1, x0:x1].any()
    root = tmp_path / "run.zarr"  # the zero chunk exists as an object (write_empty_chunks)
    for key in ("score/c/1/1", "mask/c/1/1", "overlay/c/1/1/0"):
        assert (root / key).is_file(), key


def test_truncated_marker_is_not_done(tmp_path: Path) -> None:
    store = OutputStore.create(tmp_path / "run.zarr", H, W, CHUNK, "run-1", {})
    write_all(store, [(0, 0), (0, 1)])
    (tmp_path / "run.zarr.done" / "0.1").write_bytes(b"")  # crash while writing the marker
    (tmp_path / "run.zarr.done" / "9.9").write_bytes(b"run-1")  # outside the grid
    assert store.done_chunks() == {(0, 0)}
    assert not store.is_done(0, 1)


def test_finalize_incomplete_raises(tmp_path: Path) -> None:
    store = OutputStore.create(tmp_path / "run.zarr", H, W, CHUNK, "r", {})
    write_all(store, store.all_chunks()[:-1])
    with pytest.raises(OutputIncompleteError, match="1 of 12"):
        store.finalize({"n": 1})
    assert store.attrs["complete"] is False and "summary" not in store.attrs
    write_all(store, store.all_chunks()[-1:])
    store.finalize({"n": 12})
    assert store.attrs["complete"] is True


def test_bad_locations(tmp_path: Path) -> None:
    missing = tmp_path / "no" / "such" / "run.zarr"
    with pytest.raises(OutputLocationError, match="does not exist") as info:
        OutputStore.create(missing, H, W, CHUNK, "r", {})
    assert isinstance(info.value, InputNotFoundError) and str(tmp_path / "no") in str(info.value)
    assert not (tmp_path / "no").exists()

    foreign = tmp_path / "photos"
    foreign.mkdir()
    (foreign / "cat.jpg").write_bytes(b"meow")
    for overwrite in (False, True):  # never deletes what is not a zarr store
        with pytest.raises(OutputExistsError, match="not a zarr store"):
            OutputStore.create(foreign, H, W, CHUNK, "r", {}, overwrite=overwrite)
    assert (foreign / "cat.jpg").read_bytes() == b"meow"

    with pytest.raises(ParameterError):
        OutputStore.create(tmp_path / "a.zarr", 0, W, CHUNK, "r", {})
    with pytest.raises(ParameterError):
        OutputStore.create(tmp_path / "a.zarr", H, W, CHUNK, "", {})
    with pytest.raises(ParameterError, match="JSON"):
        OutputStore.create(tmp_path / "a.zarr", H, W, CHUNK, "r", {"x": object()})
    assert not (tmp_path / "a.zarr").exists()


def test_read_only_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ro = tmp_path / "ro"
    ro.mkdir()
    # The suite may run as root, who can write anywhere: let the OS deny this folder instead.
    real_access = os.access
    monkeypatch.setattr(
        "anomaly_dask.store.os.access",
        lambda p, mode: False if str(p).startswith(str(ro)) else real_access(p, mode),
    )
    with pytest.raises(PermissionError, match="not writable"):
        OutputStore.create(ro / "run.zarr", H, W, CHUNK, "r", {})
    assert not any(ro.iterdir())


def test_memory_filesystem() -> None:
    url = f"memory://anomaly-dask-test-{uuid.uuid4().hex}/run.zarr"
    store = full_store(url)
    check_equal(store)
    assert OutputStore.open(url).run_id == "run-1"
    assert OutputStore.create(url, H, W, CHUNK, "run-1", {}).done_chunks() == set(store.all_chunks())


# ---------------------------------------------------------------------------- S3 (moto)


def test_s3_roundtrip(s3: tuple[dict[str, Any], str], tmp_path: Path) -> None:
    import s3fs

    options, bucket = s3
    url = f"s3://{bucket}/run.zarr"
    store = OutputStore.create(url, H, W, CHUNK, "run-1", {}, storage_options=options)
    write_all(store, store.all_chunks()[:5])
    resumed = OutputStore.create(url, H, W, CHUNK, "run-1", {}, storage_options=options)
    assert resumed.done_chunks() == set(store.all_chunks()[:5])
    write_all(resumed, resumed.missing_chunks())
    resumed.finalize({"where": "s3"})
    check_equal(OutputStore.open(url, storage_options=options))
    assert resumed.attrs["complete"] is True

    write_geotiff(
        resumed, f"s3://{bucket}/out/mask.tif", "mask", {"transform": (0, 1, 0, 0, 0, -1), "crs_epsg": None}
    )
    fs = s3fs.S3FileSystem(**options)
    fs.invalidate_cache()
    assert fs.exists(f"{bucket}/out/mask.tif") and not fs.exists(f"{bucket}/out/mask.tif.partial")
    import tifffile

    with tifffile.TiffFile(io.BytesIO(fs.cat_file(f"{bucket}/out/mask.tif"))) as tif:
        np.testing.assert_array_equal(tif.asarray(), mask_tif(resumed))
    assert not [k for k in fs.find(f"{bucket}/run.zarr") if "write-probe" in k]


def test_s3_missing_bucket(s3: tuple[dict[str, Any], str]) -> None:
    import s3fs

    options, _bucket = s3
    fs = s3fs.S3FileSystem(**options)
    before = sorted(fs.ls("", refresh=True))
    with pytest.raises(OutputLocationError, match="no-such-bucket") as info:
        OutputStore.create("s3://no-such-bucket/run.zarr", H, W, CHUNK, "r", {}, storage_options=options)
    assert isinstance(info.value, FileNotFoundError)
    assert sorted(fs.ls("", refresh=True)) == before
