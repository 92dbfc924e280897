"""Benchmark: raw CNN trunk vs end-to-end ``detect`` vs the seed's method, in one run.

On one synthetic sonar GeoTIFF (``--size`` x ``--size``, default 2048) it measures:

1. **Raw trunk** px/s with torch and with OpenVINO: ``dense_maps(backbone, x, runtime)``
   timed (best of ``--repeats`` after a warm-up, torch at ``--threads`` threads) on exactly
   the network inputs the default chunks of this image feed the trunk. The input shape of
   every chunk is derived as :meth:`anomaly_dask.scoring.Extractor._read` derives its
   window (tiles covering the chunk plus the edge reach, the backbone halo, the lattice,
   then the ``upsample`` magnification) and checked against the shape seen by
   instrumenting one chunk. Rates are in *image* pixels of the chunks (a 1024 px chunk
   counts 1024^2 per forward), so they compare with detect's. An interior chunk of a
   large mosaic (halo on every side) is timed as well.
2. **End-to-end ``detect``** px/s at the defaults (``quicklook``, contacts, pyramid), with
   ``runtime="torch"`` and ``runtime="auto"``, on each cluster layout of ``--layouts``,
   each in a fresh process: a first (cold) call into a fresh store, then a second (warm)
   call into another fresh store. The whole call is timed (exports included). The
   ``default`` layout, when in ``--layouts``, is the one reported as "detect" (else the
   layout with the best warm rate); peak resident memory of each child is printed too.
3. The ratio detect / raw trunk for the chosen runtime (the target is >= 0.8).
4. **The seed's method**: per-tile ResNet-18 on 32 px tiles at stride 8, each tile
   resized to 320 px, global-average-pooled (``features="patch"``), scored with
   ``score_image`` on a ``--seed-crop`` crop. Its rate on a large image is extrapolated
   per tile (each tile adds ``stride^2`` = 64 px of a large image); the crop's own rate
   (border tiles cover fewer pixels) is printed too.
5. **Training time**: the detect model is trained on a ``size/2 x size`` mosaic with a
   ``size/4 x size`` validation mosaic; a second model on a ``size x size`` mosaic with a
   ``size/2 x size`` validation mosaic, timed against the detect time of the
   ``size x size`` test image (the target is train / detect <= 1.5).

Cluster layouts (``--layouts``, comma-separated):

- ``default``: the in-process LocalCluster ``detect`` starts by itself when given no
  client (1 worker x :func:`~anomaly_dask.compute.default_task_threads` task threads,
  the cores shared among them), started here before the timing, so that its start-up
  is not counted.
- ``1x1``: an in-process LocalCluster of 1 worker x 1 task thread, torch (and OpenVINO)
  using all cores inside the task (the default before 2026-12).
- ``1x2``: a LocalCluster of 1 worker process x 2 task threads, 1 torch thread each.
- ``1x2t2``: the same with 2 torch threads per task thread (oversubscribed).
- ``1x2i``: an in-process LocalCluster of 1 worker x 2 task threads, 1 torch thread each.

Usage::

    python jobs/bench_speed.py [--size 2048] [--skip-seed] [--skip-train] [--model PATH]
        [--layouts default,1x1,1x2] [--workdir bench_out_speed]

``--skip-train`` skips the timed ``size x size`` training (step 5); the detect model is
still trained unless ``--model`` names one. Prints a table, then one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]

#: Cluster layouts: (task threads, torch threads per task thread or None for all cores, processes)
LAYOUTS = {"default": (0, None, False), "1x1": (1, None, False), "1x2i": (2, 1, False), "1x2": (2, 1, True), "1x2t2": (2, 2, True)}


# --------------------------------------------------------------------------- children
def _client(layout: str, stack: Any) -> Any:
    """A client for ``layout`` (entered on ``stack``)."""
    threads, torch_threads, processes = LAYOUTS[layout]
    if not threads:
        from anomaly_dask.compute import default_task_threads

        threads = default_task_threads()
    if processes:
        from anomaly_dask.compute import connect

        return stack.enter_context(connect(workers=1, threads_per_worker=threads, torch_threads=torch_threads))
    from distributed import Client, LocalCluster

    cluster = stack.enter_context(
        LocalCluster(n_workers=1, threads_per_worker=threads, processes=False, dashboard_address=":0")
    )
    return stack.enter_context(Client(cluster))


def _fresh(directory: Path) -> Path:
    """An empty directory (removed first when it exists)."""
    shutil.rmtree(directory, ignore_errors=True)
    directory.mkdir(parents=True)
    return directory


def child_train(spec: dict[str, Any]) -> dict[str, Any]:
    """Train a default model in this (fresh) process; seconds of the ``train`` call."""
    import contextlib

    from anomaly_dask import AnomalyDetector

    with contextlib.ExitStack() as stack:
        client = _client(spec["layout"], stack)
        ad = AnomalyDetector(random_state=0, verbose=0, client=client)
        t0 = time.perf_counter()
        ad.train(spec["train"], spec["val"])
        seconds = time.perf_counter() - t0
    if spec.get("model"):
        ad.save(spec["model"])
    return {"seconds": seconds}


def child_detect(spec: dict[str, Any]) -> dict[str, Any]:
    """A cold then a warm ``detect`` at the defaults, each into a fresh store."""
    import contextlib

    from anomaly_dask import AnomalyDetector

    out: dict[str, Any] = {}
    with contextlib.ExitStack() as stack:
        client = _client(spec["layout"], stack)
        ad = AnomalyDetector.load(spec["model"], runtime=spec["runtime"], verbose=0, client=client)
        for run in ("cold", "warm"):
            work = _fresh(Path(spec["workdir"]) / run)
            t0 = time.perf_counter()
            summary = ad.detect(spec["image"], str(work / "out.zarr"))
            wall = time.perf_counter() - t0
            out[run] = {"seconds": wall, "scoring_seconds": summary["seconds"], "chunks": summary["chunks"],
                        "contacts": summary.get("contacts"), "anomalous_fraction": summary["anomalous_fraction"]}
    out["peak_rss_mib"] = peak_rss_mib()
    return out


def peak_rss_mib() -> float:
    """Peak resident memory (MiB) of this process, plus the largest peak of its ended
    children when it started any (a LocalCluster's worker processes, once the cluster is
    closed): an upper bound of what the two held at once."""
    import resource

    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return (own + children) / 1024


def run_child(kind: str, spec: dict[str, Any]) -> dict[str, Any]:
    """Run :func:`child_train` or :func:`child_detect` in a fresh Python process."""
    proc = subprocess.run(
        [sys.executable, __file__, "--child", kind, json.dumps(spec)], capture_output=True, text=True,
        cwd=ROOT,
    )
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr[-4000:])
        raise SystemExit(f"child {kind} {spec} failed (exit {proc.returncode})")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# --------------------------------------------------------------------------- raw trunk
def trunk_input_shape(extractor: Any, unit: Any) -> tuple[int, int]:
    """Network input (height, width) of one chunk, derived as ``Extractor._read`` does for
    :meth:`~anomaly_dask.scoring.Extractor.pixel_scores` (tiles covering the chunk plus the
    edge reach, backbone halo and lattice), times the ``upsample`` magnification."""
    from anomaly_dask.grid import tiles_covering
    from anomaly_dask.scoring import _axis_window

    w, g = unit.window, unit.grid
    reach = extractor.edge_reach(g)
    ext = (max(0, w.y0 - reach), min(g.height, w.y1 + reach), max(0, w.x0 - reach), min(g.width, w.x1 + reach))
    rows, cols = tiles_covering(g, ext)
    cfg, bb = extractor.config, extractor.backbone
    lattice, halo = cfg.lattice(bb), cfg.halo(bb)
    y0, y1, _ = _axis_window(*rows, g.stride_h, g.tile_h, halo, lattice)
    x0, x1, _ = _axis_window(*cols, g.stride_w, g.tile_w, halo, lattice)
    return (y1 - y0) * cfg.upsample, (x1 - x0) * cfg.upsample


def instrumented_shape(extractor: Any, dictionary: Any, unit: Any) -> tuple[int, int]:
    """The trunk input shape actually seen while scoring one chunk (``dense_maps`` wrapped)."""
    from anomaly_dask import features

    seen: list[tuple[int, int]] = []
    original = features.dense_maps

    def spy(backbone: Any, x: Any, runtime: str) -> Any:
        seen.append(tuple(x.shape[2:]))
        return original(backbone, x, runtime)

    features.dense_maps = spy
    try:
        extractor.pixel_scores(unit, dictionary, 1)
    finally:
        features.dense_maps = original
    assert len(seen) == 1, seen
    return seen[0]


def time_trunk(backbone: Any, shape: tuple[int, int], runtime: str, repeats: int) -> float:
    """Best seconds of ``repeats`` forwards of the trunk on a (1, 3, *shape) input, after a warm-up."""
    import torch

    from anomaly_dask.runtimes import dense_maps

    x = torch.randn(1, 3, *shape, generator=torch.Generator().manual_seed(0))
    best = float("inf")
    with torch.inference_mode():
        dense_maps(backbone, x, runtime)  # warm-up (and, for OpenVINO, conversion)
        for _ in range(repeats):
            t0 = time.perf_counter()
            dense_maps(backbone, x, runtime)
            best = min(best, time.perf_counter() - t0)
    return best


def raw_trunk(model: str, image: str, threads: int, repeats: int) -> dict[str, Any]:
    """Raw trunk rates (image px/s) of both runtimes on this image's chunks and on an interior chunk."""
    import torch

    from anomaly_dask import AnomalyDetector
    from anomaly_dask.grid import TileGrid
    from anomaly_dask.scoring import Unit, plan_units

    torch.set_num_threads(threads)
    out: dict[str, Any] = {"threads": threads}
    for runtime in ("torch", "openvino"):
        ad = AnomalyDetector.load(model, runtime=runtime, verbose=0)
        s = ad._settings()
        extractor = ad._extractor(s)
        source, grid = ad._open(image, s)
        chunk = s["chunk_size"]
        units = plan_units(source, grid, chunk)
        shapes = [trunk_input_shape(extractor, u) for u in units]
        seen = instrumented_shape(extractor, ad.dictionary_, units[0])
        if seen != shapes[0]:
            raise SystemExit(f"derived trunk input {shapes[0]} != instrumented {seen}")
        big = TileGrid(3 * chunk, 3 * chunk, grid.tile_h, grid.tile_w, grid.stride_h, grid.stride_w)
        centre = plan_units(source, big, chunk)[4]
        interior = trunk_input_shape(extractor, Unit(source, big, centre.window))
        times = {sh: time_trunk(extractor.backbone, sh, runtime, repeats) for sh in set(shapes) | {interior}}
        pixels = sum(u.window.shape[0] * u.window.shape[1] for u in units)
        out[runtime] = {
            "chunk_inputs": {f"{h}x{w}": n for (h, w), n in Counter(shapes).items()},
            "instrumented": f"{seen[0]}x{seen[1]}",
            "image_px_per_s": pixels / sum(times[sh] for sh in shapes),
            "interior_input": f"{interior[0]}x{interior[1]}",
            "interior_px_per_s": chunk * chunk / times[interior],
            "seconds": {f"{h}x{w}": t for (h, w), t in times.items()},
        }
    return out


# --------------------------------------------------------------------------- seed
def seed_rate(train: str, crop_side: int, threads: int) -> dict[str, Any]:
    """The seed's per-tile ResNet-18 (patch mode, 320 px) on a crop, and its large-image rate."""
    import tifffile
    import torch

    from anomaly_dask import AnomalyDetector, WeightsNotFoundError

    torch.set_num_threads(threads)
    pixels = tifffile.imread(train)
    common = dict(features="patch", backbone="resnet18", patch_size=320, tile=32, stride=8,
                  kmeans_clusters=10, random_state=0, verbose=0, device="cpu")
    weights = "imagenet"
    fit = (pixels[256:320, 512:640], pixels[320:384, 512:640])  # 64 x 128 px each, on data
    try:
        ad = AnomalyDetector(**common).train(*fit)
    except WeightsNotFoundError:
        weights = None
        ad = AnomalyDetector(weights=None, **common).train(*fit)
    crop = pixels[256 : 256 + crop_side, 512 : 512 + crop_side]
    t0 = time.perf_counter()
    ad.score_image(crop[:32, :32])  # warm-up: one tile
    warm = time.perf_counter() - t0
    t0 = time.perf_counter()
    ad.score_image(crop)
    seconds = time.perf_counter() - t0
    n_tiles = ((crop_side - 32) // 8 + 1) ** 2
    return {
        "weights": weights or "random", "crop": crop_side, "tiles": n_tiles, "seconds": seconds,
        "one_tile_seconds": warm, "crop_px_per_s": crop_side**2 / seconds,
        "px_per_s": 8 * 8 * n_tiles / seconds,
    }


# --------------------------------------------------------------------------- main
def main() -> None:
    """Run the benchmark, print the table and the JSON line."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", type=int, default=2048, help="test image side in px (default 2048)")
    p.add_argument("--workdir", type=Path, default=ROOT / "bench_out_speed")
    p.add_argument("--skip-seed", action="store_true", help="do not time the seed's method")
    p.add_argument("--skip-train", action="store_true", help="do not time training on a size x size mosaic")
    p.add_argument("--model", default=None, help="detect with this model instead of training one")
    p.add_argument("--layouts", default="default,1x1,1x2", help=f"cluster layouts to try, of {', '.join(LAYOUTS)}")
    p.add_argument("--runtimes", default="torch,auto", help="runtimes to detect with, of torch and auto")
    p.add_argument("--threads", type=int, default=2, help="torch threads of the raw trunk (the worker budget)")
    p.add_argument("--repeats", type=int, default=3, help="raw trunk: best of this many forwards")
    p.add_argument("--seed-crop", type=int, default=64, help="seed method: side of the crop scored")
    p.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        kind, spec = args.child
        print(json.dumps({"train": child_train, "detect": child_detect}[kind](json.loads(spec))))
        return
    layouts = args.layouts.split(",")
    unknown = [x for x in layouts if x not in LAYOUTS]
    if unknown:
        p.error(f"unknown layout(s) {unknown}; choose from {', '.join(LAYOUTS)}")

    from anomaly_dask.datasets import SonarScene, write_tiff
    from anomaly_dask.runtimes import openvino_installed

    t_start = time.perf_counter()
    n = args.size
    work = args.workdir
    work.mkdir(parents=True, exist_ok=True)

    def mosaic(name: str, h: int, w: int, seed: int, n_objects: int | None = 0) -> str:
        path = work / f"{name}_{h}x{w}.tif"
        if not path.exists():
            write_tiff(str(path), SonarScene(h, w, seed=seed, n_objects=n_objects, site=23))
        return str(path)

    image = mosaic("test", n, n, 23, None)
    small = (mosaic("train", n // 2, n, 21), mosaic("val", n // 4, n, 22))
    print(f"mosaics written ({time.perf_counter() - t_start:.0f} s); cpus {os.cpu_count()}, "
          f"openvino {'installed' if openvino_installed() else 'missing'}", flush=True)
    res: dict[str, Any] = {"size": n, "cpus": os.cpu_count()}

    model = args.model
    if model is None:
        model = str(work / "model.safetensors")
        r = run_child("train", {"layout": "default", "train": small[0], "val": small[1], "model": model})
        res["train_small"] = {"seconds": r["seconds"], "mosaics": f"{n // 2}x{n} + {n // 4}x{n}", "layout": "default"}
        print(f"trained the detect model on {n // 2}x{n} + {n // 4}x{n} in {r['seconds']:.1f} s", flush=True)

    res["trunk"] = raw_trunk(model, image, args.threads, args.repeats)
    for rt in ("torch", "openvino"):
        t = res["trunk"][rt]
        print(f"raw trunk {rt}: inputs {t['chunk_inputs']} -> {t['image_px_per_s']:,.0f} px/s; "
              f"interior {t['interior_input']} -> {t['interior_px_per_s']:,.0f} px/s", flush=True)

    res["detect"] = {}
    for layout in layouts:
        for runtime in args.runtimes.split(","):
            r = run_child("detect", {"layout": layout, "runtime": runtime, "model": model, "image": image,
                                     "workdir": str(work / f"detect_{layout}_{runtime}")})
            for run in ("cold", "warm"):
                r[run]["px_per_s"] = n * n / r[run]["seconds"]
            res["detect"][f"{layout}/{runtime}"] = r
            print(f"detect {layout} runtime={runtime}: cold {r['cold']['seconds']:.1f} s, warm "
                  f"{r['warm']['seconds']:.1f} s = {r['warm']['px_per_s']:,.0f} px/s; peak RSS "
                  f"{r['peak_rss_mib']:,.0f} MiB", flush=True)
    auto = "openvino" if openvino_installed() else "torch"
    # the defaults when measured, else the fastest layout measured
    best = "default/auto" if "default/auto" in res["detect"] else max(
        (k for k in res["detect"] if k.endswith("/auto")), key=lambda k: res["detect"][k]["warm"]["px_per_s"])
    best_layout = best.split("/")[0]
    chosen = res["detect"][best]["warm"]
    res["chosen"] = {"layout": best_layout, "runtime": "auto", "resolved": auto}
    res["detect_vs_trunk"] = chosen["px_per_s"] / res["trunk"][auto]["image_px_per_s"]
    if f"{best_layout}/torch" in res["detect"]:
        res["detect_vs_trunk_torch"] = (
            res["detect"][f"{best_layout}/torch"]["warm"]["px_per_s"] / res["trunk"]["torch"]["image_px_per_s"]
        )

    if not args.skip_train:
        big = (mosaic("train", n, n, 31), mosaic("val", n // 2, n, 32))
        r = run_child("train", {"layout": best_layout, "train": big[0], "val": big[1]})
        res["train_large"] = {"seconds": r["seconds"], "mosaics": f"{n}x{n} + {n // 2}x{n}", "layout": best_layout,
                              "vs_detect_warm": r["seconds"] / chosen["seconds"],
                              "vs_detect_cold": r["seconds"] / res["detect"][best]["cold"]["seconds"]}
        print(f"trained on {n}x{n} + {n // 2}x{n} in {r['seconds']:.1f} s", flush=True)

    if not args.skip_seed:
        res["seed"] = seed_rate(small[0], args.seed_crop, args.threads)
        res["detect_vs_seed"] = chosen["px_per_s"] / res["seed"]["px_per_s"]
        res["detect_vs_seed_crop"] = chosen["px_per_s"] / res["seed"]["crop_px_per_s"]
        print(f"seed method: {res['seed']['seconds']:.1f} s for {res['seed']['tiles']} tiles", flush=True)
    res["total_seconds"] = time.perf_counter() - t_start
    print_table(res, layouts)
    print(json.dumps(res, default=float))


def print_table(res: dict[str, Any], layouts: list[str]) -> None:
    """The figures of one run as a plain table."""
    n = res["size"]
    auto = res["chosen"]["resolved"]
    best = res["chosen"]["layout"]
    rows: list[tuple[str, str, str]] = []
    tr = res["trunk"]
    for rt in ("torch", "openvino"):
        t = tr[rt]
        inputs = ", ".join(f"{k} x{v}" for k, v in t["chunk_inputs"].items())
        rows.append((f"raw trunk, {rt}", f"{t['image_px_per_s']:,.0f} px/s",
                     f"{n}^2 chunks' inputs {inputs}; best of 3, {tr['threads']} threads"))
        rows.append((f"raw trunk, {rt}, interior chunk", f"{t['interior_px_per_s']:,.0f} px/s",
                     f"input {t['interior_input']} (halo on every side)"))
    for layout in layouts:
        for runtime in ("torch", "auto"):
            if f"{layout}/{runtime}" not in res["detect"]:
                continue
            d = res["detect"][f"{layout}/{runtime}"]
            label = f"detect {layout}, runtime={runtime}" + (f" ({auto})" if runtime == "auto" else "")
            rows.append((label, f"{d['warm']['px_per_s']:,.0f} px/s",
                         f"warm {d['warm']['seconds']:.1f} s (scoring {d['warm']['scoring_seconds']:.1f} s), "
                         f"cold {d['cold']['seconds']:.1f} s = {d['cold']['px_per_s']:,.0f} px/s; "
                         f"peak RSS {d['peak_rss_mib']:,.0f} MiB"))
    chosen = res["detect"][f"{best}/auto"]["warm"]
    rows.append(("detect (chosen)", f"{chosen['px_per_s']:,.0f} px/s", f"layout {best}, runtime=auto ({auto})"))
    rows.append(("detect / raw trunk", f"{res['detect_vs_trunk']:.2f}", f"{auto}, layout {best} (target >= 0.8)"))
    if "detect_vs_trunk_torch" in res:
        rows.append(("detect / raw trunk, torch", f"{res['detect_vs_trunk_torch']:.2f}", f"layout {best}"))
    if "seed" in res:
        sd = res["seed"]
        rows.append(("seed method (large image)", f"{sd['px_per_s']:,.1f} px/s",
                     f"ResNet-18 ({sd['weights']} weights), {sd['tiles']} tiles x 64 px in {sd['seconds']:.1f} s"))
        rows.append(("seed method (crop itself)", f"{sd['crop_px_per_s']:,.1f} px/s",
                     f"{sd['crop']}x{sd['crop']} crop; one tile took {sd['one_tile_seconds']:.1f} s"))
        rows.append(("detect / seed", f"{res['detect_vs_seed']:,.0f}x",
                     f"target >= 2000x; vs the crop's own rate {res['detect_vs_seed_crop']:,.0f}x"))
    if "train_small" in res:
        ts = res["train_small"]
        rows.append((f"train {ts['mosaics']}", f"{ts['seconds']:.1f} s",
                     f"layout {ts['layout']}; / detect {n}^2 (warm) = {ts['seconds'] / chosen['seconds']:.2f}"))
    if "train_large" in res:
        tl = res["train_large"]
        rows.append((f"train {tl['mosaics']}", f"{tl['seconds']:.1f} s",
                     f"layout {tl['layout']}; / detect {n}^2 warm {tl['vs_detect_warm']:.2f}, "
                     f"cold {tl['vs_detect_cold']:.2f} (target <= 1.5)"))
    rows.append(("total run", f"{res['total_seconds']:.0f} s", ""))
    widths = [max(len(r[i]) for r in rows) for i in range(2)]
    print()
    print(f"{'what':<{widths[0]}}  {'figure':>{widths[1]}}  note")
    for a, b, c in rows:
        print(f"{a:<{widths[0]}}  {b:>{widths[1]}}  {c}")


if __name__ == "__main__":
    main()
