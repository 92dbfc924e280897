"""Tile features from a backbone: dense pooling over feature maps, or one pass per tile.

These functions take pixels already read and normalised to ``[0, 1]`` and return features on
the seed's tile grid; they know nothing of files or Dask.
"""

from __future__ import annotations

from dataclasses import dataclass
from math import gcd

import numpy as np
import torch
import torch.nn.functional as F

from .backbones import Backbone
from .errors import ParameterError
from .grid import TileGrid
from .runtimes import dense_maps

__all__ = ["FeatureConfig", "check_device", "dense_tile_features", "patch_tile_features", "tile_features"]

IMAGENET_MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
IMAGENET_STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)


@dataclass(frozen=True)
class FeatureConfig:
    """How tile features are computed.

    Attributes
    ----------
    mode : {"dense", "patch"}
        ``"dense"``: one backbone pass per window, tile features average-pooled from the
        dense stages' maps (coarser maps bilinearly resampled to the finest). ``"patch"``:
        each tile resized to ``patch_size`` and pushed through the whole network (the
        paper's feature, globally average-pooled).
    upsample : int
        Dense mode: the window is magnified by this factor before the backbone, so a tile
        spans more feature-map cells.
    patch_size : int
        Patch mode: network input size of each tile.
    batch_size : int
        Patch mode: tiles per forward pass.
    context : int
        Dense mode: backbone context in network pixels added around the tiles of a window.
    runtime : {"torch", "openvino"}
        Dense mode: what runs the trunk (:mod:`anomaly_dask.runtimes`).
    """

    mode: str = "dense"
    upsample: int = 1
    patch_size: int = 320
    batch_size: int = 1024
    context: int = 64
    runtime: str = "torch"

    def lattice(self, backbone: Backbone) -> int:
        """Window origins are multiples of this many image pixels (dense mode)."""
        if self.mode != "dense":
            return 1
        return max(1, max(backbone.dense_strides) // self.upsample)

    def halo(self, backbone: Backbone) -> int:
        """Context in image pixels read around a window's tiles."""
        if self.mode != "dense":
            return 0
        return -(-self.context // self.upsample)


def _normalise(pixels: np.ndarray) -> torch.Tensor:
    x = torch.from_numpy(np.ascontiguousarray(pixels, dtype=np.float32)).permute(2, 0, 1)[None]
    return (x - IMAGENET_MEAN) / IMAGENET_STD


def _device(backbone: Backbone) -> torch.device:
    return next(backbone.parameters()).device


def _magnify_axis(v: np.ndarray, factor: int, axis: int) -> np.ndarray:
    """:func:`magnify` along one axis."""
    n = v.shape[axis]
    pad = [(0, 0)] * v.ndim
    pad[axis] = (1, 1)
    p = np.pad(v, pad, mode="edge")

    def part(start: int, stop: int | None, step: int | None = None) -> tuple[slice, ...]:
        s = [slice(None)] * v.ndim
        s[axis] = slice(start, stop, step)
        return tuple(s)

    shape = list(v.shape)
    shape[axis] = n * factor
    out = np.empty(shape, dtype=np.float32)
    other = np.empty(v.shape, dtype=np.float32)
    for k in range(factor):
        # output k of each input pixel i samples i + f: between i and i + 1 for f >= 0,
        # between i - 1 and i otherwise (the padded edge pixel repeats at the borders)
        f = (k + 0.5) / factor - 0.5
        o = out[part(k, None, factor)]
        if f >= 0:
            np.multiply(p[part(1, n + 1)], np.float32(1 - f), out=o)
            np.multiply(p[part(2, n + 2)], np.float32(f), out=other)
        else:
            np.multiply(p[part(0, n)], np.float32(-f), out=o)
            np.multiply(p[part(1, n + 1)], np.float32(1 + f), out=other)
        np.add(o, other, out=o)
    return out


def magnify(v: np.ndarray, factor: int) -> np.ndarray:
    """Bilinear magnification of ``v`` (C, H, W) by an integer ``factor``, float32.

    The sampling is torch's ``interpolate(mode="bilinear", align_corners=False)`` (equal
    to within float32 rounding), done as a fixed sequence of elementwise operations, so
    that the result does not depend on the number of threads. torch's CPU kernel rounds
    differently with 1 thread than with 2, which the trunk amplifies to about 1e-5 of the
    scores: a model would then score differently on cluster layouts of other thread
    counts. It is also about 2x faster than torch's kernel with one thread.
    """
    return _magnify_axis(_magnify_axis(np.asarray(v, dtype=np.float32), factor, 1), factor, 2)


def dense_tile_features(
    backbone: Backbone,
    pixels: np.ndarray,
    tile_offset: tuple[int, int],
    n_tiles: tuple[int, int],
    grid: TileGrid,
    upsample: int = 1,
    runtime: str = "torch",
) -> np.ndarray:
    """Pool tile features from one backbone pass over a window.

    Parameters
    ----------
    backbone : Backbone
        Network in eval mode.
    pixels : ndarray, shape (h, w, 3)
        Window in ``[0, 1]``; ``h * upsample`` and ``w * upsample`` must be multiples of
        the deepest dense stage's stride.
    tile_offset : (int, int)
        Position in the window (image pixels) of the first tile's top-left corner.
    n_tiles : (int, int)
        Tile rows and columns to return, spaced by the grid's stride.
    grid : TileGrid
        Tile size and stride.
    upsample : int
        Magnification applied before the backbone.
    runtime : {"torch", "openvino"}
        What runs the trunk.

    Returns
    -------
    ndarray of float32, shape (rows, cols, D)
    """
    x = _normalise(pixels)
    device = _device(backbone)
    if upsample != 1 and device.type == "cpu":
        x = torch.from_numpy(magnify(x[0].numpy(), upsample))[None]
    x = x.to(device)
    if upsample != 1 and device.type != "cpu":
        x = F.interpolate(x, scale_factor=upsample, mode="bilinear", align_corners=False)
    maps = dense_maps(backbone, x, runtime)
    finest = min(backbone.dense_strides)
    sizes = [
        v * upsample
        for v in (grid.tile_h, grid.tile_w, grid.stride_h, grid.stride_w, *tile_offset)
    ]
    cell = gcd(finest, *sizes)
    h_cells, w_cells = x.shape[2] // cell, x.shape[3] // cell
    kh, kw = grid.tile_h * upsample // cell, grid.tile_w * upsample // cell
    sh, sw = grid.stride_h * upsample // cell, grid.stride_w * upsample // cell
    oy, ox = tile_offset[0] * upsample // cell, tile_offset[1] * upsample // cell
    rows, cols = n_tiles
    crop = (slice(None), slice(None), slice(oy, oy + (rows - 1) * sh + kh), slice(ox, ox + (cols - 1) * sw + kw))

    def pool(m: torch.Tensor) -> torch.Tensor:
        # each stage on its own, channels-last: CPU pooling and resampling are 2-3x faster
        # so than on the concatenated channels-first maps (same values to float rounding)
        m = m.contiguous(memory_format=torch.channels_last)
        if m.shape[2:] != (h_cells, w_cells):
            m = F.interpolate(m, size=(h_cells, w_cells), mode="bilinear", align_corners=False)
        return F.avg_pool2d(m[crop], kernel_size=(kh, kw), stride=(sh, sw))

    pooled = torch.cat([pool(m) for m in maps], dim=1)
    return pooled[0].permute(1, 2, 0).contiguous().cpu().numpy()


def patch_tile_features(
    backbone: Backbone,
    pixels: np.ndarray,
    tile_offset: tuple[int, int],
    n_tiles: tuple[int, int],
    grid: TileGrid,
    patch_size: int = 320,
    batch_size: int = 1024,
) -> np.ndarray:
    """One full backbone pass per tile (bicubic resize to ``patch_size``), as in the paper.

    Parameters are those of :func:`dense_tile_features`, plus the network input size and the
    number of tiles per forward pass.

    Returns
    -------
    ndarray of float32, shape (rows, cols, D)
    """
    rows, cols = n_tiles
    x = torch.from_numpy(np.ascontiguousarray(pixels, dtype=np.float32)).permute(2, 0, 1)
    oy, ox = tile_offset
    corners = [
        (oy + r * grid.stride_h, ox + c * grid.stride_w) for r in range(rows) for c in range(cols)
    ]
    out = []
    for k in range(0, len(corners), batch_size):
        batch = torch.stack(
            [x[:, y : y + grid.tile_h, z : z + grid.tile_w] for y, z in corners[k : k + batch_size]]
        )
        batch = F.interpolate(batch, size=(patch_size, patch_size), mode="bicubic", align_corners=False)
        batch = (batch.clamp(0, 1) - IMAGENET_MEAN) / IMAGENET_STD
        out.append(backbone.forward_pooled(batch.to(_device(backbone))).cpu())
    return torch.cat(out).reshape(rows, cols, -1).numpy()


def tile_features(
    backbone: Backbone,
    config: FeatureConfig,
    pixels: np.ndarray,
    tile_offset: tuple[int, int],
    n_tiles: tuple[int, int],
    grid: TileGrid,
) -> np.ndarray:
    """Dispatch to :func:`dense_tile_features` or :func:`patch_tile_features`."""
    with torch.inference_mode():
        if config.mode == "dense":
            return dense_tile_features(
                backbone, pixels, tile_offset, n_tiles, grid, config.upsample, config.runtime
            )
        return patch_tile_features(
            backbone, pixels, tile_offset, n_tiles, grid, config.patch_size, config.batch_size
        )


def check_device(device: str | None) -> None:
    """Refuse a device torch cannot use here, before any cluster, store or training starts.

    Raises
    ------
    ParameterError
        ``cuda`` / ``cuda:<n>`` without that GPU, or ``mps`` without Apple's backend.
    """
    if device in (None, "auto", "cpu"):
        return
    if device.startswith("cuda"):
        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
        index = int(device.split(":")[1]) if ":" in device else 0
        if index >= n:
            raise ParameterError(
                f"device={device!r}, but torch sees {n} CUDA GPU(s) here; use device='cpu' or 'auto'"
            )
    elif device == "mps" and not torch.backends.mps.is_available():
        raise ParameterError("device='mps', but Apple's MPS backend is not available here; use 'cpu' or 'auto'")
