"""Connected regions of ground truth and masks, joined across the blocks of a mosaic.

Each block is labelled on its own (8-connected); the labels of its edge rows and columns
are kept and, once an image is complete, joined across block borders (a union-find over the
``(block, label)`` pieces, solved as connected components of a sparse graph). The joining
is :class:`BorderJoin`; used by :class:`~anomaly_dask.evaluation.MetricsAccumulator` (through
:class:`Labels`) and by :mod:`anomaly_dask.contacts`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage, sparse
from scipy.sparse.csgraph import connected_components

__all__ = ["EIGHT", "BorderJoin", "ImageState", "Labels", "RegionTotals", "near_anomalies", "near_mask"]

#: 8-connectivity for :func:`scipy.ndimage.label`.
EIGHT = np.ones((3, 3), dtype=bool)

#: Neighbour offsets that, with their mirror images, cover the 8-neighbourhood.
_HALF_NEIGHBOURS = ((0, 1), (1, -1), (1, 0), (1, 1))


# ----------------------------------------------------------------------------------------
# Accumulator
# ----------------------------------------------------------------------------------------


@dataclass
class BorderJoin:
    """Pieces of connected regions labelled block by block, and how they join across borders.

    Each block's labels ``1..n`` become *nodes* ``n_nodes .. n_nodes + n - 1``; only the
    labelled pixels on the block's outer rows and columns are kept, so the memory is that
    of the anomalous border pixels, never of the whole image.
    """

    n_nodes: int = 0
    #: Labelled edge pixels of the blocks: image row, image column, node.
    edge_y: list[np.ndarray] = field(default_factory=list)
    edge_x: list[np.ndarray] = field(default_factory=list)
    edge_node: list[np.ndarray] = field(default_factory=list)

    def add_block(self, labels: np.ndarray, n: int, y0: int, x0: int) -> np.ndarray:
        """Record a block's edge labels; return the node id of each label (index 0 unused).

        Parameters
        ----------
        labels : numpy.ndarray
            The block's labels (0 background, ``1..n``), as from :func:`scipy.ndimage.label`.
        n : int
            Number of labels.
        y0, x0 : int
            Image position of the block's top-left pixel.
        """
        nodes = np.arange(self.n_nodes - 1, self.n_nodes + n, dtype=np.int64)
        nodes[0] = -1
        self.n_nodes += n
        h, w = labels.shape
        ys = np.concatenate([np.zeros(w, np.int64), np.full(w, h - 1), np.arange(h), np.arange(h)])
        xs = np.concatenate([np.arange(w), np.arange(w), np.zeros(h, np.int64), np.full(h, w - 1)])
        lab = labels[ys, xs]
        keep = lab > 0
        self.edge_y.append(ys[keep] + y0)
        self.edge_x.append(xs[keep] + x0)
        self.edge_node.append(nodes[lab[keep]])
        return nodes

    def roots(self, width: int) -> tuple[np.ndarray, int]:
        """Component of each node after joining pieces across block borders, and their number."""
        if self.n_nodes == 0:
            return np.zeros(0, dtype=np.int64), 0
        ys = np.concatenate(self.edge_y)
        xs = np.concatenate(self.edge_x)
        nodes = np.concatenate(self.edge_node)
        keys = ys * width + xs
        if keys.size == 0:
            return np.arange(self.n_nodes, dtype=np.int64), self.n_nodes
        order = np.argsort(keys, kind="stable")
        keys, nodes_sorted = keys[order], nodes[order]
        ys, xs, nodes = ys[order], xs[order], nodes_sorted
        src: list[np.ndarray] = []
        dst: list[np.ndarray] = []
        for dy, dx in _HALF_NEIGHBOURS:
            ny, nx = ys + dy, xs + dx
            inside = (nx >= 0) & (nx < width)
            want = ny[inside] * width + nx[inside]
            pos = np.minimum(np.searchsorted(keys, want), keys.size - 1)
            found = keys[pos] == want
            src.append(nodes[inside][found])
            dst.append(nodes_sorted[pos[found]])
        a, b = np.concatenate(src), np.concatenate(dst)
        graph = sparse.coo_matrix((np.ones(a.size, dtype=np.int8), (a, b)), shape=(self.n_nodes,) * 2)
        count, roots = connected_components(graph.tocsr(), directed=False)
        return roots.astype(np.int64), int(count)


@dataclass
class Labels(BorderJoin):
    """Connected pieces of one kind (ground truth or mask) collected over an image's blocks."""

    #: Per piece: number of valid pixels (ground truth) and a flag (hit / touches ground truth).
    sizes: list[np.ndarray] = field(default_factory=list)
    flags: list[np.ndarray] = field(default_factory=list)
    #: Sparse histograms of ground-truth pieces: node, bin, count.
    hist_node: list[np.ndarray] = field(default_factory=list)
    hist_bin: list[np.ndarray] = field(default_factory=list)
    hist_count: list[np.ndarray] = field(default_factory=list)


@dataclass
class ImageState:
    """Everything kept about an image while its blocks arrive."""

    shape: tuple[int, int]
    normal: np.ndarray
    anomalous: np.ndarray
    covered: int = 0
    offsets: set[tuple[int, int]] = field(default_factory=set)
    gt_value: float | None = None
    valid: int = 0
    n_anomalous: int = 0
    marked: int = 0
    true_positive: int = 0
    far_normal: int = 0
    far_marked: int = 0
    gt: Labels = field(default_factory=Labels)
    mask: Labels = field(default_factory=Labels)


@dataclass
class RegionTotals:
    """Region figures of one or more finished images."""

    pro_hist: np.ndarray
    regions: int = 0
    regions_hit: int = 0
    false_regions: int = 0

    def add(self, other: RegionTotals) -> None:
        """Add another image's figures to these."""
        self.pro_hist += other.pro_hist
        self.regions += other.regions
        self.regions_hit += other.regions_hit
        self.false_regions += other.false_regions


def near_mask(gt: np.ndarray, margin: int) -> np.ndarray:
    """Normal pixels within ``margin`` px (Euclidean) of an anomalous one."""
    if margin <= 0 or not gt.any():
        return np.zeros(gt.shape, dtype=bool)
    return (ndimage.distance_transform_edt(~gt) <= margin) & ~gt


def near_anomalies(gt: np.ndarray, margin: int = 32) -> np.ndarray:
    """Public form of the ``near`` mask :meth:`MetricsAccumulator.add` uses by default."""
    return near_mask(np.asarray(gt, dtype=bool), int(margin))
