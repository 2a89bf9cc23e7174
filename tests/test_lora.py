"""Invariants of LoRA / multi-mask LoRA (wtjax.methods.lora, wtjax.methods.lora_finetune)."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import traverse_util

from wtjax.methods import lora as L
from wtjax.methods.lora_finetune import LoraFinetune, from_config, num_params
from wtjax.models.vit import ViT, vit_fields


class Small(nn.Module):
    """Dense, attention DenseGeneral (3-D kernels) and Conv kernels in one tiny model."""

    @nn.compact
    def __call__(self, x):
        h = nn.Conv(8, (3, 3), name="conv")(x)  # (3, 3, 3, 8) HWIO
        h = h.reshape(h.shape[0], -1, 8)
        h = nn.MultiHeadDotProductAttention(num_heads=2, name="attn")(h, h)  # (8, 2, 4) / (2, 4, 8)
        h = nn.Dense(6, name="dense")(h.mean(axis=1))
        return h


ALL_TARGETS = r"(conv|query|key|value|out|dense)/kernel$"


@pytest.fixture(scope="module")
def small():
    model = Small()
    x = jax.random.normal(jax.random.PRNGKey(0), (2, 4, 4, 3))
    params = model.init(jax.random.PRNGKey(1), x)["params"]
    return model, x, params


def _perturbed(lora, seed=3):
    """LoRA params with a non-zero B (freshly initialised B is zero, which would hide bugs)."""
    leaves, tree = jax.tree.flatten(lora)
    keys = jax.random.split(jax.random.PRNGKey(seed), len(leaves))
    return jax.tree.unflatten(
        tree, [x + 0.5 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys, strict=True)]
    )


def test_equal_trainable_counts_and_vit_b_matches_table3():
    # Abstract ViT-B/16 params (no memory): rank-8 LoRA on query+value = 0.29M (Table 3).
    model = ViT(num_classes=100, **vit_fields("B/16"))
    base = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, 224, 224, 3)))["params"])
    counts = {}
    for kind, depth in [("lora", 1), ("multi_mask", 2), ("multi_mask", 4)]:
        spec = L.LoraSpec(kind=kind, rank=8, depth=depth)
        lora = jax.eval_shape(lambda b, s=spec: L.init_lora(jax.random.PRNGKey(0), b, s), base)
        counts[(kind, depth)] = L.num_lora_params(lora)
    assert set(counts.values()) == {12 * 2 * 8 * (768 + 768)} == {294_912}


def test_merged_equals_unmerged_for_dense_attention_and_conv(small):
    model, x, params = small
    y_base = model.apply({"params": params}, x)
    for kind, depth in [("lora", 1), ("multi_mask", 3)]:
        spec = L.LoraSpec(kind=kind, rank=2, alpha=3.0, depth=depth, targets=ALL_TARGETS)
        lora = _perturbed(L.init_lora(jax.random.PRNGKey(2), params, spec))
        assert len(traverse_util.flatten_dict(lora)) == 2 * 6  # conv, q, k, v, out, dense
        y_merged = model.apply({"params": L.merge(params, lora, spec)}, x)

        @jax.jit
        def unmerged_apply(lora, spec=spec):
            with L.unmerged(lora, spec):
                return model.apply({"params": params}, x)

        y_unmerged = unmerged_apply(lora)
        np.testing.assert_allclose(y_merged, y_unmerged, rtol=1e-4, atol=1e-5)
        assert np.abs(y_merged - y_base).max() > 1e-2  # the adapters do change the function


def test_zero_b_is_identity_and_multi_mask_generalises_lora(small):
    _, _, params = small
    spec = L.LoraSpec(rank=2, targets=ALL_TARGETS)
    lora = L.init_lora(jax.random.PRNGKey(2), params, spec)
    same = L.merge(params, lora, spec)
    jax.tree.map(np.testing.assert_array_equal, same, jax.device_get(params))
    # multi-mask with d=1 and density 1 is plain LoRA.
    lora = _perturbed(lora)
    full = L.LoraSpec(kind="multi_mask", rank=2, depth=1, density=1.0, targets=ALL_TARGETS)
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6),
        L.merge(params, lora, spec),
        L.merge(params, lora, full),
    )


def test_multi_mask_update_exceeds_rank_r():
    a = jax.random.normal(jax.random.PRNGKey(0), (32, 4))
    b = jax.random.normal(jax.random.PRNGKey(1), (4, 32))
    path = ("layer", "kernel")
    plain = L.delta(path, a, b, L.LoraSpec(rank=4))
    multi = L.delta(path, a, b, L.LoraSpec(kind="multi_mask", rank=4, depth=4, density=0.5))
    assert np.linalg.matrix_rank(np.asarray(plain)) == 4
    assert np.linalg.matrix_rank(np.asarray(multi)) > 4


def test_masks_deterministic_distinct_and_exact_density():
    spec = L.LoraSpec(kind="multi_mask", rank=4, depth=4, density=0.5, seed=7)
    path = ("Transformer", "encoderblock_0", "MultiHeadDotProductAttention_1", "query", "kernel")
    ma, mb = L.lora_masks(path, (16, 4), (4, 24), spec)
    ma2, mb2 = L.lora_masks(path, (16, 4), (4, 24), spec)
    np.testing.assert_array_equal(ma, ma2)
    np.testing.assert_array_equal(mb, mb2)
    assert ma.shape == (4, 16, 4) and mb.shape == (4, 4, 24)
    assert all(int(m.sum()) == 32 for m in ma) and all(int(m.sum()) == 48 for m in mb)
    for i in range(4):
        for j in range(i):
            assert not np.array_equal(ma[i], ma[j]) and not np.array_equal(mb[i], mb[j])
    other, _ = L.lora_masks(path[:1] + ("encoderblock_1",) + path[2:], (16, 4), (4, 24), spec)
    assert not np.array_equal(ma, other)  # another layer, other masks
    reseeded, _ = L.lora_masks(path, (16, 4), (4, 24), L.LoraSpec(kind="multi_mask", rank=4, depth=4, seed=8))
    assert not np.array_equal(ma, reseeded)


def _loss(model, ft, x, labels):
    def loss(params):
        logits = model.apply({"params": lora_params_view(ft, params)}, x)
        return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

    return loss


def lora_params_view(ft, params):
    return L.lora_view(params["base"], params["lora"], ft.spec)


def test_training_changes_only_trainable_leaves(small):
    model, x, params = small
    labels = jnp.array([1, 4])
    ft = LoraFinetune(
        L.LoraSpec(kind="multi_mask", rank=2, depth=2, targets=ALL_TARGETS), train_base=r"^dense/bias$"
    )
    combined = ft.combined(params, ft.init(jax.random.PRNGKey(5), params))
    # AdamW with weight decay: frozen leaves must stay put even though decay would move them.
    tx = ft.masked_optimizer(optax.adamw(1e-2, weight_decay=0.1))
    opt_state = tx.init(combined)
    loss = _loss(model, ft, x, labels)

    @jax.jit
    def step(params, opt_state):
        value, grads = jax.value_and_grad(loss)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, value

    losses = []
    new = combined
    for _ in range(3):
        new, opt_state, value = step(new, opt_state)
        losses.append(float(value))
    assert losses[-1] < losses[0]
    mask = traverse_util.flatten_dict(ft.trainable_mask(combined))
    before, after = traverse_util.flatten_dict(combined), traverse_util.flatten_dict(new)
    for path, trained in mask.items():
        if trained:
            assert not np.array_equal(before[path], after[path]), path
        else:
            np.testing.assert_array_equal(before[path], after[path], err_msg=str(path))
    saved = ft.trainable(new)
    assert num_params(saved) == L.num_lora_params(new["lora"]) + 6  # adapters + dense/bias
    assert list(traverse_util.flatten_dict(saved["base"])) == [("dense", "bias")]


def test_trainable_only_layout_matches_combined(small):
    model, x, params = small
    ft = LoraFinetune(L.LoraSpec(rank=2, targets=ALL_TARGETS), train_base=r"^dense/")
    trainable = _perturbed(ft.init(jax.random.PRNGKey(5), params))
    eff = ft.effective(params, trainable)
    comb = ft.combined(params, trainable)
    np.testing.assert_allclose(
        model.apply({"params": eff}, x), model.apply({"params": lora_params_view(ft, comb)}, x), rtol=1e-6
    )
    np.testing.assert_allclose(
        model.apply({"params": ft.merged(params, trainable)}, x), model.apply({"params": eff}, x), rtol=1e-5
    )


def test_clear_errors(small):
    _, _, params = small
    with pytest.raises(ValueError, match="match no kernel"):
        L.init_lora(jax.random.PRNGKey(0), params, L.LoraSpec(targets="nothing_here"))
    with pytest.raises(ValueError, match="depth 1"):
        L.LoraSpec(kind="lora", depth=2)
    with pytest.raises(ValueError, match="unknown LoRA kind"):
        L.LoraSpec(kind="dora")
    with pytest.raises(ValueError, match="unknown config.lora field"):
        from_config({"kind": "lora", "rnak": 8})
    spec = L.LoraSpec(rank=2, targets=ALL_TARGETS)
    lora = L.init_lora(jax.random.PRNGKey(0), params, spec)
    with pytest.raises(ValueError, match="expected A"):
        L.lora_view(params, lora, L.LoraSpec(rank=3, targets=ALL_TARGETS))
