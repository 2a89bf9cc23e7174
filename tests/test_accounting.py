"""Parameter/FLOP accounting against hand counts, the masks the model really applies, and XLA."""

import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from wtjax import MaskSpec, Tied
from wtjax.analysis import accounting
from wtjax.core.masks import mask_key, unstructured_mask
from wtjax.models import build_model

IMAGE = (2, 2, 1)  # tiny images: the MLP's input is 4 features
W, K = 8, 3  # MLP width and depth


def shapes(model, image_shape=IMAGE, **kwargs):
    images = jax.ShapeDtypeStruct((1, *image_shape), jnp.float32)
    return jax.eval_shape(lambda k, x: model.init(k, x, **kwargs), jax.random.PRNGKey(0), images)["params"]


def kernels_seen_by_model(model, params, images):
    """Run the unrolled model and record, per reuse, which entries of each tied kernel were nonzero.

    Inside the tie a Dense layer's ``variables`` are the masked view of the shared weight, so this
    reads the masks the model really applied (independently of the accounting code).
    """
    seen = []

    def record(next_fun, args, kwargs, context):
        if isinstance(context.module, nn.Dense) and "block" in context.module.path:
            seen.append(
                (context.module.path[-1], np.asarray(context.module.variables["params"]["kernel"]) != 0)
            )
        return next_fun(*args, **kwargs)

    with nn.intercept_methods(record):
        model.apply({"params": params}, images)
    names = sorted({name for name, _ in seen})
    return [{n: m for n, m in seen[i : i + len(names)]} for i in range(0, len(seen), len(names))]


@pytest.mark.parametrize(
    "spec, mode, kept_per_kernel",
    [
        (MaskSpec(kind="unstructured", density=0.3, seed=5), "multi", round(0.3 * W * W)),
        (MaskSpec(kind="nm", n=1, m=4, density=0.25, seed=2), "multi", W * W // 4),
        (MaskSpec(kind="unstructured", density=0.5), "same", W * W // 2),
    ],
)
def test_counts_equal_the_masks_the_model_applies(spec, mode, kept_per_kernel):
    model = build_model("mlp", width=W, depth=K, mask_mode=mode, mask=spec, scan=False)
    images = jax.random.normal(jax.random.PRNGKey(0), (2, *IMAGE))
    params = model.init(jax.random.PRNGKey(1), images)["params"]
    per_reuse = kernels_seen_by_model(model, params, images)
    assert len(per_reuse) == K and sorted(per_reuse[0]) == ["dense1", "dense2"]

    s = accounting.summary(model, params, IMAGE, flops=False)
    (site,) = s["tied"]
    assert site["path"] == "tied" and site["depth"] == K and site["mask_mode"] == mode
    block = 2 * W * W + 8 * W  # MLP docstring: two Dense with bias + three LayerNorms
    assert site["block_params"] == block and site["masked_params"] == 2 * W * W
    # Exact per-reuse density: every reuse keeps the same number of entries of each kernel.
    for reuse in per_reuse:
        assert [int(m.sum()) for m in reuse.values()] == [kept_per_kernel] * 2
    assert site["active_per_reuse"] == block - 2 * W * W + 2 * kept_per_kernel
    union = sum(int(np.logical_or.reduce([r[n] for r in per_reuse]).sum()) for n in ("dense1", "dense2"))
    assert site["used"] == block - 2 * W * W + union
    if mode == "same":
        assert union == 2 * kept_per_kernel  # one mask reused
    else:
        assert union > 2 * kept_per_kernel
    stored = accounting.count_params(params)
    assert s["stored"] == stored and s["active"] == stored - 2 * W * W + 2 * kept_per_kernel
    assert s["used"] == stored - 2 * W * W + union
    assert s["unrolled_active"] == stored - block + K * site["active_per_reuse"]


def test_masks_match_an_independent_regeneration():
    # The union from explicit masks built here from mask_key and the documented path hashing.
    spec = MaskSpec(kind="unstructured", density=0.25, seed=9)
    model = build_model("mlp", width=W, depth=K, mask=spec)
    site = accounting.tied_site_accounting(shapes(model), accounting.find_tied(model, IMAGE)[0])
    union = 0
    for name in ("dense1", "dense2"):
        path = ("tied", "block", name, "kernel")
        masks = [unstructured_mask(mask_key(9, k, path), (W, W), 0.25) for k in range(K)]
        union += int(np.logical_or.reduce([np.asarray(m) for m in masks]).sum())
    assert site["used"] - (site["block_params"] - 2 * W * W) == union


def test_dense_dropout_and_not_tied_count_everything():
    for fields in (dict(mask_mode="dense"), dict(mask_mode="dropout"), dict(form="not_tied")):
        model = build_model("mlp", width=W, depth=K, **fields)
        s = accounting.summary(model, shapes(model), IMAGE, flops=False)
        assert s["active"] == s["used"] == s["stored"], fields
        (site,) = s["tied"]
        assert site["masked_params"] == 0
        if fields.get("form") == "not_tied":
            assert site["block_params"] == K * (2 * W * W + 8 * W) and site["depth"] == K
            assert s["unrolled_active"] == s["stored"]
        else:
            assert s["unrolled_active"] == s["stored"] + (K - 1) * site["block_params"]


def test_used_is_near_its_expectation():
    width, depth, d = 32, 4, 0.3
    model = build_model("mlp", width=width, depth=depth, mask=MaskSpec(density=d, seed=1))
    (site,) = accounting.summary(model, shapes(model), IMAGE, flops=False)["tied"]
    n = 2 * width * width
    p = 1 - (1 - d) ** depth
    assert site["expected_used"] - (site["block_params"] - n) == pytest.approx(n * p)
    # Independent masks: the union is a sum of n Bernoulli(p) entries (exact-count masks vary less).
    assert abs(site["used"] - site["expected_used"]) < 5 * np.sqrt(n * p * (1 - p))


def test_resnet20_tied_stages_hand_counts():
    w, d = 4, 0.5
    model = build_model("resnet20", width=w, form="tied", mask_mode="multi", mask=MaskSpec(density=d))
    s = accounting.summary(model, shapes(model, (8, 8, 3)), (8, 8, 3), flops=False)
    assert [t["path"] for t in s["tied"]] == ["stage1_tied", "stage2_tied", "stage3_tied"]
    removed = 0
    for t, c in zip(s["tied"], (w, 2 * w, 4 * w), strict=True):
        kernel = 9 * c * c
        assert t["depth"] == 2 and t["block_params"] == 2 * kernel + 4 * c  # 2 convs, 2 GroupNorms
        assert t["masked_params"] == 2 * kernel
        assert t["active_per_reuse"] == 4 * c + 2 * round(d * kernel)
        assert 2 * round(d * kernel) < t["used"] - 4 * c <= 2 * kernel
        removed += 2 * kernel - 2 * round(d * kernel)
    assert s["active"] == s["stored"] - removed
    assert (
        s["stored"] == 29 * w + 288 * w * w + 28 * w + 378 * w * w + 28 * w + 40 * w + 10
    )  # docstring formula


def test_stored_masks_are_read_from_the_masks_collection():
    model = build_model("mlp", width=W, depth=K, mask_mode="stored")
    params = shapes(model)
    rng = np.random.default_rng(0)
    per_reuse = rng.random((K, W, W)) < 0.4  # dense1: one mask per reuse
    single = rng.random((W, W)) < 0.6  # dense2: one mask for every reuse
    masks = {"tied": {"block": {"dense1": {"kernel": per_reuse}, "dense2": {"kernel": single}}}}
    (site,) = accounting.summary(model, params, IMAGE, flops=False, masks=masks)["tied"]
    dense_part = site["block_params"] - 2 * W * W
    assert site["masked_params"] == 2 * W * W
    assert site["active_per_reuse"] == dense_part + round(per_reuse.sum() / K + single.sum())
    assert site["used"] == dense_part + int(np.logical_or.reduce(per_reuse).sum() + single.sum())
    (no_masks,) = accounting.summary(model, params, IMAGE, flops=False)["tied"]
    assert no_masks["note"] and no_masks["used"] == no_masks["block_params"]


def test_gradients_vanish_outside_the_used_entries():
    model = build_model("mlp", width=W, depth=K, mask=MaskSpec(density=0.3, seed=4))
    images = jax.random.normal(jax.random.PRNGKey(0), (4, *IMAGE))
    params = model.init(jax.random.PRNGKey(1), images)["params"]
    grads = jax.jit(jax.grad(lambda p: model.apply({"params": p}, images)[0].sum()))(params)
    for name in ("dense1", "dense2"):
        path = ("tied", "block", name, "kernel")
        union = np.logical_or.reduce([np.asarray(nm_or_u) for nm_or_u in _masks(path)])
        g = np.asarray(grads["tied"]["block"][name]["kernel"])
        np.testing.assert_array_equal(g[~union], 0.0)
        assert np.count_nonzero(g) > 0.5 * union.sum()


def _masks(path):
    return [unstructured_mask(mask_key(4, k, path), (W, W), 0.3) for k in range(K)]


def test_flops_are_linear_in_depth_and_match_matmul_counts():
    flops = [accounting.flops_per_image(build_model("mlp", width=W, depth=k), IMAGE) for k in (1, 2, 3)]
    per_reuse = flops[1] - flops[0]
    assert flops[2] - flops[1] == pytest.approx(per_reuse)
    assert per_reuse >= 2 * (2 * W * W)  # two W x W matmuls (multiply-add = 2 FLOPs)
    not_tied = accounting.flops_per_image(build_model("mlp", width=W, depth=3, form="not_tied"), IMAGE)
    assert not_tied == pytest.approx(flops[2])  # same computation, different storage
    # Masks do not change the count (dense execution) and a per-call depth is honoured.
    multi = build_model("mlp", width=W, depth=1, mask_mode="multi")
    assert accounting.flops_per_image(multi, IMAGE, {"depth": 3}) == pytest.approx(flops[2])

    class Linear(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.Dense(5, use_bias=False)(x.reshape(x.shape[0], -1))

    assert accounting.flops_per_image(Linear(), (3, 4)) == 2 * 12 * 5


class Scanned(nn.Module):
    """A user model with a scanned tie and no ``scan`` field to turn it off."""

    @nn.compact
    def __call__(self, x):
        x = x.reshape(x.shape[0], -1)
        return Tied(nn.Dense(x.shape[-1]), depth=3, mask_mode="multi", name="rep")(x)


def test_user_models_are_discovered_and_loops_refused():
    s = accounting.summary(Scanned(), shapes(Scanned()), IMAGE, flops=False)
    (site,) = s["tied"]
    assert site["path"] == "rep" and site["depth"] == 3 and site["masked_params"] == 16
    with pytest.raises(ValueError, match="loop"):
        accounting.flops_per_image(Scanned(), IMAGE)
    # summary keeps its counts for looping programs (e.g. DEQ solvers) and says why FLOPs are missing.
    s = accounting.summary(Scanned(), shapes(Scanned()), IMAGE)
    assert s["flops_per_image"] is None and "loop" in s["flops_note"] and s["stored"] == 20
    assert "not counted" in accounting.format_summary(s)


def test_summary_is_json_and_formatted():
    model = build_model("mlp", width=W, depth=K, mask=MaskSpec(kind="nm"))
    s = accounting.summary(model, shapes(model), IMAGE, call_kwargs={"depth": 5})
    assert s["tied"][0]["depth"] == 5 and s["flops_per_image"] > 0
    assert json.loads(json.dumps(s)) == s
    text = accounting.format_summary(s)
    assert f"{s['stored']:,}" in text and "tied: multi nm" in text and "K=5" in text and "FLOPs" in text
