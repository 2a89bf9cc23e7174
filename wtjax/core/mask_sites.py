"""The ties of a model and their mask identities: discovery, the clash check and a fingerprint.

A tie's generated masks are a pure function of ``(seed, reuse index, mask_scope/block/leaf)``
(:mod:`wtjax.core.masks`). This module answers three questions about a model:

* **where are its ties?** :func:`find_ties` traces a Linen model's ``init`` once under
  :func:`jax.eval_shape` (nothing is allocated) with a method interceptor
  (:func:`flax.linen.intercept_methods`) that records every :class:`~wtjax.core.tied.Tied` call;
  an NNX model's :class:`~wtjax.core.nnx_tied.NNXTied` modules are found by walking its graph.
* **do two of them draw the same masks?** :func:`mask_sites` raises a ValueError naming both ties
  when two mask-generating ties (``same``/``multi``) share ``(mask_scope, seed)``: a model whose
  ties were meant to have distinct masks would silently reuse one set.
* **which masks does a run use?** :func:`mask_identity` describes each tie (scope, seed, kind,
  density, mode) with a fingerprint of its reuse-0 and reuse-1 masks, what the training job
  records in its workdir and compares on resume (:mod:`wtjax.job.mask_record`).

This module imports only jax, flax and numpy.
"""

from __future__ import annotations

import dataclasses
import hashlib

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from wtjax.core.masks import MaskSpec, masks_for, tie_mask_path
from wtjax.core.tied import Tied

Path = tuple[str, ...]
#: The mask modes whose masks follow from (seed, scope): the ones a clash or a code change affects.
GENERATED_MODES = ("same", "multi")


@dataclasses.dataclass(frozen=True)
class TiedSite:
    """One tie found in a model.

    Attributes:
      path: the module path (e.g. ``('stage2_tied',)``); its block's parameters live at
        ``path + ('block',)`` (``path + ('block_i',)`` for an unrolled not-tied stack).
      depth: reuses K it ran in the traced call (a per-call ``depth=`` override included).
      mask_mode: ``dense``, ``same``, ``multi``, ``dropout`` or ``stored``.
      mask: its :class:`MaskSpec`.
      shared: ``True`` for a tie, ``False`` for a not-tied stack.
      weight_map: SPIN's layer-to-weight map (``None``: one shared set; block leaves then have
        no leading set axis).
      mask_scope: the tie's mask identity (:func:`wtjax.core.masks.tie_mask_path`).
    """

    path: Path
    depth: int
    mask_mode: str
    mask: MaskSpec
    shared: bool
    weight_map: tuple[int, ...] | None = None
    mask_scope: str | None = None

    @property
    def mask_path(self) -> Path:
        """The prefix its generated masks hash before each block leaf's path."""
        return tie_mask_path(self.mask_scope)

    @property
    def generates_masks(self) -> bool:
        """Whether its masks follow from (seed, scope) (``same``/``multi`` on a tied block)."""
        return self.shared and self.mask_mode in GENERATED_MODES


def find_ties(model, *init_args, **init_kwargs) -> list[TiedSite]:
    """Every tie of ``model`` in call order, one per module path.

    Args:
      model: an unbound Linen module (its ``init`` is traced with ``PRNGKey(0)`` and the given
        arguments, arrays or ``jax.ShapeDtypeStruct``s), or an ``nnx.Module`` (walked; no
        arguments needed).
    """
    if not isinstance(model, nn.Module):  # an NNX model (flax.nnx is imported only for those)
        return _nnx_ties(model)
    return _trace(model, init_args, init_kwargs)[0]


def _trace(model: nn.Module, init_args, init_kwargs) -> tuple[list[TiedSite], dict]:
    """``(sites, the variables' shapes)`` of one abstract ``model.init``."""
    sites: dict[Path, TiedSite] = {}

    def record(next_fun, args, kwargs, context):
        module = context.module
        is_run = context.method_name in ("__call__", "trajectory")
        if isinstance(module, Tied) and is_run and module.path not in sites:
            depth = kwargs.get("depth")
            sites[module.path] = TiedSite(
                path=tuple(module.path),
                depth=int(module.depth if depth is None else depth),
                mask_mode=module.mask_mode,
                mask=module.mask,
                shared=module.shared,
                weight_map=module.weight_map,
                mask_scope=module.mask_scope,
            )
        return next_fun(*args, **kwargs)

    def init(key, *args):
        with nn.intercept_methods(record):
            return model.init(key, *args, **init_kwargs)

    variables = jax.eval_shape(init, jax.random.PRNGKey(0), *init_args)
    return list(sites.values()), variables


def _nnx_ties(model) -> list[TiedSite]:
    from flax import nnx

    from wtjax.core.nnx_tied import NNXTied

    if not isinstance(model, nnx.Module):
        raise TypeError(f"mask_sites needs a Linen or an NNX module, got {type(model).__name__}")

    return [
        TiedSite(tuple(str(p) for p in path), m.depth, m.mask_mode, m.mask, True, None, m.mask_scope)
        for path, m in nnx.iter_modules(model)
        if isinstance(m, NNXTied)
    ]


def check_distinct(sites: list[TiedSite]) -> None:
    """A ValueError naming both ties if two mask-generating ties share ``(mask_scope, seed)``."""
    seen: dict[tuple, TiedSite] = {}
    for site in sites:
        if not site.generates_masks:
            continue
        key = (site.mask_scope, site.mask.seed)
        if key in seen:
            first = seen[key]
            raise ValueError(
                f"the ties {_name(first.path)!r} and {_name(site.path)!r} have the same mask identity "
                f"(mask_scope={site.mask_scope!r}, seed={site.mask.seed}), so they would draw the same "
                "masks: give each its own mask_scope (e.g. its name) or its own mask seed"
            )
        seen[key] = site


def mask_sites(model, *init_args, **init_kwargs) -> list[TiedSite]:
    """The ties of ``model`` (:func:`find_ties`), checked for a mask clash (:func:`check_distinct`).

    Call it where a model is built (the training job does) so that two ties drawing the same
    masks fail at the start, not after training::

        mask_sites(MyNet(), jnp.zeros((1, 32, 32, 3)))  # ValueError naming both ties on a clash
    """
    sites = find_ties(model, *init_args, **init_kwargs)
    check_distinct(sites)
    return sites


def _name(path: Path) -> str:
    return "/".join(path) or "(top level)"


def block_shapes(params, site: TiedSite) -> dict | None:
    """The per-reuse shapes of ``site``'s block leaves in ``params`` (``None`` if not there)."""
    tree = params
    for key in site.path + ("block",):
        if not isinstance(tree, dict) or key not in tree:
            return None
        tree = tree[key]
    # A weight-mapped (SPIN) tie stores its block leaves with a leading set/layer axis.
    drop = 0 if site.weight_map is None else 1
    return jax.tree.map(lambda leaf: tuple(leaf.shape[drop:]), tree)


def fingerprint(site: TiedSite, shapes: dict) -> str:
    """sha256 (16 hex digits) of the tie's reuse-0 and reuse-1 masks over its block leaves."""
    zeros = jax.tree.map(lambda s: jnp.zeros(s, jnp.float32), shapes, is_leaf=lambda s: isinstance(s, tuple))
    digest = hashlib.sha256()
    for reuse in (0, 1):
        for path, mask in sorted(masks_for(zeros, site.mask, reuse, scope=site.mask_path).items()):
            digest.update("/".join(path).encode())
            digest.update(np.packbits(np.asarray(mask)).tobytes())
    return digest.hexdigest()[:16]


def mask_identity(sites: list[TiedSite], params) -> list[dict]:
    """A JSON description of each tie's masks: path, mode, scope, kind, density, seed, fingerprint.

    ``params``: the model's ``params`` (arrays or shapes) whose block leaves the fingerprint
    masks; ``fingerprint`` is ``None`` for ties without generated masks.
    """
    described = []
    for site in sites:
        shapes = block_shapes(params, site) if site.generates_masks else None
        spec = site.mask
        described.append(
            {
                "path": _name(site.path),
                "mask_mode": site.mask_mode if site.shared else "not_tied",
                "mask_scope": site.mask_scope,
                "kind": spec.kind,
                "density": spec.effective_density,
                "nm": [spec.n, spec.m] if spec.kind == "nm" else None,
                "seed": spec.seed,
                "fingerprint": None if shapes is None else fingerprint(site, shapes),
            }
        )
    return described


def model_mask_identity(model: nn.Module, *init_args, **init_kwargs) -> list[dict]:
    """:func:`mask_identity` of a Linen ``model``, after the clash check (one abstract ``init``)."""
    sites, variables = _trace(model, init_args, init_kwargs)
    check_distinct(sites)
    return mask_identity(sites, variables.get("params", {}))
