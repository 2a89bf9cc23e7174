"""A PyTorch twin of :class:`wtjax.models.resnet_like.ResNetLike` (multi-mask weight tying), for timings.

Same structure, shapes and masks as the Flax model: stem ``conv3x3(3 -> C)``, GroupNorm, relu;
``K`` reuses of ``f(z, x) = GN(relu(z + GN(x + conv2(GN(relu(conv1(z)))))))`` (bias-free 3x3
convolutions, ``groups`` GroupNorm groups) from ``z0 = 0``; global average pool and a linear head.
The per-reuse masks are the Flax model's own (:func:`wtjax.core.masks.masks_for` on its kernels,
HWIO transposed to PyTorch's OIHW), held as buffers: the twin computes the same function.
Needs the ``bench`` extra (``pip install -e ".[bench]"``).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


class Block(nn.Module):
    """``f(z, x)`` with the two kernels multiplied by the masks of the current reuse."""

    def __init__(self, width: int, groups: int):
        super().__init__()
        self.w1 = nn.Parameter(nn.Conv2d(width, width, 3, bias=False).weight.detach())
        self.w2 = nn.Parameter(nn.Conv2d(width, width, 3, bias=False).weight.detach())
        self.gn1, self.gn2, self.gn3 = (nn.GroupNorm(groups, width) for _ in range(3))

    def forward(self, z, x, m1, m2):
        y = self.gn1(F.relu(F.conv2d(z, self.w1 * m1, padding=1)))
        y = self.gn2(x + F.conv2d(y, self.w2 * m2, padding=1))
        return self.gn3(F.relu(z + y))


class TiedResNetTwin(nn.Module):
    """The multi-mask weight-tied ResNet-like model; ``masks``: ``(K, 2, C, C, 3, 3)`` in OIHW."""

    def __init__(self, width: int, depth: int, masks: np.ndarray, groups: int = 4, num_classes: int = 10):
        super().__init__()
        self.depth = depth
        self.stem = nn.Sequential(nn.Conv2d(3, width, 3, padding=1, bias=False), nn.GroupNorm(groups, width))
        self.block = Block(width, groups)
        self.head = nn.Linear(width, num_classes)
        self.register_buffer("masks", torch.as_tensor(masks, dtype=torch.float32))

    def forward(self, images):
        x = F.relu(self.stem(images))
        z = torch.zeros_like(x)
        for i in range(self.depth):
            z = self.block(z, x, self.masks[i, 0], self.masks[i, 1])
        return self.head(z.mean((2, 3)))


def flax_masks(model, params) -> np.ndarray:
    """The masks each reuse of a multi-mask ``ResNetLike`` applies to ``conv1`` and ``conv2``, OIHW."""
    from wtjax.core.masks import masks_for

    block = params["params"]["tied"]["block"]
    per_reuse = []
    for i in range(model.depth):
        masks = masks_for(block, model.mask, i, scope=("tied", "block"))
        per_reuse.append([np.asarray(masks[(c, "kernel")]).transpose(3, 2, 0, 1) for c in ("conv1", "conv2")])
    return np.asarray(per_reuse, dtype=np.float32)


def load_flax_params(twin: TiedResNetTwin, params) -> None:
    """Copy a ``ResNetLike``'s ``{'params': ...}`` into ``twin`` (the twin then computes its function)."""
    p = params["params"]
    block = p["tied"]["block"]

    def put(param, value, conv=False):
        value = np.array(value)  # a writable host copy
        param.data.copy_(torch.as_tensor(value.transpose(3, 2, 0, 1) if conv else value))

    def put_norm(norm, tree):
        put(norm.weight, tree["scale"])
        put(norm.bias, tree["bias"])

    put(twin.stem[0].weight, p["stem_conv"]["kernel"], conv=True)
    put_norm(twin.stem[1], p["stem_gn"])
    put(twin.block.w1, block["conv1"]["kernel"], conv=True)
    put(twin.block.w2, block["conv2"]["kernel"], conv=True)
    for name in ("gn1", "gn2", "gn3"):
        put_norm(getattr(twin.block, name), block[name])
    put(twin.head.weight, np.asarray(p["head"]["kernel"]).T)
    put(twin.head.bias, p["head"]["bias"])
