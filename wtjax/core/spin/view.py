"""The SPIN parameter view of a tie: stored weight sets, and the set each reuse sees.

:class:`wtjax.core.tied.Tied` with a ``weight_map`` builds a :class:`SpinView` and delegates to it:

* **storage** (:meth:`SpinView.init_storage`): the ``block`` parameters selected by
  ``share_predicate`` are stored as ``P = max(weight_map) + 1`` sets stacked on a leading axis, the
  others as ``depth`` per-layer sets (with ``fusion``: every leaf per layer, the pretrained
  not-shared weights ``V``);
* **transforms** (:meth:`SpinView.transform_params`): the per-layer affine transforms under
  ``<tie>/affine`` and the learnable fusion weights under ``<tie>/fusion``;
* **selection** (:meth:`SpinView.select`): reuse ``i`` sees ``params[weight_map[i]]`` (or the fused
  ``F_{weight_map[i]}(V)``), then its affine transform; per-layer leaves are ``params[i]``.

:func:`fold_fusion` turns a fusion-trained tree into a plain shared one. The maths (maps,
transforms, fusion) is in :mod:`wtjax.core.spin.sharing`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import traverse_util

from wtjax.core.masks import default_predicate
from wtjax.core.spin import sharing

SharePredicate = Callable[[tuple[str, ...], Any], bool]


def _per_layer(v):
    """The abstract per-layer leaf of a stacked leaf (what predicates of a single layer see)."""
    return jax.ShapeDtypeStruct(v.shape[1:], v.dtype)


def _is_affine_leaf(_, x) -> bool:
    return isinstance(x, dict) and set(x) == {"scale", "bias"}


@dataclasses.dataclass(frozen=True)
class SpinView:
    """How a tie stores and selects SPIN-shared parameters (module docstring).

    Attributes:
      weight_map: the layer-to-weight map, one entry per layer (its length is the depth).
      share_predicate: ``predicate(path, per_layer_leaf) -> bool`` choosing the leaves that follow
        ``weight_map``; the others get one set per layer. ``None`` shares every leaf.
      affine_groups: ``None`` or the group size of the per-layer affine transform of every shared
        kernel (:func:`wtjax.core.spin.sharing.affine_apply`).
      fusion: ``None`` or a :data:`wtjax.core.spin.sharing.FUSIONS` strategy.
    """

    weight_map: tuple[int, ...]
    share_predicate: SharePredicate | None = None
    affine_groups: int | None = None
    fusion: str | None = None

    def __post_init__(self):
        object.__setattr__(self, "weight_map", sharing.validate_map(self.weight_map))
        if self.fusion is not None and self.fusion not in sharing.FUSIONS:
            raise ValueError(f"unknown fusion {self.fusion!r}; choose one of {sharing.FUSIONS}")

    @property
    def depth(self) -> int:
        return len(self.weight_map)

    def shares(self, path, per_layer_leaf) -> bool:
        """Whether the leaf at ``path`` follows the weight map."""
        return self.share_predicate is None or bool(self.share_predicate(path, per_layer_leaf))

    def _map_shared(self, variables, fn):
        """Apply ``fn`` to every shared leaf of ``variables['params']`` (a map_variables callback)."""
        if self.fusion is not None or not variables.get("params"):
            return variables  # fusion trains the per-layer weights V themselves
        flat = traverse_util.flatten_dict(variables["params"])
        for path, v in flat.items():
            if self.shares(path, _per_layer(v)):
                flat[path] = fn(v)
        return {**variables, "params": traverse_util.unflatten_dict(flat)}

    def _storage_from_layers(self, variables):
        """At init: keep ``P`` of the ``depth`` freshly initialised sets of each shared leaf."""
        return self._map_shared(variables, lambda v: v[: sharing.num_weights(self.weight_map)])

    def _layers_from_storage(self, variables):
        """Right inverse of :meth:`_storage_from_layers`: pad ``P`` sets to ``depth`` (repeat the last)."""
        index = jnp.minimum(jnp.arange(self.depth), sharing.num_weights(self.weight_map) - 1)
        return self._map_shared(variables, lambda v: v[index])

    def init_storage(self, block: nn.Module, z, args) -> None:
        """Create the stacked parameters of the bound ``block``: ``depth`` inits, ``P`` kept if shared."""

        def run(mdl, z, *a):
            return mdl(z, *a)

        stacked = nn.vmap(
            run,
            variable_axes={"params": 0},
            split_rngs={"params": True, "dropout": True},
            in_axes=(None,) * (1 + len(args)),
            axis_size=self.depth,
        )
        # map_variables(init=True) runs the target again on the stored tree and stores its output
        # again: pad the P kept sets back to depth so the vmapped block sees consistent axes, in a
        # way the slice [:P] undoes exactly (repeating the last set).
        nn.map_variables(
            stacked,
            "params",
            trans_in_fn=self._layers_from_storage,
            trans_out_fn=self._storage_from_layers,
            init=True,
            mutable=True,
        )(block, z, *args)

    def transform_params(self, module: nn.Module, storage) -> dict:
        """Create (init) or read ``module``'s ``affine`` and ``fusion`` params, shaped from ``storage``."""
        kernels = {
            path: _per_layer(v)
            for path, v in traverse_util.flatten_dict(storage).items()
            if self.shares(path, _per_layer(v)) and default_predicate(path, _per_layer(v))
        }

        def per_kernel(make):
            return lambda _: traverse_util.unflatten_dict({p: make(v) for p, v in kernels.items()})

        extras = {}
        n_affine = self.depth - sharing.num_weights(self.weight_map)
        if self.affine_groups is not None and n_affine > 0:
            affine_init = per_kernel(lambda v: sharing.affine_init(v.shape[-1], self.affine_groups, n_affine))
            extras["affine"] = module.param("affine", affine_init)
        if self.fusion in sharing.LEARNABLE_FUSIONS:
            fusion_init = per_kernel(lambda v: sharing.fusion_init(self.fusion, self.depth, v.shape[-1]))
            extras["fusion"] = module.param("fusion", fusion_init)
        return extras

    def select(self, params, reuse_index, extras: dict):
        """The parameters of reuse ``reuse_index``: gather (or fuse) its set, then transform it."""
        flat = traverse_util.flatten_dict(params)
        affine = traverse_util.flatten_dict(extras.get("affine", {}), is_leaf=_is_affine_leaf)
        alphas = traverse_util.flatten_dict(extras.get("fusion", {}))
        slot = jnp.asarray(self.weight_map)[reuse_index]
        for path, v in flat.items():
            if not self.shares(path, _per_layer(v)):
                flat[path] = v[reuse_index]
                continue
            if self.fusion is None:
                w = v[slot]
            else:
                w = sharing.fuse(v, self.weight_map, self.fusion, alphas.get(path), row=slot)
            if path in affine:
                # Layer i uses transform j = index[i]; the first user of a set (-1) sees W as is.
                j = jnp.asarray(sharing.affine_index(self.weight_map))[reuse_index]
                a, b = affine[path]["scale"][jnp.maximum(j, 0)], affine[path]["bias"][jnp.maximum(j, 0)]
                w = jnp.where(j >= 0, sharing.affine_apply(w, a, b), w)
            flat[path] = w.astype(v.dtype)
        return traverse_util.unflatten_dict(flat)


def fold_fusion(tied_params, weight_map, fusion: str, share_predicate=None):
    """Constant-fold a fusion-trained tie's parameter tree into a plain shared one.

    Args:
      tied_params: the ``params`` subtree of a ``Tied(weight_map=..., fusion=fusion)``:
        ``block`` (shared leaves per layer, ``(depth, ...)``), optional ``fusion`` and ``affine``.
      weight_map, fusion, share_predicate: the fields of that ``Tied``.

    Returns:
      The ``params`` subtree of the same ``Tied`` with ``fusion=None``: each shared leaf replaced
      by the ``P`` fused weights ``F_w(V)`` (``(P, ...)``), ``fusion`` dropped, ``affine`` kept.
      Both trees compute the same function.
    """
    view = SpinView(weight_map, share_predicate)
    alphas = traverse_util.flatten_dict(tied_params.get("fusion", {}))
    flat = traverse_util.flatten_dict(tied_params["block"])
    for path, v in flat.items():
        if view.shares(path, _per_layer(v)):
            flat[path] = sharing.fuse(v, view.weight_map, fusion, alphas.get(path)).astype(v.dtype)
    out = {k: v for k, v in tied_params.items() if k not in ("block", "fusion")}
    out["block"] = traverse_util.unflatten_dict(flat)
    return out
