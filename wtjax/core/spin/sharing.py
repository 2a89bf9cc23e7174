"""SPIN cross-layer parameter sharing: topologies, per-layer affine transforms and weight fusion.

Pure functions (numpy for the static topology, ``jax.numpy`` for the weight maths); no Flax. The
tying itself lives in :class:`wtjax.core.tied.Tied` (field ``weight_map``), whose SPIN parameter
view (:class:`wtjax.core.spin.view.SpinView`) calls the functions here for every reuse.

**Topology** (SPIN, Lin et al. 2022, Section 3.2 and Figure 2). A network of ``L`` layers with
``P`` distinct weight sets is described by its *layer-to-weight map* ``m``: a tuple of ``L`` ints,
``m[i]`` the weight set layer ``i`` uses, numbered in order of first use (so ``m[0] == 0``). The
share rate is ``L / P``. A topology is a *mapping* (which layers share) applied to the layers a
*distribution* selects:

* mappings: ``sequential`` (neighbours share: ``0 0 1 1 2 2 ...``), ``strided`` (the ``P`` sets
  are run in order and the whole cycle repeated: ``0 1 2 0 1 2 ...``), ``random`` (a seeded random
  assignment, each set used equally often) and ``pyramid`` (rates growing towards the centre of the
  network; only with the ``middle`` distribution, as in the paper);
* distributions: ``uniform`` (all layers), ``front`` / ``middle`` / ``back`` (a contiguous section
  at the front, centre or back shares with a higher ``section_rate``; the other layers keep their
  own weights, so the overall share rate stays ``share_rate``; the paper uses ``section_rate = 3``
  for ``share_rate = 2``: 24 of 32 layers share in groups of 3 and 8 layers are independent).

**Affine transforms** (SPIN Eq. 1): layer ``i`` uses ``f_i(W) = a_i * W + b_i`` with ``a_i`` in
``R^{C x G}`` a grouped pointwise map over the ``C`` output channels (groups of ``G`` channels, so
``G = 1`` is a per-channel scale and ``G = C`` full channel mixing) and ``b_i`` in ``R^C``. The
first layer using a set sees it untransformed (:func:`affine_index`), which reproduces the
parameter counts of SPIN's Table 2.

**Fusion** (SPIN Section 3.2, Table 3): a shared weight is initialised from the ``S`` layers
``i_1..i_S`` of a pretrained not-shared network that map to it, ``W = F(V_{i_1}, ..., V_{i_S})``.
Strategies: ``choose_first`` (``V_{i_1}``), ``mean`` (``1/S sum_k V_{i_k}``), ``scalar``
(``1/S sum_k alpha_k V_{i_k}``, ``alpha_k`` in R), ``channel`` (``alpha_k`` in ``R^C``, one scale per
output channel) and ``pointwise`` (``1/S sum_k A_k V_{i_k}``, ``A_k`` in ``R^{C x C}`` mixing output
channels). The underlying ``V`` and the ``alpha`` are trained (gradients reach the original
weights); :func:`fold` constant-folds ``F`` into plain shared weights for export. Biases and other
non-kernel leaves use the mean (the first layer's for ``choose_first``).

The output-channel axis is the last axis of a Flax kernel (``(in, out)`` Dense, ``HWIO`` Conv).
"""

from __future__ import annotations

from collections.abc import Sequence

import jax.numpy as jnp
import numpy as np

MAPPINGS = ("sequential", "strided", "random", "pyramid")
DISTRIBUTIONS = ("uniform", "front", "middle", "back")
FUSIONS = ("choose_first", "mean", "scalar", "channel", "pointwise")
# Fusion strategies with learnable parameters (the others are fixed linear maps of V).
LEARNABLE_FUSIONS = ("scalar", "channel", "pointwise")

# ---------------------------------------------------------------------------------------------
# Topology
# ---------------------------------------------------------------------------------------------


def canonical(weight_map: Sequence[int]) -> tuple[int, ...]:
    """Renumber the weight sets of a map in order of first use (``0, 1, 2, ...``)."""
    order: dict[int, int] = {}
    return tuple(order.setdefault(int(w), len(order)) for w in weight_map)


def validate_map(weight_map: Sequence[int]) -> tuple[int, ...]:
    """Check a layer-to-weight map: non-empty, ints ``0..P-1`` all used. Returns it as a tuple."""
    wm = tuple(int(w) for w in weight_map)
    if not wm:
        raise ValueError("a weight map needs at least one layer")
    if min(wm) < 0 or set(wm) != set(range(max(wm) + 1)):
        raise ValueError(f"weight map {wm} must use every weight index 0..{max(wm)} (and nothing else)")
    return wm


def num_weights(weight_map: Sequence[int]) -> int:
    """``P``: the number of distinct weight sets of a map."""
    return max(weight_map) + 1


def share_rate(weight_map: Sequence[int]) -> float:
    """``L / P``: layers per distinct weight set."""
    return len(weight_map) / num_weights(weight_map)


def groups(weight_map: Sequence[int]) -> tuple[tuple[int, ...], ...]:
    """The layers of each weight set: ``groups(m)[w] = (i for i if m[i] == w)``."""
    out: list[list[int]] = [[] for _ in range(num_weights(weight_map))]
    for i, w in enumerate(weight_map):
        out[w].append(i)
    return tuple(tuple(g) for g in out)


def _section_map(n_layers: int, rate: int, mapping: str, seed: int) -> list[int]:
    """Map ``n_layers`` layers onto ``n_layers / rate`` sets with a sequential/strided/random mapping."""
    p = n_layers // rate
    if mapping == "sequential":
        return [i // rate for i in range(n_layers)]
    if mapping == "strided":
        return [i % p for i in range(n_layers)]
    if mapping == "random":
        # Each set used exactly `rate` times, at positions drawn by a seeded permutation.
        perm = np.random.default_rng(seed).permutation(n_layers)
        return [int(perm[i]) // rate for i in range(n_layers)]
    raise ValueError(f"unknown sharing mapping {mapping!r}; choose one of {MAPPINGS}")


def pyramid_rates(num_layers: int, num_sets: int) -> tuple[int, ...]:
    """Per-set share rates of the pyramid mapping: 1 at both ends, growing towards the centre.

    Every set starts at rate 1; the ``L - P`` extra uses are added in levels centred on the middle
    of the network, level widths ``P/2, P/2 - 2, ...`` (restarting when they run out), the last
    level taking whatever remains from the centre. For ``L = 32, P = 16`` this gives the paper's
    Table 1 profile ``[4 x 1, 1 x 2, 2 x 3, 2 x 4, 2 x 3, 1 x 2, 4 x 1]``.
    """
    if not 1 <= num_sets <= num_layers:
        raise ValueError(f"pyramid needs 1 <= P <= L, got P={num_sets}, L={num_layers}")
    rates = [1] * num_sets
    extra = num_layers - num_sets
    width = max(num_sets // 2, 1)
    while extra > 0:
        w = min(width, extra)
        start = (num_sets - w) // 2
        for j in range(start, start + w):
            rates[j] += 1
        extra -= w
        width = width - 2 if width - 2 >= 1 else max(num_sets // 2, 1)
    return tuple(rates)


def layer_to_weight(
    num_layers: int,
    share_rate: int,
    mapping: str = "sequential",
    distribution: str = "uniform",
    *,
    section_rate: int | None = None,
    seed: int = 0,
) -> tuple[int, ...]:
    """The layer-to-weight map of a SPIN sharing topology.

    Args:
      num_layers: ``L``.
      share_rate: ``S = L / P`` (an int dividing ``L``; 1 means no sharing).
      mapping: ``sequential``, ``strided``, ``random`` or ``pyramid``.
      distribution: ``uniform``, ``front``, ``middle`` or ``back``.
      section_rate: share rate inside the sharing section of a non-uniform distribution
        (default ``share_rate + 1``, the paper's 3 for 2). The section has
        ``n = L (1 - 1/S) / (1 - 1/section_rate)`` layers so that ``P = L / S`` overall.
      seed: seed of the ``random`` mapping.

    Returns:
      ``m``: a tuple of ``L`` ints in ``0..P-1``, numbered in order of first use.
    """
    if num_layers < 1:
        raise ValueError(f"num_layers must be >= 1, got {num_layers}")
    if share_rate < 1 or num_layers % share_rate:
        raise ValueError(f"share rate {share_rate} must be a positive divisor of num_layers={num_layers}")
    if distribution not in DISTRIBUTIONS:
        raise ValueError(f"unknown sharing distribution {distribution!r}; choose one of {DISTRIBUTIONS}")
    if mapping not in MAPPINGS:
        raise ValueError(f"unknown sharing mapping {mapping!r}; choose one of {MAPPINGS}")
    p = num_layers // share_rate
    if mapping == "pyramid":
        if distribution != "middle":
            raise ValueError("the pyramid mapping shares towards the middle; use distribution='middle'")
        rates = pyramid_rates(num_layers, p)
        return tuple(w for w, r in enumerate(rates) for _ in range(r))
    if distribution == "uniform" or share_rate == 1:
        return canonical(_section_map(num_layers, share_rate, mapping, seed))

    s = share_rate + 1 if section_rate is None else section_rate
    # (L - n) independent layers + n / s shared sets = L / S  =>  n = (L - L/S) / (1 - 1/s).
    n_num, n_den = (num_layers - p) * s, s - 1
    if s < 2 or n_num % n_den or (n_num // n_den) % s or n_num // n_den > num_layers:
        raise ValueError(
            f"a {distribution} distribution with L={num_layers}, share rate {share_rate} and section rate "
            f"{s} needs a section of L(1-1/S)/(1-1/s) layers, an integer multiple of {s} no larger than L"
        )
    n = n_num // n_den
    section = [num_layers + w for w in _section_map(n, s, mapping, seed)]  # offset: no clash below
    start = {"front": 0, "back": num_layers - n, "middle": (num_layers - n) // 2}[distribution]
    full = list(range(num_layers))  # independent layers use their own index
    full[start : start + n] = section
    return canonical(full)


def parameter_count(weight_map: Sequence[int], shared_size: int, unshared_size: int) -> int:
    """Parameters of a stack: ``shared_size`` per weight set plus ``unshared_size`` per layer."""
    return num_weights(weight_map) * shared_size + len(weight_map) * unshared_size


# ---------------------------------------------------------------------------------------------
# Per-layer affine transforms
# ---------------------------------------------------------------------------------------------


def affine_index(weight_map: Sequence[int]) -> tuple[int, ...]:
    """Which affine transform each layer uses: -1 for the first user of a set, else ``0..L-P-1``.

    SPIN's Table 2 counts ``(L - P) (C G + C)`` transform parameters: the first layer of each
    set uses the shared weight itself and every later layer its own transform.
    """
    seen: set[int] = set()
    out, j = [], 0
    for w in weight_map:
        if w in seen:
            out.append(j)
            j += 1
        else:
            seen.add(w)
            out.append(-1)
    return tuple(out)


def affine_init(channels: int, group_size: int, depth: int, dtype=jnp.float32) -> dict:
    """Identity affine transforms for ``depth`` layers: ``scale`` (depth, C, G), ``bias`` (depth, C)."""
    if group_size < 1 or channels % group_size:
        raise ValueError(f"affine group size {group_size} must divide the {channels} output channels")
    eye = (np.arange(channels)[:, None] % group_size == np.arange(group_size)[None, :]).astype(np.float32)
    return {
        "scale": jnp.broadcast_to(jnp.asarray(eye, dtype), (depth, channels, group_size)),
        "bias": jnp.zeros((depth, channels), dtype),
    }


def affine_apply(w: jnp.ndarray, scale: jnp.ndarray, bias: jnp.ndarray) -> jnp.ndarray:
    """``f(W)[..., o] = sum_j scale[o, j] W[..., G*(o//G) + j] + bias[o]`` (one layer's transform).

    Args:
      w: a kernel ``(..., C)`` (last axis: output channels).
      scale: ``(C, G)``.
      bias: ``(C,)``.
    """
    c, g = scale.shape
    wg = w.reshape(w.shape[:-1] + (c // g, g))
    out = jnp.einsum("...kj,kij->...ki", wg, scale.reshape(c // g, g, g))
    return out.reshape(w.shape) + bias


# ---------------------------------------------------------------------------------------------
# Weight fusion
# ---------------------------------------------------------------------------------------------


def fusion_matrix(weight_map: Sequence[int], fusion: str) -> np.ndarray:
    """``M`` of shape ``(P, L)`` with ``W_w = sum_l M[w, l] T_l(V_l)`` (``T_l``: learnable part).

    ``choose_first`` puts 1 on the first layer of each set; the other strategies ``1 / S_w`` on
    every member.
    """
    if fusion not in FUSIONS:
        raise ValueError(f"unknown fusion strategy {fusion!r}; choose one of {FUSIONS}")
    m = np.zeros((num_weights(weight_map), len(weight_map)), np.float32)
    for w, members in enumerate(groups(weight_map)):
        if fusion == "choose_first":
            m[w, members[0]] = 1.0
        else:
            m[w, list(members)] = 1.0 / len(members)
    return m


def fusion_init(fusion: str, depth: int, channels: int, dtype=jnp.float32):
    """Initial learnable fusion weights (identity: the fused weight starts as the plain mean)."""
    if fusion == "scalar":
        return jnp.ones((depth,), dtype)
    if fusion == "channel":
        return jnp.ones((depth, channels), dtype)
    if fusion == "pointwise":
        return jnp.broadcast_to(jnp.eye(channels, dtype=dtype), (depth, channels, channels))
    raise ValueError(f"fusion {fusion!r} has no learnable weights")


def fusion_transform(v: jnp.ndarray, fusion: str, alpha) -> jnp.ndarray:
    """``T_l(V_l)`` for every layer at once: ``v`` is ``(L, ..., C)``, ``alpha`` the fusion weights."""
    if fusion in ("choose_first", "mean") or alpha is None:
        return v
    if fusion == "scalar":
        return v * alpha.reshape((-1,) + (1,) * (v.ndim - 1)).astype(v.dtype)
    if fusion == "channel":
        return v * alpha.reshape((alpha.shape[0],) + (1,) * (v.ndim - 2) + (alpha.shape[1],)).astype(v.dtype)
    if fusion == "pointwise":
        return jnp.einsum("l...c,loc->l...o", v, alpha.astype(v.dtype))
    raise ValueError(f"unknown fusion strategy {fusion!r}; choose one of {FUSIONS}")


def fuse(v: jnp.ndarray, weight_map: Sequence[int], fusion: str, alpha=None, row=None) -> jnp.ndarray:
    """Fused shared weights from the per-layer ``v`` ``(L, ...)``.

    Args:
      v: pretrained (or being-trained) per-layer weights, stacked on axis 0.
      weight_map: the layer-to-weight map.
      fusion: the strategy (``alpha`` ignored for ``choose_first`` / ``mean`` or when ``None``).
      alpha: learnable fusion weights (:func:`fusion_init` shapes) or ``None`` (plain mean).
      row: a (traced) weight-set index: return only ``W_row``; ``None`` returns all ``(P, ...)``.
    """
    m = jnp.asarray(fusion_matrix(weight_map, fusion), v.dtype)
    t = fusion_transform(v, fusion, alpha)
    if row is None:
        return jnp.tensordot(m, t, axes=1)
    return jnp.tensordot(m[row], t, axes=1)
