"""Parameter and FLOP accounting for weight-tied (multi-mask) models.

For a model and its parameters this module reports:

* **stored** parameters: every leaf of ``params`` (a tied block counts once).
* **active per reuse**: the parameters one reuse of a tied block multiplies by a kept mask entry.
  A masked kernel of ``n`` entries counts ``round(d*n)`` (unstructured, density ``d``) or
  ``n*N/M`` (N:M); unmasked leaves (biases, norms, ``dense`` mode, not-tied stacks) count fully.
  The model's ``active`` total is ``stored`` with every masked kernel at its per-reuse count.
* **used**: the entries of the shared kernels kept by at least one mask over the K reuses,
  computed exactly as the union of the masks (:func:`wtjax.core.masks.masks_for`, the same call
  :class:`wtjax.core.tied.Tied` makes); its expectation is ``n * (1 - (1 - d)^K)`` for ``multi`` and
  ``d*n`` for ``same`` (one mask). ``stored`` masks (given, e.g. by a pruning method) are read
  from the model's ``masks`` collection; ``dropout`` ties count as dense (their masks are fresh
  random draws per training step, and none at evaluation); SPIN weight-mapped ties count one
  parameter set per reuse (their masks are not counted).
* **unrolled active**: parameters the equivalent unrolled network would hold, i.e. the model's
  non-tied parameters plus ``K`` times each tied block's active count (a not-tied stack counts
  its stored parameters).
* **FLOPs per image**: XLA's HLO cost analysis of the forward pass at batch 1 (a multiply-add
  counts 2, other element-wise ops 1 per element; convolution taps that fall on ``SAME`` padding
  are not counted). XLA counts a while loop's body once, so the
  count is taken on the unrolled program (the model cloned with ``scan=False``) and a program that
  still contains a loop is refused. Masks are not counted: the model is cloned with
  ``mask_mode='dense'``, since masked weights are multiplied densely (mask generation would only
  add element-wise work); the FLOPs are those of the dense computation.

Tied-block discovery (:func:`wtjax.core.mask_sites.find_ties`): the model's ``init`` is traced once
under :func:`jax.eval_shape` with a Flax method interceptor (:func:`flax.linen.intercept_methods`)
that records every :class:`~wtjax.core.tied.Tied` call: its module path, the depth it ran, its mask
mode, spec and scope and whether it is shared. Its block's parameters are then the subtree
``<path>/block`` of ``params`` (``<path>/block_i`` for an unrolled not-tied stack). This finds
ties under any name, in any model, including user models, and reads the mask settings from the
modules themselves instead of matching names.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from wtjax.core.mask_sites import TiedSite, find_ties  # noqa: F401 (TiedSite: part of this API)
from wtjax.core.masks import MaskSpec, kept_count, masks_for

Path = tuple[str, ...]


def count_params(tree) -> int:
    """Total number of entries of the leaves of ``tree`` (arrays or ShapeDtypeStructs)."""
    return int(sum(int(np.prod(leaf.shape)) for leaf in jax.tree_util.tree_leaves(tree)))


def _image_struct(image_shape: Sequence[int]) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct((1, *image_shape), jnp.float32)


def find_tied(
    model: nn.Module, image_shape: Sequence[int], call_kwargs: dict | None = None
) -> list[TiedSite]:
    """Every :class:`Tied` module ``model`` calls, found by tracing its ``init`` (no allocation).

    Args:
      model: an unbound Linen module.
      image_shape: one example's shape, e.g. ``(32, 32, 3)``.
      call_kwargs: keyword arguments of the model call (e.g. ``{'depth': 4}``).

    Returns:
      The tied sites in call order, one per module path (:func:`wtjax.core.mask_sites.find_ties`).
    """
    return find_ties(model, _image_struct(image_shape), **(call_kwargs or {}))


def _subtree(params, path: Path):
    for key in path:
        if key not in params:
            raise KeyError(
                f"no parameters at {'/'.join(path)!r}: the tied module's block parameters are not "
                "under its path (a block whose submodules were constructed outside it, e.g. "
                "nn.Sequential([nn.Dense(...)]) built in the parent, binds them to the parent)"
            )
        params = params[key]
    return params


def _kept(spec: MaskSpec, size: int) -> int:
    """Kept entries of one mask over ``size`` entries (exact for both mask kinds)."""
    if spec.kind == "nm":
        return size * spec.n // spec.m
    return kept_count(size, spec.density)


def _generated_masks(block, site: TiedSite) -> list[dict]:
    """The masks of ``same``/``multi`` reuses, made by the call :class:`Tied` makes."""
    # masks_for needs only shapes; materialise zeros so ShapeDtypeStructs work too.
    zeros = jax.tree_util.tree_map(lambda leaf: np.zeros(leaf.shape, np.float32), block)
    reuses = range(site.depth) if site.mask_mode == "multi" else range(1)
    # Same call as the tie's MaskView: masks hash the tie's mask identity "<mask_scope>/block/...".
    return [
        {p: np.asarray(m) for p, m in masks_for(zeros, site.mask, k, scope=site.mask_path).items()}
        for k in reuses
    ]


def _stored_masks(block, masks, site: TiedSite) -> list[dict]:
    """The per-reuse masks of a ``stored`` tie from the model's ``masks`` collection."""
    leaves = traverse_util.flatten_dict(block)
    flat = traverse_util.flatten_dict(_subtree(masks, site.path + ("block",)))
    # A stored mask is one mask for every reuse or K masks stacked on a leading axis: the same
    # rule as wtjax.core.views.apply_stored_masks (one more dimension than its parameter).
    stacked = {p: np.ndim(m) == len(leaves[p].shape) + 1 for p, m in flat.items()}
    return [{p: np.asarray(m[k] if stacked[p] else m) for p, m in flat.items()} for k in range(site.depth)]


def tied_site_accounting(params, site: TiedSite, masks=None) -> dict:
    """The counts of one tied site (see the module docstring).

    Args:
      params: the model's ``params`` collection (arrays or ShapeDtypeStructs).
      site: from :func:`find_tied`.
      masks: the model's ``masks`` collection, needed for ``mask_mode='stored'`` ties.

    Returns:
      A dict with ``path``, ``depth``, ``mask_mode``, ``shared``, ``mask`` (kind, density),
      ``block_params`` (stored under the tie), ``masked_params`` (entries of the masked leaves),
      ``active_per_reuse`` (the mean over reuses for stored masks of varying size), ``used``
      (exact union over the reuses), ``expected_used`` and ``note`` (what was not counted).
    """
    tree = _subtree(params, site.path)
    stored = count_params(tree)
    info = {
        "path": "/".join(site.path),
        "depth": site.depth,
        "mask_mode": site.mask_mode if site.shared else "not_tied",
        "shared": site.shared,
        "mask": None,
        "block_params": stored,
        "masked_params": 0,
        # A dropout tie is dense at evaluation (its masks are fresh random draws per step), a
        # not-tied stack is dense: all their parameters are active and used.
        "active_per_reuse": stored if site.shared else stored // site.depth,
        "used": stored,
        "expected_used": float(stored),
        "note": None,
    }
    if site.weight_map is not None:
        # SPIN sharing: one reuse sees one of the stacked parameter sets.
        per_layer = sum(
            int(np.prod(leaf.shape[1:])) for leaf in jax.tree_util.tree_leaves(tree.get("block", {}))
        )
        info["active_per_reuse"] = per_layer
        if site.mask_mode not in ("dense", "dropout"):
            info["note"] = "masks on weight-mapped (SPIN) ties are not counted"
        return info
    if not site.shared or site.mask_mode in ("dense", "dropout"):
        return info
    block_path = site.path + ("block",)
    if site.mask_mode == "stored":
        if masks is None:
            info["note"] = "stored masks not given: counted as dense"
            return info
        per_reuse = _stored_masks(_subtree(params, block_path), masks, site)
    else:
        per_reuse = _generated_masks(_subtree(params, block_path), site)
        info["mask"] = {"kind": site.mask.kind, "density": site.mask.effective_density}
    info.update(_masked_counts(stored, per_reuse, site))
    return info


def _masked_counts(stored: int, per_reuse: list[dict], site: TiedSite) -> dict:
    """The counts of a masked tie from its per-reuse masks (``stored``: parameters under the tie)."""
    union = {p: np.logical_or.reduce([m[p].astype(bool) for m in per_reuse]) for p in per_reuse[0]}
    sizes = {p: m.size for p, m in union.items()}
    n_masked = sum(sizes.values())
    if site.mask_mode == "stored":
        active = round(
            float(np.mean([sum(int(m.astype(bool).sum()) for m in r.values()) for r in per_reuse]))
        )
    else:
        d = site.mask.effective_density
        active = sum(_kept(site.mask, n) for n in sizes.values())
    used = stored - n_masked + int(sum(int(m.sum()) for m in union.values()))
    return dict(
        masked_params=n_masked,
        active_per_reuse=stored - n_masked + active,
        used=used,
        # Independent random masks: each entry is missed by all K with probability (1-d)^K. Stored
        # masks are given, not drawn: their expectation is their own count.
        expected_used=float(used)
        if site.mask_mode == "stored"
        else stored - n_masked + n_masked * (1.0 - (1.0 - d) ** len(per_reuse)),
    )


def flops_per_image(
    model: nn.Module, image_shape: Sequence[int], call_kwargs: dict | None = None, dense: bool = True
) -> float:
    """Forward FLOPs for one image from XLA's HLO cost analysis of the unrolled program.

    Args:
      model: the model; a ``scan`` field is set to ``False`` (XLA counts a loop body once) and,
        when ``dense``, a ``mask_mode`` field to ``'dense'``.
      image_shape: one example's shape.
      call_kwargs: keyword arguments of the model call (e.g. ``{'depth': 4}``).
      dense: count the dense computation (no mask generation or multiplies).

    Returns:
      The ``flops`` of the lowered (pre-optimisation) module at batch 1.

    Raises:
      ValueError: the program still contains a loop (a model without a ``scan`` field that scans).
    """
    fields = {f.name for f in dataclasses.fields(model)}
    changes = {}
    if "scan" in fields:
        changes["scan"] = False
    if dense and "mask_mode" in fields:
        changes["mask_mode"] = "dense"
    unrolled = model.clone(**changes) if changes else model
    kwargs = call_kwargs or {}
    images = _image_struct(image_shape)
    variables = jax.eval_shape(lambda key, x: unrolled.init(key, x, **kwargs), jax.random.PRNGKey(0), images)
    lowered = jax.jit(lambda v, x: unrolled.apply(v, x, **kwargs)).lower(variables, images)
    if "stablehlo.while" in lowered.as_text():
        raise ValueError(
            "the forward program contains a loop, whose body XLA's cost analysis counts once: "
            "give the model a `scan` field (or build it unrolled) to count its FLOPs"
        )
    cost = lowered.cost_analysis()
    if isinstance(cost, list | tuple):  # older JAX returned one dict per computation
        cost = cost[0]
    return float(cost["flops"])


def summary(
    model: nn.Module,
    params,
    image_shape: Sequence[int],
    call_kwargs: dict | None = None,
    flops: bool = True,
    masks=None,
) -> dict:
    """Parameter and FLOP accounting of ``model`` with ``params`` (see the module docstring).

    Args:
      model: an unbound Linen module.
      params: its ``params`` collection (arrays or ShapeDtypeStructs).
      image_shape: one example's shape, e.g. ``(32, 32, 3)``.
      call_kwargs: keyword arguments of the model call (e.g. ``{'depth': 16}`` to account for a
        different evaluation depth).
      flops: also compute FLOPs per image (lowers the unrolled forward pass).
      masks: the model's ``masks`` collection, for ties with ``mask_mode='stored'``.

    Returns:
      A JSON-serialisable dict: ``model``, ``stored``, ``active``, ``used``, ``expected_used``,
      ``unrolled_active``, ``tied`` (one dict per site, :func:`tied_site_accounting`) and
      ``flops_per_image`` (``None`` when not computed, with the reason in ``flops_note`` when the
      forward program loops, e.g. a DEQ solver).
    """
    sites = [tied_site_accounting(params, s, masks) for s in find_tied(model, image_shape, call_kwargs)]
    stored = count_params(params)
    flat_tied = sum(s["block_params"] for s in sites)
    untied = stored - flat_tied
    out = {
        "model": type(model).__name__,
        "stored": stored,
        # A not-tied stack is already unrolled: all its K blocks are active in one forward pass.
        "active": untied + sum(s["active_per_reuse"] if s["shared"] else s["block_params"] for s in sites),
        "used": untied + sum(s["used"] for s in sites),
        "expected_used": untied + sum(s["expected_used"] for s in sites),
        "unrolled_active": untied
        + sum(s["active_per_reuse"] * s["depth"] if s["shared"] else s["block_params"] for s in sites),
        "tied": sites,
        "flops_per_image": None,
        "flops_note": None,
    }
    if flops:
        try:
            out["flops_per_image"] = flops_per_image(model, image_shape, call_kwargs)
        except ValueError as e:  # e.g. a DEQ's solver loop: report the counts without FLOPs
            out["flops_note"] = str(e)
    return out


def _si(x: float) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(x) >= scale:
            return f"{x / scale:.3g}{unit}"
    return f"{x:.3g}"


def format_summary(s: dict) -> str:
    """A few human-readable lines of a :func:`summary` dict (what the training job prints)."""
    pct = lambda n: f"{100.0 * n / s['stored']:.1f}%" if s["stored"] else "-"  # noqa: E731
    lines = [
        f"{s['model']}: {s['stored']:,} stored parameters; active per reuse {s['active']:,} "
        f"({pct(s['active'])}); used by >=1 mask {s['used']:,} ({pct(s['used'])}, expected "
        f"{s['expected_used']:,.0f}); unrolled equivalent {s['unrolled_active']:,}"
    ]
    for t in s["tied"]:
        mask = f" {t['mask']['kind']} density {t['mask']['density']:.3g}" if t["mask"] else ""
        note = f" ({t['note']})" if t.get("note") else ""
        lines.append(
            f"  {t['path']}: {t['mask_mode']}{mask}, K={t['depth']}, {t['block_params']:,} stored, "
            f"{t['masked_params']:,} masked, {t['active_per_reuse']:,} active/reuse, {t['used']:,} used{note}"
        )
    if s.get("flops_per_image") is not None:
        lines.append(
            f"  forward FLOPs/image: {_si(s['flops_per_image'])} (XLA cost analysis, unrolled, dense)"
        )
    elif s.get("flops_note"):
        lines.append(f"  forward FLOPs/image: not counted ({s['flops_note']})")
    return "\n".join(lines)
