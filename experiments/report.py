"""Tables, statistics and plots of the studies' aggregators (mean ± std over seeds).

A result is the dict :func:`wtjax.tools.sweep.collect` writes for a finished run (``tags``,
``summary``, ``overrides``, ...). Figures are built with :class:`matplotlib.figure.Figure`, not
pyplot, so aggregating never switches the caller's matplotlib backend.
"""

from __future__ import annotations

import dataclasses
import math
import statistics
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure
from scipy import stats


def mean_std(values: Sequence[float]) -> tuple[float, float, int]:
    """Mean, sample standard deviation (0 for one value) and count."""
    values = [float(v) for v in values]
    if not values:
        return float("nan"), float("nan"), 0
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return statistics.fmean(values), std, len(values)


def group(results: Iterable[dict], *keys: str) -> dict[tuple, list[dict]]:
    """Results grouped by the given tag names (seeds end up in the same group)."""
    groups: dict[tuple, list[dict]] = {}
    for r in results:
        groups.setdefault(tuple(r["tags"].get(k) for k in keys), []).append(r)
    return groups


def accuracy(r: dict) -> float:
    """Final eval accuracy, in percent."""
    return 100.0 * r["summary"]["eval/accuracy"]


def paired_gain(a: Iterable[dict], b: Iterable[dict]) -> list[float]:
    """Accuracy of ``a`` minus ``b``, paired by seed (seeds present in both only)."""
    by_seed = {r["tags"]["seed"]: accuracy(r) for r in b}
    return [accuracy(r) - by_seed[r["tags"]["seed"]] for r in a if r["tags"]["seed"] in by_seed]


VERDICTS = ("reproduced", "contradicted", "inconclusive")


@dataclasses.dataclass(frozen=True)
class Comparison:
    """A paper claim tested by per-seed paired differences ``a - b``, and its verdict.

    The rule (``experiments/README.md``, "Verdicts"): the 95% interval of the mean difference is
    the paired t interval, ``mean ± t(0.975, n - 1) * sd / sqrt(n)`` (sample sd, n - 1 degrees of
    freedom; the seeds are the pairs). The verdict is ``reproduced`` when the interval excludes 0
    on the side of ``paper_direction`` (+1: the paper has ``a > b``; -1: ``a < b``),
    ``contradicted`` when it excludes 0 on the other side, and ``inconclusive`` otherwise,
    including when there is no interval (fewer than 2 seeds).

    Attributes:
      name: what is compared, e.g. ``"multi-mask - same-mask, K = 8"``.
      paper_direction: +1 or -1, the sign of ``a - b`` the paper reports.
      diffs: the per-seed differences ``a - b``, in the order of ``seeds``.
      seeds: the seed of each difference.
      paper: the paper's number for the claim, as text (e.g. ``"+2.32 (84.07 vs 81.75)"``).
      unit: the unit of the differences, for tables (``"pts"``: accuracy points).
    """

    name: str
    paper_direction: int
    diffs: tuple[float, ...]
    seeds: tuple = ()
    paper: str = ""
    unit: str = "pts"

    def __post_init__(self):
        if self.paper_direction not in (1, -1):
            raise ValueError(f"{self.name}: paper_direction must be +1 or -1, got {self.paper_direction!r}")
        if self.seeds and len(self.seeds) != len(self.diffs):
            raise ValueError(f"{self.name}: {len(self.diffs)} differences but {len(self.seeds)} seeds")
        object.__setattr__(self, "diffs", tuple(float(d) for d in self.diffs))
        object.__setattr__(self, "seeds", tuple(self.seeds))

    @classmethod
    def paired(cls, name, a, b, paper_direction, value=None, **kw) -> Comparison:
        """``value(a) - value(b)`` for the seeds present in both result lists (``value``: final
        accuracy in % by default), ordered by seed."""
        value = value or accuracy
        by_seed = {r["tags"]["seed"]: value(r) for r in b}
        pairs = sorted(
            (r["tags"]["seed"], value(r) - by_seed[r["tags"]["seed"]])
            for r in a
            if r["tags"]["seed"] in by_seed
        )
        return cls(name, paper_direction, tuple(d for _, d in pairs), tuple(s for s, _ in pairs), **kw)

    @property
    def n(self) -> int:
        return len(self.diffs)

    @property
    def mean(self) -> float:
        return statistics.fmean(self.diffs) if self.diffs else math.nan

    @property
    def ci(self) -> tuple[float, float] | None:
        """The 95% paired t interval of the mean difference; ``None`` below 2 seeds."""
        if self.n < 2:
            return None
        half = stats.t.ppf(0.975, self.n - 1) * statistics.stdev(self.diffs) / math.sqrt(self.n)
        return self.mean - half, self.mean + half

    @property
    def verdict(self) -> str:
        ci = self.ci
        if ci is None or ci[0] <= 0.0 <= ci[1]:
            return "inconclusive"
        return "reproduced" if (ci[0] > 0) == (self.paper_direction > 0) else "contradicted"

    def cells(self, digits: int = 2) -> tuple[str, str, str, str]:
        """Table cells: per-seed differences, mean, 95% interval, verdict."""
        per_seed = " / ".join(f"{d:+.{digits}f}" for d in self.diffs) or "no seeds"
        ci = self.ci
        interval = "" if ci is None else f"[{ci[0]:+.{digits}f}, {ci[1]:+.{digits}f}]"
        mean = "" if not self.diffs else f"{self.mean:+.{digits}f}"
        return per_seed, mean, interval, self.verdict


def verdict_table(comparisons: Iterable[Comparison], digits: int = 2) -> str:
    """The markdown table of ``comparisons``: the paper's number, per-seed differences, their mean,
    the 95% paired t interval and the verdict (see :class:`Comparison`)."""
    rows = []
    for c in comparisons:
        seeds = ", ".join(str(s) for s in c.seeds) if c.seeds else ""
        rows.append((c.name, c.paper, f"{seeds}" if seeds else "", *c.cells(digits)))
    return markdown_table(
        ("comparison (a - b)", "paper", "seeds", "per seed", "mean", "95% CI (paired t)", "verdict"), rows
    )


def claim(text: str, comparison: Comparison, setting: str, digits: int = 2) -> dict:
    """A row of the claim table (``wtjax.tools.sweep.CLAIM_COLUMNS``): the paper's claim, its
    number, ours (mean difference, 95% interval, seeds and ``setting``) and the verdict; a
    comparison without results yet says it is running and has no verdict."""
    c = comparison
    if c.n == 0:
        return {
            "claim": text,
            "paper": c.paper,
            "ours": f"running: no results yet ({setting})",
            "verdict": "—",
        }
    ci = c.ci
    interval = f", 95% CI [{ci[0]:+.{digits}f}, {ci[1]:+.{digits}f}]" if ci else ", no interval"
    ours = f"{c.mean:+.{digits}f} {c.unit}{interval}; {c.n} seed{'s' * (c.n > 1)}, {setting}"
    return {"claim": text, "paper": c.paper, "ours": ours, "verdict": c.verdict}


def seed_means(comparisons: Sequence[Comparison], name: str, paper_direction: int, **kw) -> Comparison:
    """One comparison whose per-seed difference is the mean of each seed's differences over
    ``comparisons`` (e.g. the multi- minus same-mask gain averaged over every depth and density):
    the seeds stay the unit of replication. Seeds missing from any comparison are left out."""
    common = set.intersection(*(set(c.seeds) for c in comparisons)) if comparisons else set()
    seeds = sorted(common)
    diffs = [
        statistics.fmean(dict(zip(c.seeds, c.diffs, strict=True))[s] for c in comparisons) for s in seeds
    ]
    return Comparison(name, paper_direction, tuple(diffs), tuple(seeds), **kw)


VERDICT_NOTE = (
    "Verdicts: per-seed paired differences a - b, their mean and 95% paired t interval (n - 1 degrees "
    "of freedom); `reproduced` when the interval excludes 0 in the paper's direction, `contradicted` "
    "when it excludes 0 the other way, else `inconclusive` (see experiments/README.md)."
)


def fmt(values: Sequence[float], digits: int = 1) -> str:
    """``mean ± std (n)`` for a table cell; empty when there are no values."""
    m, s, n = mean_std(values)
    return "" if n == 0 else f"{m:.{digits}f} ± {s:.{digits}f}" + ("" if n >= 3 else f" (n={n})")


def markdown_table(headers: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    """A markdown table, one row per item of ``rows``, cells formatted with ``str``."""
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


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


def save(fig: Figure, path: Path) -> None:
    """Writes ``fig`` as a PNG (tight layout, 120 dpi)."""
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def figure(ncols: int = 1, width: float = 4.5, height: float = 3.6) -> tuple[Figure, list]:
    """A figure with one row of ``ncols`` panels and the list of their axes."""
    fig = Figure(figsize=(width * ncols, height))
    axes = fig.subplots(1, ncols, squeeze=False)
    return fig, list(axes[0])


def write(out_dir: Path, text: str, name: str = "results.md") -> None:
    """Writes a generated table into the study folder."""
    (out_dir / name).write_text(text)
