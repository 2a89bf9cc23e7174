"""The reusable core: the weight tie and the per-reuse views of its parameters.

:mod:`~wtjax.core.tied` (the tie: apply one block K times), :mod:`~wtjax.core.nnx_tied` (the
same tie for Flax NNX models), :mod:`~wtjax.core.views` (its mask views), :mod:`~wtjax.core.masks`
(per-reuse masks made from a seed), :mod:`~wtjax.core.mask_sites` (a model's ties and their mask
identities), :mod:`~wtjax.core.spin` (SPIN
parameter sharing: maths, the tie's SPIN view, model options), :mod:`~wtjax.core.conv`
(convolutions) and :mod:`~wtjax.core.precision` (compute dtypes). Imports only jax, flax and numpy.
"""
