"""Fixed-point solvers for ``z = f(z)`` on batched states (batch axis 0), pure JAX.

Three solvers share one driver (:func:`solve`):

* ``fixed_point``: damped iteration ``z_{k+1} = tau f(z_k) + (1 - tau) z_k``.
* ``anderson``: Anderson acceleration with memory ``m``, ridge ``lam`` and mixing ``beta``. With
  ``G_i = f(x_i) - x_i`` over the last ``n <= m`` iterates it solves, per sample,
  ``min_alpha ||sum_i alpha_i G_i||^2 + lam ||alpha||^2  s.t.  sum_i alpha_i = 1`` (``lam`` scaled by
  ``max_i ||G_i||^2`` unless ``lam_relative=False``) through the
  bordered system ``[[0, 1^T], [1, G G^T + lam I]] [nu; alpha] = [1; 0]`` and sets
  ``x_new = beta sum_i alpha_i f(x_i) + (1 - beta) sum_i alpha_i x_i``.
* ``broyden``: limited-memory "good" Broyden on ``g(z) = f(z) - z``. The inverse Jacobian of ``g``
  is approximated by ``H = -I + U V^T`` (``U, V`` hold at most ``memory`` rank-one terms, a
  circular buffer); the step is ``dz = -H g(z)`` and after it the update
  ``H += (dz - H dg) (dz^T H) / (dz^T H dg)`` keeps ``H dg = dz`` (no line search).

Every solver evaluates ``f`` once per iteration. Residuals are per sample: ``abs = ||f(z) - z||``
and ``rel = abs / (||f(z)|| + eps)`` over the non-batch axes. Everything is decided **per
sample**: a sample is finished when its best residual (in ``stop_mode``) is at most ``tol``, or
when its protective break fires (a non-finite residual, or one beyond ``protect_thres`` times its
initial value: flagged ``diverged``, its best iterate frozen); the solve stops when every sample
is finished or after ``max_iter`` evaluations of ``f``. So one NaN sample neither stops nor
changes the others. The returned iterate is, per sample, the one with the lowest residual seen
(NaN iterates never win; the initial point counts unless ``count_initial=False``); a sample with
no finite residual at all is returned as NaN, never as a finite stand-in.

Defaults follow locuslab/torchdeq: 40 iterations, forward tol 1e-3 (its backward default, 1e-6, is
:data:`BACKWARD_DEFAULT`), ``stop_mode='abs'``, Anderson ``m=6, lam=1e-4, beta=1``, fixed-point
damping ``tau=1``, Broyden memory = ``max_iter``. Two choices are this library's: the Anderson
ridge is relative to the residual scale by default (``lam_relative``; torchdeq's is absolute), and
a protective break at 1e6 x the initial residual (``protect_thres``; torchdeq has none, older
locuslab/deq used 1e6 in ``abs`` mode).
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

SOLVERS = ("fixed_point", "anderson", "broyden")
STOP_MODES = ("abs", "rel")
_EPS = 1e-8


@dataclasses.dataclass(frozen=True)
class SolverConfig:
    """How to solve one fixed point (hashable: it is a static argument under ``jit``).

    Attributes:
      solver: ``fixed_point``, ``anderson`` or ``broyden``.
      max_iter: maximum evaluations of ``f`` (the initial point's evaluation included).
      tol: stop when ``max_batch residual <= tol``.
      stop_mode: ``abs`` (``||f(z) - z||``) or ``rel`` (``abs / ||f(z)||``).
      tau: damping of the fixed-point iteration (1 = undamped).
      memory: Anderson history ``m`` (default 6) or Broyden rank (default ``max_iter``).
      lam: Anderson ridge on ``G G^T``.
      lam_relative: scale the ridge by the largest ``||G_i||^2`` of the sample (default). torchdeq
        adds ``lam`` as is (``False``), which makes Anderson degrade to averaging once the residuals
        are below ``sqrt(lam)`` (tight backward tolerances, small loss gradients); the relative
        ridge is scale-invariant.
      beta: Anderson mixing (1 = use ``f`` values only).
      protect_thres: a sample whose residual grows beyond this factor of its initial value is
        diverged (its best iterate is frozen and it no longer holds the loop); ``None``: only
        non-finite residuals count. The default 1e6 (locuslab/deq's abs-mode value; torchdeq
        has no such break) lets Broyden's transient growth pass, which exceeds 1e3 on solvable
        problems, and still stops a geometric divergence within 40 iterations (1.5^34 > 1e6).
    """

    solver: str = "anderson"
    max_iter: int = 40
    tol: float = 1e-3
    stop_mode: str = "abs"
    tau: float = 1.0
    memory: int | None = None
    lam: float = 1e-4
    lam_relative: bool = True
    beta: float = 1.0
    protect_thres: float | None = 1e6

    def __post_init__(self):
        if self.solver not in SOLVERS:
            raise ValueError(f"unknown solver {self.solver!r}; choose one of {SOLVERS}")
        if self.stop_mode not in STOP_MODES:
            raise ValueError(f"unknown stop_mode {self.stop_mode!r}; choose one of {STOP_MODES}")
        if self.max_iter < 1:
            raise ValueError(f"max_iter must be >= 1, got {self.max_iter}")
        if self.memory is not None and self.memory < 1:
            raise ValueError(f"memory must be >= 1, got {self.memory}")
        if not 0.0 < self.tau <= 1.0:
            raise ValueError(f"tau must be in (0, 1], got {self.tau}")
        if self.tol < 0:
            raise ValueError(f"tol must be >= 0, got {self.tol}")
        if self.protect_thres is not None and not self.protect_thres > 1:
            raise ValueError(f"protect_thres must be > 1 or None, got {self.protect_thres}")

    @property
    def history(self) -> int:
        if self.memory is not None:
            return self.memory
        return 6 if self.solver == "anderson" else self.max_iter


FORWARD_DEFAULT = SolverConfig()
BACKWARD_DEFAULT = SolverConfig(tol=1e-6)


class SolverStats(NamedTuple):
    """Solver health for one solve of a batch of B samples.

    Attributes:
      nstep: evaluations of ``f`` performed (int32 scalar).
      abs_res: ``(B,)`` absolute residual of the returned iterate.
      rel_res: ``(B,)`` relative residual of the returned iterate.
      abs_trace: ``(max_iter, B)`` absolute residual of each iterate; NaN after ``nstep``.
      rel_trace: ``(max_iter, B)`` relative residual of each iterate; NaN after ``nstep``.
      converged: ``(B,)`` whether the returned iterate meets ``tol`` in ``stop_mode``.
      diverged: ``(B,)`` the sample's protective break fired (non-finite residual, or growth
        beyond ``protect_thres``) and it has not converged.
    """

    nstep: jax.Array
    abs_res: jax.Array
    rel_res: jax.Array
    abs_trace: jax.Array
    rel_trace: jax.Array
    converged: jax.Array
    diverged: jax.Array


def _residuals(z, fz):
    abs_res = jnp.linalg.norm(fz - z, axis=-1)
    return abs_res, abs_res / (jnp.linalg.norm(fz, axis=-1) + _EPS)


# Each solver is (init, step): init(z0, f) -> (state, z, f(z)); step(state, f, cfg) -> same.
# ``z`` is the iterate whose residual is measured (and which may be returned).


def _fp_init(z0, f, cfg):
    fz = f(z0)
    return (z0, fz), z0, fz


def _fp_step(state, f, cfg):
    z, fz = state
    z = cfg.tau * fz + (1.0 - cfg.tau) * z
    fz = f(z)
    return (z, fz), z, fz


def _aa_init(z0, f, cfg):
    b, d = z0.shape
    m = cfg.history
    fz = f(z0)
    xs = jnp.zeros((b, m, d), z0.dtype).at[:, 0].set(z0)
    fs = jnp.zeros((b, m, d), z0.dtype).at[:, 0].set(fz)
    return (xs, fs, jnp.asarray(1, jnp.int32)), z0, fz


def _aa_step(state, f, cfg):
    xs, fs, count = state
    b, m, _ = xs.shape
    valid = jnp.arange(m) < jnp.minimum(count, m)  # slots filled so far
    g = fs - xs
    gg = jnp.einsum("bid,bjd->bij", g, g)
    both = valid[:, None] & valid[None, :]
    # Unused slots get an identity row/column and a zero in the constraint row: their alpha is 0.
    gg = jnp.where(both, gg, 0.0)
    lam = cfg.lam
    if cfg.lam_relative:
        scale = jnp.max(jnp.diagonal(gg, axis1=1, axis2=2), axis=1)
        lam = lam * jnp.where(scale > 0, scale, 1.0)[:, None, None]
    eye = jnp.eye(m, dtype=gg.dtype)
    gg = gg + lam * eye * valid + eye * ~valid
    ones = valid.astype(gg.dtype)
    lower = jnp.concatenate([jnp.broadcast_to(ones[None, :, None], (b, m, 1)), gg], axis=2)
    top = jnp.broadcast_to(jnp.concatenate([jnp.zeros((1,), gg.dtype), ones]), (b, 1, m + 1))
    h = jnp.concatenate([top, lower], axis=1)  # (b, m + 1, m + 1)
    rhs = jnp.zeros((b, m + 1), gg.dtype).at[:, 0].set(1.0)
    alpha = jnp.linalg.solve(h, rhs[..., None])[..., 1:, 0]  # (b, m)
    z = cfg.beta * jnp.einsum("bm,bmd->bd", alpha, fs) + (1.0 - cfg.beta) * jnp.einsum(
        "bm,bmd->bd", alpha, xs
    )
    fz = f(z)
    slot = count % m
    xs = xs.at[:, slot].set(z)
    fs = fs.at[:, slot].set(fz)
    return (xs, fs, count + 1), z, fz


def _h_matvec(us, vs, x):
    """``H x`` with ``H = -I + U V^T`` (rows of ``us``/``vs`` are the rank-one factors)."""
    return -x + jnp.einsum("bmd,bm->bd", us, jnp.einsum("bmd,bd->bm", vs, x))


def _h_rmatvec(us, vs, x):
    """``x^T H`` (returned as a vector)."""
    return -x + jnp.einsum("bmd,bm->bd", vs, jnp.einsum("bmd,bd->bm", us, x))


def _broyden_init(z0, f, cfg):
    b, d = z0.shape
    m = cfg.history
    fz = f(z0)
    gz = fz - z0
    zeros = jnp.zeros((b, m, d), z0.dtype)
    # H = -I initially, so the first step -H g = g is a plain fixed-point step.
    return (z0, gz, zeros, zeros, gz, jnp.asarray(0, jnp.int32)), z0, fz


def _broyden_step(state, f, cfg):
    z, gz, us, vs, update, count = state
    m = us.shape[1]
    z_new = z + update
    fz = f(z_new)
    gz_new = fz - z_new
    dx, dg = update, gz_new - gz
    vt = _h_rmatvec(us, vs, dx)
    den = jnp.sum(vt * dg, axis=-1, keepdims=True)
    u = (dx - _h_matvec(us, vs, dg)) / den
    # A vanishing denominator (no progress) would poison H: skip that rank-one term instead.
    ok = jnp.all(jnp.isfinite(u), axis=-1, keepdims=True) & jnp.all(jnp.isfinite(vt), axis=-1, keepdims=True)
    u, vt = jnp.where(ok, u, 0.0), jnp.where(ok, vt, 0.0)
    slot = count % m
    us, vs = us.at[:, slot].set(u), vs.at[:, slot].set(vt)
    update = -_h_matvec(us, vs, gz_new)
    return (z_new, gz_new, us, vs, update, count + 1), z_new, fz


_IMPLS = {
    "fixed_point": (_fp_init, _fp_step),
    "anderson": (_aa_init, _aa_step),
    "broyden": (_broyden_init, _broyden_step),
}


def solve(
    f,
    z0: jax.Array,
    cfg: SolverConfig = FORWARD_DEFAULT,
    *,
    differentiable: bool = False,
    count_initial: bool = True,
):
    """Find ``z`` with ``f(z) = z``, starting from ``z0``.

    Args:
      f: ``z -> z`` on arrays shaped like ``z0``; axis 0 is the batch (one residual per sample).
        ``f`` must treat samples independently: stopping, divergence and the returned iterate are
        decided per sample, so a sample that turns NaN affects no other sample.
      z0: initial state, at least 1-D.
      cfg: solver choice and stopping rule (:class:`SolverConfig`).
      differentiable: ``False`` runs a ``lax.while_loop`` (stops early, no reverse-mode AD).
        ``True`` runs a ``lax.scan`` of ``max_iter - 1`` steps that skips (``lax.cond``) the steps
        after the stop, so autodiff through the unrolled solver works (the reference gradient).
      count_initial: whether ``z0`` may be returned. The adjoint solve passes ``False``: its
        start ``u = 0`` has residual ``||g||``, which a tiny cotangent puts below ``tol``, and
        returning it would be an exactly-zero gradient. Needs ``max_iter >= 2``.

    Returns:
      ``(z, stats)``: per sample, the lowest-residual iterate (shape of ``z0``), or NaN for a
      sample none of whose iterates had a finite residual (a NaN input stays NaN in its row),
      and :class:`SolverStats`.
    """
    if z0.ndim < 1:
        raise ValueError("z0 needs a batch axis (axis 0)")
    if not count_initial and cfg.max_iter < 2:
        raise ValueError(
            f"max_iter={cfg.max_iter} leaves no iterate besides the start, which this solve may not "
            "return; use max_iter >= 2 (b_max_iter for a DEQ's backward solve)"
        )
    shape, batch = z0.shape, z0.shape[0]
    flat_f = lambda zf: f(zf.reshape(shape)).reshape(batch, -1)  # noqa: E731
    init, step = _IMPLS[cfg.solver]
    score = (lambda a, r: a) if cfg.stop_mode == "abs" else (lambda a, r: r)  # noqa: E731
    carry0 = _initial_carry(init(z0.reshape(batch, -1), flat_f, cfg), cfg, count_initial)

    def converged(c):
        return score(c["best_abs"], c["best_rel"]) <= cfg.tol

    def done(c):
        # Per sample: a sample is finished when it converged or diverged; the loop runs while
        # any sample is unfinished (a NaN sample is finished at once and stops nobody).
        finished = converged(c) | c["diverged"]
        return jnp.all(finished) | (c["k"] >= cfg.max_iter)

    body = _iteration(step, flat_f, score, cfg)

    if differentiable:
        c, _ = lax.scan(
            lambda c, _: (lax.cond(done(c), lambda c: c, body, c), None), carry0, None, cfg.max_iter - 1
        )
    else:
        c = lax.while_loop(lambda c: ~done(c), body, carry0)

    return _result(c, converged(c), score, shape)


def _iteration(step, flat_f, score, cfg: SolverConfig):
    """The solver loop's body: one step of the solver, then each sample's best iterate and break."""

    def body(c):
        state, z, fz = step(c["state"], flat_f, cfg)
        a, r = _residuals(z, fz)
        # NaN residuals compare False, so a NaN iterate never replaces the best one; nor does
        # any iterate of a sample after its protective break.
        better = (score(a, r) < score(c["best_abs"], c["best_rel"])) & ~c["diverged"]
        return dict(
            k=c["k"] + 1,
            state=state,
            abs0=c["abs0"],
            best_z=jnp.where(better[:, None], z, c["best_z"]),
            best_abs=jnp.where(better, a, c["best_abs"]),
            best_rel=jnp.where(better, r, c["best_rel"]),
            abs_trace=c["abs_trace"].at[c["k"]].set(a),
            rel_trace=c["rel_trace"].at[c["k"]].set(r),
            diverged=c["diverged"] | _blowup(a, c["abs0"], cfg),
        )

    return body


def _result(c, ok, score, shape):
    """``(z, stats)`` from the loop's final carry ``c``; ``ok``: which samples converged."""
    stats = SolverStats(
        nstep=c["k"],
        abs_res=c["best_abs"],
        rel_res=c["best_rel"],
        abs_trace=c["abs_trace"],
        rel_trace=c["rel_trace"],
        converged=ok,
        diverged=c["diverged"] & ~ok,
    )
    # A sample without any finite-residual iterate returns NaN: a finite stand-in (the start)
    # would give finite, wrong outputs downstream.
    best = score(c["best_abs"], c["best_rel"])
    z = jnp.where(jnp.isfinite(best)[:, None], c["best_z"], jnp.nan)
    return z.reshape(shape), stats


def _blowup(abs_res, abs0, cfg: SolverConfig):
    """Per sample: the protective break condition (non-finite, or beyond ``protect_thres``)."""
    blowup = ~jnp.isfinite(abs_res)
    if cfg.protect_thres is not None:
        blowup = blowup | (abs_res > cfg.protect_thres * abs0 + _EPS)
    return blowup


def _initial_carry(initialised, cfg: SolverConfig, count_initial: bool) -> dict:
    """The solver loop's carry after the first evaluation: best so far, traces, divergence."""
    state, z, fz = initialised
    abs0, rel0 = _residuals(z, fz)
    nan_trace = jnp.full((cfg.max_iter, z.shape[0]), jnp.nan, abs0.dtype)
    inf = jnp.full_like(abs0, jnp.inf)
    return dict(
        k=jnp.asarray(1, jnp.int32),
        state=state,
        abs0=abs0,
        best_z=z,
        best_abs=abs0 if count_initial else inf,
        best_rel=rel0 if count_initial else inf,
        abs_trace=nan_trace.at[0].set(abs0),
        rel_trace=nan_trace.at[0].set(rel0),
        diverged=~jnp.isfinite(abs0),
    )
