"""Quality benchmark: several anomaly detection methods side by side on the same images.

For every case and every method the script trains (timed), scores the test images (timed),
and measures pixel AUROC, AUPRO (up to 30 % false positive rate), F1 at the method's own
threshold, the best F1 over all thresholds, the share of normal pixels marked against the
share requested, and on sonar cases the share marked in the nadir gaps, near swath edges
(within 32 px of no-data) and on open seabed. It prints one Markdown table and writes it,
with a JSON file of every figure, to the work folder.

Cases
-----
A case is a folder ``<case>/train/``, ``val/``, ``test/`` (images) and ``gt/<stem>.png``
(uint8, 255 = anomaly; ``ground_truth/`` is accepted too), optionally ``regions/<stem>.png``
(0 no-data, 1 nadir, 2 swath edge, 3 open seabed) and ``case.json`` (``nodata``, how it was
made). The cases are:

- ``example``: the repository's ``example_dataset``;
- every case folder in ``../shared/real-cases/`` (read in place, never copied);
- five held-out synthetic sidescan surveys (:data:`SONAR_CASES`) rendered with
  :class:`anomaly_dask.datasets.SonarScene` into ``<workdir>/cases/`` as tiled GeoTIFFs with
  no-data 0. Their seabed regimes (ripple wavelength and strength), nadir widths, swath
  widths and line spacings, speckle and pixel types all differ from the scene defaults the
  detector is tuned on; each has anomaly-free training and validation scenes and one test
  scene with targets, all of one survey area (``site``).

Methods
-------
- ``ours``: ``AnomalyDetector(random_state=0)``, trained with ``train(train_dir, val_dir)``,
  scored with ``score_image`` and marked where ``score >= threshold_``;
- variants ``--variant NAME:key=value,key=value`` (values parsed as JSON, else taken as
  strings), e.g. ``--variant k200:kmeans_clusters=200``;
- ``patch``: the paper-faithful per-tile mode (``features='patch'``), slow (about 1.5 kpx/s
  on 2 cores), so only on cases with at most ``--patch-max-pixels`` pixels in all;
- ``patchcore`` and ``padim``: anomalib's models through ``jobs/peers.py`` (see there:
  full resolution by 256 px windows, same backbone and weights as ours, threshold at the
  same false-alarm rate as ours on their own validation scores). Skipped with a note when
  anomalib (the ``[peers]`` extra) is not installed.

Scores are in each method's own units and can spread over many orders of magnitude, so each
run's histograms (``anomaly_dask.evaluation.MetricsAccumulator``, :data:`BINS` bins) are taken
of a strictly increasing map of its scores onto [0, 1] with knots at quantiles of its own test
scores, its threshold and the extent of its validation scores (:class:`RankScale`). The
metrics depend only on score order and on the threshold, so this leaves them unchanged up to
the binning and keeps every bin populated; thresholds are reported in the method's own units.

Timings: the first detector run in a process pays start-up costs, so a small untimed
warm-up run comes first. The machine is shared: compare timings within one run.

Usage::

    python jobs/bench_quality.py [--cases example,mt_blowhole,...] [--methods ours,patchcore]
        [--variant NAME:key=value,...] [--skip-patch] [--patch-max-pixels 2.5e6]
        [--false-alarm-rate 1e-3] [--workdir bench_quality] [--quick]
"""

from __future__ import annotations

import argparse
import json
import platform
import re
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from anomaly_dask import AnomalyDetector
from anomaly_dask.evaluation import MetricsAccumulator
from anomaly_dask.metrics import read_ground_truth
from anomaly_dask.regions import near_anomalies

sys.path.insert(0, str(Path(__file__).resolve().parent))
import peers  # noqa: E402  (jobs/peers.py, next to this script)

ROOT = Path(__file__).resolve().parents[1]
REAL_CASES = ROOT.parent / "shared" / "real-cases"
IMAGE_SUFFIXES = (".png", ".tif", ".tiff", ".jpg", ".jpeg", ".bmp")
BINS = 8192
EDGE_PX = 32  # valid pixels this close to no-data count as swath edge
REGION_KINDS = {1: "nadir", 2: "edge", 3: "seabed"}
DEFAULT_RATE = 1e-3

#: Held-out synthetic sonar surveys: SonarScene settings (all unlike the defaults) and the
#: number of training scenes; seeds are ``seed``, ``seed + 1``, ... for the training scenes,
#: then the validation and the test scene.
SONAR_CASES: dict[str, dict[str, Any]] = {
    "sonar_long_ripples": dict(
        scene=dict(site=301, ripple_wavelength=26.0, ripple_strength=0.55, speckle_looks=1.2),
        seed=3010, n_train=2,
    ),
    "sonar_wide_nadir_u16": dict(
        scene=dict(site=302, dtype="uint16", nadir_width=[24.0, 70.0], swath_halfwidth=380.0,
                   line_spacing=760.0, ripple_wavelength=11.0),
        seed=3020, n_train=2,
    ),
    "sonar_narrow_swaths": dict(
        scene=dict(site=303, swath_halfwidth=240.0, line_spacing=430.0, nadir_width=[3.0, 14.0],
                   ripple_strength=0.2, speckle_looks=0.6),
        seed=3030, n_train=1,
    ),
    "sonar_flat_grainy_u16": dict(
        scene=dict(site=304, dtype="uint16", ripple_strength=0.05, speckle_looks=0.45,
                   swath_halfwidth=520.0, line_spacing=1000.0),
        seed=3040, n_train=2,
    ),
    "sonar_gappy_smooth": dict(
        scene=dict(site=305, line_spacing=820.0, swath_halfwidth=300.0, ripple_wavelength=18.0,
                   ripple_strength=0.4, speckle_looks=2.0),
        seed=3050, n_train=1,
    ),
    # added after the defaults were chosen, to check them on settings nobody tuned on
    "sonar_mid_nadir_u16": dict(
        scene=dict(site=401, dtype="uint16", nadir_width=[10.0, 40.0], swath_halfwidth=450.0,
                   line_spacing=880.0, ripple_wavelength=15.0, speckle_looks=0.8),
        seed=4010, n_train=2,
    ),
    "sonar_strong_ripples": dict(
        scene=dict(site=402, ripple_strength=0.7, ripple_wavelength=30.0, nadir_width=[5.0, 25.0],
                   swath_halfwidth=350.0, line_spacing=640.0),
        seed=4020, n_train=2,
    ),
    "sonar_wide_swaths_u16": dict(
        scene=dict(site=403, dtype="uint16", speckle_looks=1.5, ripple_strength=0.3,
                   swath_halfwidth=600.0, line_spacing=1150.0, nadir_width=[30.0, 55.0]),
        seed=4030, n_train=1,
    ),
}

PEER_METHODS = tuple(peers.PEERS)
BASE_METHODS = ("ours", "patch", *PEER_METHODS)


# ----------------------------------------------------------------------------------------
# Images and cases
# ----------------------------------------------------------------------------------------


def list_images(folder: Path) -> list[Path]:
    """Image files of a folder (not recursive), sorted by name."""
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)


def read_image(path: Path) -> tuple[np.ndarray, float | None]:
    """Pixels of an image file and its no-data value (the TIFF's ``GDAL_NODATA`` tag).

    Parameters
    ----------
    path : pathlib.Path
        PNG/JPEG/BMP (Pillow) or TIFF (tifffile).

    Returns
    -------
    pixels : numpy.ndarray
        (H, W) or (H, W, C); palette images are converted to RGB.
    nodata : float or None
        The no-data value when the file names one.
    """
    if path.suffix.lower() in (".tif", ".tiff"):
        import tifffile

        with tifffile.TiffFile(path) as tf:
            page = tf.pages[0]
            tag = page.tags.get(42113)
            nodata = float(str(tag.value).strip("\x00 ")) if tag is not None else None
            return page.asarray(), nodata
    with Image.open(path) as im:
        if im.mode in ("P", "PA"):
            im = im.convert("RGBA" if "transparency" in im.info or im.mode == "PA" else "RGB")
        return np.asarray(im), None


def image_pixels(path: Path) -> int:
    """Number of pixels of an image file, from its header."""
    if path.suffix.lower() in (".tif", ".tiff"):
        import tifffile

        with tifffile.TiffFile(path) as tf:
            shape = tf.pages[0].shape
            return int(shape[0] * shape[1])
    with Image.open(path) as im:
        return im.size[0] * im.size[1]


@dataclass
class Case:
    """One benchmark case.

    Attributes
    ----------
    name : str
        Case name in the table.
    root : pathlib.Path
        Case folder.
    train, val, test : list of pathlib.Path
        Image files.
    gt : list of pathlib.Path
        Ground truth of each test image, same order.
    regions : list of pathlib.Path or None
        Region label images of the test images (sonar cases), or None.
    nodata : float or None
        No-data value given to the peers (ours reads it from the files).
    meta : dict
        ``case.json`` contents.
    """

    name: str
    root: Path
    train: list[Path]
    val: list[Path]
    test: list[Path]
    gt: list[Path]
    regions: list[Path] | None
    nodata: float | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def train_dir(self) -> Path:
        """Folder of the training images."""
        return self.root / "train"

    @property
    def val_dir(self) -> Path:
        """Folder of the validation images."""
        return self.root / "val"

    @property
    def pixels(self) -> int:
        """Pixels of all training, validation and test images."""
        return sum(image_pixels(p) for p in self.train + self.val + self.test)


def load_case(root: Path, name: str | None = None) -> Case:
    """Read a case folder (``train/``, ``val/``, ``test/``, ``gt/`` or ``ground_truth/``).

    Parameters
    ----------
    root : pathlib.Path
        The case folder.
    name : str, optional
        Name in the table (default: the folder name).

    Returns
    -------
    Case

    Raises
    ------
    FileNotFoundError
        If a folder is missing or empty, or a test image has no ground truth.
    """
    gt_dir = next((root / d for d in ("gt", "ground_truth") if (root / d).is_dir()), None)
    parts = {d: list_images(root / d) for d in ("train", "val", "test")}
    missing = [d for d, files in parts.items() if not files]
    if missing or gt_dir is None:
        raise FileNotFoundError(f"case {root}: no images in {missing or ['gt/']}")
    by_stem = {p.stem: p for p in list_images(gt_dir)}
    lost = [p.name for p in parts["test"] if p.stem not in by_stem]
    if lost:
        raise FileNotFoundError(f"case {root}: no ground truth in {gt_dir} for {lost}")
    regions = None
    if (root / "regions").is_dir():
        regions = [root / "regions" / f"{p.stem}.png" for p in parts["test"]]
        regions = regions if all(r.is_file() for r in regions) else None
    meta = json.loads((root / "case.json").read_text()) if (root / "case.json").is_file() else {}
    return Case(
        name=name or root.name, root=root, train=parts["train"], val=parts["val"], test=parts["test"],
        gt=[by_stem[p.stem] for p in parts["test"]], regions=regions, nodata=meta.get("nodata"), meta=meta,
    )


def region_labels(scene: Any, size: int) -> np.ndarray:
    """uint8 region kinds of a whole scene: 0 no-data, 1 nadir, 2 swath edge, 3 open seabed."""
    from scipy.ndimage import distance_transform_edt

    valid = scene.valid(0, size, 0, size)
    nadir = scene.nadir(0, size, 0, size) & valid
    edge = valid & ~nadir & (distance_transform_edt(valid) <= EDGE_PX)
    labels = np.zeros((size, size), dtype=np.uint8)
    labels[valid] = 3
    labels[edge] = 2
    labels[nadir] = 1
    return labels


def make_sonar_case(folder: Path, name: str, spec: dict[str, Any], size: int, n_train: int | None = None) -> Case:
    """Render one synthetic sonar case into ``folder`` (kept when already made alike).

    Parameters
    ----------
    folder : pathlib.Path
        Parent folder; the case goes to ``folder / name``.
    name : str
        Case name.
    spec : dict
        ``scene`` (SonarScene settings), ``seed`` (first seed) and ``n_train``.
    size : int
        Side of every scene, px.
    n_train : int, optional
        Overrides ``spec["n_train"]``.

    Returns
    -------
    Case
    """
    from anomaly_dask.datasets import SonarScene, write_tiff

    root = folder / name
    n_train = n_train or spec["n_train"]
    settings = {"scene": spec["scene"], "seed": spec["seed"], "n_train": n_train, "size": size, "version": 1}
    stamp = root / "case.json"
    if stamp.is_file() and json.loads(stamp.read_text()).get("settings") == settings:
        return load_case(root)
    scene_kw = {k: tuple(v) if isinstance(v, list) else v for k, v in spec["scene"].items()}
    for sub in ("train", "val", "test", "gt", "regions"):
        (root / sub).mkdir(parents=True, exist_ok=True)
        for old in (root / sub).iterdir():
            old.unlink()
    seed = spec["seed"]
    for k in range(n_train):
        write_tiff(root / "train" / f"train_{k}.tif", SonarScene(size, size, seed + k, n_objects=0, **scene_kw))
    write_tiff(root / "val" / "val.tif", SonarScene(size, size, seed + n_train, n_objects=0, **scene_kw))
    n_objects = max(3, round(8 * size * size / 1024**2))
    test = SonarScene(size, size, seed + n_train + 1, n_objects=n_objects, **scene_kw)
    write_tiff(root / "test" / "test.tif", test)
    Image.fromarray(test.truth(0, size, 0, size).astype(np.uint8) * 255).save(root / "gt" / "test.png")
    labels = region_labels(test, size)
    Image.fromarray(labels).save(root / "regions" / "test.png")
    info = {
        "settings": settings,
        "nodata": 0,
        "kind": "sonar",
        "targets": len(test.targets),
        "regions": {"0": "no-data", **{str(k): v for k, v in REGION_KINDS.items()}},
        "region_pixels": {REGION_KINDS.get(k, "no-data"): int((labels == k).sum()) for k in range(4)},
    }
    stamp.write_text(json.dumps(info, indent=1))
    return load_case(root)


def discover_cases(args: argparse.Namespace) -> list[Case]:
    """The cases to run, in table order: example, real cases, synthetic sonar cases."""
    wanted = set(args.cases.split(",")) if args.cases else None
    cases: list[Case] = []

    def want(name: str) -> bool:
        return wanted is None or name in wanted

    if want("example"):
        cases.append(load_case(ROOT / "example_dataset", "example"))
    real = Path(args.real_cases)
    if real.is_dir():
        for folder in sorted(p for p in real.iterdir() if p.is_dir()):
            if want(folder.name):
                try:
                    cases.append(load_case(folder))
                except FileNotFoundError as err:
                    print(f"note: skipping {folder}: {err}")
    else:
        print(f"note: no real cases at {real}")
    sonar = list(SONAR_CASES)
    if args.quick and wanted is None:
        sonar = sonar[:1]
    for name in sonar:
        if want(name):
            print(f"case {name}: rendering / checking {args.sonar_size} px scenes", flush=True)
            cases.append(make_sonar_case(Path(args.workdir) / "cases", name, SONAR_CASES[name], args.sonar_size))
    if wanted:
        unknown = wanted - {c.name for c in cases}
        if unknown:
            raise SystemExit(f"unknown case(s) {sorted(unknown)}; known: example, real cases in {real}, {sonar}")
    return cases


# ----------------------------------------------------------------------------------------
# Methods
# ----------------------------------------------------------------------------------------


def parse_variant(text: str) -> tuple[str, dict[str, Any]]:
    """Parse ``NAME:key=value,key=value`` (values as JSON when they parse, else strings).

    Commas inside JSON values are kept: a new pair starts only at ``,identifier=``.

    Examples
    --------
    >>> parse_variant('k200:kmeans_clusters=200,layers=["blocks2","blocks3"]')
    ('k200', {'kmeans_clusters': 200, 'layers': ['blocks2', 'blocks3']})
    """
    name, sep, rest = text.partition(":")
    if not sep or not name or not rest:
        raise argparse.ArgumentTypeError(f"--variant {text!r}: expected NAME:key=value[,key=value...]")
    kwargs: dict[str, Any] = {}
    for pair in re.split(r",(?=\s*[A-Za-z_]\w*=)", rest):
        key, eq, value = pair.partition("=")
        if not eq:
            raise argparse.ArgumentTypeError(f"--variant {text!r}: {pair!r} is not key=value")
        try:
            kwargs[key.strip()] = json.loads(value)
        except json.JSONDecodeError:
            kwargs[key.strip()] = value
    return name, kwargs


@dataclass
class Run:
    """What one method gave on one case, before metrics."""

    scores: list[np.ndarray]
    threshold: float
    rate: float | None
    train_s: float
    score_s: float
    calibrated: bool = False
    val_range: tuple[float, float] | None = None
    note: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


def our_rate(det: AnomalyDetector) -> float | None:
    """The share of normal pixels our fitted detector is asked to mark, when it names one."""
    for attr in ("false_alarm_rate_", "false_alarm_rate"):
        value = getattr(det, attr, None)
        if value is not None:
            return float(value)
    return None


def warm_up() -> None:
    """Train and score our detector once on small random images, untimed.

    The first detector run in a process pays one-time costs (imports, the backbone file, the
    local Dask cluster's first start) that later runs do not; paying them here keeps the
    first case's timings comparable with the others'.
    """
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (192, 192), dtype=np.uint8) for _ in range(2)]
    try:
        det = AnomalyDetector(random_state=0, verbose=0, kmeans_clusters=4).train([images[0]], [images[1]])
        det.score_image(images[1])
    except Exception as err:  # noqa: BLE001 - a failed warm-up only costs timing fairness
        print(f"note: warm-up failed ({type(err).__name__}: {err}); the first run's times include start-up")


def run_ours(case: Case, kwargs: dict[str, Any]) -> Run:
    """Train and score our detector with ``AnomalyDetector(**kwargs)``."""
    t0 = time.perf_counter()
    det = AnomalyDetector(**kwargs).train(str(case.train_dir), str(case.val_dir))
    t1 = time.perf_counter()
    scores = [np.asarray(det.score_image(str(p)), dtype=np.float32) for p in case.test]
    t2 = time.perf_counter()
    rate = our_rate(det)
    return Run(scores, float(det.threshold_), rate, t1 - t0, t2 - t1, calibrated=hasattr(det, "false_alarm_rate_"),
               extra={"params": {k: v for k, v in kwargs.items() if k != "verbose"}})


def run_peer(case: Case, name: str, rate: float, quick: bool) -> Run:
    """Fit and score one anomalib peer (see ``jobs/peers.py``)."""
    kw: dict[str, Any] = dict(false_alarm_rate=rate, nodata=case.nodata, seed=0)
    if quick:
        kw["train_stride"] = 128
        if name == "patchcore":
            kw["max_patches"] = 10_000
    peer = peers.PEERS[name](**kw)

    def load(paths: list[Path]) -> list[np.ndarray]:
        out = []
        for p in paths:
            pixels, nodata = read_image(p)
            if peer.nodata is None and nodata is not None:
                peer.nodata = nodata
            out.append(pixels)
        return out

    train, val = load(case.train), load(case.val)
    t0 = time.perf_counter()
    peer.fit(train, val)
    t1 = time.perf_counter()
    scores = [peer.score(read_image(p)[0]) for p in case.test]
    t2 = time.perf_counter()
    extra = {"train_windows": peer.train_windows}
    for attr in ("bank_patches", "coreset_patches"):
        if hasattr(peer, attr):
            extra[attr] = getattr(peer, attr)
    return Run(scores, peer.threshold, rate, t1 - t0, t2 - t1, val_range=peer.val_range, note=peer.note, extra=extra)


# ----------------------------------------------------------------------------------------
# Metrics and table
# ----------------------------------------------------------------------------------------


class RankScale:
    """A monotone map of one run's scores onto [0, 1] with about equal pixel counts per bin.

    Scores are in each method's own units and their spread can be extreme (calibrated
    tails reach 1e5 and more while most pixels lie below 3), so fixed-width bins between the
    minimum and the maximum can put nearly every pixel in one bin and tie normal with
    anomalous pixels. Every reported metric (AUROC, AUPRO, F1 at the threshold, best F1, the
    shares marked) depends only on the order of the scores and on which side of the
    threshold they fall, so the histograms are taken of this strictly increasing map
    instead: knots at ``BINS + 1`` quantiles of the run's test scores, its threshold and the
    extent of its validation scores, linear between knots.

    Parameters
    ----------
    run : Run
        The run whose scores are mapped.
    """

    def __init__(self, run: Run) -> None:
        finite = np.concatenate([s[np.isfinite(s)].astype(np.float64) for s in run.scores])
        rng = np.random.default_rng(0)
        if finite.size > 4_000_000:
            finite = rng.choice(finite, 4_000_000, replace=False)
        extra = [run.threshold, *(run.val_range or ())]
        quantiles = np.quantile(finite, np.linspace(0.0, 1.0, BINS + 1)) if finite.size else np.zeros(0)
        self.knots = np.unique(np.concatenate([quantiles, np.asarray(extra, dtype=np.float64)]))
        self.knots = self.knots[np.isfinite(self.knots)]
        if self.knots.size < 2:  # constant scores: any increasing map will do
            base = float(self.knots[0]) if self.knots.size else 0.0
            self.knots = np.array([base, base + 1.0])
        self.units = np.linspace(0.0, 1.0, self.knots.size)
        self.lo, self.hi = float(self.knots[0]), float(self.knots[-1])

    def __call__(self, scores: np.ndarray) -> np.ndarray:
        """Mapped scores (float64), NaN kept."""
        out = np.full(scores.shape, np.nan)
        ok = np.isfinite(scores)
        out[ok] = np.interp(scores[ok].astype(np.float64), self.knots, self.units)
        return out

    def back(self, value: float | None) -> float | None:
        """A mapped value in the run's own score units."""
        return None if value is None else float(np.interp(value, self.units, self.knots))


def evaluate(case: Case, run: Run) -> dict[str, Any]:
    """Pixel metrics of a run (``anomaly_dask.evaluation``) and marked shares per region kind.

    Histograms are taken of :class:`RankScale`-mapped scores; ``lo``, ``hi``,
    ``threshold`` and ``best_threshold`` are reported in the run's own units.
    """
    scale = RankScale(run)
    acc = MetricsAccumulator(float(scale(np.array([run.threshold]))[0]), lo=0.0, hi=1.0, bins=BINS)
    kinds = {name: [0, 0] for name in REGION_KINDS.values()}
    nodata_marked = 0
    for k, (scores, gt_path, test_path) in enumerate(zip(run.scores, case.gt, case.test)):
        gt = read_ground_truth(np.asarray(Image.open(gt_path).convert("L")))
        if gt.shape != scores.shape:
            raise ValueError(f"{case.name}/{test_path.name}: scores {scores.shape} vs ground truth {gt.shape}")
        near = near_anomalies(gt)  # beside a target: shares its tiles, not a false alarm of the seabed
        acc.add(scale(scores), gt, image=test_path.name, near=near)
        marked = np.isfinite(scores) & (scores >= run.threshold)
        if case.regions is not None:
            labels = np.asarray(Image.open(case.regions[k]))
            nodata_marked += int((marked & (labels == 0)).sum())
            for code, name in REGION_KINDS.items():
                sel = (labels == code) & ~gt & ~near
                kinds[name][0] += int(marked[sel].sum())
                kinds[name][1] += int(sel.sum())
    metrics = acc.result()
    metrics.update(lo=scale.lo, hi=scale.hi, threshold=run.threshold, best_threshold=scale.back(metrics.get("best_threshold")),
                   score_scale="rank (RankScale)")
    for image in metrics.get("images", {}).values():
        image["threshold"] = run.threshold
        image["best_threshold"] = scale.back(image.get("best_threshold"))
    if case.regions is not None:
        metrics["regions_marked"] = {n: (m / t if t else None) for n, (m, t) in kinds.items()}
        metrics["region_normal_pixels"] = {n: t for n, (_, t) in kinds.items()}
        metrics["nodata_marked_pixels"] = nodata_marked
    return metrics


def fmt(value: Any, digits: int = 4) -> str:
    """A table cell: numbers rounded, missing as an en dash."""
    if value is None or (isinstance(value, float) and not np.isfinite(value)):
        return "–"
    if isinstance(value, float):
        if 0 < abs(value) < 10 ** -(digits - 1):
            return f"{value:.1e}"
        return f"{value:.{digits}f}"
    return str(value)


COLUMNS = ("case", "method", "AUROC", "AUPRO", "F1", "best F1", "normal marked", "far marked", "requested rate",
           "nadir marked", "edge marked", "seabed marked", "train s", "score s")


def table(rows: list[dict[str, Any]]) -> str:
    """The Markdown table of all finished rows."""
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for r in rows:
        m = r.get("metrics") or {}
        reg = m.get("regions_marked") or {}
        if r.get("error"):
            cells = [r["case"], r["method"], f"failed: {r['error'][:80]}"] + [""] * (len(COLUMNS) - 3)
        else:
            cells = [
                r["case"], r["method"], fmt(m.get("auroc")), fmt(m.get("aupro")), fmt(m.get("f1"), 3),
                fmt(m.get("best_f1"), 3), fmt(m.get("normal_marked")), fmt(m.get("normal_marked_far")),
                fmt(r.get("rate")),
                fmt(reg.get("nadir")), fmt(reg.get("edge")), fmt(reg.get("seabed")),
                f"{r['train_s']:.0f}", f"{r['score_s']:.1f}",
            ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _json_default(value: Any) -> Any:
    """JSON for numpy scalars and arrays, paths and tuples; anything else as its string."""
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    return str(value)


def versions() -> dict[str, str]:
    """Versions of the libraries behind the figures."""
    import importlib.metadata as md

    out = {"python": platform.python_version()}
    for pkg in ("anomaly_dask", "torch", "timm", "anomalib", "numpy", "scikit-learn"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            out[pkg] = "not installed"
    return out


# ----------------------------------------------------------------------------------------
# Main
# ----------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options (see the module docstring)."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cases", default="", help="comma-separated case names (default: all)")
    p.add_argument("--methods", default="", help=f"comma-separated subset of {', '.join(BASE_METHODS)} and variant names")
    p.add_argument("--variant", action="append", default=[], type=parse_variant, metavar="NAME:key=value,...",
                   help="a named AnomalyDetector variant (repeatable); values parsed as JSON")
    p.add_argument("--skip-patch", action="store_true", help="never run the per-tile 'patch' method")
    p.add_argument("--patch-max-pixels", type=float, default=None,
                   help="run 'patch' only on cases with at most this many pixels in all (default 2.5e6; --quick 3e5)")
    p.add_argument("--false-alarm-rate", type=float, default=None,
                   help="share of normal pixels to mark, for every method (default: our detector's default, else 1e-3)")
    p.add_argument("--sonar-size", type=int, default=None, help="side of the synthetic scenes (default 1024; --quick 512)")
    p.add_argument("--real-cases", default=str(REAL_CASES), help="folder of real cases")
    p.add_argument("--workdir", default=None, help="work folder (default bench_quality; --quick bench_quality/quick)")
    p.add_argument("--quick", action="store_true",
                   help="smoke run: 512 px sonar scenes and only the first sonar case unless --cases, "
                        "light peer settings, patch method only under 0.3 Mpx")
    args = p.parse_args(argv)
    args.workdir = args.workdir or str(ROOT / ("bench_quality/quick" if args.quick else "bench_quality"))
    args.sonar_size = args.sonar_size or (512 if args.quick else 1024)
    if args.patch_max_pixels is None:
        args.patch_max_pixels = 3e5 if args.quick else 2.5e6
    return args


def main(argv: list[str] | None = None) -> None:
    """Run every method on every case and print / write the table."""
    args = parse_args(argv)
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    variants = dict(args.variant)
    clash = set(variants) & set(BASE_METHODS)
    if clash:
        raise SystemExit(f"variant names {sorted(clash)} clash with built-in methods")
    methods = [m for m in args.methods.split(",") if m] or [*BASE_METHODS[:1], *variants, *BASE_METHODS[1:]]
    unknown = set(methods) - set(BASE_METHODS) - set(variants)
    if unknown:
        raise SystemExit(f"unknown method(s) {sorted(unknown)}; choose from {list(BASE_METHODS) + list(variants)}")
    have_peers = peers.available()
    if not have_peers and any(m in PEER_METHODS for m in methods):
        print("note: anomalib is not installed (pip install -e '.[peers]'): skipping patchcore and padim")
        methods = [m for m in methods if m not in PEER_METHODS]
    rate = args.false_alarm_rate
    if rate is None:
        rate = AnomalyDetector().get_params().get("false_alarm_rate") or DEFAULT_RATE
    rate = float(rate)
    cases = discover_cases(args)
    print(f"cases: {[c.name for c in cases]}; methods: {methods}; false-alarm rate {rate:g}", flush=True)

    if any(m not in PEER_METHODS for m in methods):
        warm_up()
    rows: list[dict[str, Any]] = []
    notes: dict[str, str] = {}
    for case in cases:
        pixels = case.pixels
        for method in methods:
            label = f"{case.name} / {method}"
            if method == "patch" and (args.skip_patch or pixels > args.patch_max_pixels):
                why = "--skip-patch" if args.skip_patch else f"{pixels / 1e6:.2f} Mpx > --patch-max-pixels {args.patch_max_pixels / 1e6:.2f}"
                print(f"note: {label}: skipped ({why})")
                notes[f"{case.name}/patch"] = f"skipped: {why}"
                continue
            print(f"{label}: running", flush=True)
            row: dict[str, Any] = {"case": case.name, "method": method}
            try:
                if method in PEER_METHODS:
                    run = run_peer(case, method, rate, args.quick)
                    if run.note:
                        notes[method] = run.note
                else:
                    kw: dict[str, Any] = {"random_state": 0, "verbose": 0}
                    if method == "patch":
                        kw["features"] = "patch"
                    kw.update(variants.get(method, {}))
                    if args.false_alarm_rate is not None and "false_alarm_rate" in AnomalyDetector().get_params():
                        kw.setdefault("false_alarm_rate", rate)
                    run = run_ours(case, kw)
                metrics = evaluate(case, run)
                row.update(rate=run.rate, threshold=run.threshold, calibrated=run.calibrated, train_s=run.train_s,
                           score_s=run.score_s, metrics=metrics, extra=run.extra)
                if metrics.get("nodata_marked_pixels"):
                    print(f"WARNING: {label}: {metrics['nodata_marked_pixels']} no-data pixels marked")
                print(f"{label}: AUROC {fmt(metrics.get('auroc'))}, AUPRO {fmt(metrics.get('aupro'))}, "
                      f"normal marked {fmt(metrics.get('normal_marked'))}, train {run.train_s:.0f} s, "
                      f"score {run.score_s:.1f} s", flush=True)
            except Exception as err:  # noqa: BLE001 - one failure must not end a long benchmark
                traceback.print_exc()
                row["error"] = f"{type(err).__name__}: {err}"
            rows.append(row)
            write_outputs(workdir, args, rate, cases, rows, notes)
    text = write_outputs(workdir, args, rate, cases, rows, notes)
    print()
    print(text)


def write_outputs(workdir: Path, args: argparse.Namespace, rate: float, cases: list[Case],
                  rows: list[dict[str, Any]], notes: dict[str, str]) -> str:
    """Write ``results.md`` and ``results.json`` (after every run, so a stopped run keeps its rows)."""
    text = table(rows)
    if notes:
        text += "\n\n" + "\n".join(f"- {k}: {v}" for k, v in sorted(notes.items()))
    text += (f"\n\nRequested rate: share of normal pixels each method is asked to mark ({rate:g} for the "
             "peers: their threshold is that quantile of their own validation pixel scores). Region "
             f"columns: share of normal pixels marked in nadir gaps, within {EDGE_PX} px of no-data "
             "(swath edges) and on other seabed (sonar cases), leaving out pixels within 32 px of a "
             "target. Far marked: share of normal pixels more than 32 px (one tile) from any anomalous "
             "pixel that are marked; pixels closer share tiles with the anomaly.\n")
    (workdir / "results.md").write_text(text)
    payload = {
        "args": {k: v for k, v in vars(args).items() if k != "variant"},
        "variants": dict(args.variant),
        "false_alarm_rate": rate,
        "versions": versions(),
        "cases": {c.name: {"root": str(c.root), "train": len(c.train), "val": len(c.val), "test": len(c.test),
                           "meta": c.meta} for c in cases},
        "notes": notes,
        "rows": rows,
    }
    (workdir / "results.json").write_text(json.dumps(payload, indent=1, default=_json_default))
    return text


if __name__ == "__main__":
    main()
