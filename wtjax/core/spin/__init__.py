"""SPIN parameter sharing (Lin et al. 2022), in one place.

* :mod:`~wtjax.core.spin.sharing`: the maths (layer-to-weight maps, affine transforms, fusion);
* :mod:`~wtjax.core.spin.view`: the parameter view a :class:`wtjax.core.tied.Tied` with a
  ``weight_map`` delegates to (storage, per-reuse selection) and :func:`fold_fusion`;
* :mod:`~wtjax.core.spin.options`: the config-friendly model options (``form``, ``share_rate``, ...)
  turned into ``Tied`` arguments, fusion init from a not-tied model and fused export.
"""

from wtjax.core.spin.options import FORMS, export_fused, from_not_tied, tie_kwargs
from wtjax.core.spin.sharing import FUSIONS, LEARNABLE_FUSIONS, layer_to_weight
from wtjax.core.spin.view import SpinView, fold_fusion

__all__ = [
    "FORMS",
    "FUSIONS",
    "LEARNABLE_FUSIONS",
    "SpinView",
    "export_fused",
    "fold_fusion",
    "from_not_tied",
    "layer_to_weight",
    "tie_kwargs",
]
