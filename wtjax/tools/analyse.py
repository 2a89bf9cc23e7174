r"""Analyse trained runs: layer-to-layer CKA heatmaps and per-layer linear probes.

    python -m wtjax.tools.analyse --workdir=runs/multi --workdir=runs/same --out=analysis/ \
        --num_examples=1000

For every ``--workdir`` of the training job it rebuilds the model from ``config.json``, restores
the newest checkpoint, and runs ``--num_examples`` examples of the run's eval split through the
model with ``return_intermediates=True``. The layers are the stem output, the state after every
reuse of each tied block (``block_outputs``) and the pooled features. It writes, in ``--out``:

* ``<run>_cka.png`` / ``<run>_cka.npy``: the layer-by-layer linear CKA matrix (minibatch unbiased
  estimator over batches of ``--cka_batch`` examples; the biased one with ``--cka_batch=0``);
* ``probes.png``: linear-probe accuracy per layer for every run: a logistic regression fitted on
  the first half of the examples' pooled layer outputs and scored on the second half;
* ``analysis.json``: all numbers, with the split they came from.

The functions (:func:`load_run`, :func:`layer_features`, :func:`analyse_run`, :func:`analyse`)
are the library side: they read a training job's workdir (its config, model registry and
checkpoints), so they sit above the job layer, next to the command. The command's flags are
defined only when it runs (:func:`main`), so this module imports alongside ``wtjax.main``.
"""

from __future__ import annotations

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags, logging
from ml_collections import config_dict

from wtjax.analysis import cka, plots, probes


def load_run(workdir: str | Path):
    """``(config, model, variables, dataset)`` of a finished or interrupted training run."""
    import orbax.checkpoint as ocp

    from wtjax.data import pipeline as input_pipeline
    from wtjax.job import config as config_schema
    from wtjax.job import mask_record
    from wtjax.methods import pruning

    workdir = Path(workdir)
    config_file = workdir / "config.json"
    if not config_file.exists():
        raise FileNotFoundError(f"{config_file} not found: is {workdir} a workdir of `python -m wtjax.main`?")
    config = config_dict.ConfigDict(json.loads(config_file.read_text()))
    dataset = input_pipeline.create_dataset(config.data, seed=config.seed)
    model = config_schema.model_from_config(config.model, dataset.num_classes)
    mask_record.check(workdir, model, dataset.image_shape, write=False)  # the masks it was trained with
    manager = ocp.CheckpointManager((workdir / "checkpoints").absolute())
    step = _newest_sound_step(manager.all_steps(), workdir / "checkpoints")
    state = manager.restore(step, args=ocp.args.StandardRestore())
    variables = pruning.model_variables(state["params"], state.get("masks"))
    if state.get("batch_stats") is not None:  # BatchNorm's running statistics (train=False uses them)
        variables["batch_stats"] = state["batch_stats"]
    return config, model, variables, dataset, step


def _newest_sound_step(steps, directory: Path) -> int:
    """The newest checkpoint that verifies (or predates checksums, :mod:`wtjax.job.checksums`);
    a damaged one is named and skipped, as the training job does on resume."""
    from wtjax.job import checksums

    for step in sorted(steps, reverse=True):
        problem = checksums.verify(directory / str(step))
        if problem in (None, checksums.NO_MANIFEST):
            return step
        print(f"analyse: skipping checkpoint {directory / str(step)}: {problem}", flush=True)
    raise FileNotFoundError(f"no usable checkpoint in {directory}")


def layer_features(
    model, variables, dataset, num_examples: int
) -> tuple[list[str], list[np.ndarray], np.ndarray]:
    """Names, per-layer features ``(n, ...)`` and labels of the first ``num_examples`` eval examples."""

    @jax.jit
    def forward(images):
        _, out = model.apply(variables, images, train=False, return_intermediates=True)
        return out

    names, layers, labels = None, None, []
    seen = 0
    for batch in dataset.eval_batches(min(256, num_examples)):
        real = batch["mask"] > 0
        out = jax.device_get(forward(jnp.asarray(batch["image"])))
        stages = out["block_outputs"] if isinstance(out["block_outputs"], tuple) else (out["block_outputs"],)
        batch_layers = (
            [out["stem"]] + [stage[i] for stage in stages for i in range(len(stage))] + [out["pre_logits"]]
        )
        if names is None:
            names = ["stem"]
            for s, stage in enumerate(stages):
                prefix = f"s{s + 1}." if len(stages) > 1 else ""
                names += [f"{prefix}{i + 1}" for i in range(len(stage))]
            names.append("pool")
            layers = [[] for _ in names]
        for store, feature in zip(layers, batch_layers, strict=True):
            store.append(np.asarray(feature)[real].astype(np.float32))
        labels.append(batch["label"][real])
        seen += int(real.sum())
        if seen >= num_examples:
            break
    feats = [np.concatenate(f)[:num_examples] for f in layers]
    return names, feats, np.concatenate(labels)[:num_examples]


def analyse_run(workdir, num_examples=1000, cka_batch=250) -> dict:
    """CKA matrix and per-layer probe accuracies of one run (JSON-serialisable, with its split)."""
    config, model, variables, dataset, step = load_run(workdir)
    names, feats, labels = layer_features(model, variables, dataset, num_examples)
    n = len(labels)
    half = n // 2
    return {
        "workdir": str(workdir),
        "checkpoint_step": step,
        "model": config.model.to_dict(),
        "layers": names,
        "cka": cka.cka_matrix(feats, batch_size=cka_batch or None).tolist(),
        "probe_accuracy": probes.probe_layers(
            [f[:half] for f in feats], labels[:half], [f[half:] for f in feats], labels[half:]
        ),
        "examples": n,
        "split": f"{dataset.eval_split}; probes fitted on the first {half}, scored on the rest",
    }


def analyse(workdirs, out_dir, num_examples=1000, cka_batch=250) -> dict:
    """Run CKA and probes for every workdir; write plots and ``analysis.json`` into ``out_dir``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    results = {}
    for workdir in workdirs:
        run = Path(workdir).name
        r = results[run] = analyse_run(workdir, num_examples, cka_batch)
        matrix = np.asarray(r["cka"])
        np.save(out_dir / f"{run}_cka.npy", matrix)
        plots.cka_heatmap(matrix, r["layers"], str(out_dir / f"{run}_cka.png"), title=f"{run}: linear CKA")
        accuracy = r["probe_accuracy"]
        print(
            f"{run}: step {r['checkpoint_step']}, probe accuracy per layer "
            + " ".join(f"{a:.3f}" for a in accuracy)
        )
    names = next(iter(results.values()))["layers"]
    plots.probe_curve(
        {run: r["probe_accuracy"] for run, r in results.items()}, names, str(out_dir / "probes.png")
    )
    (out_dir / "analysis.json").write_text(json.dumps(results, indent=1) + "\n")
    return results


def main() -> None:
    """The command (``python -m wtjax.tools.analyse``): defines its flags, then runs :func:`analyse`."""
    workdirs = flags.DEFINE_multi_string(
        "workdir", None, "Run directory of the training job (repeatable).", required=True
    )
    out = flags.DEFINE_string("out", "analysis", "Where to write the plots and analysis.json.")
    num_examples = flags.DEFINE_integer(
        "num_examples", 1000, "Eval examples to analyse (half fit the probes)."
    )
    cka_batch = flags.DEFINE_integer(
        "cka_batch", 250, "Minibatch size of the unbiased CKA estimator (0: biased, all)."
    )

    def run(argv):
        if len(argv) > 1:
            raise app.UsageError(f"unexpected arguments: {argv[1:]}")
        if not flags.FLAGS["verbosity"].present:  # orbax logs every restore at INFO, as in wtjax.main
            logging.set_verbosity(logging.WARNING)
        analyse(workdirs.value, out.value, num_examples.value, cka_batch.value)

    jax.config.config_with_absl()  # JAX's own flags too (--jax_platforms=cpu ...)
    app.run(run)


if __name__ == "__main__":
    main()
