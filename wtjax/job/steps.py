"""The pure initial-state, training and evaluation step functions of the job (jitted by the caller).

The state is a :class:`wtjax.job.state.TrainState`; the job's hooks (:mod:`wtjax.job.hooks`, e.g.
LoRA, pruning) set parts of the initial state and map its params to the model's variables.

Model contract: ``model.apply({'params': p}, images, train=..., rngs=...)`` returns
``(logits, out)``. Honoured keys of ``out``: ``aux_loss`` (a scalar added to the loss) and
``metrics`` (a dict of scalars, reported as ``train/model/<key>``). A model whose ``__call__``
declares a ``step`` keyword receives the current step.

The loss is the mean softmax cross-entropy over the (global) batch, plus ``aux_loss``.

Model state (:data:`STATE_COLLECTIONS`): a model whose init makes a ``batch_stats`` collection
(BatchNorm outside any tie: a tie cannot hold batch statistics, :mod:`wtjax.core.tied`) has it in
``state.batch_stats``; the train step applies the model with ``train=True`` and
``mutable=['batch_stats']`` and keeps the updated statistics, every other apply (eval, pruning
at init, ``train=False``) reads them. BatchNorm's mean over the batch axis is over the global
batch under data parallelism (the step is jitted over the whole batch; XLA inserts the
cross-device reductions). Any other collection made at init is an error naming it.

Solver failures (``config.solver_failure``, :data:`SOLVER_FAILURE_POLICIES`): a model metric whose
key ends in ``_nonconverged`` or ``_diverged`` (:data:`wtjax.job.metrics.SOLVER_FAILURE_SUFFIXES`)
counts failed solves; a step where any is > 0 is counted in ``train/solver_failed_steps``. Under
``'skip'`` that step leaves the params and optimizer state unchanged (and is counted in
``train/skipped_steps``); under ``'stop'`` the job raises :class:`SolverFailed` at the next
metrics flush. Models without such metrics get the same program under every policy.
"""

from __future__ import annotations

import functools
import inspect

import jax
import jax.numpy as jnp
import optax

from wtjax.job import metrics
from wtjax.job.hooks import apply_variables
from wtjax.job.state import TrainState

# 'log' (default): count failed solves and train on, as before the policy existed (a DEQ's early
# steps often leave some samples above tol; stopping or skipping by default would end or change
# existing runs). 'skip': count them and leave the step's update out. 'stop': raise at the next flush.
SOLVER_FAILURE_POLICIES = ("log", "skip", "stop")


class SolverFailed(RuntimeError):
    """A forward or backward solve failed under ``config.solver_failure='stop'``."""


def solver_failure_keys(names) -> list[str]:
    """The step metric names (``train/model/<key>``) that count failed solves."""
    prefix, suffixes = metrics.MODEL_PREFIX, metrics.SOLVER_FAILURE_SUFFIXES
    return sorted(k for k in names if k.startswith(prefix) and k.endswith(suffixes))


def takes_step(model) -> bool:
    """Whether the model's ``__call__`` declares a ``step`` keyword."""
    return "step" in inspect.signature(type(model).__call__).parameters


# The variable collections besides ``params`` that the job keeps in the state (BatchNorm's).
STATE_COLLECTIONS = ("batch_stats",)


def init_variables(model, image_shape, params_key) -> dict:
    """The model's initial variables, from ``params_key`` (also its dropout key at init).

    Returns:
      ``{'params': ...}``, plus ``'batch_stats'`` when the model makes that collection.

    Raises:
      ValueError: the model's init makes a collection the job cannot keep (named).
    """
    extra = {"step": 0} if takes_step(model) else {}
    images = jnp.zeros((1, *image_shape), jnp.float32)
    rngs = {"params": params_key, "dropout": params_key}
    variables = dict(model.init(rngs, images, train=False, **extra))
    unsupported = sorted(set(variables) - {"params", *STATE_COLLECTIONS})
    if unsupported:
        raise ValueError(
            f"model {type(model).__name__} makes the variable collection(s) {unsupported} at init; the "
            f"training job keeps only 'params' and {list(STATE_COLLECTIONS)} (BatchNorm's running "
            "statistics) in its state"
        )
    return variables


def init_params(model, image_shape, params_key):
    """The model's initial parameters (:func:`init_variables`' ``'params'``)."""
    return init_variables(model, image_shape, params_key)["params"]


def make_init_state(model, tx, image_shape, params_key, hooks=()):
    """``init_state(params=None) -> TrainState`` at step 0.

    ``params``: the initial params when already computed (default: :func:`init_variables`, unless
    a hook sets them, e.g. LoRA's trainable tree). The hooks transform the state in order
    (:meth:`wtjax.job.hooks.TrainHook.init_state`), then the optimizer state is made from the
    final params, once. ``batch_stats`` are the model's initial ones (:func:`init_variables`).

    Raises:
      ValueError: the model has ``batch_stats`` and a hook trains other params than the model's
        (LoRA: the pretrained running statistics would not be loaded).
    """

    def init_state(params=None):
        state = TrainState(step=jnp.asarray(0, jnp.int32), params=params, opt_state=None)
        for hook in hooks:
            state = hook.init_state(state)
        # Under jit (the job) an init whose params are not used is dropped from the program.
        variables = init_variables(model, image_shape, params_key)
        if state.params is None:
            state = state.replace(params=variables["params"])
        if "batch_stats" in variables:
            _check_hooks_keep_model_params(hooks)
            state = state.replace(batch_stats=variables["batch_stats"])
        return state.replace(opt_state=tx.init(state.params))

    return init_state


def _check_hooks_keep_model_params(hooks) -> None:
    """A model with running statistics cannot be trained through a hook with its own params."""
    for hook in hooks:
        if not getattr(hook, "trains_model_params", True):
            raise ValueError(
                f"{type(hook).__name__} trains other params than the model's, and the model has BatchNorm "
                "statistics (batch_stats): their pretrained values would not be loaded"
            )


def make_train_step(
    model, tx, schedule, dropout_key, hooks=(), *, grad_accum_steps=1, batch_shards=1, solver_failure="log"
):
    """``train_step(state, batch, *frozen) -> (new_state, (step_metrics, finite))``.

    The dropout key of step ``s`` is ``fold_in(dropout_key, s)``, so a step depends only on the
    state and the batch (resumed runs repeat uninterrupted ones). ``finite`` is False when the
    loss, the gradient norm or an updated BatchNorm statistic is NaN/inf; the caller decides what
    to do (the state is updated regardless and must not be saved).

    ``hooks`` (:class:`wtjax.job.hooks.TrainHook`) map the trained params to the model's
    variables; ``frozen`` holds one argument per hook (``hook.frozen()``, e.g. LoRA's frozen
    pretrained weights: arguments, not closed over, which would embed them as constants).

    Gradient accumulation (``grad_accum_steps`` > 1): the batch is cut into that many equal
    micro-batches (:func:`micro_batches`, laid out for a batch split over ``batch_shards``
    devices), their gradients are averaged in a ``lax.scan`` (activations of one micro-batch at a
    time) and one optimizer update follows: the update and the metrics equal those of the whole
    batch up to float summation order. Micro-batch ``m`` of step ``s`` uses the dropout key
    ``fold_in(fold_in(dropout_key, s), m)`` (independent masks per micro-batch, so with dropout
    the result is a different, equally valid draw than the large batch's). A model with
    ``batch_stats`` (BatchNorm) normalises each micro-batch by its own statistics (so its
    gradients are not the whole batch's), and its running statistics are chained through the
    micro-batches in order: micro-batch ``m`` starts from those ``m - 1`` left, as if the
    micro-batches were consecutive steps (``grad_accum_steps`` momentum updates per step, each
    of a micro-batch's statistics, where the whole batch would make one update of its own).

    ``solver_failure``: ``'log'``, ``'skip'`` or ``'stop'`` (module docstring; ``'stop'`` is the
    caller's to apply, from ``train/solver_failed_steps``).
    """
    if solver_failure not in SOLVER_FAILURE_POLICIES:
        raise ValueError(f"solver_failure must be one of {SOLVER_FAILURE_POLICIES}, got {solver_failure!r}")
    grad_fn = _grads_and_metrics(model, hooks)

    def train_step(state: TrainState, batch, *frozen):
        step, params = state.step, state.params
        step_key = jax.random.fold_in(dropout_key, step)
        if grad_accum_steps == 1:
            grads, step_metrics, batch_stats = grad_fn(params, state, frozen, batch, step, step_key)
        else:
            micro = micro_batches(batch, grad_accum_steps, batch_shards)
            grads, step_metrics, batch_stats = _accumulate(
                grad_fn, params, state, frozen, micro, step, step_key
            )
        updates, opt_state = tx.update(grads, state.opt_state, params)
        grad_norm = optax.tree.norm(grads)
        step_metrics[metrics.GRAD_NORM] = grad_norm
        step_metrics[metrics.LEARNING_RATE] = schedule(step)
        finite = _all_finite(step_metrics[metrics.TRAIN_LOSS], grad_norm, batch_stats)
        new_state = state.replace(
            step=step + 1,
            params=optax.apply_updates(params, updates),
            opt_state=opt_state,
            batch_stats=batch_stats,
        )
        new_state = _apply_solver_policy(solver_failure, state, new_state, step_metrics)
        return new_state, (step_metrics, finite)

    return train_step


def _all_finite(loss, grad_norm, batch_stats):
    """Whether the loss, the gradient norm and every updated BatchNorm statistic are finite.

    BatchNorm's running variance can overflow while the normalised output, the loss and the
    gradients stay finite: it would poison every evaluation and checkpoint after it.
    """
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    for leaf in jax.tree.leaves(batch_stats):  # none without BatchNorm: the same program as ever
        finite &= jnp.all(jnp.isfinite(leaf))
    return finite


def _apply_solver_policy(policy: str, state, new_state, step_metrics: dict):
    """Count a failed solve of this step in ``step_metrics``; under ``'skip'``, undo its update
    (params, optimizer state and BatchNorm statistics; the step count goes on).

    A model without solver-failure metrics is left as it is (the same compiled program).
    """
    keys = solver_failure_keys(step_metrics)
    if not keys:
        return new_state
    failed = functools.reduce(jnp.logical_or, [step_metrics[k] > 0 for k in keys])
    step_metrics[metrics.SOLVER_FAILED] = failed.astype(jnp.float32)
    if policy != "skip":
        return new_state
    step_metrics[metrics.SKIPPED_STEPS] = failed.astype(jnp.float32)

    def keep(new, old):  # a select inside the program: no host round trip per step
        return jnp.where(failed, old, new)

    return new_state.replace(
        params=jax.tree.map(keep, new_state.params, state.params),
        opt_state=jax.tree.map(keep, new_state.opt_state, state.opt_state),
        batch_stats=jax.tree.map(keep, new_state.batch_stats, state.batch_stats),
    )


def _accumulate(grad_fn, params, state, frozen, micro, step, step_key):
    """``(grads, metrics, batch_stats)``: mean gradients and metrics over the stacked
    micro-batches ``micro``, one at a time; BatchNorm statistics chained through them in order."""
    num_micro = jax.tree.leaves(micro)[0].shape[0]

    def add(carry, indexed):
        grad_sum, batch_stats = carry
        m, batch = indexed
        micro_state = state.replace(batch_stats=batch_stats)
        grads, micro_metrics, batch_stats = grad_fn(
            params, micro_state, frozen, batch, step, jax.random.fold_in(step_key, m)
        )
        return (jax.tree.map(jnp.add, grad_sum, grads), batch_stats), micro_metrics

    # The sum is kept in (at least) float32 even for low-precision parameters.
    zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.promote_types(p.dtype, jnp.float32)), params)
    carry = (zeros, state.batch_stats)  # None (no BatchNorm) is an empty carry
    (grad_sum, batch_stats), stacked = jax.lax.scan(add, carry, (jnp.arange(num_micro), micro))
    # Equal micro-batch sizes: the mean of micro-batch means is the batch mean.
    grads = jax.tree.map(lambda g, p: (g / num_micro).astype(p.dtype), grad_sum, params)
    return grads, jax.tree.map(lambda v: jnp.mean(v, axis=0), stacked), batch_stats


def _grads_and_metrics(model, hooks):
    """``fn(params, state, frozen, batch, step, rng) -> (grads, metrics, batch_stats)`` of one
    (micro-)batch; ``batch_stats``: the updated ``state.batch_stats`` (``None`` without)."""
    with_step = takes_step(model)

    def loss_fn(params, state, frozen, batch, step, rng):
        kwargs = {"step": step} if with_step else {}
        variables = apply_variables(hooks, params, state, frozen)
        apply = functools.partial(model.apply, variables, batch["image"], train=True, rngs={"dropout": rng})
        if state.batch_stats is None:  # decided when tracing: no BatchNorm, the same program as ever
            (logits, out), batch_stats = apply(**kwargs), None
        else:
            (logits, out), updated = apply(**kwargs, mutable=["batch_stats"])
            batch_stats = updated["batch_stats"]
        xent = optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"]).mean()
        aux = out.get("aux_loss")  # None when the model has no auxiliary loss
        loss = xent if aux is None else xent + aux
        values = {
            metrics.TRAIN_LOSS: loss,
            metrics.TRAIN_XENT: xent,
            metrics.TRAIN_ACCURACY: jnp.mean(jnp.argmax(logits, -1) == batch["label"]),
            **{metrics.MODEL_PREFIX + k: jnp.mean(v) for k, v in out.get("metrics", {}).items()},
        }
        if aux is not None:
            values[metrics.TRAIN_AUX_LOSS] = aux
        return loss, (values, batch_stats)

    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

    def grads_and_metrics(*args):
        (_, (values, batch_stats)), grads = grad_fn(*args)
        return grads, values, batch_stats

    return grads_and_metrics


def micro_batches(batch, grad_accum_steps: int, batch_shards: int = 1):
    """Split every ``(B, ...)`` leaf of ``batch`` into ``(grad_accum_steps, B // grad_accum_steps, ...)``.

    The batch is split over ``batch_shards`` devices along its leading axis (device ``d`` holds
    rows ``[d*B/D, (d+1)*B/D)``). Micro-batch ``m`` takes the ``m``-th block of every device's
    rows: ``(B,) -> (D, accum, B/(D*accum)) -> swap the first two axes -> (accum, B/accum)``. So
    every micro-batch is again split evenly over all devices, and each device reads only rows it
    already holds (no data moves between devices; cutting ``(B,)`` into contiguous blocks instead
    would put micro-batch 0 on the first devices only). The micro-batches partition the batch,
    so their mean loss is the batch's mean loss whatever the order.

    Raises:
      ValueError: ``B`` is not divisible by ``grad_accum_steps * batch_shards``.
    """
    rows = jax.tree.leaves(batch)[0].shape[0]
    if rows % (grad_accum_steps * batch_shards):
        raise ValueError(
            f"batch of {rows} rows is not divisible by grad_accum_steps={grad_accum_steps} x "
            f"{batch_shards} device(s)"
        )

    def split(x):
        x = x.reshape(batch_shards, grad_accum_steps, -1, *x.shape[1:])
        return jnp.swapaxes(x, 0, 1).reshape(grad_accum_steps, rows // grad_accum_steps, *x.shape[3:])

    return jax.tree.map(split, batch)


def make_eval_step(model, step: int, hooks=()):
    """``eval_step(state, batch, *frozen) -> {'loss', 'correct', 'count'}`` sums over real rows.

    ``batch['mask']`` (1 real, 0 padding) weights every example; ``step`` is passed to models that
    take one (the final step: e.g. a DEQ evaluates with its solver after pre-training); ``hooks``
    and ``frozen`` as in :func:`make_train_step`. The model runs with ``train=False`` on the
    state's ``batch_stats`` (BatchNorm's running averages), when it has them.
    """
    kwargs = {"step": jnp.asarray(step, jnp.int32)} if takes_step(model) else {}

    def eval_step(state: TrainState, batch, *frozen):
        variables = apply_variables(hooks, state.params, state, frozen)
        logits, _ = model.apply(variables, batch["image"], train=False, **kwargs)
        xent = optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"])
        correct = jnp.argmax(logits, -1) == batch["label"]
        mask = batch["mask"]
        return {"loss": jnp.sum(xent * mask), "correct": jnp.sum(correct * mask), "count": jnp.sum(mask)}

    return eval_step
