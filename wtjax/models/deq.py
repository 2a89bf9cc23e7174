"""DEQ baselines that share the weight-tied model's block and parameter tree.

``DEQResNetLike`` is :class:`~wtjax.models.resnet_like.ResNetLike` with the ``K``-fold reuse of
``f(z, x)`` (:class:`~wtjax.models.resnet_like.ResidualInjectionBlock`) replaced by the solution of
``z* = f(z*, x)``. The parameter tree is the same (``stem_conv``, ``stem_gn``, ``tied/block/...``,
``head``), so a tied ResNetLike checkpoint loads into the DEQ and back. ``DEQMLP`` does the same
for :class:`~wtjax.models.mlp.MLP` (``embed``, ``embed_ln``, ``tied/block``, ``head``).

MDEQ's schedule: the first ``deq_pretrain_steps`` training steps run the block ``depth`` times as
an ordinary dense weight-tied model (backprop through the ``depth`` reuses, the same function as
the dense :class:`~wtjax.core.tied.Tied` stack);
afterwards the solver takes over. The model decides from the ``step`` call argument:

* ``step=None`` (default): the solver (the phase after pretraining; evaluation of a trained DEQ);
* ``step`` a Python int: the phase is chosen while tracing;
* ``step`` a traced int array (``state.step`` inside a jitted train step): ``lax.cond`` picks the
  phase at run time, so the step function is compiled once.

The train and eval steps (:mod:`wtjax.job.steps`) pass ``step=`` to every model whose ``__call__``
declares it (the final step at evaluation).

Block parameters reach the solver explicitly: at init the tied stack is called once (creating
``tied/block``); at apply the module reads ``self.variables['params']['tied']['block']`` and
calls :func:`wtjax.implicit.fixed_point` with ``f(p, x, z) = block.apply({'params': p}, z, x)``,
so gradients flow to those parameters through the chosen backward mode.

``out['metrics']`` (scalars, for logging): ``deq_active`` (1 in the solver phase), forward
``deq_fwd_nstep``, ``deq_fwd_abs_res``/``deq_fwd_rel_res`` (batch mean), ``deq_fwd_abs_res_max``,
``deq_fwd_nonconverged`` (samples above tol), ``deq_fwd_diverged`` (samples whose protective
break fired, e.g. a NaN input row: that row stays NaN, the others are solved as if alone); when
``train``, ``grad='ift'`` and ``monitor_backward``: ``deq_bwd_nstep``, ``deq_bwd_abs_res``,
``deq_bwd_rel_res``, ``deq_bwd_nonconverged``, ``deq_bwd_diverged`` from a probe of the adjoint
solve (:meth:`DEQBase._backward_probe`: the same linear system with a random unit-norm cotangent
on ``monitor_samples`` samples); ``deq_jac_loss`` and ``deq_fp_loss``. The ``*_nonconverged``
and ``*_diverged`` metrics count samples: a training job can treat any of them > 0 as a failed
solve. A failed backward solve returns its lowest-residual iterate, never its start ``u = 0``.
``out['aux_loss']`` is ``jac_weight * jac_loss +
fp_weight * fp_loss`` (zero at evaluation and during pretraining): the train loop adds it to the
task loss. All metrics are zero in the pretraining phase (``deq_active = 0``).

Mixed precision (``dtype``, :mod:`wtjax.core.precision`): the stem, the head and every evaluation of
the block run in the compute dtype, while the solver works in float32: its state, iterates,
residuals and Anderson/Broyden linear algebra, and the adjoint solve. ``f`` casts ``z`` to the
compute dtype and the block's output back to float32. A bfloat16 block's residual has a floor
at its rounding error (bfloat16 rounds at ~4e-3 relative to ``||z||``); a tolerance below it is
not reached, and the solver then runs to ``max_iter`` and returns its lowest-residual iterate.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from wtjax.core import precision
from wtjax.core.conv import Conv
from wtjax.core.tied import Tied, checkpoint_policy
from wtjax.implicit import (
    GRAD_MODES,
    SolverConfig,
    adjoint_solve,
    fixed_point,
    fixed_point_residual_loss,
    jacobian_penalty,
)
from wtjax.models.mlp import MLP_SIZES, MLPBlock, resolve_width
from wtjax.models.resnet_like import ResidualInjectionBlock

METRIC_NAMES = (
    "deq_active",
    "deq_fwd_nstep",
    "deq_fwd_abs_res",
    "deq_fwd_rel_res",
    "deq_fwd_abs_res_max",
    "deq_fwd_nonconverged",
    "deq_fwd_diverged",
    "deq_bwd_nstep",
    "deq_bwd_abs_res",
    "deq_bwd_rel_res",
    "deq_bwd_nonconverged",
    "deq_bwd_diverged",
    "deq_jac_loss",
    "deq_fp_loss",
)


class DEQBase(nn.Module):
    """Solver machinery shared by the DEQ models (subclasses define the block, stem and head).

    Attributes:
      depth: reuses ``K`` of the weight-tied pretraining phase.
      deq_pretrain_steps: training steps run as the weight-tied model before the solver.
      f_solver, f_max_iter, f_tol, f_stop_mode: forward solver (torchdeq: anderson, 40, 1e-3, abs).
      b_solver, b_max_iter, b_tol, b_stop_mode: adjoint solver for ``grad='ift'`` and the backward
        monitor (torchdeq: 40 iterations, tol 1e-6).
      anderson_m, anderson_lam, anderson_beta: Anderson memory, ridge and mixing.
      anderson_lam_relative: scale the ridge by the residual scale (``False``: torchdeq's absolute
        ridge; see :class:`~wtjax.implicit.SolverConfig`).
      broyden_memory: Broyden rank (``None``: the solver's ``max_iter``).
      fp_tau: damping of the ``fixed_point`` solver.
      grad: ``ift``, ``phantom``, ``one_step`` or ``unrolled`` (:mod:`wtjax.implicit.fixed_point`).
      phantom_steps, phantom_tau: ``k`` and damping of the phantom gradient (defaults 5 and 0.5:
        our choice; torchdeq's default is 1 undamped step, i.e. ``grad='one_step'``).
      jac_weight: weight of the Jacobian penalty in ``aux_loss`` (0 disables it).
      jac_freq: probability of computing the penalty at a training step (torchdeq's
        ``jac_loss_freq``); the coin uses the ``dropout`` RNG.
      fp_weight: weight of the fixed-point residual (correction) loss (0 disables it).
      monitor_backward: measure the adjoint solve at training steps with ``grad='ift'``
        (``deq_bwd_*``, :meth:`_backward_probe`). Off by default (it costs a partial backward
        solve per step): turn it on to see backward-solve failures (``configs/cifar_deq.py``'s
        ``mdeq`` variant does).
      monitor_samples: samples the backward probe solves for (the first ones of the batch).
      remat_policy: remat policy of the pretraining stack (:class:`~wtjax.core.tied.Tied`).
      dtype: compute dtype of the block, stem and head, ``'float32'`` or ``'bfloat16'``
        (:mod:`wtjax.core.precision`); the solver stays float32 (module docstring).
    """

    depth: int = 8
    deq_pretrain_steps: int = 0
    f_solver: str = "anderson"
    f_max_iter: int = 40
    f_tol: float = 1e-3
    f_stop_mode: str = "abs"
    b_solver: str = "anderson"
    b_max_iter: int = 40
    b_tol: float = 1e-6
    b_stop_mode: str = "abs"
    anderson_m: int = 6
    anderson_lam: float = 1e-4
    anderson_beta: float = 1.0
    anderson_lam_relative: bool = True
    broyden_memory: int | None = None
    fp_tau: float = 1.0
    grad: str = "ift"
    phantom_steps: int = 5
    phantom_tau: float = 0.5
    jac_weight: float = 0.0
    jac_freq: float = 1.0
    fp_weight: float = 0.0
    monitor_backward: bool = False
    monitor_samples: int = 8
    remat_policy: str | None = None
    dtype: str = "float32"

    def _solver(self, prefix: str, max_iter: int | None = None) -> SolverConfig:
        name = getattr(self, f"{prefix}_solver")
        memory = {"anderson": self.anderson_m, "broyden": self.broyden_memory}.get(name)
        return SolverConfig(
            solver=name,
            max_iter=max_iter or getattr(self, f"{prefix}_max_iter"),
            tol=getattr(self, f"{prefix}_tol"),
            stop_mode=getattr(self, f"{prefix}_stop_mode"),
            tau=self.fp_tau,
            memory=memory,
            lam=self.anderson_lam,
            lam_relative=self.anderson_lam_relative,
            beta=self.anderson_beta,
        )

    def _block(self, **kw) -> nn.Module:
        """The tied block ``f(z, x)``, shared with the weight-tied model."""
        raise NotImplementedError

    def _f(self, p, x, z):
        """The DEQ map with explicit parameters: ``f(p, x, z) = block(z, x)``.

        The block runs in the compute dtype; its output comes back in ``z``'s dtype (the solver's).
        """
        z_in = precision.cast(z, precision.layer_dtype(self.dtype))
        # parent=None: a free-standing module (inside a compact method it would bind to self).
        return self._block(parent=None).apply({"params": p}, z_in, x).astype(z.dtype)

    @staticmethod
    def _z0(x):
        """The initial state: zeros in at least float32 (solver states are never half precision)."""
        return precision.upcast(jnp.zeros_like(x))

    def _tied_phase(self, p, x):
        """The weight-tied pretraining phase: ``z_K`` of ``z_{i+1} = f(p, x, z_i)``, plain backprop.

        The same computation as the dense tied stack (a test checks it against ResNetLike); a
        ``lax.scan`` of the pure map keeps this branch free of Linen state inside ``lax.cond``.
        """

        def body(z, _):
            return self._f(p, x, z), None

        policy = checkpoint_policy(self.remat_policy)
        if policy is not None:
            body = jax.checkpoint(body, policy=policy)
        z, _ = jax.lax.scan(body, self._z0(x), None, length=self.depth)
        zero = jnp.zeros((), jnp.float32)
        return z, {k: zero for k in METRIC_NAMES}, zero

    def _deq_phase(self, p, x, key, *, train: bool, max_iter: int | None):
        """The solver phase: ``z* = f(z*, x)`` plus health metrics and regularisers."""
        z, stats = fixed_point(
            self._f,
            p,
            x,
            self._z0(x),
            forward=self._solver("f", max_iter),
            backward=self._solver("b"),
            grad=self.grad,
            phantom_steps=self.phantom_steps,
            phantom_tau=self.phantom_tau,
        )
        f32 = lambda v: jnp.asarray(v, jnp.float32)  # noqa: E731
        zero = f32(0.0)
        metrics = {k: zero for k in METRIC_NAMES}
        metrics.update(
            deq_active=f32(1.0),
            deq_fwd_nstep=f32(stats.nstep),
            deq_fwd_abs_res=f32(jnp.mean(stats.abs_res)),
            deq_fwd_rel_res=f32(jnp.mean(stats.rel_res)),
            deq_fwd_abs_res_max=f32(jnp.max(stats.abs_res)),
            deq_fwd_nonconverged=f32(jnp.sum(~stats.converged)),
            deq_fwd_diverged=f32(jnp.sum(stats.diverged)),
        )
        aux = zero
        if train and self.monitor_backward and self.grad == "ift":
            metrics.update(self._backward_probe(p, x, z, key))
        if train and self.jac_weight > 0:
            jac = lambda: f32(jacobian_penalty(self._f, p, x, z, jax.random.fold_in(key, 2)))  # noqa: E731
            if self.jac_freq >= 1.0:
                jac_loss = jac()
            else:
                coin = jax.random.uniform(jax.random.fold_in(key, 3)) < self.jac_freq
                jac_loss = jax.lax.cond(coin, jac, lambda: zero)
            metrics["deq_jac_loss"] = jac_loss
            aux = aux + self.jac_weight * jac_loss
        if train and self.fp_weight > 0:
            fp_loss = f32(fixed_point_residual_loss(self._f, p, x, z))
            metrics["deq_fp_loss"] = fp_loss
            aux = aux + self.fp_weight * fp_loss
        return z, metrics, aux

    def _backward_probe(self, p, x, z, key) -> dict:
        """``deq_bwd_*``: the adjoint solve ``u = J^T u + g`` at ``z*`` for a random probe ``g``.

        The real cotangent exists only inside the backward pass, from which a custom JVP/VJP
        can report only through a cotangent or a host callback; the probe solves the same
        linear system ``(I - J)^T u = g`` with the same solver. It runs on the first
        ``monitor_samples`` samples (``f`` treats samples independently; every leaf of ``x``
        has the batch on axis 0), with a unit-norm ``g`` per sample, so its cost is a fraction
        of a backward solve and ``b_tol`` in ``abs`` mode reads as relative to the cotangent.
        """
        if self.monitor_samples < 1:
            raise ValueError(f"monitor_samples must be >= 1, got {self.monitor_samples}")
        n = min(self.monitor_samples, z.shape[0])
        sg = jax.lax.stop_gradient
        head = lambda a: sg(a)[:n]  # noqa: E731
        g = jax.random.normal(jax.random.fold_in(key, 1), (n,) + z.shape[1:], z.dtype)
        g = g / jnp.linalg.norm(g.reshape(n, -1), axis=1).reshape((n,) + (1,) * (z.ndim - 1))
        _, stats, _ = adjoint_solve(self._f, sg(p), jax.tree.map(head, x), head(z), g, self._solver("b"))
        f32 = lambda v: jnp.asarray(v, jnp.float32)  # noqa: E731
        return dict(
            deq_bwd_nstep=f32(stats.nstep),
            deq_bwd_abs_res=f32(jnp.mean(stats.abs_res)),
            deq_bwd_rel_res=f32(jnp.mean(stats.rel_res)),
            deq_bwd_nonconverged=f32(jnp.sum(~stats.converged)),
            deq_bwd_diverged=f32(jnp.sum(stats.diverged)),
        )

    def _init_state(self, x):
        """The state the block is initialised with, in the block's own structure (not flattened).

        Single-stream DEQs carry a state shaped like the injection ``x``; the multiscale DEQ
        overrides this (a tuple of branch states).
        """
        return jnp.zeros_like(x)

    def _block_params(self, x):
        """The block parameters ``tied/block``: created at init (through the tie, exactly as the
        weight-tied model creates them, so the parameter trees coincide), read afterwards."""
        if self.is_initializing():
            Tied(self._block(), depth=self.depth, mask_scope="tied", name="tied")(self._init_state(x), x)
        return self.variables["params"]["tied"]["block"]

    def _solve(self, x, *, train: bool, step, max_iter: int | None):
        """Create (at init) or read the block parameters and run the phase ``step`` selects.

        Returns ``(z, metrics, aux_loss)``.
        """
        if self.grad not in GRAD_MODES:
            raise ValueError(f"unknown grad mode {self.grad!r}; choose one of {GRAD_MODES}")
        p = self._block_params(x)
        needs_key = train and ((self.monitor_backward and self.grad == "ift") or self.jac_weight > 0)
        key = self.make_rng("dropout") if needs_key else jax.random.key(0)

        if self.is_initializing():
            # The parameters exist now; a solve (up to f_max_iter iterations, run op by op when
            # init is not jitted) would only cost time. `init_with_output` returns z_K instead.
            # Bad solver fields still fail here: building the configs checks them.
            self._solver("f"), self._solver("b")
            return self._tied_phase(p, x)
        deq = lambda p, x: self._deq_phase(p, x, key, train=train, max_iter=max_iter)  # noqa: E731
        if step is None or self.deq_pretrain_steps <= 0:
            return deq(p, x)
        if isinstance(step, int):
            return deq(p, x) if step >= self.deq_pretrain_steps else self._tied_phase(p, x)
        return jax.lax.cond(step >= self.deq_pretrain_steps, deq, self._tied_phase, p, x)


_CALL_DOC = """Classify ``images`` (NHWC).

        Args:
          images: ``(B, H, W, C)``.
          train: training mode (regularisers and the backward monitor run only then; they draw
            from the ``dropout`` RNG).
          step: the current training step (int or traced int), or ``None`` for the solver phase.
          max_iter: test-time override of the forward solver's iterations.
          return_intermediates: accepted for the shared contract; a DEQ has no per-reuse outputs
            (``out['block_outputs']`` is the fixed point with a leading axis of size 1).

        Returns:
          ``(logits, out)`` with ``pre_logits``, ``metrics`` (dict of scalars, module docstring)
          and ``aux_loss`` (scalar to add to the training loss).
        """


class DEQResNetLike(DEQBase):
    """DEQ over the ResNet-like block (:class:`~wtjax.models.resnet_like.ResNetLike`'s tree).

    Attributes:
      num_classes, width, groups, conv_impl: as :class:`~wtjax.models.resnet_like.ResNetLike`.
      (solver fields: :class:`DEQBase`.)
    """

    num_classes: int = 10
    width: int = 64
    groups: int = 4
    conv_impl: str = "auto"

    def _block(self, **kw):
        dtype = precision.layer_dtype(self.dtype)
        return ResidualInjectionBlock(self.width, self.groups, self.conv_impl, dtype, **kw)

    @nn.compact
    def __call__(self, images, *, train=False, step=None, max_iter=None, return_intermediates=False):
        dtype = precision.layer_dtype(self.dtype)
        x = Conv(self.width, impl=self.conv_impl, dtype=dtype, name="stem_conv")(
            precision.cast(images, dtype)
        )
        x = nn.relu(nn.GroupNorm(num_groups=self.groups, dtype=dtype, name="stem_gn")(x))
        z, metrics, aux = self._solve(x, train=train, step=step, max_iter=max_iter)
        pooled = jnp.mean(z, axis=(1, 2))
        logits = precision.upcast(nn.Dense(self.num_classes, dtype=dtype, name="head")(pooled))
        out = {"stem": x, "pre_logits": pooled, "metrics": metrics, "aux_loss": aux}
        if return_intermediates:
            out["block_outputs"] = z[None]
        return logits, out

    __call__.__doc__ = _CALL_DOC


class DEQMLP(DEQBase):
    """DEQ over the MLP block (:class:`~wtjax.models.mlp.MLP`'s parameter tree).

    Attributes:
      num_classes, size, width: as :class:`~wtjax.models.mlp.MLP`.
      (solver fields: :class:`DEQBase`.)
    """

    num_classes: int = 10
    size: str = "small"
    width: int | None = None

    def _block(self, **kw):
        width = resolve_width(self.size, self.width, MLP_SIZES, "MLP")
        return MLPBlock(width, precision.layer_dtype(self.dtype), **kw)

    @nn.compact
    def __call__(self, images, *, train=False, step=None, max_iter=None, return_intermediates=False):
        width = resolve_width(self.size, self.width, MLP_SIZES, "MLP")
        dtype = precision.layer_dtype(self.dtype)
        x = precision.cast(images.reshape(images.shape[0], -1), dtype)
        x = nn.Dense(width, dtype=dtype, name="embed")(x)
        x = nn.relu(nn.LayerNorm(dtype=dtype, name="embed_ln")(x))
        z, metrics, aux = self._solve(x, train=train, step=step, max_iter=max_iter)
        logits = precision.upcast(nn.Dense(self.num_classes, dtype=dtype, name="head")(z))
        out = {"embedding": x, "pre_logits": z, "metrics": metrics, "aux_loss": aux}
        if return_intermediates:
            out["block_outputs"] = z[None]
        return logits, out

    __call__.__doc__ = _CALL_DOC
