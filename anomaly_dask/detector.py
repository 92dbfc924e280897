"""``AnomalyDetector``: the seed's API on top of the Dask pipeline."""

from __future__ import annotations

import logging
import os
import time
from importlib.metadata import version as _pkg_version
from typing import Any

import fsspec
import numpy as np

from . import pipeline
from .backbones import build_backbone, fold_batchnorm, resolve_weights
from .calibration import decision_rule, distance_classes, fit_calibration
from .dictionary import Dictionary
from .errors import GroundTruthError, ImageReadError, NotFittedError, ParameterError
from .features import FeatureConfig
from .grid import TileGrid
from .model_file import read_model, write_model
from .outputs import check_writable, display_rgb, mask_image, overlay_image, write_png
from .params import DEFAULTS, saved_params, validate
from .sources import (
    ImageSource,
    Intensity,
    fit_intensity,
    list_images,
    match_bit_depth,
    open_source,
    output_names,
    to_unit_rgb,
)

__all__ = ["AnomalyDetector"]

log = logging.getLogger("anomaly_dask")

#: Most validation pixels sampled for calibration (on a lattice of every n-th row and
#: column, n chosen to stay under this).
CALIBRATION_PIXELS = 2_000_000

#: A calibration group needs the area of this many tiles (in sampled pixels, and at least
#: :data:`MIN_GROUP_SAMPLES`); smaller groups fall back to a coarser one.
MIN_GROUP_TILES = 16
MIN_GROUP_SAMPLES = 1000

#: Neighbouring pixel scores share most of their tiles, so a tile's area of pixels is about
#: one independent sample. Each group's empirical curve stops where this many tiles' worth
#: of its samples remain above; beyond, its tail is a generalised Pareto fitted on those samples.
TAIL_TILES = 30

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

    All arguments are keyword-only; see :data:`anomaly_dask.params.DEFAULTS` and the README
    for each one. The seed's arguments keep their meaning. Learned state ends in ``_``.

    Examples
    --------
    >>> ad = AnomalyDetector().train("example_dataset/train", "example_dataset/val")
    >>> ad.save("model.safetensors")
    >>> AnomalyDetector.load("model.safetensors").test("example_dataset/test", "out")
    """

    def __init__(self, **kwargs: Any) -> None:
        unknown = sorted(set(kwargs) - set(DEFAULTS))
        if unknown:
            raise ParameterError(f"unknown argument(s) {unknown}; valid ones are {sorted(DEFAULTS)}")
        self._kwargs = dict(kwargs)
        for k, v in {**DEFAULTS, **kwargs}.items():
            setattr(self, k, v)

    # ------------------------------------------------------------------ helpers
    def get_params(self) -> dict[str, Any]:
        """All keyword arguments as currently set."""
        return {k: getattr(self, k) for k in DEFAULTS}

    def _settings(self) -> dict[str, Any]:
        s = validate(self.get_params())
        _setup_logging(s["verbose"])
        _check_device(s["device"])
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
        )

    def _device(self, s: dict[str, Any]) -> str:
        import torch

        dev = s["device"]
        if dev in (None, "auto"):
            return "cuda" if torch.cuda.is_available() else "cpu"
        return str(dev)

    def _extractor(self, s: dict[str, Any]) -> pipeline.Extractor:
        import torch

        backbone = fold_batchnorm(self.backbone_).to(self._device(s), memory_format=torch.channels_last)
        return pipeline.Extractor(backbone, self._feature_config(s), self.intensity_, s["nodata"])

    # ------------------------------------------------------------------ training
    def _calibrate(
        self,
        client: Any,
        local_extractor: pipeline.Extractor,
        extractor: Any,
        dictionary: Dictionary,
        val_units: list[pipeline.Unit],
        s: dict[str, Any],
    ) -> None:
        """Fit the dictionary's calibration on raw pixel scores of the validation units.

        Pixels are sampled on a lattice of every ``step``-th row and column, ``step`` the
        smallest that keeps the sample under :data:`CALIBRATION_PIXELS`.
        """
        grid = val_units[0].grid
        edges = local_extractor.distance_edges(grid)
        area = sum(u.window.shape[0] * u.window.shape[1] for u in val_units)
        step = max(1, int(np.ceil(np.sqrt(area / CALIBRATION_PIXELS))))
        dict_future = client.scatter(dictionary, broadcast=True)
        scores, distance, labels = pipeline.sample_pixel_scores(
            client, extractor, dict_future, val_units, s["kmeans_neighbors"], step
        )
        per_tile = grid.tile_h * grid.tile_w / step**2  # sampled pixels in one tile's area
        least = max(MIN_GROUP_SAMPLES, round(MIN_GROUP_TILES * per_tile))
        classes = distance_classes(distance, edges) if len(edges) else np.zeros(len(scores), dtype=np.int64)
        dictionary.calibration = fit_calibration(
            scores, labels, classes, len(dictionary.centroids), edges,
            grouping=s["calibration_groups"], min_samples=least, tail=max(30, round(TAIL_TILES * per_tile)),
        )
        log.info(
            "calibrated on %d validation pixels (every %d px): %d groups of at least %d",
            len(scores), step, dictionary.calibration.n_groups, least,
        )

    def _split(
        self, train: Any, val: Any, s: dict[str, Any], rng: np.random.Generator
    ) -> tuple[list[pipeline.Unit], list[pipeline.Unit], list[ImageSource]]:
        sources = [self._open(f, s, match=False) for f in self._collect(train, s)]
        self.input_dtype_ = _training_dtype([src for src, _ in sources])
        chunk = s["chunk_size"]
        if val is not None:
            val_sources = [self._open(f, s) for f in self._collect(val, s)]
            return (
                [u for src, g in sources for u in pipeline.plan_units(src, g, chunk)],
                [u for src, g in val_sources for u in pipeline.plan_units(src, g, chunk)],
                [src for src, _ in sources],
            )
        if len(sources) >= 2:
            n_val = min(len(sources) - 1, max(1, round(s["val_fraction"] * len(sources))))
            perm = rng.permutation(len(sources))
            val_idx = set(perm[:n_val].tolist())
            log.info("no validation images given: %d of %d training images used for validation", n_val, len(sources))
            tr = [u for i, (src, g) in enumerate(sources) if i not in val_idx for u in pipeline.plan_units(src, g, chunk)]
            va = [u for i, (src, g) in enumerate(sources) if i in val_idx for u in pipeline.plan_units(src, g, chunk)]
            return tr, va, [src for src, _ in sources]
        # One image, no validation: split it by regions.
        src, g = sources[0]
        small = min(chunk, max(4 * max(g.tile_h, g.tile_w), min(src.height, src.width) // 4))
        units = pipeline.plan_units(src, g, small)
        if len(units) < 2:
            raise ImageReadError(
                f"{src.name}: a single image of {src.height}x{src.width} px is too small to split "
                f"into training and validation regions; pass val= or more training images"
            )
        n_val = min(len(units) - 1, max(1, round(s["val_fraction"] * len(units))))
        perm = rng.permutation(len(units))
        log.info("one training image, no validation: %d of its %d regions used for validation", n_val, len(units))
        return [units[i] for i in perm[n_val:]], [units[i] for i in perm[:n_val]], [src]

    def _fit_intensity(self, sources: list[ImageSource], rng: np.random.Generator) -> Intensity:
        samples = []
        for src in sources[:64]:
            h, w = min(src.height, 512), min(src.width, 512)
            for _ in range(4):
                y = int(rng.integers(0, src.height - h + 1))
                x = int(rng.integers(0, src.width - w + 1))
                samples.append(src.read(y, y + h, x, x + w)[::4, ::4])
        nodata = self.nodata if self.nodata is not None else next(
            (src.nodata for src in sources if src.nodata is not None), None
        )
        return fit_intensity(sources, samples, nodata)

    def train(self, train: Any, val: Any = None) -> AnomalyDetector:
        """Learn normal appearance from anomaly-free images.

        Parameters
        ----------
        train : str
            Folder (searched recursively) or single image file, local path or fsspec URL.
        val : str, optional
            Validation images for the threshold. Without it, training images are split at
            random (``val_fraction``); a single training image is split by regions.

        Returns
        -------
        AnomalyDetector
            ``self``, trained.
        """
        s = self._settings()
        t0 = time.perf_counter()
        seed = s["random_state"]
        if seed is None:
            seed = int(np.random.SeedSequence().entropy % (2**31))
        rng = np.random.default_rng(seed)
        train_units, val_units, train_sources = self._split(train, val, s, rng)
        budget = s["max_train_chunks"]
        if len(train_units) > budget:
            log.info("training on a random %d of %d chunks (max_train_chunks)", budget, len(train_units))
            train_units = [train_units[i] for i in np.sort(rng.choice(len(train_units), budget, replace=False))]
        val_units = _at_most(val_units, max(8, budget // 4), rng)
        self.intensity_ = self._fit_intensity(train_sources, rng)
        weights_id, state = resolve_weights(s["backbone"], s["weights"])
        self.backbone_ = build_backbone(
            s["backbone"], state, tuple(s["layers"]) if s["layers"] else None, seed=seed,
            dense_only=s["features"] == "dense",
        )
        self.weights_id_ = weights_id
        self.random_state_ = seed
        log.info(
            "training on %d chunks (%d validation chunks), backbone %s (%s), %s features",
            len(train_units), len(val_units), s["backbone"], weights_id, s["features"],
        )
        local_extractor = self._extractor(s)
        with pipeline.local_client(s["client"]) as client:
            extractor = client.scatter(local_extractor, broadcast=True)
            dictionary = pipeline.train_dictionary(
                client, extractor, train_units,
                pca_variance=s["pca_variance"], n_clusters=s["kmeans_clusters"],
                n_init=s["kmeans_trials"], max_fit_tiles=s["max_fit_tiles"], random_state=seed,
                memory_size=s["memory_size"],
            )
            self._calibrate(client, local_extractor, extractor, dictionary, val_units, s)
        self.dictionary_ = dictionary
        self.threshold_, self.false_alarm_rate_ = decision_rule(
            s["threshold_mode"], s["false_alarm_rate"], s["cdf"], s["zscore"], s["threshold"]
        )
        self.calibration_summary_ = dictionary.calibration.summary()
        self.n_components_ = int(dictionary.pca_components.shape[0])
        self.fingerprint_ = None
        log.info(
            "trained in %.1f s: %d PCA components, %d centroids, threshold %.3f (marks %.3g of normal pixels)",
            time.perf_counter() - t0, self.n_components_, len(dictionary.centroids),
            self.threshold_, self.false_alarm_rate_,
        )
        return self

    # ------------------------------------------------------------------ scoring
    def score_array(self, image: Any, client: Any = None) -> Any:
        """Lazy pixel scores of one image as a dask array (chunked like the processing).

        ``client`` must be the client that will compute the array, if the array is to be
        computed on a distributed cluster (the model is scattered to it once).
        """
        self._check_fitted()
        s = self._settings()
        source, grid = self._open(image, s)
        extractor: Any = self._extractor(s)
        dictionary: Any = self.dictionary_
        if client is not None:
            extractor = client.scatter(extractor, broadcast=True)
            dictionary = client.scatter(dictionary, broadcast=True)
        return pipeline.score_array(
            extractor, dictionary, source, grid, s["chunk_size"], s["kmeans_neighbors"]
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
        s = self._settings()
        with pipeline.local_client(s["client"]) as client:
            return client.compute(self.score_array(image, client)).result()

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
            ``anomalous_fraction``, ``max_score``, ``mask_path``, ``overlay_path``.
        """
        self._check_fitted()
        s = self._settings()
        files = list_images(test, s["storage_options"])
        stems = output_names(test, files, s["storage_options"])  # refuses clashes up front
        opened = [(f, *self._open(f, s)) for f in files]  # fail on a bad file before writing
        fs, out_path = fsspec.core.url_to_fs(str(output_dir), **(s["storage_options"] or {}))
        check_writable(fs, out_path, str(output_dir))
        for stem in stems:
            if "/" in stem:
                fs.makedirs(f"{out_path.rstrip('/')}/{stem.rsplit('/', 1)[0]}", exist_ok=True)
        sep = "" if str(output_dir).endswith("/") else "/"
        results = []
        with pipeline.local_client(s["client"]) as client:
            extractor = client.scatter(self._extractor(s), broadcast=True)
            dictionary = client.scatter(self.dictionary_, broadcast=True)
            for (f, source, grid), stem in zip(opened, stems):
                t0 = time.perf_counter()
                arr = pipeline.score_array(
                    extractor, dictionary, source, grid, s["chunk_size"], s["kmeans_neighbors"]
                )
                scores = client.compute(arr).result()
                mask = mask_image(scores, self.threshold_)
                rgb = display_rgb(to_unit_rgb(source.read(0, source.height, 0, source.width), self.intensity_))
                overlay = overlay_image(rgb, mask, s["overlay_color"], s["overlay_opacity"])
                mask_path = f"{output_dir}{sep}{stem}_mask.png"
                overlay_path = f"{output_dir}{sep}{stem}_overlay.png"
                write_png(mask_path, mask, s["storage_options"])
                write_png(overlay_path, overlay, s["storage_options"])
                n_bad = int((mask > 0).sum())
                results.append({
                    "path": str(f), "height": source.height, "width": source.width,
                    "anomalous_pixels": n_bad, "anomalous_fraction": n_bad / mask.size,
                    "max_score": float(scores.max()), "mask_path": mask_path,
                    "overlay_path": overlay_path,
                })
                log.info(
                    "%s: %d anomalous pixels (%.2f%%), max score %.3f, %.1f s",
                    f, n_bad, 100 * n_bad / mask.size, scores.max(), time.perf_counter() - t0,
                )
        return results

    def _pair_ground_truth(self, test: Any, ground_truth: Any, s: dict[str, Any]) -> list[tuple[Any, Any]]:
        """(test image, ground-truth image) pairs: by position for arrays, by file stem
        (``<stem>``, ``<stem>_mask`` or ``<stem>_gt``) for folders."""
        images = self._collect(test, s)
        if isinstance(ground_truth, (np.ndarray, list, tuple)):
            truths = self._collect(ground_truth, s)
            if len(truths) != len(images):
                raise GroundTruthError(
                    f"{len(images)} test image(s) but {len(truths)} ground-truth image(s); give one per test image"
                )
            return list(zip(images, truths))
        truths = list_images(ground_truth, s["storage_options"])
        if len(images) == 1 and len(truths) == 1:
            return [(images[0], truths[0])]
        by_stem: dict[str, str] = {}
        for t in truths:
            stem = os.path.splitext(os.path.basename(str(t)))[0]
            for suffix in ("_mask", "_gt"):
                if stem.endswith(suffix):
                    by_stem.setdefault(stem[: -len(suffix)], t)
            by_stem[stem] = t
        pairs, missing = [], []
        for im in images:
            stem = os.path.splitext(os.path.basename(str(im)))[0]
            if stem in by_stem:
                pairs.append((im, by_stem[stem]))
            else:
                missing.append(str(im))
        if missing:
            raise GroundTruthError(
                f"no ground truth in {ground_truth} for {len(missing)} test image(s), e.g. {missing[0]}: "
                f"name each mask <stem>.png (or <stem>_mask.*, <stem>_gt.*) after its test image"
            )
        return pairs

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
        from .evaluation import MetricsAccumulator, read_ground_truth
        from .report import write_report

        self._check_fitted()
        s = self._settings()
        pairs = self._pair_ground_truth(test, ground_truth, s)
        chunk = s["chunk_size"]
        opened = []
        any_anomalous = False
        for image, truth in pairs:
            source, grid = self._open(image, s)
            gt_source = open_source(truth, s["storage_options"])
            if (gt_source.height, gt_source.width) != (source.height, source.width):
                raise GroundTruthError(
                    f"ground truth {gt_source.name} is {gt_source.height}x{gt_source.width} px but its "
                    f"test image {source.name} is {source.height}x{source.width}; give a mask of the image's size"
                )
            units = pipeline.plan_units(source, grid, chunk)
            for u in units:  # masks are cheap to read: check them all before scoring
                w = u.window
                block = _gt_block(gt_source, w, read_ground_truth)
                any_anomalous = any_anomalous or bool(block.any())
            opened.append((source, gt_source, units))
        if not any_anomalous:
            raise GroundTruthError(
                "the ground truth marks no anomalous pixel in any test image; AUROC and AUPRO need "
                "some (masks use 0 for normal and one positive value, e.g. 255, for anomalous)"
            )
        pixel_area = None
        georef = getattr(opened[0][0], "georef", None) if len(opened) == 1 else None
        if georef and georef.get("transform"):
            t = georef["transform"]
            pixel_area = abs(t[1] * t[5] - t[2] * t[4]) or None
        acc = MetricsAccumulator(self.threshold_, lo=0.0, hi=20.0, bins=8192, pixel_area_m2=pixel_area)
        pictures = []
        with pipeline.local_client(s["client"]) as client:
            extractor = client.scatter(self._extractor(s), broadcast=True)
            dictionary = client.scatter(self.dictionary_, broadcast=True)
            for source, gt_source, units in opened:
                name = os.path.splitext(os.path.basename(source.name))[0] or source.name
                step = max(1, -(-max(source.height, source.width) // 2048))
                small = (
                    [np.zeros((-(-source.height // step), -(-source.width // step), 3), np.uint8),
                     np.zeros((-(-source.height // step), -(-source.width // step)), bool),
                     np.zeros((-(-source.height // step), -(-source.width // step)), bool)]
                    if overlays and output is not None else None
                )
                for unit, scores in pipeline.score_blocks(client, extractor, dictionary, units, s["kmeans_neighbors"]):
                    w = unit.window
                    gt, near = _gt_block_with_margin(gt_source, w, read_ground_truth, acc.margin)
                    acc.add(scores, gt, image=name, offset=(w.y0, w.x0), shape=(source.height, source.width), near=near)
                    if small is not None:
                        at = (slice((-w.y0) % step, None, step), slice((-w.x0) % step, None, step))
                        ys, xs = -(-w.y0 // step), -(-w.x0 // step)
                        rgb = display_rgb(to_unit_rgb(source.read(w.y0, w.y1, w.x0, w.x1), self.intensity_))[at]
                        box = (slice(ys, ys + rgb.shape[0]), slice(xs, xs + rgb.shape[1]))
                        small[0][box] = rgb
                        small[1][box] = gt[at]
                        small[2][box] = np.nan_to_num(scores[at], nan=-np.inf) >= self.threshold_
                if small is not None:
                    pictures.append((name, small[0], small[1], small[2]))
        result = acc.result()
        result["false_alarm_rate"] = self.false_alarm_rate_
        result["threshold"] = self.threshold_
        if output is not None:
            result["report"] = write_report(
                {**result, "histograms": acc.histograms()}, str(output), pictures or None, s["storage_options"]
            )
        log.info(
            "evaluated %d image(s): AUROC %.4f, AUPRO %s, F1 %.3f, normal pixels marked %.4f (promised %.3g)",
            len(opened), result["auroc"] or float("nan"), result["aupro"], result["f1"] or 0.0,
            result["normal_marked"] or 0.0, self.false_alarm_rate_,
        )
        return result

    def _content_fingerprint(self) -> str:
        """sha256 of the model's content (as :meth:`save` would record it)."""
        if getattr(self, "fingerprint_", None):
            return self.fingerprint_
        import json

        from .model_file import fingerprint

        tensors = self._tensors()
        return fingerprint(json.dumps(self._config(), sort_keys=True), tensors)

    def detect(
        self,
        image: Any,
        output: str,
        *,
        png_tiles: bool = False,
        quicklook: bool = True,
        geotiff: str | tuple[str, ...] | None = None,
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
            URL of the zarr v3 group to write: arrays ``score`` (float32, NaN on no-data),
            ``mask`` (uint8 0/255) and ``overlay`` (RGB uint8), chunked like the processing;
            attributes hold threshold, model fingerprint, parameters and georeference.
        png_tiles : bool
            Also write overlay PNG tiles under ``<output>/png/overlay/<row>/<col>.png``.
        quicklook : bool
            Also write ``<output>/quicklook.png``, the whole overlay at most 2048 px a side.
        geotiff : {"mask", "score"} or tuple of them, optional
            Also write ``<output>/<name>.tif`` with the input's georeference.
        overwrite : bool
            Replace a store at ``output`` written by another run (otherwise refused, naming
            what differs). A store of the same run is resumed: chunks already completed
            are skipped. The run is the model, its threshold and parameters, the chunk
            size, no-data value, ``kmeans_neighbors``, ``overlay_color``,
            ``overlay_opacity``, and the input's path, size and content (see
            :func:`anomaly_dask.identity.input_identity`). A store that another live run
            is writing is never replaced.
        storage_options : dict, optional
            fsspec options for input and output (defaults to the detector's).
        progress : callable, optional
            ``progress(done, total)`` after each chunk computed by this call (``total`` is
            the number of chunks left to compute); called once with ``(0, total)`` first.

        Returns
        -------
        dict
            Summary: ``output``, ``height``, ``width``, ``chunks``, ``computed_chunks``,
            ``valid_pixels``, ``anomalous_pixels``, ``anomalous_fraction``, ``max_score``,
            ``seconds``, ``megapixels_per_second``, ``threshold``, ``run_id`` and the paths of
            extra outputs.

        Raises
        ------
        OutputExistsError
            If ``output`` holds the store of another run and ``overwrite`` is false.
        OutputLockedError
            If another live run writes ``output`` (it holds the lease ``<output>.lock``),
            whatever ``overwrite`` says; or if this run lost its lease to another one.

        Notes
        -----
        While it writes, the run holds the lease ``<output>.lock`` (see
        :class:`anomaly_dask.store.StoreLease`), removed when it ends, also on errors. A
        lease left by a killed run is taken over by the next one.
        """
        from . import store as out_store
        from .grid import regular_windows
        from .identity import input_identity, jsonable, run_id_of

        self._check_fitted()
        s = self._settings()
        if storage_options is not None:
            s["storage_options"] = storage_options
        so = s["storage_options"]
        names = (geotiff,) if isinstance(geotiff, str) else tuple(geotiff or ())
        bad = [n for n in names if n not in ("mask", "score")]
        if bad:
            raise ParameterError(f"geotiff={geotiff!r}: choose 'mask' and/or 'score'")
        t0 = time.perf_counter()
        source, grid = self._open(image, s)
        chunk = s["chunk_size"]
        georef = getattr(source, "georef", None)
        # Everything that shapes the stored pixels; a store is resumed only for the same.
        # Runtime settings are not in saved_params, so those that matter are named here.
        run_settings = {
            "chunk_size": chunk, "nodata": s["nodata"], "kmeans_neighbors": s["kmeans_neighbors"],
            "overlay_color": list(s["overlay_color"]), "overlay_opacity": s["overlay_opacity"],
        }
        identity = jsonable({
            "model": self._content_fingerprint(), "threshold": float(self.threshold_),
            "params": saved_params(s), **run_settings,
            "input": source.name, "shape": [source.height, source.width],
            "input_content": input_identity(source),
        })
        run_id = run_id_of(identity)
        attrs = {
            "threshold": self.threshold_, "model_fingerprint": identity["model"],
            "params": saved_params(s), "run_settings": run_settings, "input": source.name,
            "georef": georef, "nodata": source.nodata if s["nodata"] is None else s["nodata"],
        }
        lease = out_store.StoreLease(output, run_id, so)
        with lease:  # one writer per store; released on errors and KeyboardInterrupt too
            store = out_store.OutputStore.create(
                output, source.height, source.width, chunk, run_id, jsonable(attrs),
                storage_options=so, overwrite=overwrite, identity=identity, lease=lease,
            )
            done = store.done_chunks()
            windows = regular_windows(grid, chunk)
            jobs = [
                (pipeline.Unit(source, grid, w), (iy, ix))
                for iy, row in enumerate(windows) for ix, w in enumerate(row) if (iy, ix) not in done
            ]
            total = sum(len(r) for r in windows)
            log.info("%s: %d x %d px, %d chunks (%d already done) -> %s",
                     source.name, source.height, source.width, total, total - len(jobs), output)
            rendering = pipeline.Rendering(
                self.threshold_, s["overlay_color"], s["overlay_opacity"], s["kmeans_neighbors"]
            )

            def report(k: int, n: int) -> None:
                lease.check()  # stop at once if another run took the store over
                el = time.perf_counter() - t0
                if k == n or k % max(1, n // 20) == 0:
                    log.info("chunks %d/%d, %.0f s elapsed, ETA %.0f s", k, n, el, el / k * (n - k))
                if progress is not None:
                    progress(k, n)

            if progress is not None:
                progress(0, len(jobs))

            with pipeline.local_client(s["client"]) as client:
                extractor = client.scatter(self._extractor(s), broadcast=True)
                dictionary = client.scatter(self.dictionary_, broadcast=True)
                stats = pipeline.detect_chunks(client, extractor, dictionary, jobs, store, rendering, report)
            # Statistics over every chunk, including those done by an earlier, interrupted run.
            mask_arr = store.read("mask")
            score_arr = store.read("score")
            valid = anomalous = 0
            max_score = float("-inf")
            for row in windows:
                for w in row:
                    sc = score_arr[w.y0 : w.y1, w.x0 : w.x1]
                    fin = np.isfinite(sc)
                    valid += int(fin.sum())
                    anomalous += int((mask_arr[w.y0 : w.y1, w.x0 : w.x1] > 0).sum())
                    if fin.any():
                        max_score = max(max_score, float(sc[fin].max()))
            seconds = time.perf_counter() - t0
            summary = {
                "output": str(output), "height": source.height, "width": source.width,
                "chunks": total, "computed_chunks": len(stats), "valid_pixels": valid,
                "anomalous_pixels": anomalous, "anomalous_fraction": anomalous / max(valid, 1),
                "max_score": max_score if valid else None, "threshold": self.threshold_,
                "seconds": seconds,
                "megapixels_per_second": sum(u.window.shape[0] * u.window.shape[1] for u, _ in jobs) / 1e6 / seconds,
                "run_id": run_id,
            }
            base = str(output).rstrip("/")
            if png_tiles:
                summary["png_tiles"] = len(out_store.write_png_tiles(store, "overlay"))
            if quicklook:
                out_store.write_quicklook(store, f"{base}/quicklook.png")
                summary["quicklook"] = f"{base}/quicklook.png"
            for name in names:
                out_store.write_geotiff(
                    store, f"{base}/{name}.tif", name, georef=_store_georef(georef),
                    nodata=0 if name == "mask" else float("nan"),
                )
                summary[f"geotiff_{name}"] = f"{base}/{name}.tif"
            lease.check()  # never mark complete a store another run took over
            store.finalize(summary)
            log.info(
                "%s: %d anomalous pixels (%.3f%% of valid), %.1f s, %.2f Mpx/s",
                source.name, anomalous, 100 * summary["anomalous_fraction"], seconds,
                summary["megapixels_per_second"],
            )
            return summary

    # ------------------------------------------------------------------ persistence
    def _config(self) -> dict[str, Any]:
        import torch

        s = self._settings()
        return {
            "params": saved_params(s),
            "threshold": float(self.threshold_),
            "false_alarm_rate": float(self.false_alarm_rate_),
            "intensity": {
                "low": float(self.intensity_.low), "high": float(self.intensity_.high),
                "gray": bool(self.intensity_.gray), "fill": float(self.intensity_.fill),
            },
            "input": {"dtype": self.input_dtype_},
            "backbone": {"name": s["backbone"], "weights_id": self.weights_id_, "layers": list(self.backbone_.dense_stages)},
            "random_state": None if self.random_state_ is None else int(self.random_state_),
            "versions": {"anomaly_dask": _pkg_version("anomaly_dask") if _has_dist() else "dev", "torch": torch.__version__},
        }

    def _tensors(self) -> dict[str, np.ndarray]:
        tensors = {f"dictionary.{k}": v for k, v in self.dictionary_.arrays().items()}
        tensors.update(
            {f"backbone.{k}": v.detach().cpu().numpy() for k, v in self.backbone_.state_dict().items()}
        )
        return tensors

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
        self._check_fitted()
        self.fingerprint_ = write_model(
            path, self._config(), self._tensors(), storage_options or self.storage_options,
            signing_key=signing_key,
        )
        return self.fingerprint_

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
        settings (:data:`~anomaly_dask.params.RUNTIME`: ``client``, ``storage_options``,
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
        import torch

        from .model_file import check_model
        from .params import RUNTIME

        # The caller's own settings are checked first, so that their errors are not
        # blamed on the file (they are ParameterErrors, not ModelFileErrors).
        validate({k: v for k, v in overrides.items() if k in RUNTIME or k not in DEFAULTS})
        _check_device(overrides.get("device"))
        config, tensors, fp = read_model(path, storage_options, trusted_keys=trusted_keys)
        check_model(config, tensors, str(path), runtime={k: v for k, v in overrides.items() if k in RUNTIME})
        stored = {k: v for k, v in config["params"].items() if k not in RUNTIME}
        features = stored.get("features", DEFAULTS["features"])
        params = {**stored, **overrides}
        if storage_options is not None and "storage_options" not in overrides:
            params["storage_options"] = storage_options
        det = cls(**params)
        bb = config["backbone"]
        state = {k[len("backbone."):]: torch.from_numpy(v.copy()) for k, v in tensors.items() if k.startswith("backbone.")}
        det.backbone_ = build_backbone(bb["name"], state, tuple(bb["layers"]), dense_only=features == "dense")
        d = {k[len("dictionary."):]: v for k, v in tensors.items() if k.startswith("dictionary.")}
        det.dictionary_ = Dictionary.from_arrays(d)
        det.threshold_ = float(config["threshold"])
        det.false_alarm_rate_ = float(config["false_alarm_rate"])
        rule = ("threshold_mode", "false_alarm_rate", "cdf", "zscore", "threshold", "auto_threshold")
        if any(k in overrides for k in rule):
            # scores are calibrated: a new rule needs no retraining
            s = det._settings()
            det.threshold_, det.false_alarm_rate_ = decision_rule(
                s["threshold_mode"], s["false_alarm_rate"], s["cdf"], s["zscore"], s["threshold"]
            )
        det.calibration_summary_ = det.dictionary_.calibration.summary()
        intensity = config["intensity"]
        det.intensity_ = Intensity(
            float(intensity["low"]), float(intensity["high"]), intensity["gray"], float(intensity["fill"])
        )
        det.input_dtype_ = config["input"]["dtype"]
        det.weights_id_ = bb["weights_id"]
        det.random_state_ = config["random_state"]
        det.n_components_ = int(det.dictionary_.pca_components.shape[0])
        det.fingerprint_ = fp
        return det


def _check_device(device: str | None) -> None:
    """Refuse a device torch cannot use here, before any cluster, store or training starts.

    Raises
    ------
    ParameterError
        ``cuda`` / ``cuda:<n>`` without that GPU, or ``mps`` without Apple's backend.
    """
    if device in (None, "auto", "cpu"):
        return
    import torch

    if device.startswith("cuda"):
        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
        index = int(device.split(":")[1]) if ":" in device else 0
        if index >= n:
            raise ParameterError(
                f"device={device!r}, but torch sees {n} CUDA GPU(s) here; use device='cpu' or 'auto'"
            )
    elif device == "mps" and not torch.backends.mps.is_available():
        raise ParameterError("device='mps', but Apple's MPS backend is not available here; use 'cpu' or 'auto'")


def _training_dtype(sources: list[ImageSource]) -> str:
    """The pixel type of a training set (``"mixed"`` for several float / signed types).

    Raises
    ------
    ImageReadError
        When 8-bit and 16-bit images are mixed: their values mean different things.
    """
    names = sorted({np.dtype(src.dtype).name for src in sources})
    if len(names) == 1:
        return names[0]
    if {"uint8", "uint16"} & set(names):
        example = {np.dtype(src.dtype).name: src.name for src in sources}
        raise ImageReadError(
            f"training images mix pixel types {names} (e.g. {example}); convert them to one bit "
            f"depth (all 8-bit or all 16-bit) before training"
        )
    return "mixed"


def _at_most(units: list[pipeline.Unit], n: int, rng: np.random.Generator) -> list[pipeline.Unit]:
    """``units``, or a random ``n`` of them in their order when there are more."""
    if len(units) <= n:
        return units
    return [units[i] for i in np.sort(rng.choice(len(units), n, replace=False))]


def _gt_block(gt_source: ImageSource, w: Any, check: Any) -> np.ndarray:
    """The ground-truth window ``w`` as bool (a colour mask counts where any band is set)."""
    block = np.asarray(gt_source.read(w.y0, w.y1, w.x0, w.x1))
    if block.ndim == 3:
        block = block.max(axis=-1)
    try:
        return check(block)
    except GroundTruthError as err:
        raise GroundTruthError(f"{gt_source.name}: {err}") from None


def _gt_block_with_margin(gt_source: ImageSource, w: Any, check: Any, margin: int) -> tuple[np.ndarray, np.ndarray]:
    """Ground truth of window ``w`` and its pixels within ``margin`` of an anomalous pixel,
    the latter from a window read ``margin`` wider (so it does not depend on the chunking)."""
    from types import SimpleNamespace

    from .evaluation import near_anomalies

    y0, x0 = max(0, w.y0 - margin), max(0, w.x0 - margin)
    y1, x1 = min(gt_source.height, w.y1 + margin), min(gt_source.width, w.x1 + margin)
    wide = _gt_block(gt_source, SimpleNamespace(y0=y0, y1=y1, x0=x0, x1=x1), check)
    crop = (slice(w.y0 - y0, w.y1 - y0), slice(w.x0 - x0, w.x1 - x0))
    return wide[crop], near_anomalies(wide, margin)[crop]


def _has_dist() -> bool:
    try:
        _pkg_version("anomaly_dask")
        return True
    except Exception:  # noqa: BLE001
        return False



def _store_georef(georef: dict[str, Any] | None) -> dict[str, Any] | None:
    """The input's georeference in the form :func:`anomaly_dask.store.write_geotiff` takes."""
    if not georef:
        return None
    out = {"transform": georef.get("transform"), "crs_epsg": georef.get("crs_epsg")}
    raw = georef.get("geokeys") or {}
    names = {
        "GeoKeyDirectoryTag": "geokeys", "GeoDoubleParamsTag": "geo_double_params",
        "GeoAsciiParamsTag": "geo_ascii_params", "ModelPixelScaleTag": "model_pixel_scale",
        "ModelTiepointTag": "model_tiepoint", "ModelTransformationTag": "model_transformation",
    }
    for key, value in raw.items():
        if key in names and value is not None:
            out[names[key]] = value
    return out
