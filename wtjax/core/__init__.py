"""The reusable core: the weight tie and the per-reuse views of its parameters.

:mod:`~wtjax.core.tied` (the tie), :mod:`~wtjax.core.masks` (per-reuse masks made from a seed),
:mod:`~wtjax.core.spin` (SPIN parameter sharing), :mod:`~wtjax.core.conv` (convolutions) and
:mod:`~wtjax.core.precision` (compute dtypes). Imports only jax, flax and numpy.
"""
