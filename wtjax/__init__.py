"""wtjax: weight-tied, multi-mask and implicit vision models in JAX/Flax.

The public API is the tied block and its masks; importing it pulls in only jax, flax and numpy::

    from wtjax import Tied, MaskSpec
Modules live in layer packages, each importing only from the ones below it: ``core`` (the tie
and its parameter views), ``implicit`` (DEQ solvers), ``data``, ``models``, ``methods``
(pruning, LoRA), ``analysis``, ``job`` (training), ``tools`` (sweeps, AOT compiles); see
``docs/architecture.md``. The flat 0.1 module paths still import, with a deprecation warning.
"""

from wtjax import _moved
from wtjax.core.masks import MaskSpec, apply_masks, mask_key, masks_for, nm_mask, unstructured_mask
from wtjax.core.tied import Tied

__all__ = ["MaskSpec", "Tied", "apply_masks", "mask_key", "masks_for", "nm_mask", "unstructured_mask"]
__version__ = "0.1.0"

_moved.install()
