"""wtjax: weight-tied, multi-mask and implicit vision models in JAX/Flax.

The public API is the tied block and its masks; importing it pulls in only jax, flax and numpy::

    from wtjax import Tied, MaskSpec
"""

from wtjax.masks import MaskSpec, apply_masks, mask_key, masks_for, nm_mask, unstructured_mask
from wtjax.tied import Tied

__all__ = ["MaskSpec", "Tied", "apply_masks", "mask_key", "masks_for", "nm_mask", "unstructured_mask"]
__version__ = "0.1.0"
