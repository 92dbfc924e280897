"""One store, one writer: the lease file ``<url>.lock`` beside an output store.

While a run writes a store it holds the lease: a small JSON file with its run id, host,
process, start time and a heartbeat refreshed by a background thread, removed when the run
ends (also on errors). On local disks it is created atomically (``O_CREAT | O_EXCL``); on
object stores it is written and read back (last writer wins; a run that lost its lease
notices at its next heartbeat). A lease is live while its process on this host runs, or,
seen from elsewhere, while its heartbeat is younger than :data:`LEASE_TTL_S`; a stale
lease is taken over with a warning.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
import uuid
from collections.abc import Mapping
from typing import Any

import fsspec

from .errors import OutputLocationError, OutputLockedError, OutputNotWritableError, ParameterError
from .lease_records import (
    _HOST,
    _LEASE_ATTEMPTS,
    _LEASE_FORMAT,
    _LEASE_SUFFIX,
    _SCOPE,
    LEASE_HEARTBEAT_S,
    LEASE_TTL_S,
    _holder,
    _iso,
    _judge_lease,
    _lease_path,
    _locked_message,
    _parse_lease,
    _proc_stat,
    _read_lease_file,
)
from .locations import check_location, check_writable, is_local, normalize_url

log = logging.getLogger("anomaly_dask")

__all__ = ["StoreLease"]


class StoreLease:
    """Exclusive claim of one output store by one run, kept alive by a heartbeat.

    The lease is the file ``<url>.lock`` beside the store (see :func:`lease_url`). It lies
    outside the store so that it can be taken before anything in the store is read,
    created or deleted (``overwrite``), and so that deleting or recreating the store never
    touches it; readers of the store never see it. It holds JSON: ``run_id``, ``token``
    (unique per lease), ``host``, ``scope`` (Linux: boot id and pid namespace), ``pid``,
    ``pid_start`` (Linux: the process's start time, which tells a reused pid apart),
    ``started`` and ``heartbeat`` (Unix times, also as ISO-8601 UTC). A background thread rewrites ``heartbeat`` every ``heartbeat_s``
    seconds; :meth:`release` (also on errors and KeyboardInterrupt when used as a context
    manager) deletes the file.

    A lease found at :meth:`acquire` is *live*, and the call fails with
    :class:`OutputLockedError`, when its holder is a process of this host (same host name
    and scope) that still runs, or, for a holder elsewhere, when its heartbeat is younger
    than ``ttl_s``. Other
    leases are stale (the holder was killed, e.g. ``kill -9``, or its machine died) and are
    taken over, with a warning in the log.

    On a local filesystem the file is created atomically (``O_CREAT | O_EXCL``), so of two
    runs starting together exactly one gets it; a stale lease is first renamed aside (only
    one run's rename succeeds) and checked to be the one judged stale. Heartbeats replace
    the file atomically (``os.replace``) after checking that it is still this lease.

    Limitations: other filesystems (S3, GCS, ...) offer no portable create-if-absent, so
    there the file is written, then read back, and the last writer wins: two runs starting
    within the same moment may both believe they hold it until the next heartbeat, which
    reads the file again; the loser then marks its lease lost, and a caller that checks
    (:meth:`check`; ``detect`` does after every chunk and before marking the store
    complete) stops. Liveness across hosts relies on clocks
    agreeing to well within ``ttl_s``; a process that is alive but hung keeps its lease on
    its own host. Between a heartbeat's check and its write another run could take over;
    the window is a few milliseconds every ``heartbeat_s``.

    Parameters
    ----------
    url : str or os.PathLike
        Root of the store.
    run_id : str
        Id of the run taking the lease (recorded, shown to a refused run).
    storage_options : dict, optional
        fsspec options.
    heartbeat_s : float
        Seconds between heartbeats.
    ttl_s : float
        Age of the heartbeat after which a lease held from another host is stale.

    Raises
    ------
    ParameterError
        For a store at the root of a bucket (put it in a folder: its lease lies beside it).
    """

    def __init__(
        self,
        url: str | os.PathLike[str],
        run_id: str,
        storage_options: Mapping[str, Any] | None = None,
        *,
        heartbeat_s: float = LEASE_HEARTBEAT_S,
        ttl_s: float = LEASE_TTL_S,
    ) -> None:
        if not (heartbeat_s > 0 and ttl_s > heartbeat_s):
            raise ParameterError(f"need 0 < heartbeat_s < ttl_s, got {heartbeat_s}, {ttl_s}")
        self.url = normalize_url(url)
        self.run_id = str(run_id)
        self.storage_options = dict(storage_options or {})
        self.heartbeat_s = float(heartbeat_s)
        self.ttl_s = float(ttl_s)
        self.token = uuid.uuid4().hex
        self._fs, self._path = fsspec.core.url_to_fs(self.url, **self.storage_options)
        lock = _lease_path(self._fs, self._path)
        if lock is None:
            raise ParameterError(
                f"{self.url} is the root of a bucket; write the output store into a folder of "
                f"it (e.g. {self.url}/out.zarr): its lease file lies beside the store"
            )
        self._lock = lock
        self._started: float | None = None
        self._held = False
        self._lost: str | None = None
        self._mutex = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # ---- state ----------------------------------------------------------------------------

    @property
    def lock_url(self) -> str:
        """URL of the lease file."""
        return self.url + _LEASE_SUFFIX

    @property
    def held(self) -> bool:
        """Whether this lease is held (acquired, not released, not lost)."""
        return self._held and self._lost is None

    @property
    def lost(self) -> str | None:
        """Why this lease was lost to another run while held, or None."""
        return self._lost

    def check(self) -> None:
        """Raise unless this lease is still held.

        Raises
        ------
        OutputLockedError
            If the lease was lost to another run, or is not held.
        """
        if self._lost is not None:
            raise OutputLockedError(
                f"{self.url}: this run (run {self.run_id[:12]}) lost its lease: {self._lost}; "
                "the store was not marked complete. Make sure only one run writes it, then "
                "resume."
            )
        if not self._held:
            raise OutputLockedError(f"{self.url}: the lease of run {self.run_id[:12]} is not held")

    def _record(self) -> bytes:
        now = time.time()
        stat = _proc_stat(os.getpid())
        record = {
            "format": _LEASE_FORMAT, "version": 1, "store": self.url, "run_id": self.run_id,
            "token": self.token, "host": _HOST, "scope": _SCOPE, "pid": os.getpid(),
            "pid_start": None if stat is None else stat[1],
            "started": self._started, "started_utc": _iso(self._started),
            "heartbeat": now, "heartbeat_utc": _iso(now),
        }  # fmt: skip
        return json.dumps(record, indent=1, sort_keys=True).encode()

    # ---- taking ---------------------------------------------------------------------------

    def acquire(self) -> StoreLease:
        """Take the lease, or fail because another live run holds it.

        Returns
        -------
        StoreLease
            ``self``, held, its heartbeat thread running.

        Raises
        ------
        OutputLocationError, OutputNotWritableError
            If the store's location does not exist or cannot be written (nothing written).
        OutputLockedError
            If another live run holds the lease (the message names it and what to do).
        """
        if self._held:
            raise ParameterError(f"the lease of {self.url} is already held by this object")
        check_location(self._fs, self._path, self.url)
        check_writable(self._fs, self._path, self.url)
        self._started = time.time()
        self._lost = None
        local = is_local(self._fs)
        for _ in range(_LEASE_ATTEMPTS):
            if self._try_local() if local else self._try_remote():
                break
        else:
            raise OutputLockedError(
                f"{self.url}: could not take the lease {self.lock_url}: other runs kept taking "
                "it at the same time; make sure only one run writes this store"
            )
        self._held = True
        self._stop.clear()
        self._thread = threading.Thread(
            target=self._run, name=f"anomaly_dask-lease-{self.run_id[:8]}", daemon=True
        )
        self._thread.start()
        log.debug("%s: lease taken by run %s", self.url, self.run_id[:12])
        return self

    def _judge_found(self, raw: bytes, file_time: float | None) -> None:
        """Raise for a live lease found in the way; log the takeover of a stale one."""
        record = _parse_lease(raw)
        if record is None and raw.strip() and not raw.lstrip().startswith(b"{"):
            raise OutputLockedError(
                f"{self.url}: {self.lock_url} exists and is not an anomaly_dask lease; "
                "refusing to replace it (move it away, or write the store elsewhere)"
            )
        live, why = _judge_lease(record, file_time, self.ttl_s)
        if live:
            raise OutputLockedError(_locked_message(self.url, record, why))
        log.warning("%s: taking over the stale lease of %s: %s", self.url, _holder(record), why)

    def _try_local(self) -> bool:
        try:
            fd = os.open(self._lock, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            pass
        except FileNotFoundError as err:
            raise OutputLocationError(f"{self.url}: cannot create the lease {self._lock} ({err})") from err
        except PermissionError as err:
            raise OutputNotWritableError(f"{self.url}: cannot create the lease {self._lock} ({err})") from err
        else:
            with os.fdopen(fd, "wb") as f:
                f.write(self._record())
                f.flush()
                os.fsync(f.fileno())
            return True
        raw, file_time = _read_lease_file(self._fs, self._lock)
        if raw is None:
            return False  # released meanwhile: try again
        self._judge_found(raw, file_time)
        aside = f"{self._lock}.stale-{uuid.uuid4().hex[:12]}"
        try:
            os.rename(self._lock, aside)  # of several runs taking over, one rename succeeds
        except FileNotFoundError:
            return False
        try:
            with open(aside, "rb") as f:
                moved = f.read()
            if moved != raw:  # it changed after it was judged: put it back, judge again
                try:
                    os.link(aside, self._lock)
                except FileExistsError:
                    pass
                except OSError:  # no hard links here
                    if not os.path.exists(self._lock):
                        os.rename(aside, self._lock)
        finally:
            try:
                os.unlink(aside)
            except FileNotFoundError:
                pass
        return False

    def _try_remote(self) -> bool:
        raw, file_time = _read_lease_file(self._fs, self._lock)
        if raw is not None:
            self._judge_found(raw, file_time)
        self._fs.pipe_file(self._lock, self._record())
        back, _ = _read_lease_file(self._fs, self._lock)
        record = _parse_lease(back)
        return record is not None and record.get("token") == self.token

    # ---- keeping --------------------------------------------------------------------------

    def _run(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            try:
                self.heartbeat()
            except Exception as err:  # noqa: BLE001 - a network hiccup must not end the run
                log.warning(
                    "%s: lease heartbeat failed (%s: %s); retrying", self.url, type(err).__name__, err
                )
            if self._lost is not None:
                return

    def heartbeat(self) -> None:
        """Refresh the heartbeat now (the background thread does this every ``heartbeat_s``).

        If the lease file now belongs to another run, the lease is marked lost (see
        :attr:`lost`, :meth:`check`) and left alone; if it vanished, it is recreated.
        """
        with self._mutex:
            if not self._held or self._lost is not None:
                return
            raw, _ = _read_lease_file(self._fs, self._lock)
            record = _parse_lease(raw)
            if raw is None:
                log.warning("%s: the lease file %s vanished; taking it again", self.url, self._lock)
                try:
                    again = self._try_local() if is_local(self._fs) else self._try_remote()
                except OutputLockedError:
                    again = False
                if not again:
                    self._lost = "its lease file vanished and another run took it"
            elif record is None or record.get("token") != self.token:
                self._lost = f"the lease now belongs to {_holder(record)}"
            elif is_local(self._fs):
                tmp = f"{self._lock}.{self.token[:12]}.tmp"
                with open(tmp, "wb") as f:
                    f.write(self._record())
                os.replace(tmp, self._lock)
            else:
                self._fs.pipe_file(self._lock, self._record())
            if self._lost is not None:
                log.error("%s: run %s lost its lease: %s", self.url, self.run_id[:12], self._lost)

    # ---- giving back ----------------------------------------------------------------------

    def release(self) -> None:
        """Stop the heartbeat and delete the lease file if it is still this lease's.

        Never raises for a failed deletion (it is logged): a leftover lease is stale once
        this process has ended, and is taken over then.
        """
        self._stop.set()
        thread, self._thread = self._thread, None
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout=max(5.0, 2 * self.heartbeat_s))
        with self._mutex:
            if not self._held:
                return
            self._held = False
            if self._lost is not None:
                return
            try:
                raw, _ = _read_lease_file(self._fs, self._lock)
                record = _parse_lease(raw)
                if record is not None and record.get("token") == self.token:
                    if is_local(self._fs):
                        os.unlink(self._lock)
                    else:
                        self._fs.rm_file(self._lock)
                    self._fs.invalidate_cache(self._lock)
            except FileNotFoundError:
                pass
            except Exception as err:  # noqa: BLE001 - never mask the run's own outcome
                log.warning(
                    "%s: could not remove the lease %s (%s: %s)",
                    self.url,
                    self._lock,
                    type(err).__name__,
                    err,
                )

    def __enter__(self) -> StoreLease:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()

    def __repr__(self) -> str:
        state = "lost" if self._lost else "held" if self._held else "not held"
        return f"StoreLease({self.url!r}, run {self.run_id[:12]}, {state})"
