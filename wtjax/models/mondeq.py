"""Monotone DEQ classifiers (Winston & Kolter 2020): fully connected and single convolution.

Both compute ``z* = relu(W z* + U x + b)`` with ``W = (1 - m) I - A^T A + B - B^T`` (or a reduced
parametrisation, see :mod:`wtjax.implicit.monotone`), solved by forward-backward or
Peaceman-Rachford splitting with the monDEQ implicit backward pass, then a linear classifier.

Parameter tree (the implicit layer is the ``mon`` subtree, what the pruning paper prunes)::

    mon/U/kernel, mon/U/bias, mon/A/kernel, mon/B/kernel, head/kernel, head/bias

``A``/``B`` are absent when the parametrisation drops them. FC: ``U`` is ``(d, n)``, ``A``, ``B``
``(n, n)`` and act as ``z -> A z`` (``W`` acts on column vectors; states are rows ``z @ W^T``).
Conv: ``U`` is a zero-padded ``3x3`` conv from the image channels to ``n``; ``A``, ``B`` are
``k x k`` HWIO kernels of **circular** convolutions on the ``H x W`` map (the monDEQ paper's
single-conv model), ``A^T`` their circular conv-transposes (exact adjoints, applied in the DFT
domain); the head average-pools the equilibrium to ``pool x pool`` and applies a Dense layer.
Differences from the monDEQ reference code: no weight normalisation of ``A, B, U``, no
batch/group norm of the input.

``out``: ``pre_logits`` (the pooled/flattened ``z*``) and ``metrics`` (scalars the train loop
logs): ``mon_fwd_iters`` (forward splitting iterations), ``mon_fwd_res`` (final max per-sample
relative change, NaN if a sample is NaN), ``mon_fwd_nonconverged`` (samples above tol or NaN when
the solve stopped), ``mon_fwd_diverged`` (samples with a non-finite state) and ``mon_fwd_alpha``
(the step size used: ``fb`` replaces an ``alpha`` beyond its convergence bound, see
:func:`wtjax.implicit.monotone.fb_step_size`). Runs under ``jax_enable_x64`` too (parameters
stay float32).

Mixed precision (``dtype``, :mod:`wtjax.core.precision`): only the input projection ``U`` and the head
run in the compute dtype. ``W`` (built from ``A``, ``B``), the splitting iterations, their FFTs
and the implicit backward stay float32: the solver's convergence test and the monotonicity
margin ``m`` need more than bfloat16's 8 bits of mantissa.
"""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from wtjax.core import precision
from wtjax.implicit import monotone as mon

_init_ab = nn.initializers.variance_scaling(1.0, "fan_in", "truncated_normal")


class _Weight(nn.Module):
    """A bare weight stored as ``<name>/kernel`` (so kernel predicates and pruning select it)."""

    shape: tuple[int, ...]

    @nn.compact
    def __call__(self):
        # float32 like every parameter of the library (an initializer's default dtype is float64
        # under jax_enable_x64, which would make W float64 and the solver's carry mixed).
        return self.param("kernel", _init_ab, self.shape, jnp.float32)


def _metrics(stats: mon.MonotoneStats) -> dict:
    return {
        "mon_fwd_iters": stats.iterations.astype(jnp.float32),
        "mon_fwd_res": stats.residual.astype(jnp.float32),
        "mon_fwd_nonconverged": stats.nonconverged.astype(jnp.float32),
        "mon_fwd_diverged": stats.diverged.astype(jnp.float32),
        "mon_fwd_alpha": stats.alpha.astype(jnp.float32),
    }


def _solver(self) -> mon.MonotoneConfig:
    return mon.MonotoneConfig(
        method=self.solver,
        alpha=self.alpha,
        max_iter=self.max_iter,
        tol=self.tol,
        backward_max_iter=self.max_iter,
        backward_tol=self.backward_tol,
    )


class _MonotoneFC(nn.Module):
    """The FC implicit layer: returns ``(z*, stats)`` for flattened inputs ``(batch, d)``.

    ``dtype``: compute dtype of ``U x + b`` (``None``: promotion); the solve is at least float32.
    """

    width: int
    m: float
    parametrization: str
    cfg: mon.MonotoneConfig
    dtype: jnp.dtype | None = None

    @nn.compact
    def __call__(self, x):
        c = precision.upcast(nn.Dense(self.width, dtype=self.dtype, name="U")(x))
        n = self.width
        p = self.parametrization
        A = _Weight((n, n), name="A")() if p in ("full", "no_b") else None
        B = _Weight((n, n), name="B")() if p in ("full", "no_a") else None
        W = mon.identity_W(n, self.m, c.dtype) if p == "none" else mon.dense_W(A, B, self.m, p)
        return mon.equilibrium(W, c, self.cfg)


class _MonotoneConv(nn.Module):
    """The single-conv implicit layer on ``(batch, H, W, C)`` images: ``(z*, stats)``.

    ``dtype``: compute dtype of the ``U`` convolution (``None``: promotion); the solve is at least
    float32.
    """

    channels: int
    kernel_size: int
    m: float
    parametrization: str
    cfg: mon.MonotoneConfig
    dtype: jnp.dtype | None = None

    @nn.compact
    def __call__(self, x):
        c = precision.upcast(nn.Conv(self.channels, (3, 3), padding="SAME", dtype=self.dtype, name="U")(x))
        _, h, w, n = c.shape
        k, p = self.kernel_size, self.parametrization
        shape = (k, k, n, n)
        A = _Weight(shape, name="A")() if p in ("full", "no_b") else None
        B = _Weight(shape, name="B")() if p in ("full", "no_a") else None
        if p == "none":
            W = jnp.broadcast_to(mon.identity_W(n, self.m, jnp.complex64), (h, w, n, n))
        else:
            W = mon.spectral_W(A, B, self.m, h, w, p)
        return mon.equilibrium(W, c, self.cfg)


class MonDEQFC(nn.Module):
    """Fully connected monDEQ classifier; ``__call__(images, train=False) -> (logits, out)``.

    Attributes:
      num_classes: classifier outputs.
      width: hidden size ``n`` (the paper uses 87 on MNIST).
      m: monotonicity margin (``I - W >= m I``).
      parametrization: ``full``, ``no_a``, ``no_b`` or ``none`` (the paper's reduced forms).
      solver: ``pr`` (Peaceman-Rachford) or ``fb`` (forward-backward).
      alpha: splitting step size.
      max_iter, tol: forward (and backward) iteration cap and forward tolerance.
      backward_tol: tolerance of the adjoint solve.
      dtype: compute dtype of ``U`` and the head, ``'float32'`` or ``'bfloat16'``
        (:mod:`wtjax.core.precision`); the equilibrium solve stays float32 (module docstring).
    """

    num_classes: int = 10
    width: int = 87
    m: float = 0.1
    parametrization: str = "full"
    solver: str = "pr"
    alpha: float = 1.0
    max_iter: int = 50
    tol: float = 1e-3
    backward_tol: float = 1e-4
    dtype: str = "float32"

    @nn.compact
    def __call__(self, images, *, train: bool = False):
        del train  # no dropout or normalisation statistics
        cfg = _solver(self)
        dtype = precision.layer_dtype(self.dtype)
        x = precision.cast(images.reshape(images.shape[0], -1), dtype)
        z, stats = _MonotoneFC(self.width, self.m, self.parametrization, cfg, dtype, name="mon")(x)
        logits = precision.upcast(nn.Dense(self.num_classes, dtype=dtype, name="head")(z))
        return logits, {"pre_logits": z, "metrics": _metrics(stats)}


class MonDEQConv(nn.Module):
    """Single-convolution monDEQ classifier; ``__call__(images, train=False) -> (logits, out)``.

    Attributes:
      num_classes: classifier outputs.
      channels: channels ``n`` of the equilibrium state (the paper: 54 on MNIST, 81 on CIFAR).
      kernel_size: size of the circular ``A``, ``B`` convolutions.
      pool: the equilibrium is average-pooled to ``pool x pool`` before the head (monDEQ: 4).
      m, parametrization, solver, alpha, max_iter, tol, backward_tol, dtype: as :class:`MonDEQFC`.
    """

    num_classes: int = 10
    channels: int = 32
    kernel_size: int = 3
    pool: int = 4
    m: float = 1.0
    parametrization: str = "full"
    solver: str = "pr"
    alpha: float = 1.0
    max_iter: int = 50
    tol: float = 1e-3
    backward_tol: float = 1e-4
    dtype: str = "float32"

    @nn.compact
    def __call__(self, images, *, train: bool = False):
        del train
        cfg = _solver(self)
        dtype = precision.layer_dtype(self.dtype)
        _, h, w, _ = images.shape
        if h % self.pool or w % self.pool:
            raise ValueError(f"image {h}x{w} is not divisible into {self.pool}x{self.pool} pooling cells")
        z, stats = _MonotoneConv(
            self.channels, self.kernel_size, self.m, self.parametrization, cfg, dtype, name="mon"
        )(precision.cast(images, dtype))
        pooled = nn.avg_pool(z, (h // self.pool, w // self.pool), strides=(h // self.pool, w // self.pool))
        feats = pooled.reshape(pooled.shape[0], -1)
        logits = precision.upcast(nn.Dense(self.num_classes, dtype=dtype, name="head")(feats))
        return logits, {"pre_logits": feats, "metrics": _metrics(stats)}


def matrices(params) -> dict:
    """The implicit layer's weights by the paper's names: ``{'U': ..., 'A': ..., 'B': ...}``."""
    layer = params["mon"]
    out = {"U": layer["U"]["kernel"]}
    for name in ("A", "B"):
        if name in layer:
            out[name] = layer[name]["kernel"]
    return out


__all__ = ["MonDEQConv", "MonDEQFC", "matrices"]
