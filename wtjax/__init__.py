"""wtjax: weight-tied, multi-mask and implicit vision models in JAX/Flax.

The public API is the tied block and its masks; importing it pulls in only jax, flax and numpy::

    from wtjax import Tied, MaskSpec

``NNXTied`` (the same tie for Flax NNX models, :mod:`wtjax.core.nnx_tied`) is imported on first
use, since ``flax.nnx`` itself imports optax; ``mask_sites`` finds a model's ties and their mask
identities (:mod:`wtjax.core.mask_sites`).
Modules live in layer packages, each importing only from the ones below it: ``core`` (the tie
and its parameter views), ``implicit`` (DEQ solvers), ``data``, ``models``, ``methods``
(pruning, LoRA), ``analysis``, ``job`` (training), ``tools`` (sweeps, AOT compiles); see
``docs/architecture.md``. The flat 0.1 module paths still import, with a deprecation warning.
"""

from wtjax import _moved
from wtjax.core.mask_sites import mask_sites
from wtjax.core.masks import MaskSpec, apply_masks, mask_key, masks_for, nm_mask, unstructured_mask
from wtjax.core.tied import Tied

__all__ = [
    "MaskSpec",
    "NNXTied",
    "Tied",
    "apply_masks",
    "mask_key",
    "mask_sites",
    "masks_for",
    "nm_mask",
    "unstructured_mask",
]


def __getattr__(name: str):
    if name == "NNXTied":  # lazily: importing flax.nnx pulls in optax
        from wtjax.core.nnx_tied import NNXTied

        return NNXTied
    raise AttributeError(f"module 'wtjax' has no attribute {name!r}")


__version__ = "0.1.0"

_moved.install()
