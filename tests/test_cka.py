"""CKA's defining invariances and estimator agreement; probes separate separable features."""

import numpy as np
import pytest

from wtjax.analysis import cka, probes


def _features(seed=0, n=64, p=16):
    return np.random.default_rng(seed).normal(size=(n, p))


def test_cka_invariances():
    x = _features()
    q, _ = np.linalg.qr(np.random.default_rng(1).normal(size=(16, 16)))
    assert cka.linear_cka(x, x) == pytest.approx(1.0)
    assert cka.linear_cka(x, x @ q) == pytest.approx(1.0)  # orthogonal transform
    assert cka.linear_cka(x, 3.0 * x + 2.0) == pytest.approx(1.0)  # isotropic scale, shift
    assert cka.linear_cka(x, _features(seed=2)) < 0.5  # independent features


def test_cka_matches_the_feature_space_formula():
    x, y = _features(0, 50, 7), _features(3, 50, 11)
    xc, yc = x - x.mean(0), y - y.mean(0)
    expected = np.linalg.norm(yc.T @ xc) ** 2 / (np.linalg.norm(xc.T @ xc) * np.linalg.norm(yc.T @ yc))
    assert cka.linear_cka(x, y) == pytest.approx(expected)


def test_unbiased_minibatch_cka_agrees_with_full_cka_on_large_batches():
    rng = np.random.default_rng(4)
    x = rng.normal(size=(2000, 8))
    y = x @ rng.normal(size=(8, 8)) + 0.5 * rng.normal(size=(2000, 8))
    full = cka.linear_cka(x, y)
    batched = cka.cka_matrix([x, y], batch_size=500)[0, 1]
    assert batched == pytest.approx(full, abs=0.03)
    with pytest.raises(ValueError, match="more than 3"):
        cka.unbiased_hsic(np.eye(3), np.eye(3))


def test_cka_matrix_is_symmetric_with_unit_diagonal():
    layers = [_features(i, 40, 5 + i).reshape(40, -1) for i in range(3)]
    m = cka.cka_matrix(layers)
    np.testing.assert_allclose(m, m.T)
    np.testing.assert_allclose(np.diag(m), 1.0)


def test_probe_finds_linearly_separable_classes_and_not_noise():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 3, size=300)
    separable = np.eye(3)[labels] * 4.0 + rng.normal(size=(300, 3))
    noise = rng.normal(size=(300, 3))
    acc = probes.probe_layers(
        [separable[:200], noise[:200]], labels[:200], [separable[200:], noise[200:]], labels[200:]
    )
    assert acc[0] > 0.9 and acc[1] < 0.6
    assert probes.pool(np.ones((2, 4, 4, 5))).shape == (2, 5)


@pytest.mark.parametrize("examples, batch_size", [(12, 250), (12, 3), (0, 4)])
def test_minibatch_cka_without_a_complete_batch_is_a_clear_error(examples, batch_size):
    """12 examples at the CLI's default batch of 250 gave NaN entries (0/0) and a blank heatmap."""
    rng = np.random.default_rng(0)
    layers = [rng.standard_normal((examples, 5)) for _ in range(2)]
    with pytest.raises(ValueError, match="needs 3 < batch size <= the"):
        cka.cka_matrix(layers, batch_size=batch_size)
    with pytest.raises(ValueError, match="at least one batch"):
        cka.minibatch_cka([])
