"""Model registry: every family exposes the same contract.

``model = build_model(name, **fields)`` returns a Linen module whose
``apply(variables, images, train=..., rngs={'dropout': key})`` returns ``(logits, out)``, where
``out`` is a dict of named intermediates (``pre_logits`` always; per-reuse ``block_outputs`` when
called with ``return_intermediates=True``). Variables hold a single collection, ``params``.
Unknown model names and unknown fields fail loudly.
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn

from wtjax.models.resnet_like import ResNetLike

MODELS: dict[str, type[nn.Module]] = {
    "resnet_like": ResNetLike,
}


def build_model(name: str, **fields) -> nn.Module:
    """Build the registered model ``name`` with the given dataclass ``fields``."""
    if name not in MODELS:
        raise KeyError(f"unknown model {name!r}; registered models: {sorted(MODELS)}")
    cls = MODELS[name]
    known = {f.name for f in dataclasses.fields(cls) if f.init and f.name not in ("parent", "name")}
    unknown = sorted(set(fields) - known)
    if unknown:
        raise TypeError(f"model {name!r} has no field(s) {unknown}; its fields are {sorted(known)}")
    return cls(**fields)
