"""Inference runtimes for the dense backbone pass: torch, or OpenVINO on CPUs.

The trunk (the backbone up to its deepest dense stage, batch norm folded) is the one
expensive step of scoring. On CPUs OpenVINO runs it about 3-4x faster than torch with
the same outputs (``jobs/bench_speed.py`` measures it). It is converted from the torch
module once per process and per model -- at a task's first use, then reused by every later
task (a cache keyed by a digest of the weights, so copies of one model share it) -- with dynamic spatial
dimensions, so chunks of any size (edges included) run without recompiling, in float32
(``INFERENCE_PRECISION_HINT``), with as many threads as torch has in that task thread.

``runtime="auto"`` (default) picks OpenVINO when it is installed and the device is the
CPU, torch otherwise. Only the dense trunk changes; resampling, pooling and the patch mode
stay in torch.
"""

from __future__ import annotations

import hashlib
import importlib.util
import threading
import warnings
import weakref
from collections import OrderedDict
from typing import Any

import torch

from .errors import ParameterError

__all__ = ["RUNTIMES", "dense_maps", "resolve_runtime"]

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


def _digest(backbone: Any) -> str:
    """sha256 of the backbone's structure and weights, memoised per object."""
    digest = _DIGESTS.get(backbone)
    if digest is None:
        h = hashlib.sha256(repr(backbone).encode())
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

        side = 8 * max(backbone.dense_strides)
        with torch.inference_mode(False), torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the tracer's deprecation and shape notes
            model = ov.convert_model(
                _Trunk(backbone), example_input=torch.zeros(1, 3, side, side),
                input=[([1, 3, -1, -1], ov.Type.f32)],
            )  # fmt: skip
        _COMPILED[key] = ov.Core().compile_model(model, "CPU", {
            "INFERENCE_NUM_THREADS": key[1], "INFERENCE_PRECISION_HINT": "f32",
            "PERFORMANCE_HINT": "LATENCY", "NUM_STREAMS": 1,
        })
        while len(_COMPILED) > MAX_COMPILED:
            _COMPILED.popitem(last=False)
        return _COMPILED[key]


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
