"""PNG plots of the analysis results (matplotlib, headless).

Figures are :class:`matplotlib.figure.Figure` objects saved directly, without pyplot: no display is
needed and the caller's matplotlib backend is left as it is (importing this module changes nothing).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from wtjax import _extras

_extras.require("analysis", "wtjax.analysis.plots")

from matplotlib.figure import Figure  # noqa: E402


def cka_heatmap(matrix: np.ndarray, labels: Sequence[str], path: str, title: str = "Linear CKA") -> None:
    """Square heatmap of layer-to-layer CKA (the paper's Figures 3, 6 and 11); cell (i, j) = CKA(i, j)."""
    cka_heatmaps({title: matrix}, labels, path)


def cka_heatmaps(matrices: dict[str, np.ndarray], labels: Sequence[str], path: str) -> None:
    """CKA heatmaps side by side on one colour scale [0, 1], one panel per ``{title: matrix}``."""
    n, size = len(matrices), 0.45 * len(labels)
    fig = Figure(figsize=(n * (1.6 + size), 0.8 + size))
    axes = fig.subplots(1, n, squeeze=False)
    for ax, (title, matrix) in zip(axes[0], matrices.items(), strict=True):
        image = ax.imshow(matrix, vmin=0.0, vmax=1.0, cmap="magma", origin="lower")
        ax.set_xticks(range(len(labels)), labels, rotation=90)
        ax.set_yticks(range(len(labels)), labels)
        ax.set_title(title, fontsize=10)
        fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def probe_curve(
    curves: dict[str, Sequence[float]],
    labels: Sequence[str],
    path: str,
    errors: dict[str, Sequence[float]] | None = None,
) -> None:
    """Probe accuracy versus layer, one line per model (the paper's Figure 6, bottom); ``errors``
    (e.g. the std over seeds) draws error bars."""
    fig = Figure(figsize=(6, 3.5))
    ax = fig.subplots()
    for name, accuracies in curves.items():
        yerr = None if errors is None else errors.get(name)
        ax.errorbar(range(len(accuracies)), accuracies, yerr=yerr, marker="o", capsize=3, label=name)
    ax.set_xticks(range(len(labels)), labels, rotation=45)
    ax.set_ylabel("linear probe accuracy")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


# (metric key, panel title) of :func:`training_curves`, one panel each.
_CURVES = (
    ("train/loss", "train loss"),
    ("eval/accuracy", "eval accuracy"),
    ("train/learning_rate", "learning rate"),
)


def training_curves(records: dict[int, dict], path: str, title: str = "") -> None:
    """Train loss, eval accuracy and learning rate against the step, one panel each.

    ``records``: ``{step: {metric: value}}`` as :func:`wtjax.job.metrics.read_jsonl` returns them.
    Every point is marked, so a run of a few steps still shows its values; a metric with no
    finite value yet leaves its panel empty (titled as such).
    """
    fig = Figure(figsize=(11, 3.2))
    for ax, (key, name) in zip(fig.subplots(1, len(_CURVES)), _CURVES, strict=True):
        points = [(s, r[key]) for s, r in sorted(records.items()) if isinstance(r.get(key), (int, float))]
        if points:
            steps, values = zip(*points, strict=True)
            ax.plot(steps, values, marker="o", markersize=3)
        ax.set_title(name if points else f"{name} (none yet)", fontsize=10)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
