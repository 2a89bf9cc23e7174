"""Isotropic ConvMixer and shared ViT: parameter counts, SPIN fusion/export, a few training steps.

Tiny sizes (width 8-16, 8x8 images); ImageNet sizes are counted with ``jax.eval_shape`` only.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from wtjax.core.spin import sharing
from wtjax.models import build_model
from wtjax.models.convmixer import VARIANTS, parameter_count

IMAGES = jax.random.normal(jax.random.PRNGKey(0), (4, 8, 8, 3))
LABELS = jnp.array([0, 1, 2, 3])
TINY = dict(width=8, depth=4, patch_size=2, kernel_size=3)
TINY_VIT = dict(width=16, depth=4, mlp_dim=32, num_heads=2, patch_size=4)


def n_params(tree):
    return sum(int(np.prod(v.shape)) for v in jax.tree.leaves(tree))


def count(model, size=8):
    shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, size, size, 3))))
    return n_params(shapes["params"])


def train_losses(model, steps=2):
    """Losses of a few Adam steps on one fixed batch (dropout on): they must go down."""
    # Jitted: an eager init dispatches the scanned blocks op by op, slower than compiling them.
    params = jax.jit(model.init)(jax.random.PRNGKey(1), IMAGES)["params"]
    opt = optax.adam(3e-3)
    state = opt.init(params)

    @jax.jit
    def step(params, state, key):
        def loss_fn(p):
            logits, _ = model.apply({"params": p}, IMAGES, train=True, rngs={"dropout": key})
            return optax.softmax_cross_entropy_with_integer_labels(logits, LABELS).mean()

        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, state = opt.update(grads, state)
        return optax.apply_updates(params, updates), state, loss

    losses = []
    for i in range(steps):
        params, state, loss = step(params, state, jax.random.PRNGKey(i))
        losses.append(float(loss))
    return losses


@pytest.mark.parametrize(
    "variant, rate, paper_m",
    [
        ("768/32/14/3", 1, 20.46),
        ("768/32/14/3", 2, 11.02),
        ("768/32/14/3", 4, 6.3),
        ("1536/20/7/3", 2, 25.8),
        ("512/16/14/9", 2, 3.63),
    ],
)
def test_convmixer_imagenet_counts_match_spin_tables(variant, rate, paper_m):
    fields = VARIANTS[variant]
    model = build_model("convmixer", num_classes=1000, form="shared", share_rate=rate, **fields)
    n = count(model, 224)
    assert n == parameter_count(num_classes=1000, share_rate=rate, **fields)
    assert abs(n / 1e6 - paper_m) < 0.015  # the paper's tables, to the digits they print


@pytest.mark.parametrize(
    "mapping, distribution",
    [("sequential", "uniform"), ("strided", "uniform"), ("pyramid", "middle"), ("sequential", "back")],
)
def test_convmixer_count_follows_the_topology(mapping, distribution):
    depth, c = 12, TINY["width"]
    fields = {**TINY, "depth": depth}
    wm = sharing.layer_to_weight(depth, 2, mapping, distribution)
    model = build_model(
        "convmixer", form="shared", share_mapping=mapping, share_distribution=distribution, **fields
    )
    not_tied = count(build_model("convmixer", form="not_tied", **fields))
    # Only the pointwise conv (C^2 + C) is shared: L - P copies of it disappear.
    assert count(model) == not_tied - (depth - sharing.num_weights(wm)) * (c * c + c)
    tied = count(build_model("convmixer", form="tied", **fields))
    per_layer = 9 * c + c + 4 * c + c * c + c
    assert not_tied - tied == (depth - 1) * per_layer


def test_convmixer_affine_counts_match_spin_table2():
    fields = VARIANTS["768/32/14/3"]
    for g, paper_m in [(1, 11.05), (16, 11.20), (32, 11.40), (64, 11.80)]:
        model = build_model(
            "convmixer", num_classes=1000, form="shared", share_rate=2, affine_groups=g, **fields
        )
        assert abs(count(model, 224) / 1e6 - paper_m) < 0.03


def test_convmixer_affine_and_share_all_counts():
    c, depth = TINY["width"], TINY["depth"]
    base = count(build_model("convmixer", form="shared", **TINY))
    # Affine on the shared pointwise kernel: (L - P) * (C*G + C), as SPIN Table 2 counts.
    assert count(build_model("convmixer", form="shared", affine_groups=2, **TINY)) - base == depth // 2 * (
        c * 2 + c
    )
    everything = count(build_model("convmixer", form="shared", share_params="all", **TINY))
    assert base - everything == (depth - depth // 2) * (9 * c + c + 4 * c)


@pytest.mark.parametrize(
    "name, fields, extra",
    [
        # Everything on: SPIN sharing, per-layer affine transforms and multi-masks.
        ("convmixer", TINY, dict(affine_groups=2, mask_mode="multi")),
        ("vit_shared", TINY_VIT, {}),
    ],
)
def test_shared_form_trains(name, fields, extra):
    # The not-tied and tied forms are the lead's Tied paths (tests/test_tied.py, tests/test_cct.py).
    model = build_model(name, form="shared", **fields, **extra)
    losses = train_losses(model)
    assert all(np.isfinite(losses)) and losses[-1] < losses[0]


def _jit_logits(model, params):
    return jax.jit(lambda p: model.apply({"params": p}, IMAGES)[0])(params)


@pytest.mark.parametrize("name, fields", [("convmixer", TINY)])  # vit_shared: same spin helpers
def test_fusion_from_not_tied_reproduces_it_and_export_is_exact(name, fields):
    not_tied = build_model(name, form="not_tied", **fields)
    fused = build_model(name, form="shared", fusion="channel", **fields)  # SPIN's best (Table 3)
    tie = "mixer" if name == "convmixer" else "encoder"
    # init/apply jitted (eager dispatch of the scans is slower); from_not_tied/export_fused are not.
    pre = jax.jit(not_tied.init)(jax.random.PRNGKey(0), IMAGES)["params"]
    # Identical layers within each sharing group (0,0,1,1): fusing them loses nothing.
    pre[tie] = jax.tree.map(lambda v: v[jnp.array([0, 0, 2, 2])], pre[tie])
    params = fused.from_not_tied(jax.jit(fused.init)(jax.random.PRNGKey(1), IMAGES)["params"], pre)
    ref = _jit_logits(not_tied, pre)
    np.testing.assert_allclose(_jit_logits(fused, params), ref, rtol=1e-4, atol=1e-5)
    # After (simulated) training the fusion weights are not the identity; export folds them.
    params[tie]["fusion"] = jax.tree.map(lambda a: a * 1.3 + 0.1, params[tie]["fusion"])
    export_model, exported = fused.export_fused(params)
    assert export_model.fusion == "none" and "fusion" not in exported[tie]
    assert n_params(exported) < n_params(params)
    np.testing.assert_allclose(
        _jit_logits(export_model, exported),
        _jit_logits(fused, params),
        rtol=1e-4,
        atol=1e-5,
    )
    assert n_params(exported) == count(build_model(name, form="shared", **fields))


def test_shared_vit_count_matches_formula():
    d, m, depth = TINY_VIT["width"], TINY_VIT["mlp_dim"], TINY_VIT["depth"]
    layer = 4 * (d * d + d) + 2 * d * m + m + d + 4 * d  # q,k,v,out + MLP + two LayerNorms
    not_tied = count(build_model("vit_shared", form="not_tied", **TINY_VIT))
    assert not_tied - count(build_model("vit_shared", form="tied", **TINY_VIT)) == (depth - 1) * layer
    assert (
        not_tied - count(build_model("vit_shared", form="shared", share_rate=2, **TINY_VIT))
        == depth // 2 * layer
    )


@pytest.mark.parametrize(
    "name, fields",
    [("convmixer", TINY), ("vit_shared", TINY_VIT), ("mlp", dict(width=8, depth=2))],
)
def test_not_tied_form_is_dense_whatever_the_mask_mode(name, fields):
    """One rule for every family (wtjax.models.tying): masks apply to the tied and shared forms
    only; the not-tied stack is the explicit (dense) baseline."""
    dense = build_model(name, form="not_tied", mask_mode="dense", **fields)
    masked = build_model(name, form="not_tied", mask_mode="multi", **fields)
    # Jitted: eager init/apply dispatch the scanned blocks op by op, slower than compiling them.
    variables = jax.jit(dense.init)(jax.random.PRNGKey(0), IMAGES)

    def logits(model, variables):
        return jax.jit(lambda v: model.apply(v, IMAGES)[0])(variables)

    np.testing.assert_array_equal(logits(dense, variables), logits(masked, variables))
    tied = build_model(name, form="tied", mask_mode="dense", **fields)
    tied_vars = jax.jit(tied.init)(jax.random.PRNGKey(0), IMAGES)
    multi = build_model(name, form="tied", mask_mode="multi", **fields)
    assert not np.allclose(logits(tied, tied_vars), logits(multi, tied_vars))
