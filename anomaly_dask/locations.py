"""Output locations: URL normalisation and checks that a place exists and takes writes.

Shared by the output store (:mod:`anomaly_dask.store`) and its lease
(:mod:`anomaly_dask.lease`).
"""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Mapping
from typing import Any

import fsspec
from fsspec.implementations.local import LocalFileSystem

from .errors import OutputLocationError, OutputNotWritableError, ParameterError

__all__ = [
    "OBJECT_STORES", "beside", "check_json", "check_location", "check_writable", "is_local",
    "is_object_store", "is_uri", "join", "normalize_url", "options_key", "publish",
]

#: fsspec protocols whose uploads appear atomically under their final name.
OBJECT_STORES = frozenset({"s3", "s3a", "gs", "gcs", "az", "abfs", "abfss", "adl", "memory"})


def is_uri(url: str) -> bool:
    """True for an fsspec URL (``s3://...``, ``memory://...``, chained ``a::b``)."""
    return "://" in url or "::" in url


def normalize_url(url: str | os.PathLike[str]) -> str:
    """Strip trailing slashes; make plain local paths absolute (workers may run elsewhere)."""
    text = os.fspath(url)
    if not text:
        raise ParameterError("url must not be empty")
    if is_uri(text):
        return text.rstrip("/") if not text.endswith("://") else text
    return os.path.abspath(os.path.expanduser(text))


def options_key(storage_options: Mapping[str, Any] | None) -> tuple:
    return tuple(sorted((storage_options or {}).items()))


def join(url: str, *parts: str) -> str:
    return "/".join([url.rstrip("/"), *parts])


def check_json(value: Any, what: str) -> None:
    try:
        json.dumps(value, allow_nan=False)
    except (TypeError, ValueError) as err:
        raise ParameterError(f"{what} must be JSON-serialisable (no NaN/inf): {err}") from err


def is_local(fs: fsspec.AbstractFileSystem) -> bool:
    return isinstance(fs, LocalFileSystem)


def is_object_store(fs: fsspec.AbstractFileSystem) -> bool:
    """True for an object store, where an upload appears only once complete (:data:`OBJECT_STORES`)."""
    protocols = (fs.protocol,) if isinstance(fs.protocol, str) else tuple(fs.protocol)
    return bool(set(protocols) & OBJECT_STORES)


def check_location(fs: fsspec.AbstractFileSystem, path: str, url: str) -> None:
    """Raise unless the parent folder exists (local) / is a folder; remote: see _check_writable."""
    if not is_local(fs):
        return
    parent = os.path.dirname(path.rstrip("/")) or "/"
    if not os.path.isdir(parent):
        raise OutputLocationError(f"{url}: parent folder {parent} does not exist")


def check_writable(fs: fsspec.AbstractFileSystem, path: str, url: str) -> None:
    """Raise unless ``path`` can be written; remote stores get a tiny probe object (deleted)."""
    if is_local(fs):
        target = path if os.path.isdir(path) else os.path.dirname(path.rstrip("/")) or "/"
        if not os.access(target, os.W_OK | os.X_OK):
            raise OutputNotWritableError(f"{url}: folder {target} is not writable")
        return
    probe = join(path, f".write-probe-{uuid.uuid4().hex}")
    try:
        fs.pipe_file(probe, b"")
    except FileNotFoundError as err:
        raise OutputLocationError(f"{url}: the bucket or location does not exist ({err})") from err
    except PermissionError as err:
        raise OutputNotWritableError(f"{url}: not writable ({err})") from err
    except Exception as err:  # credentials, endpoint, network, ...: say where it failed
        raise OutputNotWritableError(f"{url}: cannot write there ({type(err).__name__}: {err})") from err
    try:
        fs.rm_file(probe)
    except FileNotFoundError:
        pass
    fs.invalidate_cache()


def beside(store_url: str, suffix: str) -> str:
    """URL of an export of the store at ``store_url``: beside it, named after it.

    ``out/a.zarr`` with suffix ``"_mask.tif"`` gives ``out/a_mask.tif`` (a store name
    without ``.zarr`` keeps its whole name).
    """
    base = store_url.rstrip("/")
    if base.lower().endswith(".zarr"):
        base = base[: -len(".zarr")]
    return base + suffix


def publish(fs: fsspec.AbstractFileSystem, tmp: str, path: str) -> None:
    """Move the finished local file ``tmp`` to ``path`` on ``fs``, so that it appears under
    its name only when complete: a rename on local disks, one upload on object stores
    (their keys appear when the upload ends), else an upload to ``<path>.partial`` and a move."""
    if is_local(fs):
        os.replace(tmp, path)
    elif is_object_store(fs):
        fs.put_file(tmp, path)
    else:
        fs.put_file(tmp, path + ".partial")
        fs.mv(path + ".partial", path)
