"""Layers of the multiscale DEQ (MDEQ; Bai, Koltun and Kolter, NeurIPS 2020; locuslab/mdeq).

The implicit layer ``f(z, x)`` acts on a tuple of branch states ``z = (z_0, ..., z_{n-1})``,
branch ``i`` at resolution ``H / 2^i`` with ``C_i`` channels (NHWC), and has two steps
(locuslab/mdeq ``lib/models/mdeq_core.py``, ``MDEQModule``):

1. per branch, a residual block (:class:`MDEQBasicBlock`)::

       h   = relu(GN(conv3x3(z_i; C_i -> e*C_i)))            e = expansion (5)
       out = GN(relu(z_i + GN(drop(conv3x3(h; e*C_i -> C_i)) + x_i)))

   with the input injection ``x_i`` (the stem's output on branch 0, zero elsewhere) and
   variational dropout ``drop`` (one mask per sample and channel, held fixed across the solver's
   iterations and the pretraining reuses);
2. multiscale fusion: ``y_i = sum_j T_ij(out_j)`` with ``T_ii`` the identity, ``T_ij`` for ``j < i``
   ``i - j`` stride-2 3x3 convolutions (GroupNorm after each, ReLU between), for ``j > i`` a 1x1
   convolution, GroupNorm and nearest-neighbour upsampling by ``2^(j - i)``; then
   ``z_i' = GN_{groups/2}(conv1x1(relu(y_i)))``.

The block convolutions and the post-fusion 1x1 convolutions are weight-normalised
(:class:`WNConv`, the reference's ``WNORM: true``); GroupNorm uses the reference's epsilon 1e-5.
The classification head (:class:`MDEQHead`) is the reference's ``MDEQClsNet`` head.

Norms: the stem and head (outside the implicit layer) use the reference's BatchNorm by default
(:func:`outer_norm`; running statistics in the ``batch_stats`` collection), or GroupNorm with the
same affine parameters (``norm='group'``: stateless, learns markedly slower; docs/implicit_mdeq.md
measures it). GroupNorms have ``gcd(groups, channels)`` groups (the head has widths such as 14
that 8 groups do not divide). Deviation from the reference: stride-2 convolutions pad 0 before and
1 after (Flax's SAME) where the reference pads 1 on each side.

Initialisation is the reference's (``MDEQClsNet.init_weights``): it redraws every plain
convolution's weights and biases from N(0, 0.01) (:data:`ReferenceConv`). Its weight-normalised
convolutions recompute their weight from ``(g, v)`` at every forward pass, so that redraw does not
reach them: they, like the linear classifier, keep PyTorch's default U(+-1/sqrt(fan_in))
(:data:`TORCH_DEFAULT_INIT`). Flax's LeCun-normal init instead learned markedly slower
(docs/implicit_mdeq.md).
"""

from __future__ import annotations

import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from wtjax.core import precision
from wtjax.core.conv import Conv, conv2d

NORM_EPSILON = 1e-5  # PyTorch's GroupNorm and BatchNorm default, which the reference uses

PLAIN_CONV_INIT = nn.initializers.normal(0.01)  # the reference's redraw of plain convolutions
# PyTorch's default for Conv2d and Linear weights, Kaiming-uniform with a = sqrt(5): U(+-1/sqrt(fan_in)).
TORCH_DEFAULT_INIT = nn.initializers.variance_scaling(1 / 3, "fan_in", "uniform")
ReferenceConv = functools.partial(Conv, kernel_init=PLAIN_CONV_INIT, bias_init=PLAIN_CONV_INIT)


def torch_default_bias_init(fan_in: int) -> nn.initializers.Initializer:
    """PyTorch's default bias init of a layer with ``fan_in`` inputs: U(+-1/sqrt(fan_in))."""
    bound = 1.0 / math.sqrt(fan_in)

    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


def group_norm(channels: int, groups: int, dtype, *, affine: bool = True, name: str | None = None):
    """A GroupNorm over ``channels`` with ``gcd(groups, channels)`` groups (module docstring)."""
    cls = precision.norm_class(nn.GroupNorm, dtype)
    return cls(
        num_groups=math.gcd(groups, channels),
        epsilon=NORM_EPSILON,
        use_scale=affine,
        use_bias=affine,
        dtype=dtype,
        name=name,
    )


OUTER_NORMS = ("batch", "group")  # the stem's and head's norm (MDEQ.norm)


def outer_norm(kind: str, channels: int, groups: int, dtype, *, train: bool, affine=True, name=None):
    """The norm of the stem and head, outside the implicit layer (module docstring).

    ``'batch'``: the reference's BatchNorm (PyTorch's momentum 0.1, i.e. Flax's 0.9; epsilon
    1e-5), batch statistics at training, running ones (the ``batch_stats`` collection) otherwise.
    ``'group'``: :func:`group_norm`, stateless, which learns markedly slower (docs/implicit_mdeq.md).
    """
    if kind == "group":
        return group_norm(channels, groups, dtype, affine=affine, name=f"{name}_gn")
    if kind != "batch":
        raise ValueError(f"norm must be one of {OUTER_NORMS}, got {kind!r}")
    return nn.BatchNorm(
        use_running_average=not train,
        momentum=0.9,
        epsilon=NORM_EPSILON,
        use_scale=affine,
        use_bias=affine,
        dtype=dtype,
        name=f"{name}_bn",
    )


class WNConv(nn.Module):
    """Weight-normalised bias-free convolution: ``W = g * v / ||v||`` per output channel.

    Parameters ``kernel`` (``v``, HWIO) and ``scale`` (``g``, one per output channel, initialised
    to ``||v||`` so that ``W = v`` at initialisation, as the reference's ``weight_norm``).
    """

    features: int
    kernel_size: tuple[int, int] = (3, 3)
    impl: str = "auto"
    dtype: jnp.dtype | None = None

    @nn.compact
    def __call__(self, x):
        shape = (*self.kernel_size, x.shape[-1], self.features)
        v = self.param("kernel", TORCH_DEFAULT_INIT, shape, jnp.float32)
        norm = lambda w: jnp.sqrt(jnp.sum(w**2, axis=(0, 1, 2)))  # noqa: E731
        g = self.param("scale", lambda _key, _shape: norm(v), (self.features,))
        kernel = v * (g / norm(v))
        x, kernel = nn.dtypes.promote_dtype(x, kernel, dtype=self.dtype)
        return conv2d(x, kernel, (1, 1), self.impl)


def _conv(features, kernel, *, weight_norm, impl, dtype, name, strides=(1, 1), bias=False):
    """A convolution: weight-normalised (stride 1, no bias) when ``weight_norm``, plain otherwise."""
    if weight_norm:
        return WNConv(features, (kernel, kernel), impl=impl, dtype=dtype, name=name)
    return ReferenceConv(
        features, (kernel, kernel), strides, use_bias=bias, impl=impl, dtype=dtype, name=name
    )


class MDEQBasicBlock(nn.Module):
    """The residual block of one branch, with injection and variational dropout (docstring 1.)."""

    channels: int
    expansion: int = 5
    groups: int = 8
    weight_norm: bool = True
    conv_impl: str = "auto"
    dtype: jnp.dtype | None = None

    @nn.compact
    def __call__(self, z, injection=None, mask=None):
        kw = dict(weight_norm=self.weight_norm, impl=self.conv_impl, dtype=self.dtype)
        wide = self.expansion * self.channels
        h = _conv(wide, 3, name="conv1", **kw)(z)
        h = nn.relu(group_norm(wide, self.groups, self.dtype, name="gn1")(h))
        h = _conv(self.channels, 3, name="conv2", **kw)(h)
        if mask is not None:
            h = h * mask.astype(h.dtype)
        if injection is not None:
            h = h + injection
        h = group_norm(self.channels, self.groups, self.dtype, name="gn2")(h)
        return group_norm(self.channels, self.groups, self.dtype, name="gn3")(nn.relu(z + h))


def upsample_nearest(x, factor: int):
    """Nearest-neighbour upsampling of NHWC ``x`` by an integer ``factor``."""
    return jnp.repeat(jnp.repeat(x, factor, axis=-3), factor, axis=-2)


class Fuse(nn.Module):
    """``T_ij``: branch ``j`` (``c_in`` channels) to branch ``i``'s resolution and ``c_out`` channels."""

    c_in: int
    c_out: int
    level_diff: int  # i - j: > 0 downsamples, < 0 upsamples
    groups: int = 8
    conv_impl: str = "auto"
    dtype: jnp.dtype | None = None

    @nn.compact
    def __call__(self, x):
        kw = dict(impl=self.conv_impl, dtype=self.dtype)
        if self.level_diff < 0:
            x = ReferenceConv(self.c_out, (1, 1), name="conv", **kw)(x)
            x = group_norm(self.c_out, self.groups, self.dtype, name="gn")(x)
            return upsample_nearest(x, 2 ** (-self.level_diff))
        for k in range(self.level_diff):
            last = k == self.level_diff - 1
            c = self.c_out if last else self.c_in
            x = ReferenceConv(c, (3, 3), (2, 2), name=f"down{k}_conv", **kw)(x)
            x = group_norm(c, self.groups, self.dtype, name=f"down{k}_gn")(x)
            if not last:
                x = nn.relu(x)
        return x


class MultiscaleLayer(nn.Module):
    """MDEQ's ``f(z, x)`` over the tuple of branch states (module docstring).

    ``block(zs, x) -> zs`` with ``x = {'injection': x_0, 'masks': (m_0, ...)}`` (``masks``
    optional: no dropout), ``x_0`` the injection of branch 0.
    """

    channels: tuple[int, ...]
    expansion: int = 5
    groups: int = 8
    weight_norm: bool = True
    conv_impl: str = "auto"
    dtype: jnp.dtype | None = None

    @nn.compact
    def __call__(self, zs, x):
        n = len(self.channels)
        masks = x.get("masks") or (None,) * n  # no masks: no dropout (evaluation)
        kw = dict(groups=self.groups, conv_impl=self.conv_impl, dtype=self.dtype)
        outs = [
            MDEQBasicBlock(c, self.expansion, weight_norm=self.weight_norm, name=f"branch{i}", **kw)(
                zs[i], x["injection"] if i == 0 else None, masks[i]
            )
            for i, c in enumerate(self.channels)
        ]
        fused = []
        for i, c in enumerate(self.channels):
            y = outs[i]
            for j, cj in enumerate(self.channels):
                if j != i:
                    y = y + Fuse(cj, c, i - j, name=f"fuse{i}_{j}", **kw)(outs[j])
            y = _conv(
                c,
                1,
                weight_norm=self.weight_norm,
                impl=self.conv_impl,
                dtype=self.dtype,
                name=f"post{i}_conv",
            )(nn.relu(y))
            fused.append(group_norm(c, max(1, self.groups // 2), self.dtype, name=f"post{i}_gn")(y))
        return tuple(fused)


class Bottleneck(nn.Module):
    """The head's bottleneck (reference ``Bottleneck``, expansion 4; its norms have no affine)."""

    planes: int
    groups: int = 8
    conv_impl: str = "auto"
    dtype: jnp.dtype | None = None
    norm: str = "batch"

    @nn.compact
    def __call__(self, x, train: bool = False):
        kw = dict(impl=self.conv_impl, dtype=self.dtype)
        out4 = 4 * self.planes

        def norm(c, name, affine=False):
            return outer_norm(self.norm, c, self.groups, self.dtype, train=train, affine=affine, name=name)

        h = nn.relu(norm(self.planes, "norm1")(ReferenceConv(self.planes, (1, 1), name="conv1", **kw)(x)))
        h = nn.relu(norm(self.planes, "norm2")(ReferenceConv(self.planes, (3, 3), name="conv2", **kw)(h)))
        h = norm(out4, "norm3")(ReferenceConv(out4, (1, 1), name="conv3", **kw)(h))
        # The residual path changes the width, so it has its own 1x1 conv and (affine) norm.
        res = norm(out4, "down", affine=True)(ReferenceConv(out4, (1, 1), name="down_conv", **kw)(x))
        return nn.relu(h + res)


class MDEQHead(nn.Module):
    """The reference's classification head over the branch equilibria.

    Each branch is widened by a bottleneck to ``4 * head_channels[i]``; from the highest resolution
    down, ``y = bottleneck_{i+1}(z_{i+1}) + down_i(y)`` with ``down_i`` a stride-2 3x3 conv (with
    bias), norm and ReLU; then a 1x1 conv (with bias) to ``final_channels``, norm, ReLU, global
    average pooling and a linear classifier. Returns ``(logits, pooled)``.
    """

    num_classes: int
    head_channels: tuple[int, ...]
    final_channels: int
    groups: int = 8
    conv_impl: str = "auto"
    dtype: jnp.dtype | None = None
    norm: str = "batch"

    @nn.compact
    def __call__(self, zs, train: bool = False):
        kw = dict(impl=self.conv_impl, dtype=self.dtype)
        hc = self.head_channels

        def bottleneck(i, z):
            block = Bottleneck(hc[i], self.groups, self.conv_impl, self.dtype, self.norm, name=f"incre{i}")
            return block(z, train)

        def norm(c, name):
            return outer_norm(self.norm, c, self.groups, self.dtype, train=train, name=name)

        y = bottleneck(0, zs[0])
        for i in range(len(zs) - 1):
            c = 4 * hc[i + 1]
            down = ReferenceConv(c, (3, 3), (2, 2), use_bias=True, name=f"down{i}_conv", **kw)(y)
            y = bottleneck(i + 1, zs[i + 1]) + nn.relu(norm(c, f"down{i}")(down))
        y = ReferenceConv(self.final_channels, (1, 1), use_bias=True, name="final_conv", **kw)(y)
        y = nn.relu(norm(self.final_channels, "final")(y))
        pooled = jnp.mean(y, axis=(1, 2))
        logits = nn.Dense(
            self.num_classes,
            dtype=self.dtype,
            kernel_init=TORCH_DEFAULT_INIT,
            bias_init=torch_default_bias_init(pooled.shape[-1]),
            name="classifier",
        )(pooled)
        return precision.upcast(logits), pooled
