"""Pruning at initialisation: exact sparsity, closed-form scores, tied-block masks, model variables."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from wtjax.methods import pruning
from wtjax.models import build_model


def _net(seed=0, d=4, h=3, o=2):
    k1, k2 = jax.random.split(jax.random.PRNGKey(seed))
    return {"l1": {"kernel": jax.random.normal(k1, (d, h))}, "l2": {"kernel": jax.random.normal(k2, (h, o))}}


def _count(masks):
    leaves = jax.tree.leaves(masks)
    return sum(int(np.sum(m)) for m in leaves), sum(m.size for m in leaves)


@pytest.mark.parametrize("sparsity", [0.0, 0.1, 0.37, 0.5, 0.9, 0.99, 1.0])
def test_masks_hit_the_target_sparsity_exactly(sparsity):
    # Integer scores: many ties, which must not change the count.
    scores = {
        "a": {"kernel": jnp.asarray(np.random.default_rng(0).integers(0, 3, (7, 5)), jnp.float32)},
        "b": {"kernel": jnp.asarray(np.random.default_rng(1).integers(0, 3, (3, 3, 2, 4)), jnp.float32)},
    }
    kept, total = _count(pruning.masks_from_scores(scores, sparsity, "global"))
    assert total - kept == round(sparsity * total)
    layer = pruning.masks_from_scores(scores, sparsity, "layer")
    for path in ("a", "b"):
        m = layer[path]["kernel"]
        assert m.size - int(m.sum()) == round(sparsity * m.size)


def test_masks_keep_the_highest_scores_and_break_ties_by_order():
    scores = {
        "a": {"kernel": jnp.asarray([[3.0, 1.0], [1.0, 1.0]])},
        "b": {"kernel": jnp.asarray([[2.0, np.nan]])},
    }
    m = pruning.masks_from_scores(scores, 0.5, "global")
    # Keep 3 of 6: 3.0, 2.0 and the first of the tied 1.0s (row-major, sorted paths); NaN is lowest.
    np.testing.assert_array_equal(m["a"]["kernel"], [[True, True], [False, False]])
    np.testing.assert_array_equal(m["b"]["kernel"], [[True, False]])
    with pytest.raises(ValueError, match="scope"):
        pruning.masks_from_scores(scores, 0.5, "per_channel")


def _linear_loss(params, batch):
    x, y = batch
    r = x @ params["l1"]["kernel"] @ params["l2"]["kernel"] - y
    return 0.5 * jnp.sum(r**2)


def test_snip_and_grasp_match_closed_forms_on_a_two_layer_linear_net():
    params = _net()
    x = jax.random.normal(jax.random.PRNGKey(3), (5, 4))
    y = jax.random.normal(jax.random.PRNGKey(4), (5, 2))
    W1, W2 = params["l1"]["kernel"], params["l2"]["kernel"]
    r = x @ W1 @ W2 - y
    g1, g2 = x.T @ r @ W2.T, (x @ W1).T @ r
    snip = pruning.score("snip", _linear_loss, params, (x, y))
    np.testing.assert_allclose(snip["l1"]["kernel"], jnp.abs(W1 * g1), rtol=1e-5)
    np.testing.assert_allclose(snip["l2"]["kernel"], jnp.abs(W2 * g2), rtol=1e-5)
    # Hessian-vector product along g for L = |x W1 W2 - y|^2 / 2 (closed form).
    dr = x @ g1 @ W2 + x @ W1 @ g2
    hg1 = x.T @ dr @ W2.T + x.T @ r @ g2.T
    hg2 = (x @ g1).T @ r + (x @ W1).T @ dr
    grasp = pruning.score("grasp", _linear_loss, params, (x, y))
    np.testing.assert_allclose(grasp["l1"]["kernel"], W1 * hg1, rtol=1e-4)
    np.testing.assert_allclose(grasp["l2"]["kernel"], W2 * hg2, rtol=1e-4)
    mag = pruning.score("magnitude", None, params)
    np.testing.assert_allclose(mag["l1"]["kernel"], jnp.abs(W1))


def _outputs_sum(params, ones):
    return jnp.sum(ones @ params["l1"]["kernel"] @ params["l2"]["kernel"])


def test_synflow_matches_the_path_product_and_prunes_iteratively():
    params = _net(1)
    ones = jnp.ones((1, 4))
    A1, A2 = jnp.abs(params["l1"]["kernel"]), jnp.abs(params["l2"]["kernel"])
    one_round = pruning.score("synflow", _outputs_sum, params, ones, sparsity=0.5, iterations=1)
    # R = 1^T |W1| |W2| 1: dR/d|W1|_ij = sum_k |W2|_jk, dR/d|W2|_jk = sum_i |W1|_ij.
    np.testing.assert_allclose(one_round["l1"]["kernel"], A1 * A2.sum(1)[None, :], rtol=1e-5)
    np.testing.assert_allclose(one_round["l2"]["kernel"], A2 * A1.sum(0)[:, None], rtol=1e-5)
    scores = pruning.score("synflow", _outputs_sum, params, ones, sparsity=0.75, iterations=4)
    masks = pruning.masks_from_scores(scores, 0.75, "global")
    kept, total = _count(masks)
    assert total - kept == round(0.75 * total)
    # Weights pruned in earlier rounds carry -inf: they stay pruned.
    pruned_before = sum(int(jnp.sum(jnp.isneginf(s))) for s in jax.tree.leaves(scores))
    assert 0 < pruned_before <= total - kept
    # The network stays connected (SynFlow's point): every layer keeps a weight.
    assert all(bool(m.any()) for m in jax.tree.leaves(masks))


def test_random_scores_need_a_key_and_are_reproducible():
    params = _net()
    a = pruning.score("random", None, params, key=jax.random.PRNGKey(0))
    b = pruning.score("random", None, params, key=jax.random.PRNGKey(0))
    np.testing.assert_array_equal(a["l1"]["kernel"], b["l1"]["kernel"])
    with pytest.raises(ValueError, match="key"):
        pruning.score("random", None, params)
    with pytest.raises(ValueError, match="unknown pruning method"):
        pruning.score("obd", None, params)


K = 3


def _tied_setup():
    model = build_model("mlp", num_classes=4, width=8, depth=K, mask_mode="stored")
    images = jax.random.normal(jax.random.PRNGKey(0), (6, 4, 4, 1))
    batch = {"image": images, "label": jnp.arange(6) % 4}
    params = model.init(jax.random.PRNGKey(1), images)["params"]
    return model, params, batch


def test_per_reuse_snip_scores_each_reuse_view():
    model, params, batch = _tied_setup()

    def apply_fn(variables, images):
        return model.apply(variables, images)[0]

    out = pruning.prune_model(
        "snip",
        apply_fn,
        params,
        batch,
        0.5,
        scope="layer",
        tied_path=("tied", "block"),
        per_reuse=True,
        depth=K,
    )
    stored = out["masks"]["tied"]["block"]
    assert stored["dense1"]["kernel"].shape == (K, 8, 8)
    # Reference: SNIP's connection sensitivity of reuse k is |dL/dc_k| for a real-valued mask c_k = 1.
    ones = {"tied": {"block": {n: {"kernel": jnp.ones((K, 8, 8))} for n in ("dense1", "dense2")}}}

    def loss(c):
        logits = model.apply({"params": params, "masks": c}, batch["image"])[0]
        return jnp.mean(-jnp.take_along_axis(jax.nn.log_softmax(logits), batch["label"][:, None], 1))

    sens = jax.grad(loss)(ones)["tied"]["block"]
    for name in ("dense1", "dense2"):
        for k in range(K):
            expect = pruning.masks_from_scores({"x": jnp.abs(sens[name]["kernel"][k])}, 0.5, "layer")["x"]
            np.testing.assert_array_equal(stored[name]["kernel"][k], expect)
    # Reuses see different gradients, so their masks differ.
    assert not bool(jnp.all(stored["dense1"]["kernel"][0] == stored["dense1"]["kernel"][1]))
    # Ordinary layers are masked in the params (exactly half of each kernel, layer scope).
    assert set(out["params"]) == {"embed", "head"}
    assert int(out["params"]["head"]["kernel"].sum()) == 16


def test_magnitude_per_reuse_masks_are_equal_and_random_ones_differ():
    model, params, batch = _tied_setup()

    def apply_fn(variables, images):
        return model.apply(variables, images)[0]

    common = dict(scope="layer", tied_path=("tied", "block"), per_reuse=True, depth=K)
    mag = pruning.prune_model("magnitude", apply_fn, params, batch, 0.7, **common)["masks"]["tied"]["block"]
    m = mag["dense2"]["kernel"]
    assert all(bool(jnp.all(m[k] == m[0])) for k in range(K))
    rnd = pruning.prune_model("random", apply_fn, params, batch, 0.7, key=jax.random.PRNGKey(0), **common)
    r = rnd["masks"]["tied"]["block"]["dense2"]["kernel"]
    assert not bool(jnp.all(r[1] == r[0]))
    assert all(int(r[k].sum()) == 64 - round(0.7 * 64) for k in range(K))


def test_model_variables_mask_the_forward_pass_and_the_gradient():
    model, params, batch = _tied_setup()

    def apply_fn(variables, images):
        return model.apply(variables, images)[0]

    masks = pruning.prune_model("snip", apply_fn, params, batch, 0.6, tied_path=("tied", "block"))
    assert masks["masks"]["tied"]["block"]["dense1"]["kernel"].shape == (8, 8)  # one mask for all reuses

    def loss(p):
        return jnp.sum(apply_fn(pruning.model_variables(p, masks), batch["image"]) ** 2)

    grads = jax.grad(loss)(params)
    for path, m in (
        ("embed", masks["params"]["embed"]["kernel"]),
        ("tied", masks["masks"]["tied"]["block"]["dense1"]["kernel"]),
    ):
        g = grads["embed"]["kernel"] if path == "embed" else grads["tied"]["block"]["dense1"]["kernel"]
        assert bool(jnp.all(jnp.where(m, True, g == 0)))  # pruned weights get no gradient
        assert bool(jnp.any(g != 0))
    # Changing a pruned weight does not change the output.
    m = masks["params"]["embed"]["kernel"]
    bumped = jax.tree.map(lambda x: x, params)
    bumped["embed"]["kernel"] = jnp.where(m, params["embed"]["kernel"], 100.0)
    np.testing.assert_allclose(loss(bumped), loss(params), rtol=1e-6)


def test_pruning_a_monotone_deq_layer_only():
    model = build_model("mondeq_fc", num_classes=4, width=8)
    images = jax.random.normal(jax.random.PRNGKey(0), (6, 4, 4, 1))
    batch = {"image": images, "label": jnp.arange(6) % 4}
    params = model.init(jax.random.PRNGKey(1), images)["params"]
    predicate = pruning.path_predicate(include=("mon/",))
    for method in pruning.METHODS:
        out = pruning.prune_model(
            method,
            lambda v, x: model.apply(v, x)[0],
            params,
            batch,
            0.9,
            predicate=predicate,
            key=jax.random.PRNGKey(2),
            iterations=3,
        )
        assert set(out["params"]) == {"mon"} and not out["masks"]
        assert set(out["params"]["mon"]) == {"U", "A", "B"}
        kept, total = _count(out["params"])
        assert total - kept == round(0.9 * total)


class _Tiny(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(2)(x)


def test_zero_pruned_weights_rejects_mismatched_trees():
    params = _Tiny().init(jax.random.PRNGKey(0), jnp.ones((1, 3)))["params"]
    with pytest.raises(ValueError, match="no parameter"):
        pruning.zero_pruned_weights(params, {"other": {"kernel": jnp.ones((3, 2), bool)}})
    with pytest.raises(ValueError, match="shape"):
        pruning.zero_pruned_weights(params, {"Dense_0": {"kernel": jnp.ones((2, 2), bool)}})


@pytest.fixture
def xla_cache(tmp_path_factory):
    """A persistent compilation cache: a resumed run loads the programs the first run compiled."""
    from train_utils import compilation_cache

    with compilation_cache(tmp_path_factory.mktemp("xla_cache")):
        yield


def test_training_hook_holds_masks_in_the_state_and_checkpoints_them(tmp_path, xla_cache):
    """``config.pruning`` -> masks computed once at init, kept in (and restored from) the state."""
    import orbax.checkpoint as ocp
    from train_utils import load_config

    from wtjax.job.train import train_and_evaluate

    config = load_config("tiny", "model=mlp,mask_mode=stored,steps=3", num_devices=1, tensorboard=False)
    config.pruning.update(method="snip", sparsity=0.75, scope="layer", per_reuse=True, batch_size=16)
    config.async_checkpointing = False
    result = train_and_evaluate(config, tmp_path)
    assert result["step"] == 3 and np.isfinite(result["eval/loss"])
    path = tmp_path / "checkpoints" / "3" / "default"
    state = ocp.StandardCheckpointer().restore(path)
    stored = state["masks"]["masks"]["tied"]["block"]["dense1"]["kernel"]
    assert stored.shape == (2, 8, 8) and stored.dtype == bool  # K = 2 scored masks, one per reuse
    assert all(int(stored[k].sum()) == 16 for k in range(2))
    head = state["masks"]["params"]["head"]["kernel"]
    assert head.size - int(head.sum()) == round(0.75 * head.size)
    # The job's summary reports the fraction removed per masked leaf (the studies' Table 1).
    assert result["pruned_fraction"]["head/kernel"] == pytest.approx(0.75, abs=1e-6)
    assert result["pruned_fraction"]["tied/block/dense1/kernel"] == pytest.approx(0.75)
    # Resuming with one more step restores the same masks (they are part of the state).
    config.num_train_steps = 4
    train_and_evaluate(config, tmp_path)
    again = ocp.StandardCheckpointer().restore(tmp_path / "checkpoints" / "4" / "default")
    np.testing.assert_array_equal(again["masks"]["masks"]["tied"]["block"]["dense1"]["kernel"], stored)


def test_pruning_config_rejects_bad_setups():
    from train_utils import load_config

    from wtjax.job import config as cs

    with pytest.raises(KeyError, match="pruning field"):
        cs.pruning_config(methd="snip")
    config = load_config("tiny", "model=mlp,mask_mode=multi")
    config.pruning.update(method="snip", per_reuse=True)
    model = cs.model_from_config(config.model, 4)
    params = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 8, 8, 3)))["params"]
    batch = {"image": jnp.zeros((2, 8, 8, 3)), "label": jnp.zeros(2, jnp.int32)}
    with pytest.raises(ValueError, match="stored"):
        pruning.init_masks(config.pruning, model, params, batch, jax.random.PRNGKey(0))
    config.pruning.method = None
    assert pruning.init_masks(config.pruning, model, params, batch, jax.random.PRNGKey(0)) is None
