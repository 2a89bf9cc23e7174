"""ResNet-20 for CIFAR (He et al. 2016, section 4.2) and its weight-tied form.

    stem:    conv3x3(3 -> w), GN, relu
    stage s = 1, 2, 3 with c_s = w, 2w, 4w channels and n = blocks_per_stage (3 for ResNet-20):
      block 0:          BasicBlock(c_s, stride 1 in stage 1, else 2)      (never tied)
      blocks 1..n-1:    BasicBlock(c_s, stride 1)                         (tied: one weight, K = n-1)
    head:    global average pool, Dense(num_classes)

    BasicBlock(z) = relu(GN2(conv2(relu(GN1(conv1(z))))) + shortcut(z))

Choices (stated because the paper does not give them):

* **Option-A shortcut** (He et al.'s CIFAR choice, the one behind ResNet-20's 0.27M parameters):
  when a block changes shape, the shortcut subsamples ``z`` with stride 2 and zero-pads the new
  channels; it has no parameters.
* **GroupNorm** (``groups`` groups) instead of BatchNorm everywhere, also in the explicit
  ``not_tied`` model: BatchNorm's ``batch_stats`` cannot live inside a tied scan (google/flax#2052)
  and the model contract has a single ``params`` collection. GroupNorm has the same
  ``2*channels`` parameters, so the counts equal BatchNorm ResNet-20's.
* **Tying**: within each stage the shape-compatible blocks (all but the first) share one weight
  through :class:`wtjax.core.tied.Tied`, with the usual mask modes; the tie's depth is the number of
  blocks it replaces (``blocks_per_stage - 1``). The first block of stage 1 keeps its own weight
  too (it does not downsample), so every stage has the same structure. The three tied stages get
  different masks from one seed (each tie's ``mask_scope`` is its name). ``not_tied`` is the plain
  (explicit) ResNet through ``Tied(..., shared=False)``.

Parameter count (3x3 convs without bias, ``w`` base width, ``c`` classes, ``m`` = 1 tied or
``n - 1`` not tied)::

    stem 27w + 2w
    first blocks  (18 + 54 + 216) w^2 + (4 + 8 + 16) w = 288 w^2 + 28 w
    tied blocks   m * ((18 + 72 + 288) w^2 + (4 + 8 + 16) w) = m * (378 w^2 + 28 w)
    head 4w*c + c

ResNet-20 (n=3, not tied, c=10): ``1044 w^2 + 153 w + 10``; w=16 gives the standard 269,722.
The paper's Table 1b lists ResNet-20 Small 68k and Large 4.3M parameters without widths; the
nearest base widths are ``small`` w=8 (68,050, x0.5) and ``large`` w=64 (4,286,026, x4). Tied
(n=3): ``666 w^2 + 125 w + 10``: 43,634 (small) and 2,735,946 (large).
"""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from wtjax.core import precision
from wtjax.core.conv import Conv
from wtjax.models.mlp import resolve_width
from wtjax.models.tying import TiedModel, run_tie

RESNET20_SIZES = {"small": 8, "large": 64}


def option_a_shortcut(z, features: int, stride: int):
    """He et al.'s option-A shortcut: stride-``stride`` subsampling, then zero channels appended.

    The subsampled pixels are the centres of the stride-2 3x3 ``SAME`` convolution windows: XLA's
    ``SAME`` pads ``(0, 1)`` along an even axis (centres at ``2i + 1``) and ``(1, 1)`` along an odd
    one (centres at ``2i``), so the residual sum adds aligned pixels.
    """
    if stride > 1:
        if stride != 2:
            raise ValueError(f"option-A shortcut supports stride 1 or 2, got {stride}")
        h, w = z.shape[-3], z.shape[-2]
        z = z[..., 1 - h % 2 :: 2, 1 - w % 2 :: 2, :]
    extra = features - z.shape[-1]
    if extra < 0:
        raise ValueError(f"option-A shortcut cannot reduce channels ({z.shape[-1]} -> {features})")
    if extra:
        z = jnp.pad(z, [(0, 0)] * (z.ndim - 1) + [(0, extra)])
    return z


class BasicBlock(nn.Module):
    """``relu(GN2(conv2(relu(GN1(conv1(z))))) + shortcut(z))`` with an option-A shortcut.

    Attributes:
      features: output channels.
      strides: stride of ``conv1`` (1 or 2).
      groups: GroupNorm groups (must divide ``features``).
      conv_impl: convolution implementation (:mod:`wtjax.core.conv`).
      dtype: compute dtype of the convolutions and norm outputs (``None``: promotion).
    """

    features: int
    strides: int = 1
    groups: int = 4
    conv_impl: str = "auto"
    dtype: jnp.dtype | None = None

    @nn.compact
    def __call__(self, z):
        if self.features % self.groups:
            raise ValueError(f"GroupNorm groups ({self.groups}) must divide the channels ({self.features})")
        s = (self.strides, self.strides)
        conv = dict(impl=self.conv_impl, dtype=self.dtype)
        h = Conv(self.features, strides=s, **conv, name="conv1")(z)
        h = nn.relu(nn.GroupNorm(num_groups=self.groups, dtype=self.dtype, name="gn1")(h))
        h = Conv(self.features, **conv, name="conv2")(h)
        h = nn.GroupNorm(num_groups=self.groups, dtype=self.dtype, name="gn2")(h)
        return nn.relu(h + option_a_shortcut(z, self.features, self.strides))


class ResNet20(TiedModel):
    """CIFAR ResNet (ResNet-20 by default) with weight-tied stages; returns ``(logits, out)``.

    Attributes:
      num_classes: classifier outputs.
      size: ``small`` (base width 8, 68k parameters) or ``large`` (64, 4.3M); ignored when
        ``width`` is set.
      width: base channels w (stages have w, 2w, 4w); 16 is the original ResNet-20.
      blocks_per_stage: n (ResNet-(6n+2): 3 gives ResNet-20, 5 ResNet-32); the tie of each stage
        replaces its last ``n - 1`` blocks.
      groups: GroupNorm groups.
      conv_impl: convolution implementation (:mod:`wtjax.core.conv`).
      (tie fields: :class:`~wtjax.models.tying.TiedModel`; here ``form`` defaults to ``not_tied``,
      the explicit ResNet, and ``mask_mode`` to ``dense``; the mask applies to the tied blocks'
      conv kernels only.)
    """

    form: str = "not_tied"
    mask_mode: str = "dense"
    num_classes: int = 10
    size: str = "small"
    width: int | None = None
    blocks_per_stage: int = 3
    groups: int = 4
    conv_impl: str = "auto"

    @nn.compact
    def __call__(
        self, images, *, train: bool = False, depth: int | None = None, return_intermediates: bool = False
    ):
        """Classify ``images`` (NHWC).

        Args:
          images: ``(B, H, W, C)``.
          train: enables the ``dropout`` mask mode.
          depth: reuses of each stage's tie (tied form; default ``blocks_per_stage - 1``).
          return_intermediates: also return each stage's per-reuse states.

        Returns:
          ``(logits, out)``; ``out`` has ``stem``, ``pre_logits`` and, when
          ``return_intermediates``, ``block_outputs``: a tuple with one ``(K, B, H_s, W_s, C_s)``
          array per stage (the stages have different shapes).
        """
        self.check_form()
        if self.blocks_per_stage < 2:
            raise ValueError(
                f"blocks_per_stage must be >= 2 (one untied + a tie), got {self.blocks_per_stage}"
            )
        w = resolve_width(self.size, self.width, RESNET20_SIZES, "ResNet20")
        dtype = precision.layer_dtype(self.dtype)
        x = Conv(w, impl=self.conv_impl, dtype=dtype, name="stem_conv")(precision.cast(images, dtype))
        z = nn.relu(nn.GroupNorm(num_groups=self.groups, dtype=dtype, name="stem_gn")(x))
        stem = z
        outputs = []
        for s, features in enumerate((w, 2 * w, 4 * w)):
            z = BasicBlock(
                features, 1 if s == 0 else 2, self.groups, self.conv_impl, dtype, name=f"stage{s + 1}_block0"
            )(z)
            block = BasicBlock(features, 1, self.groups, self.conv_impl, dtype)
            tied = self.tie(block, depth=self.blocks_per_stage - 1, name=f"stage{s + 1}_tied")
            z, zs = run_tie(tied, z, train=train, depth=depth, return_intermediates=return_intermediates)
            outputs.append(zs)
        pooled = jnp.mean(z, axis=(1, 2))
        logits = precision.upcast(nn.Dense(self.num_classes, dtype=dtype, name="head")(pooled))
        out = {"stem": stem, "pre_logits": pooled}
        if return_intermediates:
            out["block_outputs"] = tuple(outputs)
        return logits, out
