"""Figure 8: model width matters more than weight-tied depth (multi-mask, density 0.5).

Width factors {0.5, 1, 2} of the base width times depths K in {2, 4, 8, 12}: the full grid,
including the paper's comparison of a 12-deep model with a 2-deep model twice as wide.
"""

from __future__ import annotations

from experiments import scale as sc
from experiments.report import (
    accuracy,
    errorbar_panel,
    figure,
    fmt,
    group,
    markdown_table,
    save,
    series,
    write,
)

WIDTH_FACTORS = (0.5, 1.0, 2.0)
DEPTHS = (2, 4, 8, 12)


def runs(scale: str):
    return [
        sc.resnet_run(scale, seed=seed, width_factor=wf, depth=k, mode="multi", density=0.5)
        for seed in sc.SEEDS
        for wf in WIDTH_FACTORS
        for k in DEPTHS
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
        labels={k: f"K = {k}" for k in DEPTHS},
    )
    save(fig, out_dir / "fig8.png")
    g = group(results, "width", "depth")
    widths = sorted({w for w, _ in g})
    rows = [
        (
            w,
            *(fmt([accuracy(r) for r in g.get((w, k), [])]) for k in DEPTHS),
            f"{g[(w, DEPTHS[0])][0]['summary']['num_params']:,}" if (w, DEPTHS[0]) in g else "",
        )
        for w in widths
    ]
    write(
        out_dir,
        "# Figure 8 results (generated)\n\nHoldout accuracy (%), multi-mask density 0.5, mean ± std "
        "over seeds (parameters do not depend on K).\n\n"
        + markdown_table(("width", *(f"K = {k}" for k in DEPTHS), "params"), rows),
    )
