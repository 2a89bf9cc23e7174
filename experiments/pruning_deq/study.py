"""The CIFAR-10 slice of the pruning-DEQ study, through the training job (``configs/cifar_mondeq.py``
and ``configs/cifar_resnet.py``), at the CPU scale of ``experiments/scale.py`` (16x16 pooled
images of the local copy, evaluated on the 5,000-image holdout).

Groups (tags ``group``):

* ``fc``: FC monDEQ (128 hidden units; the paper's CIFAR FC model is wider), dense and pruned at
  90% by every scorer, plus the reduced parametrisations (no A, no B, neither), 20,000 images,
  3 epochs, batch 128, Adam 1e-3 (no decay within 3 epochs);
* ``conv``: single-convolution monDEQ (16 channels; the paper: 81), dense and pruned at 90% by
  random, magnitude and SNIP, 10,000 images, 1 epoch (a conv monDEQ step costs ~10x a tied step);
* ``tied``: the multi-mask weight-tied ResNet-like model (width 16, K = 8) with scored masks
  instead of random ones: SNIP or magnitude, one mask for all reuses or K masks (one per reuse),
  50% of each tied kernel kept per reuse (layer scope), same recipe as ``fig5_multi_vs_same``,
  whose random multi-mask and dense runs are the reference.
"""

from __future__ import annotations

import scale as sc
from report import figure, save, write

from wtjax.sweep import Run, accuracy, fmt, group, markdown_table

FC_METHODS = ("random", "magnitude", "snip", "grasp", "synflow")
CONV_METHODS = ("random", "magnitude", "snip")


def mondeq_run(scale, *, seed, arch, method="none", parametrization="full", sparsity=0.9):
    s = sc.scale(scale)
    width, epochs, images = {"fc": (128, 3.0, 20_000), "conv": (16, 1.0, 10_000)}[arch]
    if scale == "paper":
        width, epochs, images = {"fc": 200, "conv": 81}[arch], 40.0, 0
    overrides = {k: v for k, v in s["overrides"].items() if k not in ("batch_size", "data.train_subset")}
    arg = (
        f"arch={arch},width={width},parametrization={parametrization},method={method},sparsity={sparsity},"
        f"epochs={epochs},train_subset={images},seed={seed}"
    )
    rid = f"mondeq_{arch}_{parametrization}_{method}_sp{sparsity}_w{width}_e{epochs}_n{images}_s{seed}"
    tags = dict(group=arch, method=method, parametrization=parametrization, sparsity=sparsity, seed=seed)
    return Run(rid, "configs/cifar_mondeq.py", arg, overrides, tags)


def tied_run(scale, *, seed, method, per_reuse):
    base = sc.resnet_run(scale, seed=seed, depth=8, mode="stored", density=1.0)
    overrides = {
        **base.overrides,
        "pruning.method": method,
        "pruning.sparsity": 0.5,
        "pruning.scope": "layer",
        "pruning.include": ("tied/",),
        "pruning.per_reuse": per_reuse,
    }
    rid = base.id.replace("_stored_", f"_{method}{'K' if per_reuse else '1'}_")
    tags = dict(base.tags, group="tied", method=method, per_reuse=per_reuse)
    return Run(rid, base.config, base.arg, overrides, tags)


def runs(scale: str):
    out = []
    for seed in sc.SEEDS:
        out.append(mondeq_run(scale, seed=seed, arch="fc"))
        out += [mondeq_run(scale, seed=seed, arch="fc", method=m) for m in FC_METHODS]
        out += [mondeq_run(scale, seed=seed, arch="fc", parametrization=p) for p in ("no_a", "no_b", "none")]
        out.append(mondeq_run(scale, seed=seed, arch="conv"))
        out += [mondeq_run(scale, seed=seed, arch="conv", method=m) for m in CONV_METHODS]
        for mode, label in (("dense", "dense (no masks)"), ("multi", "random (fold_in, on the fly)")):
            ref = sc.resnet_run(scale, seed=seed, depth=8, mode=mode, density=0.5)
            tags = dict(ref.tags, group="tied", method=label, per_reuse=(mode == "multi") or None)
            out.append(Run(ref.id, ref.config, ref.arg, ref.overrides, tags))
        out += [
            tied_run(scale, seed=seed, method=m, per_reuse=k)
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


def aggregate(results, out_dir, scale):
    text = [
        "# Pruning-DEQ study, CIFAR-10 slice (generated)\n\nHoldout accuracy (%) on the 5,000-image "
        "holdout, mean ± std over seeds; forward iterations are the training mean of the last log "
        "interval.\n"
    ]
    g = group(results, "group", "parametrization", "method")
    for arch in ("fc", "conv"):
        rows = []
        for (grp, par, method), rs in sorted(g.items(), key=str):
            if grp != arch:
                continue
            rows.append(
                (
                    method if method != "none" else "dense",
                    par,
                    fmt([accuracy(r) for r in rs]),
                    _iters(rs),
                    _pruned(rs, "mon/U/kernel") if method != "none" else "",
                    _pruned(rs, "mon/A/kernel") if method != "none" else "",
                    _pruned(rs, "mon/B/kernel") if method != "none" else "",
                )
            )
        text.append(
            f"\n## {arch.upper()} monDEQ (pruning at 90%)\n\n"
            + markdown_table(
                (
                    "method",
                    "parametrization",
                    "holdout acc. (%)",
                    "forward iters",
                    "U pruned (%)",
                    "A pruned (%)",
                    "B pruned (%)",
                ),
                rows,
            )
        )
    rows = []
    for (method, per_reuse), rs in sorted(
        group([r for r in results if r["tags"]["group"] == "tied"], "method", "per_reuse").items(), key=str
    ):
        masks = {None: "", False: "one for all reuses", True: "K (one per reuse)"}[per_reuse]
        rows.append((method, masks, fmt([accuracy(r) for r in rs])))
    text.append(
        "\n## Multi-mask tied block: scored vs random masks (ResNet-like, width 16, K = 8, 50% per reuse)\n\n"
        + markdown_table(("masks", "how many", "holdout acc. (%)"), rows)
    )
    write(out_dir, "".join(text), "results_cifar.md")

    fig, (ax,) = figure(1, width=6)
    bars = [
        (f"{m}" + (f" ({p})" if p != "full" else ""), rs)
        for (grp, p, m), rs in sorted(g.items(), key=str)
        if grp == "fc"
    ]
    ax.barh([b[0] for b in bars], [sum(map(accuracy, rs)) / len(rs) for _, rs in bars])
    ax.set_xlabel("holdout accuracy (%)")
    ax.set_title("FC monDEQ on CIFAR-10 (16x16), 90% pruned at init", fontsize=10)
    save(fig, out_dir / "cifar_fc.png")
