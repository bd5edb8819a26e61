"""Figures of an attack: robust accuracy against epsilon, and the lectures' example grid.

The grid follows the lectures' panda slide, one row per image:
original (class, confidence) | perturbation, amplified to be visible | adversarial (class, confidence).
"""

from pathlib import Path
from typing import Any

import numpy as np

from cnncli.adversarial.robustness import Examples

CELL_INCHES = 1.9
DPI = 120


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only: never open a window
    import matplotlib.pyplot as plt

    return plt


def accuracy_curve(result: dict[str, Any], path: Path, title: str) -> Path:
    """Accuracy (and, where defined, attack success rate) against epsilon, as a PNG."""
    plt = _pyplot()
    rows = result["rows"]
    eps = [r["eps"] for r in rows]
    fig, ax = plt.subplots(figsize=(5.5, 3.8), dpi=DPI)
    ax.plot(eps, [100 * r["accuracy"] for r in rows], "o-", label="accuracy under attack")
    ax.axhline(100 * rows[0]["clean_accuracy"], color="gray", ls="--", lw=1, label="clean accuracy")
    success = [(e, 100 * r["success_rate"]) for e, r in zip(eps, rows) if r["success_rate"] is not None]
    if success:
        ax.plot(*zip(*success), "s:", color="tab:red", label="attack success rate")
    ax.set(xlabel="epsilon (pixels in [0, 1])", ylabel="%", ylim=(-2, 102), title=title)
    return _save(plt, fig, ax, path)


def autoattack_curve(result: dict[str, Any], path: Path, title: str) -> Path:
    """Robust accuracy against epsilon after each attack of the AutoAttack sequence (the last line is the result)."""
    plt = _pyplot()
    rows = result["rows"]
    eps = [r["eps"] for r in rows]
    fig, ax = plt.subplots(figsize=(5.5, 3.8), dpi=DPI)
    stages = [s["attack"] for s in rows[0]["stages"]]
    for i, name in enumerate(stages):
        last = i == len(stages) - 1
        label = "clean" if name == "clean" else (f"after {name}" + (" = AutoAttack" if last else ""))
        ax.plot(eps, [100 * r["stages"][i]["robust_accuracy"] for r in rows], "o-" if last else ".--",
                lw=2.2 if last else 1, color="black" if last else None, label=label)
    norm = result["attack"]["norm"]
    ax.set(xlabel=f"epsilon ({norm}{', pixels in [0, 1]' if norm == 'linf' else ''})", ylabel="robust accuracy (%)",
           ylim=(-2, 102), title=title)
    return _save(plt, fig, ax, path)


def amplify(delta: np.ndarray) -> tuple[np.ndarray, float]:
    """Map a perturbation to [0, 1] around mid-gray so that its largest entry is fully saturated."""
    peak = float(np.abs(delta).max())
    if peak == 0.0:
        return np.full_like(delta, 0.5), 1.0
    return 0.5 + delta / (2 * peak), 0.5 / peak


def _show(ax, image: np.ndarray, title: str, color: str = "black") -> None:
    gray = image.shape[-1] == 1
    ax.imshow(image[..., 0] if gray else image, cmap="gray" if gray else None, vmin=0.0, vmax=1.0)
    ax.set_title(title, fontsize=8, color=color)
    ax.set_xticks([])
    ax.set_yticks([])


def example_grid(examples: Examples, class_names: list[str], path: Path, title: str) -> Path:
    """The lectures' layout: original (class, confidence) | amplified perturbation | adversarial (class, confidence)."""
    plt = _pyplot()
    r = examples.results
    n = len(examples.x)
    fig, axes = plt.subplots(n, 3, figsize=(3 * CELL_INCHES, n * CELL_INCHES + 0.5), dpi=DPI, squeeze=False)
    for i in range(n):
        clean, adv = int(r["clean_pred"][i]), int(r["adv_pred"][i])
        delta = examples.x_adv[i] - examples.x[i]
        picture, gain = amplify(delta)
        truth = "" if clean == int(r["label"][i]) else f" (true: {class_names[int(r['label'][i])]})"
        _show(axes[i, 0], examples.x[i], f"{class_names[clean]} {r['clean_conf'][i]:.0%}{truth}")
        _show(axes[i, 1], picture, f"perturbation x{gain:.0f} (Linf {np.abs(delta).max():.3f})")
        _show(axes[i, 2], examples.x_adv[i], f"{class_names[adv]} {r['adv_conf'][i]:.0%}",
              color="tab:red" if adv != int(r["label"][i]) else "black")
    fig.suptitle(f"{title}, eps = {examples.eps:g}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def _save(plt, fig, ax, path: Path) -> Path:
    """Grid, legend and a tight layout, written to `path`; the figure is closed."""
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
