"""Helpers of :mod:`anomaly_dask.cli`: the inputs of ``detect`` and error messages in CLI terms.

Nothing here is imported to build the parser: fsspec and the readers load when a command runs.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

from .config import PARAMS

__all__ = ["CliError", "cli_terms", "find_inputs", "json_default", "stores_for"]


class CliError(Exception):
    """A user error reported as one line with exit code 1."""


# ---------------------------------------------------------------------------- inputs

#: Characters that make an input a shell-style pattern (``?`` is not one for http(s) URLs,
#: where it starts a query, and such URLs are never listed).
_PATTERN = re.compile(r"[*?\[]")
_UNLISTABLE = ("http", "https")


def _protocols(fs: Any) -> tuple[str, ...]:
    return fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)


def _pattern_base(path: str) -> str:
    """The folder of a pattern before its first component holding a wildcard."""
    parts = path.split("/")
    for k, part in enumerate(parts):
        if _PATTERN.search(part):
            return "/".join(parts[:k])
    return path.rsplit("/", 1)[0]


def _expand_pattern(item: str, fs: Any, path: str, options: dict[str, Any] | None) -> list[tuple[str, str]]:
    """(image, stem) of each image a pattern matches; stems are relative to its fixed folder."""
    from .io import IMAGE_EXTENSIONS, is_zarr_folder, list_images, relative_stem

    def url(p: str) -> str:
        return fs.unstrip_protocol(p) if "://" in item else p

    matches = sorted(fs.glob(path))
    if not matches:
        raise CliError(f"input {item!r} matches no file or folder")
    base = url(_pattern_base(path))
    found = []
    for m in matches:
        if fs.isdir(m) and not is_zarr_folder(fs, m):
            images = list_images(url(m), options)
        elif fs.isdir(m) or m.lower().endswith(IMAGE_EXTENSIONS):
            images = [url(m)]
        else:
            warnings.warn(f"skipping {url(m)!r} (matched by {item!r}): not an image file", stacklevel=3)
            continue
        found += [(image, relative_stem(base, image, options)) for image in images]
    if not found:
        raise CliError(f"input {item!r} matches no image ({len(matches)} other files)")
    return found


def find_inputs(
    inputs: Sequence[str], storage_options: dict[str, Any] | None = None
) -> list[tuple[str, str]]:
    """The images of ``detect``'s inputs, each with the stem of its output store.

    Parameters
    ----------
    inputs : sequence of str
        Paths or fsspec URLs, in any mix, of image files, zarr stores (a folder named
        ``*.zarr`` or holding zarr metadata: one image), folders (searched recursively,
        as ``train`` does) and shell-style patterns (``data/*.tif``, ``s3://b/**/*.tif``,
        listed with the filesystem's ``glob``).
    storage_options : dict, optional
        fsspec options.

    Returns
    -------
    list of (str, str)
        ``(image, stem)`` in the order given (each folder's and pattern's images sorted).
        The stem keeps the image's sub-folders below the folder given (``a/x`` for
        ``folder/a/x.tif``) or below a pattern's fixed folder, as ``test()`` names outputs.

    Raises
    ------
    CliError
        An input matches nothing (naming it).
    InputNotFoundError
        An input does not exist, or a folder holds no image.
    """
    import fsspec

    from .io import list_images, relative_stem

    found: list[tuple[str, str]] = []
    for item in inputs:
        fs, path = fsspec.core.url_to_fs(str(item), **(storage_options or {}))
        if _PATTERN.search(path) and not set(_protocols(fs)) & set(_UNLISTABLE) and not fs.exists(path):
            found += _expand_pattern(str(item), fs, path, storage_options)
        else:
            found += [(image, relative_stem(item, image, storage_options))
                      for image in list_images(str(item), storage_options)]
    return found


def stores_for(found: Sequence[tuple[str, str]], output: str) -> list[str]:
    """The store of each ``(image, stem)``: ``output`` itself for a single image when it
    ends in ``.zarr``, otherwise ``<output>/<stem>.zarr``.

    Raises
    ------
    CliError
        Two images would share a store (before anything is written).
    """
    base = output.rstrip("/")
    if len(found) == 1 and base.endswith(".zarr"):
        return [base]
    seen: dict[str, str] = {}
    for image, stem in found:
        if stem in seen:
            where = "the same input twice" if seen[stem] == image else "two inputs"
            raise CliError(
                f"{where} share the name {stem!r}: {seen[stem]!r} and {image!r} would both be written "
                f"to {base}/{stem}.zarr; rename one, or detect them into separate --output folders"
            )
        seen[stem] = image
    return [f"{base}/{stem}.zarr" for _, stem in found]


# ---------------------------------------------------------------------------- messages

#: Whole phrases of library messages that have a better CLI wording than word by word.
_PHRASES = {
    "overwrite=True (--overwrite)": "--overwrite",
    "save with signing_key= / train --signing-key": "train --signing-key",
}

#: Keyword arguments of the Python API that are not detector parameters, and their options.
_EXTRA_FLAGS = {
    "overwrite": "--overwrite",
    "storage_options": "--storage-option",
    "trusted_keys": "--trusted-key",
    "signing_key": "--signing-key",
    "val": "--val",
    "geotiff": "--geotiff",
    "png_tiles": "--png-tiles",
    "workers": "--workers",
    "threads_per_worker": "--threads-per-worker",
}


def _flags() -> dict[str, tuple[str, bool]]:
    """Keyword name -> (option, whether it is an on/off ``--x`` / ``--no-x`` option)."""
    out = {p.name: (p.flag, p.kind == "flag") for p in PARAMS if p.commands}
    out.update({name: (flag, False) for name, flag in _EXTRA_FLAGS.items()})
    return out


_FLAGS = _flags()

#: ``name=value`` where name is a keyword with an option; not ``a.name=`` (model file
#: fields) nor ``f(name=`` (formulas). The value is a word, a quoted string or ``<...>``.
_KEYWORD = re.compile(
    r"(?<![\w.(-])(" + "|".join(sorted(map(re.escape, _FLAGS), key=len, reverse=True)) + r")="
    r"('[^']*'|\"[^\"]*\"|<[^>]*>|[^\s,;)]+)?"
)


def _option(match: re.Match[str]) -> str:
    flag, on_off = _FLAGS[match.group(1)]
    value = match.group(2)
    if value is None:
        return flag
    if value == "True":
        return flag
    if value == "False" and on_off:
        return "--no-" + flag[2:]
    if value[0] in "'\"":
        value = value[1:-1]
    return f"{flag} {value.lower() if value == 'None' else value}"


def cli_terms(message: str) -> str:
    """``message`` of a library error with the Python API's keywords as command-line options.

    ``overwrite=True`` reads ``--overwrite``, ``false_alarm_rate=2.0`` reads
    ``--false-alarm-rate 2.0``, ``storage_options=`` reads ``--storage-option``,
    ``weights=None`` reads ``--weights none``; other text is unchanged.

    Parameters
    ----------
    message : str
        One line.

    Returns
    -------
    str
    """
    for api, cli in _PHRASES.items():
        message = message.replace(api, cli)
    message = _KEYWORD.sub(_option, message)
    return re.sub(r"(--[\w-]+) \(\1\)", r"\1", message)  # "--x (--x)" said twice


def json_default(value: Any) -> Any:
    """``json.dumps`` fallback: numpy scalars as Python numbers, anything else as text."""
    if hasattr(value, "item") and callable(value.item):
        return value.item()
    if isinstance(value, Mapping):
        return dict(value)
    return str(value)
