"""``AnomalyDetector``: the seed's API; it plans the work and leaves scheduling to :mod:`~anomaly_dask.compute`."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import numpy as np

from . import compute, persistence, runs, training
from .backbones import fold_batchnorm
from .config import DEFAULTS, reject_unknown, unknown_message, validate
from .errors import ImageReadError, NotFittedError, ParameterError
from .features import FeatureConfig, check_device
from .grid import TileGrid
from .io import ImageSource, list_images, match_bit_depth, open_source
from .runtimes import resolve_runtime
from .scoring import Extractor

__all__ = ["AnomalyDetector"]

log = logging.getLogger("anomaly_dask")

#: Backbone context (network pixels) added around each window's tiles in dense mode.
CONTEXT = {"resnet18": 160, "efficientnet_lite0": 160}


def _setup_logging(verbose: int) -> None:
    level = logging.WARNING if verbose <= 0 else logging.INFO if verbose == 1 else logging.DEBUG
    log.setLevel(level)
    if not log.handlers and not logging.getLogger().handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(name)s: %(message)s"))
        log.addHandler(handler)


class AnomalyDetector:
    """Find visual anomalies with a dictionary of normal CNN tile features (Napoletano 2018).

    All arguments are keyword-only; see :data:`anomaly_dask.config.PARAMS` and the README
    for each one. The seed's arguments keep their meaning. Learned state ends in ``_``.

    Examples
    --------
    >>> ad = AnomalyDetector().train("example_dataset/train", "example_dataset/val")
    >>> ad.save("model.safetensors")
    >>> AnomalyDetector.load("model.safetensors").test("example_dataset/test", "out")
    """

    @reject_unknown
    def __init__(
        self,
        *,
        tile: int = 32,
        tile_height: int | None = None,
        tile_width: int | None = None,
        stride: int = 8,
        stride_height: int | None = None,
        stride_width: int | None = None,
        cnn_batchsize: int = 1024,
        device: str | None = None,
        pca_variance: float = 0.95,
        kmeans_clusters: int = 50,
        kmeans_trials: int = 3,
        kmeans_random: int | None = None,
        kmeans_neighbors: int = 1,
        threshold_mode: str | None = None,
        cdf: float = 0.95,
        zscore: float = 1.645,
        threshold: float | None = None,
        auto_threshold: bool = True,
        overlay_color: tuple[int, int, int] = (255, 0, 0),
        overlay_opacity: float = 0.75,
        verbose: int = 1,
        val_fraction: float = 0.2,
        false_alarm_rate: float = 1e-3,
        calibration_groups: str = "centroid",
        memory_size: int = 10_000,
        runtime: str = "auto",
        features: str = "dense",
        backbone: str = "efficientnet_lite0",
        weights: str | None = "imagenet",
        layers: Sequence[str] | None = None,
        upsample: int = 2,
        gain_radius: int = 0,
        patch_size: int = 320,
        chunk_size: int = 1024,
        max_fit_tiles: int = 100_000,
        max_train_chunks: int = 256,
        nodata: float | None = None,
        random_state: int | None = None,
        client: Any = None,
        storage_options: dict | None = None,
    ) -> None:
        """Store the arguments as attributes of the same names; nothing is checked yet.

        Parameters
        ----------
        tile, tile_height, ..., storage_options
            One argument per row of :data:`anomaly_dask.config.PARAMS`, which gives each
            one's meaning, type and valid values (the README's *Parameters* table is made
            from it). Values are checked when they are used (:meth:`train`, :meth:`load`,
            ...), as scikit-learn estimators do.

        Raises
        ------
        ParameterError
            An unknown keyword (the message lists the valid ones).
        """
        given = locals()
        for name in DEFAULTS:
            setattr(self, name, given[name])

    # ------------------------------------------------------------------ helpers
    def get_params(self, deep: bool = True) -> dict[str, Any]:
        """The keyword arguments as currently set, as in scikit-learn.

        Parameters
        ----------
        deep : bool, default True
            Also list the parameters of values that have ``get_params`` themselves, as
            ``<name>__<parameter>``.

        Returns
        -------
        dict
            Every parameter name of :meth:`__init__` with its current value.
        """
        params = {name: getattr(self, name) for name in DEFAULTS}
        if deep:
            for name, value in list(params.items()):
                if hasattr(value, "get_params") and not isinstance(value, type):
                    params.update((f"{name}__{k}", v) for k, v in value.get_params().items())
        return params

    def set_params(self, **params: Any) -> AnomalyDetector:
        """Set keyword arguments after construction, as in scikit-learn.

        Parameters
        ----------
        **params
            Parameter names of :meth:`__init__` with their new values; they are checked
            when next used, like those given to the constructor.

        Returns
        -------
        AnomalyDetector
            This detector.

        Raises
        ------
        ParameterError
            A name that is not a parameter (nothing is set then).
        """
        unknown = sorted(set(params) - set(DEFAULTS))
        if unknown:
            raise ParameterError(unknown_message(unknown))
        for name, value in params.items():
            setattr(self, name, value)
        return self

    def _settings(self) -> dict[str, Any]:
        s = validate(self.get_params())
        _setup_logging(s["verbose"])
        check_device(s["device"])
        return s

    def _grid(self, source: ImageSource, s: dict[str, Any]) -> TileGrid:
        th, tw = s["tile_height"], s["tile_width"]
        if source.height < th or source.width < tw:
            raise ImageReadError(
                f"{source.name}: image is {source.height}x{source.width} px, smaller than one "
                f"tile ({th}x{tw}); use a larger image or a smaller tile="
            )
        return TileGrid(source.height, source.width, th, tw, s["stride_height"], s["stride_width"])

    def _open(self, image: Any, s: dict[str, Any], match: bool = True) -> tuple[ImageSource, TileGrid]:
        source = open_source(image, s["storage_options"])
        if match:  # the same data at another bit depth is rescaled, or refused clearly
            source = match_bit_depth(source, getattr(self, "input_dtype_", None), s["nodata"])
        return source, self._grid(source, s)

    @staticmethod
    def _collect(images: Any, s: dict[str, Any]) -> list[Any]:
        """Image paths or arrays from a folder/file path, an array, or a list of those."""
        if isinstance(images, np.ndarray):
            return [images]
        if isinstance(images, (list, tuple)):
            if not images:
                raise ParameterError("an empty list of images was given")
            return [f for item in images for f in AnomalyDetector._collect(item, s)]
        return list_images(images, s["storage_options"])

    def _check_fitted(self) -> None:
        if getattr(self, "dictionary_", None) is None:
            raise NotFittedError("this AnomalyDetector is not trained: call train() or load() first")

    def _feature_config(self, s: dict[str, Any]) -> FeatureConfig:
        return FeatureConfig(
            mode=s["features"],
            upsample=s["upsample"],
            patch_size=s["patch_size"],
            batch_size=s["cnn_batchsize"],
            context=CONTEXT.get(s["backbone"], 160),
            runtime=resolve_runtime(s["runtime"], self._device(s)),
        )

    def _device(self, s: dict[str, Any]) -> str:
        import torch

        dev = s["device"]
        if dev in (None, "auto"):
            return "cuda" if torch.cuda.is_available() else "cpu"
        return str(dev)

    def _extractor(self, s: dict[str, Any]) -> Extractor:
        import torch

        backbone = fold_batchnorm(self.backbone_).to(self._device(s), memory_format=torch.channels_last)
        return Extractor(backbone, self._feature_config(s), self.intensity_, s["nodata"], gain_radius=s["gain_radius"])

    # ------------------------------------------------------------------ training


    def train(self, train: Any, val: Any = None, progress: Any = None) -> AnomalyDetector:
        """Learn normal appearance from anomaly-free images.

        Parameters
        ----------
        train : str
            Folder (searched recursively) or single image file, local path or fsspec URL.
        val : str, optional
            Validation images for the threshold. Without it, training images are split at
            random (``val_fraction``); a single training image is split by regions.
        progress : callable, optional
            ``progress(step, done, total)`` during each pass over the cluster: ``"sample"``
            (tile features sampled from the training chunks), ``"fit"`` (dictionary refined
            chunk by chunk), ``"calibrate"`` (validation chunks scored); ``done`` goes from
            0 to ``total`` chunks within each step.

        Returns
        -------
        AnomalyDetector
            ``self``, trained.
        """
        return training.train_detector(self, train, val, progress)

    # ------------------------------------------------------------------ scoring
    def score_array(self, image: Any, client: Any = None) -> Any:
        """Lazy pixel scores of one image as a dask array (chunked like the processing).

        ``client`` must be the client that will compute the array, if the array is to be
        computed on a distributed cluster (the model is scattered to it once).
        """
        self._check_fitted()
        s = self._settings()
        source, grid = self._open(image, s)
        return compute.score_array(
            self._extractor(s), self.dictionary_, source, grid, s["chunk_size"], s["kmeans_neighbors"],
            client=client,
        )

    def score_image(self, image: Any) -> np.ndarray:
        """Per-pixel anomaly scores of one image.

        Parameters
        ----------
        image : str or ndarray
            Image path/URL, or an array (H, W) or (H, W, C).

        Returns
        -------
        ndarray of float32, shape (H, W)
            Higher is more anomalous; same units as ``threshold_``.
        """
        self._check_fitted()
        s = self._settings()
        source, grid = self._open(image, s)
        with compute.session(s["client"], self._extractor(s), self.dictionary_) as job:
            return job.score(source, grid, s["chunk_size"], s["kmeans_neighbors"])

    def test(self, test: Any, output_dir: str) -> list[dict[str, Any]]:
        """Score images and write ``<stem>_mask.png`` and ``<stem>_overlay.png`` for each.

        Images found in sub-folders of ``test`` keep their relative folder in ``output_dir``
        (``a/x.png`` gives ``a/x_mask.png``), so equal names in two folders never overwrite
        each other; two inputs that would still share an output name (``x.png`` and
        ``x.tif`` in one folder) are refused before anything is scored or written.

        Parameters
        ----------
        test : str
            Folder (searched recursively) or one image file.
        output_dir : str
            Local folder or fsspec URL; created if missing.

        Returns
        -------
        list of dict
            Per image: ``path``, ``height``, ``width``, ``anomalous_pixels``,
            ``anomalous_fraction``, ``max_score``, ``mask_path``, ``overlay_path``,
            ``contacts`` and ``contacts_path`` (``<stem>_contacts.csv``, pixel coordinates).
        """
        return runs.test_images(self, test, output_dir)

    def _pair_ground_truth(self, test: Any, ground_truth: Any, s: dict[str, Any]) -> list[tuple[Any, Any]]:
        """(test image, ground-truth image) pairs: by position for arrays, by file stem
        (``<stem>``, ``<stem>_mask`` or ``<stem>_gt``) for folders."""
        return runs.pair_ground_truth(self, test, ground_truth, s)

    def evaluate(
        self,
        test: Any,
        ground_truth: Any,
        output: str | None = None,
        *,
        overlays: bool = True,
    ) -> dict[str, Any]:
        """Score test images against pixel ground truth, chunk by chunk (memory stays flat).

        Parameters
        ----------
        test : str, ndarray or list
            Test images (folder, file, mosaic, array or a list of those), as for :meth:`test`.
        ground_truth : str, ndarray or list
            Binary masks (0 / any one positive value), one per test image: a folder whose
            files are named after the test images (``<stem>.*``, ``<stem>_mask.*`` or
            ``<stem>_gt.*``), one file for one test image, or arrays in the same order.
        output : str, optional
            Folder (local or fsspec URL) for the report: ``metrics.json``, ``roc.png``,
            ``pro.png``, ``histogram.png`` and ``<stem>_gt_overlay.png`` per image.
        overlays : bool
            Write the per-image overlays (images over 2048 px a side are shown subsampled).

        Returns
        -------
        dict
            Overall and per-image (``images``) metrics: ``auroc``, ``aupro`` (to 30 % FPR),
            ``f1`` at the model's threshold, ``best_f1``, ``normal_marked`` (and
            ``normal_marked_far``, beyond one tile of any anomalous pixel), region counts
            (``regions_hit``, ``regions_missed``, ``false_regions``, per megapixel and per
            km^2 when georeferenced), plus ``false_alarm_rate`` (the model's promise) and
            ``report`` (paths written) when ``output`` is given.

        Raises
        ------
        GroundTruthError
            Ground truth missing for a test image, of another size, not binary, or with no
            anomalous pixel in any image; raised before any scoring where it can be seen
            from the masks alone.
        """
        return runs.evaluate_images(self, test, ground_truth, output, overlays=overlays)

    def _content_fingerprint(self) -> str:
        """sha256 of the model's content (as :meth:`save` would record it)."""
        return persistence.content_fingerprint(self)

    def detect(
        self,
        image: Any,
        output: str,
        *,
        png_tiles: bool = False,
        quicklook: bool = True,
        geotiff: str | tuple[str, ...] | None = None,
        contacts: tuple[str, ...] = ("geojson", "csv", "gpkg"),
        min_area: int = 1,
        outlines: bool = False,
        pyramid: bool = True,
        zarr_format: int = 3,
        overwrite: bool = False,
        storage_options: dict[str, Any] | None = None,
        progress: Any = None,
    ) -> dict[str, Any]:
        """Score a (very large) image chunk by chunk into a zarr store, resumably.

        Parameters
        ----------
        image : str or ndarray
            TIFF / BigTIFF / GeoTIFF, zarr array, ordinary image file (any fsspec URL), or
            an array. Read window by window; never loaded whole (except Pillow formats).
        output : str
            URL of the zarr group to write (``out/a.zarr``): arrays ``score`` (float32,
            NaN on no-data), ``mask`` (uint8 0/255) and ``overlay`` (RGB uint8), chunked
            like the processing, with CF attributes, x / y coordinates and ``spatial_ref``
            when georeferenced (``xarray.open_zarr`` + rioxarray read them) and an
            OME-Zarr pyramid of the score (:mod:`anomaly_dask.pyramid`). Exports go beside
            it, named after it (``out/a_mask.tif``, ...).
        png_tiles, quicklook : bool
            Also write overlay PNG tiles ``<base>_tiles/overlay/<row>/<col>.png``; the
            whole overlay at most 2048 px a side as ``<base>_quicklook.png``.
        geotiff : {"mask", "score", "overlay"} or tuple of them, optional
            Also write ``<base>_<name>.tif``: Cloud-Optimized GeoTIFFs with overviews, the
            input's georeference, band descriptions, threshold and model fingerprint
            (``mask.tif``: 1 anomalous, 0 normal, 255 no data).
        contacts : tuple of {"geojson", "csv", "gpkg"}
            Contact lists (connected anomalous regions, :mod:`anomaly_dask.contacts`) to
            write as ``<base>_contacts.<format>``; empty for none.
        min_area, outlines : int, bool
            Smallest contact kept (pixels); also write each contact's outline polygon.
        pyramid, zarr_format : bool, {3, 2}
            Write the score's OME-Zarr pyramid; zarr format (2 for GDAL < 3.11).
        overwrite : bool
            Replace a store at ``output`` written by another run (otherwise refused, naming
            what differs), and exports beside it that this store did not write. A store
            of the same run is resumed: chunks already scored are skipped. The run is the
            model, its parameters, the chunk size, no-data value, ``kmeans_neighbors``, and
            the input's path, size and content (see
            :func:`anomaly_dask.identity.input_identity`). With another threshold or
            overlay look, masks and overlays are redrawn from the stored scores without
            the CNN. A store that another live run is writing is never replaced.
        storage_options : dict, optional
            fsspec options for input and output (defaults to the detector's).
        progress : callable, optional
            ``progress(done, total)`` after each chunk scored or redrawn and each export
            (pyramid, tiles, quick-look, GeoTIFF, contacts); once with ``(0, total)`` first.

        Returns
        -------
        dict
            Summary: size, ``chunks``, ``computed_chunks``, ``redrawn_chunks``, pixel counts,
            ``anomalous_fraction``, ``max_score``, ``seconds``, ``megapixels_per_second``,
            ``threshold``, ``run_id``, ``contacts`` (their number) and the exports' URLs.

        Raises
        ------
        OutputExistsError
            If ``output`` holds the store of another run, or an export's name is taken by a
            file this store did not write, and ``overwrite`` is false.
        OutputLockedError
            If another live run writes ``output`` (it holds the lease ``<output>.lock``,
            removed when a run ends, taken over from a killed one), whatever ``overwrite``
            says; or if this run lost its lease to another one.
        """
        from .detection import detect_image

        return detect_image(
            self, image, output, png_tiles=png_tiles, quicklook=quicklook, geotiff=geotiff,
            contacts=contacts, min_area=min_area, outlines=outlines, pyramid=pyramid,
            zarr_format=zarr_format, overwrite=overwrite, storage_options=storage_options,
            progress=progress,
        )

    # ------------------------------------------------------------------ persistence
    def _config(self) -> dict[str, Any]:
        return persistence.model_config(self)

    def _tensors(self) -> dict[str, np.ndarray]:
        return persistence.model_tensors(self)

    def save(self, path: str, storage_options: dict[str, Any] | None = None, signing_key: Any = None) -> str:
        """Write the trained model to one self-contained safetensors file.

        Parameters
        ----------
        path : str
            Local path or fsspec URL (``.safetensors`` recommended).
        storage_options : dict, optional
            fsspec options (defaults to the detector's ``storage_options``).
        signing_key : str, path-like or Ed25519PrivateKey, optional
            Sign the model with this Ed25519 private key (a PEM file as written by
            ``anomaly-dask keygen``, or the key object), so that :meth:`load` with
            ``trusted_keys`` accepts it.

        Returns
        -------
        str
            The model's fingerprint (sha256 of its content).

        Raises
        ------
        ModelFileError
            The model would exceed :data:`~anomaly_dask.model_file.MAX_MODEL_BYTES`.
        ParameterError
            ``signing_key`` is not a readable Ed25519 private key.
        """
        return persistence.save_model(self, path, storage_options, signing_key)

    @classmethod
    def load(
        cls,
        path: str,
        storage_options: dict[str, Any] | None = None,
        trusted_keys: Any = None,
        **overrides: Any,
    ) -> AnomalyDetector:
        """Load a model saved by :meth:`save`; runs no code from the file.

        Every value of the file is checked before anything is built from it (see
        :func:`~anomaly_dask.model_file.check_model`). The file sets only the model: run
        settings (:data:`~anomaly_dask.config.RUNTIME`: ``client``, ``storage_options``,
        ``device``, ...) come from the caller, and a file that holds one is refused.

        Parameters
        ----------
        path : str
            Local path or fsspec URL.
        storage_options : dict, optional
            fsspec options.
        trusted_keys : sequence of str or Ed25519PublicKey, optional
            Ed25519 public keys (PEM files as written by ``anomaly-dask keygen``, or key
            objects). When given, only a model signed by one of them is loaded.
        **overrides
            Runtime arguments to set on the loaded detector (``client``, ``chunk_size``,
            ``verbose``, ``overlay_color``, ...) and threshold rules (``false_alarm_rate``,
            ``threshold_mode``, ...; scores are calibrated, so these need no retraining).

        Raises
        ------
        ModelFileError
            Not an anomaly_dask model, a pickle, too large, truncated, tampered with, too
            new, holding a run setting or an invalid value (the message names the field),
            or, given ``trusted_keys``, not signed by one of them.
        ParameterError
            A trusted key is not a readable Ed25519 public key.
        """
        return persistence.load_model(cls, path, storage_options, trusted_keys, **overrides)


