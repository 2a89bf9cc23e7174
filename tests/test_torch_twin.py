"""The PyTorch twin of the benchmarks (experiments/benchmarks/torch_twin.py) computes the Flax model.

Needs the optional ``bench`` extra (PyTorch); skipped without it.
"""

from __future__ import annotations

import jax
import numpy as np
import pytest

from wtjax.core.masks import MaskSpec
from wtjax.models.resnet_like import ResNetLike

torch = pytest.importorskip("torch")
from experiments.benchmarks import torch_twin  # noqa: E402


def test_twin_has_the_flax_models_masks_and_logits():
    model = ResNetLike(
        width=8, depth=3, mask_mode="multi", mask=MaskSpec("unstructured", 0.5), conv_impl="xla"
    )
    images = jax.random.normal(jax.random.PRNGKey(0), (4, 8, 8, 3))
    params = model.init(jax.random.PRNGKey(1), images)
    masks = torch_twin.flax_masks(model, params)
    assert masks.shape == (3, 2, 8, 8, 3, 3)
    assert abs(masks.mean() - 0.5) < 0.05 and not np.array_equal(masks[0], masks[1])  # distinct per reuse
    twin = torch_twin.TiedResNetTwin(8, 3, masks)
    torch_twin.load_flax_params(twin, params)
    expected, _ = model.apply(params, images)
    with torch.no_grad():
        got = twin(torch.as_tensor(np.asarray(images).transpose(0, 3, 1, 2))).numpy()
    np.testing.assert_allclose(got, np.asarray(expected), rtol=1e-4, atol=1e-4)
    # The masks matter: the twin without them computes something else.
    dense = torch_twin.TiedResNetTwin(8, 3, np.ones_like(masks))
    torch_twin.load_flax_params(dense, params)
    with torch.no_grad():
        other = dense(torch.as_tensor(np.asarray(images).transpose(0, 3, 1, 2))).numpy()
    assert np.abs(other - np.asarray(expected)).max() > 1e-3
