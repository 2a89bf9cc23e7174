"""Model families: documented parameter counts, tying/depth invariants, forward passes, registry."""

import dataclasses

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from wtjax import MaskSpec, Tied
from wtjax.analysis.accounting import count_params
from wtjax.job import steps
from wtjax.models import MODELS, build_model
from wtjax.models.resnet20 import option_a_shortcut

CIFAR = (32, 32, 3)
D_CIFAR = 32 * 32 * 3


# Parameter counts from the formulas in the model docstrings (10 classes unless given).
def resnet_like_count(c, k, form, classes=10):
    block = 18 * c * c + 6 * c  # two 3x3 convs (no bias) + three GroupNorms
    return (block if form == "tied" else k * block) + 29 * c + classes * c + classes


def mlp_count(d, w, k, form, classes=10):
    block = 2 * w * w + 8 * w  # two Dense with bias + three LayerNorms
    return (block if form == "tied" else k * block) + d * w + 3 * w + classes * w + classes


def resnet20_count(w, n, form, classes=10):
    m = 1 if form == "tied" else n - 1
    return 29 * w + (288 * w * w + 28 * w) + m * (378 * w * w + 28 * w) + 4 * w * classes + classes


def param_shapes(model, image_shape, **kwargs):
    images = jax.ShapeDtypeStruct((2, *image_shape), jnp.float32)
    return jax.eval_shape(lambda k, x: model.init(k, x, **kwargs), jax.random.PRNGKey(0), images)


@pytest.mark.parametrize(
    "name, fields, expected",
    [
        ("resnet20", dict(size="small"), resnet20_count(8, 3, "not_tied")),
        ("resnet20", dict(size="large"), resnet20_count(64, 3, "not_tied")),
        ("resnet20", dict(size="small", form="tied"), resnet20_count(8, 3, "tied")),
        ("resnet20", dict(size="large", form="tied"), resnet20_count(64, 3, "tied")),
        ("resnet20", dict(width=16), resnet20_count(16, 3, "not_tied")),
        ("resnet20", dict(width=16, num_classes=100), resnet20_count(16, 3, "not_tied", 100)),
        ("mlp", dict(size="small"), mlp_count(D_CIFAR, 256, 8, "tied")),
        ("mlp", dict(size="large", form="not_tied"), mlp_count(D_CIFAR, 512, 8, "not_tied")),
        ("mlp", dict(width=100, depth=3, form="not_tied"), mlp_count(D_CIFAR, 100, 3, "not_tied")),
        ("resnet_like", dict(width=44), resnet_like_count(44, 8, "tied")),
        ("resnet_like", dict(width=172, form="not_tied"), resnet_like_count(172, 8, "not_tied")),
    ],
)
def test_documented_parameter_counts(name, fields, expected):
    variables = param_shapes(build_model(name, **fields), CIFAR)
    assert set(variables) == {"params"}
    assert count_params(variables["params"]) == expected


def test_paper_sizes_land_near_table_1b():
    # Table 1b: ResNet-20 Small 68k, Large 4.3M parameters.
    assert round(resnet20_count(8, 3, "not_tied") / 1e3) == 68
    assert round(resnet20_count(64, 3, "not_tied") / 1e5) == 43
    assert resnet20_count(16, 3, "not_tied") == 269_722  # He et al.'s 0.27M ResNet-20


def _depth_field(name):
    return "blocks_per_stage" if name == "resnet20" else "depth"


@pytest.mark.parametrize(
    "name, fields", [("mlp", dict(width=8)), ("resnet20", dict(width=4)), ("resnet_like", dict(width=8))]
)
def test_params_constant_in_depth_when_tied_and_linear_when_not(name, fields):
    counts = {}
    for form in ("tied", "not_tied"):
        counts[form] = [
            count_params(
                param_shapes(build_model(name, form=form, **{_depth_field(name): k}, **fields), (8, 8, 3))
            )
            for k in (2, 3, 4, 5)
        ]
    assert len(set(counts["tied"])) == 1
    steps = np.diff(counts["not_tied"])
    assert steps[0] > 0 and np.all(steps == steps[0])
    # A not-tied stack with one tied layer's worth of blocks equals the tie in size (K=2 in a
    # ResNet20 stage means one tied block; the not-tied model then also has one per stage).
    if name == "resnet20":
        assert counts["not_tied"][0] == counts["tied"][0]


def jit_apply(model):
    """``model.apply`` compiled once (cheaper than op-by-op dispatch for a single call)."""
    return jax.jit(model.apply, static_argnames=("train", "depth", "return_intermediates"))


def _init(name, image_shape, **fields):
    model = build_model(name, **fields)
    images = jax.random.normal(jax.random.PRNGKey(1), (2, *image_shape))
    params = model.init(jax.random.PRNGKey(0), images)["params"]
    return model, params, images


def _random_params(name, image_shape, **fields):
    """Parameters of the right structure without running ``init`` (which traces a forward pass)."""
    model = build_model(name, **fields)
    images = jax.random.normal(jax.random.PRNGKey(1), (2, *image_shape))
    tree = param_shapes(model, image_shape)["params"]
    leaves, treedef = jax.tree_util.tree_flatten(tree)
    # numpy draws: jax.random compiled a sampler per leaf shape (seconds for a ResNet-20).
    rng = np.random.default_rng(0)
    values = [jnp.asarray(0.3 * rng.normal(size=leaf.shape) + 0.5, leaf.dtype) for leaf in leaves]
    return model, jax.tree_util.tree_unflatten(treedef, values), images


# Every apply compiles its scans again, so each test runs as few forward passes as it can; the
# mask-mode logic lives in Tied and is exercised through the (cheapest) MLP.
def test_mlp_mask_modes():
    model, params, images = _init("mlp", (4, 4, 3), width=8, depth=3, mask_mode="dense")
    run = lambda mode, **kw: jit_apply(model.clone(mask_mode=mode))({"params": params}, images, **kw)[0]  # noqa: E731
    logits = {mode: run(mode) for mode in ("dense", "same", "multi", "dropout")}
    for mode, out in logits.items():
        assert out.shape == (2, 10) and bool(jnp.all(jnp.isfinite(out))), mode
    # Masks change the function, and multi differs from same; dropout is off at evaluation.
    assert not np.allclose(logits["dense"], logits["same"])
    assert not np.allclose(logits["same"], logits["multi"])
    np.testing.assert_array_equal(logits["dropout"], logits["dense"])
    train = run("dropout", train=True, rngs={"dropout": jax.random.PRNGKey(0)})
    assert bool(jnp.all(jnp.isfinite(train))) and not np.allclose(train, logits["dense"])


def test_mlp_intermediates_depth_override_and_not_tied():
    model, params, images = _init("mlp", (4, 4, 3), width=8, depth=3, mask_mode="multi")
    _, out = jit_apply(model)({"params": params}, images, return_intermediates=True)
    assert out["block_outputs"].shape == (3, 2, 8)
    np.testing.assert_array_equal(out["block_outputs"][-1], out["pre_logits"])
    # Any depth runs at evaluation; the first K states do not depend on the later reuses.
    _, deeper = jit_apply(model)({"params": params}, images, depth=5, return_intermediates=True)
    assert deeper["block_outputs"].shape == (5, 2, 8)
    np.testing.assert_allclose(deeper["block_outputs"][:3], out["block_outputs"], rtol=1e-6, atol=1e-6)

    not_tied, nt_params, _ = _init("mlp", (4, 4, 3), width=8, depth=3, form="not_tied")
    assert jax.tree_util.tree_leaves(nt_params["tied"])[0].shape[0] == 3  # K stacked layers
    nt_logits, _ = jit_apply(not_tied)({"params": nt_params}, images)
    assert nt_logits.shape == (2, 10) and bool(jnp.all(jnp.isfinite(nt_logits)))
    with pytest.raises(ValueError, match="not-tied"):
        not_tied.apply({"params": nt_params}, images, depth=5)


def test_resnet20_tied_stages():
    model, params, images = _random_params("resnet20", (8, 8, 3), width=4, form="tied", mask_mode="multi")
    # One shared block per stage next to an untied first block.
    assert sorted(params) == sorted(
        ["stem_conv", "stem_gn", "head"] + [f"stage{s}_{b}" for s in (1, 2, 3) for b in ("block0", "tied")]
    )
    assert all(leaf.shape[-1] == 16 for leaf in jax.tree_util.tree_leaves(params["stage3_tied"]))
    logits, out = jit_apply(model)({"params": params}, images, depth=3, return_intermediates=True)
    shapes = [o.shape for o in out["block_outputs"]]
    assert shapes == [(3, 2, 8, 8, 4), (3, 2, 4, 4, 8), (3, 2, 2, 2, 16)]  # depth override per stage
    np.testing.assert_allclose(out["block_outputs"][-1][-1].mean(axis=(1, 2)), out["pre_logits"], rtol=1e-5)
    # (That the three ties run in multi mode with distinct masks is checked by the accounting
    # tests, which read the modules without another forward pass.)
    assert bool(jnp.all(jnp.isfinite(logits)))


def test_resnet20_not_tied_forward():
    model, params, images = _random_params("resnet20", (8, 8, 3), width=4)
    assert all(leaf.shape[0] == 2 for leaf in jax.tree_util.tree_leaves(params["stage2_tied"]))
    logits, out = jit_apply(model)({"params": params}, images)
    assert logits.shape == (2, 10) and out["pre_logits"].shape == (2, 16)
    assert bool(jnp.all(jnp.isfinite(logits)))


@pytest.mark.parametrize("size", [8, 7])
def test_option_a_shortcut_is_aligned_with_strided_same_conv(size):
    x = jax.random.normal(jax.random.PRNGKey(0), (1, size, size, 3))
    # A 3x3 stride-2 SAME conv whose kernel is the identity at the window centre picks the
    # window centres: the shortcut must add exactly those pixels, then zero channels.
    kernel = jnp.zeros((3, 3, 3, 6)).at[1, 1, jnp.arange(3), jnp.arange(3)].set(1.0)
    conv = jax.lax.conv_general_dilated(x, kernel, (2, 2), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
    short = option_a_shortcut(x, 6, 2)
    assert short.shape == conv.shape
    np.testing.assert_allclose(short, conv, atol=1e-6)
    np.testing.assert_array_equal(short[..., 3:], 0.0)
    np.testing.assert_array_equal(option_a_shortcut(x, 3, 1), x)
    with pytest.raises(ValueError, match="reduce channels"):
        option_a_shortcut(x, 2, 1)


def test_registry_and_field_errors():
    with pytest.raises(KeyError, match="unknown model"):
        build_model("resnet21")
    with pytest.raises(TypeError, match="no field"):
        build_model("mlp", widht=8)
    images = jnp.zeros((1, 8, 8, 3))
    bad = [
        build_model("mlp", size="huge"),
        build_model("mlp", width=8, form="tie"),
        build_model("resnet20", size="medium"),
        build_model("resnet20", width=4, blocks_per_stage=1),
        build_model("resnet20", width=6, groups=4),
    ]
    for model in bad:
        with pytest.raises(ValueError):
            model.init(jax.random.PRNGKey(0), images)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_every_registered_model_meets_the_contract(name):
    model = build_model(name)
    images = jax.ShapeDtypeStruct((2, 32, 32, 3), jnp.float32)
    variables = jax.eval_shape(model.init, jax.random.PRNGKey(0), images)
    # params, and at most the collections the training job keeps (BatchNorm's, outside any tie)
    assert "params" in variables and set(variables) <= {"params", *steps.STATE_COLLECTIONS}
    logits, out = jax.eval_shape(lambda v, x: model.apply(v, x, train=False), variables, images)
    num_classes = {f.name: f.default for f in dataclasses.fields(model)}.get("num_classes", 10)
    assert logits.shape == (2, num_classes)
    assert "pre_logits" in out


class UserBlock(nn.Module):
    @nn.compact
    def __call__(self, z):
        return nn.tanh(nn.Dense(8, name="dense")(z))


class UserNet(nn.Module):
    """A user's own Flax model using the public tied block."""

    @nn.compact
    def __call__(self, x):
        x = nn.Dense(8, name="inp")(x.reshape(x.shape[0], -1))
        x = Tied(UserBlock(), depth=3, mask_mode="multi", mask=MaskSpec(density=0.5, seed=3), name="shared")(
            x
        )
        return nn.Dense(3, name="out")(x)


def test_user_model_with_public_tied_block_trains():
    x = jax.random.normal(jax.random.PRNGKey(0), (8, 4, 4, 1))
    y = jnp.arange(8) % 3
    model = UserNet()
    params = model.init(jax.random.PRNGKey(1), x)["params"]
    # The shared block holds one Dense, whatever the depth.
    assert jax.tree_util.tree_map(jnp.shape, params["shared"]) == {
        "block": {"dense": {"kernel": (8, 8), "bias": (8,)}}
    }
    tx = optax.adam(1e-2)
    opt_state = tx.init(params)

    def loss_fn(p):
        logits = model.apply({"params": p}, x)
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    value_and_grad = jax.jit(jax.value_and_grad(loss_fn))
    loss0, grads = value_and_grad(params)
    assert float(jnp.abs(grads["shared"]["block"]["dense"]["kernel"]).sum()) > 0
    updates, opt_state = tx.update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)
    loss1, _ = value_and_grad(params)
    assert np.isfinite(loss1) and float(loss1) < float(loss0)


@pytest.mark.parametrize(
    "name, fields",
    [
        ("mlp", dict(width=16, depth=4)),
        ("resnet20", dict(size="small", form="tied")),
        ("cct", dict(embed_dim=16, num_heads=2, depth=4)),
        ("convmixer", dict(width=8, depth=4, patch_size=2, kernel_size=3)),
    ],
)
def test_checkpointed_depth_memory_keeps_every_family_s_gradients(name, fields):
    """``checkpoint_every`` reaches each family's tie and changes only what is stored."""
    plain = build_model(name, num_classes=4, **fields)
    segmented = build_model(name, num_classes=4, checkpoint_every=2, **fields)
    images = jax.random.normal(jax.random.PRNGKey(0), (2, 8, 8, 3))
    # Jitted: op-by-op dispatch of the scans (eager init and grad) cost more than compiling them.
    params = jax.jit(plain.init)(jax.random.PRNGKey(1), images)

    def grads(model):
        return jax.jit(jax.grad(lambda p: jnp.sum(model.apply(p, images, train=False)[0])))(params)

    chex.assert_trees_all_close(grads(segmented), grads(plain), atol=1e-5, rtol=1e-4)
