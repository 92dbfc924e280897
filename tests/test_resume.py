"""Resuming detect(): never reuse stale or mixed work; one store, one writer (leases)."""

from __future__ import annotations

import copy
import json
import logging
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tifffile
import zarr

from anomaly_dask import AnomalyDetector
from anomaly_dask import lease_records as lease_module
from anomaly_dask.errors import AnomalyDaskError, OutputExistsError, OutputLockedError, ParameterError
from anomaly_dask.identity import describe_differences, input_identity, run_id_of
from anomaly_dask.io import clear_cache, open_source
from anomaly_dask.lease import StoreLease
from anomaly_dask.lease_records import lease_url, read_lease
from anomaly_dask.store import OutputStore

from .conftest import texture

H, W, CHUNK = 96, 112, 32  # 3 x 4 chunks
N_CHUNKS = 12


@pytest.fixture
def ad(fast_model: AnomalyDetector) -> AnomalyDetector:
    """The session's fast model with small chunks (a copy: the session's stays as it is)."""
    det = copy.copy(fast_model)
    det.chunk_size = CHUNK
    return det


def write_input(path: Path, seed: int) -> str:
    """An uncompressed RGB TIFF: rewriting it with another seed keeps its size."""
    tifffile.imwrite(path, texture(H, W, seed))
    clear_cache()  # as a new process would: no reader of the old file stays open
    return str(path)


def dead_pid() -> int:
    """The pid of a process of this host that has ended (and been reaped)."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def fake_lease(out: str, *, host: str, pid: int, heartbeat: float, scope: str | None = "this") -> None:
    """Write a lease file as another run would have left it (``scope="this"``: this kernel)."""
    record = {
        "format": "anomaly_dask_lease", "version": 1, "store": out, "run_id": "f" * 32,
        "token": "someone-else", "host": host, "pid": pid, "pid_start": None,
        "scope": lease_module._SCOPE if scope == "this" else scope,
        "started": heartbeat, "started_utc": "then", "heartbeat": heartbeat, "heartbeat_utc": "then",
    }  # fmt: skip
    Path(lease_url(out)).write_text(json.dumps(record))


def forget_chunks(out: str, chunks: list[tuple[int, int]]) -> None:
    """Make a finished store look interrupted: drop some completion markers."""
    for iy, ix in chunks:
        os.remove(os.path.join(out + ".done", f"{iy}.{ix}"))
    zarr.open_group(out, mode="r+").attrs["complete"] = False


# ---------------------------------------------------------------------------- identity


def test_changed_input_is_not_reused(ad: AnomalyDetector, tmp_path: Path) -> None:
    image, out = write_input(tmp_path / "in.tif", 1), str(tmp_path / "out.zarr")
    first = ad.detect(image, out, quicklook=False)
    size = os.path.getsize(image)
    write_input(tmp_path / "in.tif", 2)  # same path, shape and size; other pixels
    assert os.path.getsize(image) == size
    with pytest.raises(OutputExistsError, match="the input changed") as info:
        ad.detect(image, out, quicklook=False)
    assert "sampled pixels" in str(info.value) and "overwrite=True" in str(info.value)
    assert zarr.open_group(out, mode="r").attrs["run_id"] == first["run_id"]  # untouched
    again = ad.detect(image, out, quicklook=False, overwrite=True)
    assert again["computed_chunks"] == N_CHUNKS and again["run_id"] != first["run_id"]
    ad.detect(image, str(tmp_path / "clean.zarr"), quicklook=False)
    a, b = zarr.open_group(out, mode="r"), zarr.open_group(str(tmp_path / "clean.zarr"), mode="r")
    np.testing.assert_array_equal(a["score"][:], b["score"][:])


def test_other_look_or_threshold_is_redrawn_not_mixed_in(ad: AnomalyDetector, tmp_path: Path) -> None:
    """Another overlay colour, opacity or threshold keeps the scores and redraws every
    chunk's mask and overlay from them (no CNN): the result equals a fresh run's."""
    image, out = write_input(tmp_path / "in.tif", 1), str(tmp_path / "out.zarr")
    ad.detect(image, out, quicklook=False)
    scores = zarr.open_group(out, mode="r")["score"][:]
    forget_chunks(out, [(0, 1), (2, 3)])  # "killed" with two chunks left
    ad.save(str(tmp_path / "m.safetensors"))
    stricter = AnomalyDetector.load(
        str(tmp_path / "m.safetensors"), false_alarm_rate=ad.false_alarm_rate_ / 10, chunk_size=CHUNK, verbose=0
    )
    assert stricter.threshold_ == ad.threshold_ + 1.0
    for change in ({"overlay_color": (0, 0, 255)}, {"overlay_opacity": 0.3}, "stricter"):
        other = copy.copy(ad) if change != "stricter" else stricter
        for key, value in (change.items() if change != "stricter" else ()):
            setattr(other, key, value)
        summary = other.detect(image, out, quicklook=False)
        fresh_out = str(tmp_path / f"fresh_{len(os.listdir(tmp_path))}.zarr")
        other.detect(image, fresh_out, quicklook=False)
        a, b = zarr.open_group(out, mode="r"), zarr.open_group(fresh_out, mode="r")
        for name in ("score", "mask", "overlay"):
            np.testing.assert_array_equal(a[name][:], b[name][:], err_msg=f"{change}: {name}")
        np.testing.assert_array_equal(a["score"][:], scores)
        assert summary["redrawn_chunks"] + summary["computed_chunks"] == summary["chunks"]
        assert summary["redrawn_chunks"] >= summary["chunks"] - 2
        assert a.attrs["complete"] is True and a.attrs["threshold"] == other.threshold_
        assert a.attrs["rendering"]["overlay_color"] == list(other.overlay_color)


def test_same_run_resumes_and_skips_done_chunks(ad: AnomalyDetector, tmp_path: Path) -> None:
    image, out = write_input(tmp_path / "in.tif", 1), str(tmp_path / "out.zarr")
    first = ad.detect(image, out, quicklook=False)
    want = {name: zarr.open_group(out, mode="r")[name][:] for name in ("score", "mask", "overlay")}
    forget_chunks(out, [(0, 0), (1, 2), (2, 3)])
    seen: list[tuple[int, int]] = []
    resumed = ad.detect(image, out, quicklook=False, progress=lambda k, n: seen.append((k, n)))
    assert resumed["computed_chunks"] == 3 and seen[0] == (0, 5) and seen[-1] == (5, 5)  # + pyramid, contacts
    assert resumed["run_id"] == first["run_id"]
    g = zarr.open_group(out, mode="r")
    assert g.attrs["complete"] is True
    for name, arr in want.items():
        np.testing.assert_array_equal(g[name][:], arr, err_msg=name)
    assert g.attrs["rendering"]["overlay_color"] == [255, 0, 0]
    assert g.attrs["score_settings"]["chunk_size"] == CHUNK
    assert ad.detect(image, out, quicklook=False)["computed_chunks"] == 0


def test_array_input_identity_is_a_full_hash(ad: AnomalyDetector, tmp_path: Path) -> None:
    image = texture(H, W, 3)
    out = str(tmp_path / "out.zarr")
    ad.detect(image, out, quicklook=False)
    changed = image.copy()
    changed[50, 60, 1] ^= 1  # one value, far from every sampled window's border
    with pytest.raises(OutputExistsError, match=r"the input changed \(array content"):
        ad.detect(changed, out, quicklook=False)
    assert ad.detect(image.copy(), out, quicklook=False)["computed_chunks"] == 0


def test_input_identity_catches_same_size_in_place_edits(tmp_path: Path) -> None:
    path = tmp_path / "big.tif"
    pixels = (np.arange(512 * 512) % 251).astype(np.uint8).reshape(512, 512)
    tifffile.imwrite(path, pixels)  # 256 KiB: the last rows lie beyond the hashed head
    before = input_identity(open_source(str(path)))
    assert input_identity(open_source(str(path))) == before  # deterministic
    stat = os.stat(path)
    mm = tifffile.memmap(str(path))
    mm[500, 500] ^= 0xFF  # inside the bottom-right sampled window
    mm.flush()
    del mm
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # put the mtime back
    clear_cache()
    after = input_identity(open_source(str(path)))
    assert after["size"] == before["size"] and after["head_sha256"] == before["head_sha256"]
    assert after["version"]["mtime"] == before["version"]["mtime"]
    assert after["pixels_sha256"] != before["pixels_sha256"]
    words = describe_differences({"input_content": before}, {"input_content": after})
    assert len(words) == 1 and "sampled pixels" in words[0]


def test_run_id_and_differences() -> None:
    base = {"model": "a" * 64, "threshold": 3.0, "nodata": float("nan"), "overlay_color": (255, 0, 0)}
    assert run_id_of(base) == run_id_of(dict(base, overlay_color=[255, 0, 0]))  # NaN-safe
    assert len(run_id_of(base)) == 32
    assert run_id_of(base) != run_id_of(dict(base, threshold=3.5))
    words = describe_differences(base, dict(base, threshold=3.5, params={"upsample": 2}))
    assert words == [
        'params differs (store: null, now: {"upsample": 2})',
        "the threshold differs (store: 3.0, now: 3.5)",
    ]
    assert describe_differences(dict(base, params={"a": 1, "b": 2}), dict(base, params={"a": 1, "b": 3})) == [
        "params differs (b)"
    ]


# ---------------------------------------------------------------------------- leases


def test_lease_is_gone_after_finished_and_failed_runs(ad: AnomalyDetector, tmp_path: Path) -> None:
    image, out = write_input(tmp_path / "in.tif", 1), str(tmp_path / "out.zarr")
    ad.detect(image, out, quicklook=False)
    assert not os.path.exists(lease_url(out))

    def interrupt(k: int, n: int) -> None:
        raise KeyboardInterrupt

    other = copy.copy(ad)
    other.chunk_size = 2 * ad.chunk_size  # other scores: the store of ``ad`` is refused to it
    with pytest.raises(KeyboardInterrupt):
        other.detect(image, str(tmp_path / "b.zarr"), quicklook=False, progress=interrupt)
    assert not os.path.exists(lease_url(str(tmp_path / "b.zarr")))

    def fail_later(k: int, n: int) -> None:
        if k == 2:
            raise RuntimeError("disk on fire")

    with pytest.raises(RuntimeError, match="disk on fire"):
        ad.detect(image, str(tmp_path / "c.zarr"), quicklook=False, progress=fail_later)
    assert not os.path.exists(lease_url(str(tmp_path / "c.zarr")))
    with pytest.raises(OutputExistsError):  # a refused run leaves no lease either
        other.detect(image, out, quicklook=False)
    assert not os.path.exists(lease_url(out))


def test_second_run_while_the_first_writes_is_refused(ad: AnomalyDetector, tmp_path: Path) -> None:
    image, out = write_input(tmp_path / "in.tif", 1), str(tmp_path / "out.zarr")
    refusals: list[BaseException] = []

    def meanwhile(k: int, n: int) -> None:
        if k == 0:  # the first run holds the lease and has created the store
            for overwrite in (False, True):
                try:
                    ad.detect(image, out, quicklook=False, overwrite=overwrite)
                except OutputLockedError as err:
                    refusals.append(err)

    summary = ad.detect(image, out, quicklook=False, progress=meanwhile)
    assert summary["computed_chunks"] == N_CHUNKS  # the first run was not disturbed
    assert len(refusals) == 2
    for err in refusals:
        text = str(err)
        assert f"pid {os.getpid()}" in text and socket.gethostname() in text and "Wait for" in text
        assert isinstance(err, OutputExistsError) and isinstance(err, FileExistsError)
        assert isinstance(err, AnomalyDaskError) and "overwrite=True does not delete" in text
    assert zarr.open_group(out, mode="r").attrs["complete"] is True
    assert not os.path.exists(lease_url(out))


def test_live_lease_refuses_runs_and_overwrite(ad: AnomalyDetector, tmp_path: Path) -> None:
    image, out = write_input(tmp_path / "in.tif", 1), str(tmp_path / "out.zarr")
    ad.detect(image, out, quicklook=False)
    # another host, fresh heartbeat
    fake_lease(out, host="elsewhere.example", pid=1, heartbeat=time.time())
    for overwrite in (False, True):
        with pytest.raises(OutputLockedError, match="elsewhere.example") as info:
            ad.detect(image, out, quicklook=False, overwrite=overwrite)
        assert "heartbeat was" in str(info.value)
    with pytest.raises(OutputLockedError):
        OutputStore.create(out, H, W, CHUNK, "other-run", {}, overwrite=True)
    assert zarr.open_group(out, mode="r").attrs["complete"] is True  # nothing was deleted
    # this process, via the API
    os.remove(lease_url(out))
    with StoreLease(out, "holder") as lease:
        assert lease.held and read_lease(out)["live"] is True
        with pytest.raises(OutputLockedError, match="is running"):
            ad.detect(image, out, quicklook=False, overwrite=True)
    assert read_lease(out) is None
    assert ad.detect(image, out, quicklook=False)["computed_chunks"] == 0


def test_stale_leases_are_taken_over(ad: AnomalyDetector, tmp_path: Path, caplog: Any) -> None:
    image, out = write_input(tmp_path / "in.tif", 1), str(tmp_path / "out.zarr")
    fake_lease(out, host=socket.gethostname(), pid=dead_pid(), heartbeat=time.time())
    assert read_lease(out)["live"] is False
    with caplog.at_level(logging.WARNING, logger="anomaly_dask"):
        summary = ad.detect(image, out, quicklook=False)
    assert summary["computed_chunks"] == N_CHUNKS
    assert any(
        "taking over the stale lease" in r.getMessage() and "is gone" in r.getMessage()
        for r in caplog.records
    )
    assert not os.path.exists(lease_url(out))

    fake_lease(out, host="elsewhere.example", pid=1, heartbeat=time.time() - 3600)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="anomaly_dask"):
        assert ad.detect(image, out, quicklook=False)["computed_chunks"] == 0
    assert any(re.search(r"heartbeat was 36\d\d s ago", r.getMessage()) for r in caplog.records)
    assert not os.path.exists(lease_url(out))


def test_lease_heartbeat_loss_and_release(tmp_path: Path) -> None:
    out = str(tmp_path / "out.zarr")
    lease = StoreLease(out, "run-a", heartbeat_s=0.05, ttl_s=1.0).acquire()
    first = read_lease(out)
    assert first["run_id"] == "run-a" and first["pid"] == os.getpid() and first["live"]
    assert first["host"] == socket.gethostname()
    deadline = time.time() + 10
    while read_lease(out)["heartbeat"] == first["heartbeat"] and time.time() < deadline:
        time.sleep(0.02)
    assert read_lease(out)["heartbeat"] > first["heartbeat"]  # the thread beats
    assert read_lease(out)["started"] == first["started"]
    with pytest.raises(OutputLockedError, match="run-a"):
        StoreLease(out, "run-b").acquire()
    lease.release()
    assert read_lease(out) is None and not lease.held
    # another run replaces the file (it thought this one dead): this lease is lost
    lease = StoreLease(out, "run-a", heartbeat_s=600, ttl_s=1200).acquire()
    fake_lease(out, host="elsewhere.example", pid=1, heartbeat=time.time())
    lease.heartbeat()
    assert lease.lost and not lease.held
    with pytest.raises(OutputLockedError, match="lost its lease"):
        lease.check()
    lease.release()
    assert read_lease(out)["host"] == "elsewhere.example"  # left to its new holder
    with pytest.raises(ParameterError):
        StoreLease(out, "x", heartbeat_s=5, ttl_s=1)


def test_unreadable_lease_files(tmp_path: Path) -> None:
    out = str(tmp_path / "out.zarr")
    Path(lease_url(out)).write_text("")  # being written right now
    with pytest.raises(OutputLockedError, match="being written"):
        StoreLease(out, "a").acquire()
    old = time.time() - 3600
    os.utime(lease_url(out), (old, old))  # garbage left long ago
    with StoreLease(out, "a") as lease:
        assert read_lease(out)["token"] == lease.token
    assert not os.path.exists(lease_url(out))
    Path(lease_url(out)).write_text("my notes")  # a file of the user's: never replaced
    with pytest.raises(OutputLockedError, match="not an anomaly_dask lease"):
        StoreLease(out, "a").acquire()
    assert Path(lease_url(out)).read_text() == "my notes"


def test_pid_is_only_checked_in_the_same_process_scope(tmp_path: Path) -> None:
    """Same host name, other pid namespace (a container with host networking): the pid
    says nothing there, so a fresh heartbeat keeps the lease live."""
    out = str(tmp_path / "out.zarr")
    fake_lease(out, host=socket.gethostname(), pid=dead_pid(), heartbeat=time.time(), scope="other")
    assert read_lease(out)["live"] is True and "heartbeat" in read_lease(out)["reason"]
    fake_lease(out, host=socket.gethostname(), pid=dead_pid(), heartbeat=time.time())
    assert read_lease(out)["live"] is False and "is gone" in read_lease(out)["reason"]


def test_killed_holder_on_this_host_is_taken_over(tmp_path: Path) -> None:
    out = str(tmp_path / "out.zarr")
    child = (
        "import sys, time\n"
        "from anomaly_dask.lease import StoreLease\n"
        "StoreLease(sys.argv[1], 'child').acquire()\n"
        "print('held', flush=True)\n"
        "time.sleep(120)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    proc = subprocess.Popen([sys.executable, "-c", child, out], stdout=subprocess.PIPE, env=env, text=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "held"
        with pytest.raises(OutputLockedError, match="is running"):
            StoreLease(out, "parent").acquire()
    finally:
        proc.kill()
        proc.wait()
    assert read_lease(out)["live"] is False  # heartbeat fresh, but the pid is gone
    with StoreLease(out, "parent") as lease:
        assert read_lease(out)["token"] == lease.token


def test_lease_on_other_filesystems(s3: tuple[dict[str, Any], str]) -> None:
    options, bucket = s3
    url = f"s3://{bucket}/survey/out.zarr"
    with StoreLease(url, "run-a", options) as lease:
        record = read_lease(url, options)
        assert record["token"] == lease.token and record["live"]
        with pytest.raises(OutputLockedError, match="is running"):
            StoreLease(url, "run-b", options).acquire()
        with pytest.raises(OutputLockedError):
            OutputStore.create(url, H, W, CHUNK, "run-b", {}, storage_options=options)
        OutputStore.create(url, H, W, CHUNK, "run-a", {}, storage_options=options, lease=lease)
    assert read_lease(url, options) is None
    with pytest.raises(ParameterError, match="root of a bucket"):
        StoreLease(f"s3://{bucket}", "run-a", options)


def test_lease_on_memory_filesystem() -> None:
    url = f"memory://lease-test-{os.getpid()}-{time.time_ns()}/out.zarr"
    with StoreLease(url, "m") as lease:
        assert read_lease(url)["token"] == lease.token
        with pytest.raises(OutputLockedError):
            StoreLease(url, "n").acquire()
    assert read_lease(url) is None


def test_cli_resume_and_lease_refusals_are_one_line(fast_model: AnomalyDetector, tmp_path: Path,
                                                    capsys: Any, scheduler_args: list[str]) -> None:
    """The findings through the CLI: other scores, changed input, a live lease; another
    look or threshold is redrawn."""
    from anomaly_dask import cli

    model = str(tmp_path / "m.safetensors")
    fast_model.save(model)
    image, out = write_input(tmp_path / "in.tif", 1), str(tmp_path / "out.zarr")

    def run(*extra: str) -> tuple[int, str]:
        try:
            code = cli.main(["detect", model, image, "--output", out, *scheduler_args, "-q", *extra])
        except SystemExit as exc:
            code = int(exc.code or 0)
        return code, capsys.readouterr().err

    assert run()[0] == 0
    code, err = run("--chunk-size", "96")
    assert code == 1 and "chunk_size differs" in err and "--overwrite" in err
    assert run("--overlay-color", "0", "0", "255", "--false-alarm-rate", "0.01")[0] == 0  # redrawn
    write_input(tmp_path / "in.tif", 2)
    code, err = run()
    assert code == 1 and "the input changed" in err
    fake_lease(out, host="elsewhere.example", pid=1, heartbeat=time.time())
    code, err = run("--overwrite")
    assert code == 1 and "elsewhere.example" in err
    for text in (err,):
        assert "Traceback" not in text and len(text.strip().splitlines()) == 1, text
    assert zarr.open_group(out, mode="r").attrs["complete"] is True  # the old store survives
