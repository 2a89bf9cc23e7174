"""The weight-tied block: one Linen block applied ``depth`` times with one set of parameters.

Variable collections (decided once, here):

* ``params`` is **tied**: broadcast to every reuse (``nn.scan(variable_broadcast='params',
  split_rngs={'params': False})``), so the parameter count is independent of the depth and the
  shared weight's gradient is the sum of the per-reuse gradients.
* masks are **per reuse** and **never stored**: each reuse sees the parameters through a view
  that multiplies the selected kernels by a mask made inside the scan step from
  ``fold_in(fold_in(seed, path), reuse_index)`` (see :mod:`wtjax.core.masks`).
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

SPIN parameter sharing (``weight_map``, see :mod:`wtjax.core.spin.sharing`) goes through the same tie: the
``block`` parameters selected by ``share_predicate`` are stored as ``P = max(weight_map) + 1``
sets stacked on a leading axis, the others as ``depth`` per-layer sets, and reuse ``i`` sees
``params[weight_map[i]]`` (resp. ``params[i]``) through the same per-reuse view that applies the
masks (gather, then optional per-layer affine transform, then mask). With ``fusion`` the shared
leaves are stored per layer (the pretrained not-shared weights ``V``) and reuse ``i`` sees the
fused ``F_{weight_map[i]}(V)``; :func:`fold_fusion` turns such a tree into a plain shared one.

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

from wtjax.core import precision
from wtjax.core.masks import MaskSpec, apply_masks, default_predicate
from wtjax.core.spin import sharing

MASK_MODES = ("dense", "same", "multi", "dropout", "stored")


def _remat_policy(name: str | None):
    if name is None:
        return None
    policy = getattr(jax.checkpoint_policies, name, None)
    if policy is None:
        names = sorted(n for n in dir(jax.checkpoint_policies) if not n.startswith("_"))
        raise ValueError(f"unknown remat policy {name!r}; choose one of {names}")
    return policy


def _dropout_weights(params, spec: MaskSpec, rate: float, rng: jax.Array, dtype=None):
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


def _apply_stored_masks(params, masks, reuse_index, dtype=None):
    """Multiply each leaf that has a stored mask by it (``masks[reuse_index]`` if stacked per reuse).

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
      mask_mode: ``dense``, ``same``, ``multi``, ``dropout`` or ``stored`` (module docstring).
      mask: which parameters are masked and how (:class:`wtjax.core.masks.MaskSpec`).
      scan: ``True`` compiles one loop body with ``nn.scan``; ``False`` is a plain Python loop
        over the same submodule, the reference the scan is tested against (compile time grows
        with depth).
      remat_policy: ``None`` (store activations) or a name in ``jax.checkpoint_policies``
        (e.g. ``'nothing_saveable'``) to recompute each reuse in the backward pass.
      checkpoint_every: ``None`` (the carry of every reuse is kept for the backward pass) or the
        number of reuses per checkpointed segment, or ``'sqrt'`` (``round(sqrt(depth))``): a
        nested scan keeps only the carry at each segment boundary and recomputes a segment's
        reuses in the backward pass, with each reuse rematerialised by ``remat_policy``
        (default ``'nothing_saveable'``). Memory ``O(depth / n + n)`` carries, about one
        extra forward pass of compute. Needs ``scan=True`` and ``shared=True``. Same outputs and
        gradients as the plain scan (``dropout`` mode draws its masks in another order).
      unroll: ``lax.scan`` unroll factor (scan mode only).
      shared: ``True`` ties the parameters. ``False`` is the not-tied baseline through the same
        code path: ``depth`` independent parameter sets, stacked on a leading axis of size
        ``depth`` in scan mode (``variable_axes={'params': 0}``) or held by ``depth`` separate
        submodules ``block_0 .. block_{K-1}`` in the unrolled mode. Its depth cannot change per call.
      weight_map: ``None`` (the default: every reuse shares one parameter set, the tree above) or
        a SPIN layer-to-weight map of length ``depth`` (:func:`wtjax.core.spin.sharing.layer_to_weight`):
        reuse ``i`` uses parameter set ``weight_map[i]``. The depth cannot change per call.
      share_predicate: ``predicate(path, leaf) -> bool`` choosing the block parameters that
        follow ``weight_map`` (``leaf`` has the per-layer shape); the others get one set per
        layer. ``None`` shares every parameter. SPIN's ConvMixer shares only the pointwise conv.
      affine_groups: ``None`` or the group size ``G`` of SPIN's per-layer affine transform of
        every shared kernel, ``f_i(W) = a_i * W + b_i`` (:func:`wtjax.core.spin.sharing.affine_apply`).
        The first layer using a set sees it as is; each later one has its own transform, stored
        under ``<this>/affine`` with a leading axis of size ``depth - P`` (in layer order),
        initialised to the identity. This reproduces SPIN Table 2's parameter counts.
      fusion: ``None`` or a fusion strategy (:data:`wtjax.core.spin.sharing.FUSIONS`): shared leaves are
        stored per layer and fused per reuse; learnable fusion weights of shared kernels live
        under ``<this>/fusion`` (leading depth axis), initialised so the fusion is the mean.
      dtype: ``None`` (the view keeps the parameters' dtype) or a compute dtype name of
        :mod:`wtjax.core.precision` (``'float32'``, ``'bfloat16'``): the view casts the masked leaves
        to it before multiplying by the masks (0/1, so exact), and the block receives them in it;
        gradients reach the float32 parameters through the cast. ``'float32'`` is ``None``.
    """

    block: nn.Module
    depth: int
    mask_mode: str = "dense"
    mask: MaskSpec = MaskSpec()
    scan: bool = True
    remat_policy: str | None = None
    checkpoint_every: int | str | None = None
    unroll: int = 1
    shared: bool = True
    weight_map: tuple[int, ...] | None = None
    share_predicate: Callable[[tuple[str, ...], Any], bool] | None = None
    affine_groups: int | None = None
    fusion: str | None = None
    dtype: str | None = None

    def __post_init__(self):
        if self.mask_mode not in MASK_MODES:
            raise ValueError(f"unknown mask_mode {self.mask_mode!r}; choose one of {MASK_MODES}")
        precision.layer_dtype(self.dtype)  # validates the name
        if self.depth < 1:
            raise ValueError(f"depth must be >= 1, got {self.depth}")
        if self.weight_map is not None:
            object.__setattr__(self, "weight_map", sharing.validate_map(self.weight_map))
            if len(self.weight_map) != self.depth:
                raise ValueError(f"weight_map has {len(self.weight_map)} entries; depth is {self.depth}")
            if not self.shared:
                raise ValueError("weight_map describes sharing; it cannot be combined with shared=False")
            if self.fusion is not None and self.fusion not in sharing.FUSIONS:
                raise ValueError(f"unknown fusion {self.fusion!r}; choose one of {sharing.FUSIONS}")
        elif self.affine_groups is not None or self.fusion is not None or self.share_predicate is not None:
            raise ValueError("affine_groups, fusion and share_predicate need a weight_map")
        if self.checkpoint_every is not None:
            segment_length(self.checkpoint_every, self.depth)  # validates the value
            if not (self.scan and self.shared):
                raise ValueError("checkpoint_every needs scan=True and shared=True (a tied scan)")
        super().__post_init__()

    # -- SPIN weight maps -----------------------------------------------------------------------

    def _shares(self, path, per_layer_leaf) -> bool:
        return self.share_predicate is None or bool(self.share_predicate(path, per_layer_leaf))

    def _map_shared(self, variables, fn):
        """Apply ``fn`` to every shared leaf of ``variables['params']`` (a map_variables callback)."""
        if self.fusion is not None or not variables.get("params"):
            return variables  # fusion trains the per-layer weights V themselves
        flat = traverse_util.flatten_dict(variables["params"])
        for path, v in flat.items():
            if self._shares(path, _per_layer(v)):
                flat[path] = fn(v)
        return {**variables, "params": traverse_util.unflatten_dict(flat)}

    def _storage_from_layers(self, variables):
        """At init: keep ``P`` of the ``depth`` freshly initialised sets of each shared leaf."""
        return self._map_shared(variables, lambda v: v[: sharing.num_weights(self.weight_map)])

    def _layers_from_storage(self, variables):
        """Right inverse of :meth:`_storage_from_layers`: pad ``P`` sets to ``depth`` (repeat the last)."""
        index = jnp.minimum(jnp.arange(self.depth), sharing.num_weights(self.weight_map) - 1)
        return self._map_shared(variables, lambda v: v[index])

    def _transform_params(self, storage):
        """Create (init) or read ``affine`` and ``fusion`` params, shaped from the block storage."""
        kernels = {
            path: _per_layer(v)
            for path, v in traverse_util.flatten_dict(storage).items()
            if self._shares(path, _per_layer(v)) and default_predicate(path, _per_layer(v))
        }
        extras = {}
        n_affine = self.depth - sharing.num_weights(self.weight_map)
        if self.affine_groups is not None and n_affine > 0:

            def init_affine(_):
                g = self.affine_groups
                return traverse_util.unflatten_dict(
                    {p: sharing.affine_init(v.shape[-1], g, n_affine) for p, v in kernels.items()}
                )

            extras["affine"] = self.param("affine", init_affine)
        if self.fusion in sharing.LEARNABLE_FUSIONS:

            def init_fusion(_):
                return traverse_util.unflatten_dict(
                    {p: sharing.fusion_init(self.fusion, self.depth, v.shape[-1]) for p, v in kernels.items()}
                )

            extras["fusion"] = self.param("fusion", init_fusion)
        return extras

    def _select(self, params, reuse_index, extras):
        """The parameters of reuse ``reuse_index``: gather (or fuse) its set, then transform it."""
        flat = traverse_util.flatten_dict(params)
        affine = traverse_util.flatten_dict(extras.get("affine", {}), is_leaf=_is_affine_leaf)
        alphas = traverse_util.flatten_dict(extras.get("fusion", {}))
        slot = jnp.asarray(self.weight_map)[reuse_index]
        for path, v in flat.items():
            if not self._shares(path, _per_layer(v)):
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

    def _init_storage(self, block, z, args):
        """Create the stacked block parameters: ``depth`` independent inits, ``P`` kept if shared."""

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

    def _view(self, variables, reuse_index, dropout_rng, extras=None):
        """What one reuse sees of ``{'params': shared params}``: masked according to the mode."""
        if self.weight_map is not None and variables.get("params"):
            variables = {**variables, "params": self._select(variables["params"], reuse_index, extras or {})}
        params = variables.get("params")
        if self.mask_mode == "dense" or not params:
            return variables
        if self.mask_mode == "stored":
            masked = _apply_stored_masks(
                params, variables.get("masks"), reuse_index, precision.layer_dtype(self.dtype)
            )
        else:
            masked = self._masked(params, reuse_index, dropout_rng)
        return {**variables, "params": masked}

    def _masked(self, params, reuse_index, dropout_rng):
        dtype = precision.layer_dtype(self.dtype)
        if self.mask_mode == "dropout":
            if dropout_rng is None:
                return params
            return _dropout_weights(params, self.mask, 1.0 - self.mask.density, dropout_rng, dtype)
        index = 0 if self.mask_mode == "same" else reuse_index
        # Masks hash the path of the shared weight ("<tied>/block/..."), the same in every mode.
        return apply_masks(params, self.mask, index, scope=self.path + ("block",), dtype=dtype)

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
        if self.weight_map is not None and depth != self.depth:
            raise ValueError(f"a weight map describes {self.depth} layers; it cannot run {depth}")
        use_dropout = self.mask_mode == "dropout" and not deterministic
        # Adopt the block under this module's scope, wherever the caller built it (a block built
        # inside the parent's compact method would otherwise bind to the parent). A block built
        # outside any module (e.g. Tied used as the top-level module) is already adopted by Flax
        # as this module's `block` field: use it as is (a clone would clash with its name).
        own = None
        if self.shared or self.scan:
            own = self.block if self.block.parent is self else self.block.clone(parent=self, name="block")
        shared_block = own if self.shared else None
        extras = {}
        if self.weight_map is not None:
            if self.is_initializing():
                self._init_storage(shared_block, z, broadcast_args)
            extras = self._transform_params(self.variables["params"]["block"])

        def step(block, z, reuse_index, *args):
            if block.is_initializing() and self.weight_map is None:
                # Parameters are created unmasked (and nn.scan forbids broadcast variables that
                # depend on the scan body, which a masked view at init would be).
                z = block(z, *args)
            else:
                rng = block.make_rng("dropout") if use_dropout else None
                view = functools.partial(self._view, reuse_index=reuse_index, dropout_rng=rng, extras=extras)
                masked = nn.map_variables(lambda mdl, *a: mdl(*a), ("params", "masks"), trans_in_fn=view)
                z = masked(block, z, *args)
            return z, (z if return_intermediates else None)

        policy_name = self.remat_policy
        if self.checkpoint_every is not None and policy_name is None:
            policy_name = "nothing_saveable"  # a recomputed segment must not store every reuse
        policy = _remat_policy(policy_name)
        if policy is not None:
            step = nn.remat(step, policy=policy, prevent_cse=not self.scan)

        if self.scan and self.checkpoint_every is not None and not self.is_initializing():
            z, zs = _checkpointed_scan(
                step, own, z, depth, segment_length(self.checkpoint_every, depth), broadcast_args
            )
        elif self.scan:
            axes = _TIED_SCAN if self.shared else _NOT_TIED_SCAN
            z, zs = _scan_reuses(step, own, z, 0, depth, broadcast_args, unroll=self.unroll, axes=axes)
        else:
            if self.shared:
                blocks = [shared_block] * depth
            else:
                blocks = [self.block.clone(parent=self, name=f"block_{i}") for i in range(depth)]
            outs = []
            for i, block in enumerate(blocks):
                z, out = step(block, z, jnp.asarray(i), *broadcast_args)
                outs.append(out)
            zs = jnp.stack(outs) if return_intermediates else None
        return (z, zs) if return_intermediates else z


def segment_length(checkpoint_every: int | str, depth: int) -> int:
    """Reuses per checkpointed segment: ``checkpoint_every``, or ``round(sqrt(depth))`` for ``'sqrt'``."""
    if checkpoint_every == "sqrt":
        return max(1, round(depth**0.5))
    if isinstance(checkpoint_every, bool) or not isinstance(checkpoint_every, int) or checkpoint_every < 1:
        raise ValueError(f"checkpoint_every must be None, 'sqrt' or an int >= 1, got {checkpoint_every!r}")
    return checkpoint_every


# Tied: one parameter set broadcast to every reuse. Not tied: one set per reuse, stacked on axis 0.
_TIED_SCAN = dict(variable_broadcast=("params", "masks"), split_rngs={"params": False, "dropout": True})
_NOT_TIED_SCAN = dict(variable_axes={"params": 0}, split_rngs={"params": True, "dropout": True})


def _scan_reuses(step, block, z, first, length, args, unroll=1, axes=_TIED_SCAN):
    """Reuses ``first .. first + length - 1`` of ``step`` as one ``nn.scan`` (``args`` broadcast)."""
    in_axes = (0,) + (nn.broadcast,) * len(args)
    scanned = nn.scan(step, in_axes=in_axes, length=length, unroll=unroll, **axes)
    return scanned(block, z, first + jnp.arange(length), *args)


def _checkpointed_scan(step, block, z, depth, segment, args):
    """``depth`` reuses as an outer scan over rematerialised segments of ``segment`` reuses.

    Only the carry entering each segment is saved for the backward pass; the segment (an inner
    scan) is recomputed from it. A last, shorter segment takes the remainder ``depth % segment``.
    """

    def run_segment(block, z, first, *args):
        return _scan_reuses(step, block, z, first, segment, args)

    num_full, rest = divmod(depth, segment)
    outer = nn.scan(
        nn.remat(run_segment, prevent_cse=False),
        in_axes=(0,) + (nn.broadcast,) * len(args),
        length=num_full,
        **_TIED_SCAN,
    )
    z, zs = outer(block, z, jnp.arange(num_full) * segment, *args)
    if zs is not None:
        zs = zs.reshape((num_full * segment,) + zs.shape[2:])
    if rest:

        def run_rest(block, z, *args):
            return _scan_reuses(step, block, z, num_full * segment, rest, args)

        z, zs_rest = nn.remat(run_rest, prevent_cse=False)(block, z, *args)
        zs = None if zs is None else jnp.concatenate([zs, zs_rest])
    return z, zs


def _per_layer(v):
    """The abstract per-layer leaf of a stacked leaf (what predicates of a single layer see)."""
    return jax.ShapeDtypeStruct(v.shape[1:], v.dtype)


def _is_affine_leaf(_, x) -> bool:
    return isinstance(x, dict) and set(x) == {"scale", "bias"}


def fold_fusion(tied_params, weight_map, fusion: str, share_predicate=None):
    """Constant-fold a fusion-trained :class:`Tied` parameter tree into a plain shared one.

    Args:
      tied_params: the ``params`` subtree of a ``Tied(weight_map=..., fusion=fusion)``:
        ``block`` (shared leaves per layer, ``(depth, ...)``), optional ``fusion`` and ``affine``.
      weight_map, fusion, share_predicate: the fields of that ``Tied``.

    Returns:
      The ``params`` subtree of the same ``Tied`` with ``fusion=None``: each shared leaf replaced
      by the ``P`` fused weights ``F_w(V)`` (``(P, ...)``), ``fusion`` dropped, ``affine`` kept.
      Both trees compute the same function.
    """
    weight_map = sharing.validate_map(weight_map)
    share = share_predicate or (lambda p, v: True)
    alphas = traverse_util.flatten_dict(tied_params.get("fusion", {}))
    flat = traverse_util.flatten_dict(tied_params["block"])
    for path, v in flat.items():
        if share(path, _per_layer(v)):
            flat[path] = sharing.fuse(v, weight_map, fusion, alphas.get(path)).astype(v.dtype)
    out = {k: v for k, v in tied_params.items() if k not in ("block", "fusion")}
    out["block"] = traverse_util.unflatten_dict(flat)
    return out
