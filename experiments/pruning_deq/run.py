"""Resumable runner of the study: one JSON per run in ``results/``; finished runs are skipped.

    python experiments/pruning_deq/run.py                 # every run of sweep.py
    python experiments/pruning_deq/run.py --group tied    # one group
    python experiments/pruning_deq/run.py --limit 5       # at most 5 new runs

Each run: digits (scikit-learn's bundled set via :func:`wtjax.data.builtin.load_digits`, 16x16x1,
the fixed 1,500/297 split; the 297 test images are the evaluation set), normalised by the pixel
mean/std, no augmentation; the model from the registry; pruning at initialisation with
:func:`wtjax.pruning.prune_model` on the first 256 training images of the seed's order; Adam
(lr 1e-3, x0.1 after 2/3 of the epochs, the paper's recipe shortened), batch 50. A lean loop
rather than ``wtjax.train`` (no checkpoints or logging): the whole sweep has to fit a shared
2-core machine. The same setting runs through the training job with ``configs/digits_mondeq.py``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import sweep  # noqa: E402

from wtjax import pruning  # noqa: E402
from wtjax.data.builtin import load_digits  # noqa: E402
from wtjax.masks import MaskSpec  # noqa: E402
from wtjax.models import build_model  # noqa: E402

BATCH, LR, PRUNE_BATCH = 50, 1e-3, 256


def load_data():
    train, test = load_digits()
    x_tr = train.images.astype(np.float32) / 255.0
    x_te = test.images.astype(np.float32) / 255.0
    mean, std = x_tr.mean(), x_tr.std()
    return (
        (x_tr - mean) / std,
        train.labels.astype(np.int32),
        (x_te - mean) / std,
        test.labels.astype(np.int32),
    )


def build(run):
    fields = dict(run["fields"])
    if "mask_mode" in fields:
        fields["mask"] = MaskSpec(density=0.5, seed=run["seed"])
    return build_model(run["model"], num_classes=10, **fields)


def execute(run, data) -> dict:
    x_tr, y_tr, x_te, y_te = data
    model = build(run)
    key = jax.random.PRNGKey(run["seed"])
    params = model.init(jax.random.fold_in(key, 0), jnp.zeros((1, *x_tr.shape[1:])))["params"]
    order = np.random.default_rng(run["seed"]).permutation(len(x_tr))
    result = dict(run)
    masks = None
    t0 = time.perf_counter()
    if run["method"] is not None:
        batch = {"image": x_tr[order[:PRUNE_BATCH]], "label": y_tr[order[:PRUNE_BATCH]]}
        predicate = pruning.path_predicate(run["include"]) if run["include"] else None
        masks = pruning.prune_model(
            run["method"],
            lambda v, x: model.apply(v, x)[0],
            params,
            batch,
            run["sparsity"],
            scope=run["scope"],
            predicate=predicate,
            key=jax.random.fold_in(key, 2),
            tied_path=run["tied_path"],
            per_reuse=run["per_reuse"],
            depth=run["fields"].get("depth"),
            iterations=20,
        )
        report = pruning.sparsity_report({**masks["params"], **masks["masks"]})
        result["mask_sparsity"] = report
    result["prune_time_s"] = time.perf_counter() - t0
    if not run["train"]:
        return result

    steps_per_epoch = len(x_tr) // BATCH
    total = int(run["epochs"] * steps_per_epoch)
    schedule = optax.piecewise_constant_schedule(LR, {int(total * 2 / 3): 0.1})
    tx = optax.adam(schedule)
    opt_state = tx.init(params)

    def forward(p, x):
        return model.apply(pruning.model_variables(p, masks), x)

    @jax.jit
    def step(p, o, x, y):
        def loss_fn(p):
            logits, out = forward(p, x)
            return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(), out.get("metrics", {})

        (loss, mets), g = jax.value_and_grad(loss_fn, has_aux=True)(p)
        updates, o = tx.update(g, o, p)
        return optax.apply_updates(p, updates), o, loss, mets

    @jax.jit
    def evaluate(p, x, y):
        logits, out = forward(p, x)
        return jnp.mean(jnp.argmax(logits, -1) == y), out.get("metrics", {})

    t0 = time.perf_counter()
    iters, losses = [], []
    for s in range(total):
        epoch, i = divmod(s, steps_per_epoch)
        if i == 0:
            order = np.random.default_rng((run["seed"], epoch)).permutation(len(x_tr))
        idx = order[i * BATCH : (i + 1) * BATCH]
        params, opt_state, loss, mets = step(params, opt_state, x_tr[idx], y_tr[idx])
        if "mon_fwd_iters" in mets:
            iters.append(mets["mon_fwd_iters"])
        losses.append(loss)
    losses = np.asarray(jax.device_get(losses))
    result["train_time_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    acc, mets = jax.block_until_ready(evaluate(params, x_te, y_te))
    result["eval_time_s"] = time.perf_counter() - t0  # includes compilation; not a speed measurement
    result["final_train_loss"] = float(losses[-steps_per_epoch:].mean())
    result["finite"] = bool(np.all(np.isfinite(losses)))
    result["test_accuracy"] = float(acc)
    if iters:
        it = np.asarray(jax.device_get(iters))
        result["train_fwd_iters_first_epoch"] = float(it[:steps_per_epoch].mean())
        result["train_fwd_iters_last_epoch"] = float(it[-steps_per_epoch:].mean())
        result["eval_fwd_iters"] = float(mets["mon_fwd_iters"])
        result["eval_fwd_res"] = float(mets["mon_fwd_res"])
    return result


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--group", default=None)
    ap.add_argument("--limit", type=int, default=None)
    ap.add_argument("--out", default=str(HERE / "results"))
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    data = load_data()
    todo = [
        r for r in sweep.runs() if args.group in (None, r["group"]) and not (out / f"{r['id']}.json").exists()
    ]
    if args.limit is not None:
        todo = todo[: args.limit]
    print(f"{len(todo)} runs to do", flush=True)
    for n, run in enumerate(todo):
        t0 = time.perf_counter()
        result = execute(run, data)
        result["wall_time_s"] = time.perf_counter() - t0
        tmp = out / f"{run['id']}.json.tmp"
        tmp.write_text(json.dumps(result, indent=1, default=list) + "\n")
        tmp.rename(out / f"{run['id']}.json")  # atomic: a killed run leaves no partial result
        acc = result.get("test_accuracy")
        print(f"[{n + 1}/{len(todo)}] {run['id']}: acc {acc}, {result['wall_time_s']:.1f} s", flush=True)


if __name__ == "__main__":
    main()
