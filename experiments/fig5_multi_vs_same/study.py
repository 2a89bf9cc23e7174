"""Figure 5: multi-mask vs same-mask weight tying across depths, densities and training FLOPs,
with the dropout (DropConnect) baseline and the not-tied model.

(a) depth K in {2, 4, 8} at density 0.5; (b) density in {0.1, 0.25, 0.5, 0.75} at K = 8 (0.1: the
runs of Figure 6), with dropout (DropConnect on the tied weights at rate 1 - density, at 0.25-0.75),
the dense weight-tied model and the not-tied dense model; (c) every run of (a) and (b) against its
training FLOPs (effective: masked weights cost nothing, as on sparse hardware).
"""

from __future__ import annotations

from experiments import scale as sc
from experiments.report import (
    VERDICT_NOTE,
    Comparison,
    accuracy,
    claim,
    effective_train_flops,
    errorbar_panel,
    figure,
    fmt,
    group,
    markdown_table,
    save,
    seed_means,
    series,
    verdict_table,
    write,
)

DEPTHS = (2, 4, 8)
DENSITIES = (0.25, 0.5, 0.75)  # dropout, same- and multi-mask
MASK_DENSITIES = (0.1, *DENSITIES)  # same- and multi-mask (0.1: shared with Figure 6)


def runs(scale: str):
    out = []
    for seed in sc.SEEDS:
        for depth in DEPTHS:
            for mode in ("same", "multi"):
                out.append(sc.resnet_run(scale, seed=seed, depth=depth, mode=mode, density=0.5))
        for density in MASK_DENSITIES:
            for mode in ("same", "multi"):
                out.append(sc.resnet_run(scale, seed=seed, depth=8, mode=mode, density=density))
        for density in DENSITIES:
            out.append(sc.resnet_run(scale, seed=seed, depth=8, mode="dropout", density=density))
        out.append(sc.resnet_run(scale, seed=seed, depth=8, mode="dense"))
        out.append(sc.resnet_run(scale, seed=seed, depth=8, form="not_tied"))
    return list({r.id: r for r in out}.values())


PAPER_GAIN = "+0.2 to +1 (every K, density, FLOPs)"


def comparisons(results) -> tuple[list[Comparison], Comparison, list[Comparison]]:
    """Multi- minus same-mask per (K, density) cell; the same gain averaged over the cells seed by
    seed (one number per seed: does one seed carry it?); multi-mask minus dropout and minus the
    not-tied model (K = 8)."""
    g = group(results, "form", "depth", "density", "mode")
    cells = sorted({(k, d) for f, k, d, m in g if f == "tied" and m == "multi"})
    gains = [
        Comparison.paired(
            f"multi - same, K = {k}, density {d:g}",
            g[("tied", k, d, "multi")],
            g.get(("tied", k, d, "same"), []),
            +1,
            paper=PAPER_GAIN,
        )
        for k, d in cells
    ]
    pooled = seed_means(
        [c for c in gains if c.n], "multi - same, mean over the cells above", +1, paper="+0.2 to +1"
    )
    others = [
        Comparison.paired(
            f"multi - dropout, K = 8, density {d:g}",
            g.get(("tied", 8, d, "multi"), []),
            g[("tied", 8, d, "dropout")],
            +1,
            paper="> 0 in all cases",
        )
        for d in DENSITIES
        if ("tied", 8, d, "dropout") in g
    ]
    others.append(
        Comparison.paired(
            "multi 0.5 - not tied (dense), K = 8",
            g.get(("tied", 8, 0.5, "multi"), []),
            g.get(("not_tied", 8, 1.0, "dense"), []),
            +1,
            paper="> 0 in some instances",
        )
    )
    return gains, pooled, others


def claims(results, scale):
    """The claim-table rows: the multi- minus same-mask gain (over the cells, seed by seed) and
    multi-mask against dropout at density 0.5."""
    gains, pooled, others = comparisons(results)
    setting = sc.setting(scale) + f"; {len(gains)} (K, density) cells"
    at_half = next((c for c in others if c.name.endswith("density 0.5")), others[-1])
    return [
        claim("Multi-mask beats same-mask weight tying at every depth and density (Fig. 5)", pooled, setting),
        claim(
            "Multi-mask beats dropout on the tied weights (Fig. 5b; density 0.5, K = 8)",
            at_half,
            sc.setting(scale),
        ),
    ]


def _plot(results, path) -> None:
    """The three panels of Figure 5."""
    tied = [r for r in results if r["tags"]["form"] == "tied"]
    labels = {"same": "same-mask", "multi": "multi-mask", "dropout": "dropout", "dense": "dense"}
    colors = {"multi": "C0", "same": "C1", "dropout": "C2"}
    fig, (a, b, c) = figure(3)
    errorbar_panel(
        a,
        series(tied, "depth", "mode", where=lambda t: t["density"] == 0.5 and t["mode"] != "dropout"),
        xlabel="weight-tied depth K",
        title="(a) density 0.5",
        labels=labels,
        colors=colors,
    )
    errorbar_panel(
        b,
        series(tied, "density", "mode", where=lambda t: t["depth"] == 8 and t["mode"] != "dense"),
        xlabel="density",
        title="(b) K = 8",
        labels=labels,
        colors=colors,
    )
    for form, mode, style, label in (
        ("not_tied", "dense", "--", "not tied"),
        ("tied", "dense", ":", "tied, dense"),
    ):
        accs = [accuracy(r) for r in results if (r["tags"]["form"], r["tags"]["mode"]) == (form, mode)]
        if accs:
            b.axhline(sum(accs) / len(accs), color="gray", ls=style, label=f"{label} (seed mean)")
    b.legend(fontsize=8)
    for mode in ("same", "multi"):
        pts = group([r for r in tied if r["tags"]["mode"] == mode], "depth", "density")
        xs = [sum(effective_train_flops(r) for r in rs) / len(rs) / 1e12 for rs in pts.values()]
        ys = [sum(accuracy(r) for r in rs) / len(rs) for rs in pts.values()]
        c.scatter(xs, ys, label=labels[mode], color=colors[mode])
    c.set_xlabel("effective training FLOPs (T)")
    c.set_ylabel("holdout accuracy (%)")
    c.set_title("(c) every (depth, density), seed mean", fontsize=10)
    c.grid(alpha=0.3)
    c.legend(fontsize=8)
    save(fig, path)


def aggregate(results, out_dir, scale):
    _plot(results, out_dir / "fig5.png")
    rows = []
    for (form, mode, depth, density), rs in sorted(
        group(results, "form", "mode", "depth", "density").items(), key=str
    ):
        rows.append(
            (
                form,
                mode,
                depth,
                density,
                fmt([accuracy(r) for r in rs]),
                len(rs),
                f"{sum(effective_train_flops(r) for r in rs) / len(rs) / 1e12:.2f}",
                f"{rs[0]['summary']['num_params']:,}",
            )
        )
    gains, pooled, others = comparisons(results)
    write(
        out_dir,
        "# Figure 5 results (generated by `python -m wtjax.tools.sweep aggregate`)\n\n"
        "Holdout accuracy (%), mean ± std over seeds; train TFLOPs count masked weights as free.\n\n"
        + markdown_table(
            (
                "form",
                "mask mode",
                "K",
                "density",
                "holdout acc. (%)",
                "seeds",
                "train TFLOPs (eff.)",
                "params",
            ),
            rows,
        )
        + "\nMulti-mask minus same-mask at each K and density, paired by seed (points); the last row "
        "averages each seed's gains over the cells:\n\n"
        + verdict_table([*gains, pooled])
        + "\nMulti-mask minus dropout and minus the not-tied model (points):\n\n"
        + verdict_table(others)
        + "\n"
        + VERDICT_NOTE
        + "\n",
    )
