"""The hieroglyph ``example_dataset``: sketched inscriptions with cuneiform anomalies.

Every image shows rows of Egyptian hieroglyphs in dark-brown ink on a light, parchment-like
ground, between thin horizontal ruling lines. In three of the four test images one
rectangular block is written in cuneiform instead, in the same ink, size and ground, so only
the shapes of the script give the anomaly away; each test image gets a binary ground-truth
mask. :func:`build_example_dataset` writes::

    train/train1.png .. train4.png
    val/val1.png, val2.png
    test/test1.png .. test4.png        (test4 has no anomaly)
    ground_truth/test1.png .. test4.png

The glyphs come from the Debian package ``fonts-noto-core`` (Noto Sans Egyptian
Hieroglyphs and Noto Sans Cuneiform, SIL Open Font License 1.1). All randomness is drawn
from :class:`numpy.random.Generator` instances spawned from one seed, so rebuilding on the
same platform gives byte-identical files. ``jobs/make_example_dataset.py`` is the command
line around it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageFont

from ..errors import InputNotFoundError

__all__ = [
    "CUNEI_FONT",
    "HIERO_FONT",
    "ExampleImage",
    "GlyphSet",
    "build_example_dataset",
    "example_specs",
    "load_glyphs",
    "make_background",
    "make_image",
    "missing_fonts",
    "ruling_layer",
    "save_png",
    "smooth_field",
    "text_layer",
]

FONT_DIR = Path("/usr/share/fonts/truetype/noto")
HIERO_FONT = FONT_DIR / "NotoSansEgyptianHieroglyphs-Regular.ttf"
CUNEI_FONT = FONT_DIR / "NotoSansCuneiform-Regular.ttf"
HIERO_RANGE = (0x13000, 0x1342F)  # inclusive
CUNEI_RANGE = (0x12000, 0x123FF)  # inclusive
# Codepoints no font here maps; their rendering is the ``.notdef`` box.
NOTDEF_PROBES = (0xE000, 0x10FFFD)

IMAGE_SIZE = 512
RENDER_SIZE = 96  # font size used to pre-render glyph masks before resizing
GLYPH_HEIGHT = (28, 34)  # typical glyph height in the output, px
BLOCK_SIDE = (110, 170)  # side length range of the anomalous block, px
INK_RGB = np.array([72, 44, 24], dtype=np.float32)
PAPER_RGB = np.array([228, 212, 178], dtype=np.float32)
INK_LEVELS = 6  # anti-aliasing levels of the ink coverage (PNG size)
BG_STEP = 2  # quantisation step of the background shading, grey levels
GRAIN_LEVEL = 3  # max grain amplitude, grey levels
GRAIN_DENSITY = 0.04  # fraction of pixels that receive grain


@dataclass(frozen=True)
class GlyphSet:
    """Pre-rendered glyph masks of one script.

    Attributes
    ----------
    name : str
        Human-readable script name.
    masks : list of numpy.ndarray
        Float32 coverage masks in ``[0, 1]``, cropped to the ink bounding box.
    ref_height : float
        Median mask height, used to map glyphs to the target output height.
    """

    name: str
    masks: list[np.ndarray]
    ref_height: float


def _render_mask(font: ImageFont.FreeTypeFont, cp: int) -> np.ndarray:
    """Render one codepoint and return its cropped 8-bit coverage mask.

    Parameters
    ----------
    font : PIL.ImageFont.FreeTypeFont
        Font to render with.
    cp : int
        Unicode codepoint.

    Returns
    -------
    numpy.ndarray
        ``uint8`` array of shape ``(h, w)``; empty (size 0) if nothing is drawn.
    """
    core = font.getmask(chr(cp))
    w, h = core.size
    if w == 0 or h == 0:
        return np.zeros((0, 0), dtype=np.uint8)
    arr = np.asarray(core, dtype=np.uint8).reshape(h, w)
    ys, xs = np.nonzero(arr)
    if ys.size == 0:
        return np.zeros((0, 0), dtype=np.uint8)
    return arr[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1]


def load_glyphs(path: Path, cp_range: tuple[int, int], name: str) -> GlyphSet:
    """Render every codepoint of a block that the font really has a glyph for.

    A codepoint is kept when its rendering is non-empty and differs from the
    ``.notdef`` box obtained by rendering codepoints the font cannot map.

    Parameters
    ----------
    path : pathlib.Path
        TrueType font file.
    cp_range : tuple of int
        Inclusive ``(first, last)`` codepoint range.
    name : str
        Script name, for messages.

    Returns
    -------
    GlyphSet
        The usable glyphs, in codepoint order.
    """
    font = ImageFont.truetype(str(path), RENDER_SIZE)
    notdefs = [_render_mask(font, cp) for cp in NOTDEF_PROBES]
    masks: list[np.ndarray] = []
    for cp in range(cp_range[0], cp_range[1] + 1):
        m = _render_mask(font, cp)
        if m.size == 0 or any(
            m.shape == nd.shape and np.array_equal(m, nd) for nd in notdefs
        ):
            continue
        masks.append(m.astype(np.float32) / 255.0)
    if not masks:
        raise RuntimeError(f"no {name} glyphs found in {path}")
    ref = float(np.median([m.shape[0] for m in masks]))
    return GlyphSet(name=name, masks=masks, ref_height=ref)


def smooth_field(rng: np.random.Generator, grid: int, size: int) -> np.ndarray:
    """Low-frequency random field, bicubically upsampled from a coarse grid.

    Parameters
    ----------
    rng : numpy.random.Generator
        Random source.
    grid : int
        Side of the coarse grid of random values.
    size : int
        Side of the returned square field.

    Returns
    -------
    numpy.ndarray
        Float32 array ``(size, size)`` with values roughly in ``[-1, 1]``.
    """
    coarse = rng.uniform(-1.0, 1.0, size=(grid, grid)).astype(np.float32)
    img = Image.fromarray(coarse, mode="F").resize((size, size), Image.BICUBIC)
    return np.asarray(img, dtype=np.float32)


def make_background(rng: np.random.Generator, size: int) -> np.ndarray:
    """Parchment-like background with mild low-frequency brightness variation.

    Parameters
    ----------
    rng : numpy.random.Generator
        Random source.
    size : int
        Image side in pixels.

    Returns
    -------
    numpy.ndarray
        Float32 RGB array ``(size, size, 3)`` in 0..255 units.
    """
    bright = 0.055 * smooth_field(rng, 4, size) + 0.025 * smooth_field(rng, 9, size)
    # Quantise the shading to BG_STEP grey levels: invisible, but it keeps the
    # PNGs small.
    scale = float(PAPER_RGB.max()) / BG_STEP
    bright = np.rint(bright * scale) / scale
    return PAPER_RGB * (1.0 + bright)[..., None]


def _place(layer: np.ndarray, mask: np.ndarray, x: int, y: int) -> None:
    """Max-composite ``mask`` into ``layer`` with its top-left at ``(x, y)``.

    Parameters
    ----------
    layer : numpy.ndarray
        Float32 coverage layer ``(H, W)``, modified in place.
    mask : numpy.ndarray
        Float32 glyph coverage ``(h, w)``.
    x, y : int
        Top-left corner; may lie partly outside the layer (clipped).
    """
    H, W = layer.shape
    h, w = mask.shape
    x0, y0, x1, y1 = max(x, 0), max(y, 0), min(x + w, W), min(y + h, H)
    if x0 >= x1 or y0 >= y1:
        return
    sub = mask[y0 - y : y1 - y, x0 - x : x1 - x]
    np.maximum(layer[y0:y1, x0:x1], sub, out=layer[y0:y1, x0:x1])


def text_layer(
    rng: np.random.Generator,
    glyphs: GlyphSet,
    row_centres: list[float],
    row_height: float,
    size: int,
) -> np.ndarray:
    """Ink coverage of rows of random glyphs spanning the whole image width.

    Parameters
    ----------
    rng : numpy.random.Generator
        Random source.
    glyphs : GlyphSet
        Script to draw from.
    row_centres : list of float
        Vertical centre of each text row, px (may lie outside the image).
    row_height : float
        Nominal glyph height of this image, px.
    size : int
        Image side in pixels.

    Returns
    -------
    numpy.ndarray
        Float32 coverage ``(size, size)`` in ``[0, 1]``.
    """
    layer = np.zeros((size, size), dtype=np.float32)
    max_h = GLYPH_HEIGHT[1] + 2
    for yc in row_centres:
        x = -int(rng.integers(0, 30))  # rows start off-image: no left margin
        while x < size:
            src = glyphs.masks[int(rng.integers(len(glyphs.masks)))]
            scale = row_height / glyphs.ref_height * rng.uniform(0.92, 1.08)
            h, w = src.shape[0] * scale, src.shape[1] * scale
            fit = min(1.0, max_h / h, 2.0 * row_height / w)
            h, w = max(2, round(h * fit)), max(2, round(w * fit))
            img = Image.fromarray(src, mode="F").resize((w, h), Image.LANCZOS)
            m = np.clip(np.asarray(img, dtype=np.float32), 0.0, 1.0)
            m = 1.0 - (1.0 - m) ** 1.5  # slightly bolder, pen-like strokes
            m *= rng.uniform(0.82, 1.0)  # ink density varies per stroke group
            y = round(yc - h / 2 + rng.normal(0.0, 1.2))
            _place(layer, m, x + int(rng.integers(-1, 2)), y)
            x += w + int(rng.integers(4, 10))
    return layer


def ruling_layer(
    rng: np.random.Generator, line_ys: list[float], size: int
) -> np.ndarray:
    """Thin, slightly sloped, anti-aliased horizontal ruling lines.

    Parameters
    ----------
    rng : numpy.random.Generator
        Random source.
    line_ys : list of float
        Nominal y position of each line at the left edge, px.
    size : int
        Image side in pixels.

    Returns
    -------
    numpy.ndarray
        Float32 coverage ``(size, size)`` in ``[0, 1]``.
    """
    layer = np.zeros((size, size), dtype=np.float32)
    xs = np.arange(size)
    for y0 in line_ys:
        strength = rng.uniform(0.45, 0.65)
        ys = y0 + rng.uniform(-1.5, 1.5) * xs / size + 0.4 * np.sin(
            xs / size * rng.uniform(2.0, 6.0) + rng.uniform(0.0, 2 * np.pi)
        )
        base = np.floor(ys).astype(int)
        frac = (ys - base).astype(np.float32)
        for off, wgt in ((0, 1.0 - frac), (1, frac)):
            rows = base + off
            ok = (rows >= 0) & (rows < size)
            layer[rows[ok], xs[ok]] = np.maximum(
                layer[rows[ok], xs[ok]], strength * wgt[ok]
            )
    return layer


def make_image(
    rng: np.random.Generator,
    hiero: GlyphSet,
    cunei: GlyphSet,
    anomalous: bool,
    size: int = IMAGE_SIZE,
) -> tuple[Image.Image, Image.Image, tuple[int, int, int, int] | None]:
    """Draw one inscription image and its ground-truth mask.

    Parameters
    ----------
    rng : numpy.random.Generator
        Random source for this image.
    hiero, cunei : GlyphSet
        Normal and anomalous scripts.
    anomalous : bool
        Whether to replace a rectangular block by cuneiform rows.
    size : int, optional
        Image side in pixels.

    Returns
    -------
    image : PIL.Image.Image
        RGB image.
    mask : PIL.Image.Image
        ``L`` mask, 255 inside the anomalous block, 0 elsewhere.
    box : tuple of int or None
        ``(x, y, width, height)`` of the block, or ``None``.
    """
    row_height = rng.uniform(GLYPH_HEIGHT[0] + 1, GLYPH_HEIGHT[1] - 1)
    pitch = row_height + rng.uniform(9.0, 12.0)
    first = -rng.uniform(0.0, pitch)
    n_rows = int(np.ceil((size - first) / pitch)) + 1
    line_ys = [first + i * pitch for i in range(n_rows)]
    centres = [y + pitch / 2 for y in line_ys]

    background = make_background(rng, size)
    ink = text_layer(rng, hiero, centres, row_height, size)
    mask = np.zeros((size, size), dtype=np.uint8)
    box = None
    if anomalous:
        bw, bh = (int(v) for v in rng.integers(BLOCK_SIDE[0], BLOCK_SIDE[1] + 1, 2))
        bx = int(rng.integers(0, size - bw + 1))
        by = int(rng.integers(0, size - bh + 1))
        other = text_layer(rng, cunei, centres, row_height, size)
        ink[by : by + bh, bx : bx + bw] = other[by : by + bh, bx : bx + bw]
        mask[by : by + bh, bx : bx + bw] = 255
        box = (bx, by, bw, bh)
    alpha = np.maximum(ink, ruling_layer(rng, line_ys, size))
    alpha = (np.rint(alpha * INK_LEVELS) / INK_LEVELS)[..., None]

    rgb = background * (1.0 - alpha) + INK_RGB * alpha
    # Slight grain: a shared luminance perturbation on a sparse set of pixels
    # keeps the PNGs compressible.
    grain = rng.integers(-GRAIN_LEVEL, GRAIN_LEVEL + 1, size=(size, size))
    grain = grain.astype(np.float32) * (rng.random((size, size)) < GRAIN_DENSITY)
    rgb = np.clip(np.rint(rgb + grain[..., None]), 0, 255).astype(np.uint8)
    return Image.fromarray(rgb, mode="RGB"), Image.fromarray(mask, mode="L"), box


def save_png(img: Image.Image, path: Path) -> None:
    """Save ``img`` as an optimised PNG, creating parent directories.

    Parameters
    ----------
    img : PIL.Image.Image
        Image to write.
    path : pathlib.Path
        Destination file.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, format="PNG", optimize=True)



@dataclass(frozen=True)
class ExampleImage:
    """One image written by :func:`build_example_dataset`.

    Attributes
    ----------
    split : str
        ``"train"``, ``"val"`` or ``"test"``.
    name : str
        File stem, e.g. ``"test1"``.
    box : tuple of int or None
        ``(x, y, width, height)`` of the anomalous block, None for normal images.
    """

    split: str
    name: str
    box: tuple[int, int, int, int] | None


def missing_fonts() -> list[Path]:
    """The font files the dataset needs that are not installed (empty when all are)."""
    return [f for f in (HIERO_FONT, CUNEI_FONT) if not f.is_file()]


def example_specs() -> list[tuple[str, str, bool]]:
    """``(split, name, anomalous)`` of every image of the dataset, in generation order."""
    return (
        [("train", f"train{i}", False) for i in range(1, 5)]
        + [("val", f"val{i}", False) for i in range(1, 3)]
        + [("test", f"test{i}", i <= 3) for i in range(1, 5)]
    )


def build_example_dataset(
    out: str | Path, seed: int = 0, *, log: Callable[[str], None] | None = None
) -> list[ExampleImage]:
    """Render the example dataset into a folder.

    Parameters
    ----------
    out : str or pathlib.Path
        Output folder; the split folders are created under it and existing files replaced.
    seed : int
        Seed of all randomness; seed 0 gives the committed ``example_dataset/``.
    log : callable, optional
        Called with one line of progress per step (e.g. :func:`print`).

    Returns
    -------
    list of ExampleImage
        The images written, in order.

    Raises
    ------
    InputNotFoundError
        If a font file is missing (install ``fonts-noto-core``).
    """
    missing = missing_fonts()
    if missing:
        raise InputNotFoundError(
            "font file(s) not found: " + ", ".join(str(f) for f in missing)
            + "\ninstall them with: apt-get install fonts-noto-core"
        )
    say = log if log is not None else (lambda _line: None)
    out = Path(out)
    hiero = load_glyphs(HIERO_FONT, HIERO_RANGE, "Egyptian hieroglyph")
    cunei = load_glyphs(CUNEI_FONT, CUNEI_RANGE, "cuneiform")
    say(f"glyphs: {len(hiero.masks)} hieroglyphs, {len(cunei.masks)} cuneiform")
    specs = example_specs()
    children = np.random.SeedSequence(seed).spawn(len(specs))
    written = []
    for (split, name, anomalous), ss in zip(specs, children):
        img, mask, box = make_image(np.random.default_rng(ss), hiero, cunei, anomalous)
        save_png(img, out / split / f"{name}.png")
        if split == "test":
            save_png(mask, out / "ground_truth" / f"{name}.png")
        extra = f"  anomaly box (x, y, w, h) = {box}" if box else ""
        say(f"wrote {split}/{name}.png{extra}")
        written.append(ExampleImage(split, name, box))
    return written
