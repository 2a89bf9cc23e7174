"""The weight-tied block: one Linen block applied ``depth`` times with one set of parameters.

The tie owns the loop: ``nn.scan``, a checkpointed (segmented) scan or a Python loop, over one
parameter set (tied) or ``depth`` sets (not tied). What each reuse sees of the parameters is a
*view*, a pluggable piece next to it: the mask views (:mod:`wtjax.core.views`) and the SPIN
parameter view (:class:`wtjax.core.spin.view.SpinView`, from ``weight_map`` and its fields).

Variable collections (decided once, here):

* ``params`` is **tied**: broadcast to every reuse (``nn.scan(variable_broadcast='params',
  split_rngs={'params': False})``), so the parameter count is independent of the depth and the
  shared weight's gradient is the sum of the per-reuse gradients.
* masks are **per reuse** and **never stored** (except ``mask_mode='stored'``, the ``masks``
  collection): each reuse sees the parameters through a view that multiplies the selected
  kernels by a mask made inside the scan step from ``fold_in(fold_in(seed, path), reuse_index)``.
  ``path`` is the tie's explicit ``mask_scope``, ``'block'`` and the leaf's path in the block
  (:func:`wtjax.core.masks.tie_mask_path`), *not* the module path: a trained tie keeps its masks,
  hence its function, when it is renamed, nested in another module or wrapped (``nnx.bridge``).
  Several masked ties in one model need distinct scopes (or seeds):
  :func:`wtjax.core.mask_sites.mask_sites` finds a clash.
* the carried state ``z`` is the only thing passed from one reuse to the next; extra positional
  arguments (e.g. an input injection ``x``) are broadcast to every reuse.
* ``dropout`` RNGs are split per reuse. Collections that would need per-reuse *statistics*
  (BatchNorm's ``batch_stats``) are not supported inside the tie (google/flax#2052; one set of
  statistics cannot describe every reuse, and the paper's models normalise with GroupNorm or
  LayerNorm): a block using any collection but ``params`` (and ``sow``'s ``intermediates``) is
  a ValueError naming it, in the scan and the Python loop alike. Use GroupNorm/LayerNorm in the
  block, or BatchNorm outside the tie.
* the block must return a state of the input's structure, shapes and dtypes (a ValueError
  naming both otherwise), and ``depth`` is a static Python int >= 1, at construction and per call.

SPIN parameter sharing (``weight_map``): the shared ``block`` parameters are stored as
``P = max(weight_map) + 1`` sets, and reuse ``i`` sees set ``weight_map[i]`` through the same
per-reuse view that applies the masks (gather, then optional per-layer affine transform, then
mask); see :mod:`wtjax.core.spin.view`.

This module imports only jax and flax.
"""

from __future__ import annotations

import contextlib
import functools
import operator
import re
from collections.abc import Callable
from typing import Any

import flax.errors
import flax.linen as nn
import jax
import jax.numpy as jnp

from wtjax.core.masks import MaskSpec, tie_mask_path
from wtjax.core.spin.view import SpinView
from wtjax.core.views import MaskView


def checkpoint_policy(name: str | None):
    """The ``jax.checkpoint_policies`` entry called ``name`` (``None``: no rematerialisation)."""
    if name is None:
        return None
    policy = getattr(jax.checkpoint_policies, name, None)
    if policy is None:
        names = sorted(n for n in dir(jax.checkpoint_policies) if not n.startswith("_"))
        raise ValueError(f"unknown remat policy {name!r}; choose one of {names}")
    return policy


class Tied(nn.Module):
    """Apply ``block`` ``depth`` times with one set of (optionally masked) parameters.

    ``block(z, *broadcast_args) -> z`` must map the carried state to a state of the same shape
    and dtype (checked when the block is traced). Example::

        class MyNet(nn.Module):
            @nn.compact
            def __call__(self, x):
                x = nn.Dense(64)(x)
                tie = Tied(MyBlock(64), depth=8, mask_mode="multi", mask=MaskSpec(density=0.5),
                           mask_scope="tie")
                x = tie(x)
                return nn.Dense(10)(x)

    ``tie(z, ...)`` returns the final state; ``tie.trajectory(z, ...)`` returns ``(z_K, zs)`` with
    the state after every reuse (e.g. for representation analyses). ``init``/``init_with_output``
    return what ``apply`` returns with the parameters they made (in ``same``/``multi`` modes the
    masked pass runs after the unmasked one that creates the parameters; ``stored`` masks do not
    exist yet at init and ``dropout`` draws none there: both run unmasked).

    Attributes:
      block: the Linen module to reuse (its parameters live under ``<this>/block``).
      depth: number of reuses K at training time, an int >= 1 (override per call with ``depth=``).
      mask_mode: ``dense``, ``same``, ``multi``, ``dropout`` or ``stored`` (:mod:`wtjax.core.views`).
      mask: which parameters are masked and how (:class:`wtjax.core.masks.MaskSpec`).
      mask_scope: the mask identity of this tie, ``None`` or an ``'a/b'`` string: generated masks
        hash ``(*mask_scope.split('/'), 'block', *leaf_path)`` (``('block', *leaf_path)`` for
        ``None``), never the module path, so renaming or nesting the tie keeps its masks. Give
        each masked tie of a model its own scope (the model families pass the tie's name);
        two ties with one scope and seed draw the same masks (:func:`wtjax.core.mask_sites.mask_sites`
        reports it).
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
      unroll: ``lax.scan`` unroll factor (scan mode only); ``True`` unrolls every reuse into one
        loop-free program (compile time grows with the depth); ``None``: :func:`default_unroll`
        for the depth being run (the model families' default).
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
    mask_scope: str | None = None
    scan: bool = True
    remat_policy: str | None = None
    checkpoint_every: int | str | None = None
    unroll: int | bool | None = 1
    shared: bool = True
    weight_map: tuple[int, ...] | None = None
    share_predicate: Callable[[tuple[str, ...], Any], bool] | None = None
    affine_groups: int | None = None
    fusion: str | None = None
    dtype: str | None = None

    def __post_init__(self):
        self._mask_view()  # validates mask_mode and dtype
        tie_mask_path(self.mask_scope)  # validates the scope
        check_depth(self.depth, "at construction")
        if self.weight_map is not None:
            object.__setattr__(self, "weight_map", self._spin_view().weight_map)  # canonical tuple
            if len(self.weight_map) != self.depth:
                raise ValueError(f"weight_map has {len(self.weight_map)} entries; depth is {self.depth}")
            if not self.shared:
                raise ValueError("weight_map describes sharing; it cannot be combined with shared=False")
        elif self.affine_groups is not None or self.fusion is not None or self.share_predicate is not None:
            raise ValueError("affine_groups, fusion and share_predicate need a weight_map")
        if self.checkpoint_every is not None:
            segment_length(self.checkpoint_every, self.depth)  # validates the value
            if not (self.scan and self.shared):
                raise ValueError("checkpoint_every needs scan=True and shared=True (a tied scan)")
        super().__post_init__()

    def _mask_view(self) -> MaskView:
        return MaskView(self.mask_mode, self.mask, self.dtype)

    def _spin_view(self) -> SpinView | None:
        if self.weight_map is None:
            return None
        return SpinView(self.weight_map, self.share_predicate, self.affine_groups, self.fusion)

    def __call__(self, z, *broadcast_args, depth: int | None = None, deterministic: bool = True):
        """Run the tie and return the final state ``z_K``.

        Args:
          z: the initial carried state.
          *broadcast_args: passed unchanged to every reuse (e.g. the input injection).
          depth: reuses to run now, a static int >= 1 (default ``self.depth``); any depth works at
            evaluation time, masks for every reuse index follow from the seed.
          deterministic: disables the ``dropout`` mask mode (evaluation).
        """
        return self._reuse(z, broadcast_args, depth, deterministic, keep_states=False)[0]

    def trajectory(self, z, *broadcast_args, depth: int | None = None, deterministic: bool = True):
        """Run the tie and return ``(z_K, zs)``, ``zs[i]`` the state after reuse ``i`` (axis 0).

        Same arguments and parameters as :meth:`__call__` (a second method rather than a flag, so
        each method always returns one structure; the per-reuse states are only kept when asked
        for). From outside a module: ``tie.apply(variables, z, method='trajectory')``.
        """
        return self._reuse(z, broadcast_args, depth, deterministic, keep_states=True)

    @nn.compact
    def _reuse(self, z, args, depth, deterministic, keep_states):
        depth = self.depth if depth is None else check_depth(depth, "at call time")
        if not self.shared and depth != self.depth:
            raise ValueError(f"a not-tied stack has {self.depth} layers; it cannot run {depth}")
        if self.weight_map is not None and depth != self.depth:
            raise ValueError(f"a weight map describes {self.depth} layers; it cannot run {depth}")
        # Adopt the block under this module's scope, wherever the caller built it (a block built
        # inside the parent's compact method would otherwise bind to the parent). A block built
        # outside any module (e.g. Tied used as the top-level module) is already adopted by Flax
        # as this module's `block` field: use it as is (a clone would clash with its name).
        own = None
        if self.shared or self.scan:
            own = self.block if self.block.parent is self else self.block.clone(parent=self, name="block")
        extras = {}
        spin = self._spin_view()
        if spin is not None:
            if self.is_initializing():
                with self._no_state(own):
                    spin.init_storage(own, z, args)
            extras = spin.transform_params(self, self.variables["params"]["block"])
        use_dropout = self.mask_mode == "dropout" and not deterministic
        blocks = None  # the Python loop's blocks: the one shared block, or one per layer
        if not self.scan:
            blocks = [own] * depth if self.shared else self._unrolled_blocks(depth)
        run = functools.partial(
            self._run, own=own, blocks=blocks, z=z, depth=depth, args=args, keep=keep_states
        )
        out = run(self._step(extras, use_dropout, keep_states, create=True))
        if self.is_initializing() and self.weight_map is None and self.mask_mode in ("same", "multi"):
            # The parameters were just created by an unmasked pass (nn.scan forbids broadcast
            # variables that depend on the scan body). Run once more through the masks, reading
            # them, so that init returns what apply returns with the parameters it made.
            out = run(self._step(extras, use_dropout, keep_states, create=False))
        return out

    def _unrolled_blocks(self, depth: int) -> list:
        """The ``depth`` separate submodules ``block_0 .. block_{K-1}`` of a not-tied Python loop."""
        return [self.block.clone(parent=self, name=f"block_{i}") for i in range(depth)]

    def _run(self, step, *, own, blocks, z, depth, args, keep):
        """``depth`` reuses of ``step``: the (checkpointed) scan over ``own`` or the loop over ``blocks``."""
        if self.scan and self.checkpoint_every is not None and not self.is_initializing():
            segment = segment_length(self.checkpoint_every, depth)
            return _checkpointed_scan(step, own, z, depth, segment, args)
        if self.scan:
            axes = _TIED_SCAN if self.shared else _NOT_TIED_SCAN
            unroll = default_unroll(depth) if self.unroll is None else self.unroll
            return _scan_reuses(step, own, z, 0, depth, args, unroll=unroll, axes=axes)
        states = []
        for i, block in enumerate(blocks):
            z, state = step(block, z, jnp.asarray(i), *args)
            states.append(state)
        return z, (jnp.stack(states) if keep else None)

    def _step(self, extras, use_dropout: bool, keep_states: bool, create: bool = True):
        """One reuse ``(block, z, reuse_index, *args) -> (z, z or None)``, rematerialised if asked.

        ``create``: at init, run the block unmasked (the pass that creates its parameters);
        ``False`` always runs it through the view (init's second pass, reading them).
        """

        def step(block, z, reuse_index, *args):
            z_in = z
            with self._no_state(block):
                if create and block.is_initializing() and self.weight_map is None:
                    # Parameters are created unmasked (and nn.scan forbids broadcast variables that
                    # depend on the scan body, which a masked view at init would be).
                    z = block(z, *args)
                else:
                    rng = block.make_rng("dropout") if use_dropout else None
                    view = functools.partial(
                        self._view, reuse_index=reuse_index, dropout_rng=rng, extras=extras
                    )
                    masked = nn.map_variables(lambda mdl, *a: mdl(*a), ("params", "masks"), trans_in_fn=view)
                    z = masked(block, z, *args)
            stateful = sorted(set(block.variables) - set(_BLOCK_COLLECTIONS))
            if stateful:  # the Python loop would share one set of statistics across reuses
                raise self._state_error(block, stateful[0])
            self._check_carry(block, z_in, z)
            return z, (z if keep_states else None)

        policy_name = self.remat_policy
        if self.checkpoint_every is not None and policy_name is None:
            policy_name = "nothing_saveable"  # a recomputed segment must not store every reuse
        policy = checkpoint_policy(policy_name)
        if policy is not None:
            step = nn.remat(step, policy=policy, prevent_cse=not self.scan)
        return step

    def _describe(self, block) -> str:
        return f"the block {type(block).__name__} of Tied {'/'.join(self.path) or '(top level)'}"

    @contextlib.contextmanager
    def _no_state(self, block):
        """Turns Flax's error for a collection the lifted transforms do not carry into ours."""
        try:
            yield
        except flax.errors.ScopeCollectionNotFound as e:
            collection = _missing_collection(e)
            if collection is None:  # e.g. apply(params) instead of apply({'params': params})
                raise
            raise self._state_error(block, collection) from None

    def _state_error(self, block, collection: str) -> ValueError:
        return ValueError(
            f"{self._describe(block)} keeps state in the variable collection {collection!r}"
            f"{' (BatchNorm)' if collection == 'batch_stats' else ''}, which a tie does not carry across "
            "reuses: use GroupNorm or LayerNorm inside the block (as the model families do), or apply "
            "BatchNorm outside the tie"
        )

    def _check_carry(self, block, z_in, z_out) -> None:
        """The block must map the carried state to one of the same structure, shapes and dtypes."""
        if _signature(z_in) != _signature(z_out):
            raise ValueError(
                f"{self._describe(block)} must return the carried state with its shape and dtype: "
                f"input {_describe_state(z_in)} -> output {_describe_state(z_out)}"
            )

    def _view(self, variables, reuse_index, dropout_rng, extras):
        """What one reuse sees of ``{'params': block params, 'masks': ...}``: its set, then masked."""
        params = variables.get("params")
        if not params:
            return variables
        spin = self._spin_view()
        if spin is not None:
            params = spin.select(params, reuse_index, extras)
        # Generated masks hash the explicit mask identity ("<mask_scope>/block/..."), not self.path.
        scope = tie_mask_path(self.mask_scope)
        masked = self._mask_view()(params, variables.get("masks"), reuse_index, dropout_rng, scope)
        return {**variables, "params": masked}


#: The variable collections a tied block may use: its parameters, the tie's stored masks, and
#: ``sow``'s intermediates (a no-op inside a scan). Anything else is per-reuse state (BatchNorm's
#: ``batch_stats``) that one tie cannot carry.
_BLOCK_COLLECTIONS = ("params", "masks", "intermediates")


def check_depth(depth, when: str) -> int:
    """``depth`` as an int if it is a static number of reuses >= 1, else a one-line ValueError."""
    try:
        value = operator.index(depth) if not isinstance(depth, bool) else None
    except (TypeError, jax.errors.ConcretizationTypeError):
        value = None
    if value is None or value < 1:
        raise ValueError(
            f"Tied depth={depth!r} {when}: a tie needs a static int depth >= 1 (a Python int, not a "
            "traced value: the number of reuses is fixed in the compiled program)"
        )
    return value


def _missing_collection(error: Exception) -> str | None:
    """The collection a ``ScopeCollectionNotFound`` names, unless it is one a tie carries."""
    found = re.search(r'from collection "([^"]+)"', str(error))
    collection = found.group(1) if found else None
    return None if collection in ("params", "masks") else collection


def _signature(tree):
    return jax.tree.structure(tree), [(jnp.shape(a), jnp.result_type(a)) for a in jax.tree.leaves(tree)]


def _describe_state(tree) -> str:
    leaves = [f"{jnp.result_type(a)}{list(jnp.shape(a))}" for a in jax.tree.leaves(tree)]
    return leaves[0] if len(leaves) == 1 and not isinstance(tree, (tuple, list, dict)) else str(leaves)


def default_unroll(depth: int, backend: str | None = None) -> int | bool:
    """The scan unroll the model families use when none is given: the tie fully unrolled on CPU
    up to :data:`CPU_UNROLL_MAX_DEPTH` reuses, an ordinary scan (``1``) otherwise.

    Why: XLA:CPU zero-fills the stacked per-reuse residual buffers of a scan's backward pass and
    copies every reuse's residuals in and out of them; in a profiled ResNet-like training step
    (C=32, K=4, batch 128) that was ~20% of the step, and the fully unrolled step ran 0.80-0.87x
    the scanned one at the same compile time (experiments/benchmarks/README.md). Deeper ties
    compile more slowly unrolled (K=16: ~1.6x). GPU and TPU keep the scan, which their compilers
    handle in place. ``backend``: the platform compiled for (default ``jax.default_backend()``);
    a program compiled ahead of time for an accelerator on a CPU host must pass it.
    """
    backend = jax.default_backend() if backend is None else backend
    return True if backend == "cpu" and depth <= CPU_UNROLL_MAX_DEPTH else 1


CPU_UNROLL_MAX_DEPTH = 8


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
