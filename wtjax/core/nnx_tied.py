"""The weight-tied block for Flax NNX models: one ``nnx.Module`` block applied ``depth`` times.

:class:`NNXTied` is the NNX front end of :class:`wtjax.core.tied.Tied` with the same mask
semantics: reuse ``i`` runs the block with its ``nnx.Param`` leaves multiplied by the masks
:func:`wtjax.core.masks.apply_masks` makes from ``(seed, i, (*mask_scope, 'block', *leaf_path))``.
A block whose parameter paths match a Linen block's (``self.dense = nnx.Linear(...)`` and
``nn.Dense(name='dense')`` both give ``dense/kernel``) therefore computes exactly what the Linen
tie computes with the same weights and ``mask_scope``, and the weights move between the two
(:func:`linen_params`, :func:`load_linen_params`).

How it runs: ``nnx.split`` separates the block's parameters from its structure once per call; a
``jax.lax.scan`` over the reuse index (``scan=True``) or a Python loop (``scan=False``, the
reference) merges the masked parameters into the block for each reuse. The parameters are
closed over, i.e. broadcast to every reuse, so the tied weight's gradient is the sum of the
per-reuse gradients, as in Linen. Mask modes: ``dense``, ``same``, ``multi``; a block holding
state other than ``nnx.Param`` (BatchNorm statistics, RNG streams) is refused, as in Linen.

This module imports only jax and flax.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from wtjax.core.masks import MaskSpec, tie_mask_path
from wtjax.core.tied import _describe_state, _signature, check_depth
from wtjax.core.views import MASK_MODES, MaskView

#: The mask modes of the NNX tie (the others of :data:`wtjax.core.views.MASK_MODES` are Linen only).
NNX_MASK_MODES = ("dense", "same", "multi")


class NNXTied(nnx.Module):
    """Apply the NNX ``block`` ``depth`` times with one set of (optionally masked) parameters.

    ``block(z, *broadcast_args) -> z`` must return a state of the input's structure, shapes and
    dtypes. Example::

        class Net(nnx.Module):
            def __init__(self, rngs):
                self.inp = nnx.Linear(16, 32, rngs=rngs)
                self.tie = NNXTied(Block(32, rngs=rngs), depth=4, mask_mode="multi",
                                   mask=MaskSpec(density=0.5), mask_scope="tie")
                self.out = nnx.Linear(32, 10, rngs=rngs)

            def __call__(self, x):
                return self.out(self.tie(self.inp(x)))

    Attributes:
      block: the ``nnx.Module`` reused (its parameters live under ``<this>/block``).
      depth: reuses K, an int >= 1 (override per call with ``depth=``).
      mask_mode: ``dense``, ``same`` (the reuse-0 mask at every reuse) or ``multi`` (a mask
        per reuse).
      mask: which parameters are masked and how (:class:`wtjax.core.masks.MaskSpec`; ``None``:
        the default spec).
      mask_scope: the mask identity, as :class:`wtjax.core.tied.Tied`'s: masks hash
        ``(*mask_scope.split('/'), 'block', *leaf_path)`` (``None``: ``('block', ...)``), never
        where the tie sits in the model.
      scan: ``True`` runs the reuses with ``jax.lax.scan``; ``False`` is a Python loop (the
        reference; compile time grows with the depth).
      unroll: the scan's unroll factor (``True``: fully unrolled).
      dtype: ``None`` or a compute dtype name of :mod:`wtjax.core.precision` (``'bfloat16'``):
        masked leaves are cast to it before the masks multiply them, as in Linen.
    """

    def __init__(
        self,
        block: nnx.Module,
        depth: int,
        *,
        mask_mode: str = "dense",
        mask: MaskSpec | None = None,
        mask_scope: str | None = None,
        scan: bool = True,
        unroll: int | bool = 1,
        dtype: str | None = None,
    ):
        if mask_mode in MASK_MODES and mask_mode not in NNX_MASK_MODES:
            raise NotImplementedError(
                f"NNXTied has the mask modes {NNX_MASK_MODES}; {mask_mode!r} exists only in the Linen "
                "Tied (wtjax.Tied; use it in an NNX model through nnx.bridge.ToNNX)"
            )
        mask = MaskSpec() if mask is None else mask
        self.view = MaskView(mask_mode, mask, dtype)  # validates the mode and dtype
        tie_mask_path(mask_scope)  # validates the scope
        _check_stateless(block)
        self.block = block
        self.depth = check_depth(depth, "at construction")
        self.mask_mode, self.mask, self.mask_scope = mask_mode, mask, mask_scope
        self.scan, self.unroll, self.dtype = scan, unroll, dtype

    def __call__(self, z, *broadcast_args, depth: int | None = None):
        """Run the tie and return the final state ``z_K`` (``broadcast_args`` go to every reuse)."""
        return self._reuse(z, broadcast_args, depth, keep_states=False)[0]

    def trajectory(self, z, *broadcast_args, depth: int | None = None):
        """``(z_K, zs)``, ``zs[i]`` the state after reuse ``i`` (stacked on axis 0)."""
        return self._reuse(z, broadcast_args, depth, keep_states=True)

    def _reuse(self, z, args, depth, keep_states):
        depth = self.depth if depth is None else check_depth(depth, "at call time")
        graphdef, params, rest = nnx.split(self.block, nnx.Param, ...)
        pure = nnx.to_pure_dict(params)
        scope = tie_mask_path(self.mask_scope)

        def step(z, reuse_index):
            masked = self.view(pure, None, reuse_index, None, scope)
            state = jax.tree.map(lambda v: v, params)  # a copy: the block's own state stays as is
            nnx.replace_by_pure_dict(state, masked)
            z_out = nnx.merge(graphdef, state, rest)(z, *args)
            self._check_carry(z, z_out)
            return z_out, (z_out if keep_states else None)

        if self.scan:
            return jax.lax.scan(step, z, jnp.arange(depth), unroll=self.unroll)
        states = []
        for i in range(depth):
            z, state = step(z, jnp.asarray(i))
            states.append(state)
        return z, (jnp.stack(states) if keep_states else None)

    def _check_carry(self, z_in, z_out) -> None:
        if _signature(z_in) != _signature(z_out):
            raise ValueError(
                f"the block {type(self.block).__name__} of an NNXTied must return the carried state "
                f"with its shape and dtype: input {_describe_state(z_in)} -> output {_describe_state(z_out)}"
            )


def _check_stateless(block) -> None:
    """A ValueError naming the first variable of ``block`` that is not an ``nnx.Param``."""
    if not isinstance(block, nnx.Module):
        raise TypeError(f"NNXTied needs an nnx.Module block, got {type(block).__name__}")
    other = nnx.to_flat_state(nnx.state(block, nnx.Not(nnx.Param)))
    for path, variable in other:
        raise ValueError(
            f"the block {type(block).__name__} of an NNXTied holds {type(variable).__name__} at "
            f"{'/'.join(map(str, path))}: a tie carries only nnx.Param across reuses (one set of "
            "statistics or one RNG stream cannot describe every reuse); use LayerNorm/GroupNorm in "
            "the block, or BatchNorm and Dropout outside the tie"
        )


def linen_params(tie: NNXTied) -> dict:
    """The Linen :class:`~wtjax.core.tied.Tied` ``params`` of ``tie``'s weights: ``{'block': ...}``.

    For a block whose parameter paths match the Linen block's; with the same ``mask_scope`` the
    Linen tie then computes what ``tie`` computes.
    """
    return {"block": nnx.to_pure_dict(nnx.state(tie.block, nnx.Param))}


def load_linen_params(tie: NNXTied, params: dict) -> None:
    """Set ``tie``'s weights from a Linen tie's ``params`` (``{'block': ...}``), in place.

    Raises a ValueError naming a leaf the NNX block does not have.
    """
    state = nnx.state(tie.block, nnx.Param)
    nnx.replace_by_pure_dict(state, params["block"])
    nnx.update(tie.block, state)
