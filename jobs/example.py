"""The README example: train, save, load and test on ``example_dataset/``, then score it.

Prints the pixel AUROC, AUPRO, F1 and share of normal pixels marked against
``example_dataset/ground_truth/`` (``AnomalyDetector.evaluate``), and writes its report to
``example_dataset/output/report/``.

Usage::

    python jobs/example.py [--dataset example_dataset] [--scheduler ADDRESS]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from anomaly_dask import AnomalyDetector

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    """Run the example end to end."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", type=Path, default=ROOT / "example_dataset")
    parser.add_argument("--scheduler", default=None, help="address of a running Dask scheduler")
    args = parser.parse_args()
    client = None
    if args.scheduler:
        from distributed import Client

        client = Client(args.scheduler)
    d = args.dataset
    t0 = time.perf_counter()
    ad = AnomalyDetector(random_state=0, client=client)
    ad.train(str(d / "train"), str(d / "val"))
    ad.save(str(d / "model.safetensors"))
    t1 = time.perf_counter()
    ad = AnomalyDetector.load(str(d / "model.safetensors"), client=client)
    results = ad.test(str(d / "test"), str(d / "output"))
    t2 = time.perf_counter()
    for r in results:
        print(f"{Path(r['path']).name}: {r['anomalous_fraction']:.1%} anomalous, max score "
              f"{r['max_score']:.2f} -> {r['overlay_path']}")
    r = ad.evaluate(str(d / "test"), str(d / "ground_truth"), str(d / "output" / "report"))
    print(f"threshold {ad.threshold_:.3f} (marks {ad.false_alarm_rate_:g} of normal pixels); "
          f"train {t1 - t0:.1f} s, test {t2 - t1:.1f} s")
    print(f"pixel AUROC {r['auroc']:.4f}  AUPRO {r['aupro']:.4f}  F1 {r['f1']:.3f} (best {r['best_f1']:.3f})  "
          f"normal pixels marked {r['normal_marked']:.4f} ({r['normal_marked_far']:.4f} beyond 32 px of an anomaly); "
          f"report in {d / 'output' / 'report'}")


if __name__ == "__main__":
    main()
