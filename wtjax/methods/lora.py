"""LoRA and multi-mask LoRA as a params-level transform of any frozen Flax model.

For a targeted kernel ``W0``, viewed as a matrix ``(d_in, d_out)`` (Flax computes ``x @ W``)::

    LoRA:              W = W0 + (alpha / r) * A B
    multi-mask LoRA:   W = W0 + (alpha / r) * sum_{i=0}^{d-1} (m_{i,A} * A) (m_{i,B} * B)

with trainable ``A: (d_in, r)`` (down-projection) and ``B: (r, d_out)`` (up-projection, zero at
init, so training starts from the pretrained function). This is the paper's section 5.4 formula
``W = W_pre + sum_i (m_{i,1} . B)(m_{i,2} . A)`` written in Flax's ``(in, out)`` layout, i.e.
transposed: our ``A`` is the paper's ``A^T`` and our ``B`` its ``B^T``. The masks are binary,
static and never stored: ``m_{i,X} = MaskSpec.make(mask_key(seed, i, path + ('lora_X',)))``, the
same fold_in machinery as the tied block (:mod:`wtjax.core.masks`), so they are deterministic,
distinct for each reuse ``i``, for A and B, and for every layer. Both variants have exactly
``r * (d_in + d_out)`` trainable parameters per kernel; a depth-``d`` multi-mask update can
reach rank ``min(d * r, d_in, d_out)`` instead of ``r``.

Kernels of any rank are handled by a reshape to 2-D: the leading ``n_in`` axes are the input
(:func:`input_ndim`): a Dense ``(in, out)`` and an attention ``query/key/value`` DenseGeneral
``(D, heads, head_dim)`` have ``n_in = 1``; the attention ``out`` DenseGeneral ``(heads,
head_dim, D)`` has 2; a conv ``HWIO`` kernel has 3 (a rank-r conv followed by a 1x1 conv).

The API is functional and works on any Linen model's ``params``::

    spec = LoraSpec(kind='multi_mask', rank=8, depth=2)
    lora = init_lora(key, base_params, spec)                         # trainable
    logits, _ = model.apply({'params': lora_view(base_params, lora, spec)}, images)
    merged = merge(base_params, lora, spec)                           # plain params, for inference

:class:`LoraFinetune` (in :mod:`wtjax.methods.lora_finetune`) packages this for a training loop (frozen
base, optax masking, checkpointing only the trainable leaves). This module imports only jax,
flax and numpy.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import re
from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from wtjax.core.masks import MaskSpec, mask_key

LORA_KINDS = ("lora", "multi_mask")
LORA_A, LORA_B = "lora_a", "lora_b"
Path = tuple[str, ...]

#: Query and value projections of the public ViT layout (:mod:`wtjax.models.vit`): rank 8 on
#: ViT-B/16 gives 12 * 2 * 8 * (768 + 768) = 294,912 parameters, Table 3's "0.29M".
VIT_QV_TARGETS = r"MultiHeadDotProductAttention_1/(query|value)/kernel$"


@dataclasses.dataclass(frozen=True)
class LoraSpec:
    """What to adapt and how.

    Attributes:
      kind: ``'lora'`` (plain) or ``'multi_mask'``.
      rank: r.
      alpha: the update is scaled by ``alpha / rank`` (``alpha = rank``: scale 1, as NOAH).
      depth: d, the number of masked products summed (``multi_mask``; must be 1 for ``lora``).
      density: fraction of A's and B's entries each mask keeps (``multi_mask``).
      seed: mask seed.
      targets: regular expression searched in each parameter's ``'/'``-joined path; matching
        kernels (ndim >= 2) get an adapter.
      a_init_bound: ``A ~ U(-b, b)``; ``None`` uses ``b = 1 / sqrt(rank)``, what NOAH's LoRA
        (``kaiming_uniform_(a=sqrt(5))`` on a ``(d_in, r)`` tensor) draws.
      input_ndims: ``((regex, n_in), ...)`` overrides of :func:`input_ndim` for unusual kernels.
    """

    kind: str = "lora"
    rank: int = 8
    alpha: float = 8.0
    depth: int = 1
    density: float = 0.5
    seed: int = 0
    targets: str = VIT_QV_TARGETS
    a_init_bound: float | None = None
    input_ndims: tuple[tuple[str, int], ...] = ()

    def __post_init__(self):
        if self.kind not in LORA_KINDS:
            raise ValueError(f"unknown LoRA kind {self.kind!r}; choose one of {LORA_KINDS}")
        if self.rank < 1:
            raise ValueError(f"LoRA rank must be >= 1, got {self.rank}")
        if self.depth < 1:
            raise ValueError(f"LoRA depth must be >= 1, got {self.depth}")
        if self.kind == "lora" and self.depth != 1:
            raise ValueError(f"plain LoRA has depth 1 (got depth={self.depth}); use kind='multi_mask'")
        if not 0.0 < self.density <= 1.0:
            raise ValueError(f"LoRA mask density must be in (0, 1], got {self.density}")
        re.compile(self.targets)

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    @property
    def mask_spec(self) -> MaskSpec:
        return MaskSpec(kind="unstructured", density=self.density, seed=self.seed)

    def selects(self, path: Path, leaf) -> bool:
        return np.ndim(leaf) >= 2 and re.search(self.targets, "/".join(path)) is not None


def input_ndim(path: Path, shape: Sequence[int], spec: LoraSpec | None = None) -> int:
    """How many leading axes of kernel ``path`` are input (contracted) axes.

    2-D Dense: 1. 3-D attention DenseGeneral: 2 for the output projection (a module named
    ``out``: ``(heads, head_dim, D)``), else 1 (``(D, heads, head_dim)``). 4-D conv HWIO: 3.
    """
    joined = "/".join(path)
    for pattern, n in spec.input_ndims if spec else ():
        if re.search(pattern, joined):
            return int(n)
    ndim = len(shape)
    if ndim == 2:
        return 1
    if ndim == 3:
        return 2 if len(path) >= 2 and path[-2] == "out" else 1
    if ndim == 4:
        return 3
    raise ValueError(
        f"cannot view the {ndim}-D kernel '{joined}' {tuple(shape)} as a matrix; set input_ndims"
    )


def matrix_shape(path: Path, shape: Sequence[int], spec: LoraSpec | None = None) -> tuple[int, int]:
    """``(d_in, d_out)`` of kernel ``path`` viewed as a matrix."""
    n_in = input_ndim(path, shape, spec)
    return int(np.prod(shape[:n_in])), int(np.prod(shape[n_in:]))


def init_lora(key: jax.Array, base_params, spec: LoraSpec) -> dict:
    """Initial LoRA parameters for every targeted kernel of ``base_params``.

    Returns:
      A nested dict mirroring the targeted kernels' paths, each ending in
      ``{'lora_a': (d_in, r) ~ U(-b, b), 'lora_b': (r, d_out) zeros}``.

    Raises:
      ValueError: no parameter matches ``spec.targets`` (the message lists some paths).
    """
    flat = traverse_util.flatten_dict(base_params)
    targets = sorted(p for p, v in flat.items() if spec.selects(p, v))
    if not targets:
        some = ["/".join(p) for p in sorted(flat)[:8]]
        raise ValueError(f"LoRA targets {spec.targets!r} match no kernel; parameter paths look like {some}")
    bound = spec.a_init_bound if spec.a_init_bound is not None else 1.0 / math.sqrt(spec.rank)
    out = {}
    for i, path in enumerate(targets):
        d_in, d_out = matrix_shape(path, flat[path].shape, spec)
        dtype = flat[path].dtype
        a = jax.random.uniform(jax.random.fold_in(key, i), (d_in, spec.rank), dtype, -bound, bound)
        out[path + (LORA_A,)] = a
        out[path + (LORA_B,)] = jnp.zeros((spec.rank, d_out), dtype)
    return traverse_util.unflatten_dict(out)


def lora_masks(path: Path, a_shape, b_shape, spec: LoraSpec) -> tuple[jax.Array, jax.Array]:
    """The stacked masks ``(d, d_in, r)`` for A and ``(d, r, d_out)`` for B of kernel ``path``.

    ``m_{i,A} = make(mask_key(seed, i, path + ('lora_a',)))``; likewise for B: pure functions of
    (seed, i, path), distinct across i, between A and B, and across layers.
    """
    ms = spec.mask_spec
    ma = jnp.stack([ms.make(mask_key(spec.seed, i, path + (LORA_A,)), a_shape) for i in range(spec.depth)])
    mb = jnp.stack([ms.make(mask_key(spec.seed, i, path + (LORA_B,)), b_shape) for i in range(spec.depth)])
    return ma, mb


def delta(path: Path, a: jax.Array, b: jax.Array, spec: LoraSpec) -> jax.Array:
    """The 2-D update ``(alpha/r) * A B`` (or the multi-mask sum) of kernel ``path``."""
    if spec.kind == "lora":
        d = a @ b
    else:
        ma, mb = lora_masks(path, a.shape, b.shape, spec)
        # sum_i (m_iA * A)(m_iB * B) in one contraction over (i, r).
        d = jnp.einsum("kir,kro->io", ma * a, mb * b)
    return spec.scale * d


def _pairs(base_params, lora_params, spec: LoraSpec):
    """Yields ``(kernel path, W0, A, B)`` for every adapter, checking paths and shapes."""
    flat = traverse_util.flatten_dict(base_params)
    lflat = traverse_util.flatten_dict(lora_params)
    paths = sorted({p[:-1] for p in lflat})
    for path in paths:
        if path not in flat:
            raise KeyError(f"LoRA adapter for '{'/'.join(path)}' but the base params have no such kernel")
        w0, a, b = flat[path], lflat[path + (LORA_A,)], lflat[path + (LORA_B,)]
        d_in, d_out = matrix_shape(path, w0.shape, spec)
        if a.shape != (d_in, spec.rank) or b.shape != (spec.rank, d_out):
            raise ValueError(
                f"LoRA shapes for '{'/'.join(path)}' {tuple(w0.shape)}: A {a.shape}, B {b.shape}; expected "
                f"A {(d_in, spec.rank)}, B {(spec.rank, d_out)}"
            )
        yield path, w0, a, b


def lora_view(base_params, lora_params, spec: LoraSpec):
    """The effective parameters: every adapted kernel replaced by ``W0 + delta``.

    Differentiable in ``lora_params``; ``base_params`` is not modified. Use it inside the loss:
    ``model.apply({'params': lora_view(base, lora, spec)}, x)``.
    """
    flat = traverse_util.flatten_dict(base_params)
    for path, w0, a, b in _pairs(base_params, lora_params, spec):
        flat[path] = w0 + delta(path, a, b, spec).reshape(w0.shape).astype(w0.dtype)
    return traverse_util.unflatten_dict(flat)


def merge(base_params, lora_params, spec: LoraSpec):
    """``lora_view`` evaluated once into plain (numpy) params: inference costs nothing extra."""
    return jax.device_get(jax.jit(lambda b, lo: lora_view(b, lo, spec))(base_params, lora_params))


def num_lora_params(lora_params) -> int:
    """Number of trainable LoRA parameters (the masks are not parameters)."""
    return sum(int(np.prod(np.shape(x))) for x in jax.tree.leaves(lora_params))


# ------------------------------------------------------------------- unmerged (low-rank) forward
def _branch(module, x, path: Path, a, b, spec: LoraSpec):
    """``delta`` applied to the module input without forming it: ``sum_i ((x A_i) B_i)``."""
    if spec.kind == "lora":
        pairs = [(a, b)]
    else:
        ma, mb = lora_masks(path, a.shape, b.shape, spec)
        pairs = [(ma[i] * a, mb[i] * b) for i in range(spec.depth)]
    if isinstance(module, nn.Conv):
        if module.feature_group_count != 1:
            raise NotImplementedError("the unmerged LoRA path does not support grouped convolutions")
        kernel_hw = tuple(module.kernel_size)
        outs = []
        for ai, bi in pairs:
            down = module.clone(features=spec.rank, use_bias=False, parent=None, name=None)
            h = down.apply({"params": {"kernel": ai.reshape(*kernel_hw, x.shape[-1], spec.rank)}}, x)
            outs.append(h @ bi)
        return spec.scale * sum(outs)
    if isinstance(module, nn.DenseGeneral):
        axes = module.axis if isinstance(module.axis, Sequence) else (module.axis,)
        n_in = len(axes)
        if sorted(a % x.ndim for a in axes) != list(range(x.ndim - n_in, x.ndim)) or module.batch_dims:
            raise NotImplementedError("the unmerged LoRA path needs DenseGeneral to contract trailing axes")
        features = module.features if isinstance(module.features, Sequence) else (module.features,)
        xm = x.reshape(x.shape[: x.ndim - n_in] + (-1,))
        y = sum((xm @ ai) @ bi for ai, bi in pairs)
        return spec.scale * y.reshape(x.shape[: x.ndim - n_in] + tuple(features))
    if isinstance(module, nn.Dense):
        return spec.scale * sum((x @ ai) @ bi for ai, bi in pairs)
    raise NotImplementedError(f"the unmerged LoRA path does not support {type(module).__name__}")


@contextlib.contextmanager
def unmerged(lora_params, spec: LoraSpec):
    """Context in which ``model.apply({'params': base}, x)`` runs LoRA as a separate low-rank branch.

    Every ``nn.Dense`` / ``nn.DenseGeneral`` / ``nn.Conv`` whose kernel has an adapter computes
    ``y = module(x) + sum_i ((x A_i) B_i)`` via ``nn.intercept_methods``, never forming ``delta``:
    the textbook LoRA forward, used to check that :func:`lora_view`/:func:`merge` reshape the
    kernels consistently with how Flax contracts them. Raises on exit if an adapter was unused.
    """
    lflat = traverse_util.flatten_dict(lora_params)
    adapters = {p[:-1] for p in lflat}
    used = set()

    def interceptor(next_fun, args, kwargs, context):
        module = context.module
        if context.method_name != "__call__" or not isinstance(module, (nn.Dense, nn.DenseGeneral, nn.Conv)):
            return next_fun(*args, **kwargs)
        path = tuple(module.path) + ("kernel",)
        if path not in adapters:
            return next_fun(*args, **kwargs)
        used.add(path)
        a, b = lflat[path + (LORA_A,)], lflat[path + (LORA_B,)]
        return next_fun(*args, **kwargs) + _branch(module, args[0], path, a, b, spec)

    with nn.intercept_methods(interceptor):
        yield
    if adapters - used:
        raise RuntimeError(f"LoRA adapters never applied: {sorted('/'.join(p) for p in adapters - used)}")
