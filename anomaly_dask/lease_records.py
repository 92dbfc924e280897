"""Lease records: the JSON file a run keeps beside its store, and who holds it.

Reading, parsing and judging lease files (is the holder's process alive on this host, is
its heartbeat fresh), and the refusal of a live one. :class:`anomaly_dask.lease.StoreLease`
creates, refreshes and removes them.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import socket
import time
from collections.abc import Mapping
from typing import Any

import fsspec

from .errors import OutputLockedError
from .locations import normalize_url

__all__ = ["LEASE_HEARTBEAT_S", "LEASE_TTL_S", "lease_url", "read_lease", "refuse_live_lease"]


#: Seconds between two heartbeats of a held lease.
LEASE_HEARTBEAT_S = 10.0
#: A lease whose heartbeat is older than this many seconds is stale (unless its holder is a
#: process of this host that still runs: that is checked directly).
LEASE_TTL_S = 60.0
_LEASE_FORMAT = "anomaly_dask_lease"
_LEASE_SUFFIX = ".lock"
_LEASE_ATTEMPTS = 5
_HOST = socket.gethostname()


def _process_scope() -> str | None:
    """Kernel boot id and pid namespace (Linux): where a pid means the same process.

    Containers sharing a host name (host networking) have pid namespaces of their own, and
    two machines may share a host name; a pid is only checked when this scope matches.
    """
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            boot = f.read().strip()
        return f"{boot}/{os.readlink('/proc/self/ns/pid')}"
    except OSError:
        return None


_SCOPE = _process_scope()


def _lease_path(fs: fsspec.AbstractFileSystem, path: str) -> str | None:
    """Filesystem path of the lease of the store at ``path``; None at a bucket's root."""
    stripped = path.rstrip("/")
    if fs.root_marker == "" and "/" not in stripped.strip("/"):
        return None  # s3://bucket itself: a sibling "bucket.lock" would be another bucket
    return stripped + _LEASE_SUFFIX


def lease_url(url: str | os.PathLike[str]) -> str:
    """URL of the lease file of the output store at ``url``: ``<url>.lock``, beside it.

    Parameters
    ----------
    url : str or os.PathLike
        Root of the store.

    Returns
    -------
    str
    """
    return normalize_url(url) + _LEASE_SUFFIX


def _iso(t: float | None) -> str | None:
    if t is None:
        return None
    return _dt.datetime.fromtimestamp(t, _dt.timezone.utc).isoformat(timespec="seconds")


def _proc_stat(pid: int) -> tuple[str, int] | None:
    """State letter and start time (clock ticks since boot) of ``pid`` from /proc (Linux)."""
    try:
        with open(f"/proc/{int(pid)}/stat", "rb") as f:
            fields = f.read().decode("ascii", "replace").rsplit(")", 1)[1].split()
        return fields[0], int(fields[19])
    except (OSError, ValueError, IndexError):
        return None


def _pid_alive(pid: int) -> bool | None:
    """Whether process ``pid`` of this host runs; None where that cannot be asked safely."""
    if os.name == "nt":  # os.kill would terminate the process there
        return None
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # runs, as another user
        return True
    except (OverflowError, OSError):
        return False
    stat = _proc_stat(pid)
    return not (stat is not None and stat[0] in "ZX")  # a zombie is dead, only not reaped


def _epoch(value: Any) -> float | None:
    if isinstance(value, _dt.datetime):
        return (value if value.tzinfo else value.replace(tzinfo=_dt.timezone.utc)).timestamp()
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    return None


def _read_lease_file(fs: fsspec.AbstractFileSystem, lock: str) -> tuple[bytes | None, float | None]:
    """Bytes of the lease file and its modification time (None, None when there is none)."""
    fs.invalidate_cache(lock)
    try:
        raw = fs.cat_file(lock)
    except FileNotFoundError:
        return None, None
    try:
        info = fs.info(lock)
    except FileNotFoundError:
        return raw, None
    lowered = {str(k).lower(): v for k, v in info.items()}
    for key in ("mtime", "lastmodified", "last_modified", "updated", "created"):
        t = _epoch(lowered.get(key))
        if t is not None:
            return raw, t
    return raw, None


def _parse_lease(raw: bytes | None) -> dict[str, Any] | None:
    """The record of a lease file, or None when it is empty, partial or not ours."""
    if not raw:
        return None
    try:
        record = json.loads(raw.decode())
    except (UnicodeDecodeError, ValueError):
        return None
    if not isinstance(record, dict) or record.get("format") != _LEASE_FORMAT:
        return None
    return record


def _judge_lease(
    record: dict[str, Any] | None, file_time: float | None, ttl: float, now: float | None = None
) -> tuple[bool, str]:
    """Whether a lease is live, and why (in words)."""
    now = time.time() if now is None else now
    if record is None:  # being written right now, or left half-written by a killed run
        if file_time is not None and now - file_time < ttl:
            return True, "its lease file is being written"
        return False, "its lease file is unreadable and not recent"
    host, pid = record.get("host"), record.get("pid")
    same_scope = host == _HOST and record.get("scope") == _SCOPE
    if same_scope and isinstance(pid, int) and not isinstance(pid, bool):
        alive = _pid_alive(pid)
        if alive is False:
            return False, f"process {pid} on this host ({host}) is gone"
        if alive:
            start, stat = record.get("pid_start"), _proc_stat(pid)
            if start is not None and stat is not None and stat[1] != start:
                return False, f"process {pid} on this host is not the one that took the lease (pid reused)"
            return True, f"process {pid} on this host ({host}) is running"
    beat = _epoch(record.get("heartbeat"))
    if beat is None:
        return False, "its lease records no heartbeat"
    age = now - beat
    if age < ttl:
        return True, f"its last heartbeat was {max(age, 0.0):.0f} s ago"
    return False, f"its last heartbeat was {age:.0f} s ago (more than {ttl:.0f} s)"


def _holder(record: dict[str, Any] | None) -> str:
    if record is None:
        return "an unknown run"
    run = str(record.get("run_id", "?"))
    return (
        f"run {run[:12]} (pid {record.get('pid')} on host {record.get('host')}, "
        f"started {record.get('started_utc')}, last heartbeat {record.get('heartbeat_utc')})"
    )


def _locked_message(url: str, record: dict[str, Any] | None, why: str) -> str:
    return (
        f"{url} is being written by {_holder(record)}: {why}. overwrite=True does not delete "
        f"a store in use either. Wait for that run to finish "
        f"(or stop it), or write to another url. A lease whose holder died is taken over "
        f"automatically once its process is gone (same host) or its heartbeat is older than "
        f"{LEASE_TTL_S:.0f} s; to force it, delete {url}{_LEASE_SUFFIX}."
    )


def read_lease(
    url: str | os.PathLike[str], storage_options: Mapping[str, Any] | None = None
) -> dict[str, Any] | None:
    """The lease of the output store at ``url``, if any, with a verdict on it.

    Parameters
    ----------
    url : str or os.PathLike
        Root of the store.
    storage_options : dict, optional
        fsspec options.

    Returns
    -------
    dict or None
        None when there is no lease file; else the record written by its holder
        (``run_id``, ``host``, ``pid``, ``started``, ``heartbeat``, ...; empty when
        unreadable) plus ``live`` (bool) and ``reason`` (str).
    """
    url = normalize_url(url)
    fs, path = fsspec.core.url_to_fs(url, **(storage_options or {}))
    lock = _lease_path(fs, path)
    if lock is None:
        return None
    raw, file_time = _read_lease_file(fs, lock)
    if raw is None:
        return None
    record = _parse_lease(raw)
    live, why = _judge_lease(record, file_time, LEASE_TTL_S)
    return {**(record or {}), "live": live, "reason": why}


def refuse_live_lease(fs: fsspec.AbstractFileSystem, path: str, url: str, own_token: str | None) -> None:
    """Raise OutputLockedError when a live lease of another run guards ``path``."""
    lock = _lease_path(fs, path)
    if lock is None:
        return
    raw, file_time = _read_lease_file(fs, lock)
    if raw is None:
        return
    record = _parse_lease(raw)
    if record is not None and own_token is not None and record.get("token") == own_token:
        return
    live, why = _judge_lease(record, file_time, LEASE_TTL_S)
    if live:
        raise OutputLockedError(_locked_message(url, record, why))
