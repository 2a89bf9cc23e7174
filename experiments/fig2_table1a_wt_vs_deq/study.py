"""Figure 2 / Table 1a: weight-tied models against DEQs over the same block, accuracy vs runtime.

The DEQ (``configs/cifar_deq.py``) solves for the fixed point of the very ResNet-like block the
weight-tied model repeats K = 8 times, in the paper's two training recipes (Appendix C): ``mdeq``
(implicit differentiation, Broyden forward and backward, Adam, weight-tied pre-training for the
first 16% of training as MDEQ's 8 of 50 epochs) and ``phantom`` (phantom gradient, 5 damped
steps, SGD lr 0.2, weight decay 1e-4). As in the paper, the weight-tied models of each
comparison are trained with the DEQ's recipe: Adam for the MDEQ comparison, SGD for the phantom
one. CPU scale: 12 forward / 12 backward solver iterations (the DEQ papers use 18-30 / 20-40),
the same data and epochs as the weight-tied runs. Runtime is each run's median training step
time (the training job logs it); sweeps running side by side on the same cores make it noisy, so
it is reported relative to the fastest weight-tied model, as the paper does, and measured again
side by side on a quiet machine in ``step_times.md`` (``experiments/benchmarks/bench_deq.py``).
"""

from __future__ import annotations

from experiments import scale as sc
from experiments.report import (
    VERDICT_NOTE,
    Comparison,
    accuracy,
    claim,
    figure,
    fmt,
    markdown_table,
    mean_std,
    save,
    verdict_table,
    write,
)

MODELS = (  # (model, variant or mask mode, optimiser recipe)
    (("resnet_like", "multi", "adam"), "weight-tied, multi-mask 0.5 (K = 8), Adam"),
    (("resnet_like", "dense", "adam"), "weight-tied, dense (K = 8), Adam"),
    (("deq", "mdeq", "adam"), "DEQ, implicit gradient (MDEQ recipe: Adam)"),
    (("resnet_like", "multi", "sgd"), "weight-tied, multi-mask 0.5 (K = 8), SGD"),
    (("resnet_like", "dense", "sgd"), "weight-tied, dense (K = 8), SGD"),
    (("deq", "phantom", "sgd"), "DEQ, phantom gradient (its recipe: SGD)"),
)


SCALES = ("cpu", "paper", "cpu_mdeq")  # cpu_mdeq: the CPU-scale MDEQ comparison (CPU_MDEQ, below)
EXTRA_CLAIM_SCALES = ("cpu_mdeq",)  # its verdict joins the committed claim table


def runs(scale: str):
    if scale == CPU_MDEQ:
        return mdeq_runs("cpu")
    out = []
    for seed in sc.SEEDS:
        for recipe in ("adam", "sgd"):  # each DEQ against weight-tied models trained with its recipe
            # (its optimiser, epochs and batch size: Appendix C; at the CPU scale the same runs as
            # the other studies')
            wt = dict(seed=seed, depth=8, recipe=recipe, deq_matched=True)
            out.append(sc.resnet_run(scale, mode="multi", density=0.5, **wt))
            out.append(sc.resnet_run(scale, mode="dense", **wt))
        out.append(sc.deq_run(scale, seed=seed, variant="mdeq"))
        out.append(sc.deq_run(scale, seed=seed, variant="phantom"))
    if scale == "paper":
        out += mdeq_runs("paper")
    return out


def _key(r):
    t = r["tags"]
    if t["model"] == "deq":
        return ("deq", t["variant"], "adam" if t["variant"] == "mdeq" else "sgd")
    return ("resnet_like", t["mode"], t["recipe"])


def _groups(results) -> dict:
    g: dict = {}
    for r in results:
        g.setdefault(_key(r), []).append(r)
    return g


def _step_ms(r) -> float:
    return 1000 * r["median_step_time_s"]


def comparisons(results) -> list[Comparison]:
    """Table 1a's single-stream rows: the dense weight-tied model (the paper's) and the multi-mask
    one against each DEQ under that DEQ's recipe, then each DEQ's step time against the weight-tied
    model's (in the sweep, so noisy; the paper's 5.47x and 6.95x)."""
    g = _groups(r for r in results if r["tags"]["model"] != "mdeq")  # the multiscale rows: mdeq_comparisons
    mdeq, phantom = g.get(("deq", "mdeq", "adam"), []), g.get(("deq", "phantom", "sgd"), [])
    wt = {k[1:]: v for k, v in g.items() if k[0] == "resnet_like"}
    none = "not in Table 1a"
    return [
        Comparison.paired(
            "weight-tied dense - DEQ implicit gradient (Adam)",
            wt.get(("dense", "adam"), []),
            mdeq,
            +1,
            paper="+2.32 (84.07 vs 81.75)",
        ),
        Comparison.paired(
            "weight-tied dense - DEQ phantom gradient (SGD)",
            wt.get(("dense", "sgd"), []),
            phantom,
            +1,
            paper="+1.32 (86.38 vs 85.06)",
        ),
        Comparison.paired(
            "weight-tied multi-mask 0.5 - DEQ implicit gradient (Adam)",
            wt.get(("multi", "adam"), []),
            mdeq,
            +1,
            paper=none,
        ),
        Comparison.paired(
            "weight-tied multi-mask 0.5 - DEQ phantom gradient (SGD)",
            wt.get(("multi", "sgd"), []),
            phantom,
            +1,
            paper=none,
        ),
        Comparison.paired(
            "step time: DEQ implicit gradient - weight-tied dense (Adam)",
            mdeq,
            wt.get(("dense", "adam"), []),
            +1,
            value=_step_ms,
            unit="ms",
            paper="DEQ 5.47x the weight-tied time",
        ),
        Comparison.paired(
            "step time: DEQ phantom gradient - weight-tied dense (SGD)",
            phantom,
            wt.get(("dense", "sgd"), []),
            +1,
            value=_step_ms,
            unit="ms",
            paper="DEQ 6.95x the weight-tied time",
        ),
    ]


def claims(results, scale):
    """The claim-table rows: accuracy against each DEQ (dense weight-tied, as the paper), the
    implicit-gradient DEQ's step time, and (at the ``cpu_mdeq`` and paper scales) each MDEQ size."""
    mdeq = _mdeq_claims(results, scale)
    if scale == CPU_MDEQ:
        return mdeq
    c = comparisons(results)
    forward, backward = sc.scale(scale)["deq_iters"]
    setting = f"{sc.setting(scale)}; DEQ solver {forward}/{backward} iterations"
    if scale == "cpu":
        setting += ", unconverged"
    return [
        claim(
            "Weight-tied (K = 8) beats the same-block DEQ trained by implicit gradient (Table 1a)",
            c[0],
            setting,
        ),
        claim(
            "Weight-tied (K = 8) beats the same-block DEQ trained by phantom gradient (Table 1a)",
            c[1],
            setting,
        ),
        claim(
            "A weight-tied step is faster than a DEQ step (Table 1a, Fig. 2; step time in ms)", c[4], setting
        ),
        *mdeq,
    ]


def _solver(rs) -> str:
    """Forward solver steps / relative residual / samples not converged, at the last log."""

    def last(key):
        return [r["summary"][key] for r in rs if key in r["summary"]]

    fwd, res, bad = (
        last("train/model/deq_fwd_nstep"),
        last("train/model/deq_fwd_rel_res"),
        last("train/model/deq_fwd_nonconverged"),
    )
    if not fwd:
        return ""
    batch = rs[0]["overrides"]["batch_size"]
    return f"{mean_std(fwd)[0]:.1f} / {mean_std(res)[0]:.3f} / {mean_std(bad)[0]:.0f} of {batch}"


def aggregate(results, out_dir, scale):
    mdeq = [r for r in results if r["tags"]["model"] == "mdeq"]
    if mdeq or scale == CPU_MDEQ:
        aggregate_mdeq(mdeq, out_dir)
    if scale == CPU_MDEQ:
        return
    g = _groups([r for r in results if r["tags"]["model"] != "mdeq"])
    times = {k: mean_std([r["median_step_time_s"] for r in rs]) for k, rs in g.items()}
    unit = min((times[k][0] for k in times if k[0] == "resnet_like"), default=1.0)
    rows, pts = [], []
    for key, label in MODELS:
        rs = g.get(key, [])
        if not rs:
            continue
        acc = [accuracy(r) for r in rs]
        t, t_std, _ = times[key]
        s = rs[0]["summary"]
        rows.append(
            (
                label,
                fmt(acc),
                f"{1000 * t:.0f} ± {1000 * t_std:.0f}",
                f"{t / unit:.2f}x",
                f"{s['num_params']:,}",
                _solver(rs),
            )
        )
        pts.append((label, t / unit, *mean_std(acc)[:2]))
    write(
        out_dir,
        "# Figure 2 / Table 1a results (generated)\n\nHoldout accuracy (%) and median training "
        "step time, mean ± std over seeds; runtime relative to the fastest weight-tied model.\n\n"
        + markdown_table(
            (
                "model",
                "holdout acc. (%)",
                "step time (ms)",
                "runtime",
                "params",
                "solver steps / rel. residual / not converged (last log)",
            ),
            rows,
        )
        + "\nPer seed, paired (accuracy in points, step time in ms):\n\n"
        + verdict_table(comparisons(results))
        + "\n"
        + VERDICT_NOTE
        + "\n",
    )
    fig, (ax,) = figure(1, width=5.5)
    for label, x, m, s in pts:
        ax.errorbar([x], [m], yerr=[s], marker="o", capsize=3, label=label)
    ax.set_xlabel("median step time in the sweep (x fastest weight-tied; noisy: see step_times.md)")
    ax.set_ylabel("holdout accuracy (%)")
    ax.set_title("Figure 2: weight-tied vs DEQ (ResNet-like block)", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    save(fig, out_dir / "fig2.png")


# --- The multiscale DEQ (Table 1a's MDEQ-Tiny / MDEQ-Large rows) --------------------------------
#: The scale name of the CPU-scale MDEQ comparison: its runs use the ``cpu`` scale's data, epochs
#: and batch, but are listed, run and aggregated on their own (``--scale=cpu_mdeq``; results in
#: ``experiments/results/cpu_mdeq/``, tables in ``cpu_mdeq/`` here), so the ``cpu`` table of this
#: study does not wait for them.
CPU_MDEQ = "cpu_mdeq"
MDEQ_MODELS = (  # (size, variant), label
    (("tiny", "mdeq"), "MDEQ-Tiny, implicit gradient (Broyden 22/24)"),
    (("tiny", "tied"), "weight-tied MDEQ-Tiny (10 reuses)"),
    (("tiny", "phantom"), "MDEQ-Tiny, phantom gradient (SGD)"),
    (("large", "mdeq"), "MDEQ-Large, implicit gradient (Broyden 18/20)"),
    (("large", "tied"), "weight-tied MDEQ-Large (10 reuses)"),
    (("large", "phantom"), "MDEQ-Large, phantom gradient (SGD)"),
)


def mdeq_runs(scale: str):
    """MDEQ runs: at ``cpu``, Tiny with the implicit gradient against its weight-tied counterpart
    (both Adam, the MDEQ recipe); at ``paper``, every row of :data:`MDEQ_MODELS`."""
    if scale == "cpu":
        pairs = [("tiny", "mdeq"), ("tiny", "tied")]
    else:
        pairs = [key for key, _ in MDEQ_MODELS]
    return [sc.mdeq_run(scale, seed=seed, size=z, variant=v) for seed in sc.SEEDS for z, v in pairs]


MDEQ_PAPER = {  # Table 1a: the weight-tied model against MDEQ (implicit gradient) of each size
    "tiny": "+0.18 (85.94 vs 85.76)",
    "large": "+0.50 (92.36 vs 91.86)",
}


def _mdeq_groups(results) -> dict:
    g: dict = {}
    for r in results:
        if r["tags"]["model"] == "mdeq":
            g.setdefault((r["tags"]["size"], r["tags"]["variant"]), []).append(r)
    return g


def mdeq_comparisons(g, sizes=("tiny", "large")) -> list[Comparison]:
    """Per size: the weight-tied MDEQ minus the MDEQ trained by implicit gradient (the paper: the
    weight-tied model above, Table 1a)."""
    return [
        Comparison.paired(
            f"weight-tied MDEQ-{size.capitalize()} - MDEQ-{size.capitalize()}",
            g.get((size, "tied"), []),
            g.get((size, "mdeq"), []),
            +1,
            paper=MDEQ_PAPER[size],
        )
        for size in sizes
    ]


def _mdeq_claims(results, scale) -> list[dict]:
    """The multiscale claim rows: Tiny at the ``cpu_mdeq`` scale, Tiny and Large at the paper's."""
    sizes = {CPU_MDEQ: ("tiny",), "paper": ("tiny", "large")}.get(scale, ())
    setting = sc.setting(scale) + "; Broyden 22/24 (Tiny), 18/20 (Large)"
    return [
        claim(f"Weight-tied beats {c.name.split(' - ')[1]} (Table 1a, multiscale)", c, setting)
        for c in mdeq_comparisons(_mdeq_groups(results), sizes)
    ]


def aggregate_mdeq(results, out_dir):
    """``results_mdeq.md``: accuracy per seed, step times, and the verdict of weight-tied vs MDEQ."""
    g = _mdeq_groups(results)
    rows = []
    for (size, variant), label in MDEQ_MODELS:
        rs = sorted(g.get((size, variant), []), key=lambda r: r["tags"]["seed"])
        if not rs:
            continue
        acc = [accuracy(r) for r in rs]
        tied = g.get((size, "tied"), [])
        t = mean_std([r["median_step_time_s"] for r in rs])[0]
        t_tied = mean_std([r["median_step_time_s"] for r in tied])[0] if tied else float("nan")
        rows.append(
            (
                label,
                " / ".join(f"{a:.1f}" for a in acc),
                fmt(acc),
                f"{1000 * t:.0f}",
                f"{t / t_tied:.2f}x",
                f"{rs[0]['summary']['num_params']:,}",
            )
        )
    headers = (
        "model",
        "holdout acc. per seed (%)",
        "mean ± std",
        "step (ms)",
        "runtime vs weight-tied",
        "params",
    )
    write(
        out_dir,
        "# Table 1a, multiscale rows (generated)\n\nHoldout accuracy per seed (0, 1, 2) and the median "
        "training step time relative to the weight-tied MDEQ of the same size.\n\n"
        + markdown_table(headers, rows)
        + "\nThe weight-tied MDEQ minus the MDEQ (implicit gradient, both Adam), paired by seed:\n\n"
        + verdict_table(mdeq_comparisons(g, [z for z in ("tiny", "large") if (z, "mdeq") in g]))
        + "\n"
        + VERDICT_NOTE
        + "\n",
        name="results_mdeq.md",
    )
