"""wtjax vs PyTorch on CPU, side by side in one run: the multi-mask tied ResNet-like model.

For each shape (width C, depth K) both frameworks train the same model (same shapes, the same
masks at density 0.5, Adam lr 1e-3, batch 128 of random 32x32x3 images) and run an eval forward:

* wtjax: the training job's own jitted step (:func:`wtjax.job.steps.make_train_step` through
  :func:`wtjax.job.parallel.jit_train_step`) over the job's default CPU mesh (one device per
  core, :func:`wtjax.job.parallel.use_cpu_cores`), and its eval step;
* PyTorch: :class:`experiments.benchmarks.torch_twin.TiedResNetTwin`, ``torch.set_num_threads``
  = the core count.

After a warm-up (compilation) the two alternate round by round (order reversed every other round),
each timing ``--steps`` steps; medians over all timed steps. Needs the ``bench`` extra.

    python -m experiments.benchmarks.vs_torch --shapes=32x4,64x8,16x8 --steps=3 --rounds=2 --scan_too
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

from wtjax.job import parallel

parallel.use_cpu_cores((128,))  # before JAX runs anything, as the job does

import jax  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from experiments.benchmarks import torch_twin  # noqa: E402
from wtjax.core.masks import MaskSpec  # noqa: E402
from wtjax.job import steps  # noqa: E402
from wtjax.models.resnet_like import ResNetLike  # noqa: E402


def wtjax_steps(width: int, depth: int, batch: int, unroll: int | None = None):
    """``(train, evaluate, model, params, host batch)``: zero-argument callables timing one step each.

    ``unroll``: the tie's scan unroll (``None``: the model's default, :func:`wtjax.core.tied.default_unroll`).
    """
    model = ResNetLike(
        width=width, depth=depth, mask_mode="multi", mask=MaskSpec("unstructured", 0.5), unroll=unroll
    )
    tx = optax.adam(1e-3)
    mesh = parallel.create_mesh()
    init_state = steps.make_init_state(model, tx, (32, 32, 3), jax.random.PRNGKey(0))
    state = jax.jit(init_state, out_shardings=parallel.replicated(mesh))()
    train_step = parallel.jit_train_step(
        steps.make_train_step(model, tx, optax.constant_schedule(1e-3), jax.random.PRNGKey(1)), mesh
    )
    eval_step = jax.jit(steps.make_eval_step(model, 0), out_shardings=parallel.replicated(mesh))
    rng = np.random.default_rng(0)
    host = {
        "image": rng.standard_normal((batch, 32, 32, 3), np.float32),
        "label": rng.integers(0, 10, batch).astype(np.int32),
        "mask": np.ones(batch, np.float32),
    }
    batch_on_mesh = jax.device_put(host, parallel.batch_sharded(mesh))
    holder = {"state": state}

    def train():
        holder["state"], (step_metrics, _) = train_step(holder["state"], batch_on_mesh)
        jax.block_until_ready(step_metrics)

    def evaluate():
        jax.block_until_ready(eval_step(holder["state"], batch_on_mesh))

    return train, evaluate, model, state.params, host


def torch_steps(model, params, host):
    """The twin with the Flax model's masks and initial weights, trained on the same batch."""
    twin = torch_twin.TiedResNetTwin(
        model.width, model.depth, torch_twin.flax_masks(model, {"params": params})
    )
    torch_twin.load_flax_params(twin, {"params": params})
    opt = torch.optim.Adam(twin.parameters(), lr=1e-3)
    images = torch.as_tensor(host["image"].transpose(0, 3, 1, 2).copy())
    labels = torch.as_tensor(host["label"].astype(np.int64))

    def train():
        twin.train()
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(twin(images), labels).backward()
        opt.step()

    def evaluate():
        twin.eval()
        with torch.inference_mode():
            twin(images)

    return train, evaluate


def timed(fn, n: int) -> list[float]:
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def compare(width: int, depth: int, args) -> dict:
    """Median train-step and eval-forward seconds of both frameworks at one shape, interleaved."""
    jax_train, jax_eval, model, params, host = wtjax_steps(width, depth, args.batch)
    runners = {"wtjax": (jax_train, jax_eval), "torch": torch_steps(model, params, host)}
    if args.scan_too:  # the tie as a while loop (unroll=1), the default before unrolling on CPU
        runners["wtjax scan"] = wtjax_steps(width, depth, args.batch, unroll=1)[:2]
    times = {(fw, kind): [] for fw in runners for kind in ("train", "eval")}
    for train, evaluate in runners.values():  # warm-up: compilation, allocator, thread pools
        train()
        evaluate()
    for r in range(args.rounds):
        for fw in list(runners)[:: 1 if r % 2 == 0 else -1]:
            train, evaluate = runners[fw]
            times[fw, "train"] += timed(train, args.steps)
            times[fw, "eval"] += timed(evaluate, args.steps)
    return {key: statistics.median(values) for key, values in times.items()}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", default="32x4,64x8,16x8", help="CxK,... (width x depth)")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--scan_too", action="store_true", help="also time wtjax with the tie as a scan")
    args = parser.parse_args(argv)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    torch.set_num_threads(cores)
    print(f"{cores} cores; wtjax on {len(jax.devices())} CPU device(s), torch {torch.__version__} on "
          f"{torch.get_num_threads()} threads; batch {args.batch}, multi-mask density 0.5\n")  # fmt: skip
    scan = " wtjax scan train s | ratio |" if args.scan_too else ""
    print(f"| C, K | torch train s | wtjax train s | ratio |{scan} torch eval s | wtjax eval s | ratio |")
    print("|---" * (9 if args.scan_too else 7) + "|")
    for shape in args.shapes.split(","):
        width, depth = (int(v) for v in shape.split("x"))
        t = compare(width, depth, args)
        row = [f"{width}, {depth}"]
        for fw in ("wtjax", "wtjax scan")[: 2 if args.scan_too else 1]:
            row += [f"{t[fw, 'train']:.3f}", f"{t[fw, 'train'] / t['torch', 'train']:.2f}"]
        row.insert(1, f"{t['torch', 'train']:.3f}")
        row += [
            f"{t['torch', 'eval']:.3f}",
            f"{t['wtjax', 'eval']:.3f}",
            f"{t['wtjax', 'eval'] / t['torch', 'eval']:.2f}",
        ]
        print("| " + " | ".join(row) + " |", flush=True)


if __name__ == "__main__":
    main()
