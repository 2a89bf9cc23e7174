"""Linear CKA between layer representations (Kornblith et al. 2019; Nguyen et al. 2021).

``CKA(K, L) = HSIC(K, L) / sqrt(HSIC(K, K) HSIC(L, L))`` with linear kernels ``K = X X^T``,
``L = Y Y^T`` over the same ``n`` examples. Two estimators:

* :func:`linear_cka`: the biased estimator on one set of examples,
  ``HSIC = tr(K H L H) / (n-1)^2`` with the centring matrix ``H = I - 11^T/n`` (the paper's
  Appendix B). Computed from the ``n x n`` Gram matrices, so the feature width never matters.
* :func:`minibatch_cka`: the unbiased HSIC estimator (Song et al. 2012) averaged over minibatches,
  as Nguyen et al. do for large sets: ``sum_b HSIC_1(K_b, L_b) / sqrt(sum_b HSIC_1(K_b, K_b)
  sum_b HSIC_1(L_b, L_b))``. It is unbiased in the number of examples per batch, so small batches
  do not inflate similarity.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def _gram(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64).reshape(len(x), -1)
    return x @ x.T


def _center(k: np.ndarray) -> np.ndarray:
    mean_rows = k.mean(axis=0, keepdims=True)
    return k - mean_rows - mean_rows.T + k.mean()


def linear_cka(x: np.ndarray, y: np.ndarray) -> float:
    """Biased linear CKA of two representations of the same examples (rows); any trailing shape."""
    if len(x) != len(y):
        raise ValueError(f"CKA compares the same examples: got {len(x)} and {len(y)} rows")
    kc, lc = _center(_gram(x)), _center(_gram(y))
    hsic_kl = np.sum(kc * lc)
    return float(hsic_kl / np.sqrt(np.sum(kc * kc) * np.sum(lc * lc)))


def unbiased_hsic(k: np.ndarray, l: np.ndarray) -> float:  # noqa: E741
    """The unbiased HSIC_1 estimator of two ``n x n`` Gram matrices (needs ``n > 3``)."""
    n = len(k)
    if n <= 3:
        raise ValueError(f"the unbiased HSIC needs more than 3 examples per batch, got {n}")
    k = k - np.diag(np.diag(k))
    l = l - np.diag(np.diag(l))  # noqa: E741
    ones = np.ones(n)
    term = np.sum(k * l) + (ones @ k @ ones) * (ones @ l @ ones) / ((n - 1) * (n - 2))
    term -= 2.0 / (n - 2) * (ones @ k @ l @ ones)
    return float(term / (n * (n - 3)))


def minibatch_cka(batches: Sequence[tuple[np.ndarray, np.ndarray]]) -> float:
    """Minibatch CKA from ``[(x_b, y_b), ...]`` pairs of representations of the same batches."""
    if not batches:
        raise ValueError("minibatch CKA needs at least one batch of more than 3 examples")
    kl = kk = ll = 0.0
    for x, y in batches:
        k, l = _gram(x), _gram(y)  # noqa: E741
        kl += unbiased_hsic(k, l)
        kk += unbiased_hsic(k, k)
        ll += unbiased_hsic(l, l)
    return float(kl / np.sqrt(kk * ll))


def cka_matrix(layers: Sequence[np.ndarray], batch_size: int | None = None) -> np.ndarray:
    """The symmetric matrix of CKA between every pair of layers (each ``(n, ...)``, same examples).

    With ``batch_size`` the minibatch (unbiased) estimator is used over consecutive batches of that
    size (a trailing partial batch is dropped); otherwise the biased estimator on all examples.

    Raises:
      ValueError: fewer examples than ``batch_size`` (no complete batch: the estimate would be
        0/0), or a ``batch_size`` of 3 or less (the unbiased estimator needs more).
    """
    n_layers = len(layers)
    examples = len(layers[0]) if n_layers else 0
    if batch_size is not None and not 3 < batch_size <= examples:
        raise ValueError(
            f"minibatch CKA over batches of {batch_size} needs 3 < batch size <= the {examples} examples: "
            "use a batch size in that range (e.g. --cka_batch) or the biased estimator on all examples "
            "(batch_size=None, --cka_batch=0)"
        )
    out = np.eye(n_layers)
    for i in range(n_layers):
        for j in range(i):
            if batch_size is None:
                value = linear_cka(layers[i], layers[j])
            else:
                n = len(layers[i]) // batch_size * batch_size
                pairs = [
                    (layers[i][s : s + batch_size], layers[j][s : s + batch_size])
                    for s in range(0, n, batch_size)
                ]
                value = minibatch_cka(pairs)
            out[i, j] = out[j, i] = value
    return out
