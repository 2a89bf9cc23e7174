"""Model registry: every family exposes the same contract.

``model = build_model(name, **fields)`` returns a Linen module whose
``apply(variables, images, train=..., rngs={'dropout': key})`` returns ``(logits, out)``, where
``out`` is a dict of named intermediates (``pre_logits`` always; per-reuse ``block_outputs`` when
called with ``return_intermediates=True``). Variables hold ``params``, plus a ``masks`` collection
only for ties with ``mask_mode='stored'`` (see :mod:`wtjax.core.tied`, :mod:`wtjax.methods.pruning`).
Unknown model names and unknown fields fail loudly. Every family has a ``dtype`` field, the compute
dtype of its mixed-precision policy (``'float32'``, the default, or ``'bfloat16'``;
:mod:`wtjax.core.precision`): parameters and returned logits are float32 in both.
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn

from wtjax.core import precision
from wtjax.models.cct import CCT
from wtjax.models.convmixer import ConvMixer
from wtjax.models.deq import DEQMLP, DEQResNetLike
from wtjax.models.deq_cct import DEQCCT
from wtjax.models.mdeq import MDEQ
from wtjax.models.mlp import MLP
from wtjax.models.mondeq import MonDEQConv, MonDEQFC
from wtjax.models.resnet20 import ResNet20
from wtjax.models.resnet_like import ResNetLike
from wtjax.models.vit import ViT
from wtjax.models.vit_shared import SharedViT

MODELS: dict[str, type[nn.Module]] = {
    "resnet_like": ResNetLike,
    "mlp": MLP,
    "resnet20": ResNet20,
    "vit": ViT,
    "deq_resnet_like": DEQResNetLike,
    "deq_mlp": DEQMLP,
    "mondeq_fc": MonDEQFC,
    "mondeq_conv": MonDEQConv,
    "cct": CCT,
    "convmixer": ConvMixer,
    "vit_shared": SharedViT,
    "deq_cct": DEQCCT,
    "mdeq": MDEQ,
}


def check_fields(name: str, fields) -> type[nn.Module]:
    """The registered class ``name`` after checking that it has every one of ``fields``.

    Raises ``KeyError`` (unknown model), ``TypeError`` (unknown field) or ``ValueError`` (unknown
    compute dtype) without building the model.
    """
    if name not in MODELS:
        raise KeyError(f"unknown model {name!r}; registered models: {sorted(MODELS)}")
    cls = MODELS[name]
    known = {f.name for f in dataclasses.fields(cls) if f.init and f.name not in ("parent", "name")}
    unknown = sorted(set(fields) - known)
    if unknown:
        raise TypeError(f"model {name!r} has no field(s) {unknown}; its fields are {sorted(known)}")
    if "dtype" in fields:
        precision.compute_dtype(fields["dtype"])  # a bad name fails here, before any tracing
    return cls


def build_model(name: str, **fields) -> nn.Module:
    """Build the registered model ``name`` with the given dataclass ``fields`` (checked first)."""
    return check_fields(name, fields)(**fields)
