r"""Benchmark: training-step cost of the weight-tied ResNet-like model and its variants.

For the ResNet-like model (width C, K reuses, batch B, S x S x 3 images, Adam, ``jax.jit`` with
the parameters and optimizer state donated) it measures:

1. the training-step time of not-tied, dense tied, same-mask, multi-mask unstructured (density
   0.5) and multi-mask N:M (2:4), each with ``nn.scan`` and unrolled (``scan=False``); medians
   over ``--steps`` timed steps after ``--warmup`` untimed ones, variants interleaved round by
   round so machine-load drift hits all of them alike (wall time, and the process's CPU time);
2. compile time (``lower`` + ``compile``) of the multi-mask step for K in ``--compile-depths``,
   scan vs unrolled (unrolled capped at ``--max-unrolled-compile-depth``);
3. achieved FLOP/s: FLOPs of the step from XLA's cost analysis of the *unrolled* program (XLA
   counts a while-loop body once, so a scanned program under-reports by about K) divided by the
   step time, against a large float32 matmul (``--matmul-n``) timed in the same rounds.

It then reports the ratios against the targets: multi-mask step <= 1.05x dense tied; scan no
slower than unrolled; scan compile at the largest K <= 1.5x the smallest K; achieved FLOP/s >=
0.35 of the matmul's. ``--mask-cost`` also times mask generation alone (one reuse's masks).

    python -m experiments.benchmarks.bench_tied --quick                  # smoke run, ~1-2 min
    python -m experiments.benchmarks.bench_tied --out=experiments/benchmarks/tied.md
    # (defaults: --width=64 --depth=8 --batch=128 --size=32 --steps=5 --compile-depths=4,8,16,32)

Prints a markdown report (and writes it with ``--out``) and, with ``--json``, the raw numbers.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from wtjax.core.conv import resolve_impl
from wtjax.core.masks import MaskSpec, masks_for
from wtjax.models.resnet_like import ResNetLike

# name -> ResNetLike fields (besides width/depth/scan/conv_impl)
VARIANTS = {
    "not-tied": dict(form="not_tied", mask_mode="dense"),
    "tied dense": dict(form="tied", mask_mode="dense"),
    "tied same-mask (unstr. 0.5)": dict(form="tied", mask_mode="same", mask=MaskSpec("unstructured", 0.5)),
    "multi-mask unstr. 0.5": dict(form="tied", mask_mode="multi", mask=MaskSpec("unstructured", 0.5)),
    "multi-mask 2:4": dict(form="tied", mask_mode="multi", mask=MaskSpec("nm", n=2, m=4)),
}
COMPILE_VARIANT = "multi-mask unstr. 0.5"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--width", type=int, default=64)
    p.add_argument("--depth", type=int, default=8, help="K for the step-time comparison")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--size", type=int, default=32, help="image side S (S x S x 3 inputs)")
    p.add_argument("--steps", type=int, default=5, help="timed steps per variant (median reported)")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps per variant after compiling")
    p.add_argument("--compile-depths", default="4,8,16,32")
    p.add_argument("--max-unrolled-compile-depth", type=int, default=32, help="skip larger unrolled K")
    p.add_argument("--matmul-n", type=int, default=4096, help="side of the reference float32 matmul")
    p.add_argument("--conv-impl", default="auto", choices=["auto", "xla", "im2col"])
    p.add_argument("--variants", default="all", help="comma-separated subset of variant names, or 'all'")
    p.add_argument("--no-unrolled", action="store_true", help="time only the scan programs")
    p.add_argument("--skip-compile-sweep", action="store_true")
    p.add_argument("--mask-cost", action="store_true", help="also time one reuse's mask generation")
    p.add_argument("--quick", action="store_true", help="tiny smoke run (C=8, K=2, B=4, 8x8, 2 steps)")
    p.add_argument("--out", default=None, help="write the markdown report here")
    p.add_argument("--json", default=None, help="write the raw numbers here")
    args = p.parse_args(argv)
    if args.quick:
        args.width, args.depth, args.batch, args.size, args.steps = 8, 2, 4, 8, 2
        args.compile_depths, args.matmul_n = "2,4", 256
    args.compile_depths = [int(k) for k in args.compile_depths.split(",")]
    return args


# ----------------------------------------------------------------------------------------------
# The training step.


def make_step(model, tx):
    """Adam training step on softmax cross-entropy; params and optimizer state are donated."""

    def loss_fn(params, images, labels):
        logits, _ = model.apply({"params": params}, images, train=True)
        return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

    def step(params, opt_state, images, labels):
        loss, grads = jax.value_and_grad(loss_fn)(params, images, labels)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    return jax.jit(step, donate_argnums=(0, 1))


def compile_step(fields, args, depth, scan, batch):
    """Build, initialise and compile one variant; returns (compiled, state, compile seconds, flops)."""
    model = ResNetLike(
        num_classes=10, width=args.width, depth=depth, scan=scan, conv_impl=args.conv_impl, **fields
    )
    images, labels = batch
    params = jax.jit(lambda k: model.init(k, images[:1])["params"])(jax.random.PRNGKey(0))
    tx = optax.adam(1e-3)
    opt_state = tx.init(params)
    t0 = time.perf_counter()
    compiled = make_step(model, tx).lower(params, opt_state, images, labels).compile()
    seconds = time.perf_counter() - t0
    return compiled, [params, opt_state], seconds, flops_of(compiled)


def flops_of(compiled) -> float:
    cost = compiled.cost_analysis()
    if isinstance(cost, list | tuple):  # older JAX returned one dict per program
        cost = cost[0] if cost else {}
    return float((cost or {}).get("flops", float("nan")))


def run_step(compiled, state, batch):
    """One step; donation means the returned state replaces the old one. Returns (wall, cpu) s."""
    w0, c0 = time.perf_counter(), time.process_time()
    params, opt_state, loss = compiled(state[0], state[1], *batch)
    loss.block_until_ready()
    state[0], state[1] = params, opt_state
    if not np.isfinite(float(loss)):
        raise FloatingPointError("non-finite loss in the benchmark step")
    return time.perf_counter() - w0, time.process_time() - c0


def make_matmul(n):
    a = jax.random.normal(jax.random.PRNGKey(1), (n, n), jnp.float32)
    b = jax.random.normal(jax.random.PRNGKey(2), (n, n), jnp.float32)
    f = jax.jit(jnp.dot).lower(a, b).compile()
    f(a, b).block_until_ready()

    def timed():
        t0 = time.perf_counter()
        f(a, b).block_until_ready()
        return time.perf_counter() - t0

    return timed, 2.0 * n**3


# ----------------------------------------------------------------------------------------------
# Sections.


def bench_steps(args, batch):
    names = list(VARIANTS) if args.variants == "all" else [v.strip() for v in args.variants.split(",")]
    unknown = sorted(set(names) - set(VARIANTS))
    if unknown:
        raise SystemExit(f"unknown variants {unknown}; choose from {list(VARIANTS)}")
    modes = [True] if args.no_unrolled else [True, False]
    programs = {}
    for name in names:
        for scan in modes:
            compiled, state, seconds, flops = compile_step(VARIANTS[name], args, args.depth, scan, batch)
            for _ in range(args.warmup):
                run_step(compiled, state, batch)
            programs[(name, scan)] = dict(compiled=compiled, state=state, compile_s=seconds, flops=flops)
            print(f"compiled {name:28s} scan={scan!s:5s} {seconds:7.1f} s  flops={flops:.3e}", flush=True)
    matmul, matmul_flops = make_matmul(args.matmul_n)
    wall = {k: [] for k in programs}
    cpu = {k: [] for k in programs}
    mm = []
    for r in range(args.steps):
        # Alternate the order each round so no variant always runs right after the same one.
        order = list(programs) if r % 2 == 0 else list(reversed(programs))
        for i, key in enumerate(order):
            if i % 4 == 0:  # the matmul reference sees the same load drift as the steps
                mm.append(matmul())
            w, c = run_step(programs[key]["compiled"], programs[key]["state"], batch)
            wall[key].append(w)
            cpu[key].append(c)
            print(f"  {key[0]:28s} scan={key[1]!s:5s} {w:8.3f} s wall {c:8.2f} s cpu", flush=True)
        print(f"round {r + 1}/{args.steps} done", flush=True)
    mm.append(matmul())
    results = {}
    for key, prog in programs.items():
        name, scan = key
        # FLOPs of the model are those of the unrolled program (a while body is counted once).
        unrolled = programs.get((name, False), {}).get("flops", float("nan"))
        results[key] = dict(
            step_s=statistics.median(wall[key]),
            step_min_s=min(wall[key]),
            step_cpu_s=statistics.median(cpu[key]),
            all_s=wall[key],
            compile_s=prog["compile_s"],
            flops_xla=prog["flops"],
            flops=unrolled,
        )
    matmul_s = statistics.median(mm)
    return results, dict(
        seconds=matmul_s, min_s=min(mm), all_s=mm, flops=matmul_flops, flops_per_s=matmul_flops / matmul_s
    )


def bench_compile(args, batch):
    out = {}
    for depth in args.compile_depths:
        for scan in (True, False):
            if not scan and depth > args.max_unrolled_compile_depth:
                out[(depth, scan)] = None
                continue
            _, _, seconds, _ = compile_step(VARIANTS[COMPILE_VARIANT], args, depth, scan, batch)
            out[(depth, scan)] = seconds
            print(f"compile K={depth:3d} scan={scan!s:5s} {seconds:7.1f} s", flush=True)
    return out


def bench_mask_cost(args, reps=20):
    """Seconds to generate one reuse's masks of the two tied kernels (what each reuse adds)."""
    shapes = {
        ("conv1", "kernel"): (3, 3, args.width, args.width),
        ("conv2", "kernel"): (3, 3, args.width, args.width),
    }
    params = {k[0]: {"kernel": jnp.zeros(s)} for k, s in shapes.items()}
    out = {}
    for name in ("multi-mask unstr. 0.5", "multi-mask 2:4"):
        spec = VARIANTS[name]["mask"]
        f = jax.jit(lambda i, spec=spec: masks_for(params, spec, i, ("tied", "block")))
        jax.block_until_ready(f(0))
        times = []
        for i in range(reps):
            t0 = time.perf_counter()
            jax.block_until_ready(f(i + 1))
            times.append(time.perf_counter() - t0)
        out[name] = statistics.median(times)
    return out


# ----------------------------------------------------------------------------------------------
# Report.


def report(args, steps, matmul, compiles, mask_cost) -> str:
    impl = resolve_impl(args.conv_impl)
    lines = [
        f"# bench_tied: C={args.width}, K={args.depth}, batch {args.batch}, {args.size}x{args.size}x3, Adam",
        "",
        f"JAX {jax.__version__}, backend {jax.default_backend()}, {jax.device_count()} device(s), "
        f"conv impl {args.conv_impl} -> {impl}, {platform.processor() or platform.machine()}; "
        f"medians of {args.steps} timed steps after {args.warmup} warm-up step(s), variants interleaved.",
        "",
        f"Reference float32 matmul {args.matmul_n}^3: {matmul['seconds'] * 1e3:.1f} ms, "
        f"{matmul['flops_per_s'] / 1e9:.1f} GFLOP/s (median of {len(matmul['all_s'])}, timed between the "
        f"steps; best {matmul['flops'] / matmul['min_s'] / 1e9:.1f} GFLOP/s). Step columns: median, and "
        "the fastest step in brackets.",
        "",
        "## Training step",
        "",
        "| variant | loop | step (s) | CPU time (s) | vs dense tied (same loop) | scan/unrolled "
        "| GFLOP/step | achieved GFLOP/s | of matmul | compile (s) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for (name, scan), r in steps.items():
        dense = steps.get(("tied dense", scan))
        other = steps.get((name, not scan))
        rate = r["flops"] / r["step_s"]
        lines.append(
            f"| {name} | {'scan' if scan else 'unrolled'} | {r['step_s']:.3f} ({r['step_min_s']:.3f}) | "
            f"{r['step_cpu_s']:.2f} | "
            f"{r['step_s'] / dense['step_s'] if dense else float('nan'):.3f} | "
            f"{r['step_s'] / other['step_s'] if (other and scan) else float('nan'):.3f} | "
            f"{r['flops'] / 1e9:.1f} | {rate / 1e9:.1f} | {rate / matmul['flops_per_s']:.2f} | "
            f"{r['compile_s']:.1f} |"
        )
    if compiles:
        lines += [
            "",
            f"## Compile time of the {COMPILE_VARIANT} step (s)",
            "",
            "| K | scan | unrolled |",
            "|---|---|---|",
        ]
        for depth in args.compile_depths:
            u = compiles[(depth, False)]
            lines.append(
                f"| {depth} | {compiles[(depth, True)]:.1f} | {'skipped' if u is None else f'{u:.1f}'} |"
            )
    if mask_cost:
        lines += ["", "## Mask generation (one reuse, both tied kernels, jitted alone)", ""]
        lines += [f"- {name}: {s * 1e3:.2f} ms" for name, s in mask_cost.items()]
    lines += ["", "## Targets", ""] + targets(args, steps, matmul, compiles)
    return "\n".join(lines) + "\n"


def targets(args, steps, matmul, compiles):
    out = []

    def check(label, value, limit, ok):
        verdict = "n/a" if not np.isfinite(value) else ("MET" if ok(value) else "MISSED")
        out.append(f"- {label}: {value:.3f} (target {limit}) **{verdict}**")

    for name in ("multi-mask unstr. 0.5", "multi-mask 2:4"):
        for scan in (True, False):
            if (name, scan) in steps and ("tied dense", scan) in steps:
                ratio = steps[(name, scan)]["step_s"] / steps[("tied dense", scan)]["step_s"]
                check(
                    f"{name} / dense tied ({'scan' if scan else 'unrolled'})",
                    ratio,
                    "<= 1.05",
                    lambda v: v <= 1.05,
                )
    for (name, scan), r in steps.items():
        if scan and (name, False) in steps:
            check(
                f"scan / unrolled, {name}",
                r["step_s"] / steps[(name, False)]["step_s"],
                "<= 1.0",
                lambda v: v <= 1.0,
            )
    if compiles:
        lo, hi = min(args.compile_depths), max(args.compile_depths)
        check(
            f"scan compile K={hi} / K={lo}",
            compiles[(hi, True)] / compiles[(lo, True)],
            "<= 1.5",
            lambda v: v <= 1.5,
        )
    best = max(
        (r["flops"] / r["step_s"] for r in steps.values() if np.isfinite(r["flops"])), default=float("nan")
    )
    for (name, scan), r in steps.items():
        if name == "tied dense" and scan:
            check(
                "achieved / matmul FLOP/s, dense tied scan",
                r["flops"] / r["step_s"] / matmul["flops_per_s"],
                ">= 0.35",
                lambda v: v >= 0.35,
            )
    check(
        "achieved / matmul FLOP/s, best variant", best / matmul["flops_per_s"], ">= 0.35", lambda v: v >= 0.35
    )
    return out


def main(argv=None):
    args = parse_args(argv)
    key_i, key_l = jax.random.split(jax.random.PRNGKey(42))
    batch = (
        jax.random.normal(key_i, (args.batch, args.size, args.size, 3), jnp.float32),
        jax.random.randint(key_l, (args.batch,), 0, 10),
    )
    steps, matmul = bench_steps(args, batch)
    compiles = None if args.skip_compile_sweep else bench_compile(args, batch)
    mask_cost = bench_mask_cost(args) if args.mask_cost else None
    text = report(args, steps, matmul, compiles, mask_cost)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)
    if args.json:
        raw = dict(
            args=vars(args),
            steps={f"{n}|{'scan' if s else 'unrolled'}": r for (n, s), r in steps.items()},
            matmul=matmul,
            compile={f"{k}|{'scan' if s else 'unrolled'}": v for (k, s), v in (compiles or {}).items()},
            mask_cost=mask_cost,
        )
        with open(args.json, "w") as f:
            json.dump(raw, f, indent=1)


if __name__ == "__main__":
    main()
