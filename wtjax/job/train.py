"""The training job: ``train_and_evaluate(config, workdir)``, readable top to bottom.

Sections: (1) processes, devices, workdir; (2) data; (3) model and optimizer; (4) restore or
initialise the state; (5) the jitted train and eval steps; (6) the loop (metrics, NaN guard,
evaluation, checkpoints, preemption); (7) final evaluation and summary.

Conventions of the model's ``out`` dict honoured here: ``out['aux_loss']`` (a scalar) is added to
the loss; ``out['metrics']`` (a dict of scalars) is averaged and logged as ``train/model/<key>``.
Models whose ``__call__`` declares a ``step`` keyword get the current step (e.g. a DEQ that
switches from weight-tied pre-training to its solver).

Randomness: ``key = PRNGKey(config.seed)``; parameters from ``fold_in(key, 0)``, the dropout key of
step ``s`` is ``fold_in(fold_in(key, 1), s)`` (with ``grad_accum_steps`` > 1, micro-batch ``m``
uses ``fold_in`` of it with ``m``), the data order and augmentation follow from
``(config.seed, s)``. A resumed run therefore repeats an uninterrupted one exactly.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import jax
import numpy as np

from wtjax.job import checkpointing, metrics, optim, parallel, preemption, steps
from wtjax.job import config as config_schema
from wtjax.methods.lora_finetune import FinetuneHook

PARAMS_SEED, DROPOUT_SEED = 0, 1


def train_and_evaluate(config, workdir: str | Path) -> dict:
    """Train ``config`` in ``workdir`` (resuming from its latest checkpoint) and evaluate.

    Args:
      config: a ``ConfigDict`` built with :func:`wtjax.job.config.base_config`.
      workdir: run directory (``config.json``, ``metrics.jsonl``, ``tensorboard/``,
        ``checkpoints/``, ``summary.json``).

    Returns:
      The final metrics: ``step``, ``eval/accuracy``, ``eval/loss``, ``eval/num_examples``,
      ``num_params``, ``wall_time_s`` and the last logged training metrics.

    Raises:
      wtjax.job.preemption.Preempted: SIGTERM (one process) or orbax's preemption sync point
        (``jax.distributed``) was reached; the state of the step reached was saved first.
      FloatingPointError: the loss or gradient became non-finite (the message names the step; the
        last checkpoint written before it is kept).
    """
    t_start = time.perf_counter()
    # ---------------------------------------------------------------- 1. Processes, devices, workdir
    parallel.initialize_distributed(config.distributed)
    config_schema.validate(config)
    mesh = parallel.create_mesh(config.num_devices)
    main = parallel.is_main_process()
    workdir = Path(workdir).absolute()
    if main:
        workdir.mkdir(parents=True, exist_ok=True)
        (workdir / "config.json").write_text(config.to_json_best_effort(indent=2, sort_keys=True) + "\n")
        print(f"wtjax: workdir {workdir}; {parallel.env_summary(mesh)}", flush=True)
    writer = metrics.MetricWriter(workdir, enabled=main, tensorboard=config.tensorboard)

    # ---------------------------------------------------------------- 2. Data
    from wtjax.data import pipeline as input_pipeline  # imported here: it pulls in tfds only when a job runs

    process_index, process_count = parallel.process_info()
    parallel.check_batch_size(config.batch_size, mesh, config.grad_accum_steps)
    eval_batch_size = config.eval_batch_size or config.batch_size
    parallel.check_batch_size(eval_batch_size, mesh)
    dataset = input_pipeline.create_dataset(
        config.data, seed=config.seed, process_index=process_index, process_count=process_count
    )
    steps_per_epoch = dataset.num_train // config.batch_size
    if steps_per_epoch < 1:
        raise ValueError(f"batch size {config.batch_size} exceeds the {dataset.num_train} training examples")
    total_steps = config.num_train_steps or int(round(config.num_epochs * steps_per_epoch))
    eval_every = steps_per_epoch if config.eval_every_steps is None else config.eval_every_steps
    if main:
        print(
            f"data: {dataset.name}, {dataset.num_train} train / {dataset.num_eval} eval "
            f"({dataset.eval_split}), "
            f"{steps_per_epoch} steps/epoch, {total_steps} steps",
            flush=True,
        )

    # ---------------------------------------------------------------- 3. Model and optimizer
    model = config_schema.model_from_config(config.model, dataset.num_classes)
    tx, schedule = optim.create_optimizer(config.optim, total_steps, steps_per_epoch)
    key = jax.random.PRNGKey(config.seed)
    params_key, dropout_key = jax.random.fold_in(key, PARAMS_SEED), jax.random.fold_in(key, DROPOUT_SEED)
    masks = _pruning_masks(config, model, tx, dataset, params_key, key)  # None unless config.pruning.method
    init_state = steps.make_init_state(model, tx, dataset.image_shape, params_key, masks)
    # LoRA fine-tuning (config.lora): the state holds only the trainable tree (adapters + new
    # head), so the optimizer and every checkpoint see only those; the frozen pretrained weights
    # are reloaded from config.pretrained on every (re)start and passed to the steps.
    hook = FinetuneHook.from_config(config)
    frozen, view = (), None
    if hook is not None:
        base = hook.base_params(dataset.num_classes, dataset.image_shape, rng=params_key)
        trainable = hook.init(params_key, base)
        frozen, view = (jax.device_put(base, parallel.replicated(mesh)),), hook.effective
        init_state = steps.make_init_state(model, tx, dataset.image_shape, params_key, masks, trainable)
        if main:
            print(hook.describe(base, trainable), flush=True)

    # ---------------------------------------------------------------- 4. Restore or initialise
    replicated = parallel.replicated(mesh)
    abstract_state = checkpointing.abstract_like(jax.eval_shape(init_state), replicated)
    checkpointer = checkpointing.Checkpointer(
        workdir / "checkpoints",
        keep=config.keep_checkpoints,
        every_steps=config.checkpoint_every_steps,
        async_save=config.async_checkpointing,
    )
    init_fn = jax.jit(init_state, out_shardings=replicated)
    state, restored = checkpointer.restore_or_init(init_fn, abstract_state)
    start_step = int(jax.device_get(state["step"]))
    num_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(abstract_state["params"]))
    if main:
        origin = f"resumed from checkpoint at step {start_step}" if restored else "initialised from the seed"
        print(f"model: {config.model.name}, {num_params:,} parameters; {origin}", flush=True)

    # ---------------------------------------------------------------- 5. Train and eval steps
    # Gradient accumulation's micro-batches are laid out for a batch split over all mesh devices.
    accum = {"grad_accum_steps": config.grad_accum_steps, "batch_shards": mesh.size}
    train_step = parallel.jit_train_step(
        _trace_once(steps.make_train_step(model, tx, schedule, dropout_key, view, **accum)), mesh, len(frozen)
    )
    eval_step = jax.jit(steps.make_eval_step(model, total_steps, view), out_shardings=replicated)

    def evaluate(params, masks=None) -> dict:
        sums = {"loss": 0.0, "correct": 0.0, "count": 0.0}
        for batch in dataset.eval_batches(eval_batch_size):
            out = jax.device_get(eval_step(params, parallel.global_batch(batch, mesh), masks, *frozen))
            sums = {k: sums[k] + float(out[k]) for k in sums}
        count = max(sums["count"], 1.0)
        return {
            metrics.EVAL_LOSS: sums["loss"] / count,
            metrics.EVAL_ACCURACY: sums["correct"] / count,
            metrics.EVAL_COUNT: sums["count"],
        }

    # ---------------------------------------------------------------- 6. The loop
    pending: list[tuple[int, dict, jax.Array]] = []  # per-step device values not yet fetched
    last_train: dict = {}
    progress = metrics.Progress(total_steps, start_step, enabled=main and config.progress)

    def flush_pending(step: int) -> dict:
        """Fetch the pending step metrics; raise on the first non-finite step; return averages."""
        nonlocal pending
        fetched = jax.device_get(pending)
        pending = []
        for s, _, finite in fetched:
            if not finite:
                checkpointer.close()
                good = checkpointer.latest_step()
                raise FloatingPointError(
                    f"non-finite loss or gradient at step {s} (training step {s + 1} of {total_steps}); "
                    f"stopped without saving it. Last good checkpoint: "
                    f"{'none' if good is None else checkpointer.directory / str(good)}"
                )
        if not fetched:
            return {}
        averages = {k: float(np.mean([m[k] for _, m, _ in fetched])) for k in fetched[0][1]}
        averages[metrics.LEARNING_RATE] = float(fetched[-1][1][metrics.LEARNING_RATE])
        return averages

    batches = dataset.train_batches(config.batch_size, start_step=start_step)
    t_interval, steps_in_interval = time.perf_counter(), 0
    preempted = False
    with preemption.PreemptionWatch(checkpointer.manager.reached_preemption) as watch:
        for step in range(start_step, total_steps):
            batch = parallel.global_batch(next(batches), mesh)
            state, (step_metrics, finite) = train_step(state, batch, *frozen)
            pending.append((step, step_metrics, finite))
            done = step + 1
            steps_in_interval += 1
            if step == start_step:
                jax.block_until_ready(state)
                first_step_s = time.perf_counter() - t_interval
                writer.write(done, {metrics.COMPILE_TIME: first_step_s})
                t_interval, steps_in_interval = time.perf_counter(), 0
                progress.restart(done)
            progress.update(done)
            preempted = watch.reached(done)  # save this step and stop (wtjax/job/preemption.py)

            if done % config.log_every_steps == 0 or done == total_steps or preempted:
                averages = flush_pending(step)
                elapsed = time.perf_counter() - t_interval
                if steps_in_interval:
                    averages[metrics.STEP_TIME] = elapsed / steps_in_interval
                    averages[metrics.IMAGES_PER_SEC] = steps_in_interval * config.batch_size / elapsed
                averages[metrics.EPOCH] = done / steps_per_epoch
                writer.write(done, averages)
                last_train = averages
                t_interval, steps_in_interval = time.perf_counter(), 0

            if eval_every and done % eval_every == 0 and done != total_steps and not preempted:
                writer.write(done, evaluate(state["params"], state.get("masks")))
                t_interval, steps_in_interval = time.perf_counter(), 0

            if checkpointer.should_save(done) or done == total_steps or preempted:
                flush_pending(step)  # never save a non-finite state
                checkpointer.save(done, state)
            if preempted:
                break
    if preempted:  # the job's answer to a preemption notice: the checkpoint, then stop
        checkpointer.close()  # waits for the save
        writer.close()
        stop = preemption.Preempted(done, checkpointer.directory / str(done))
        if main:
            print(f"\n{stop}", flush=True)
        raise stop

    # ---------------------------------------------------------------- 7. Final evaluation, summary
    final_eval = evaluate(state["params"], state.get("masks"))
    final_step = int(jax.device_get(state["step"]))
    writer.write(final_step, final_eval)
    checkpointer.close()
    wall = time.perf_counter() - t_start
    summary = {
        "step": final_step,
        **final_eval,
        **{k: v for k, v in last_train.items() if k.startswith("train/")},
        "num_params": num_params,
        "eval_split": dataset.eval_split,
        "wall_time_s": wall,
    }
    if masks is not None:  # pruning at initialisation: the fraction removed per masked leaf
        from wtjax.methods import pruning

        summary["pruned_fraction"] = pruning.sparsity_report({**masks["params"], **masks["masks"]})
    if main:
        print(
            f"\nfinal: step {final_step}, eval accuracy {final_eval[metrics.EVAL_ACCURACY]:.4f} "
            f"on {int(final_eval[metrics.EVAL_COUNT])} examples ({dataset.eval_split}), "
            f"eval loss {final_eval[metrics.EVAL_LOSS]:.4f}, {num_params:,} parameters, "
            f"wall time {wall:.1f} s",
            flush=True,
        )
        if config.accounting and hook is None:  # accounting expects the model's own params
            # Replicated parameters: this process's copy is the whole of them.
            local = jax.tree.map(lambda x: np.asarray(x.addressable_data(0)), state["params"])
            summary["accounting"], text = _accounting(model, local, dataset.image_shape)
            print(text, flush=True)
        (workdir / "summary.json").write_text(json.dumps(summary, indent=2, sort_keys=True) + "\n")
    writer.close()
    return summary


def _trace_once(fn):
    """``fn`` that raises if traced twice: a retrace in the loop would recompile every step."""
    traces = 0

    def traced_once(*args):
        nonlocal traces
        traces += 1
        if traces > 1:
            raise AssertionError("the train step was traced twice (changing shapes, dtypes or static values)")
        return fn(*args)

    return traced_once


def _accounting(model, params, image_shape) -> tuple[dict | None, str]:
    """``(summary dict, printable text)`` of :mod:`wtjax.analysis.accounting` (stored/active/used
    parameters, FLOPs per image)."""
    try:
        from wtjax.analysis import accounting

        result = accounting.summary(model, params, image_shape=image_shape)
        return result, accounting.format_summary(result)
    except Exception as e:  # accounting is a report, never a reason to lose a finished run
        return None, f"(accounting unavailable: {type(e).__name__}: {e})"


PRUNING_SEED = 2


def _pruning_masks(config, model, tx, dataset, params_key, key):
    """``config.pruning``'s masks for the initial parameters (``None`` when pruning is off).

    Computed eagerly once per job from the seed (the initial parameters, the first training batch
    of ``pruning.batch_size`` examples, the key ``fold_in(key, PRUNING_SEED)``), so a resumed job
    recomputes exactly the masks its checkpoint holds. See :func:`wtjax.methods.pruning.init_masks`.
    """
    from wtjax.methods import pruning

    if config.pruning.method is None:
        return None
    params = steps.make_init_state(model, tx, dataset.image_shape, params_key)()["params"]
    batch = next(dataset.train_batches(min(config.pruning.batch_size, dataset.num_train)))
    batch = {"image": batch["image"], "label": batch["label"]}
    masks = pruning.init_masks(config.pruning, model, params, batch, jax.random.fold_in(key, PRUNING_SEED))
    if parallel.is_main_process():
        removed = pruning.sparsity_report({**masks["params"], **masks["masks"]})["all"]
        print(f"pruning: {config.pruning.method}, {removed:.4f} of the selected weights removed", flush=True)
    return masks
