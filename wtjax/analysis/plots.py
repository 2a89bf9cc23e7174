"""PNG plots of the analysis results (matplotlib, headless)."""

from __future__ import annotations

from collections.abc import Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def cka_heatmap(matrix: np.ndarray, labels: Sequence[str], path: str, title: str = "Linear CKA") -> None:
    """Square heatmap of layer-to-layer CKA (the paper's Figures 3, 6 and 11); cell (i, j) = CKA(i, j)."""
    fig, ax = plt.subplots(figsize=(1.0 + 0.45 * len(labels), 0.8 + 0.45 * len(labels)))
    image = ax.imshow(matrix, vmin=0.0, vmax=1.0, cmap="magma", origin="lower")
    ax.set_xticks(range(len(labels)), labels, rotation=90)
    ax.set_yticks(range(len(labels)), labels)
    ax.set_title(title)
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def probe_curve(curves: dict[str, Sequence[float]], labels: Sequence[str], path: str) -> None:
    """Probe accuracy versus layer, one line per model (the paper's Figure 6, bottom)."""
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for name, accuracies in curves.items():
        ax.plot(range(len(accuracies)), accuracies, marker="o", label=name)
    ax.set_xticks(range(len(labels)), labels, rotation=45)
    ax.set_ylabel("linear probe accuracy")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
