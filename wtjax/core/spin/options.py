"""SPIN sharing options shared by the isotropic models (ConvMixer, CCT, shared ViT).

Every model with a stack of identical layers exposes the same config-friendly fields (declared
once, by :class:`wtjax.models.tying.SpinModel`) and turns them into :class:`wtjax.core.tied.Tied`
arguments here, so there is one implementation of tying:

* ``form``: ``not_tied`` (one parameter set per layer), ``tied`` (one set reused by every layer,
  optionally multi-masked) or ``shared`` (a SPIN topology: ``depth / share_rate`` sets);
* ``share_rate``, ``share_mapping``, ``share_distribution``, ``share_seed``: the topology
  (:func:`wtjax.core.spin.sharing.layer_to_weight`);
* ``share_params``: a name choosing which block parameters follow the topology (the rest stay
  per layer), resolved by the model;
* ``affine_groups`` (0: off) and ``fusion`` (``'none'`` or a :data:`wtjax.core.spin.sharing.FUSIONS` name).

:func:`from_not_tied` initialises a fused model from a trained not-tied one (SPIN's weight fusion)
and :func:`export_fused` folds the fusion away (SPIN: "F does not incur a cost at inference").
"""

from __future__ import annotations

from collections.abc import Callable

from wtjax.core.spin import sharing
from wtjax.core.spin.view import fold_fusion

FORMS = ("not_tied", "tied", "shared")


def tie_kwargs(model, share_predicate: Callable | None) -> dict:
    """The ``Tied`` fields for ``model``'s ``form`` and sharing fields (its ``depth`` layers)."""
    if model.form not in FORMS:
        raise ValueError(f"unknown form {model.form!r}; choose one of {FORMS}")
    if model.form != "shared":
        if model.fusion != "none" or model.affine_groups:
            raise ValueError("fusion and affine_groups need form='shared'")
        return dict(shared=model.form == "tied")
    weight_map = sharing.layer_to_weight(
        model.depth, model.share_rate, model.share_mapping, model.share_distribution, seed=model.share_seed
    )
    return dict(
        weight_map=weight_map,
        share_predicate=share_predicate,
        affine_groups=model.affine_groups or None,
        fusion=None if model.fusion == "none" else model.fusion,
    )


def from_not_tied(fused_init: dict, not_tied: dict, tie_name: str) -> dict:
    """Parameters of a ``fusion`` model initialised from a trained ``not_tied`` model.

    Both models have the same layout outside the tie, and the tie of a fusion model stores every
    block parameter per layer exactly like the not-tied stack; only the fusion weights (and the
    affine transforms, if any) come from ``fused_init``, where they start as the identity.

    Args:
      fused_init: ``params`` from ``init`` of the model with ``form='shared'`` and a ``fusion``.
      not_tied: ``params`` of the trained model with ``form='not_tied'`` (same sizes).
      tie_name: the name of the ``Tied`` submodule in both models.
    """
    out = dict(not_tied)
    out[tie_name] = {**fused_init[tie_name], "block": not_tied[tie_name]["block"]}
    return out


def export_fused(model, params: dict, tie_name: str, share_predicate: Callable | None):
    """Fold the fusion of a trained ``form='shared'`` model into plain shared weights.

    Returns:
      ``(export_model, export_params)``: the same model with ``fusion='none'`` and its parameters
      (the learnable fusion weights gone, ``P`` sets per shared leaf); same outputs.
    """
    if model.form != "shared" or model.fusion == "none":
        raise ValueError("only a form='shared' model with a fusion has something to fold")
    weight_map = tie_kwargs(model, share_predicate)["weight_map"]
    folded = dict(params)
    folded[tie_name] = fold_fusion(params[tie_name], weight_map, model.fusion, share_predicate)
    return model.clone(fusion="none"), folded
