r"""Pruning at initialisation: random, magnitude, SNIP, GraSP and SynFlow scores, exact-sparsity masks.

Two steps (Pham et al., "Pruning deep equilibrium models", App. B):

* :func:`score` ``(method, loss_fn, params, batch) -> scores``: an importance per selected weight
  (higher = keep), a pure function of the parameters:

  - ``random``: ``U(0, 1)`` from ``key`` (folded with a hash of the path);
  - ``magnitude``: ``|w|``;
  - ``snip`` (Lee et al. 2019): ``|w * dL/dw|`` on one batch;
  - ``grasp`` (Wang et al. 2020): ``w * (H g)`` with ``g = dL/dw`` and ``H`` the Hessian of the
    loss, ``H g`` a Hessian-vector product (``jvp`` of ``grad``). GraSP's paper score is
    ``S = -w * (H g)`` and it removes the *largest* ``S``; we return ``-S`` so that, like every
    other method, the largest scores are kept;
  - ``synflow`` (Tanaka et al. 2020), data-free and iterative: with every parameter replaced by
    its absolute value, ``R = loss_fn(|params| * mask, batch)`` (``loss_fn`` returns the sum of the
    network outputs and ``batch`` is an all-ones input), score ``|w * dR/dw|``; repeated
    ``iterations`` times, pruning to density ``d^{n/N}`` at round ``n`` (the exponential schedule,
    ``d = 1 - sparsity``). The returned scores are the last round's with already-pruned weights at
    ``-inf``, so ``masks_from_scores(scores, sparsity)`` reproduces the final mask.

* :func:`masks_from_scores` ``(scores, sparsity, scope) -> bool masks`` keeps exactly
  ``n - round(sparsity * n)`` weights, over all selected weights (``global``) or per tensor
  (``layer``). Ties are broken deterministically: at equal score the weight earlier in the
  order (sorted path, then row-major index) is kept; NaN scores rank lowest.

Masks are partial trees (only the masked leaves), the layout of :class:`wtjax.core.tied.Tied`'s
``stored`` masks; :func:`zero_pruned_weights` multiplies them into a parameter tree.

**Tied blocks** (:func:`prune_model`). One scored mask per shared tensor (``per_reuse=False``): the
shared weight is scored like any other (its gradient is the sum of the per-reuse gradients).
``K`` scored masks (``per_reuse=True``): every reuse's *effective weight* ``w_k`` (what reuse
``k`` multiplies with) is made an independent variable and scored: parameters of the block are
set to ones and ``w_k`` is passed as the reuse-``k`` slice of the ``masks`` collection (the stored
mask mode computes ``1 * w_k``), so ``dL/dw_k`` is the gradient through reuse ``k`` alone. SNIP's
``|w_k dL/dw_k|`` is then the connection sensitivity of that reuse; GraSP's Hessian is taken over
all ``(w_1..w_K)`` jointly; magnitude gives ``K`` equal masks (up to tie-breaking) and random ``K``
independent ones. Sparsity is counted over the ``K`` views (each reuse keeps its own fraction in
``layer`` scope). The result: ``{'params': masks multiplied into ordinary layers, 'masks': the
stored-masks collection of the tied block}``, a pytree the training state holds, so it is
checkpointed and sharded with it.

This module imports only jax, flax and numpy.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from wtjax.core.masks import default_predicate, path_id

METHODS = ("random", "magnitude", "snip", "grasp", "synflow")
SCOPES = ("global", "layer")
Path = tuple[str, ...]


# ------------------------------------------------------------------------------------ selection


def path_predicate(include: Sequence[str] = (), exclude: Sequence[str] = ()) -> Callable:
    """Kernels (``default_predicate``) whose ``'a/b/c'`` path contains an ``include`` substring
    (any, if ``include`` is empty) and no ``exclude`` substring. E.g. ``include=('mon/',)`` selects
    a monDEQ's implicit layer only."""
    include, exclude = tuple(include), tuple(exclude)

    def predicate(path: Path, leaf) -> bool:
        name = "/".join(path)
        if not default_predicate(path, leaf):
            return False
        if include and not any(s in name for s in include):
            return False
        return not any(s in name for s in exclude)

    return predicate


def _flat(tree) -> dict:
    return traverse_util.flatten_dict(tree) if tree else {}


def _selected(tree, predicate) -> dict:
    pred = predicate or default_predicate
    return {p: v for p, v in sorted(_flat(tree).items()) if pred(p, v)}


def _partial(flat: dict):
    return traverse_util.unflatten_dict(flat) if flat else {}


# --------------------------------------------------------------------------------------- scores


def score(
    method: str,
    loss_fn: Callable | None,
    params,
    batch=None,
    *,
    predicate: Callable | None = None,
    key: jax.Array | None = None,
    sparsity: float | None = None,
    scope: str = "global",
    iterations: int = 100,
):
    """Importance scores of the selected weights (higher = keep); see the module docstring.

    Args:
      method: one of :data:`METHODS`.
      loss_fn: ``loss_fn(params, batch) -> scalar``: the training loss (``snip``, ``grasp``) or the
        sum of the outputs (``synflow``, called with ``|params|`` and an all-ones ``batch``).
        Unused by ``random`` and ``magnitude``.
      params: the parameter pytree (nested dicts).
      batch: the argument passed to ``loss_fn``.
      predicate: ``predicate(path, leaf) -> bool`` chooses the scored (prunable) leaves; default
        :func:`wtjax.core.masks.default_predicate` (kernels).
      key: PRNG key (``random``).
      sparsity, scope, iterations: ``synflow`` only: its target, pruning scope and rounds.

    Returns:
      A partial tree (only selected leaves) of float scores shaped like the weights.
    """
    if method not in METHODS:
        raise ValueError(f"unknown pruning method {method!r}; choose one of {METHODS}")
    selected = _selected(params, predicate)
    if not selected:
        raise ValueError("the predicate selects no parameter to prune")
    if method == "random":
        if key is None:
            raise ValueError("random pruning needs a PRNG key")
        return _partial(
            {p: jax.random.uniform(jax.random.fold_in(key, path_id(p)), v.shape) for p, v in selected.items()}
        )
    if method == "magnitude":
        return _partial({p: jnp.abs(v) for p, v in selected.items()})
    if loss_fn is None:
        raise ValueError(f"{method} needs a loss_fn")
    if method == "snip":
        grads = _flat(jax.jit(jax.grad(loss_fn))(params, batch))
        return _partial({p: jnp.abs(v * grads[p]) for p, v in selected.items()})
    if method == "grasp":
        return jax.jit(lambda q, b: _grasp(loss_fn, q, b, _selected(q, predicate)))(params, batch)
    if sparsity is None:
        raise ValueError("synflow needs the target sparsity (it prunes iteratively)")
    return _synflow(loss_fn, params, batch, predicate, sparsity, scope, iterations)


def _grasp(loss_fn, params, batch, selected):
    grad_fn = jax.grad(loss_fn)
    g = grad_fn(params, batch)
    # GraSP differentiates only along the prunable weights: the tangent is g on them, 0 elsewhere.
    flat_g = _flat(g)
    tangent = _partial(
        {p: (flat_g[p] if p in selected else jnp.zeros_like(v)) for p, v in _flat(params).items()}
    )
    _, hg = jax.jvp(lambda q: grad_fn(q, batch), (params,), (tangent,))
    flat_hg = _flat(hg)
    return _partial({p: v * flat_hg[p] for p, v in selected.items()})


def _synflow(loss_fn, params, batch, predicate, sparsity, scope, iterations):
    if iterations < 1:
        raise ValueError(f"synflow needs iterations >= 1, got {iterations}")
    abs_params = jax.tree.map(jnp.abs, params)

    @jax.jit
    def round_scores(masks):
        def objective(p):
            return loss_fn(zero_pruned_weights(p, masks), batch)

        grads = _flat(jax.grad(objective)(abs_params))
        flat_masks = _flat(masks)
        out = {}
        for p, v in _selected(abs_params, predicate).items():
            s = jnp.abs(v * grads[p])
            out[p] = jnp.where(flat_masks[p], s, -jnp.inf) if p in flat_masks else s
        return _partial(out)

    masks = _partial({p: jnp.ones(v.shape, bool) for p, v in _selected(params, predicate).items()})
    density = 1.0 - sparsity
    for n in range(1, iterations + 1):
        scores = round_scores(masks)
        masks = masks_from_scores(scores, 1.0 - density ** (n / iterations), scope)
    return scores


# ---------------------------------------------------------------------------------------- masks


def _keep_top(values: np.ndarray, keep: int) -> np.ndarray:
    """Bool mask of the ``keep`` largest values; ties go to the earlier index; NaN ranks lowest."""
    v = np.where(np.isnan(values), -np.inf, values.astype(np.float64))
    order = np.argsort(-v, kind="stable")
    mask = np.zeros(v.shape, bool)
    mask[order[:keep]] = True
    return mask


def kept_at_sparsity(size: int, sparsity: float) -> int:
    """Weights kept out of ``size`` at ``sparsity``: ``size - round(sparsity * size)``."""
    return size - int(round(sparsity * size))


def masks_from_scores(scores, sparsity: float, scope: str = "global", predicate: Callable | None = None):
    """Boolean masks keeping the highest scores at exactly the target sparsity.

    Args:
      scores: a (partial) tree of scores, e.g. from :func:`score`.
      sparsity: fraction of the selected weights removed, in ``[0, 1]``.
      scope: ``global`` (one ranking over every selected weight) or ``layer`` (each tensor pruned
        to ``sparsity`` on its own).
      predicate: optionally restrict to these leaves (``predicate(path, leaf)``); default: all
        leaves of ``scores``.

    Returns:
      A partial tree of bool arrays, same paths and shapes as the selected scores. ``global``
      prunes exactly ``round(sparsity * n)`` of the ``n`` selected weights, ``layer`` exactly
      ``round(sparsity * n_l)`` of each tensor's ``n_l``.
    """
    if scope not in SCOPES:
        raise ValueError(f"unknown pruning scope {scope!r}; choose one of {SCOPES}")
    if not 0.0 <= sparsity <= 1.0:
        raise ValueError(f"sparsity must be in [0, 1], got {sparsity}")
    flat = {p: np.asarray(jax.device_get(v)) for p, v in sorted(_flat(scores).items())}
    if predicate is not None:
        flat = {p: v for p, v in flat.items() if predicate(p, v)}
    if not flat:
        raise ValueError("no scores to prune")
    if scope == "layer":
        return _partial(
            {
                p: jnp.asarray(_keep_top(v.ravel(), kept_at_sparsity(v.size, sparsity)).reshape(v.shape))
                for p, v in flat.items()
            }
        )
    values = np.concatenate([v.ravel() for v in flat.values()])
    keep = _keep_top(values, kept_at_sparsity(values.size, sparsity))
    out, start = {}, 0
    for p, v in flat.items():
        out[p] = jnp.asarray(keep[start : start + v.size].reshape(v.shape))
        start += v.size
    return _partial(out)


def zero_pruned_weights(params, masks):
    """``params`` with every leaf that has a mask in ``masks`` (a partial tree) multiplied by it."""
    if not masks:
        return params
    flat = _flat(params)
    for p, m in _flat(masks).items():
        if p not in flat:
            raise ValueError(f"a mask at {'/'.join(p)} has no parameter")
        if m.shape != flat[p].shape:
            raise ValueError(f"mask at {'/'.join(p)} has shape {m.shape}; the parameter is {flat[p].shape}")
        flat[p] = flat[p] * m.astype(flat[p].dtype)
    return traverse_util.unflatten_dict(flat)


def sparsity_report(masks) -> dict[str, float]:
    """Fraction pruned per masked leaf (``'a/b/c'``) and overall (``'all'``)."""
    flat = {"/".join(p): np.asarray(jax.device_get(m)) for p, m in sorted(_flat(masks).items())}
    report = {k: float(1.0 - m.mean()) for k, m in flat.items()}
    total = sum(m.size for m in flat.values())
    report["all"] = float(1.0 - sum(m.sum() for m in flat.values()) / max(total, 1))
    return report


# ----------------------------------------------------------------------------- whole models


def model_variables(params, masks):
    """The ``apply`` variables of a pruned model: masked params plus the stored-masks collection.

    Args:
      params: the (dense) trained parameters.
      masks: ``{'params': partial mask tree, 'masks': stored-masks collection}`` from
        :func:`prune_model` (``None``: no pruning).
    """
    if not masks:
        return {"params": params}
    variables = {"params": zero_pruned_weights(params, masks.get("params"))}
    if masks.get("masks"):
        variables["masks"] = masks["masks"]
    return variables


def _nest(path: Path, tree):
    for k in reversed(path):
        tree = {k: tree}
    return tree


@dataclasses.dataclass(frozen=True, eq=False)  # eq=False: hashable by identity (holds arrays)
class _ScoredTree:
    """What :func:`prune_model` differentiates: ``{'params': ...}``, plus per-reuse views of a tie.

    ``tied_leaves`` maps the prunable leaves of the tied block (paths relative to ``tied_path``)
    to their initial values. With ``per_reuse`` the block's params are set to one and reuse
    ``k``'s effective weights ``w_k`` are the leaves ``views/<k>/...``, passed to the model as
    slice ``k`` of the ``masks`` collection (module docstring).
    """

    predicate: Callable
    tied_path: Path | None
    tied_leaves: dict
    per_reuse: bool
    depth: int | None

    def in_tie(self, p: Path) -> bool:
        return self.tied_path is not None and p[: len(self.tied_path)] == self.tied_path

    def tree(self, params) -> dict:
        """The scored tree of the initial ``params``."""
        if not self.per_reuse:
            return {"params": params}
        # Effective weights as independent variables: block params set to one, w_k in the views.
        base = dict(_flat(params))
        for rel in self.tied_leaves:
            base[self.tied_path + rel] = jnp.ones_like(base[self.tied_path + rel])
        views = {str(k): _partial(dict(self.tied_leaves)) for k in range(self.depth)}
        return {"params": traverse_util.unflatten_dict(base), "views": views}

    def variables(self, t) -> dict:
        """The model's ``apply`` variables of a scored tree ``t``."""
        v = {"params": t["params"]}
        if self.per_reuse:
            views = [t["views"][str(k)] for k in range(self.depth)]
            v["masks"] = _nest(self.tied_path, jax.tree.map(lambda *xs: jnp.stack(xs), *views))
        elif self.tied_path is not None:
            ones = {p: jnp.ones_like(x) for p, x in self.tied_leaves.items()}
            v["masks"] = _nest(self.tied_path, _partial(ones))
        return v

    def scored(self, p: Path, leaf) -> bool:
        """The predicate over the scored tree: every view, prunable params outside a per-reuse tie."""
        if p[0] == "views":
            return True
        return self.predicate(p[1:], leaf) and not (self.per_reuse and self.in_tie(p[1:]))

    def split(self, masks: dict) -> dict:
        """The flat masks of the scored tree as ``{'params': partial tree, 'masks': collection}``."""
        param_masks, stored = {}, {}
        for p, m in masks.items():
            if p[0] == "params" and not self.in_tie(p[1:]):
                param_masks[p[1:]] = m
            elif p[0] == "params":
                stored[p[1 + len(self.tied_path) :]] = m
        if self.per_reuse:
            per = [
                _flat(_partial({p[2:]: m for p, m in masks.items() if p[:2] == ("views", str(k))}))
                for k in range(self.depth)
            ]
            for rel in self.tied_leaves:
                stored[rel] = jnp.stack([per[k][rel] for k in range(self.depth)])
        return {
            "params": _partial(param_masks),
            "masks": _nest(self.tied_path, _partial(stored)) if stored else {},
        }


def _scoring_loss(method: str, apply_fn: Callable, variables: Callable, images) -> Callable:
    """``loss_fn(tree, batch)``: SynFlow's summed output on ones, else the cross-entropy."""
    if method == "synflow":
        ones = jnp.ones_like(images)

        def synflow_objective(t, _):
            return jnp.sum(apply_fn(variables(t), ones))

        return synflow_objective

    def cross_entropy(t, b):
        logits = apply_fn(variables(t), b["image"])
        labels = jax.nn.one_hot(b["label"], logits.shape[-1])
        return -jnp.mean(jnp.sum(labels * jax.nn.log_softmax(logits), -1))

    return cross_entropy


def prune_model(
    method: str,
    apply_fn: Callable,
    params,
    batch: dict,
    sparsity: float,
    *,
    scope: str = "global",
    predicate: Callable | None = None,
    key: jax.Array | None = None,
    tied_path: Path | None = None,
    per_reuse: bool = False,
    depth: int | None = None,
    iterations: int = 100,
) -> dict:
    """Score and prune a classifier at initialisation (what :func:`init_masks` calls).

    Args:
      method: one of :data:`METHODS`.
      apply_fn: ``apply_fn(variables, images) -> logits`` (the model's forward pass).
      params: the initial parameters.
      batch: ``{'image', 'label'}``: SNIP/GraSP's mini-batch (SynFlow uses ``ones_like(image)``).
      sparsity, scope, predicate, key, iterations: see :func:`score`, :func:`masks_from_scores`.
      tied_path: the params path of a ``Tied(mask_mode='stored')`` block's parameters, e.g.
        ``('tied', 'block')``: its masks go to the ``masks`` collection instead of being
        multiplied into the parameters. ``None``: no tied block.
      per_reuse: score ``depth`` masks for the tied block, one per reuse (module docstring).
      depth: the number of reuses (``per_reuse``).

    Returns:
      ``{'params': partial bool tree, 'masks': stored-masks collection (possibly empty)}``;
      use with :func:`model_variables`.
    """
    pred = predicate or default_predicate
    tied_path = tuple(tied_path) if tied_path else None
    if per_reuse and (tied_path is None or not depth):
        raise ValueError("per_reuse pruning needs tied_path and depth")
    n = len(tied_path or ())
    tied_leaves = {
        p[n:]: v for p, v in _flat(params).items() if tied_path and p[:n] == tied_path and pred(p, v)
    }
    if tied_path is not None and not tied_leaves:
        raise ValueError(f"no prunable parameter under tied_path {'/'.join(tied_path)}")
    scored = _ScoredTree(pred, tied_path, tied_leaves, per_reuse, depth)
    images = jnp.asarray(batch["image"])
    scores = score(
        method,
        _scoring_loss(method, apply_fn, scored.variables, images),
        scored.tree(params),
        {"image": images, "label": jnp.asarray(batch["label"])},
        predicate=scored.scored,
        key=key,
        sparsity=sparsity,
        scope=scope,
        iterations=iterations,
    )
    return scored.split(_flat(masks_from_scores(scores, sparsity, scope)))


def init_masks(
    pruning_config, model, params, batch: dict, key: jax.Array, *, batch_stats=None
) -> dict | None:
    """The masks of ``config.pruning`` for a model's initial params, or ``None`` when it is off.

    The training job computes them at start-up and holds them in a :class:`PruningHook` (which puts
    them in the training state, ``state.masks``, used through :func:`model_variables` in every
    train and eval step).

    Args:
      pruning_config: ``config.pruning`` (fields of :func:`wtjax.job.config.pruning_config`):
        ``method`` (``None``: off), ``sparsity``, ``scope``, ``include``/``exclude`` (path
        substrings selecting the pruned kernels), ``per_reuse``, ``tied_path``, ``iterations``.
      model: the Linen model (``model.apply(variables, images)`` returns ``(logits, out)``). A model
        whose ``mask_mode`` is ``'stored'`` gets its tied-block masks in the ``masks`` collection
        (``tied_path``); any other model has every mask multiplied into its parameters.
      params: the initial parameters.
      batch: ``{'image', 'label'}`` training batch for SNIP/GraSP (SynFlow only uses its shape).
      key: PRNG key of the random scores.
      batch_stats: the model's initial ``batch_stats`` collection (BatchNorm outside the tie), or
        ``None``. The scores are computed with ``train=False``, so BatchNorm normalises with these
        running statistics, as every other pass does at ``train=False``.
    """
    method = pruning_config.get("method") if hasattr(pruning_config, "get") else pruning_config.method
    if method is None:
        return None
    stored = getattr(model, "mask_mode", None) == "stored"
    per_reuse = bool(pruning_config.per_reuse)
    if per_reuse and not stored:
        raise ValueError("pruning.per_reuse needs a tied model with mask_mode='stored'")
    if stored and getattr(model, "weight_map", None) is not None:
        raise ValueError("pruning a SPIN weight-mapped tie is not supported")

    state = {} if batch_stats is None else {"batch_stats": batch_stats}

    def apply_fn(variables, images):
        return model.apply({**variables, **state}, images, train=False)[0]

    return prune_model(
        method,
        apply_fn,
        params,
        batch,
        float(pruning_config.sparsity),
        scope=pruning_config.scope,
        predicate=path_predicate(tuple(pruning_config.include or ()), tuple(pruning_config.exclude or ())),
        key=key,
        tied_path=tuple(pruning_config.tied_path) if stored else None,
        per_reuse=per_reuse,
        depth=getattr(model, "depth", None),
        iterations=int(pruning_config.iterations),
    )


@dataclasses.dataclass(frozen=True, eq=False)  # eq=False: hashable by identity (holds arrays)
class PruningHook:
    """Pruning at initialisation in the training job (implements :class:`wtjax.job.hooks.TrainHook`).

    The masks (:func:`init_masks`) are placed in the initial state (``state.masks``: checkpointed
    and sharded with it) and every train and eval step runs the model on
    :func:`model_variables` of the params and ``state.masks``.

    Attributes:
      method: the scoring method (for the log).
      masks: ``{'params': partial bool tree, 'masks': stored-masks collection}``.
    """

    method: str
    masks: dict
    trains_model_params = True

    def init_state(self, state):
        return state.replace(masks=self.masks)

    def frozen(self):
        return ()

    def variables(self, variables: dict, state, frozen) -> dict:
        return {**variables, **model_variables(variables["params"], state.masks)}

    def pruned_fraction(self) -> dict[str, float]:
        """:func:`sparsity_report` of every mask (ordinary layers and the tied block's)."""
        return sparsity_report({**self.masks["params"], **self.masks["masks"]})

    def describe(self) -> str:
        removed = self.pruned_fraction()["all"]
        return f"pruning: {self.method}, {removed:.4f} of the selected weights removed"

    def summary(self) -> dict:
        return {"pruned_fraction": self.pruned_fraction()}
