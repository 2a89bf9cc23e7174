"""2-D convolution layer for wtjax models, with a fast CPU path for convolutions inside loops.

Why a custom convolution: on XLA:CPU, the backward pass of a convolution that sits inside a while
loop (what ``nn.scan`` / ``lax.scan`` compile to) is tens of times slower than the same graph
unrolled. The transposed convolutions XLA derives for the gradient stay in a non-canonical layout
inside the loop body and miss the fast (Eigen) path; jax-ml/jax issue 12868 ("Convolution is
significantly slower inside a loop body (CPU)") is open; the measurements are in
experiments/benchmarks/README.md. A weight-tied model *is* a conv inside a loop, so this matters
for every CPU run.

``impl='im2col'`` sidesteps it with a ``jax.custom_vjp`` whose backward uses only operations XLA:CPU
handles well anywhere:

* forward: ``y = conv(x, w)``, an ordinary NHWC/HWIO convolution (strides ``s``, SAME padding);
* input gradient: ``dx = conv_valid(pad(dilate_s(dy)), flip_hw(w)^T)``, i.e. the output gradient
  with ``s - 1`` zeros inserted between rows/columns (interior padding), edge-padded by
  ``k - 1 - pad_lo`` (and whatever is needed to give back the input size), convolved with the kernel
  flipped in both spatial axes and its in/out axes swapped: again an ordinary NHWC/HWIO
  convolution with stride 1;
* kernel gradient: ``dw[kh, kw, ci, co] = sum_{n, i, j} xpad[n, s*i + kh, s*j + kw, ci] dy[n, i, j, co]``.
  At stride 1 (every tied block) it is computed as an ordinary *forward* convolution with the
  batch and channel axes swapped (``x`` as ``(Ci, H, W, N)``, ``dy`` as an ``(Ho, Wo, N, Co)``
  kernel); at other strides as one matrix product ``patches^T @ dy`` (im2col: the ``kh*kw``
  strided shifts of the padded input stacked on the channel axis, flattened to
  ``(N*Ho*Wo, kh*kw*Ci)``). The swapped-axes convolution costs the same inside a ``lax.scan`` as
  alone, where XLA's own kernel gradient is two orders of magnitude slower in the scan
  (experiments/benchmarks/README.md).

``impl='xla'`` is plain ``lax.conv_general_dilated`` with XLA's own gradients (the right choice on
GPU/TPU, which have their own convolution paths). ``impl='auto'`` is ``'im2col'`` when the program is
compiled for CPU and ``'xla'`` for every other platform. The choice is made by
``lax.platform_dependent`` when the program is lowered, i.e. for the devices it is compiled for, not
for the host that traces it: a TPU or GPU program compiled ahead of time on a CPU machine gets XLA's
native convolutions (tested through deviceless compilation in ``tests/test_aot.py``).

The two implementations compute the same function; the custom one supports reverse mode,
reverse-over-reverse and forward-over-reverse (``jax.jvp`` of ``jax.grad``: Hessian-vector
products, e.g. GraSP; its backward is made of ordinary differentiable ops) and ``vmap``, but not
forward mode applied to the convolution itself (``jax.jvp``/``jax.jacfwd`` of the forward pass
raise ``TypeError``), a limitation of ``jax.custom_vjp``. Use ``impl='xla'`` where that is needed.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

IMPLS = ("auto", "xla", "im2col")
_DIMS = ("NHWC", "HWIO", "NHWC")
Pads = tuple[tuple[int, int], tuple[int, int]]


def resolve_impl(impl: str, backend: str | None = None) -> str:
    """The concrete implementation for ``impl`` on ``backend`` (default: ``jax.default_backend()``).

    ``'auto'`` is ``'im2col'`` on CPU (jax-ml/jax#12868, module docstring) and ``'xla'`` on every
    other backend; ``'xla'`` and ``'im2col'`` are returned unchanged. :func:`conv2d` does not call
    this for ``'auto'``: it defers the choice to the lowering platform (module docstring).
    """
    if impl not in IMPLS:
        raise ValueError(f"unknown conv impl {impl!r}; choose one of {IMPLS}")
    if impl != "auto":
        return impl
    backend = jax.default_backend() if backend is None else backend
    return "im2col" if backend == "cpu" else "xla"


def same_padding(in_hw: Sequence[int], kernel_hw: Sequence[int], strides: Sequence[int]) -> Pads:
    """TensorFlow/Flax ``'SAME'`` padding: output size ``ceil(n / s)``, extra pad on the high side."""
    return tuple(lax.padtype_to_pads(tuple(in_hw), tuple(kernel_hw), tuple(strides), "SAME"))


def _conv(x, w, strides, padding):
    return lax.conv_general_dilated(x, w, strides, padding, dimension_numbers=_DIMS)


def _shifted_views(xp, kernel_hw, strides, out_hw):
    """The ``kh*kw`` strided views of the padded input that each kernel tap multiplies."""
    (kh, kw), (sh, sw), (oh, ow) = kernel_hw, strides, out_hw
    n, _, _, c = xp.shape
    return [
        lax.slice(xp, (0, i, j, 0), (n, i + (oh - 1) * sh + 1, j + (ow - 1) * sw + 1, c), (1, sh, sw, 1))
        for i in range(kh)
        for j in range(kw)
    ]


def _pad_input(x, padding):
    return lax.pad(x, jnp.zeros((), x.dtype), ((0, 0, 0), *(p + (0,) for p in padding), (0, 0, 0)))


def _kernel_grad(x, g, kernel_hw, strides, padding):
    """The kernel gradient: a batch/channel-swapped convolution at stride 1, else im2col."""
    if tuple(strides) == (1, 1):
        return _kernel_grad_conv(x, g, kernel_hw, padding)
    return _kernel_grad_im2col(x, g, kernel_hw, strides, padding)


def _kernel_grad_conv(x, g, kernel_hw, padding):
    """Stride 1: ``dw[kh, kw, ci, co] = sum_{n,i,j} xpad[n, i+kh, j+kw, ci] dy[n, i, j, co]`` is itself a
    forward NHWC/HWIO convolution of ``x`` seen as ``(Ci, H, W, N)`` with ``dy`` seen as an
    ``(Ho, Wo, N, Co)`` kernel, giving ``(Ci, kh, kw, Co)``. An ordinary forward convolution stays on
    XLA:CPU's fast path inside loops; measured 2-4x faster than the im2col matmul here."""
    xt = jnp.transpose(x, (3, 1, 2, 0))
    gt = jnp.transpose(g, (1, 2, 0, 3))
    dw = _conv(xt, gt, (1, 1), padding)
    return jnp.transpose(dw[:, : kernel_hw[0], : kernel_hw[1]], (1, 2, 0, 3))


def _kernel_grad_im2col(x, g, kernel_hw, strides, padding):
    """``dw = patches(x)^T @ dy`` with ``patches`` of shape ``(N*Ho*Wo, kh*kw*Ci)`` (HWIO order)."""
    n, oh, ow, co = g.shape
    ci = x.shape[-1]
    views = _shifted_views(_pad_input(x, padding), kernel_hw, strides, (oh, ow))
    patches = jnp.concatenate(views, axis=-1).reshape(n * oh * ow, -1)
    dw = lax.dot_general(patches, g.reshape(n * oh * ow, co), (((0,), (0,)), ((), ())))
    return dw.reshape(*kernel_hw, ci, co)


def _input_grad(g, w, in_hw, strides, padding):
    """``dx``: the output gradient, dilated by the stride and padded, convolved with the flipped kernel."""
    kernel_hw = w.shape[:2]
    edges = []
    for n, k, s, (lo, _), o in zip(in_hw, kernel_hw, strides, padding, g.shape[1:3], strict=True):
        dilated = (o - 1) * s + 1
        new_lo = k - 1 - lo
        # The VALID convolution must return n rows: dilated + new_lo + new_hi - k + 1 == n. new_hi can
        # be negative (input rows no output reads): lax.pad crops then.
        edges.append((new_lo, n + k - 1 - dilated - new_lo, s - 1))
    gp = lax.pad(g, jnp.zeros((), g.dtype), ((0, 0, 0), *edges, (0, 0, 0)))
    w_t = jnp.swapaxes(jnp.flip(w, (0, 1)), 2, 3)
    return _conv(gp, w_t, (1, 1), "VALID")


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def conv_im2col(x: jax.Array, w: jax.Array, strides: tuple[int, int], padding: Pads) -> jax.Array:
    """NHWC x HWIO convolution with explicit ``padding`` and a loop-friendly backward pass.

    Same values as ``lax.conv_general_dilated(x, w, strides, padding, ('NHWC', 'HWIO', 'NHWC'))``;
    the gradients are computed as in the module docstring.

    Args:
      x: input ``(N, H, W, Ci)``.
      w: kernel ``(kh, kw, Ci, Co)``, same dtype as ``x``.
      strides: ``(sh, sw)``, static.
      padding: ``((lo_h, hi_h), (lo_w, hi_w))``, static (e.g. from :func:`same_padding`).

    Returns:
      ``(N, Ho, Wo, Co)``.
    """
    return _conv(x, w, strides, padding)


def _conv_im2col_fwd(x, w, strides, padding):
    return _conv(x, w, strides, padding), (x, w)


def _conv_im2col_bwd(strides, padding, res, g):
    x, w = res
    dx = _input_grad(g, w, x.shape[1:3], strides, padding)
    dw = _kernel_grad(x, g, w.shape[:2], strides, padding)
    return dx, dw


conv_im2col.defvjp(_conv_im2col_fwd, _conv_im2col_bwd)


def conv2d(x: jax.Array, w: jax.Array, strides=(1, 1), impl: str = "auto") -> jax.Array:
    """SAME-padded NHWC x HWIO convolution with the chosen implementation (:func:`resolve_impl`).

    ``x`` may have several leading batch dimensions (they are flattened and restored).
    """
    if x.ndim < 4:
        raise ValueError(f"conv2d expects NHWC input with ndim >= 4, got shape {x.shape}")
    if w.ndim != 4 or w.shape[2] != x.shape[-1]:
        raise ValueError(f"kernel {w.shape} is not HWIO with {x.shape[-1]} input channels (input {x.shape})")
    strides = tuple(int(s) for s in strides)
    batch = x.shape[:-3]
    x4 = x.reshape((-1,) + x.shape[-3:])
    padding = same_padding(x4.shape[1:3], w.shape[:2], strides)
    fast_in_loops = functools.partial(conv_im2col, strides=strides, padding=padding)
    native = functools.partial(_conv, strides=strides, padding=padding)
    if impl == "auto":
        # Both branches are traced; the one for the platform being compiled for is kept at lowering.
        y = lax.platform_dependent(x4, w, cpu=fast_in_loops, default=native)
    elif resolve_impl(impl) == "im2col":
        y = fast_in_loops(x4, w)
    else:
        y = native(x4, w)
    return y.reshape(batch + y.shape[1:])


class Conv(nn.Module):
    """NHWC convolution with SAME padding; parameters ``kernel`` (HWIO) and optional ``bias``.

    The parameters sit directly on this module (``<name>/kernel``), initialised like ``nn.Conv``
    (``lecun_normal`` kernel, zero bias) and stored in float32. Inputs and parameters are cast to
    ``dtype`` when it is set (mixed precision, :mod:`wtjax.core.precision`), else promoted to a common
    dtype.

    Attributes:
      features: output channels.
      kernel_size: ``(kh, kw)``.
      strides: ``(sh, sw)``; output spatial size is ``ceil(in / stride)``.
      use_bias: add a learned bias.
      impl: ``'auto'``, ``'xla'`` or ``'im2col'`` (module docstring).
      dtype: the compute dtype (e.g. ``jnp.bfloat16``); ``None`` promotes (float32 for float32 inputs).
    """

    features: int
    kernel_size: tuple[int, int] = (3, 3)
    strides: tuple[int, int] = (1, 1)
    use_bias: bool = False
    impl: str = "auto"
    kernel_init: nn.initializers.Initializer = nn.initializers.lecun_normal()
    bias_init: nn.initializers.Initializer = nn.initializers.zeros_init()
    dtype: jnp.dtype | None = None

    @nn.compact
    def __call__(self, x):
        """Convolve ``x`` of shape ``(..., H, W, Ci)``; returns ``(..., Ho, Wo, features)``."""
        kernel_shape = (*self.kernel_size, x.shape[-1], self.features)
        kernel = self.param("kernel", self.kernel_init, kernel_shape, jnp.float32)
        bias = self.param("bias", self.bias_init, (self.features,), jnp.float32) if self.use_bias else None
        x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias, dtype=self.dtype)
        y = conv2d(x, kernel, self.strides, self.impl)
        return y if bias is None else y + bias
