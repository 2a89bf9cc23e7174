"""The mask views of a tie: what one reuse sees of the shared parameters.

A view maps the parameters a reuse would use to the (masked) parameters it runs with. Masks are
made inside the scan step and never stored, except in the ``stored`` mode. Modes:

* ``dense``: no mask;
* ``same``: the reuse-0 mask at every reuse;
* ``multi``: a distinct mask per reuse, from ``fold_in(fold_in(seed, path), reuse_index)`` with
  ``path`` the tie's ``mask_scope``, ``'block'`` and the leaf's path (:mod:`wtjax.core.masks`);
* ``dropout``: a fresh Bernoulli weight mask per reuse and step at rate ``1 - density``, inverted
  scaling, off when there is no ``dropout`` RNG (evaluation): the paper's dropout baseline;
* ``stored``: masks given, not generated (e.g. scored by a pruning-at-initialisation method), as
  the ``masks`` variable collection: a tree shaped like the block's parameters holding, for each
  masked leaf, either one mask of the leaf's shape used at every reuse or ``K`` masks stacked on a
  leading axis, one per reuse. Leaves without a mask stay dense.

This module imports only jax and flax.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import traverse_util

from wtjax.core import precision
from wtjax.core.masks import MaskSpec, apply_masks

MASK_MODES = ("dense", "same", "multi", "dropout", "stored")


def dropout_weights(params, spec: MaskSpec, rate: float, rng: jax.Array, dtype=None):
    """Inverted DropConnect on the selected leaves: keep w.p. ``1-rate``, scale by ``1/(1-rate)``.

    ``dtype``: the compute dtype the selected leaves are cast to first (``None``: keep theirs).
    """
    flat = traverse_util.flatten_dict(params)
    for i, (p, v) in enumerate(sorted(flat.items())):
        if spec.selects(p, v):
            v = v if dtype is None else v.astype(dtype)
            keep = jax.random.bernoulli(jax.random.fold_in(rng, i), 1.0 - rate, v.shape)
            flat[p] = jnp.where(keep, v / (1.0 - rate), 0.0).astype(v.dtype)
    return traverse_util.unflatten_dict(flat)


def apply_stored_masks(params, masks, reuse_index, dtype=None):
    """Multiply each leaf that has a stored mask by it (``masks[reuse_index]`` if stacked per reuse).

    A mask with one more dimension than its parameter holds one mask per reuse on axis 0.
    ``dtype``: the compute dtype the masked leaves are cast to first (``None``: keep theirs).
    """
    if not masks:
        raise ValueError(
            "mask_mode='stored' needs the masks as a variable collection: "
            "model.apply({'params': params, 'masks': masks}, ...)"
        )
    flat_params = traverse_util.flatten_dict(params)
    for path, mask in traverse_util.flatten_dict(masks).items():
        if path not in flat_params:
            raise ValueError(f"a stored mask at {'/'.join(path)} has no parameter to mask")
        leaf = flat_params[path] if dtype is None else flat_params[path].astype(dtype)
        if mask.ndim == leaf.ndim + 1:
            mask = mask[reuse_index]
        if mask.shape != leaf.shape:
            raise ValueError(
                f"stored mask at {'/'.join(path)} has shape {mask.shape}; the parameter is {leaf.shape}"
            )
        flat_params[path] = leaf * mask.astype(leaf.dtype)
    return traverse_util.unflatten_dict(flat_params)


@dataclasses.dataclass(frozen=True)
class MaskView:
    """The per-reuse mask view of one tie.

    Attributes:
      mode: one of :data:`MASK_MODES` (module docstring).
      spec: which leaves are masked and how (:class:`wtjax.core.masks.MaskSpec`).
      dtype: ``None`` or a compute dtype name of :mod:`wtjax.core.precision`: the masked leaves
        are cast to it before the multiplication (masks are 0/1, so exactly).
    """

    mode: str = "dense"
    spec: MaskSpec = MaskSpec()
    dtype: str | None = None

    def __post_init__(self):
        if self.mode not in MASK_MODES:
            raise ValueError(f"unknown mask_mode {self.mode!r}; choose one of {MASK_MODES}")
        precision.layer_dtype(self.dtype)  # validates the name

    def __call__(self, params, masks, reuse_index, dropout_rng, scope: tuple[str, ...]):
        """The parameters reuse ``reuse_index`` runs with.

        Args:
          params: the parameters of this reuse (already selected, e.g. by a SPIN view).
          masks: the ``masks`` collection (``stored`` mode only).
          reuse_index: the reuse (a traced int inside a scan).
          dropout_rng: the reuse's ``dropout`` key, or ``None`` (``dropout`` mode off).
          scope: the hashed prefix of the shared weights' paths (:func:`wtjax.core.masks.tie_mask_path`
            of the tie's ``mask_scope``, e.g. ``('tied', 'block')``); generated masks hash it.
        """
        dtype = precision.layer_dtype(self.dtype)
        if self.mode == "dense" or not params:
            return params
        if self.mode == "stored":
            return apply_stored_masks(params, masks, reuse_index, dtype)
        if self.mode == "dropout":
            if dropout_rng is None:
                return params
            return dropout_weights(params, self.spec, 1.0 - self.spec.density, dropout_rng, dtype)
        index = 0 if self.mode == "same" else reuse_index
        return apply_masks(params, self.spec, index, scope=scope, dtype=dtype)
