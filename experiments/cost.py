"""Expected cost of a study's paper-scale runs: training FLOPs from the accounting, and device-hours
at a stated throughput (an estimate, never a measurement).

FLOPs: the model's forward FLOPs per image (:func:`wtjax.analysis.accounting.flops_per_image`: XLA's
cost analysis of the unrolled dense forward pass, masked weights counted) times 3 (forward and
backward, the usual estimate; for LoRA, whose frozen weights need no weight gradient, it is an
upper bound) times the training images (epochs x training split). Evaluation is not counted.

Throughput: :data:`ASSUMED_MFU` of the NVIDIA A100's public dense bfloat16 peak, 312 TFLOP/s
(``experiments/benchmarks/chips.py``). The MFU is an assumption: nothing here was run on an A100.

    python -m experiments.cost experiments/fig9_imagenet32 experiments/table3_lora_vtab
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from wtjax.analysis import accounting
from wtjax.job import config as cs
from wtjax.tools import sweep

A100_BF16_PEAK = 312e12  # FLOP/s, NVIDIA's published dense (no sparsity) bfloat16 figure
ASSUMED_MFU = 0.3  # an assumed fraction of that peak, not a measured one
# Training images and classes of the datasets the paper-scale runs use (tfds splits).
DATASETS = {"cifar10": (50_000, 10), "imagenet32": (1_281_167, 1000)}
VTAB_TRAIN = 1000  # VTAB-1k: train800val200


def data_size(config) -> tuple[int, int, tuple[int, int, int]]:
    """``(training images, classes, image shape)`` of a run's real data."""
    name = config.data.name
    if name.startswith("vtab/"):
        from wtjax.data import vtab

        side = int(config.data.image_shape[0])
        return VTAB_TRAIN, vtab.TASKS[name.split("/")[1]].num_classes, (side, side, 3)
    if name not in DATASETS:
        raise ValueError(f"no training-set size known for dataset {name!r}: add it to DATASETS")
    images, classes = DATASETS[name]
    return images, classes, (32, 32, 3)


def run_cost(run: sweep.Run) -> dict:
    """Forward FLOPs per image, training FLOPs and A100-hours (at :data:`ASSUMED_MFU`) of ``run``."""
    config = sweep.load_config(run)
    images, classes, shape = data_size(config)
    model = cs.model_from_config(config.model, classes)
    forward = accounting.flops_per_image(model, shape)
    train = 3 * forward * images * config.num_epochs
    return {
        "forward_flops": forward,
        "train_flops": train,
        "a100_hours": train / (A100_BF16_PEAK * ASSUMED_MFU) / 3600,
    }


def cost_table(runs: Sequence[sweep.Run]) -> str:
    """A markdown table of the cost of each run, seeds folded (the cost does not depend on them)."""
    by_definition: dict[str, list[sweep.Run]] = {}
    for r in runs:
        by_definition.setdefault(r.id.rsplit("_s", 1)[0], []).append(r)
    lines = [
        "| run (x seeds) | forward GFLOPs / image | training FLOPs per run | A100-hours per run |",
        "|---|---|---|---|",
    ]
    total = 0.0
    for name, rs in by_definition.items():
        c = run_cost(rs[0])
        total += c["a100_hours"] * len(rs)
        lines.append(
            f"| `{name}` (x{len(rs)}) | {c['forward_flops'] / 1e9:.2f} | {c['train_flops']:.2e} | "
            f"{c['a100_hours']:.3g} |"
        )
    lines.append(f"\nTotal: {total:.3g} A100-hours at {ASSUMED_MFU:.0%} of the 312 TFLOP/s bf16 peak.")
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m experiments.cost", description=__doc__.split("\n\n")[0])
    ap.add_argument("studies", nargs="+", help="study folders (each with study.py)")
    ap.add_argument("--scale", default="paper")
    args = ap.parse_args(argv)
    for d in args.studies:
        print(f"## {d}\n\n{cost_table(sweep.load_study(d).runs(args.scale))}", flush=True)


if __name__ == "__main__":
    main()
