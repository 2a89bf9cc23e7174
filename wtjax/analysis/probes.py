"""Per-layer linear probes: how linearly separable is each tied layer's (pooled) output?

A multinomial logistic regression (scikit-learn) is fitted on the training features of each layer
and scored on held-out features, as in the paper's Figure 6 (bottom) and Kornblith et al. Features
are standardised with the training statistics first, so layers of different scale are comparable.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from wtjax import _extras

_extras.require("analysis", "wtjax.analysis.probes")

from sklearn.linear_model import LogisticRegression  # noqa: E402
from sklearn.pipeline import make_pipeline  # noqa: E402
from sklearn.preprocessing import StandardScaler  # noqa: E402


def pool(features: np.ndarray) -> np.ndarray:
    """Global-average-pool NHWC feature maps to ``(n, C)``; flat features pass through."""
    features = np.asarray(features)
    return features.mean(axis=(1, 2)) if features.ndim == 4 else features.reshape(len(features), -1)


def probe_accuracy(
    train_features: np.ndarray,
    train_labels: np.ndarray,
    eval_features: np.ndarray,
    eval_labels: np.ndarray,
    *,
    max_iter: int = 1000,
    c: float = 1.0,
) -> float:
    """Accuracy on the eval set of a logistic-regression probe fitted on the train set."""
    probe = make_pipeline(StandardScaler(), LogisticRegression(max_iter=max_iter, C=c))
    probe.fit(pool(train_features), np.asarray(train_labels))
    return float(probe.score(pool(eval_features), np.asarray(eval_labels)))


def probe_layers(
    train_layers: Sequence[np.ndarray],
    train_labels: np.ndarray,
    eval_layers: Sequence[np.ndarray],
    eval_labels: np.ndarray,
    **kwargs,
) -> list[float]:
    """Probe accuracy of every layer, in order."""
    return [
        probe_accuracy(tr, train_labels, ev, eval_labels, **kwargs)
        for tr, ev in zip(train_layers, eval_layers, strict=True)
    ]
