"""The multiscale DEQ (MDEQ; Bai, Koltun and Kolter, NeurIPS 2020), after locuslab/mdeq.

    x_0      = stem(image)                       two conv3x3 + norm + relu (+ a 1x1 stage for > 2 branches)
    z*       = f(z*, x)                          z = (z_0, ..., z_{n-1}), branch i at H/2^i, C_i channels
    logits   = head(z*)                          the reference's incremental-channel head

``f`` is :class:`~wtjax.models.mdeq_layers.MultiscaleLayer` (per-branch residual blocks, then
multiscale fusion); only branch 0 receives the injection ``x_0``. The solver machinery is the
single-stream DEQ's (:class:`~wtjax.models.deq.DEQBase`): the tuple of branch states is
flattened into one ``(B, D)`` state for the solvers (:meth:`MDEQ._f` unflattens it, applies the
layer and flattens the result), so Broyden/Anderson, implicit differentiation, phantom gradients,
the Jacobian and fixed-point regularisers, the backward probe, the metric names (``deq_*``,
including ``deq_fwd_nonconverged`` / ``deq_fwd_diverged`` that the job's ``solver_failure``
policy reads) and the weight-tied pretraining phase (``deq_pretrain_steps``; the layer applied
``depth`` times, the reference's ``NUM_LAYERS = 10``) all apply unchanged. ``tied_only=True``
runs only that weight-tied phase, whatever the step: the weight-tied counterpart of the MDEQ
(the paper's Table 1a "Weight-tied Tiny/Large").

Variational dropout (reference ``VariationalHidDropout2d``): at training, one Bernoulli mask per
sample and channel of each branch, drawn once per forward pass from the ``dropout`` RNG and held
fixed across the solver's iterations (the map stays deterministic) and the pretraining reuses.
The masks travel with the injection in the solver's ``x``.

Sizes (locuslab/mdeq ``experiments/cifar/cls_mdeq_{TINY,LARGE}.yaml`` at commit 20e8a40):

=======  ================  ===============  =====  =======  ================
size     channels          head channels    final  dropout  parameters
=======  ================  ===============  =====  =======  ================
tiny     24, 24            8, 16            200    0.25     158,986
large    32, 64, 128, 256  14, 28, 56, 112  1680   0.3      11,098,398
=======  ================  ===============  =====  =======  ================

The parameter counts are the reference implementation's trainable parameters (its model built
from those yaml files, frozen solver copy excluded); this model has exactly the same
(``tests/test_mdeq.py``). The MDEQ paper's Table 1 rounds them as 170K and 10M. Stem and head
use BatchNorm as the reference (``norm``; GroupNorm in its place slows learning markedly:
:mod:`wtjax.models.mdeq_layers`, docs/implicit_mdeq.md).
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from wtjax.core import precision
from wtjax.models.deq import _CALL_DOC, DEQBase
from wtjax.models.mdeq_layers import MDEQHead, MultiscaleLayer, ReferenceConv, outer_norm

SIZES = {
    "tiny": dict(channels=(24, 24), head_channels=(8, 16), final_channels=200, dropout=0.25),
    "large": dict(
        channels=(32, 64, 128, 256), head_channels=(14, 28, 56, 112), final_channels=1680, dropout=0.3
    ),
}


def flatten_branches(zs) -> jax.Array:
    """``(B, D)``: the branch states ``zs`` (each ``(B, H_i, W_i, C_i)``) concatenated per sample."""
    return jnp.concatenate([z.reshape(z.shape[0], -1) for z in zs], axis=1)


def unflatten_branches(z: jax.Array, shapes) -> tuple[jax.Array, ...]:
    """The inverse of :func:`flatten_branches` for per-sample branch ``shapes`` ``(H_i, W_i, C_i)``."""
    sizes = [math.prod(s) for s in shapes]
    if z.shape[1] != sum(sizes):
        raise ValueError(f"state has {z.shape[1]} values per sample; the branches {shapes} need {sum(sizes)}")
    cuts = [sum(sizes[:i]) for i in range(1, len(sizes))]
    return tuple(p.reshape((z.shape[0], *s)) for p, s in zip(jnp.split(z, cuts, axis=1), shapes, strict=True))


class MDEQ(DEQBase):
    """Multiscale DEQ classifier (module docstring); returns ``(logits, out)`` like the DEQ models.

    Attributes:
      num_classes: classifier outputs.
      size: ``'tiny'`` or ``'large'`` (module docstring), or ``None`` to give every
        architecture field below explicitly.
      channels: channels per branch (overrides the size's); the number of branches is its length.
      head_channels: bottleneck widths of the head per branch (its outputs are 4x these).
      final_channels: width of the head's last 1x1 convolution.
      dropout: variational dropout rate in the blocks (``None``: the size's; 0 without a size).
      expansion: width factor of each block's inner convolution (reference: 5).
      groups: GroupNorm groups (reference ``NUM_GROUPS``: 8; the post-fusion norms use half).
      weight_norm: weight-normalise the block and post-fusion convolutions (reference: on).
      tied_only: run the weight-tied phase only (``depth`` reuses, no solver) at every step.
      conv_impl: convolution implementation (:mod:`wtjax.core.conv`).
      depth: reuses of the weight-tied (pretraining) phase (reference ``NUM_LAYERS``: 10).
      norm: the stem's and head's norm: ``'batch'`` (the reference's BatchNorm; running statistics
        in the ``batch_stats`` collection) or ``'group'`` (stateless GroupNorm, learns slower).
      (solver fields: :class:`~wtjax.models.deq.DEQBase`.)
    """

    num_classes: int = 10
    size: str | None = "tiny"
    channels: tuple[int, ...] | None = None
    head_channels: tuple[int, ...] | None = None
    final_channels: int | None = None
    dropout: float | None = None
    expansion: int = 5
    groups: int = 8
    weight_norm: bool = True
    tied_only: bool = False
    conv_impl: str = "auto"
    depth: int = 10
    norm: str = "batch"

    def arch(self) -> dict:
        """The resolved architecture: the size's values overridden by the fields that are set."""
        if self.size is not None and self.size not in SIZES:
            raise ValueError(f"unknown MDEQ size {self.size!r}; choose one of {sorted(SIZES)} or None")
        arch = dict(SIZES[self.size]) if self.size else {"dropout": 0.0}
        for k in ("channels", "head_channels", "final_channels", "dropout"):
            if getattr(self, k) is not None:
                arch[k] = getattr(self, k)
        missing = [k for k in ("channels", "head_channels", "final_channels") if k not in arch]
        if missing:
            raise ValueError(f"size=None needs the MDEQ field(s) {missing}")
        arch["channels"], arch["head_channels"] = tuple(arch["channels"]), tuple(arch["head_channels"])
        if not arch["channels"] or len(arch["head_channels"]) != len(arch["channels"]):
            raise ValueError(
                f"one head width per branch: channels {arch['channels']}, head {arch['head_channels']}"
            )
        if not 0.0 <= arch["dropout"] < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {arch['dropout']}")
        return arch

    def _block(self, **kw):
        dtype = precision.layer_dtype(self.dtype)
        channels = self.arch()["channels"]
        return MultiscaleLayer(
            channels, self.expansion, self.groups, self.weight_norm, self.conv_impl, dtype, **kw
        )

    def _shapes(self, x) -> list[tuple[int, int, int]]:
        """Per-sample ``(H_i, W_i, C_i)`` of each branch, from the injection ``x['injection']``."""
        _, h, w, _ = x["injection"].shape
        channels = self.arch()["channels"]
        scale = 2 ** (len(channels) - 1)
        if h % scale or w % scale:
            raise ValueError(
                f"{len(channels)} branches halve the resolution {len(channels) - 1} times: "
                f"the image size {h}x{w} must be divisible by {scale}"
            )
        return [(h // 2**i, w // 2**i, c) for i, c in enumerate(channels)]

    def _init_state(self, x):
        dtype = x["injection"].dtype
        b = x["injection"].shape[0]
        return tuple(jnp.zeros((b, *s), dtype) for s in self._shapes(x))

    def _z0(self, x):
        b = x["injection"].shape[0]
        d = sum(math.prod(s) for s in self._shapes(x))
        return jnp.zeros((b, d), precision.upcast(x["injection"]).dtype)

    def _f(self, p, x, z):
        """The solver's map on the flat state: unflatten, apply the layer, flatten (module docstring)."""
        dtype = precision.layer_dtype(self.dtype)
        zs = tuple(precision.cast(b, dtype) for b in unflatten_branches(z, self._shapes(x)))
        out = self._block(parent=None).apply({"params": p}, zs, x)
        return flatten_branches(out).astype(z.dtype)

    def _dropout_masks(self, x0, rate: float):
        """One scaled Bernoulli mask ``(B, 1, 1, C_i)`` per branch (variational dropout)."""
        key = self.make_rng("dropout")
        channels = self.arch()["channels"]
        keep = [
            jax.random.bernoulli(jax.random.fold_in(key, i), 1.0 - rate, (x0.shape[0], 1, 1, c))
            for i, c in enumerate(channels)
        ]
        return tuple(k.astype(jnp.float32) / (1.0 - rate) for k in keep)

    def _stem(self, images, dtype, train):
        """Two 3x3 conv + norm + relu at full resolution, plus a 1x1 stage for > 2 branches."""
        arch = self.arch()
        c0 = arch["channels"][0]
        x = precision.cast(images, dtype)
        names = ["stem1", "stem2"] + (["stage0"] if len(arch["channels"]) > 2 else [])
        for name in names:
            kernel = (1, 1) if name == "stage0" else (3, 3)
            x = ReferenceConv(c0, kernel, impl=self.conv_impl, dtype=dtype, name=f"{name}_conv")(x)
            x = nn.relu(outer_norm(self.norm, c0, self.groups, dtype, train=train, name=name)(x))
        return x

    @nn.compact
    def __call__(self, images, *, train=False, step=None, max_iter=None, return_intermediates=False):
        arch = self.arch()
        dtype = precision.layer_dtype(self.dtype)
        x0 = self._stem(images, dtype, train)
        x = {"injection": x0}
        if train and arch["dropout"] > 0:
            x["masks"] = self._dropout_masks(x0, arch["dropout"])
        if self.tied_only:
            z, metrics, aux = self._tied_phase(self._block_params(x), x)
        else:
            z, metrics, aux = self._solve(x, train=train, step=step, max_iter=max_iter)
        zs = tuple(precision.cast(b, dtype) for b in unflatten_branches(z, self._shapes(x)))
        head = MDEQHead(
            self.num_classes,
            arch["head_channels"],
            arch["final_channels"],
            self.groups,
            self.conv_impl,
            dtype,
            self.norm,
            name="head",
        )
        logits, pooled = head(zs, train)
        out = {"stem": x0, "branches": zs, "pre_logits": pooled, "metrics": metrics, "aux_loss": aux}
        if return_intermediates:
            out["block_outputs"] = z[None]
        return logits, out

    __call__.__doc__ = _CALL_DOC
