r"""Monotone operator equilibrium networks (monDEQ, Winston & Kolter 2020) in pure JAX.

The layer is ``z* = relu(W z* + c)`` with ``c = U x + b`` and the **monotone parametrisation**

.. math::  W = (1 - m) I - A^T A + B - B^T,  \qquad  I - W = m I + A^T A + (B^T - B) \succeq m I,

(the skew part ``B^T - B`` has a zero symmetric part), so the equilibrium exists and is unique
for any ``A, B``: it is the zero of the strongly monotone inclusion
``0 \in (I - W) z - c + N_{\ge 0}(z)`` whose resolvent of the normal cone is ``relu``.
Reduced parametrisations (Pham et al., "Pruning deep equilibrium models"): ``no_a`` drops
``A^T A``, ``no_b`` drops ``B - B^T``, ``none`` keeps only ``(1 - m) I``.

Linear operators are held as matrices in one of two forms (chosen by ``mat.ndim``):

* **dense** ``(n, n)`` (fully connected layer), acting on ``z`` of shape ``(batch, n)`` by
  ``z @ W^T``;
* **spectral** ``(H, W, n, n)`` complex (single convolution): ``A`` and ``B`` are 2-D
  convolutions with *circular* padding, which the 2-D DFT block-diagonalises, so ``W`` is one
  ``n x n`` matrix per spatial frequency, ``A^T`` is the exact adjoint (the conjugate transpose
  per frequency, i.e. the circular conv-transpose), and ``(I + alpha (I - W))^{-1}`` is a batch
  of ``H*W`` small inverses. This is the monDEQ paper's construction for its single-conv model;
  states have shape ``(batch, H, W, n)``.

Solvers (``z_{k+1}`` from ``z_k``; ``alpha`` the step size):

* forward-backward (``fb``): ``z <- relu(z - alpha ((I - W) z - c))``; converges for
  ``alpha < 2 m / ||I - W||_2^2``. Both quantities are computed from ``W`` at each solve, and a
  larger ``alpha`` is replaced by ``m / ||I - W||_2^2`` (:func:`fb_step_size`), since ``W``
  changes during training and a fixed ``alpha`` can leave the safe range mid-run.
* Peaceman-Rachford (``pr``): ``u_{1/2} = 2 z - u``, ``z_{1/2} = (I + alpha (I - W))^{-1}
  (u_{1/2} + alpha c)``, ``u = 2 z_{1/2} - u_{1/2}``, ``z = relu(u)``; converges for any
  ``alpha > 0``.

They stop when every sample's relative change ``||z_{k+1} - z_k|| / ||z_{k+1}||`` is at most
``tol`` or non-finite, or after ``max_iter`` iterations; samples above ``tol`` or NaN are counted
as not converged (``MonotoneStats.nonconverged``), non-finite states as ``diverged``.

Backward pass (the monDEQ backward, :func:`equilibrium` via ``jax.custom_vjp``): with
``D = diag(relu'(W z* + c))`` and loss cotangent ``g``, the cotangent of the pre-activation is
``w = D (W^T w + g)`` -- an equilibrium of the same form with ``W^T`` (same symmetric part, so
still monotone) and the linear map ``D`` in place of ``relu`` (``D`` is the proximal operator of
``f_j(x) = (1/D_jj - 1) x^2 / 2``; for ``D_jj in {0, 1}`` it is the same for every ``alpha``).
It is solved by the same splitting; then ``dL/dc = w`` and ``dL/dW`` is ``w``'s vector-Jacobian
product through ``W z*`` (any function of ``A, B, U`` upstream is handled by autodiff).
A custom VJP supports first-order reverse mode only (``jax.grad``); ``jax.jvp``/``jacfwd`` and
``grad(grad(...))`` of a monDEQ are not supported.

This module imports only jax and numpy.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

METHODS = ("fb", "pr")
PARAMETRIZATIONS = ("full", "no_a", "no_b", "none")
_EPS = 1e-8


@dataclasses.dataclass(frozen=True)
class MonotoneConfig:
    """How to solve a monDEQ equilibrium (hashable: static under ``jit``).

    Attributes:
      method: ``fb`` (forward-backward) or ``pr`` (Peaceman-Rachford).
      alpha: splitting step size (``pr``: any ``> 0``; ``fb`` needs ``alpha < 2m/||I-W||^2`` and
        falls back to ``m/||I-W||^2`` above it, see :func:`fb_step_size`).
      max_iter: iteration cap of the forward solve.
      tol: forward stopping tolerance on the max per-sample relative change.
      backward_max_iter, backward_tol: the same for the adjoint solve.
    """

    method: str = "pr"
    alpha: float = 1.0
    max_iter: int = 50
    tol: float = 1e-3
    backward_max_iter: int = 50
    backward_tol: float = 1e-4

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"unknown monotone splitting {self.method!r}; choose one of {METHODS}")
        if self.alpha <= 0:
            raise ValueError(f"alpha must be > 0, got {self.alpha}")
        if self.max_iter < 1 or self.backward_max_iter < 1:
            raise ValueError("max_iter and backward_max_iter must be >= 1")


class MonotoneStats(NamedTuple):
    """Solver statistics of a batch.

    Attributes:
      iterations: iterations run.
      residual: the final max per-sample relative change (NaN if a sample is NaN).
      nonconverged: samples whose final relative change is above ``tol`` or NaN.
      diverged: samples whose state is non-finite.
      alpha: the step size used (``fb``: see :func:`fb_step_size`).
    """

    iterations: jax.Array
    residual: jax.Array
    nonconverged: jax.Array
    diverged: jax.Array
    alpha: jax.Array


# ---------------------------------------------------------------------------------------------- W


def _check_parametrization(parametrization: str) -> None:
    if parametrization not in PARAMETRIZATIONS:
        raise ValueError(f"unknown parametrization {parametrization!r}; choose one of {PARAMETRIZATIONS}")


def dense_W(A, B, m: float, parametrization: str = "full") -> jax.Array:
    """``W = (1 - m) I - A^T A + B - B^T`` (terms dropped by the reduced parametrisations).

    Args:
      A, B: ``(n, n)`` matrices (``None`` allowed for a term the parametrisation drops).
      m: the monotonicity margin, ``I - W >= m I``.
      parametrization: ``full``, ``no_a``, ``no_b`` or ``none``.
    """
    _check_parametrization(parametrization)
    ref = A if A is not None else B
    if ref is None:
        raise ValueError("dense_W needs A or B to know the size; use identity_W for parametrization 'none'")
    W = (1.0 - m) * jnp.eye(ref.shape[0], dtype=ref.dtype)
    if parametrization in ("full", "no_b"):
        W = W - A.T @ A
    if parametrization in ("full", "no_a"):
        W = W + B - B.T
    return W


def conv_spectrum(kernel: jax.Array, height: int, width: int) -> jax.Array:
    """The DFT symbol of a circular convolution: ``(H, W, out, in)`` complex.

    The convolution is Flax's cross-correlation with a centred ``HWIO`` kernel and circular
    padding, ``(K z)[p, o] = sum_{s, i} K[c + s, i, o] z[(p + s) mod N, i]``; in the DFT basis it
    is ``hat K(f) = sum_s K_s^T exp(+2 pi i f.s / N)``, computed as the FFT of the kernel placed
    at offsets ``-s (mod N)``.
    """
    kh, kw, cin, cout = kernel.shape
    if kh > height or kw > width:
        raise ValueError(f"kernel {kh}x{kw} is larger than the {height}x{width} feature map")
    placed = jnp.zeros((height, width, cin, cout), kernel.dtype).at[:kh, :kw].set(kernel)
    placed = jnp.roll(placed, (-(kh // 2), -(kw // 2)), axis=(0, 1))  # placed[s mod N] = K_s
    flipped = jnp.roll(jnp.flip(placed, (0, 1)), (1, 1), axis=(0, 1))  # G[q] = K_{-q}
    return jnp.swapaxes(jnp.fft.fft2(flipped, axes=(0, 1)), -1, -2)


def spectral_W(A, B, m: float, height: int, width: int, parametrization: str = "full") -> jax.Array:
    """``W`` of the single-convolution monDEQ, per frequency: ``(H, W, n, n)`` complex.

    ``A``, ``B``: ``(kh, kw, n, n)`` HWIO kernels of circular convolutions; ``A^T`` is the adjoint
    (circular conv-transpose), the conjugate transpose of its symbol.
    """
    _check_parametrization(parametrization)
    ref = A if A is not None else B
    n = ref.shape[-1]
    eye = jnp.eye(n, dtype=jnp.complex64 if ref.dtype == jnp.float32 else jnp.complex128)
    W = jnp.broadcast_to((1.0 - m) * eye, (height, width, n, n))
    if parametrization in ("full", "no_b"):
        a = conv_spectrum(A, height, width)
        W = W - jnp.conj(jnp.swapaxes(a, -1, -2)) @ a
    if parametrization in ("full", "no_a"):
        b = conv_spectrum(B, height, width)
        W = W + b - jnp.conj(jnp.swapaxes(b, -1, -2))
    return W


def identity_W(n: int, m: float, dtype=jnp.float32) -> jax.Array:
    """``W = (1 - m) I`` (parametrisation ``none``), dense."""
    return (1.0 - m) * jnp.eye(n, dtype=dtype)


# ------------------------------------------------------------------------------- linear algebra


def matvec(mat: jax.Array, z: jax.Array, transpose: bool = False) -> jax.Array:
    """``W z`` (or ``W^T z``) for a dense ``(n, n)`` or spectral ``(H, W, n, n)`` operator."""
    if mat.ndim == 2:
        return z @ mat if transpose else z @ mat.T
    if mat.ndim != 4 or z.ndim != 4:
        raise ValueError(f"spectral operators act on (batch, H, W, n) states; got {mat.shape}, {z.shape}")
    if transpose:
        mat = jnp.conj(jnp.swapaxes(mat, -1, -2))
    zf = jnp.fft.fft2(z, axes=(1, 2))
    out = jnp.einsum("hwoi,bhwi->bhwo", mat, zf)
    return jnp.fft.ifft2(out, axes=(1, 2)).real.astype(z.dtype)


def resolvent(mat: jax.Array, alpha: float) -> jax.Array:
    """``(I + alpha (I - W))^{-1}`` in the operator's form (dense or per frequency)."""
    n = mat.shape[-1]
    eye = jnp.eye(n, dtype=mat.dtype)
    return jnp.linalg.inv(eye + alpha * (eye - mat))


def _sample_norm(x):
    return jnp.sqrt(jnp.sum(x.reshape(x.shape[0], -1) ** 2, axis=1))


def fb_step_size(mat: jax.Array, alpha: float) -> jax.Array:
    """The forward-backward step: ``alpha`` where it converges, else ``m / L^2``.

    Forward-backward splitting converges for ``alpha < 2 m / L^2``, with ``m`` the monotonicity
    margin (smallest eigenvalue of the symmetric part of ``I - W``) and ``L = ||I - W||_2``; both
    are read off ``W`` (per frequency for a spectral operator: the min margin and the max norm).
    Beyond the bound the iterates blow up, so the step falls back to ``m / L^2``, the step that
    minimises the bound's contraction factor. ``W`` changes during training, hence a check at
    run time rather than a config error. Not differentiated (the equilibrium does not depend on it).
    """
    mat = jax.lax.stop_gradient(mat)
    n = mat.shape[-1]
    s = jnp.eye(n, dtype=mat.dtype) - mat
    s_h = jnp.conj(jnp.swapaxes(s, -1, -2))
    margin = jnp.min(jnp.linalg.eigvalsh((s + s_h) / 2))
    norm2 = jnp.max(jnp.linalg.eigvalsh(s_h @ s))
    safe = margin / norm2
    # margin <= 0 (only from rounding: the parametrisation guarantees >= m) gives no safe step.
    return jnp.where((alpha < 2 * safe) | (margin <= 0), alpha, safe).astype(jnp.real(s).dtype)


def _splitting_step(mat, c, method, alpha, transpose, prox):
    """One iteration ``(z, u) -> (z, u)`` of the splitting (``u`` is used by ``pr`` only)."""
    if method == "fb":

        def step(carry):
            z, _ = carry
            z_new = prox((1.0 - alpha) * z + alpha * (matvec(mat, z, transpose) + c))
            return z_new, z_new

        return step
    R = resolvent(mat, alpha)

    def step(carry):
        z, u = carry
        u_half = 2.0 * z - u
        z_half = matvec(R, u_half + alpha * c, transpose)
        u_new = 2.0 * z_half - u_half
        return prox(u_new), u_new

    return step


def splitting_solve(mat, c, cfg: MonotoneConfig, *, transpose=False, prox_mask=None, backward=False):
    """Solve ``z = prox(W z + c)`` by the configured operator splitting.

    Per sample: a sample is finished when its relative change is at most ``tol`` or non-finite
    (a NaN sample stops nobody and changes no other sample); the loop stops when every sample is
    finished or after the iteration cap. ``fb`` uses :func:`fb_step_size`.

    Args:
      mat: ``W`` (dense or spectral, see module docstring).
      c: the constant term (injection), shaped like the state; batch axis 0.
      cfg: solver settings.
      transpose: use ``W^T`` (the adjoint solve).
      prox_mask: ``None`` for ``prox = relu``; else the 0/1 array ``D`` and ``prox(y) = D * y``.
      backward: use the backward iteration cap and tolerance.

    Returns:
      ``(z, MonotoneStats)``; ``z`` has the dtype of ``c`` promoted with ``W``'s real dtype.
    """
    max_iter = cfg.backward_max_iter if backward else cfg.max_iter
    tol = cfg.backward_tol if backward else cfg.tol
    # One state dtype for the loop carry (float32 weights and float64 inputs under x64 mix).
    c = c.astype(jnp.promote_types(c.dtype, jnp.zeros((), mat.dtype).real.dtype))
    alpha = fb_step_size(mat, cfg.alpha) if cfg.method == "fb" else jnp.asarray(cfg.alpha, c.dtype)

    def prox(y):
        return jax.nn.relu(y) if prox_mask is None else prox_mask * y

    step = _splitting_step(mat, c, cfg.method, alpha, transpose, prox)

    def cond(state):
        k, _, diff = state
        finished = (diff <= tol) | jnp.isnan(diff)
        return (k < max_iter) & ~jnp.all(finished)

    def body(state):
        k, carry, _ = state
        new = step(carry)
        diff = _sample_norm(new[0] - carry[0]) / (_sample_norm(new[0]) + _EPS)
        return k + 1, new, diff.astype(c.dtype)

    z0 = jnp.zeros_like(c)
    init = (jnp.asarray(0, jnp.int32), (z0, z0), jnp.full((c.shape[0],), jnp.inf, c.dtype))
    k, (z, _), diff = jax.lax.while_loop(cond, body, init)
    finite = jnp.all(jnp.isfinite(z.reshape(z.shape[0], -1)), axis=1) & ~jnp.isnan(diff)
    stats = MonotoneStats(
        iterations=k,
        residual=jnp.max(diff),
        nonconverged=jnp.sum(~(diff <= tol)),
        diverged=jnp.sum(~finite),
        alpha=alpha,
    )
    return z, stats


# -------------------------------------------------------------------- differentiable equilibrium


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def equilibrium(mat, c, cfg: MonotoneConfig):
    """``z* = relu(W z* + c)`` with the monDEQ implicit backward pass.

    Args:
      mat: ``W`` from :func:`dense_W` / :func:`spectral_W` (differentiable: build it from the
        parameters outside this function and autodiff carries the gradient to ``A, B``).
      c: ``U x + b``, shaped like the state (differentiable).
      cfg: :class:`MonotoneConfig` (static).

    Returns:
      ``(z*, MonotoneStats)`` of the forward solve (the stats carry no gradient).
    """
    return splitting_solve(mat, c, cfg)


def _equilibrium_fwd(mat, c, cfg):
    z, stats = splitting_solve(mat, c, cfg)
    return (z, stats), (mat, c, z)


def _equilibrium_bwd(cfg, residuals, cotangents):
    mat, c, z = residuals
    g, _ = cotangents
    pre, vjp = jax.vjp(lambda mat, c: matvec(mat, z) + c, mat, c)
    d = (pre > 0).astype(z.dtype)  # relu' at the pre-activation
    # w = D (W^T w + g): the cotangent of the pre-activation, by the same splitting.
    w, _ = splitting_solve(mat, d * g, cfg, transpose=True, prox_mask=d, backward=True)
    return vjp(w)


equilibrium.defvjp(_equilibrium_fwd, _equilibrium_bwd)


def adjoint_stats(mat, c, z, g, cfg: MonotoneConfig) -> MonotoneStats:
    """Iterations and residual of the backward solve for cotangent ``g`` (for monitoring)."""
    pre = matvec(mat, z) + c
    d = (pre > 0).astype(z.dtype)
    return splitting_solve(mat, d * g, cfg, transpose=True, prox_mask=d, backward=True)[1]
