"""The optax optimizer and learning-rate schedule described by ``config.optim``.

Fields of ``config.optim`` (see :func:`wtjax.job.config.optim_config`):

* ``name``: ``adam`` | ``adamw`` | ``sgd``;
* ``learning_rate``: the peak rate; ``schedule``: ``cosine`` | ``multistep`` | ``constant``;
* ``warmup_epochs``: linear warm-up from 0 to the peak, then the schedule;
* ``boundaries_epochs`` and ``decay_factor`` (multistep): the rate is multiplied by
  ``decay_factor`` at each boundary;
* ``weight_decay``: for ``adam`` and ``sgd`` it is an **L2 penalty folded into the gradient**
  (``g + wd * w``, ``optax.add_decayed_weights`` placed *before* the update rule), which is what
  PyTorch's ``Adam(weight_decay=...)`` and ``SGD(weight_decay=...)`` do and what the paper's
  recipes (Adam, wd 2.5e-6; SGD, wd 1e-4) were run with. For ``adamw`` it is decoupled decay
  (``w -= lr * wd * w`` after the Adam step, Loshchilov & Hutter). Like PyTorch, every parameter
  is decayed (kernels, biases and normalisation scales alike);
* ``b1``, ``b2``, ``eps`` (adam/adamw), ``momentum``, ``nesterov`` (sgd);
* ``grad_clip_norm``: clip the global gradient norm first (``None``: off).
"""

from __future__ import annotations

import optax

OPTIMIZERS = ("adam", "adamw", "sgd")
SCHEDULES = ("cosine", "multistep", "constant")


def create_schedule(optim_config, total_steps: int, steps_per_epoch: int) -> optax.Schedule:
    """The learning rate as a function of the step.

    Args:
      optim_config: ``config.optim``.
      total_steps: length of the run (the cosine reaches 0 there).
      steps_per_epoch: converts the ``*_epochs`` fields to steps.

    Returns:
      ``schedule(step) -> learning rate``: linear warm-up over ``warmup_epochs``, then
      ``cosine``: ``lr * (1 + cos(pi * t / T)) / 2`` over the remaining steps; ``multistep``:
      ``lr * decay_factor ** (number of boundaries passed)``; ``constant``: ``lr``.
    """
    kind = optim_config.schedule
    if kind not in SCHEDULES:
        raise ValueError(f"unknown schedule {kind!r}; choose one of {SCHEDULES}")
    lr = float(optim_config.learning_rate)
    warmup = int(round(optim_config.warmup_epochs * steps_per_epoch))
    if warmup >= total_steps and warmup > 0:
        raise ValueError(f"warm-up ({warmup} steps) must be shorter than the run ({total_steps} steps)")
    rest = total_steps - warmup
    if kind == "cosine":
        main = optax.cosine_decay_schedule(lr, decay_steps=max(rest, 1))
    elif kind == "multistep":
        # Boundaries are counted from the start of the run, so shift them past the warm-up.
        bounds = [int(round(e * steps_per_epoch)) - warmup for e in optim_config.boundaries_epochs]
        main = optax.piecewise_constant_schedule(lr, {b: optim_config.decay_factor for b in bounds if b > 0})
    else:
        main = optax.constant_schedule(lr)
    if warmup == 0:
        return main
    return optax.join_schedules([optax.linear_schedule(0.0, lr, warmup), main], [warmup])


def create_optimizer(optim_config, total_steps: int, steps_per_epoch: int):
    """The gradient transformation of ``config.optim`` (module docstring).

    Returns:
      ``(tx, schedule)``: the optax transformation and its learning-rate schedule (for logging).
    """
    name = optim_config.name
    if name not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {name!r}; choose one of {OPTIMIZERS}")
    schedule = create_schedule(optim_config, total_steps, steps_per_epoch)
    wd = float(optim_config.weight_decay)
    chain = []
    if optim_config.grad_clip_norm is not None:
        chain.append(optax.clip_by_global_norm(float(optim_config.grad_clip_norm)))
    if name == "adamw":
        chain.append(
            optax.adamw(
                schedule, b1=optim_config.b1, b2=optim_config.b2, eps=optim_config.eps, weight_decay=wd
            )
        )
    else:
        if wd:
            # L2 regularisation in the gradient, as PyTorch's weight_decay (module docstring).
            chain.append(optax.add_decayed_weights(wd))
        if name == "adam":
            chain.append(optax.adam(schedule, b1=optim_config.b1, b2=optim_config.b2, eps=optim_config.eps))
        else:
            momentum = optim_config.momentum or None
            chain.append(optax.sgd(schedule, momentum=momentum, nesterov=bool(optim_config.nesterov)))
    return optax.chain(*chain), schedule
