"""Figure 8: model width matters more than weight-tied depth (multi-mask, density 0.5).

Width factors {0.5, 1, 2} of the base width times depths K in {2, 4, 8, 12}: the full grid,
including the paper's comparison of a 12-deep model with a 2-deep model twice as wide.
"""

from __future__ import annotations

from experiments import scale as sc
from experiments.report import (
    VERDICT_NOTE,
    Comparison,
    accuracy,
    claim,
    errorbar_panel,
    figure,
    fmt,
    group,
    markdown_table,
    save,
    series,
    verdict_table,
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


def comparisons(results) -> list[Comparison]:
    """The paper's comparison at each pair of widths: the shallowest model at twice the width minus
    the deepest model (the paper: "a 12-depth ... significantly lags behind a 2-depth ... which is 2
    times wider")."""
    g = group(results, "width", "depth")
    widths = sorted({w for w, _ in g})
    shallow, deep = DEPTHS[0], DEPTHS[-1]
    return [
        Comparison.paired(
            f"width {wide}, K = {shallow} - width {narrow}, K = {deep}",
            g.get((wide, shallow), []),
            g.get((narrow, deep), []),
            +1,
            paper='> 0, "significantly" (Fig. 8)',
        )
        for narrow, wide in zip(widths, widths[1:], strict=False)
        if wide == 2 * narrow
    ]


def claims(results, scale):
    """The claim-table row: the comparison at the base width and twice it."""
    w = sc.width(scale, 1.0)
    rows = [c for c in comparisons(results) if c.name.endswith(f"width {w}, K = {DEPTHS[-1]}")]
    return [
        claim(
            "Width matters more than tied depth: 2x wider at K = 2 beats K = 12 (Fig. 8)",
            c,
            sc.setting(scale),
        )
        for c in rows
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
        + markdown_table(("width", *(f"K = {k}" for k in DEPTHS), "params"), rows)
        + "\nThe shallowest model at twice the width minus the deepest one, paired by seed (points):\n\n"
        + verdict_table(comparisons(results))
        + "\n"
        + VERDICT_NOTE
        + "\n",
    )
