"""Aggregate ``results/*.json`` into ``results.md`` (mean ± std over seeds) and PNG plots.

python experiments/pruning_deq/aggregate.py
"""

from __future__ import annotations

import collections
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

HERE = Path(__file__).resolve().parent


def load(directory=HERE / "results") -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(Path(directory).glob("*.json"))]


def ms(values, scale=1.0, digits=1) -> str:
    v = np.asarray([x for x in values if x is not None], float) * scale
    if v.size == 0:
        return "—"
    return f"{v.mean():.{digits}f} ± {v.std():.{digits}f} (n={v.size})"


def group(results, name):
    return [r for r in results if r["group"] == name]


def by(runs, *keys):
    out = collections.defaultdict(list)
    for r in runs:
        out[tuple(r[k] if not callable(k) else k(r) for k in keys)].append(r)
    return out


def table(header, rows) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def scorers_section(results, name, title):
    runs = group(results, name)
    if not runs:
        return ""
    cells = by(runs, "method", "sparsity")
    sparsities = sorted({r["sparsity"] for r in runs if r["method"]})
    methods = [
        m for m in ("random", "magnitude", "snip", "grasp", "synflow") if any(k[0] == m for k in cells)
    ]
    dense = cells.get((None, 0.0), [])
    out = [f"### {title}: test accuracy (%)", ""]
    rows = [["dense"] + [ms([r["test_accuracy"] for r in dense], 100)] * len(sparsities)]
    rows += [
        [m] + [ms([r["test_accuracy"] for r in cells.get((m, s), [])], 100) for s in sparsities]
        for m in methods
    ]
    out += [table(["method"] + [f"s={s}" for s in sparsities], rows), ""]
    out += [f"### {title}: forward splitting iterations at evaluation (test set, one batch)", ""]
    rows = [["dense"] + [ms([r.get("eval_fwd_iters") for r in dense])] * len(sparsities)]
    rows += [
        [m] + [ms([r.get("eval_fwd_iters") for r in cells.get((m, s), [])]) for s in sparsities]
        for m in methods
    ]
    out += [table(["method"] + [f"s={s}" for s in sparsities], rows), ""]
    out += [f"### {title}: per-matrix sparsity (%) of the pruning masks", ""]
    rows = []
    for m in methods:
        for s in sparsities:
            rs = cells.get((m, s), [])
            rows.append(
                [m, s] + [ms([r["mask_sparsity"].get(f"mon/{k}/kernel") for r in rs], 100) for k in "UAB"]
            )
    out += [table(["method", "sparsity", "U", "A", "B"], rows), ""]
    plot_scorers(runs, methods, sparsities, name)
    out += [f"![accuracy and iterations vs sparsity]({name}.png)", ""]
    return "\n".join(out)


def plot_scorers(runs, methods, sparsities, name):
    cells = by(runs, "method", "sparsity")
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    x = np.arange(len(sparsities))
    for m in methods:
        for ax, key, scale in ((axes[0], "test_accuracy", 100), (axes[1], "eval_fwd_iters", 1)):
            vals = [[r.get(key) for r in cells.get((m, s), []) if r.get(key) is not None] for s in sparsities]
            mean = [np.mean(v) * scale if v else np.nan for v in vals]
            std = [np.std(v) * scale if v else np.nan for v in vals]
            ax.errorbar(x, mean, yerr=std, label=m, marker="o", capsize=3)
    dense = cells.get((None, 0.0), [])
    if dense:
        axes[0].axhline(100 * np.mean([r["test_accuracy"] for r in dense]), color="k", ls="--", label="dense")
        axes[1].axhline(np.mean([r["eval_fwd_iters"] for r in dense]), color="k", ls="--", label="dense")
    for ax, label in ((axes[0], "test accuracy (%)"), (axes[1], "forward iterations (eval)")):
        ax.set_xticks(x, [str(s) for s in sparsities])
        ax.set_xlabel("sparsity of the implicit layer")
        ax.set_ylabel(label)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(HERE / f"{name}.png", dpi=120)
    plt.close(fig)


def table1_section(results):
    runs = group(results, "table1")
    if not runs:
        return ""
    rows = []
    for (model,), rs in sorted(by(runs, "model").items()):
        rows.append(
            [model]
            + [
                ms([r["mask_sparsity"].get(k) for r in rs], 100, 2)
                for k in ("all", "mon/U/kernel", "mon/A/kernel", "mon/B/kernel")
            ]
        )
    return "\n".join(
        [
            "### Table 1: sparsity (%) per matrix after SNIP at 90% (at init, no training)",
            "",
            table(["model", "all", "U", "A", "B"], rows),
            "",
        ]
    )


def table2_section(results):
    runs = group(results, "reduced_fc")
    if not runs:
        return ""
    rows = []
    for p in ("full", "no_a", "no_b", "none"):
        rs = [r for r in runs if r["fields"].get("parametrization") == p]
        rows.append(
            [
                p,
                ms([r["test_accuracy"] for r in rs], 100),
                ms([r.get("eval_fwd_iters") for r in rs]),
                ms([r.get("train_time_s") for r in rs]),
            ]
        )
    return "\n".join(
        [
            "### Table 2: reduced parametrisations (FC monDEQ, dense)",
            "",
            table(["parametrisation", "test accuracy (%)", "eval fwd iterations", "train time (s)"], rows),
            "",
        ]
    )


def tied_section(results):
    runs = group(results, "tied")
    if not runs:
        return ""

    def variant(r):
        mode = r["fields"]["mask_mode"]
        if mode != "stored":
            return f"{mode} (on-the-fly {'random masks' if mode == 'multi' else 'no mask'})"
        return f"{r['method']}, {'K masks (per reuse)' if r['per_reuse'] else 'one mask'}"

    rows = [
        [v, ms([r["test_accuracy"] for r in rs], 100), ms([r["final_train_loss"] for r in rs], 1, 3)]
        for (v,), rs in sorted(by(runs, variant).items())
    ]
    return "\n".join(
        [
            "### Tied MLP (width 32, K = 4): random vs scored masks, 50% of each tied kernel per reuse",
            "",
            table(["masks", "test accuracy (%)", "final train loss"], rows),
            "",
        ]
    )


def main():
    results = load()
    parts = [
        "# Results (generated by aggregate.py)",
        "",
        f"{len(results)} finished runs. Mean ± std over seeds (n = number of seeds).",
        "",
        scorers_section(results, "scorers_fc", "FC monDEQ (width 64) on digits"),
        scorers_section(results, "scorers_conv", "Single-conv monDEQ (16 channels) on digits"),
        table1_section(results),
        table2_section(results),
        tied_section(results),
    ]
    (HERE / "results.md").write_text("\n".join(p for p in parts if p) + "\n")
    print((HERE / "results.md").read_text())


if __name__ == "__main__":
    main()
