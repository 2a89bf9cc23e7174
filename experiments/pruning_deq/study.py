"""The pruning-DEQ study (Pham et al., "Pruning deep equilibrium models"): pruning at
initialisation on monotone DEQs, and scored vs random masks on the multi-mask tied block, on
scikit-learn's digits and on the local CIFAR-10 copy, all through the training job.

Tags: ``dataset`` (digits | cifar), ``group`` (fc | conv | tied), ``method``, ``sparsity``,
``parametrization``, ``per_reuse``, ``seed``.

* ``digits`` (``configs/digits_mondeq.py``, ``configs/digits_quickstart.py``): the 1,500/297
  split of the bundled digits, 16x16x1, 10 epochs, evaluated on the 297 test images (no model
  selection is done on them). FC monDEQ (64 units): dense and every scorer at 50/90/99% plus the
  reduced parametrisations; single-conv monDEQ (16 channels): dense and random/magnitude/SNIP at
  90%; the tied ResNet-like quickstart model (width 32, K = 4): dense, random masks made on the
  fly (one for all reuses, or one per reuse) and scored masks (one, or K: one per reuse) keeping
  50% of each tied kernel.
* ``cifar`` (``configs/cifar_mondeq.py``, ``configs/cifar_resnet.py``, the CPU scale of
  ``experiments/scale.py``: 16x16 images, 5,000-image holdout): FC monDEQ (128 units, 20,000
  images, 3 epochs, batch 128) dense, every scorer at 90% and the reduced parametrisations;
  single-conv monDEQ (16 channels, 10,000 images, 1 epoch) dense and random/magnitude/SNIP at
  90%; the tied ResNet-like model of ``fig5_multi_vs_same`` (width 16, K = 8), whose random-mask
  runs are the reference, with SNIP or magnitude masks.

Only the implicit layer (``mon/``: U, A, B) of a monDEQ is pruned, with one global threshold;
the tied block's kernels are pruned per layer (each kernel keeps 50% in every reuse). Scores use
one training batch of the run's data order; SynFlow runs its iterative schedule.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from experiments import scale as sc
from experiments.report import (
    VERDICT_NOTE,
    Comparison,
    accuracy,
    claim,
    figure,
    fmt,
    group,
    markdown_table,
    save,
    verdict_table,
    write,
)
from wtjax.tools.sweep import Run

FC_METHODS = ("random", "magnitude", "snip", "grasp", "synflow")
CONV_METHODS = ("random", "magnitude", "snip")
DIGITS_SPARSITIES = (0.5, 0.9, 0.99)
DIGITS_EPOCHS = 10.0


def mondeq_run(scale, *, dataset, seed, arch, method="none", parametrization="full", sparsity=0.9):
    """A monotone DEQ run (``arch`` fc | conv), dense (``method='none'``) or pruned at init."""
    if dataset == "digits":
        config, overrides = "configs/digits_mondeq.py", dict(sc.JOB)
        width, epochs = {"fc": 64, "conv": 16}[arch], DIGITS_EPOCHS
        extra = ""
    else:
        config = "configs/cifar_mondeq.py"
        s = sc.scale(scale)
        width, epochs, images = {"fc": (128, 3.0, 20_000), "conv": (16, 1.0, 10_000)}[arch]
        if scale == "paper":
            width, epochs, images = {"fc": 200, "conv": 81}[arch], 40.0, 0
        overrides = {k: v for k, v in s["overrides"].items() if k not in ("batch_size", "data.train_subset")}
        extra = f",train_subset={images}"
    arg = (
        f"arch={arch},width={width},parametrization={parametrization},method={method},sparsity={sparsity},"
        f"epochs={epochs}{extra},seed={seed}"
    )
    rid = f"mondeq_{arch}_{parametrization}_{method}_sp{sparsity}_w{width}_e{epochs}"
    rid = f"digits_{rid}_s{seed}" if dataset == "digits" else f"{rid}_n{images}_s{seed}"
    tags = dict(
        dataset=dataset,
        group=arch,
        method=method,
        parametrization=parametrization,
        sparsity=0.0 if method == "none" else sparsity,
        seed=seed,
    )
    return Run(rid, config, arg, overrides, tags)


def tied_run(scale, *, dataset, seed, mode, method=None, per_reuse=None):
    """The tied ResNet-like model: ``mode`` dense | same | multi (random masks from fold_in), or
    ``stored`` with ``method``'s scored masks (``per_reuse``: K masks, else one for all reuses)."""
    density = 1.0 if mode == "stored" else 0.5  # stored: no random masks; pruning sets the 50%
    variant = f"{method}{'K' if per_reuse else '1'}" if mode == "stored" else mode
    if dataset == "digits":
        suffix = "" if mode in ("dense", "stored") else "_d0.5"
        base = Run(
            f"digits_quickstart_{variant}{suffix}_w32_k4_s{seed}",
            "configs/digits_quickstart.py",
            f"mask_mode={mode},density={density},seed={seed}",
            {**sc.JOB, "model.mask.seed": seed},
        )
    else:  # the runs of fig5_multi_vs_same, and scored variants of them
        base = sc.resnet_run(scale, seed=seed, depth=8, mode=mode, density=density)
        base = dataclasses.replace(base, id=base.id.replace("_stored_", f"_{variant}_"))
    tags = dict(dataset=dataset, group="tied", seed=seed, per_reuse={"same": False, "multi": True}.get(mode))
    tags["method"] = "dense (no masks)" if mode == "dense" else "random (fold_in, on the fly)"
    overrides = dict(base.overrides)
    if mode == "stored":
        tags.update(method=method, per_reuse=per_reuse)
        overrides.update(
            {
                "pruning.method": method,
                "pruning.sparsity": 0.5,
                "pruning.scope": "layer",
                "pruning.include": ("tied/",),
                "pruning.per_reuse": per_reuse,
            }
        )
    return dataclasses.replace(base, overrides=overrides, tags={**base.tags, **tags})


def runs(scale: str):
    out = []
    for seed in sc.SEEDS:
        # digits: every scorer at three sparsities on the FC monDEQ; three scorers at 90% on the conv one.
        d = dict(dataset="digits", seed=seed)
        out.append(mondeq_run(scale, **d, arch="fc"))
        out += [
            mondeq_run(scale, **d, arch="fc", method=m, sparsity=s)
            for m in FC_METHODS
            for s in DIGITS_SPARSITIES
        ]
        out += [mondeq_run(scale, **d, arch="fc", parametrization=p) for p in ("no_a", "no_b", "none")]
        out.append(mondeq_run(scale, **d, arch="conv"))
        out += [mondeq_run(scale, **d, arch="conv", method=m) for m in CONV_METHODS]
        out += [tied_run(scale, **d, mode=m) for m in ("dense", "same", "multi")]
        # Magnitude scores are the same for every reuse (one weight), so K magnitude masks are K
        # copies of one mask (the CIFAR-10 slice below checks it: equal accuracy): only SNIP and
        # SynFlow get the per-reuse variant here.
        out.append(tied_run(scale, **d, mode="stored", method="magnitude", per_reuse=False))
        out += [
            tied_run(scale, **d, mode="stored", method=m, per_reuse=k)
            for m in ("snip", "synflow")
            for k in (False, True)
        ]
        # CIFAR-10: every scorer at 90%.
        c = dict(dataset="cifar", seed=seed)
        out.append(mondeq_run(scale, **c, arch="fc"))
        out += [mondeq_run(scale, **c, arch="fc", method=m) for m in FC_METHODS]
        out += [mondeq_run(scale, **c, arch="fc", parametrization=p) for p in ("no_a", "no_b", "none")]
        out.append(mondeq_run(scale, **c, arch="conv"))
        out += [mondeq_run(scale, **c, arch="conv", method=m) for m in CONV_METHODS]
        out += [tied_run(scale, **c, mode=m) for m in ("dense", "same", "multi")]
        out += [
            tied_run(scale, **c, mode="stored", method=m, per_reuse=k)
            for m in ("snip", "magnitude")
            for k in (False, True)
        ]
    return out


def _iters(rs):
    vals = [r["summary"].get("train/model/mon_fwd_iters") for r in rs]
    return fmt([v for v in vals if v is not None])


def _pruned(rs, leaf):
    vals = [
        100 * v for r in rs for k, v in r["summary"].get("pruned_fraction", {}).items() if k.endswith(leaf)
    ]
    return fmt(vals)


def _order(item):
    """Dense first, then the full parametrisation's scorers by sparsity, then the reduced ones."""
    (parametrization, method, sparsity), _ = item
    return (parametrization != "full", method != "none", str(parametrization), sparsity, method)


def _mondeq_table(results, arch) -> str:
    g = group([r for r in results if r["tags"]["group"] == arch], "parametrization", "method", "sparsity")
    rows = [
        (
            "dense" if method == "none" else method,
            par,
            f"{100 * sparsity:g}%" if method != "none" else "",
            fmt([accuracy(r) for r in rs]),
            _iters(rs),
            *(_pruned(rs, f"mon/{m}/kernel") if method != "none" else "" for m in "UAB"),
        )
        for (par, method, sparsity), rs in sorted(g.items(), key=_order)
    ]
    headers = ("method", "parametrization", "sparsity", "accuracy (%)", "forward iters")
    return markdown_table((*headers, "U pruned (%)", "A pruned (%)", "B pruned (%)"), rows)


def _tied_table(results) -> str:
    rows = []
    for (method, per_reuse), rs in sorted(
        group([r for r in results if r["tags"]["group"] == "tied"], "method", "per_reuse").items(),
        key=lambda item: (not item[0][0].startswith("dense"), str(item[0])),
    ):
        masks = {None: "", False: "one for all reuses", True: "K (one per reuse)"}[per_reuse]
        rows.append((method, masks, fmt([accuracy(r) for r in rs])))
    return markdown_table(("masks", "how many", "accuracy (%)"), rows)


def _plot_scorers(results, arch, title, path):
    """Accuracy and forward iterations against sparsity, one line per scorer, dense dashed."""
    full = [r for r in results if r["tags"]["group"] == arch and r["tags"]["parametrization"] == "full"]
    if not full:
        return
    fig, (acc_ax, it_ax) = figure(2)
    for (method,), rs in sorted(group(full, "method").items()):
        pts = sorted((s, rr) for (s,), rr in group(rs, "sparsity").items())
        accs = [[accuracy(r) for r in rr] for _, rr in pts]
        iters = [[r["summary"]["train/model/mon_fwd_iters"] for r in rr] for _, rr in pts]
        if method == "none":
            acc_ax.axhline(np.mean(accs[0]), color="k", ls="--", label="dense")
            it_ax.axhline(np.mean(iters[0]), color="k", ls="--", label="dense")
            continue
        xs = [100 * s for s, _ in pts]
        for ax, v in ((acc_ax, accs), (it_ax, iters)):
            std = [np.std(x, ddof=1) if len(x) > 1 else 0.0 for x in v]
            ax.errorbar(xs, [np.mean(x) for x in v], yerr=std, marker="o", capsize=3, label=method)
    for ax, label in ((acc_ax, "accuracy (%)"), (it_ax, "forward iterations (training)")):
        ax.set_xlabel("sparsity of the implicit layer (%)")
        ax.set_ylabel(label)
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3)
    acc_ax.legend(fontsize=8)
    save(fig, path)


NAMES = {"digits": "digits", "cifar": "CIFAR-10"}
PHAM = "Pham et al.: "  # the pruning-DEQ paper's claims, not the weight-tying paper's


def comparisons(results, dataset) -> list[Comparison]:
    """The pruning-DEQ paper's claims on one data set: scored pruning beats random on the conv
    monDEQ (90%), and removing ``B`` costs 1-3 points while removing ``A`` costs nothing (dense FC)."""
    rs = [r for r in results if r["tags"]["dataset"] == dataset]
    g = group(rs, "group", "parametrization", "method", "sparsity")
    random = g.get(("conv", "full", "random", 0.9), [])
    full = g.get(("fc", "full", "none", 0.0), [])
    out = [
        Comparison.paired(
            f"conv monDEQ 90%: {m} - random, {dataset}",
            g.get(("conv", "full", m, 0.9), []),
            random,
            +1,
            paper=PHAM + "random is weak",
        )
        for m in ("magnitude", "snip")
    ]
    out += [
        Comparison.paired(
            f"FC monDEQ, dense: no {m} - full, {dataset}",
            g.get(("fc", f"no_{m.lower()}", "none", 0.0), []),
            full,
            sign,
            paper=PHAM + paper,
        )
        for m, sign, paper in (("A", +1, "0 or slightly above"), ("B", -1, "-1 to -3"))
    ]
    return out


SETTINGS = {  # the conv monDEQ's data per data set (the FC one's CIFAR-10 setting is in claims())
    "digits": "digits: 297 test images, 10 epochs",
    "cifar": "CIFAR-10 16x16: 10k images, 1 epoch, 5k holdout",
}


def claims(results, scale):
    """The claim-table rows (the pruning-DEQ paper's): SNIP vs random on the conv monDEQ on both
    data sets, and removing A from the FC monDEQ on CIFAR-10."""
    c = {x.name: x for d in DATASETS for x in comparisons(results, d)}
    rows = [
        claim(
            f"Pruning-DEQ paper: SNIP at init beats random pruning on the conv monDEQ (90%), {NAMES[d]}",
            c[f"conv monDEQ 90%: snip - random, {d}"],
            SETTINGS[d],
        )
        for d in DATASETS
    ]
    rows.append(
        claim(
            "Pruning-DEQ paper: removing A from the monDEQ costs nothing (FC, dense), CIFAR-10",
            c["FC monDEQ, dense: no A - full, cifar"],
            "CIFAR-10 16x16: 20k images, 3 epochs, 5k holdout; without A the solver stops at its cap",
        )
    )
    return rows


DATASETS = {
    "digits": "Digits (the 297 test images of the bundled digits; 10 epochs)",
    "cifar": "CIFAR-10 (16x16, the 5,000-image holdout of the local training copy)",
}


def aggregate(results, out_dir, scale):
    text = [
        "# Pruning-DEQ study (generated)\n\nAccuracy (%), mean ± std over seeds; forward iterations "
        "are the Peaceman-Rachford iterations per training step, averaged over the last log interval; "
        "'pruned' is the fraction of each matrix the mask removes.\n"
    ]
    for dataset, heading in DATASETS.items():
        rs = [r for r in results if r["tags"]["dataset"] == dataset]
        if not rs:
            continue
        text.append(f"\n## {heading}\n")
        for arch, name in (("fc", "FC monDEQ"), ("conv", "Single-convolution monDEQ")):
            text.append(f"\n### {name}\n\n" + _mondeq_table(rs, arch))
            _plot_scorers(rs, arch, f"{name}, {dataset}", out_dir / f"{dataset}_{arch}.png")
        text.append(
            "\n### Multi-mask tied block: scored vs random masks (50% of each tied kernel per reuse)\n\n"
            + _tied_table(rs)
        )
    verdicts = [c for dataset in DATASETS for c in comparisons(results, dataset)]
    text.append(
        f"\n## Verdicts (the pruning-DEQ paper's claims)\n\n{verdict_table(verdicts)}\n{VERDICT_NOTE}\n"
    )
    write(out_dir, "".join(text))
