"""Figure 7: a sparse multi-mask weight-tied model beats the dense weight-tied model trained with
the same number of FLOPs (K = 8).

Masked weights cost no FLOPs on sparse hardware, so at equal training FLOPs the multi-mask model
at density d trains for F_dense / F_sparse times the dense model's epochs (about 1/d: the tied
convolutions dominate). The factor is computed from the architecture here and checked against
the accounting of the finished runs in the table. The same-epoch comparison (the paper's "similar
pattern with the same number of epochs") uses the epoch-factor-1 runs.
"""

from __future__ import annotations

from experiments import scale as sc
from experiments.report import (
    accuracy,
    effective_train_flops,
    errorbar_panel,
    figure,
    fmt,
    group,
    markdown_table,
    paired_gain,
    save,
    series,
    write,
)

DEPTH = 8
WIDTH_FACTORS = {"cpu": (0.5, 1.0), "paper": (0.5, 1.0, 2.0)}
DENSITIES = {"cpu": (0.5,), "paper": (0.25, 0.5, 0.75)}


def flop_ratio(width: int, density: float, depth: int = DEPTH) -> float:
    """F_dense / F_sparse of the ResNet-like forward pass: a 3x3 stem (3 -> C) plus K reuses of
    two 3x3 C -> C convolutions whose kernels keep ``density`` (per output pixel)."""
    stem, tied = 27 * width, depth * 18 * width * width
    return (stem + tied) / (stem + tied * density)


def runs(scale: str):
    out = []
    for seed in sc.SEEDS:
        for wf in WIDTH_FACTORS[scale]:
            w = sc.width(scale, wf)
            out.append(sc.resnet_run(scale, seed=seed, width_factor=wf, depth=DEPTH, mode="dense"))
            for d in DENSITIES[scale]:
                out.append(
                    sc.resnet_run(scale, seed=seed, width_factor=wf, depth=DEPTH, mode="multi", density=d)
                )
                factor = round(flop_ratio(w, d), 2)
                out.append(
                    sc.resnet_run(
                        scale,
                        seed=seed,
                        width_factor=wf,
                        depth=DEPTH,
                        mode="multi",
                        density=d,
                        epoch_factor=factor,
                    )
                )
    return out


def aggregate(results, out_dir, scale):
    base_epochs = sc.scale(scale)["epochs"]
    equal_flops = [r for r in results if r["tags"]["mode"] == "dense" or r["tags"]["epochs"] > base_epochs]
    same_epochs = [r for r in results if r["tags"]["epochs"] == base_epochs]
    fig, (a, b) = figure(2)
    labels = {1.0: "dense", **{d: f"multi-mask, density {d}" for d in DENSITIES[scale]}}
    errorbar_panel(
        a,
        series(equal_flops, "width", "density"),
        xlabel="width C",
        title="(a) equal training FLOPs",
        labels=labels,
    )
    errorbar_panel(
        b,
        series(same_epochs, "width", "density"),
        xlabel="width C",
        title=f"(b) equal epochs ({base_epochs:g})",
        labels=labels,
    )
    save(fig, out_dir / "fig7.png")

    rows = []
    g = group(results, "width", "density", "epochs")
    for (w, d, e), rs in sorted(g.items()):
        dense = g.get((w, 1.0, base_epochs), [])
        budget = "equal FLOPs" if e > base_epochs else "equal epochs"
        gain = "" if d == 1.0 else fmt(paired_gain(rs, dense), 2)
        flops = sum(effective_train_flops(r) for r in rs) / len(rs) / 1e12
        rows.append(
            (
                w,
                "dense" if d == 1.0 else f"multi {d}",
                e,
                "" if d == 1.0 else budget,
                fmt([accuracy(r) for r in rs]),
                gain,
                f"{flops:.2f}",
            )
        )
    write(
        out_dir,
        "# Figure 7 results (generated)\n\nHoldout accuracy (%), K = 8, mean ± std over seeds. "
        "'vs dense' is the paired-by-seed difference to the dense model of the same width trained for "
        f"{base_epochs:g} epochs; train TFLOPs count masked weights as free.\n\n"
        + markdown_table(
            ("width", "model", "epochs", "budget", "holdout acc. (%)", "vs dense", "train TFLOPs (eff.)"),
            rows,
        ),
    )
