"""Static sparse masks generated on the fly from seeds (never stored).

Every mask is a pure function of ``(seed, reuse index, hashed path)``::

    key = fold_in(fold_in(PRNGKey(seed), path_id(path)), reuse_index)

so masks are identical across calls, processes, restarts and devices, and independent of the
order in which layers were built (CapaBoost's shared NumPy RNG is not). For a tie the hashed path
is :func:`tie_mask_path` of its explicit ``mask_scope`` followed by the leaf's path inside the block
(e.g. ``('tied', 'block', 'dense', 'kernel')``), never the module path: renaming, nesting or
wrapping a trained tie (a Linen parent, ``nnx.bridge``, the NNX front end) keeps its masks. Two kinds:

* ``unstructured``: exactly ``round(density * n)`` kept entries per tensor and reuse (the
  paper's "equal per layer"), positions uniform without replacement; at least one, so a small
  kernel at a low density (``0.1 * 4`` rounds to 0) is never zeroed entirely.
* ``nm``: N:M (default 2:4): in every group of M consecutive entries along the kernel's
  input/reduction axis (axis -2 of a Flax ``(in, out)`` Dense or ``HWIO`` Conv kernel, the layout
  sparse tensor cores use) exactly N are kept. Its density is ``n / m``: a :class:`MaskSpec`
  whose ``density`` says otherwise is an error, not silently overridden.

This module imports only jax, flax and numpy.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import numbers
import zlib
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

MASK_KINDS = ("unstructured", "nm")
Path = tuple[str, ...]


def path_id(path: Sequence[str]) -> int:
    """A stable 31-bit id of a parameter path (CRC32 of ``'a/b/c'``), independent of Python's hash seed."""
    return zlib.crc32("/".join(path).encode()) & 0x7FFFFFFF


def tie_mask_path(mask_scope: str | None) -> Path:
    """The prefix a tie hashes before each block leaf's path: ``(*mask_scope.split('/'), 'block')``.

    ``None`` gives ``('block',)`` (what a top-level tie hashed when masks followed the module
    path, so such ties keep their masks). A model family passes its tie's name as the scope, which
    keeps the masks of the models the training job built (the family is the top-level module).
    """
    if mask_scope is None:
        return ("block",)
    if not isinstance(mask_scope, str) or not all(mask_scope.split("/")):
        raise ValueError(
            f"mask_scope must be None or a non-empty 'a/b' string without empty parts, got {mask_scope!r}"
        )
    return (*mask_scope.split("/"), "block")


def mask_key(seed: int, reuse_index: int | jax.Array, path: Sequence[str]) -> jax.Array:
    """The PRNG key of the mask of ``path`` at ``reuse_index``: fold_in(fold_in(seed, path), reuse)."""
    key = jax.random.fold_in(jax.random.PRNGKey(seed), path_id(path))
    return jax.random.fold_in(key, reuse_index)


def kept_count(size: int, density: float) -> int:
    """Number of kept entries of an unstructured mask: ``round(density * size)``, at least one.

    At least one: a small kernel at a low density (``round(0.1 * 4) == 0``) would otherwise be
    zeroed entirely, a layer that neither computes nor learns. Every mask that keeps an entry at
    ``round(density * size)`` is unchanged by this rule.
    """
    return min(size, max(1, int(round(density * size))))


def unstructured_mask(key: jax.Array, shape: Sequence[int], density: float) -> jax.Array:
    """A boolean mask with exactly :func:`kept_count` ``(prod(shape), density)`` True entries.

    The kept entries are the top-k of i.i.d. uniform scores: exact density, uniform over all
    subsets of that size. (``lax.top_k`` measured ~5x cheaper than a full random permutation for
    a 3x3x64x64 kernel on CPU, which matters because masks are regenerated every step.)
    """
    n = int(np.prod(shape))
    k = kept_count(n, density)
    if k == n:
        return jnp.ones(shape, bool)
    _, kept = jax.lax.top_k(jax.random.uniform(key, (n,)), k)
    return jnp.zeros(n, bool).at[kept].set(True).reshape(shape)


def _nm_patterns(n: int, m: int) -> np.ndarray:
    """All ``C(m, n)`` boolean patterns of ``m`` entries with ``n`` True, shape ``(C(m, n), m)``."""
    patterns = np.zeros((len(list(itertools.combinations(range(m), n))), m), bool)
    for row, kept in enumerate(itertools.combinations(range(m), n)):
        patterns[row, list(kept)] = True
    return patterns


def nm_mask(key: jax.Array, shape: Sequence[int], n: int = 2, m: int = 4, axis: int = -2) -> jax.Array:
    """A boolean N:M mask: exactly ``n`` of every ``m`` consecutive entries along ``axis`` kept.

    Each group draws one of the ``C(m, n)`` patterns uniformly (a table lookup: ~20x cheaper than
    ranking random scores).
    """
    shape = tuple(shape)
    axis = axis % len(shape)
    if not 0 < n <= m:
        raise ValueError(f"N:M sparsity needs 0 < N <= M, got {n}:{m}")
    if shape[axis] % m:
        raise ValueError(
            f"N:M ({n}:{m}) masks group {m} entries along axis {axis}, but that axis of a kernel of "
            f"shape {shape} has size {shape[axis]}, not a multiple of {m}. Exclude this parameter "
            "with the mask predicate or use mask kind 'unstructured'."
        )
    groups = shape[:axis] + shape[axis + 1 :] + (shape[axis] // m,)
    patterns = _nm_patterns(n, m)
    choice = jax.random.randint(key, groups, 0, len(patterns))
    keep = jnp.asarray(patterns)[choice].reshape(groups[:-1] + (shape[axis],))
    return jnp.moveaxis(keep, -1, axis)


@dataclasses.dataclass(frozen=True)
class MaskSpec:
    """What to mask and how.

    Attributes:
      kind: ``'unstructured'`` or ``'nm'``.
      density: fraction kept, in ``(0, 1]``; for ``nm`` it must equal ``n / m`` (checked here, so
        a config asking for one density never silently runs another).
      n, m: the N:M pattern, ints with ``0 < n <= m`` (``nm`` only).
      seed: the mask seed (an int); masks are a pure function of (seed, reuse, path).
      predicate: ``predicate(path, leaf) -> bool`` selects the masked parameters. The default
        masks conv and dense kernels (leaves named ``kernel`` with ndim >= 2), never biases or
        normalisation parameters.
    """

    kind: str = "unstructured"
    density: float = 0.5
    n: int = 2
    m: int = 4
    seed: int = 0
    predicate: Callable[[Path, jax.Array], bool] | None = None

    def __post_init__(self):
        if self.kind not in MASK_KINDS:
            raise ValueError(f"unknown mask kind {self.kind!r}; choose one of {MASK_KINDS}")
        if not _is_real(self.density) or not 0.0 < self.density <= 1.0:
            raise ValueError(f"mask density must be a number in (0, 1], got {self.density!r}")
        for name in ("n", "m", "seed"):
            if not _is_int(getattr(self, name)):
                raise ValueError(f"mask {name} must be an int, got {getattr(self, name)!r}")
        if self.kind == "nm":
            self._check_nm()

    def _check_nm(self):
        n, m = self.n, self.m
        if not 0 < n <= m:
            raise ValueError(f"N:M sparsity needs 0 < n <= m, got MaskSpec(kind='nm', n={n}, m={m})")
        if not math.isclose(self.density, n / m, rel_tol=1e-6):
            raise ValueError(
                f"MaskSpec(kind='nm', n={n}, m={m}) keeps n/m = {n / m:g} of each kernel but density="
                f"{self.density:g}: set density={n / m:g} (or choose kind='unstructured')"
            )

    @property
    def effective_density(self) -> float:
        return self.n / self.m if self.kind == "nm" else self.density

    def selects(self, path: Path, leaf) -> bool:
        pred = self.predicate or default_predicate
        return bool(pred(path, leaf))

    def make(self, key: jax.Array, shape: Sequence[int]) -> jax.Array:
        if self.kind == "nm":
            return nm_mask(key, shape, self.n, self.m)
        return unstructured_mask(key, shape, self.density)


def _is_real(x) -> bool:
    return isinstance(x, numbers.Real) and not isinstance(x, (bool, np.bool_))


def _is_int(x) -> bool:
    return isinstance(x, numbers.Integral) and not isinstance(x, (bool, np.bool_))


def default_predicate(path: Path, leaf) -> bool:
    """Mask conv and dense kernels only (leaf named ``kernel`` with at least 2 dims)."""
    return path[-1] == "kernel" and np.ndim(leaf) >= 2


def masks_for(params, spec: MaskSpec, reuse_index, scope: Path = ()) -> dict:
    """The flat ``{path: bool mask}`` dict for the selected leaves of ``params`` at one reuse.

    ``scope`` is prepended to each leaf's path before hashing, so two tied blocks in one model
    (e.g. one per ResNet stage) get different masks from the same seed.
    """
    flat = traverse_util.flatten_dict(params)
    return {
        p: spec.make(mask_key(spec.seed, reuse_index, scope + p), jnp.shape(v))
        for p, v in flat.items()
        if spec.selects(p, v)
    }


def apply_masks(params, spec: MaskSpec, reuse_index, scope: Path = (), dtype=None):
    """``params`` with every selected leaf multiplied by its mask at ``reuse_index``.

    Multiplying in the forward pass is all that is needed: autodiff then gives the shared
    weight the sum over reuses of the masked gradients. ``dtype`` (e.g. ``jnp.bfloat16``), if
    given, is the compute dtype: each selected leaf is cast to it first, so the product (exact:
    masks are 0/1) and the layer using it run in it; the gradient reaches the stored leaf in its
    own dtype through the cast.
    """
    if not params:
        return params
    flat = traverse_util.flatten_dict(params)
    for p, mask in masks_for(params, spec, reuse_index, scope).items():
        leaf = flat[p] if dtype is None else flat[p].astype(dtype)
        flat[p] = leaf * mask.astype(leaf.dtype)
    return traverse_util.unflatten_dict(flat)
