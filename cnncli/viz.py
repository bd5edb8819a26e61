"""Figures as PNG files: training curves of runs, image grids.

matplotlib is imported inside the functions (with the non-interactive Agg backend), so importing this
module costs nothing and works without a display.
"""

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

CURVE_DPI = 120


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


def plot_curves(runs: Sequence[tuple[str, list[dict[str, Any]]]], path: Path, title: str = "") -> None:
    """Accuracy and loss per epoch of several runs: validation solid, training dashed, one colour per run.

    Args:
        runs: (label, metrics.jsonl rows) per run.
        path: the PNG to write.
        title: figure title.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, (acc_ax, loss_ax) = plt.subplots(1, 2, figsize=(12, 4.5))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, (label, rows) in enumerate(runs):
        color = colors[i % len(colors)]
        epochs = [r["epoch"] for r in rows]
        for ax, metric in ((acc_ax, "acc"), (loss_ax, "loss")):
            ax.plot(epochs, [r[f"train_{metric}"] for r in rows], "--", marker=".", color=color, alpha=0.7)
            if all(f"val_{metric}" in r for r in rows):
                ax.plot(epochs, [r[f"val_{metric}"] for r in rows], "-", marker="o", ms=3, color=color, label=label)
    acc_ax.set(xlabel="epoch", ylabel="accuracy", title="accuracy (solid: validation, dashed: training)")
    loss_ax.set(xlabel="epoch", ylabel="loss", title="loss (solid: validation, dashed: training)")
    for ax in (acc_ax, loss_ax):
        ax.grid(alpha=0.3)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    acc_ax.legend(fontsize="small")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=CURVE_DPI)
    plt.close(fig)
