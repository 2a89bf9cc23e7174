"""Figure 8: model width matters more than weight-tied depth (multi-mask, density 0.5).

Width factors {0.5, 1, 2} of the base width times depths K in {2, 4, 8}. At the CPU scale the
most expensive cell (width factor 2, K = 8: about 4x the base run) is left out; the paper's
comparison, a deep narrow model against a shallow model twice as wide (K = 8 at width 1 vs K = 2
at width 2), is in the grid.
"""

from __future__ import annotations

import scale as sc
from report import errorbar_panel, figure, save, series, write

from wtjax.sweep import accuracy, fmt, group, markdown_table

WIDTH_FACTORS = (0.5, 1.0, 2.0)
DEPTHS = {"cpu": (2, 4, 8), "paper": (2, 4, 8, 12)}
SKIP = {"cpu": {(2.0, 8)}, "paper": set()}


def runs(scale: str):
    return [
        sc.resnet_run(scale, seed=seed, width_factor=wf, depth=k, mode="multi", density=0.5)
        for seed in sc.SEEDS
        for wf in WIDTH_FACTORS
        for k in DEPTHS[scale]
        if (wf, k) not in SKIP[scale]
    ]


def aggregate(results, out_dir, scale):
    fig, (a, b) = figure(2)
    errorbar_panel(
        a,
        series(results, "depth", "width"),
        xlabel="weight-tied depth K",
        title="accuracy vs depth",
        labels={w: f"width {w}" for w in {r["tags"]["width"] for r in results}},
    )
    errorbar_panel(
        b,
        series(results, "width", "depth"),
        xlabel="width C",
        title="accuracy vs width",
        labels={k: f"K = {k}" for k in DEPTHS[scale]},
    )
    save(fig, out_dir / "fig8.png")
    g = group(results, "width", "depth")
    widths = sorted({w for w, _ in g})
    rows = [
        (
            w,
            *(fmt([accuracy(r) for r in g.get((w, k), [])]) for k in DEPTHS[scale]),
            f"{g[(w, DEPTHS[scale][0])][0]['summary']['num_params']:,}" if (w, DEPTHS[scale][0]) in g else "",
        )
        for w in widths
    ]
    write(
        out_dir,
        "# Figure 8 results (generated)\n\nHoldout accuracy (%), multi-mask density 0.5, mean ± std "
        "over seeds (parameters do not depend on K).\n\n"
        + markdown_table(("width", *(f"K = {k}" for k in DEPTHS[scale]), "params"), rows),
    )
