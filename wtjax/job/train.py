"""The training job: ``train_and_evaluate(config, workdir)``, readable top to bottom.

Sections: (1) processes, devices, workdir; (2) data; (3) model, optimizer and hooks (LoRA,
pruning: :mod:`wtjax.job.hooks`); (4) restore or initialise the state; (5) the jitted train and
eval steps; (6) the loop (metrics, NaN guard, evaluation, checkpoints, preemption); (7) final
evaluation and summary.

Conventions of the model's ``out`` dict honoured here: ``out['aux_loss']`` (a scalar) is added to
the loss; ``out['metrics']`` (a dict of scalars) is averaged and logged as ``train/model/<key>``;
keys ending in ``_nonconverged``/``_diverged`` count failed solves, handled by
``config.solver_failure`` (log, skip the step, stop; :mod:`wtjax.job.steps`).
Models whose ``__call__`` declares a ``step`` keyword get the current step (e.g. a DEQ that
switches from weight-tied pre-training to its solver). A model with BatchNorm outside its ties has
its running statistics in the state (``TrainState.batch_stats``; :mod:`wtjax.job.steps`).

Randomness: ``key = PRNGKey(config.seed)``; parameters from ``fold_in(key, 0)``, the dropout key of
step ``s`` is ``fold_in(fold_in(key, 1), s)`` (with ``grad_accum_steps`` > 1, micro-batch ``m``
uses ``fold_in`` of it with ``m``), random pruning scores from ``fold_in(key, 2)``, the data order
and augmentation follow from ``(config.seed, s)``. A resumed run therefore repeats an
uninterrupted one exactly.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import time
from pathlib import Path

import jax
import numpy as np

from wtjax.job import (
    checkpointing,
    hooks,
    mask_record,
    metrics,
    optim,
    parallel,
    preemption,
    resume,
    steps,
    workdir_lock,
)
from wtjax.job import config as config_schema
from wtjax.job.state import TrainState

PARAMS_SEED, DROPOUT_SEED, PRUNING_SEED = 0, 1, 2


@dataclasses.dataclass
class _Run:
    """What every section of the job reads: the config, devices, run directory and data schedule."""

    config: object
    mesh: jax.sharding.Mesh
    main: bool  # process 0: writes logs, metrics, config and summary
    workdir: Path
    writer: metrics.MetricWriter
    dataset: object = None
    eval_batch_size: int = 0
    steps_per_epoch: int = 0
    total_steps: int = 0
    eval_every: int = 0

    def log(self, text: str) -> None:
        if self.main:
            print(text, flush=True)


def train_and_evaluate(config, workdir: str | Path) -> dict:
    """Train ``config`` in ``workdir`` (resuming from its latest checkpoint) and evaluate.

    Args:
      config: a ``ConfigDict`` built with :func:`wtjax.job.config.base_config`.
      workdir: run directory (``config.json``, ``metrics.jsonl``, ``tensorboard/``,
        ``checkpoints/``, ``summary.json``).

    Returns:
      The final metrics: ``step``, ``eval/accuracy``, ``eval/loss``, ``eval/num_examples``,
      ``num_params``, ``wall_time_s``, the last logged training metrics and the hooks' entries
      (e.g. ``pruned_fraction``).

    Raises:
      wtjax.job.preemption.Preempted: SIGTERM (one process) or orbax's preemption sync point
        (``jax.distributed``) was reached; the state of the step reached was saved first.
      FloatingPointError: the loss or gradient became non-finite (the message names the step; the
        newest checkpoint that verifies is kept and named).
      wtjax.job.steps.SolverFailed: a solve failed under ``config.solver_failure='stop'`` (the
        message names the step and the metric; the newest checkpoint that verifies is named).
      wtjax.job.workdir_lock.WorkdirLocked: another live job holds ``workdir`` (refused at once).
      ValueError: a config value out of range (before anything runs), or resuming the workdir's
        checkpoints with a config that changes the run (:mod:`wtjax.job.resume`).
      wtjax.job.checkpointing.CheckpointError: the workdir has checkpoints but none restores
        (each rejected one is named on a line of its own).

    However it ends, a checkpoint being written is completed before the exception propagates.
    """
    with contextlib.ExitStack() as cleanup:  # releases the workdir lock however the job ends
        return _train_and_evaluate(config, workdir, cleanup)


def _train_and_evaluate(config, workdir, cleanup: contextlib.ExitStack) -> dict:
    t_start = time.perf_counter()
    run = _open_run(config, workdir, cleanup)  # 1. Processes, devices, workdir.
    _open_data(run)  # 2. Data.
    # 3. Model, optimizer, hooks.
    image_shape = run.dataset.image_shape
    model = config_schema.model_from_config(config.model, run.dataset.num_classes)
    # Two ties drawing the same masks, or masks other than the run's checkpoints were trained
    # with, stop the job here (:mod:`wtjax.job.mask_record`).
    allow = config.resume_despite_changes
    mask_record.check(run.workdir, model, image_shape, write=run.main, allow_change=allow, log=run.log)
    tx, schedule = optim.create_optimizer(config.optim, run.total_steps, run.steps_per_epoch)
    key = jax.random.PRNGKey(config.seed)
    params_key, dropout_key = jax.random.fold_in(key, PARAMS_SEED), jax.random.fold_in(key, DROPOUT_SEED)
    train_hooks, params, frozen = _start_hooks(run, model, key, params_key)
    # 4. Restore or initialise.
    checkpointer = checkpointing.Checkpointer(
        run.workdir / "checkpoints",
        keep=config.keep_checkpoints,
        every_steps=config.checkpoint_every_steps,
        async_save=config.async_checkpointing,
        log=run.log,
    )
    init_state = steps.make_init_state(model, tx, image_shape, params_key, train_hooks)
    state, num_params = _restore_or_init(run, checkpointer, init_state, params)
    # 5. Steps.
    train_step, evaluate = _jit_steps(run, model, tx, schedule, dropout_key, train_hooks, frozen)
    try:
        # 6. The loop.
        state, last_train, preempted_at = _train_loop(run, state, train_step, evaluate, checkpointer)
        if preempted_at is not None:
            _stop_for_preemption(run, checkpointer, preempted_at)
        # 7. Final evaluation and summary.
        summary = _final_summary(run, state, evaluate, checkpointer, last_train, num_params, t_start)
    finally:
        checkpointer.close()  # however the run ends, a save under way is completed, never lost
    for hook in train_hooks:
        summary.update(hook.summary())
    accounting = config.accounting and all(hook.trains_model_params for hook in train_hooks)
    _write_summary(run, summary, model if accounting else None, state)
    run.writer.close()
    return summary


# ---------------------------------------------------------------------------- 1, 2: run and data


def _open_run(config, workdir, cleanup: contextlib.ExitStack) -> _Run:
    """Start the processes, check the config, make the mesh and the workdir (``config.json``).

    Process 0 locks the workdir (:mod:`wtjax.job.workdir_lock`, released by ``cleanup``) before
    writing to it: a second job on a live workdir is refused at once.
    """
    parallel.initialize_distributed(config.distributed)
    config_schema.validate(config)
    mesh = parallel.create_mesh(config.num_devices)
    main = parallel.is_main_process()
    workdir = workdir_lock.local_workdir(workdir)  # a gs:// URL is refused, not made a local folder
    _lock_workdir(workdir, main, cleanup)
    log = functools.partial(print, flush=True) if main else (lambda text: None)
    changes = resume.check(config, workdir, log)  # every process: a refused resume stops them all
    if main:
        resume.record(config, workdir, changes, log)  # config.json (+ config_history.jsonl)
        print(f"wtjax: workdir {workdir}; {parallel.env_summary(mesh)}", flush=True)
    writer = metrics.MetricWriter(workdir, enabled=main, tensorboard=config.tensorboard)
    return _Run(config, mesh, main, workdir, writer)


def _lock_workdir(workdir: Path, main: bool, cleanup: contextlib.ExitStack) -> None:
    """Process 0 locks (and makes) the workdir; ``cleanup`` releases the lock.

    In a multi-process job every process learns whether process 0 got it, so all of them stop
    at once when it was refused, instead of the others waiting for process 0 in a collective.
    """
    refused = None
    if main:
        try:
            cleanup.enter_context(workdir_lock.acquire(workdir))
        except workdir_lock.WorkdirLocked as e:
            refused = e
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        if not multihost_utils.broadcast_one_to_all(np.int32(refused is None)) and not main:
            raise workdir_lock.WorkdirLocked(
                f"workdir {workdir} is in use by another job (process 0 was refused its lock)"
            )
    if refused is not None:
        raise refused


def _open_data(run: _Run) -> None:
    """The dataset and the run's length in steps, epochs and evaluation intervals."""
    from wtjax.data import pipeline  # imported here: it pulls in tfds only when a job runs

    config = run.config
    process_index, process_count = parallel.process_info()
    parallel.check_batch_size(config.batch_size, run.mesh, config.grad_accum_steps)
    run.eval_batch_size = config.batch_size if config.eval_batch_size is None else config.eval_batch_size
    parallel.check_batch_size(run.eval_batch_size, run.mesh)
    dataset = pipeline.create_dataset(
        config.data, seed=config.seed, process_index=process_index, process_count=process_count
    )
    run.dataset = dataset
    run.steps_per_epoch = dataset.num_train // config.batch_size
    if run.steps_per_epoch < 1:
        raise ValueError(f"batch size {config.batch_size} exceeds the {dataset.num_train} training examples")
    if config.num_train_steps is None:
        run.total_steps = int(round(config.num_epochs * run.steps_per_epoch))
        if run.total_steps < 1:
            raise ValueError(
                f"num_epochs {config.num_epochs} is less than one step of the {run.steps_per_epoch} "
                "per epoch; raise num_epochs or set num_train_steps"
            )
    else:
        run.total_steps = config.num_train_steps
    run.eval_every = run.steps_per_epoch if config.eval_every_steps is None else config.eval_every_steps
    run.log(
        f"data: {dataset.name}, {dataset.num_train} train / {dataset.num_eval} eval "
        f"({dataset.eval_split}), {run.steps_per_epoch} steps/epoch, {run.total_steps} steps"
    )


# ------------------------------------------------------------------- 3, 4, 5: hooks, state, steps


def _start_hooks(run: _Run, model, key, params_key):
    """``(hooks, the model's initial params if a hook computed them, the hooks' frozen arguments)``."""
    image_shape = run.dataset.image_shape
    train_hooks, params = hooks.from_config(
        run.config,
        model,
        run.dataset,
        params_key=params_key,
        pruning_key=jax.random.fold_in(key, PRUNING_SEED),
        init_variables=jax.jit(functools.partial(steps.init_variables, model, image_shape, params_key)),
    )
    for hook in train_hooks:
        run.log(hook.describe())
    replicated = parallel.replicated(run.mesh)
    return train_hooks, params, tuple(jax.device_put(hook.frozen(), replicated) for hook in train_hooks)


def _restore_or_init(run: _Run, checkpointer, init_state, params) -> tuple[TrainState, int]:
    """``(state, number of trained parameters)``: the newest checkpoint, else the initial state.

    ``params``: the model's initial params if a hook already computed them (else ``None``).
    """
    replicated = parallel.replicated(run.mesh)
    init_fn = functools.partial(jax.jit(init_state, out_shardings=replicated), params)
    abstract_state = checkpointing.abstract_like(jax.eval_shape(init_fn), replicated)
    state, restored = checkpointer.restore_or_init(init_fn, abstract_state)
    start_step = int(jax.device_get(state.step))
    num_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(abstract_state.params))
    origin = f"resumed from checkpoint at step {start_step}" if restored else "initialised from the seed"
    run.log(f"model: {run.config.model.name}, {num_params:,} parameters; {origin}")
    return state, num_params


def _jit_steps(run: _Run, model, tx, schedule, dropout_key, train_hooks, frozen):
    """``(train_step(state, batch), evaluate(state) -> eval metrics)``, jitted for the mesh."""
    # Gradient accumulation's micro-batches are laid out for a batch split over all mesh devices.
    accum = {"grad_accum_steps": run.config.grad_accum_steps, "batch_shards": run.mesh.size}
    policy = run.config.solver_failure
    step_fn = steps.make_train_step(
        model, tx, schedule, dropout_key, train_hooks, **accum, solver_failure=policy
    )
    jitted = parallel.jit_train_step(_trace_once(step_fn), run.mesh, len(frozen))
    eval_step = steps.make_eval_step(model, run.total_steps, train_hooks)
    eval_step = jax.jit(eval_step, out_shardings=parallel.replicated(run.mesh))

    def train_step(state, batch):
        return jitted(state, parallel.global_batch(batch, run.mesh), *frozen)

    def evaluate(state) -> dict:
        sums = {"loss": 0.0, "correct": 0.0, "count": 0.0}
        batches = -(-run.dataset.num_eval // run.eval_batch_size)
        enabled = run.main and run.config.progress
        with metrics.progress_bar(batches, desc="eval", unit="batch", enabled=enabled, leave=False) as bar:
            for batch in run.dataset.eval_batches(run.eval_batch_size):
                out = jax.device_get(eval_step(state, parallel.global_batch(batch, run.mesh), *frozen))
                sums = {k: sums[k] + float(out[k]) for k in sums}
                bar.update()
        count = max(sums["count"], 1.0)
        return {
            metrics.EVAL_LOSS: sums["loss"] / count,
            metrics.EVAL_ACCURACY: sums["correct"] / count,
            metrics.EVAL_COUNT: sums["count"],
        }

    return train_step, evaluate


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


# ------------------------------------------------------------------------------------- 6: loop


class _PendingMetrics:
    """Per-step device values not fetched yet (fetching every step would stall the device).

    ``check`` fetches and guards them (NaN; a failed solve under ``solver_failure='stop'``) and
    keeps them; ``flush`` checks and returns the averages of every step kept since the last flush.
    """

    def __init__(self, checkpointer, total_steps: int, stop_on_solver_failure: bool = False):
        self.checkpointer, self.total_steps, self.items, self.checked = checkpointer, total_steps, [], []
        self.stop_on_solver_failure = stop_on_solver_failure

    def add(self, step: int, step_metrics: dict, finite) -> None:
        self.items.append((step, step_metrics, finite))

    def check(self) -> None:
        """Fetch the pending steps; raise on the first non-finite one (or failed solve under 'stop')."""
        fetched, self.items = jax.device_get(self.items), []
        for s, m, finite in fetched:
            if not finite:
                raise FloatingPointError(
                    f"non-finite loss, gradient or BatchNorm statistics at step {s} {self._stopped(s)}"
                )
            if self.stop_on_solver_failure and m.get(metrics.SOLVER_FAILED, 0) > 0:
                failed = ", ".join(f"{k} = {m[k]:g}" for k in steps.solver_failure_keys(m) if m[k] > 0)
                raise steps.SolverFailed(
                    f"solver failure at step {s}: {failed} under config.solver_failure='stop' (give the "
                    "solver more iterations or a looser tol, or set solver_failure to 'skip' or 'log') "
                    + self._stopped(s)
                )
        self.checked += fetched

    def _stopped(self, s: int) -> str:
        """The end of a stop message: the step and the last checkpoint kept (after closing them)."""
        self.checkpointer.close()
        good = self.checkpointer.newest_verified_step()
        last = "none" if good is None else self.checkpointer.directory / str(good)
        step = f"training step {s + 1} of {self.total_steps}"
        return f"({step}); stopped without saving it. Last good (verified) checkpoint: {last}"

    def flush(self) -> dict:
        """Check the pending steps; return the averages (counts: sums) of the steps kept."""
        self.check()
        fetched, self.checked = self.checked, []
        if not fetched:
            return {}
        averages = {k: float(np.mean([m[k] for _, m, _ in fetched])) for k in fetched[0][1]}
        for k in metrics.COUNTS:
            if k in averages:
                averages[k] = float(sum(m[k] for _, m, _ in fetched))
        averages[metrics.LEARNING_RATE] = float(fetched[-1][1][metrics.LEARNING_RATE])
        return averages


def _train_loop(run: _Run, state, train_step, evaluate, checkpointer):
    """Train to ``run.total_steps``: ``(state, last logged train metrics, preempted step or None)``.

    Logs every ``log_every_steps``, evaluates every ``run.eval_every``, saves every
    ``checkpoint_every_steps`` and at the end; a preemption notice saves the step reached and stops.
    """
    config, writer = run.config, run.writer
    start_step = int(jax.device_get(state.step))
    stop_on_failure = config.solver_failure == "stop"
    pending, last_train = _PendingMetrics(checkpointer, run.total_steps, stop_on_failure), {}
    bar = metrics.progress_bar(
        run.total_steps, initial=start_step, desc="train", unit="step", enabled=run.main and config.progress
    )
    if start_step < run.total_steps:
        run.log("compiling the train step (the first step includes it) ...")
    batches = run.dataset.train_batches(config.batch_size, start_step=start_step)
    t_interval, steps_in_interval = time.perf_counter(), 0
    with bar, preemption.PreemptionWatch(checkpointer.manager.reached_preemption) as watch:
        for step in range(start_step, run.total_steps):
            state, (step_metrics, finite) = train_step(state, next(batches))
            pending.add(step, step_metrics, finite)
            done = step + 1
            steps_in_interval += 1
            if step == start_step:
                jax.block_until_ready(state)
                writer.write(done, {metrics.COMPILE_TIME: time.perf_counter() - t_interval})
                t_interval, steps_in_interval = time.perf_counter(), 0
            bar.update()
            preempted = watch.reached(done)  # save this step and stop (wtjax/job/preemption.py)
            if done % config.log_every_steps == 0 or done == run.total_steps or preempted:
                averages = pending.flush()
                elapsed = time.perf_counter() - t_interval
                if steps_in_interval:
                    averages[metrics.STEP_TIME] = elapsed / steps_in_interval
                    averages[metrics.IMAGES_PER_SEC] = steps_in_interval * config.batch_size / elapsed
                averages[metrics.EPOCH] = done / run.steps_per_epoch
                writer.write(done, averages)
                last_train = averages
                t_interval, steps_in_interval = time.perf_counter(), 0
            if run.eval_every and done % run.eval_every == 0 and done != run.total_steps and not preempted:
                writer.write(done, evaluate(state))
                _plot_curves(run)
                t_interval, steps_in_interval = time.perf_counter(), 0
            if checkpointer.should_save(done) or done == run.total_steps or preempted:
                pending.check()  # never save a non-finite state (its metrics wait for the next log)
                checkpointer.save(done, state)
            if preempted:
                return state, last_train, done
    return state, last_train, None


def _stop_for_preemption(run: _Run, checkpointer, step: int):
    """The job's answer to a preemption notice: the checkpoint of ``step`` (written), then stop."""
    checkpointer.close()  # waits for the save
    run.writer.close()
    stop = preemption.Preempted(step, checkpointer.directory / str(step))
    run.log(f"\n{stop}")
    raise stop


# --------------------------------------------------------------------------- 7: final summary


def _final_summary(run: _Run, state, evaluate, checkpointer, last_train, num_params, t_start) -> dict:
    """Evaluate the final state, close the checkpoints, print and return the summary."""
    final_eval = evaluate(state)
    final_step = int(jax.device_get(state.step))
    run.writer.write(final_step, final_eval)
    _plot_curves(run)
    checkpointer.close()
    wall = time.perf_counter() - t_start
    run.log(
        f"\nfinal: step {final_step}, eval accuracy {final_eval[metrics.EVAL_ACCURACY]:.4f} "
        f"on {int(final_eval[metrics.EVAL_COUNT])} examples ({run.dataset.eval_split}), "
        f"eval loss {final_eval[metrics.EVAL_LOSS]:.4f}, {num_params:,} parameters, "
        f"wall time {wall:.1f} s"
    )
    return {
        "step": final_step,
        **final_eval,
        **{k: v for k, v in last_train.items() if k.startswith("train/")},
        "num_params": num_params,
        "eval_split": run.dataset.eval_split,
        "wall_time_s": wall,
    }


def _plot_curves(run: _Run) -> None:
    """``<workdir>/curves.png`` from ``metrics.jsonl`` (process 0, ``config.plots``)."""
    if not (run.main and run.config.plots):
        return
    try:
        from wtjax.analysis import plots  # imported here: matplotlib only when a run plots

        records = metrics.read_jsonl(run.workdir / "metrics.jsonl")
        plots.training_curves(records, str(run.workdir / "curves.png"), title=run.config.name)
    except Exception as e:  # a picture is never a reason to lose a run
        run.log(f"(curves.png not written: {type(e).__name__}: {e})")


def _write_summary(run: _Run, summary: dict, model, state) -> None:
    """``summary.json`` (process 0), with the parameter/FLOP accounting of ``model`` unless ``None``."""
    if not run.main:
        return
    if model is not None:
        # Replicated parameters: this process's copy is the whole of them.
        local = jax.tree.map(lambda x: np.asarray(x.addressable_data(0)), state.params)
        summary["accounting"], text = _accounting(model, local, run.dataset.image_shape)
        print(text, flush=True)
    (run.workdir / "summary.json").write_text(json.dumps(summary, indent=2, sort_keys=True) + "\n")


def _accounting(model, params, image_shape) -> tuple[dict | None, str]:
    """``(summary dict, printable text)`` of :mod:`wtjax.analysis.accounting` (stored/active/used
    parameters, FLOPs per image)."""
    try:
        from wtjax.analysis import accounting

        result = accounting.summary(model, params, image_shape=image_shape)
        return result, accounting.format_summary(result)
    except Exception as e:  # accounting is a report, never a reason to lose a finished run
        return None, f"(accounting unavailable: {type(e).__name__}: {e})"
