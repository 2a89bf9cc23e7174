"""The pure training and evaluation step functions of the training job (jitted by the caller).

Model contract: ``model.apply({'params': p}, images, train=..., rngs=...)`` returns
``(logits, out)``. Honoured keys of ``out``: ``aux_loss`` (a scalar added to the loss) and
``metrics`` (a dict of scalars, reported as ``train/model/<key>``). A model whose ``__call__``
declares a ``step`` keyword receives the current step.

The loss is the mean softmax cross-entropy over the (global) batch, plus ``aux_loss``.
"""

from __future__ import annotations

import inspect

import jax
import jax.numpy as jnp
import optax

from wtjax import metrics, pruning


def takes_step(model) -> bool:
    """Whether the model's ``__call__`` declares a ``step`` keyword."""
    return "step" in inspect.signature(type(model).__call__).parameters


def make_init_state(model, tx, image_shape, params_key, masks=None, params=None):
    """``init_state() -> {'step': 0, 'params', 'opt_state'}`` (parameters from ``params_key``).

    ``masks`` (pruning at initialisation, :func:`wtjax.pruning.init_masks`) are added to the
    state as ``state['masks']`` so they are checkpointed and sharded with it.
    """
    extra = {"step": 0} if takes_step(model) else {}

    given = params

    def init_state():
        images = jnp.zeros((1, *image_shape), jnp.float32)
        rngs = {"params": params_key, "dropout": params_key}
        if given is not None:  # e.g. the trainable LoRA tree of a fine-tuning run
            params = given
        else:
            params = model.init(rngs, images, train=False, **extra)["params"]
        state = {"step": jnp.asarray(0, jnp.int32), "params": params, "opt_state": tx.init(params)}
        if masks is not None:
            state["masks"] = masks
        return state

    return init_state


def make_train_step(model, tx, schedule, dropout_key, view=None):
    """``train_step(state, batch) -> (new_state, (step_metrics, finite))``.

    The dropout key of step ``s`` is ``fold_in(dropout_key, s)``, so a step depends only on the
    state and the batch (resumed runs repeat uninterrupted ones). ``finite`` is False when the
    loss or the gradient norm is NaN/inf; the caller decides what to do (the state is updated
    regardless and must not be saved).

    ``view(*frozen, params)``, if given, maps the trained params to the model's: LoRA passes
    the frozen pretrained weights as extra step arguments ``train_step(state, batch, *frozen)``
    (not closed over: jit would embed them in the program as constants).
    """
    with_step = takes_step(model)

    def train_step(state, batch, *frozen):
        step = state["step"]

        def loss_fn(params):
            kwargs = {"step": step} if with_step else {}
            rngs = {"dropout": jax.random.fold_in(dropout_key, step)}
            full = view(*frozen, params) if view is not None else params
            variables = pruning.model_variables(full, state.get("masks"))  # {'params': params} unpruned
            logits, out = model.apply(variables, batch["image"], train=True, rngs=rngs, **kwargs)
            xent = optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"]).mean()
            aux = out.get("aux_loss")  # None (an empty pytree) when the model has no auxiliary loss
            loss = xent if aux is None else xent + aux
            return loss, (logits, xent, aux, out.get("metrics", {}))

        grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
        (loss, (logits, xent, aux, model_metrics)), grads = grad_fn(state["params"])
        updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        grad_norm = optax.tree.norm(grads)
        step_metrics = {
            metrics.TRAIN_LOSS: loss,
            metrics.TRAIN_XENT: xent,
            metrics.TRAIN_ACCURACY: jnp.mean(jnp.argmax(logits, -1) == batch["label"]),
            metrics.GRAD_NORM: grad_norm,
            metrics.LEARNING_RATE: schedule(step),
            **{metrics.MODEL_PREFIX + k: jnp.mean(v) for k, v in model_metrics.items()},
        }
        if aux is not None:
            step_metrics[metrics.TRAIN_AUX_LOSS] = aux
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        new_state = {**state, "step": step + 1, "params": params, "opt_state": opt_state}
        return new_state, (step_metrics, finite)

    return train_step


def make_eval_step(model, step: int, view=None):
    """``eval_step(params, batch, masks=None) -> {'loss', 'correct', 'count'}`` sums over real rows.

    ``batch['mask']`` (1 real, 0 padding) weights every example; ``step`` is passed to models that
    take one (the final step: e.g. a DEQ evaluates with its solver after pre-training).
    """
    kwargs = {"step": jnp.asarray(step, jnp.int32)} if takes_step(model) else {}

    def eval_step(params, batch, masks=None, *frozen):
        full = view(*frozen, params) if view is not None else params
        logits, _ = model.apply(pruning.model_variables(full, masks), batch["image"], train=False, **kwargs)
        xent = optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"])
        correct = jnp.argmax(logits, -1) == batch["label"]
        mask = batch["mask"]
        return {"loss": jnp.sum(xent * mask), "correct": jnp.sum(correct * mask), "count": jnp.sum(mask)}

    return eval_step
