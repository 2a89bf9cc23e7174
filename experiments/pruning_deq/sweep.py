"""The study's sweep, as data: one dict per run (``id`` is the output file name).

Fields: ``group`` (which question the run answers), ``model`` (registry name) and ``fields``
(model fields), ``method``/``sparsity``/``scope`` (pruning at init; ``method=None``: dense),
``include`` (path substrings of the pruned kernels), ``per_reuse``/``tied_path`` (tied block
stored masks), ``epochs``, ``seed``.
"""

from __future__ import annotations

SEEDS = (0, 1, 2)
METHODS = ("random", "magnitude", "snip", "grasp", "synflow")
SPARSITIES = (0.5, 0.9, 0.99)
FC = dict(width=64)
CONV = dict(channels=16)
EPOCHS = 10
TIED = dict(width=32, depth=4)


def _run(group, model, fields, seed, method=None, sparsity=0.0, **extra):
    tag = "_".join(f"{k}{v}" for k, v in sorted(fields.items()))
    rid = f"{group}__{model}_{tag}__{method or 'dense'}_s{sparsity}__seed{seed}"
    return dict(
        id=rid,
        group=group,
        model=model,
        fields=dict(fields),
        method=method,
        sparsity=sparsity,
        scope=extra.pop("scope", "global"),
        include=extra.pop("include", ("mon/",)),
        per_reuse=extra.pop("per_reuse", False),
        tied_path=extra.pop("tied_path", None),
        epochs=extra.pop("epochs", EPOCHS),
        seed=seed,
        train=extra.pop("train", True),
    )


def runs() -> list[dict]:
    out = []
    for seed in SEEDS:
        # 1. sparsity vs accuracy and forward iterations, every scorer, FC monDEQ on digits.
        out.append(_run("scorers_fc", "mondeq_fc", FC, seed))
        for method in METHODS:
            for s in SPARSITIES:
                out.append(_run("scorers_fc", "mondeq_fc", FC, seed, method, s))
        # 2. reduced parametrisations (the paper's Table 2), dense FC.
        for p in ("full", "no_a", "no_b", "none"):
            out.append(_run("reduced_fc", "mondeq_fc", {**FC, "parametrization": p}, seed))
        # 3. per-matrix sparsity after SNIP at 90% (Table 1): masks only, both architectures.
        for model, fields in (("mondeq_fc", FC), ("mondeq_conv", CONV)):
            out.append(_run("table1", model, fields, seed, "snip", 0.9, train=False))
        # 4. random vs scored masks on the multi-mask tied block (tied MLP, K = 4, half of each
        #    tied kernel kept per reuse; embed and head dense).
        tied = dict(include=("tied/",), scope="layer", tied_path=("tied", "block"))
        out.append(_run("tied", "mlp", {**TIED, "mask_mode": "dense"}, seed, include=()))
        out.append(_run("tied", "mlp", {**TIED, "mask_mode": "multi"}, seed, include=()))
        for method in ("random", "magnitude", "snip", "synflow"):
            for per_reuse in (False, True):
                fields = {**TIED, "mask_mode": "stored"}
                r = _run("tied", "mlp", fields, seed, method, 0.5, per_reuse=per_reuse, **tied)
                r["id"] += "__perreuse" if per_reuse else "__one"
                out.append(r)
    # 5. single-conv monDEQ: dense vs SNIP/magnitude at 90% (cheaper subset, it is slower).
    for seed in SEEDS:
        out.append(_run("scorers_conv", "mondeq_conv", CONV, seed))
        for method in ("magnitude", "snip", "random"):
            out.append(_run("scorers_conv", "mondeq_conv", CONV, seed, method, 0.9))
    return out
