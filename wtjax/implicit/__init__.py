"""Implicit (DEQ) machinery in pure JAX: fixed-point solvers, implicit gradients, regularisers.

No Flax here: functions take ``f(params, x, z)`` with explicit parameters.
"""

from wtjax.implicit.fixed_point import GRAD_MODES, adjoint_solve, fixed_point
from wtjax.implicit.regularizers import fixed_point_residual_loss, jacobian_penalty
from wtjax.implicit.solvers import (
    BACKWARD_DEFAULT,
    FORWARD_DEFAULT,
    SOLVERS,
    STOP_MODES,
    SolverConfig,
    SolverStats,
    solve,
)

__all__ = [
    "BACKWARD_DEFAULT",
    "FORWARD_DEFAULT",
    "GRAD_MODES",
    "SOLVERS",
    "STOP_MODES",
    "SolverConfig",
    "SolverStats",
    "adjoint_solve",
    "fixed_point",
    "fixed_point_residual_loss",
    "jacobian_penalty",
    "solve",
]
