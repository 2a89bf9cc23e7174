"""The reusable core: the weight tie and the per-reuse views of its parameters.

:mod:`~wtjax.core.tied` (the tie: apply one block K times), :mod:`~wtjax.core.views` (its mask
views), :mod:`~wtjax.core.masks` (per-reuse masks made from a seed), :mod:`~wtjax.core.spin` (SPIN
parameter sharing: maths, the tie's SPIN view, model options), :mod:`~wtjax.core.conv`
(convolutions) and :mod:`~wtjax.core.precision` (compute dtypes). Imports only jax, flax and numpy.
"""
