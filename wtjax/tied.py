"""The weight-tied block: one Linen block applied ``depth`` times with one set of parameters.

Variable collections (decided once, here):

* ``params`` is **tied**: broadcast to every reuse (``nn.scan(variable_broadcast='params',
  split_rngs={'params': False})``), so the parameter count is independent of the depth and the
  shared weight's gradient is the sum of the per-reuse gradients.
* masks are **per reuse** and **never stored**: each reuse sees the parameters through a view
  that multiplies the selected kernels by a mask made inside the scan step from
  ``fold_in(fold_in(seed, path), reuse_index)`` (see :mod:`wtjax.masks`).
* the carried state ``z`` is the only thing passed from one reuse to the next; extra positional
  arguments (e.g. an input injection ``x``) are broadcast to every reuse.
* ``dropout`` RNGs are split per reuse. Collections that would need per-reuse *statistics*
  (BatchNorm's ``batch_stats``) are not supported inside the tie: use GroupNorm/LayerNorm
  (google/flax#2052).

Mask modes: ``dense`` (no mask), ``same`` (the reuse-0 mask at every reuse), ``multi`` (a distinct
mask per reuse), ``dropout`` (a fresh Bernoulli weight mask per reuse and step at rate
``1 - density``, inverted scaling, off when ``deterministic``: the paper's dropout baseline) and
``stored`` (masks given, not generated: e.g. scored by a pruning-at-initialisation method. They are
passed as the ``masks`` variable collection, a tree shaped like the block's parameters holding,
for each masked leaf, either one mask of the leaf's shape used at every reuse or ``K`` masks
stacked on a leading axis, one per reuse. Leaves without a mask stay dense. Being a collection,
they travel with the training state and are checkpointed and sharded like it).

This module imports only jax, flax and numpy.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import traverse_util

from wtjax.masks import MaskSpec, apply_masks

MASK_MODES = ("dense", "same", "multi", "dropout", "stored")


def _remat_policy(name: str | None):
    if name is None:
        return None
    policy = getattr(jax.checkpoint_policies, name, None)
    if policy is None:
        names = sorted(n for n in dir(jax.checkpoint_policies) if not n.startswith("_"))
        raise ValueError(f"unknown remat policy {name!r}; choose one of {names}")
    return policy


def _dropout_weights(params, spec: MaskSpec, rate: float, rng: jax.Array):
    """Inverted DropConnect on the selected leaves: keep w.p. ``1-rate``, scale by ``1/(1-rate)``."""
    flat = traverse_util.flatten_dict(params)
    for i, (p, v) in enumerate(sorted(flat.items())):
        if spec.selects(p, v):
            keep = jax.random.bernoulli(jax.random.fold_in(rng, i), 1.0 - rate, v.shape)
            flat[p] = jnp.where(keep, v / (1.0 - rate), 0.0).astype(v.dtype)
    return traverse_util.unflatten_dict(flat)


def _apply_stored_masks(params, masks, reuse_index):
    """Multiply each leaf that has a stored mask by it (``masks[reuse_index]`` if stacked per reuse)."""
    if not masks:
        raise ValueError(
            "mask_mode='stored' needs the masks as a variable collection: "
            "model.apply({'params': params, 'masks': masks}, ...)"
        )
    flat_params = traverse_util.flatten_dict(params)
    for path, mask in traverse_util.flatten_dict(masks).items():
        if path not in flat_params:
            raise ValueError(f"a stored mask at {'/'.join(path)} has no parameter to mask")
        leaf = flat_params[path]
        if mask.ndim == leaf.ndim + 1:
            mask = mask[reuse_index]
        if mask.shape != leaf.shape:
            raise ValueError(f"stored mask at {'/'.join(path)} has shape {mask.shape}; the parameter is {leaf.shape}")
        flat_params[path] = leaf * mask.astype(leaf.dtype)
    return traverse_util.unflatten_dict(flat_params)


class Tied(nn.Module):
    """Apply ``block`` ``depth`` times with one set of (optionally masked) parameters.

    ``block(z, *broadcast_args) -> z`` must map the carried state to a state of the same shape
    and dtype. Example::

        class MyNet(nn.Module):
            @nn.compact
            def __call__(self, x):
                x = nn.Dense(64)(x)
                x = Tied(MyBlock(64), depth=8, mask_mode="multi", mask=MaskSpec(density=0.5))(x)
                return nn.Dense(10)(x)

    Attributes:
      block: the Linen module to reuse (its parameters live under ``<this>/block``).
      depth: number of reuses K at training time (override per call with ``depth=``).
      mask_mode: ``dense``, ``same``, ``multi`` or ``dropout`` (module docstring).
      mask: which parameters are masked and how (:class:`wtjax.masks.MaskSpec`).
      scan: ``True`` compiles one loop body with ``nn.scan``; ``False`` is a plain Python loop
        over the same submodule, the reference the scan is tested against (compile time grows
        with depth).
      remat_policy: ``None`` (store activations) or a name in ``jax.checkpoint_policies``
        (e.g. ``'nothing_saveable'``) to recompute each reuse in the backward pass.
      unroll: ``lax.scan`` unroll factor (scan mode only).
      shared: ``True`` ties the parameters. ``False`` is the not-tied baseline through the same
        code path: ``depth`` independent parameter sets, stacked on a leading axis of size
        ``depth`` in scan mode (``variable_axes={'params': 0}``) or held by ``depth`` separate
        submodules ``block_0 .. block_{K-1}`` in the unrolled mode. Its depth cannot change per call.
    """

    block: nn.Module
    depth: int
    mask_mode: str = "dense"
    mask: MaskSpec = MaskSpec()
    scan: bool = True
    remat_policy: str | None = None
    unroll: int = 1
    shared: bool = True

    def __post_init__(self):
        if self.mask_mode not in MASK_MODES:
            raise ValueError(f"unknown mask_mode {self.mask_mode!r}; choose one of {MASK_MODES}")
        if self.depth < 1:
            raise ValueError(f"depth must be >= 1, got {self.depth}")
        super().__post_init__()

    def _view(self, variables, reuse_index, dropout_rng):
        """What one reuse sees of ``{'params': shared params}``: masked according to the mode."""
        params = variables.get("params")
        if self.mask_mode == "dense" or not params:
            return variables
        if self.mask_mode == "stored":
            masked = _apply_stored_masks(params, variables.get("masks"), reuse_index)
        else:
            masked = self._masked(params, reuse_index, dropout_rng)
        return {**variables, "params": masked}

    def _masked(self, params, reuse_index, dropout_rng):
        if self.mask_mode == "dropout":
            if dropout_rng is None:
                return params
            return _dropout_weights(params, self.mask, 1.0 - self.mask.density, dropout_rng)
        index = 0 if self.mask_mode == "same" else reuse_index
        # Masks hash the path of the shared weight ("<tied>/block/..."), the same in every mode.
        return apply_masks(params, self.mask, index, scope=self.path + ("block",))

    @nn.compact
    def __call__(
        self,
        z,
        *broadcast_args,
        depth: int | None = None,
        deterministic: bool = True,
        return_intermediates: bool = False,
    ):
        """Run the tie.

        Args:
          z: the initial carried state.
          *broadcast_args: passed unchanged to every reuse (e.g. the input injection).
          depth: reuses to run now (default ``self.depth``); any depth works at evaluation time,
            masks for every reuse index follow from the seed.
          deterministic: disables the ``dropout`` mask mode (evaluation).
          return_intermediates: also return the state after every reuse, stacked on axis 0.

        Returns:
          ``z_K``, or ``(z_K, zs)`` with ``zs[i]`` the state after reuse ``i`` when
          ``return_intermediates``.
        """
        depth = self.depth if depth is None else depth
        if not self.shared and depth != self.depth:
            raise ValueError(f"a not-tied stack has {self.depth} layers; it cannot run {depth}")
        use_dropout = self.mask_mode == "dropout" and not deterministic

        def step(block, z, reuse_index, *args):
            if block.is_initializing():
                # Parameters are created unmasked (and nn.scan forbids broadcast variables that
                # depend on the scan body, which a masked view at init would be).
                z = block(z, *args)
            else:
                rng = block.make_rng("dropout") if use_dropout else None
                view = functools.partial(self._view, reuse_index=reuse_index, dropout_rng=rng)
                masked = nn.map_variables(lambda mdl, *a: mdl(*a), ("params", "masks"), trans_in_fn=view)
                z = masked(block, z, *args)
            return z, (z if return_intermediates else None)

        policy = _remat_policy(self.remat_policy)
        if policy is not None:
            step = nn.remat(step, policy=policy, prevent_cse=not self.scan)

        # Adopt the block under this module's scope, wherever the caller built it (a block built
        # inside the parent's compact method would otherwise bind to the parent).
        if self.scan:
            if self.shared:
                params_axes = dict(
                    variable_broadcast=("params", "masks"), split_rngs={"params": False, "dropout": True}
                )
            else:
                params_axes = dict(variable_axes={"params": 0}, split_rngs={"params": True, "dropout": True})
            scanned = nn.scan(
                step,
                in_axes=(0,) + (nn.broadcast,) * len(broadcast_args),
                length=depth,
                unroll=self.unroll,
                **params_axes,
            )
            block = self.block.clone(parent=self, name="block")
            z, zs = scanned(block, z, jnp.arange(depth), *broadcast_args)
        else:
            if self.shared:
                blocks = [self.block.clone(parent=self, name="block")] * depth
            else:
                blocks = [self.block.clone(parent=self, name=f"block_{i}") for i in range(depth)]
            outs = []
            for i, block in enumerate(blocks):
                z, out = step(block, z, jnp.asarray(i), *broadcast_args)
                outs.append(out)
            zs = jnp.stack(outs) if return_intermediates else None
        return (z, zs) if return_intermediates else z
