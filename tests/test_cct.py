"""CCT: public parameter counts, the tied forms go through Tied, masks, dropout, a few training steps.

Tiny sizes (embedding 16, 8x8 images); CCT-7/3x1 is counted with ``jax.eval_shape`` only.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from wtjax.models import build_model
from wtjax.models.cct import VARIANTS

IMAGES = jax.random.normal(jax.random.PRNGKey(0), (4, 8, 8, 3))
LABELS = jnp.array([0, 1, 2, 3])
TINY = dict(embed_dim=16, depth=4, num_heads=2, mlp_ratio=2.0)


def n_params(tree):
    return sum(int(np.prod(v.shape)) for v in jax.tree.leaves(tree))


def count(model, size=32):
    shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, size, size, 3))))
    return n_params(shapes["params"])


def formula(d, depth, mlp_ratio, tokens, classes=10, k=3):
    """The module docstring's count for a 1-conv tokenizer (``depth`` distinct layers)."""
    m = int(d * mlp_ratio)
    layer = 3 * d * d + (d * d + d) + (d * m + m) + (m * d + d) + 4 * d
    return 3 * k * k * d + tokens * d + depth * layer + 2 * d + (d + 1) + d * classes + classes


@pytest.mark.parametrize(
    "variant, form, expected, paper",
    [
        ("7/3x1", "not_tied", formula(256, 7, 2.0, 256), 3.76),  # public CCT-7/3x1; paper Table 1b 3.7M
        ("7/3x1", "tied", formula(256, 1, 2.0, 256), 0.60),  # paper: CCT Large (multi-mask weight-tied)
        ("7/3x1-small", "not_tied", formula(128, 7, 2.0, 256), 0.96),  # paper: CCT-7 Small
    ],
)
def test_counts_match_public_code_and_paper(variant, form, expected, paper):
    n = count(build_model("cct", form=form, **VARIANTS[variant]))
    assert n == expected
    assert abs(n / 1e6 - paper) < 0.01


def test_public_cct_2_and_4_counts():
    # CCT-2/3x2 and CCT-4/3x2 from the public README: 0.28M and 0.48M.
    assert round(count(build_model("cct", form="not_tied", **VARIANTS["2/3x2"])) / 1e6, 2) == 0.28
    assert round(count(build_model("cct", form="not_tied", **VARIANTS["4/3x2"])) / 1e6, 2) == 0.48


def test_tied_form_is_the_one_set_shared_form():
    """There is one tying implementation: ``tied`` == ``shared`` with a single weight set."""
    tied = build_model("cct", form="tied", mask_mode="dense", **TINY)
    shared = build_model("cct", form="shared", share_rate=TINY["depth"], mask_mode="dense", **TINY)
    params = tied.init(jax.random.PRNGKey(0), IMAGES)["params"]
    stacked = {**params, "encoder": jax.tree.map(lambda v: v[None], params["encoder"])}
    np.testing.assert_allclose(
        shared.apply({"params": stacked}, IMAGES)[0], tied.apply({"params": params}, IMAGES)[0], rtol=1e-5
    )
    assert n_params(stacked) == count(shared, 8)


def test_multi_masks_hit_attention_and_mlp_kernels_at_density_0_9():
    model = build_model("cct", form="tied", **TINY)  # defaults: multi-mask, density 0.9
    assert model.mask_mode == "multi" and model.mask.density == 0.9
    params = model.init(jax.random.PRNGKey(0), IMAGES)["params"]
    dense = build_model("cct", form="tied", mask_mode="dense", **TINY)
    masked_out, out = model.apply({"params": params}, IMAGES), dense.apply({"params": params}, IMAGES)
    assert not np.allclose(masked_out[0], out[0])
    # Which leaves are masked: exactly the kernels of qkv, proj, linear1, linear2.
    from wtjax.core.masks import masks_for

    block = params["encoder"]["block"]
    masked = sorted("/".join(p) for p in masks_for(block, model.mask, 0))
    assert masked == ["linear1/kernel", "linear2/kernel", "self_attn/proj/kernel", "self_attn/qkv/kernel"]


def test_dropout_only_in_training_and_follows_the_rng():
    model = build_model("cct", form="tied", **TINY)
    params = model.init(jax.random.PRNGKey(0), IMAGES)["params"]
    train = jax.jit(lambda p, key: model.apply({"params": p}, IMAGES, train=True, rngs={"dropout": key})[0])
    a, b, c = (train(params, jax.random.PRNGKey(k)) for k in (1, 1, 2))
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(a, c)
    evaluate = jax.jit(lambda p: model.apply({"params": p}, IMAGES)[0])
    np.testing.assert_array_equal(evaluate(params), evaluate(params))
    assert not np.allclose(evaluate(params), a)


def test_multi_mask_tied_cct_trains():
    # The paper's model; the not-tied and shared forms train through the same Tied path
    # (tests/test_tied.py, tests/test_isotropic.py).
    model = build_model("cct", form="tied", **TINY)
    params = model.init(jax.random.PRNGKey(1), IMAGES)["params"]
    opt = optax.adamw(3e-3, weight_decay=0.05)
    state = opt.init(params)

    @jax.jit
    def step(params, state, key):
        def loss_fn(p):
            logits, _ = model.apply({"params": p}, IMAGES, train=True, rngs={"dropout": key})
            return optax.softmax_cross_entropy_with_integer_labels(logits, LABELS).mean()

        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, state = opt.update(grads, state, params)
        return optax.apply_updates(params, updates), state, loss

    losses = []
    for i in range(2):
        params, state, loss = step(params, state, jax.random.PRNGKey(i))
        losses.append(float(loss))
    assert all(np.isfinite(losses)) and losses[-1] < losses[0]


def test_share_params_selects_attention_or_mlp():
    base = dict(form="shared", share_rate=2, **TINY)
    d, m = TINY["embed_dim"], int(TINY["embed_dim"] * TINY["mlp_ratio"])
    attention = 3 * d * d + d * d + d + 2 * d  # qkv, proj, pre_norm
    mlp = d * m + m + m * d + d + 2 * d  # linear1, linear2, norm1
    not_tied = count(build_model("cct", form="not_tied", **TINY), 8)
    assert not_tied - count(build_model("cct", share_params="attention", **base), 8) == 2 * attention
    assert not_tied - count(build_model("cct", share_params="mlp", **base), 8) == 2 * mlp
    assert not_tied - count(build_model("cct", share_params="all", **base), 8) == 2 * (attention + mlp)


def test_deq_form_converges_and_trains():
    model = build_model("deq_cct", embed_dim=16, num_heads=2, depth=4, f_max_iter=12, b_max_iter=12)
    params = model.init(jax.random.PRNGKey(0), IMAGES)["params"]
    cct = build_model("cct", form="tied", **TINY)
    # Same tokenizer / pooling / classifier names and shapes as the CCT (only the tie differs).
    cct_params = jax.eval_shape(lambda: cct.init(jax.random.PRNGKey(0), IMAGES))["params"]
    assert set(params) == set(cct_params) - {"encoder"} | {"tied"}

    @jax.jit
    def loss_and_grad(p):
        def loss_fn(p):
            logits, out = model.apply({"params": p}, IMAGES, train=True)
            ce = optax.softmax_cross_entropy_with_integer_labels(logits, LABELS).mean()
            return ce + out["aux_loss"], out

        return jax.value_and_grad(loss_fn, has_aux=True)(p)

    (loss, out), grads = loss_and_grad(params)
    m = out["metrics"]
    assert float(m["deq_fwd_nonconverged"]) == 0 and float(m["deq_fwd_abs_res_max"]) < 1e-3
    assert np.isfinite(float(loss))
    g = float(sum(jnp.abs(a).sum() for a in jax.tree.leaves(grads["tied"])))
    assert np.isfinite(g) and g > 0
