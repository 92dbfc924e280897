"""Progress of training: each pass over the cluster reports 0..total chunks, in order."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest

from anomaly_dask import AnomalyDetector
from anomaly_dask.scoring import Extractor

from .conftest import FAST


def _check_steps(updates: list[tuple[str, int, int]]) -> dict[str, int]:
    """Each step's updates are contiguous, start at 0, never go back and end at total."""
    order = [step for k, (step, _, _) in enumerate(updates) if k == 0 or updates[k - 1][0] != step]
    assert len(order) == len(set(order)), f"a step resumed after another one: {order}"
    totals = {}
    for step in order:
        seen = [(done, total) for s, done, total in updates if s == step]
        total = seen[0][1]
        assert total > 0 and all(t == total for _, t in seen), (step, seen)
        dones = [d for d, _ in seen]
        assert dones[0] == 0 and dones[-1] == total, (step, dones)
        assert all(b == a + 1 for a, b in zip(dones, dones[1:])), (step, dones)
        totals[step] = total
    return totals


def test_train_reports_every_pass(small_folder: Path):
    updates: list[tuple[str, int, int]] = []
    AnomalyDetector(**FAST, chunk_size=64).train(
        str(small_folder / "train"), str(small_folder / "val"),
        progress=lambda step, done, total: updates.append((step, done, total)),
    )
    totals = _check_steps(updates)
    assert list(totals) == ["sample", "fit", "calibrate"]
    assert totals["sample"] == totals["fit"] > 1  # two 96x112 images in 64 px chunks
    assert totals["calibrate"] > 1


@pytest.mark.parametrize("max_fit_tiles", [100_000, 300])
def test_training_runs_the_backbone_once_per_chunk(small_folder: Path, monkeypatch, max_fit_tiles):
    """One backbone pass over the training chunks and one over the validation chunks,
    whether or not the feature sample holds every tile."""
    calls: Counter = Counter()
    features = Extractor.features

    def counted(self, unit, rows, cols):
        calls[(unit.source.name, unit.window.y0, unit.window.x0)] += 1
        return features(self, unit, rows, cols)

    monkeypatch.setattr(Extractor, "features", counted)
    updates: list[tuple[str, int, int]] = []
    AnomalyDetector(**FAST, chunk_size=64, max_fit_tiles=max_fit_tiles).train(
        str(small_folder / "train"), str(small_folder / "val"),
        progress=lambda *u: updates.append(u),
    )
    totals = _check_steps(updates)
    assert list(totals) == ["sample", "fit", "calibrate"]
    assert totals["sample"] == totals["fit"]
    assert len(calls) == totals["sample"] + totals["calibrate"]  # every chunk was read ...
    assert set(calls.values()) == {1}  # ... once
