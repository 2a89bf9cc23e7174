"""Plot and table helpers shared by the study aggregators (mean ± std over seeds)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from wtjax.tools.sweep import accuracy, group, mean_std  # noqa: E402


def series(results: Sequence[dict], x: str, line: str, *, where: Callable[[dict], bool] = lambda t: True):
    """``{line value: [(x, mean, std, n), ...]}`` of final accuracy, grouping seeds together."""
    out: dict = {}
    for (lv, xv), rs in sorted(group([r for r in results if where(r["tags"])], line, x).items(), key=natural):
        out.setdefault(lv, []).append((xv, *mean_std([accuracy(r) for r in rs])))
    return {k: sorted(v) for k, v in out.items()}


def natural(item):
    """Sort key of a ``(key tuple, value)`` item: numbers numerically, then anything else as text."""
    return tuple((0, v, "") if isinstance(v, (int, float)) else (1, 0, str(v)) for v in item[0])


def effective_train_flops(r: dict) -> float:
    """Training FLOPs of the run: 3x the forward FLOPs per image (forward + backward) times the
    images seen, with the masked fraction of the tied convolutions removed (each kernel weight
    of a stride-1 convolution costs 2*H*W FLOPs per image and reuse)."""
    acc = r["summary"]["accounting"]
    fwd = acc["flops_per_image"]
    side = 32 // r["overrides"].get("data.downsample", 1)  # CIFAR-10 images, maybe pooled
    if r["tags"].get("mode") in ("same", "multi"):
        for site in acc["tied"]:
            fwd -= 2 * side * side * (site["block_params"] - site["active_per_reuse"]) * site["depth"]
    images = r["summary"]["step"] * r["overrides"]["batch_size"]
    return 3 * fwd * images


def errorbar_panel(ax, lines: dict, *, xlabel: str, title: str, logx: bool = False, labels=None, colors=None):
    """One panel: a line with error bars (std over seeds) per key of ``lines``; ``labels`` and
    ``colors`` map keys to legend text and colours (keep a model's colour across panels)."""
    for key, pts in lines.items():
        xs, ms, ss, _ = zip(*pts, strict=True)
        label = (labels or {}).get(key, str(key))
        ax.errorbar(xs, ms, yerr=ss, marker="o", capsize=3, label=label, color=(colors or {}).get(key))
    if logx:
        ax.set_xscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("holdout accuracy (%)")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)


def save(fig, path: Path) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def figure(ncols: int = 1, width: float = 4.5, height: float = 3.6):
    fig, axes = plt.subplots(1, ncols, figsize=(width * ncols, height), squeeze=False)
    return fig, list(axes[0])


def write(out_dir: Path, text: str, name: str = "results.md") -> None:
    (out_dir / name).write_text(text)
