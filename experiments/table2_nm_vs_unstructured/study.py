"""Table 2: multi-mask keeps its advantage over same-mask with 2:4 structured sparsity.

Same-mask and multi-mask at K = 8, density 0.5, with unstructured masks and with N:M = 2:4
masks (groups of 4 along each kernel's input-channel axis). The CPU scale runs its base width
only; the paper scale runs the paper's Small and Large widths, 44 and 172 (the widths of Table
1b's parameter counts).
"""

from __future__ import annotations

from experiments import scale as sc
from experiments.report import (
    accuracy,
    figure,
    fmt,
    group,
    markdown_table,
    mean_std,
    paired_gain,
    save,
    write,
)

# The paper's Small and Large widths (44, 172: sc.SIZES) at the paper scale; the base width at the CPU scale.
WIDTHS = {"cpu": (None,), "paper": (sc.SIZES["small"], sc.SIZES["large"])}
KINDS = {"unstructured": "unstructured 0.5", "nm": "2:4"}


def runs(scale: str):
    return [
        sc.resnet_run(scale, seed=seed, width_abs=w, depth=8, mode=mode, density=0.5, kind=kind)
        for seed in sc.SEEDS
        for w in WIDTHS[scale]
        for kind in KINDS
        for mode in ("same", "multi")
    ]


def aggregate(results, out_dir, scale):
    g = group(results, "width", "kind", "mode")
    cells = [(w, k) for w in sorted({key[0] for key in g}) for k in KINDS]
    rows = []
    for w, k in cells:
        same, multi = g.get((w, k, "same"), []), g.get((w, k, "multi"), [])
        rows.append(
            (
                w,
                KINDS[k],
                fmt([accuracy(r) for r in same]),
                fmt([accuracy(r) for r in multi]),
                fmt(paired_gain(multi, same), 2),
            )
        )
    write(
        out_dir,
        "# Table 2 results (generated)\n\nHoldout accuracy (%), K = 8, mean ± std over seeds; "
        "the gain is multi - same, paired by seed.\n\n"
        + markdown_table(("width", "sparsity", "same-mask", "multi-mask", "multi - same"), rows),
    )

    fig, (ax,) = figure(1, width=5)
    for i, mode in enumerate(("same", "multi")):
        stats = [mean_std([accuracy(r) for r in g.get((w, k, mode), [])]) for w, k in cells]
        xs = [x + 0.38 * i for x in range(len(cells))]
        ax.bar(
            xs, [m for m, _, _ in stats], 0.38, yerr=[s for _, s, _ in stats], capsize=3, label=f"{mode}-mask"
        )
    ax.set_xticks([x + 0.19 for x in range(len(cells))], [f"{KINDS[k]}\nwidth {w}" for w, k in cells])
    ax.set_ylim(max(0.0, min((accuracy(r) for r in results), default=5.0) - 5), None)
    ax.set_ylabel("holdout accuracy (%)")
    ax.set_title("Table 2: 2:4 vs unstructured, K = 8", fontsize=10)
    ax.legend(fontsize=8)
    save(fig, out_dir / "table2.png")
