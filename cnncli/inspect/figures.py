"""Figures as PNG files: training curves of runs, image grids, and what a trained network learned.

`save_image` writes an image's pixels as a PNG; `plot_curves` writes the learning curves of `curves_figure`.
The figures of `cnncli visualize` (filters, feature maps, top-9 patches, t-SNE, saliency, confusion, errors)
take NumPy arrays (see `cnncli.inspect.interpret` for how they are computed) and return a matplotlib
`Figure`; `save` writes it. All are built without pyplot (no global state, no display needed). Their sizes
are fixed in inches and saved at `DPI` without tight cropping, so a figure's pixel size is known in advance: grids
of tiles are `cols * tile` by `rows * tile + HEADER` inches.
"""

from __future__ import annotations

import math
import textwrap
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure

CURVE_DPI = 120
CURVES_SIZE = (16.0, 4.5)  # inches: accuracy, loss and learning-rate panels
DPI = 100
TILE = 1.2  # inches per grid cell (120 pixels)
HEADER = 0.6  # inches above a grid for its title: up to three lines of TITLE_FONT
TITLE_FONT = 8
CHARS_PER_INCH = 15  # of TITLE_FONT-point text, to wrap titles inside narrow grids
CAPTION = 0.22  # inches under a tile's top edge for one caption line
MARGIN = 0.04  # inches between tiles
TSNE_SIZE = (8.0, 7.0)
GAP = 1  # pixels between the tiles of a mosaic
MAX_INPUT_CHANNELS = 16  # deeper filters show at most this many of their input channels
OVERLAY_ALPHA = 0.5
CONFUSION_MIN, CONFUSION_PER_CLASS, CONFUSION_BASE = 5.0, 0.6, 1.5  # inches
RELIABILITY_PANEL = 4.5  # inches: width of one reliability diagram
PREVIEW_LABELS, PREVIEW_LINE, PREVIEW_MIN_TILE = 1.2, 0.12, 0.6  # inches: row labels, one caption line, tiles
PREVIEW_FONT = 6  # points: the captions under augmented draws
LR_FIND_SIZE = (8.0, 5.0)  # inches


def save_image(image: np.ndarray, path: Path, zoom: int = 1) -> tuple[int, int]:
    """Write an (H, W, C) uint8 image (C = 1 or 3) as a PNG, each pixel a zoom x zoom block.

    Returns:
        The written (width, height) in pixels.
    """
    from PIL import Image

    if zoom > 1:  # nearest-neighbour: small images (28x28) stay sharp instead of blurred
        image = np.repeat(np.repeat(image, zoom, axis=0), zoom, axis=1)
    pil = Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image)
    path.parent.mkdir(parents=True, exist_ok=True)
    pil.save(path)
    return pil.size


# The validation score that picks a run's best epoch, as the training loop chooses it: PGD-10 accuracy for
# single-step adversarial training, accuracy under the training attack for other adversarial training, else top-1.
SCORES = ("val_pgd_acc", "val_robust_acc", "val_acc")
# the robust validation curves of adversarial training: (metric, line style, marker, legend label)
ROBUST_CURVES = (("val_robust_acc", "-.", "^", "validation, training attack"),
                 ("val_pgd_acc", ":", "v", "validation, PGD-10"))


def best_score(rows: list[dict[str, Any]]) -> str | None:
    """The metric that picks the best epoch of these metrics rows (see SCORES), or None without validation."""
    return next((key for key in SCORES if any(key in r for r in rows)), None)


def best_epoch(rows: list[dict[str, Any]]) -> int | None:
    """The first epoch with the highest validation score (the loop's best checkpoint), or None without validation."""
    key = best_score(rows)
    scored = [r for r in rows if key in r]
    return max(scored, key=lambda r: r[key])["epoch"] if scored else None


def curves_figure(runs: Sequence[tuple[str, list[dict[str, Any]]]], title: str = "") -> Figure:
    """Accuracy, loss and learning rate per epoch of several runs: validation solid, training dashed, one colour
    per run, and each run's best epoch (see `best_epoch`) marked with a star and a dotted line. Adversarially
    trained runs also show validation accuracy under their training attack (dash-dot) and, for single-step
    training, under PGD-10 (dotted): catastrophic overfitting is the dotted curve falling while the others rise.

    Args:
        runs: (label, metrics.jsonl rows) per run.
        title: figure title.
    """
    from matplotlib import rcParams
    from matplotlib.lines import Line2D
    from matplotlib.ticker import MaxNLocator

    fig = Figure(figsize=CURVES_SIZE)
    acc_ax, loss_ax, lr_ax = fig.subplots(1, 3)
    colors = rcParams["axes.prop_cycle"].by_key()["color"]
    robust_shown = []
    for i, (label, rows) in enumerate(runs):
        color = colors[i % len(colors)]
        epochs = [r["epoch"] for r in rows]
        for ax, metric in ((acc_ax, "acc"), (loss_ax, "loss")):
            ax.plot(epochs, [r[f"train_{metric}"] for r in rows], "--", marker=".", color=color, alpha=0.7)
            if all(f"val_{metric}" in r for r in rows):
                ax.plot(epochs, [r[f"val_{metric}"] for r in rows], "-", marker="o", ms=3, color=color, label=label)
        for metric, style, marker, _ in ROBUST_CURVES:
            if rows and all(metric in r for r in rows):
                acc_ax.plot(epochs, [r[metric] for r in rows], style, marker=marker, ms=4, color=color, gid=metric)
                robust_shown.append(metric)
        if all("lr" in r for r in rows):
            lr_ax.plot(epochs, [r["lr"] for r in rows], "-", marker=".", color=color)
        best = best_epoch(rows)
        if best is not None:
            row = next(r for r in rows if r["epoch"] == best)
            acc_ax.plot([best], [row[best_score(rows)]], "*", ms=14, color=color, markeredgecolor="black",
                        label=f"best epoch {best}" if len(runs) == 1 else None)
            for ax in (acc_ax, loss_ax, lr_ax):
                ax.axvline(best, color=color, linestyle=":", alpha=0.6)
    acc_ax.set(xlabel="epoch", ylabel="accuracy", title="accuracy (solid: validation, dashed: training)")
    loss_ax.set(xlabel="epoch", ylabel="loss", title="loss (solid: validation, dashed: training)")
    lr_ax.set(xlabel="epoch", ylabel="learning rate", title="learning rate (end of each epoch)")
    for ax in (acc_ax, loss_ax, lr_ax):
        ax.grid(alpha=0.3)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    handles, labels = acc_ax.get_legend_handles_labels()
    for metric, style, marker, text in ROBUST_CURVES:  # one legend entry per line style, whatever the runs' colours
        if metric in robust_shown:
            handles.append(Line2D([], [], linestyle=style, marker=marker, ms=4, color="grey"))
            labels.append(text)
    acc_ax.legend(handles, labels, fontsize="small")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


def plot_curves(runs: Sequence[tuple[str, list[dict[str, Any]]]], path: Path, title: str = "") -> None:
    """Write `curves_figure(runs, title)` to path as a PNG at CURVE_DPI."""
    fig = curves_figure(runs, title)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=CURVE_DPI)


def run_curves(run_dir, folder: Path | None = None) -> tuple[Path, str]:
    """Write a run's learning curves to folder/curves.png (default RUN/plots), titled with a one-line
    diagnosis (`interpret.diagnose`) and the epoch it has reached; returns (path, diagnosis).

    `cnncli plot` draws it on demand (also while the run trains); `cnncli train` at the end of a run.
    """
    from cnncli import recipe as recipe_lib
    from cnncli.errors import UserError
    from cnncli.inspect.interpret import diagnose

    rows = run_dir.read_metrics()
    if not rows:
        raise UserError(f"{run_dir.path} has no finished epoch yet (no rows in {run_dir.metrics.name}); "
                        "plot again after the first epoch")
    diagnosis = diagnose(rows)
    epochs = recipe_lib.load(run_dir.recipe).train.epochs if run_dir.recipe.is_file() else None
    progress = f" (epoch {rows[-1]['epoch']} of {epochs}, in progress)" if epochs and rows[-1]["epoch"] < epochs else ""
    path = (folder or run_dir.plots) / "curves.png"
    plot_curves([(run_dir.path.name, rows)], path, title=f"{run_dir.path.name}{progress}\n{diagnosis}")
    return path, diagnosis


def save(fig: Figure, path: Path) -> Path:
    """Write `fig` as a PNG at `DPI` (creating the folder); returns the path."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=DPI, format="png")
    return path


def grid_pixels(n: int, cols: int, tile: float = TILE) -> tuple[int, int]:
    """(width, height) in pixels of a grid figure of n tiles in `cols` columns."""
    rows = math.ceil(n / cols)
    return round(cols * tile * DPI), round((rows * tile + HEADER) * DPI)


def columns(n: int, cols: int | None = None) -> int:
    """A near-square number of columns for n tiles (or `cols`, at most n)."""
    return max(1, min(n, cols or math.ceil(math.sqrt(n))))


def _grid(n: int, cols: int, title: str, *, tile: float = TILE, captions: int = 0):
    """A figure of n axes in a rows x cols grid of square tiles under a title band.

    `captions` lines of text fit above each tile's picture. Returns (figure, axes).
    """
    rows = math.ceil(n / cols)
    width, height = cols * tile, rows * tile + HEADER
    fig = Figure(figsize=(width, height))
    text = textwrap.fill(title, max(int(width * CHARS_PER_INCH), 20))
    fig.suptitle(text, fontsize=TITLE_FONT, y=1 - 0.1 * HEADER / height, va="top")
    axes = []
    for i in range(n):
        r, c = divmod(i, cols)
        side = tile - 2 * MARGIN - captions * CAPTION
        left = c * tile + (tile - side) / 2
        bottom = (rows - 1 - r) * tile + MARGIN
        ax = fig.add_axes((left / width, bottom / height, side / width, side / height))
        ax.set_axis_off()
        axes.append(ax)
    return fig, axes


def _show(ax, image: np.ndarray, **kw) -> None:
    """Draw an HWC image: uint8 pixels, or floats in [0, 1]; one channel in gray."""
    vmax = 255 if image.dtype == np.uint8 else 1.0
    if image.shape[-1] == 1:
        ax.imshow(image[..., 0], cmap="gray", vmin=0, vmax=vmax, interpolation="nearest", **kw)
    else:
        ax.imshow(image, interpolation="nearest", **kw)


def mosaic(tiles: np.ndarray, cols: int, fill: float = 1.0) -> np.ndarray:
    """Tiles (N, h, w, C) in [0, 1] laid out in `cols` columns with a `GAP`-pixel border of `fill`."""
    n, h, w, c = tiles.shape
    rows = math.ceil(n / cols)
    out = np.full((rows * (h + GAP) - GAP, cols * (w + GAP) - GAP, c), fill, np.float32)
    for i, tile in enumerate(tiles):
        r, col = divmod(i, cols)
        out[r * (h + GAP): r * (h + GAP) + h, col * (w + GAP): col * (w + GAP) + w] = tile
    return out


def signed_to_unit(k: np.ndarray) -> np.ndarray:
    """Weights -> [0, 1] with zero at mid-gray, scaled by the largest magnitude (the sign stays visible)."""
    scale = np.abs(k).max()
    return 0.5 + 0.5 * k / scale if scale > 0 else np.full_like(k, 0.5)


# ----------------------------------------------------------------------------- figures


def filters(kernels: np.ndarray, title: str, cols: int | None = None) -> Figure:
    """One tile per filter (filters, kh, kw, C): RGB for C = 3, gray for C = 1, else its input channels.

    Each filter is scaled on its own with zero at mid-gray: bright is positive, dark negative.
    """
    n, _, _, c = kernels.shape
    fig, axes = _grid(n, columns(n, cols), title)
    for ax, k in zip(axes, kernels):
        if c in (1, 3):
            _show(ax, signed_to_unit(k))
        else:
            channels = k[..., :MAX_INPUT_CHANNELS].transpose(2, 0, 1)[..., None]
            _show(ax, mosaic(signed_to_unit(channels), columns(len(channels))))
    return fig


def feature_maps(image: np.ndarray, maps: np.ndarray, title: str, cols: int | None = None) -> Figure:
    """The input image, then each channel of a layer's output (h, w, C) on one shared color scale."""
    n = maps.shape[-1] + 1
    fig, axes = _grid(n, columns(n, cols), title, captions=1)
    _show(axes[0], image)
    axes[0].set_title("input", fontsize=8)
    top = max(float(maps.max()), 1e-12)
    for i, ax in enumerate(axes[1:]):
        ax.imshow(maps[..., i], cmap="viridis", vmin=min(float(maps.min()), 0.0), vmax=top,
                  interpolation="nearest")
        ax.set_title(str(i), fontsize=8)
    return fig


def top_patches(patches: Sequence[np.ndarray], units: Sequence[int], values: np.ndarray, title: str,
                cols: int | None = None) -> Figure:
    """For each unit, its top patches (k, h, w, C uint8) as a 3x3 mosaic, captioned with the unit and its top value."""
    n = len(units)
    fig, axes = _grid(n, columns(n, cols), title, tile=2 * TILE, captions=1)
    for ax, unit_patches, unit, value in zip(axes, patches, units, values):
        tiles = unit_patches.astype(np.float32) / 255.0
        _show(ax, mosaic(tiles, columns(len(tiles))))
        ax.set_title(f"unit {unit} (max {value:.2g})", fontsize=8)
    return fig


def projections_beside_patches(projections: Sequence[np.ndarray], patches: Sequence[np.ndarray],
                               units: Sequence[int], values: np.ndarray, title: str, cols: int | None = None) -> Figure:
    """For each unit, its top projections (k, h, w, C float, signed) beside its top patches (uint8), 3x3 each.

    As Zeiler & Fergus lay out their figure 2: each projection is scaled on its own with zero at
    mid-gray, so the structure that drove the unit shows whatever its magnitude.
    """
    n = len(units)
    pairs = columns(n, cols)
    fig, axes = _grid(2 * n, 2 * pairs, title, tile=2 * TILE, captions=1)
    for i, (proj, unit_patches, unit, value) in enumerate(zip(projections, patches, units, values)):
        scaled = np.stack([signed_to_unit(p) for p in proj])
        _show(axes[2 * i], mosaic(scaled, columns(len(scaled)), fill=0.5))
        axes[2 * i].set_title(f"unit {unit}: projections", fontsize=8)
        _show(axes[2 * i + 1], mosaic(unit_patches.astype(np.float32) / 255.0, columns(len(unit_patches))))
        axes[2 * i + 1].set_title(f"patches (max {value:.2g})", fontsize=8)
    return fig


def signed_maps(images: np.ndarray, maps: np.ndarray, image_captions: Sequence[str], map_captions: Sequence[str],
                title: str, cols: int | None = None) -> Figure:
    """Each image (uint8 HWC) next to a signed pixel-space map (H, W, C): zero mid-gray, bright positive."""
    n = len(images)
    pairs = columns(n, cols)
    fig, axes = _grid(2 * n, 2 * pairs, title, captions=1)
    for i, (image, m) in enumerate(zip(images, maps)):
        _show(axes[2 * i], image)
        axes[2 * i].set_title(image_captions[i], fontsize=7)
        _show(axes[2 * i + 1], signed_to_unit(m))
        axes[2 * i + 1].set_title(map_captions[i], fontsize=7)
    return fig


def class_rows(images: np.ndarray, class_names: Sequence[str], title: str) -> Figure:
    """One row per class (K, n, H, W, C uint8), the class name at the left of its row."""
    k, n = images.shape[:2]
    label = 1.3  # inches for the class names
    width, height = label + n * TILE * 0.6, k * TILE * 0.6 + HEADER
    fig = Figure(figsize=(width, height))
    fig.suptitle(textwrap.fill(title, max(int(width * CHARS_PER_INCH), 20)), fontsize=TITLE_FONT,
                 y=1 - 0.1 * HEADER / height, va="top")
    ax = fig.add_axes((label / width, 0.0, 1 - label / width, (height - HEADER) / height))
    tiles = images.reshape(k * n, *images.shape[2:]).astype(np.float32) / 255.0
    _show(ax, mosaic(tiles, n))
    h = images.shape[2] + GAP
    ax.set_yticks([r * h + (h - GAP) / 2 for r in range(k)], list(class_names), fontsize=8)
    ax.set_xticks([])
    for side in ax.spines.values():
        side.set_visible(False)
    return fig


def tsne(points: np.ndarray, labels: np.ndarray, class_names: Sequence[str], title: str) -> Figure:
    """A 2-D embedding, one dot per example, colored by class, with a legend of class names."""
    fig = Figure(figsize=TSNE_SIZE)
    ax = fig.add_axes((0.04, 0.04, 0.68, 0.88))
    colors = _class_colors(len(class_names))
    for k, name in enumerate(class_names):
        mine = labels == k
        ax.scatter(points[mine, 0], points[mine, 1], s=6, color=colors[k], label=name, alpha=0.8, linewidths=0)
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_title(title, fontsize=10)
    ax.legend(loc="center left", bbox_to_anchor=(1.02, 0.5), markerscale=3, fontsize=9, frameon=False)
    return fig


def _class_colors(k: int):
    from matplotlib import colormaps

    cmap = colormaps["tab10" if k <= 10 else "tab20" if k <= 20 else "turbo"]
    return [cmap(i if k <= 20 else i / max(k - 1, 1)) for i in range(k)]


def heat_maps(images: np.ndarray, maps: np.ndarray, image_captions: Sequence[str], map_captions: Sequence[str],
              title: str, *, overlay: bool, cols: int | None = None) -> Figure:
    """Each image (uint8 HWC) next to its map (H, W): alone (saliency) or over the image (Grad-CAM)."""
    n = len(images)
    pairs = columns(n, cols)
    fig, axes = _grid(2 * n, 2 * pairs, title, captions=1)
    for i, (image, heat) in enumerate(zip(images, maps)):
        ax_image, ax_map = axes[2 * i], axes[2 * i + 1]
        _show(ax_image, image)
        ax_image.set_title(image_captions[i], fontsize=7)
        ax_map.set_title(map_captions[i], fontsize=7)
        if overlay:
            _show(ax_map, image)
            ax_map.imshow(heat, cmap="jet", alpha=OVERLAY_ALPHA, vmin=0, vmax=1, interpolation="bilinear")
        else:
            ax_map.imshow(heat, cmap="hot", vmin=0, vmax=max(float(heat.max()), 1e-12), interpolation="nearest")
    return fig


def examples(images: np.ndarray, captions: Sequence[str], title: str, cols: int | None = None) -> Figure:
    """Images with a two-line caption each (e.g. the most confident mistakes)."""
    n = len(images)
    fig, axes = _grid(n, columns(n, cols), title, tile=1.5 * TILE, captions=2)
    for ax, image, caption in zip(axes, images, captions):
        _show(ax, image)
        ax.set_title(caption, fontsize=7)
    return fig


def confusion_size(k: int) -> float:
    """Side in inches of the confusion figure for k classes."""
    return max(CONFUSION_MIN, CONFUSION_BASE + CONFUSION_PER_CLASS * k)


def confusion(matrix: np.ndarray, class_names: Sequence[str], title: str, *, normalized: bool = False) -> Figure:
    """Confusion heat map (rows: true class, columns: predicted).

    Counts are colored by the fraction of each true class and annotated with the counts; a `normalized`
    matrix (fractions) is colored and annotated with its own values.
    """
    k = len(class_names)
    side = confusion_size(k)
    fig = Figure(figsize=(side, side))
    ax = fig.add_axes((0.2, 0.18, 0.76, 0.74))
    if normalized:
        shade, vmax = matrix, max(float(matrix.max()), 1e-12)
    else:
        shade, vmax = matrix / np.maximum(matrix.sum(axis=1, keepdims=True), 1), 1.0
    ax.imshow(shade, cmap="Blues", vmin=0, vmax=vmax)
    ax.set_xticks(range(k), class_names, rotation=60, ha="right", fontsize=8)
    ax.set_yticks(range(k), class_names, fontsize=8)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title, fontsize=10)
    if k <= 20:  # numbers stay legible up to about 20 classes
        for (i, j), value in np.ndenumerate(matrix):
            ax.text(j, i, f"{value:.2f}" if normalized else str(value), ha="center", va="center", fontsize=7,
                    color="white" if shade[i, j] > 0.5 * vmax else "black")
    return fig

def reliability(panels: Sequence[tuple[str, dict[str, Any]]], title: str) -> Figure:
    """Reliability diagrams (Guo et al. 2017), one column per (label, `train.metrics.calibration` result).

    Top: accuracy per confidence bin (bars), the gap to the bin's mean confidence (red), the diagonal of
    perfect calibration; bottom: the share of examples per bin.
    """
    fig = Figure(figsize=(RELIABILITY_PANEL * len(panels), RELIABILITY_PANEL * 1.35))
    grid = fig.add_gridspec(2, len(panels), height_ratios=(3, 1), hspace=0.08, left=0.09, right=0.98, top=0.86,
                            bottom=0.1, wspace=0.25)
    for col, (label, r) in enumerate(panels):
        bins = r["bins"]
        edges = np.linspace(0.0, 1.0, bins + 1)
        centers, width = (edges[:-1] + edges[1:]) / 2, 1.0 / bins
        count = np.asarray(r["bin_count"], np.float64)
        acc, conf = np.asarray(r["bin_accuracy"]), np.asarray(r["bin_confidence"])
        used = count > 0
        top = fig.add_subplot(grid[0, col])
        top.bar(centers[used], acc[used], width, color="#4c72b0", edgecolor="black", linewidth=0.5, label="accuracy")
        top.bar(centers[used], conf[used] - acc[used], width, bottom=acc[used], color="#dd4444", alpha=0.45,
                edgecolor="#aa0000", linewidth=0.5, hatch="//", label="gap to confidence")
        top.plot([0, 1], [0, 1], "--", color="gray", linewidth=1, label="perfect calibration")
        top.set(xlim=(0, 1), ylim=(0, 1), ylabel="accuracy" if col == 0 else None, xticklabels=[])
        top.set_title(f"{label}\nECE {r['ece']:.2%}  NLL {r['nll']:.4f}", fontsize=9)
        top.grid(alpha=0.3)
        if col == 0:
            top.legend(loc="upper left", fontsize=7)
        bottom = fig.add_subplot(grid[1, col])
        bottom.bar(centers, count / max(count.sum(), 1), width, color="gray", edgecolor="black", linewidth=0.5)
        bottom.set(xlim=(0, 1), xlabel="confidence (top-label probability)",
                   ylabel="share" if col == 0 else None)
        bottom.grid(alpha=0.3)
    fig.suptitle(title, fontsize=10)
    return fig


def augment_preview(originals: np.ndarray, draws: np.ndarray, row_labels: Sequence[str],
                    captions: Sequence[Sequence[str]], title: str, zoom: int = 3) -> Figure:
    """A labelled augmentation preview: one row per image (labelled with its class), the original, then draws.

    Args:
        originals: (n, h, w, C) uint8 images.
        draws: (d, n, h, w, C) uint8 augmented versions.
        row_labels: n labels drawn left of the rows (the class).
        captions: n lists of d captions drawn under the draws (the ops that fired).
        title: figure title.
        zoom: each image pixel is drawn as about zoom x zoom PNG pixels.
    """
    d, n, h, w, _ = draws.shape
    tile = max(w * zoom / DPI, PREVIEW_MIN_TILE)
    chars = max(int(tile * CHARS_PER_INCH * TITLE_FONT / PREVIEW_FONT), 8)
    wrapped = [[textwrap.fill(c, chars) for c in row] for row in captions]
    lines = max([c.count("\n") + 1 for row in wrapped for c in row] + [1])
    cell_h = tile * h / w + lines * PREVIEW_LINE + MARGIN
    width = PREVIEW_LABELS + (d + 1) * (tile + MARGIN)
    height = HEADER + PREVIEW_LINE + n * cell_h
    fig = Figure(figsize=(width, height))
    fig.suptitle(textwrap.fill(title, int(width * CHARS_PER_INCH)), fontsize=TITLE_FONT, y=1 - 0.1 * HEADER / height,
                 va="top")
    for col, header in enumerate(["original"] + [f"draw {i + 1}" for i in range(d)]):
        x = (PREVIEW_LABELS + col * (tile + MARGIN) + tile / 2) / width
        fig.text(x, 1 - (HEADER + PREVIEW_LINE / 2) / height, header, ha="center", va="center",
                 fontsize=TITLE_FONT, weight="bold")
    for r in range(n):
        top = HEADER + PREVIEW_LINE + r * cell_h
        bottom = height - top - tile * h / w
        fig.text((PREVIEW_LABELS - MARGIN) / width, (bottom + tile * h / w / 2) / height, row_labels[r],
                 ha="right", va="center", fontsize=TITLE_FONT)
        for col, image in enumerate([originals[r]] + [draws[i, r] for i in range(d)]):
            left = PREVIEW_LABELS + col * (tile + MARGIN)
            ax = fig.add_axes((left / width, bottom / height, tile / width, tile * h / w / height))
            ax.set_axis_off()
            _show(ax, image)
            if col:
                fig.text((left + tile / 2) / width, (bottom - 0.02) / height, wrapped[r][col - 1], ha="center",
                         va="top", fontsize=PREVIEW_FONT, linespacing=1.1)
    return fig


def class_examples(images: Sequence[np.ndarray], row_labels: Sequence[str], title: str, cols: int) -> Figure:
    """One row per class: its label on the left, then up to `cols` of its images (uint8 HWC each)."""
    rows = len(images)
    width = PREVIEW_LABELS + cols * TILE * 0.75
    height = HEADER + rows * TILE * 0.75
    side = TILE * 0.75 - MARGIN
    fig = Figure(figsize=(width, height))
    fig.suptitle(textwrap.fill(title, int(width * CHARS_PER_INCH)), fontsize=TITLE_FONT,
                 y=1 - 0.1 * HEADER / height, va="top")
    for r, (row, label) in enumerate(zip(images, row_labels)):
        bottom = height - HEADER - (r + 1) * TILE * 0.75 + MARGIN / 2
        fig.text((PREVIEW_LABELS - MARGIN) / width, (bottom + side / 2) / height, label, ha="right", va="center",
                 fontsize=TITLE_FONT)
        for c, image in enumerate(row[:cols]):
            ax = fig.add_axes(((PREVIEW_LABELS + c * TILE * 0.75) / width, bottom / height, side / width,
                               side / height))
            ax.set_axis_off()
            _show(ax, image)
    return fig


def lr_range_test(lrs: np.ndarray, losses: np.ndarray, smoothed: np.ndarray, suggestions: dict[str, float],
                  title: str) -> Figure:
    """Loss against learning rate (log scale): each step's loss, its smoothed curve, and the suggested rates."""
    fig = Figure(figsize=LR_FIND_SIZE)
    ax = fig.add_axes((0.1, 0.12, 0.86, 0.76))
    ax.plot(lrs, losses, color="gray", alpha=0.4, linewidth=1, label="loss of each step")
    ax.plot(lrs, smoothed, color="#1f77b4", linewidth=2, label="smoothed over a decade (median, then mean)")
    styles = {"suggested": ("#d62728", "*", 15), "steepest": ("#ff7f0e", "o", 8), "minimum": ("#9467bd", "^", 8),
              "valley": ("#2ca02c", "s", 7)}
    for name, lr in suggestions.items():
        color, marker, size = styles[name]
        ax.plot([lr], [np.interp(np.log(lr), np.log(lrs), smoothed)], marker=marker, color=color, markersize=size,
                linestyle="none", label=f"{name}: {lr:.2e}")
    finite = smoothed[np.isfinite(smoothed)]
    top = min(float(finite.max()), float(finite[0]) * 1.5 if finite[0] > 0 else float(finite.max()))
    bottom = min(float(finite.min()), float(np.nanmin(losses)))
    ax.set(xscale="log", xlabel="learning rate", ylabel="training loss", ylim=(bottom * 0.9, top * 1.05))
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    return fig
