r"""Benchmark: DEQ training cost against the weight-tied model with the same block and batch.

Measures, for the ResNet-like block (width C, batch B, S x S images), one jitted training step
(forward, backward, Adam update):

1. step time of each DEQ variant (IFT with Broyden, IFT with Anderson, phantom gradient,
   1-step gradient) against the weight-tied model at depth K, at two budgets: the DEQ papers'
   (18 forward / 20 backward iterations by default) and a budget equal to K;
2. forward/backward iterations needed at initialisation to reach torchdeq's tolerances (forward
   1e-3, adjoint 1e-6; ``deq_fwd_nstep`` and the backward monitor's ``deq_bwd_nstep``, untimed);
3. XLA's memory analysis of the compiled step (temporary buffers) for the DEQ (IFT, K iterations),
   the weight-tied model and the weight-tied model with ``remat_policy='nothing_saveable'`` as K
   grows.

    python -m experiments.benchmarks.bench_deq --quick            # smoke run, ~minutes on a CPU
    python -m experiments.benchmarks.bench_deq --width=64 --batch=64 --size=32 --depth=8 \
        --f_iters=18 --b_iters=20 --ks=4,8,16,32 --reps=5 --out=/tmp/deq_full.md

Prints a markdown report (and writes it with ``--out``). Times are the minimum and median over
``--reps`` steps after one warm-up step; compile time is reported separately.
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import optax

from wtjax.models.deq import DEQResNetLike
from wtjax.models.resnet_like import ResNetLike

VARIANTS = {
    "DEQ IFT Broyden": dict(grad="ift", f_solver="broyden", b_solver="broyden"),
    "DEQ IFT Anderson": dict(grad="ift", f_solver="anderson", b_solver="anderson"),
    "DEQ phantom (k=5, tau=0.5)": dict(grad="phantom", f_solver="anderson", phantom_steps=5, phantom_tau=0.5),
    "DEQ 1-step": dict(grad="one_step", f_solver="anderson"),
}


def _data(args):
    key = jax.random.key(0)
    x = jax.random.normal(key, (args.batch, args.size, args.size, 3))
    y = jax.random.randint(jax.random.fold_in(key, 1), (args.batch,), 0, 10)
    return x, y


def _train_step(model):
    tx = optax.adam(1e-3)

    def step(params, opt_state, x, y, key):
        def loss_fn(p):
            logits, out = model.apply({"params": p}, x, train=True, rngs={"dropout": key})
            loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
            return loss + out.get("aux_loss", 0.0), out.get("metrics", {})

        (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss, metrics

    return tx, step


def measure(model, args, *, timed=True):
    """Compile and time one training step; returns a dict of numbers."""
    x, y = _data(args)
    params = model.init(jax.random.key(1), x)["params"]
    tx, step = _train_step(model)
    opt_state = tx.init(params)
    key = jax.random.key(2)
    t0 = time.perf_counter()
    compiled = jax.jit(step).lower(params, opt_state, x, y, key).compile()
    compile_s = time.perf_counter() - t0
    mem = compiled.memory_analysis()
    result = {
        "compile_s": compile_s,
        "temp_mib": mem.temp_size_in_bytes / 2**20 if mem is not None else float("nan"),
    }
    if not timed:
        return result
    out = compiled(params, opt_state, x, y, key)  # warm-up
    jax.block_until_ready(out)
    times = []
    for _ in range(args.reps):
        t0 = time.perf_counter()
        out = compiled(params, opt_state, x, y, key)
        jax.block_until_ready(out)
        times.append(time.perf_counter() - t0)
    # The minimum is the least noisy statistic on a shared machine (as timeit reports).
    result["step_s"] = min(times)
    result["step_median_s"] = statistics.median(times)
    result["metrics"] = {k: float(v) for k, v in out[3].items()}
    return result


def iterations_needed(model, args, cap=100):
    """Forward iterations to tol 1e-3 and adjoint iterations to tol 1e-6 (capped), at init.

    Untimed; the adjoint count comes from the model's backward monitor.
    """
    x, _ = _data(args)
    model = model.clone(f_max_iter=cap, f_tol=1e-3, b_max_iter=cap, b_tol=1e-6, monitor_backward=True)
    params = model.init(jax.random.key(1), x)["params"]
    _, out = jax.jit(
        lambda p: model.apply({"params": p}, x, train=True, rngs={"dropout": jax.random.key(3)})
    )(params)
    m = {k: float(v) for k, v in out["metrics"].items()}
    return (
        f"{m['deq_fwd_nstep']:.0f} ({m['deq_fwd_nonconverged']:.0f} not conv.) / "
        f"{m['deq_bwd_nstep']:.0f} ({m['deq_bwd_nonconverged']:.0f} not conv.)"
    )


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="tiny sizes for a smoke run")
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--depth", type=int, default=8, help="K of the weight-tied model")
    parser.add_argument("--f_iters", type=int, default=18)
    parser.add_argument("--b_iters", type=int, default=20)
    parser.add_argument("--ks", default="4,8,16,32", help="depths / iteration budgets for the memory table")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--out", default=None, help="write the markdown report here")
    args = parser.parse_args(argv)
    if args.quick:
        args.width, args.batch, args.size, args.depth = 16, 8, 16, 4
        args.ks, args.reps = "2,4,8", 5
    return args


def deq_model(base: dict, depth: int, budget: tuple[int, int], fields: dict) -> DEQResNetLike:
    # f_tol=0: every DEQ runs its whole budget, so the timing compares equal iteration counts.
    f_iters, b_iters = budget
    return DEQResNetLike(
        depth=depth, f_max_iter=f_iters, b_max_iter=b_iters, f_tol=0.0, b_tol=0.0, **base, **fields
    )


def step_time_sections(args, base: dict) -> list[str]:
    """Markdown lines: step time of every DEQ variant at both budgets, then iterations needed."""
    lines = [
        f"### Train-step time (min and median of {args.reps} steps; tol 0: each DEQ uses its whole budget)",
        "",
        "| model | budget (fwd/bwd) | step min (s) | step median (s) | x weight-tied (min) | fwd iters "
        "| compile (s) |",
        "|---|---|---|---|---|---|---|",
    ]
    tied = measure(ResNetLike(depth=args.depth, mask_mode="dense", **base), args)
    lines.append(
        f"| weight-tied (K={args.depth}) | {args.depth} reuses | {tied['step_s']:.4f} | "
        f"{tied['step_median_s']:.4f} | 1.00 | - | {tied['compile_s']:.1f} |"
    )
    needed = {}
    for budget in [(args.f_iters, args.b_iters), (args.depth, args.depth)]:
        for name, fields in VARIANTS.items():
            model = deq_model(base, args.depth, budget, fields)
            r = measure(model, args)
            if name not in needed:
                needed[name] = iterations_needed(model, args)
            bwd = f"{budget[1]}" if fields["grad"] == "ift" else "-"
            lines.append(
                f"| {name} | {budget[0]}/{bwd} | {r['step_s']:.4f} | {r['step_median_s']:.4f} | "
                f"{r['step_s'] / tied['step_s']:.2f} | {r['metrics']['deq_fwd_nstep']:.0f} | "
                f"{r['compile_s']:.1f} |"
            )
            print(lines[-1], flush=True)
    lines += [
        "",
        "### Iterations needed at initialisation (forward to tol 1e-3 / adjoint to tol 1e-6, cap 100)",
        "",
        "| model | forward / adjoint iterations (samples not converged) |",
        "|---|---|",
    ]
    return lines + [f"| {name} | {text} |" for name, text in needed.items()]


def memory_section(args, base: dict) -> list[str]:
    """Markdown lines: XLA's temporary memory of the step as K (= the DEQ's budget) grows."""
    lines = [
        "### Temporary memory of the compiled train step (XLA memory analysis, MiB)",
        "",
        "| K (reuses = DEQ fwd/bwd iterations) | weight-tied | weight-tied + remat nothing_saveable "
        "| DEQ IFT Anderson |",
        "|---|---|---|---|",
    ]
    for k in [int(k) for k in args.ks.split(",")]:
        models = (
            ResNetLike(depth=k, mask_mode="dense", **base),
            ResNetLike(depth=k, mask_mode="dense", remat_policy="nothing_saveable", **base),
            deq_model(base, k, (k, k), VARIANTS["DEQ IFT Anderson"]),
        )
        mib = [measure(m, args, timed=False)["temp_mib"] for m in models]
        lines.append(f"| {k} | " + " | ".join(f"{m:.2f}" for m in mib) + " |")
        print(lines[-1], flush=True)
    return lines


def main(argv=None):
    args = parse_args(argv)
    base = dict(width=args.width, groups=4 if args.width % 4 == 0 else 1)
    header = (
        f"Device: {jax.devices()[0].device_kind} ({jax.default_backend()}), jax {jax.__version__}. "
        f"Width {args.width}, batch {args.batch}, {args.size}x{args.size} images, "
        f"weight-tied depth K={args.depth}."
    )
    lines = [header, "", *step_time_sections(args, base), "", *memory_section(args, base)]
    report = "\n".join(lines) + "\n"
    print(report)
    if args.out:
        with open(args.out, "w") as f:
            f.write(report)


if __name__ == "__main__":
    main()
