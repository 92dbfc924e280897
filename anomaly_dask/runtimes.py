"""Inference runtimes for the dense backbone pass: torch, or OpenVINO on CPUs.

The trunk (the backbone up to its deepest dense stage, batch norm folded) is the one
expensive step of scoring. On CPUs OpenVINO runs it about 3-4x faster than torch with
the same outputs (``jobs/bench_speed.py`` measures it). It is converted from the torch
module once per process and per model -- at a task's first use, then reused by every later
task (a cache keyed by a digest of the weights, so copies of one model share it) -- with dynamic spatial
dimensions, so chunks of any size (edges included) run without recompiling, in float32
(``INFERENCE_PRECISION_HINT``), with as many threads as torch has in that task thread.

Converting traces the torch module, about 3 s on 2 cores, so the converted network (OpenVINO's
IR: an XML graph and a binary of weights, data only) is also kept on disk, under
:func:`cache_dir`, named by the same digest and the OpenVINO version: a later process reads it
in milliseconds. A network read from disk is used only after it gives the torch module's
outputs on a small input (otherwise it is converted again and the file replaced), so a stale,
truncated or altered file cannot change a result. ``ANOMALY_DASK_CACHE=off`` turns the disk
cache off; ``ANOMALY_DASK_CACHE=<dir>`` moves it.

``runtime="auto"`` (default) picks OpenVINO when it is installed and the device is the
CPU, torch otherwise. Only the dense trunk changes; resampling, pooling and the patch mode
stay in torch.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import tempfile
import threading
import warnings
import weakref
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .errors import ParameterError

__all__ = ["RUNTIMES", "cache_dir", "dense_maps", "resolve_runtime"]

log = logging.getLogger("anomaly_dask")

#: Values of the ``runtime`` parameter.
RUNTIMES = ("auto", "torch", "openvino")

#: Compiled models kept per process (the least recently used beyond this are dropped).
MAX_COMPILED = 4

_LOCK = threading.Lock()
#: (weights digest, torch threads) -> compiled model, most recently used last
_COMPILED: OrderedDict[tuple[str, int], Any] = OrderedDict()
#: backbone object -> digest of its weights (so a copy of the same model is not converted again)
_DIGESTS: weakref.WeakKeyDictionary[Any, str] = weakref.WeakKeyDictionary()
_REQUESTS = threading.local()

#: Version of what a cached converted trunk holds (bump when :class:`_Trunk` changes).
TRUNK_FORMAT = 1
#: Side of the input a network read from the disk cache is checked on, in units of its
#: deepest stride.
CHECK_SIDE = 3


def openvino_installed() -> bool:
    """Whether the ``openvino`` package can be imported here."""
    return importlib.util.find_spec("openvino") is not None


def resolve_runtime(runtime: str, device: str) -> str:
    """The runtime a run uses: ``"torch"`` or ``"openvino"``.

    Parameters
    ----------
    runtime : {"auto", "torch", "openvino"}
    device : str
        The torch device the backbone runs on (``"cpu"``, ``"cuda:0"``, ...).

    Raises
    ------
    ParameterError
        An unknown runtime; ``"openvino"`` when it is not installed or the device is not
        the CPU.
    """
    if runtime not in RUNTIMES:
        raise ParameterError(f"runtime={runtime!r}: choose one of {', '.join(RUNTIMES)}")
    cpu = str(device).split(":")[0] == "cpu"
    if runtime == "auto":
        return "openvino" if cpu and openvino_installed() else "torch"
    if runtime == "openvino":
        if not openvino_installed():
            raise ParameterError("runtime='openvino', but openvino is not installed: pip install openvino")
        if not cpu:
            raise ParameterError(f"runtime='openvino' runs on the CPU, not device={device!r}; use runtime='torch'")
    return runtime


class _Trunk(torch.nn.Module):
    """``forward_dense`` as a module returning a tuple, for conversion."""

    def __init__(self, backbone: Any) -> None:
        super().__init__()
        self.backbone = backbone

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:  # noqa: D102
        return tuple(self.backbone.forward_dense(x))


def cache_dir() -> Path | None:
    """Where converted trunks are kept: ``$ANOMALY_DASK_CACHE``, else
    ``$XDG_CACHE_HOME/anomaly_dask`` or ``~/.cache/anomaly_dask``; None when
    ``ANOMALY_DASK_CACHE`` is ``off`` (or empty)."""
    chosen = os.environ.get("ANOMALY_DASK_CACHE")
    if chosen is not None:
        return None if chosen.strip().lower() in ("", "off", "0", "no", "false") else Path(chosen)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "anomaly_dask"


def _digest(backbone: Any) -> str:
    """sha256 of the backbone's structure, dense stages and weights, memoised per object."""
    digest = _DIGESTS.get(backbone)
    if digest is None:
        h = hashlib.sha256(repr(backbone).encode())
        h.update(repr(tuple(backbone.dense_stages)).encode())  # which stages the trunk returns
        for name, tensor in backbone.state_dict().items():
            h.update(name.encode())
            h.update(tensor.detach().cpu().contiguous().numpy().tobytes())
        digest = _DIGESTS[backbone] = h.hexdigest()
    return digest


def _compiled(backbone: Any) -> Any:
    key = (_digest(backbone), torch.get_num_threads())
    with _LOCK:
        if key in _COMPILED:
            _COMPILED.move_to_end(key)
            return _COMPILED[key]
        import openvino as ov

        core = ov.Core()
        config = {
            "INFERENCE_NUM_THREADS": key[1], "INFERENCE_PRECISION_HINT": "f32",
            "PERFORMANCE_HINT": "LATENCY", "NUM_STREAMS": 1,
        }
        path = _cache_path(key[0])
        compiled = None
        if path is not None and path.is_file():
            try:
                compiled = core.compile_model(core.read_model(str(path)), "CPU", config)
            except Exception as err:  # noqa: BLE001 - any unreadable file is converted again
                log.info("converted trunk %s unreadable (%s): converting again", path, err)
            if compiled is not None and not _same_outputs(backbone, compiled):
                log.info("converted trunk %s does not give this model's outputs: converting again", path)
                compiled = None
        if compiled is None:
            model = _convert(backbone)
            compiled = core.compile_model(model, "CPU", config)
            if path is not None:
                _save(model, path)
        _COMPILED[key] = compiled
        while len(_COMPILED) > MAX_COMPILED:
            _COMPILED.popitem(last=False)
        return _COMPILED[key]


def _convert(backbone: Any) -> Any:
    """The backbone's trunk as an OpenVINO model with dynamic height and width."""
    import openvino as ov

    side = 8 * max(backbone.dense_strides)
    with torch.inference_mode(False), torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the tracer's deprecation and shape notes
        return ov.convert_model(
            _Trunk(backbone), example_input=torch.zeros(1, 3, side, side), input=[([1, 3, -1, -1], ov.Type.f32)]
        )


def _cache_path(digest: str) -> Path | None:
    import openvino as ov

    where = cache_dir()
    if where is None:
        return None
    version = "".join(c if c.isalnum() or c in ".-" else "_" for c in ov.__version__)
    return where / "openvino" / f"trunk-{digest[:32]}-ov{version}-f{TRUNK_FORMAT}.xml"


def _save(model: Any, path: Path) -> None:
    """Write ``model`` as ``path`` (and its ``.bin``) atomically: into temporary names in the
    same folder, then renamed, weights first, so a reader never sees a half-written pair.
    A folder that cannot be written is logged and skipped."""
    import openvino as ov

    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=path.parent, prefix=".tmp-") as tmp:
            tmp_xml = Path(tmp) / path.name
            ov.save_model(model, str(tmp_xml), compress_to_fp16=False)
            os.replace(tmp_xml.with_suffix(".bin"), path.with_suffix(".bin"))
            os.replace(tmp_xml, path)
    except Exception as err:  # noqa: BLE001 - a cache that cannot be written only costs time
        log.info("converted trunk not cached in %s: %s", path.parent, err)


def _same_outputs(backbone: Any, compiled: Any) -> bool:
    """Whether ``compiled`` gives the torch backbone's dense maps on a small random input."""
    side = CHECK_SIDE * max(backbone.dense_strides)
    x = torch.rand(1, 3, side, side + 8, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        ref = backbone.forward_dense(x)
    try:
        result = compiled.create_infer_request().infer({0: x.numpy()})
        got = [result[out] for out in compiled.outputs]
    except Exception:  # noqa: BLE001 - a network that cannot run this input is not this model's
        return False
    if len(got) != len(ref):
        return False
    for a, b in zip(got, ref):
        b = b.numpy()
        if a.shape != b.shape or not np.allclose(a, b, rtol=1e-4, atol=1e-4 * max(1.0, float(np.abs(b).max()))):
            return False
    return True


def dense_maps(backbone: Any, x: torch.Tensor, runtime: str) -> list[torch.Tensor]:
    """The dense stages' feature maps of a normalised batch ``x`` (N, 3, H, W).

    ``runtime`` is a resolved one (:func:`resolve_runtime`): ``"torch"`` runs the module
    channels-last, ``"openvino"`` its compiled copy (one inference request per thread).
    """
    if runtime == "torch":
        # channels-last runs the depthwise and 1x1 convolutions about twice as fast on CPU
        return backbone.forward_dense(x.contiguous(memory_format=torch.channels_last))
    compiled = _compiled(backbone)
    requests = getattr(_REQUESTS, "by_model", None)
    if requests is None:
        requests = _REQUESTS.by_model = weakref.WeakKeyDictionary()
    request = requests.get(compiled)
    if request is None:
        request = requests[compiled] = compiled.create_infer_request()
    result = request.infer({0: x.detach().cpu().numpy()})
    return [torch.from_numpy(result[out].copy()) for out in compiled.outputs]
