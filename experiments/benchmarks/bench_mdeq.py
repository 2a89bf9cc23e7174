r"""Benchmark: MDEQ-Tiny's training step against the single-stream DEQ's, side by side in one process.

At the CPU scale of the studies (batch 64, 16x16 images, ``experiments/scale.py``) it times one
jitted training step (forward, backward, Adam) of

* the single-stream DEQ of ``configs/cifar_deq.py`` (ResNet-like block, width 16, IFT with
  Broyden at the Fig. 2 CPU budget, 12 forward / 12 backward iterations),
* MDEQ-Tiny (``configs/cifar_mdeq.py``, IFT with Broyden) at the same 12 / 12 and at its
  reference budget 22 / 24,
* the weight-tied MDEQ-Tiny (the multiscale layer applied 10 times, no solver),

every solver running its whole budget (``f_tol = 0``), with :func:`bench_deq.measure` (compile
separately; minimum and median over ``--reps`` steps after a warm-up).

    python -m experiments.benchmarks.bench_mdeq --reps=20
"""

from __future__ import annotations

import argparse

import jax

from experiments.benchmarks.bench_deq import measure
from wtjax.models.deq import DEQResNetLike
from wtjax.models.mdeq import MDEQ

# bench_deq.measure times a step on the params alone, so the stem and head use the stateless
# GroupNorm (the measured numbers in the READMEs were taken so); BatchNorm costs the same order.
STATELESS = dict(norm="group")

BROYDEN = dict(grad="ift", f_solver="broyden", b_solver="broyden", f_tol=0.0, monitor_backward=False)


def models(width: int):
    """``{label: model}`` of the comparison (module docstring)."""
    return {
        "single-stream DEQ (w16), Broyden 12/12": DEQResNetLike(
            width=width, groups=4, f_max_iter=12, b_max_iter=12, **BROYDEN
        ),
        "MDEQ-Tiny, Broyden 12/12": MDEQ(size="tiny", f_max_iter=12, b_max_iter=12, **STATELESS, **BROYDEN),
        "MDEQ-Tiny, Broyden 22/24 (reference)": MDEQ(
            size="tiny", f_max_iter=22, b_max_iter=24, **STATELESS, **BROYDEN
        ),
        "MDEQ-Tiny weight-tied (10 reuses)": MDEQ(size="tiny", tied_only=True, **STATELESS),
    }


def main():
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--width", type=int, default=16, help="width of the single-stream DEQ")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--size", type=int, default=16)
    parser.add_argument("--reps", type=int, default=20)
    args = parser.parse_args()
    print(
        f"Device: {jax.devices()[0].device_kind} ({jax.default_backend()}), jax {jax.__version__}. "
        f"Batch {args.batch}, {args.size}x{args.size} images, {args.reps} timed steps each.\n"
    )
    print("| model | params | compile (s) | step min (ms) | step median (ms) | relative (median) |")
    print("|---|---|---|---|---|---|")
    base = None
    x = jax.numpy.zeros((1, args.size, args.size, 3))
    for label, model in models(args.width).items():
        shapes = jax.eval_shape(lambda m=model: m.init(jax.random.key(0), x))
        n = sum(a.size for a in jax.tree.leaves(shapes["params"]))
        r = measure(model, args)
        base = base or r["step_median_s"]
        print(
            f"| {label} | {n:,} | {r['compile_s']:.0f} | {1000 * r['step_s']:.0f} | "
            f"{1000 * r['step_median_s']:.0f} | {r['step_median_s'] / base:.2f}x |",
            flush=True,
        )


if __name__ == "__main__":
    main()
