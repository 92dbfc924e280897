"""Tile grid and chunk geometry against brute-force references."""

from __future__ import annotations

import numpy as np
import pytest

from anomaly_dask.grid import (
    TileGrid,
    axis_chunks,
    chunk_windows,
    expand_runs,
    masked_box_mean,
    nearest_tiles,
    nodata_distance,
    owns_tiles,
    pixel_runs,
    pixel_scores_from_tiles,
    tile_fractions,
    tile_means,
    tiles_covering,
)


def brute_pixel_scores(tiles: np.ndarray, g: TileGrid) -> np.ndarray:
    total = np.zeros((g.height, g.width))
    count = np.zeros((g.height, g.width))
    for i in range(g.n_rows):
        for j in range(g.n_cols):
            y, x = i * g.stride_h, j * g.stride_w
            total[y : y + g.tile_h, x : x + g.tile_w] += tiles[i, j]
            count[y : y + g.tile_h, x : x + g.tile_w] += 1
    # pixels past the last tile take the nearest covered row / column
    ly = (g.n_rows - 1) * g.stride_h + g.tile_h
    lx = (g.n_cols - 1) * g.stride_w + g.tile_w
    out = total / np.maximum(count, 1)
    out[ly:, :] = out[ly - 1 : ly, :]
    out[:, lx:] = out[:, lx - 1 : lx]
    return out


@pytest.mark.parametrize(
    "shape,tile,stride", [((37, 45), (8, 8), (2, 2)), ((67, 50), (16, 12), (8, 4)), ((32, 32), (32, 32), (8, 8)), ((41, 29), (9, 7), (3, 7))]
)
def test_pixel_scores_match_brute_force(shape, tile, stride):
    g = TileGrid(*shape, *tile, *stride)
    tiles = np.random.default_rng(0).random((g.n_rows, g.n_cols)).astype(np.float32)
    ref = brute_pixel_scores(tiles, g)
    got = pixel_scores_from_tiles(tiles, g, (0, 0), (0, shape[0], 0, shape[1]))
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(("tile", "stride", "lo", "hi"), [(32, 8, 0, 203), (24, 6, 13, 100), (16, 16, 0, 70), (9, 7, 3, 41)])
def test_pixel_runs_group_exactly_the_pixels_that_share_their_tiles(tile, stride, lo, hi):
    length = hi + 11
    n = (length - tile) // stride + 1
    p = np.arange(lo, hi)
    starts = np.arange(n) * stride
    # the covering tiles (or the nearest, past the last tile) and the nearest-centred tile
    covers = [tuple(np.flatnonzero((starts <= q) & (q < starts + tile))) or (n - 1,) for q in p]
    key = [(c, t) for c, t in zip(covers, nearest_tiles(lo, hi, stride, tile, n))]
    runs = pixel_runs(lo, hi, stride, tile, n)
    assert runs.first[0] == 0 and runs.lengths.sum() == hi - lo and (runs.lengths > 0).all()
    for f, m in zip(runs.first, runs.lengths):
        assert all(key[i] == key[f] for i in range(f, f + m))
    assert all(key[f - 1] != key[f] for f in runs.first[1:])  # runs are maximal


def test_tile_means_once_per_run_equal_every_pixel():
    g = TileGrid(150, 131, 32, 32, 8, 8)
    rng = np.random.default_rng(3)
    tiles = rng.random((g.n_rows, g.n_cols)).astype(np.float32)
    weights = (rng.random(tiles.shape) > 0.3).astype(np.float64)
    rows, cols = pixel_runs(5, 140, 8, 32, g.n_rows), pixel_runs(0, 131, 8, 32, g.n_cols)
    assert len(rows.first) < (140 - 5) / 3  # 4 px runs on a stride-8 grid of 32 px tiles
    for w in (None, weights):
        every = tile_means(tiles, g, (0, 0), np.arange(5, 140), np.arange(0, 131), w)
        once = expand_runs(tile_means(tiles, g, (0, 0), 5 + rows.first, cols.first, w), rows, cols)
        np.testing.assert_array_equal(once, every)
        np.testing.assert_array_equal(pixel_scores_from_tiles(tiles, g, (0, 0), (5, 140, 0, 131), w), every)


@pytest.mark.parametrize("chunk", [8, 16, 24, 40])
def test_chunked_pixel_scores_equal_whole(chunk):
    g = TileGrid(83, 61, 16, 16, 4, 4)
    tiles = np.random.default_rng(1).random((g.n_rows, g.n_cols)).astype(np.float32)
    whole = pixel_scores_from_tiles(tiles, g, (0, 0), (0, g.height, 0, g.width))
    out = np.full(whole.shape, np.nan, dtype=np.float32)
    for row in chunk_windows(g, chunk):
        for w in row:
            (r0, r1), (c0, c1) = w.cover_rows, w.cover_cols
            out[w.y0 : w.y1, w.x0 : w.x1] = pixel_scores_from_tiles(
                tiles[r0:r1, c0:c1], g, (r0, c0), (w.y0, w.y1, w.x0, w.x1)
            )
    np.testing.assert_allclose(out, whole, rtol=1e-6)


@pytest.mark.parametrize("length,chunk", [(100, 32), (33, 8), (1030, 512), (40, 15)])
def test_axis_chunks_are_a_regular_partition(length, chunk):
    spans = axis_chunks(length, chunk)
    assert spans[0][0] == 0 and spans[-1][1] == length
    assert all(a[1] == b[0] for a, b in zip(spans, spans[1:]))
    assert all(s == k * chunk for k, (s, _) in enumerate(spans))
    assert all(e - s == chunk for s, e in spans[:-1]) and 0 < spans[-1][1] - spans[-1][0] <= chunk


@pytest.mark.parametrize("shape,chunk,stride", [((150, 133), 48, 8), ((1030, 70), 512, 8), ((40, 40), 8, 8),
                                                 ((150, 133), 40, 6)])
def test_owned_tiles_partition_the_grid(shape, chunk, stride):
    """Every tile is owned by the one chunk holding its top-left corner, whether or not the
    stride divides the chunk; chunks past the last corner (slivers) own none."""
    g = TileGrid(*shape, 32, 32, stride, stride)
    owned = np.zeros((g.n_rows, g.n_cols), dtype=int)
    for row in chunk_windows(g, chunk):
        for w in row:
            r, c = w.own_rows, w.own_cols
            owned[r[0] : r[1], c[0] : c[1]] += 1
            corners_y = [i * stride for i in range(g.n_rows) if w.y0 <= i * stride < w.y1]
            corners_x = [j * stride for j in range(g.n_cols) if w.x0 <= j * stride < w.x1]
            assert owns_tiles(w) == bool(corners_y and corners_x)
            assert r[1] - r[0] == len(corners_y) and c[1] - c[0] == len(corners_x)
    assert (owned == 1).all()


def test_tile_fractions_with_a_margin_count_the_grown_tile():
    valid = np.ones((40, 40), dtype=bool)
    valid[:, :6] = False  # no-data strip on the left
    grid = TileGrid(40, 40, 8, 8, 4, 4)
    own = tile_fractions(valid, (8, 8), (2, 2), grid)
    grown = tile_fractions(valid, (8, 8), (2, 2), grid, margin=4)
    np.testing.assert_allclose(own, 1.0)  # tiles at x >= 8 are wholly on data
    # grown tiles span x in [4, 20) and [8, 24): 2 and 0 no-data columns of 16
    np.testing.assert_allclose(grown[:, 0], 14 / 16)
    np.testing.assert_allclose(grown[:, 1], 1.0)
    with pytest.raises(ValueError, match="margin"):
        tile_fractions(valid, (2, 8), (2, 2), grid, margin=4)


def test_masked_box_mean_matches_brute_force():
    rng = np.random.default_rng(1)
    values = rng.normal(size=(23, 31))
    mask = rng.random((23, 31)) < 0.3
    mean, count = masked_box_mean(values, mask, 3)
    for y, x in [(0, 0), (11, 15), (22, 30), (5, 29)]:
        sl = (slice(max(0, y - 3), y + 4), slice(max(0, x - 3), x + 4))
        m = mask[sl]
        assert count[y, x] == m.sum()
        if m.any():
            assert mean[y, x] == pytest.approx(values[sl][m].mean(), rel=1e-5)
        else:
            assert np.isnan(mean[y, x])


def test_masked_box_mean_at_chosen_pixels_equals_the_whole_map_there():
    rng = np.random.default_rng(2)
    values = rng.normal(size=(40, 37))
    mask = rng.random((40, 37)) < 0.2
    mean, count = masked_box_mean(values, mask, 4)
    at = np.nonzero(rng.random((40, 37)) < 0.1)
    some_mean, some_count = masked_box_mean(values, mask, 4, at=at)
    assert some_mean.shape == (len(at[0]),)
    np.testing.assert_array_equal(some_count, count[at])
    np.testing.assert_array_equal(some_mean, mean[at])


def test_tiles_covering_lists_every_tile_touching_the_rectangle():
    grid = TileGrid(100, 90, 32, 32, 8, 8)
    rows, cols = tiles_covering(grid, (20, 41, 0, 90))
    touching = [r for r in range(grid.n_rows) if r * 8 < 41 and r * 8 + 32 > 20]
    assert rows == (touching[0], touching[-1] + 1)
    assert cols == (0, grid.n_cols)


def test_nodata_distance_matches_brute_force_and_is_capped():
    rng = np.random.default_rng(3)
    valid = rng.random((90, 100)) > 0.0003
    valid[70:, 80:] = False
    box, cap = (20, 60, 25, 70), 20.0
    d = nodata_distance(valid, box, cap)
    iy, ix = np.nonzero(~valid)
    ys, xs = np.mgrid[box[0] : box[1], box[2] : box[3]]
    brute = np.sqrt((ys[..., None] - iy) ** 2 + (xs[..., None] - ix) ** 2).min(axis=-1)
    np.testing.assert_allclose(d, np.minimum(brute, cap), atol=1e-5)
    assert d.shape == (40, 45) and d.max() == cap and d.min() < cap


def test_nodata_distance_is_none_without_nodata_in_reach_and_checks_the_window():
    valid = np.ones((60, 60), dtype=bool)
    valid[0, 0] = False  # farther than the cap from every pixel of the box
    assert nodata_distance(valid, (30, 40, 30, 40), 10.0) is None
    with pytest.raises(ValueError, match="does not hold"):
        nodata_distance(valid, (5, 40, 30, 40), 10.0)


@pytest.mark.parametrize(("tile", "stride", "length"), [(32, 8, 203), (24, 6, 100), (16, 16, 70)])
def test_nearest_tiles_pick_the_tile_centred_nearest_each_pixel(tile, stride, length):
    n = (length - tile) // stride + 1
    got = nearest_tiles(0, length, stride, tile, n)
    centres = np.arange(n) * stride + tile / 2
    covering = np.abs(np.arange(length)[:, None] + 0.5 - centres[None, :])
    np.testing.assert_array_equal(got, covering.argmin(axis=1))
    inside = np.arange(length) < (n - 1) * stride + tile
    starts = got * stride
    assert ((starts <= np.arange(length)) & (np.arange(length) < starts + tile))[inside].all()
    np.testing.assert_array_equal(nearest_tiles(37, length - 5, stride, tile, n), got[37 : length - 5])
