"""Holdout accuracy against training wall-clock, wtjax vs PyTorch, at the same time budget.

Both frameworks train the multi-mask tied ResNet-like model (the :mod:`vs_torch` twin: same
shapes, masks at density 0.5, initial weights, Adam at ``--lr``, batch 128) on the same batches:
one wtjax input pipeline (:func:`wtjax.data.pipeline.create_dataset` on a local CIFAR-10 copy,
random crop and flip, the last ``--holdout`` images after the fixed shuffle held out) feeds
both, so they differ only in the framework. The clock counts training only, batch loading
included; it stops while the holdout split is evaluated, every ``--eval_every_s`` seconds of
training, each framework with its own eval forward. The runs are sequential (never two at once);
each framework's curve goes to ``--out`` (JSON) as soon as it is done, and a rerun skips a
framework already there (``--force`` reruns), so an interrupted comparison resumes.

    python -m experiments.benchmarks.time_to_accuracy --data_dir=/tmp/cifar10/train --budget_s=600

Writes ``<out>.json``, ``<out>.md`` (a table) and ``<out>.png`` (the two curves). Needs the
``bench`` extra.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

from wtjax.job import parallel

parallel.use_cpu_cores((128,))  # before JAX runs anything, as the job does

import jax  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from experiments.benchmarks import torch_twin  # noqa: E402
from wtjax.core.masks import MaskSpec  # noqa: E402
from wtjax.data import fields, pipeline  # noqa: E402
from wtjax.job import steps  # noqa: E402
from wtjax.models.resnet_like import ResNetLike  # noqa: E402


def wtjax_runner(model, params, lr: float):
    """``(train(batch), accuracy(batches))`` for the job's jitted step on its default CPU mesh."""
    tx = optax.adam(lr)
    mesh = parallel.create_mesh()
    init = steps.make_init_state(model, tx, (32, 32, 3), jax.random.PRNGKey(0))
    state = {"state": jax.jit(init, out_shardings=parallel.replicated(mesh))(params)}
    train_step = parallel.jit_train_step(
        steps.make_train_step(model, tx, optax.constant_schedule(lr), jax.random.PRNGKey(1)), mesh
    )
    eval_step = jax.jit(steps.make_eval_step(model, 0), out_shardings=parallel.replicated(mesh))
    on_mesh = parallel.batch_sharded(mesh)

    def train(batch):
        state["state"], (step_metrics, _) = train_step(state["state"], jax.device_put(batch, on_mesh))
        return step_metrics

    def accuracy(batches) -> float:
        sums = [eval_step(state["state"], jax.device_put(b, on_mesh)) for b in batches]
        return float(sum(s["correct"] for s in sums) / sum(s["count"] for s in sums))

    return train, accuracy


def torch_runner(model, params, lr: float):
    """``(train(batch), accuracy(batches))`` for the PyTorch twin from the same weights and masks."""
    twin = torch_twin.TiedResNetTwin(
        model.width, model.depth, torch_twin.flax_masks(model, {"params": params})
    )
    torch_twin.load_flax_params(twin, {"params": params})
    opt = torch.optim.Adam(twin.parameters(), lr=lr)

    def nchw(images):
        return torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2)))

    def train(batch):
        twin.train()
        opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(twin(nchw(batch["image"])), torch.from_numpy(batch["label"].astype(np.int64)))
        loss.backward()
        opt.step()
        return loss.detach()

    def accuracy(batches) -> float:
        twin.eval()
        correct = count = 0.0
        with torch.inference_mode():
            for b in batches:
                hit = (twin(nchw(b["image"])).argmax(-1).numpy() == b["label"]) * b["mask"]
                correct, count = correct + hit.sum(), count + b["mask"].sum()
        return float(correct / count)

    return train, accuracy


def run(name: str, runner, dataset, args) -> list[dict]:
    """Train for ``args.budget_s`` seconds of training time; the holdout accuracy curve."""
    train, accuracy = runner
    batches = dataset.train_batches(args.batch)
    train(next(batches))  # compile / warm up outside the budget, as a long run amortises it
    curve, trained_s, step, next_eval = [], 0.0, 0, 0.0
    while True:
        if trained_s >= next_eval:
            acc = accuracy(list(dataset.eval_batches(args.eval_batch)))
            curve.append({"train_s": trained_s, "steps": step, "holdout_accuracy": acc})
            print(f"{name}: {trained_s:7.1f} s, {step} steps, holdout accuracy {acc:.4f}", flush=True)
            next_eval += args.eval_every_s
        if trained_s >= args.budget_s:
            return curve
        t0 = time.perf_counter()
        for _ in range(args.steps_per_check):
            out = train(next(batches))
        float(out["train/loss"] if name == "wtjax" else out)  # wait for the last step
        trained_s += time.perf_counter() - t0
        step += args.steps_per_check


def report(results: dict, args, out: Path) -> None:
    """The table (markdown) and the curves (PNG) of both frameworks."""
    lines = [
        f"CIFAR-10 local copy, holdout {args.holdout} (never trained on); width {args.width}, depth "
        f"{args.depth}, batch {args.batch}, Adam {args.lr}; budget {args.budget_s:.0f} s of training each.",
        "",
        "| framework | steps in budget | images/s | holdout accuracy at the end | best |",
        "|---|---|---|---|---|",
    ]
    for name, curve in results.items():
        last = curve[-1]
        best = max(c["holdout_accuracy"] for c in curve)
        rate = last["steps"] * args.batch / last["train_s"]
        lines.append(
            f"| {name} | {last['steps']} | {rate:.0f} | {last['holdout_accuracy']:.4f} | {best:.4f} |"
        )
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    fig = Figure(figsize=(5, 3.5))
    ax = fig.add_subplot()
    for name, curve in results.items():
        ax.plot([c["train_s"] for c in curve], [c["holdout_accuracy"] for c in curve], marker="o", label=name)
    ax.set(xlabel="training wall-clock (s)", ylabel="holdout accuracy", title="same model, same batches")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out.with_suffix(".png"), dpi=120)
    print("\n".join(lines))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--data_dir", required=True, help="a local CIFAR-10 copy (class folders or a release)"
    )
    parser.add_argument("--holdout", type=int, default=5000)
    parser.add_argument("--width", type=int, default=32)
    parser.add_argument("--depth", type=int, default=4)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--eval_batch", type=int, default=500)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--budget_s", type=float, default=600.0)
    parser.add_argument("--eval_every_s", type=float, default=120.0)
    parser.add_argument("--steps_per_check", type=int, default=10, help="steps between clock reads")
    parser.add_argument("--out", default="experiments/benchmarks/time_to_accuracy")
    parser.add_argument("--force", action="store_true", help="rerun frameworks already in <out>.json")
    args = parser.parse_args(argv)
    torch.set_num_threads(
        len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    )
    data = fields.data_config("cifar10", data_dir=args.data_dir, holdout=args.holdout)
    dataset = pipeline.create_dataset(data, seed=0)
    model = ResNetLike(
        width=args.width, depth=args.depth, mask_mode="multi", mask=MaskSpec("unstructured", 0.5)
    )
    params = jax.jit(model.init)(jax.random.PRNGKey(0), np.zeros((1, 32, 32, 3), np.float32))["params"]
    out = Path(args.out)
    path = out.with_suffix(".json")
    results = {} if args.force or not path.exists() else json.loads(path.read_text())["curves"]
    for name, make in (("wtjax", wtjax_runner), ("torch", torch_runner)):
        if name not in results:
            results[name] = run(name, make(model, params, args.lr), dataset, args)
            path.write_text(json.dumps({"args": vars(args), "curves": results}, indent=1))
    report(results, args, out)


if __name__ == "__main__":
    main()
