"""The NNX tie: the Linen tie's function and gradients for the same weights and masks.

Blocks: a Linen ``DenseBlock`` (``nn.Dense(name='dense')``) and an NNX ``NNXDenseBlock``
(``self.dense = nnx.Linear``), whose parameter paths coincide (``dense/kernel``, ``dense/bias``).
"""

import subprocess
import sys

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
import pytest
from flax import nnx

from wtjax import MaskSpec, NNXTied, Tied, mask_sites
from wtjax.core.nnx_tied import linen_params, load_linen_params

K, D = 4, 8
X = jax.random.normal(jax.random.PRNGKey(1), (3, D))
Z0 = jnp.zeros_like(X)


class DenseBlock(nn.Module):
    @nn.compact
    def __call__(self, z, x):
        return jnp.tanh(nn.Dense(z.shape[-1], name="dense")(z) + x)


class NNXDenseBlock(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.dense = nnx.Linear(D, D, rngs=rngs)

    def __call__(self, z, x):
        return jnp.tanh(self.dense(z) + x)


def spec(kind="unstructured"):
    return MaskSpec(kind=kind, density=0.5, seed=3)


def linen_tie(mode="multi", kind="unstructured", **fields):
    return Tied(DenseBlock(), depth=K, mask_mode=mode, mask=spec(kind), mask_scope="tie", **fields)


def nnx_tie(mode="multi", kind="unstructured", seed=5, **fields):
    fields.setdefault("mask_scope", "tie")
    return NNXTied(NNXDenseBlock(nnx.Rngs(seed)), K, mask_mode=mode, mask=spec(kind), **fields)


LINEN = linen_tie().init(jax.random.PRNGKey(0), Z0, X)["params"]


def _close(a, b, tol=1e-5):
    chex.assert_trees_all_close(a, b, atol=tol, rtol=tol)


def _differs(a, b):
    return float(jnp.abs(a - b).max()) > 1e-3


@pytest.mark.parametrize("mode", ["dense", "same", "multi"])
@pytest.mark.parametrize("kind", ["unstructured", "nm"])
def test_same_outputs_and_gradients_as_the_linen_tie(mode, kind):
    linen, tie = linen_tie(mode, kind), nnx_tie(mode, kind)
    load_linen_params(tie, LINEN)
    _close(tie(Z0, X), linen.apply({"params": LINEN}, Z0, X))
    grads = nnx.grad(lambda m: jnp.sum(m(Z0, X) ** 2))(tie)
    linen_grads = jax.grad(lambda p: jnp.sum(linen.apply({"params": p}, Z0, X) ** 2))(LINEN)
    _close({"block": nnx.to_pure_dict(grads)["block"]}, linen_grads)
    if mode != "dense":  # the masks are applied (else the comparison would not see them)
        assert _differs(tie(Z0, X), linen_tie("dense").apply({"params": LINEN}, Z0, X))


def test_scan_equals_loop_and_trajectory_ends_in_the_output():
    scanned, looped = nnx_tie(), nnx_tie(scan=False)
    _close(scanned(Z0, X), looped(Z0, X))
    z, zs = scanned.trajectory(Z0, X)
    _, loop_zs = looped.trajectory(Z0, X)
    assert zs.shape == (K, *X.shape)
    _close(zs[-1], z)
    _close(zs, loop_zs)
    _close(scanned(Z0, X, depth=6), looped(Z0, X, depth=6))  # more reuses at evaluation


def test_bfloat16_compute_matches_the_linen_tie():
    tie = nnx_tie(dtype="bfloat16")
    load_linen_params(tie, LINEN)
    expected = linen_tie(dtype="bfloat16").apply({"params": LINEN}, Z0, X)
    _close(tie(Z0, X).astype(jnp.float32), expected.astype(jnp.float32), tol=2e-2)


def test_linen_nnx_weight_round_trips_keep_the_function():
    tie = nnx_tie()
    load_linen_params(tie, LINEN)
    chex.assert_trees_all_equal(linen_params(tie), LINEN)
    trained = nnx_tie(seed=9)  # NNX weights -> a Linen tie nested in a model under another name
    expected = trained(Z0, X)

    class Model(nn.Module):
        @nn.compact
        def __call__(self, x):
            return linen_tie(name="renamed")(jnp.zeros_like(x), x)

    _close(Model().apply({"params": {"renamed": linen_params(trained)}}, X), expected)


def test_the_nnx_bridge_of_the_linen_tie_keeps_the_function():
    """``nnx.bridge.ToNNX`` moves the tie to the top level: with a scope its masks stay."""

    class Model(nn.Module):
        @nn.compact
        def __call__(self, x):
            return linen_tie(name="tie_in_a_model")(jnp.zeros_like(x), x)

    expected = Model().apply({"params": {"tie_in_a_model": LINEN}}, X)
    bridged = nnx.bridge.ToNNX(linen_tie(), rngs=nnx.Rngs(0))
    nnx.bridge.lazy_init(bridged, Z0, X)
    state = nnx.state(bridged, nnx.Param)
    nnx.replace_by_pure_dict(state, LINEN)
    nnx.update(bridged, state)
    _close(bridged(Z0, X), expected)
    native = nnx_tie()  # and the native NNX tie with the bridged weights
    load_linen_params(native, nnx.to_pure_dict(nnx.state(bridged, nnx.Param)))
    _close(native(Z0, X), expected)


class TwoTies(nnx.Module):
    def __init__(self, scopes):
        self.first = nnx_tie(mask_scope=scopes[0])
        self.second = nnx_tie(mask_scope=scopes[1])

    def __call__(self, x):
        return self.first(jnp.zeros_like(x), x), self.second(jnp.zeros_like(x), x)


def test_nesting_keeps_the_masks_and_two_scopes_keep_two_sets():
    model = TwoTies(("tie", "other"))
    for tie in (model.first, model.second):
        load_linen_params(tie, LINEN)
    first, second = model(X)
    _close(first, linen_tie().apply({"params": LINEN}, Z0, X))  # nested as 'first': same masks
    assert _differs(first, second)
    assert [(s.path, s.mask_scope) for s in mask_sites(model)] == [
        (("first",), "tie"),
        (("second",), "other"),
    ]
    with pytest.raises(ValueError, match="'first' and 'second' have the same mask identity"):
        mask_sites(TwoTies(("tie", "tie")))


class Classifier(nnx.Module):
    def __init__(self, rngs):
        self.inp = nnx.Linear(4, D, rngs=rngs)
        self.tie = NNXTied(
            NNXDenseBlock(rngs), K, mask_mode="multi", mask=MaskSpec(density=0.5, seed=1), mask_scope="tie"
        )
        self.out = nnx.Linear(D, 3, rngs=rngs)

    def __call__(self, x):
        h = self.inp(x)
        return self.out(self.tie(jnp.zeros_like(h), h))


def test_an_nnx_model_trains_with_nnx_optimizer():
    x = jax.random.normal(jax.random.PRNGKey(0), (16, 4))
    y = jnp.arange(16) % 3
    model = Classifier(nnx.Rngs(0))
    optimizer = nnx.Optimizer(model, optax.adam(3e-2), wrt=nnx.Param)

    def loss_fn(m):
        return optax.softmax_cross_entropy_with_integer_labels(m(x), y).mean()

    @nnx.jit
    def train_step(m, opt):
        loss, grads = nnx.value_and_grad(loss_fn)(m)
        opt.update(m, grads)
        return loss

    losses = [float(train_step(model, optimizer)) for _ in range(20)]
    assert losses[-1] < 0.5 * losses[0]


def test_bad_blocks_and_settings_are_clear_errors():
    with pytest.raises(NotImplementedError, match="'dropout' exists only in the Linen"):
        nnx_tie("dropout")
    with pytest.raises(ValueError, match="unknown mask_mode"):
        nnx_tie("sparse")
    with pytest.raises(ValueError, match="depth"):
        NNXTied(NNXDenseBlock(nnx.Rngs(0)), 0)
    with pytest.raises(ValueError, match="mask_scope"):
        nnx_tie(mask_scope="a//b")

    class WithBatchNorm(nnx.Module):
        def __init__(self, rngs):
            self.norm = nnx.BatchNorm(D, rngs=rngs)

        def __call__(self, z):
            return self.norm(z)

    with pytest.raises(ValueError, match="BatchStat at norm/mean.*LayerNorm"):
        NNXTied(WithBatchNorm(nnx.Rngs(0)), K)

    class Widening(nnx.Module):
        def __init__(self, rngs):
            self.dense = nnx.Linear(D, 2 * D, rngs=rngs)

        def __call__(self, z):
            return self.dense(z)

    for scan in (True, False):
        with pytest.raises(ValueError, match=r"input float32\[3, 8\] -> output float32\[3, 16\]"):
            NNXTied(Widening(nnx.Rngs(0)), K, scan=scan)(Z0)


def test_importing_wtjax_does_not_import_nnx():
    code = "import sys, wtjax; print('flax.nnx' in sys.modules, 'optax' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False False"
