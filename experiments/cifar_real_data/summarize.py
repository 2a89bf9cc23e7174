"""Curves and a results table from the training job's metrics.jsonl of several runs.

    python -m experiments.cifar_real_data.summarize --run multi=/tmp/cifar_real/multi \
        --run dense=/tmp/cifar_real/dense --out experiments/cifar_real_data
"""

import argparse
import json
from pathlib import Path

from matplotlib.figure import Figure

from wtjax.job.metrics import read_jsonl


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", action="append", required=True, help="label=workdir")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    out = Path(args.out)
    fig = Figure(figsize=(10, 3.8))
    ax_loss, ax_acc = fig.subplots(1, 2)
    rows = [
        "| run | steps | epochs | train loss (last log) | eval acc. | eval examples | params | wall |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for spec in args.run:
        label, workdir = spec.split("=", 1)
        records = read_jsonl(Path(workdir) / "metrics.jsonl")
        train = [(s, r["train/loss"]) for s, r in sorted(records.items()) if "train/loss" in r]
        evals = [(s, r["eval/accuracy"]) for s, r in sorted(records.items()) if "eval/accuracy" in r]
        ax_loss.plot(*zip(*train, strict=True), label=label)
        ax_acc.plot(*zip(*evals, strict=True), marker="o", label=label)
        summary = json.loads((Path(workdir) / "summary.json").read_text())
        last_epoch = max(r.get("epoch", 0.0) for r in records.values())
        rows.append(
            f"| {label} | {summary['step']} | {last_epoch:.2f} | {train[-1][1]:.3f} | "
            f"{summary['eval/accuracy']:.4f} | {int(summary['eval/num_examples'])} | "
            f"{summary['num_params']:,} | {summary['wall_time_s'] / 60:.1f} min |"
        )
    ax_loss.set(xlabel="step", ylabel="train loss (cross-entropy)")
    ax_acc.set(xlabel="step", ylabel="eval accuracy (holdout)")
    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(out / "curves.png", dpi=120)
    (out / "results.md").write_text("\n".join(rows) + "\n")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
