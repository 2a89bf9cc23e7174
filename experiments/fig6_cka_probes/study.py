"""Figure 6: layer-wise CKA similarity and per-layer linear probes, same-mask vs multi-mask.

The analysis (``wtjax.tools.analyse.analyse_run``) runs on the final checkpoint of each K = 8
same-mask and multi-mask model at density 0.1 (the paper's Figure 6) and 0.5 (the density of the
other studies, whose runs these are), and of the dense weight-tied model: 2,000 holdout examples; the
layers are the stem, the state after each of the 8 reuses, and the pooled features; CKA is the
minibatch unbiased linear CKA (batches of 250); each probe is a logistic regression fitted on
the first 1,000 examples and scored on the other 1,000. Per-run numbers are cached in
``analysis/<run id>.json`` (the aggregation needs the runs' checkpoints only for runs not
analysed yet).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from experiments import scale as sc
from experiments.report import (
    VERDICT_NOTE,
    Comparison,
    claim,
    fmt,
    group,
    markdown_table,
    verdict_table,
    write,
)
from wtjax.analysis import plots

MODES = {"same": "same-mask", "multi": "multi-mask", "dense": "dense"}
DENSITIES = (0.1, 0.5)  # 0.1: the paper's Figure 6; 0.5: the other studies' density
NUM_EXAMPLES, CKA_BATCH = 2000, 250
CACHE = Path(__file__).resolve().parent / "analysis"  # committed: aggregating needs no checkpoints


def runs(scale: str):
    out = []
    for seed in sc.SEEDS:
        for density in DENSITIES:
            out += [
                sc.resnet_run(scale, seed=seed, depth=8, mode=m, density=density) for m in ("same", "multi")
            ]
        out.append(sc.resnet_run(scale, seed=seed, depth=8, mode="dense"))
    return out


def _label(mode: str, density: float) -> str:
    return MODES[mode] if mode == "dense" else f"{MODES[mode]} {density:g}"


def _analysis(result: dict) -> dict:
    path = CACHE / f"{result['id']}.json"
    if not path.exists():
        from wtjax.tools.analyse import analyse_run

        a = analyse_run(result["workdir"], NUM_EXAMPLES, CKA_BATCH)
        a.pop("workdir")
        CACHE.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(a, indent=1) + "\n")
    return json.loads(path.read_text())


def block_similarity(cka: np.ndarray) -> float:
    """Mean CKA between distinct reuse outputs (the off-diagonal of the block-output rows)."""
    block = cka[1:-1, 1:-1]  # drop the stem and pooled rows
    k = block.shape[0]
    return float((block.sum() - np.trace(block)) / (k * (k - 1)))


def _block_cka(r) -> float:
    return block_similarity(np.asarray(_analysis(r)["cka"]))


def _probe_last_reuse(r) -> float:
    return 100 * _analysis(r)["probe_accuracy"][-2]  # the layer after the last reuse (before pooling)


def comparisons(results) -> tuple[list[Comparison], list[Comparison]]:
    """Per density: block CKA of same- minus multi-mask (the paper: multi-mask erases the
    similarity, so > 0), and the probe after the last reuse, multi- minus same-mask (the paper:
    about +3 points after 8 tied layers, density 0.1)."""
    g = group(results, "density", "mode")
    cka, probe = [], []
    for d in DENSITIES:
        same, multi = g.get((d, "same"), []), g.get((d, "multi"), [])
        where = "the paper's Fig. 6" if d == 0.1 else "not in the paper"
        cka.append(
            Comparison.paired(
                f"block CKA, same - multi, density {d:g}",
                same,
                multi,
                +1,
                value=_block_cka,
                unit="CKA",
                paper=f"> 0 ({where}: multi-mask erases the pattern)",
            )
        )
        probe.append(
            Comparison.paired(
                f"probe after reuse 8, multi - same, density {d:g}",
                multi,
                same,
                +1,
                value=_probe_last_reuse,
                paper="about +3" if d == 0.1 else "> 0 (not in the paper)",
            )
        )
    return cka, probe


def claims(results, scale):
    """The claim-table rows: Fig. 6 at its density, 0.1."""
    cka, probe = comparisons(results)
    setting = sc.setting(scale) + "; 2,000 holdout images"
    return [
        claim(
            "Multi-mask erases the high layer similarity of weight tying (Fig. 6; CKA, density 0.1)",
            cka[0],
            setting,
            digits=3,
        ),
        claim(
            "Multi-mask features probe better after the last reuse (Fig. 6; density 0.1)", probe[0], setting
        ),
    ]


def aggregate(results, out_dir, scale):
    by_model: dict = {}
    for r in sorted(
        results, key=lambda r: (r["tags"]["mode"] == "dense", r["tags"]["density"], r["tags"]["mode"])
    ):
        key = _label(r["tags"]["mode"], r["tags"]["density"])
        by_model.setdefault(key, []).append(_analysis(r))
    if not by_model:
        return
    layers = next(iter(by_model.values()))[0]["layers"]
    mean_cka = {
        f"{k} (mean of {len(v)} seeds)": np.mean([a["cka"] for a in v], 0) for k, v in by_model.items()
    }
    plots.cka_heatmaps(mean_cka, layers, str(out_dir / "fig6_cka.png"))
    probes = {k: np.array([a["probe_accuracy"] for a in v]) for k, v in by_model.items()}
    plots.probe_curve(
        {k: v.mean(0) for k, v in probes.items()},
        layers,
        str(out_dir / "fig6_probes.png"),
        errors={k: v.std(0, ddof=1) if len(v) > 1 else 0 * v[0] for k, v in probes.items()},
    )
    rows = []
    for k, v in by_model.items():
        sims = [block_similarity(np.asarray(a["cka"])) for a in v]
        p = 100 * probes[k]
        rows.append((k, fmt(sims, 3), fmt(p[:, 1]), fmt(p[:, 4]), fmt(p[:, -2]), fmt(p[:, -1]), len(v)))
    write(
        out_dir,
        "# Figure 6 results (generated)\n\n"
        f"{NUM_EXAMPLES} holdout examples; mean ± std over seeds. 'block CKA' is the mean CKA between "
        "distinct reuse outputs (lower: more diverse layers). Probe accuracies (%) after reuse 1, "
        "reuse 4, reuse 8 and on the pooled features.\n\n"
        + markdown_table(
            (
                "model (K = 8)",
                "block CKA",
                "probe reuse 1",
                "probe reuse 4",
                "probe reuse 8",
                "probe pooled",
                "seeds",
            ),
            rows,
        )
        + "\nPer seed, paired (CKA; probe accuracy in points):\n\n"
        + verdict_table(comparisons(results)[0], digits=3)
        + "\n"
        + verdict_table(comparisons(results)[1])
        + "\n"
        + VERDICT_NOTE
        + "\n",
    )
