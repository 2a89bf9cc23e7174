"""The multiscale DEQ: reference parameter counts, shapes, the fixed point, gradients, training."""

import math
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import traverse_util
from train_utils import load_config

from wtjax.job import config as cs
from wtjax.job.train import train_and_evaluate
from wtjax.models import build_model
from wtjax.models.deq import METRIC_NAMES
from wtjax.models.mdeq import MDEQ, flatten_branches, unflatten_branches
from wtjax.models.mdeq_layers import MDEQHead
from wtjax.tools import sweep

# Three branches exercise two-level down- and upsampling and the 1x1 stem stage. GroupNorm in the
# stem and head keeps these tests of the implicit layer free of batch statistics (the BatchNorm
# default has its own test).
SMALL = dict(
    size=None, channels=(4, 8, 8), head_channels=(2, 2, 4), final_channels=8, groups=2, depth=3, norm="group"
)
# Broyden converges on this map at initialisation; plain or damped iteration does not.
BROYDEN = dict(f_solver="broyden", f_max_iter=60, f_tol=1e-5, b_solver="broyden", b_max_iter=60, b_tol=1e-8)


def _images(batch=2, size=8, dtype=jnp.float32):
    return jax.random.normal(jax.random.key(0), (batch, size, size, 3), dtype)


def _loss(model, params, x, y, **kw):
    logits, out = model.apply({"params": params}, x, rngs={"dropout": jax.random.key(3)}, **kw)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean() + out["aux_loss"], out


def _num_params(model, size=32):
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, size, size, 3))))
    return sum(math.prod(a.shape) for a in jax.tree.leaves(shapes["params"]))


@pytest.mark.parametrize("size,count", [("tiny", 158_986), ("large", 11_098_398)])
def test_parameter_counts_equal_the_reference_implementation(size, count):
    # The trainable parameters of locuslab/mdeq (commit 20e8a40): its MDEQClsNet built from
    # experiments/cifar/cls_mdeq_{TINY,LARGE}.yaml (weight norm on), summing the parameters with
    # requires_grad (the frozen copy of the layer the reference keeps for its backward pass is
    # excluded). The MDEQ paper (Bai et al. 2020, Table 1) reports them rounded: 170K and 10M.
    assert _num_params(MDEQ(size=size)) == count


def test_initialisation_is_the_reference_one():
    """locuslab/mdeq's ``init_weights`` redraws plain convolutions from N(0, 0.01) (weights and
    biases); weight-normalised kernels ``v`` and the classifier keep PyTorch's default
    U(+-1/sqrt(fan_in)), with ``g = ||v||``; norms start at scale 1, bias 0."""
    # The parameters do not depend on the image size: 8x8 images make init cheap.
    params = jax.jit(MDEQ(size="tiny").init)(jax.random.key(0), jnp.zeros((1, 8, 8, 3)))["params"]
    flat = {"/".join(k): np.asarray(v) for k, v in traverse_util.flatten_dict(params).items()}
    plain, weight_normed = [], 0
    for path, value in flat.items():
        module, leaf = path.rsplit("/", 1)
        if leaf == "kernel" and value.ndim == 4 and f"{module}/scale" in flat:  # WNConv's v
            bound = 1 / math.sqrt(math.prod(value.shape[:3]))
            assert np.abs(value).max() <= bound and value.std() == pytest.approx(
                bound / math.sqrt(3), rel=0.1
            )
            norms = np.sqrt((value**2).sum(axis=(0, 1, 2)))
            np.testing.assert_allclose(flat[f"{module}/scale"], norms, rtol=1e-6)
            weight_normed += 1
        elif leaf in ("kernel", "bias") and f"{module}/kernel" in flat and flat[f"{module}/kernel"].ndim == 4:
            plain.append(value.ravel())
    plain = np.concatenate(plain)
    assert weight_normed > 0 and plain.std() == pytest.approx(0.01, rel=0.02) and abs(plain.mean()) < 1e-3
    bound = 1 / math.sqrt(flat["head/classifier/kernel"].shape[0])
    for leaf in ("kernel", "bias"):
        value = flat[f"head/classifier/{leaf}"]
        assert np.abs(value).max() <= bound and value.std() > bound / 3
    norm_scales = [
        v
        for p, v in flat.items()
        if p.endswith("/scale") and v.ndim == 1 and p.rsplit("/", 1)[0] + "/kernel" not in flat
    ]
    assert norm_scales and all(np.all(v == 1) for v in norm_scales)


def test_the_reference_batchnorm_sits_in_stem_and_head_only():
    """``norm='batch'`` (the default, as the reference): running statistics for the stem and head
    norms only (the implicit layer's map must not depend on the batch), the same parameters as
    GroupNorm, batch statistics at training and running ones at evaluation."""
    model = MDEQ(**{**SMALL, "norm": "batch"}, tied_only=True)
    x = _images(batch=4)
    variables = jax.jit(model.init)(jax.random.key(1), x)
    assert set(variables["batch_stats"]) == {"stem1_bn", "stem2_bn", "stage0_bn", "head"}
    assert _num_params(model, size=8) == _num_params(MDEQ(**SMALL), size=8)
    others_scaled = x.at[1:].multiply(3.0)  # sample 0 unchanged, the rest of its batch not
    apply = jax.jit(model.apply, static_argnames=("train", "mutable"))

    def first_logits(images, train):
        if train:
            return apply(variables, images, train=True, mutable="batch_stats")[0][0][0]
        return apply(variables, images)[0][0]

    assert float(jnp.abs(first_logits(x, True) - first_logits(others_scaled, True)).max()) > 1e-3
    np.testing.assert_allclose(first_logits(x, False), first_logits(others_scaled, False), rtol=1e-6)
    _, updated = apply(variables, x, train=True, mutable="batch_stats")
    moved = jax.tree.map(
        lambda a, b: float(jnp.abs(a - b).max()), updated["batch_stats"], variables["batch_stats"]
    )
    assert min(jax.tree.leaves(moved)) > 0  # every running statistic took a step toward the batch's
    with pytest.raises(ValueError, match="norm must be one of"):
        MDEQ(**{**SMALL, "norm": "layer"}).init(jax.random.key(1), x)


def test_shapes_branches_metrics_and_dropout():
    model = MDEQ(**SMALL, dropout=0.5, f_solver="fixed_point", f_max_iter=3)
    x = _images(batch=3)
    variables = jax.jit(model.init)(jax.random.key(1), x)
    apply = jax.jit(model.apply, static_argnames=("train", "return_intermediates"))
    run = lambda key, train: apply(  # noqa: E731
        variables, x, train=train, rngs={"dropout": jax.random.key(key)}, return_intermediates=True
    )
    logits, out = run(0, False)
    # Dropout masks are drawn per step at training, and there are none at evaluation.
    np.testing.assert_array_equal(run(1, False)[0], logits)
    assert float(jnp.abs(run(0, True)[0] - run(1, True)[0]).max()) > 1e-4
    assert logits.shape == (3, 10) and out["pre_logits"].shape == (3, 8)
    assert [b.shape for b in out["branches"]] == [(3, 8, 8, 4), (3, 4, 4, 8), (3, 2, 2, 8)]
    assert out["block_outputs"].shape == (1, 3, 8 * 8 * 4 + 4 * 4 * 8 + 2 * 2 * 8)
    assert set(out["metrics"]) == set(METRIC_NAMES) and float(out["metrics"]["deq_fwd_nstep"]) == 3
    block = variables["params"]["tied"]["block"]
    assert {"fuse2_0", "fuse0_2", "post2_conv"} <= set(block)
    assert block["fuse2_0"]["down1_conv"]["kernel"].shape == (3, 3, 4, 8)  # 4 -> 4 -> 8 channels
    assert "stage0_conv" in variables["params"]  # more than two branches: the 1x1 stem stage


def test_flatten_round_trip_and_bad_input():
    zs = (jnp.arange(2 * 4 * 4 * 3.0).reshape(2, 4, 4, 3), jnp.ones((2, 2, 2, 5)))
    z = flatten_branches(zs)
    assert z.shape == (2, 48 + 20)
    back = unflatten_branches(z, [(4, 4, 3), (2, 2, 5)])
    for a, b in zip(back, zs, strict=True):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(ValueError, match="values per sample"):
        unflatten_branches(z, [(4, 4, 3)])
    with pytest.raises(ValueError, match="divisible by 4"):
        MDEQ(**SMALL).init(jax.random.key(0), _images(size=6))
    with pytest.raises(ValueError, match="unknown MDEQ size"):
        MDEQ(size="huge").init(jax.random.key(0), _images())
    with pytest.raises(ValueError, match="one head width per branch"):
        MDEQ(**{**SMALL, "head_channels": (2, 2)}).init(jax.random.key(0), _images())
    with pytest.raises(TypeError):
        build_model("mdeq", branches=3)


def test_pretraining_and_tied_only_are_the_layer_applied_depth_times():
    model = MDEQ(**SMALL, deq_pretrain_steps=5, **BROYDEN)
    x = _images()
    params = model.init(jax.random.key(1), x)["params"]
    _, pre = model.apply({"params": params}, x, step=2, return_intermediates=True)
    _, tied = model.clone(tied_only=True).apply({"params": params}, x, step=99, return_intermediates=True)
    layer = model._block(parent=None)
    xs = {"injection": pre["stem"]}
    zs = tuple(jnp.zeros_like(b) for b in pre["branches"])
    for _ in range(SMALL["depth"]):
        zs = layer.apply({"params": params["tied"]["block"]}, zs, xs)
    for out in (pre, tied):
        assert float(out["metrics"]["deq_active"]) == 0.0
        np.testing.assert_allclose(out["block_outputs"][0], flatten_branches(zs), rtol=1e-5, atol=1e-5)
    _, solved = model.apply({"params": params}, x, step=5)
    assert float(solved["metrics"]["deq_active"]) == 1.0


def _shrink_post_fusion_norms(params, factor):
    """Scales the layer's output norms: a better-conditioned fixed point Broyden solves to 1e-10."""

    def scale(path, a):
        k = jax.tree_util.keystr(path)
        return a * factor if "post" in k and "gn" in k and "scale" in k else a

    return jax.tree_util.tree_map_with_path(scale, params)


def test_fixed_point_and_implicit_gradient_against_a_dense_linear_solve():
    """The solution is a fixed point of the layer (with the step's dropout masks), and the block's
    gradient equals the implicit-function theorem's with ``(I - J)^T u = dL/dz*`` solved densely.

    At initialisation the layer's Jacobian at its fixed point has spectral radius > 1 (plain and
    damped iteration diverge, so no unrolled reference exists) and Broyden's iterates are
    sensitive enough that central differences are noise; the dense solve is exact.
    """
    with jax.enable_x64(True):
        arch = {**SMALL, "channels": (4, 4), "head_channels": (2, 2)}
        solver = dict(BROYDEN, f_max_iter=100, f_tol=1e-10, b_max_iter=100, b_tol=1e-12)
        model = MDEQ(**arch, dropout=0.2, **solver)
        x, y = _images(batch=1, dtype=jnp.float64), jnp.array([3])
        params = jax.jit(model.init)(jax.random.key(1), x)["params"]
        params = _shrink_post_fusion_norms(jax.tree.map(lambda a: a.astype(jnp.float64), params), 0.2)
        loss = lambda p: _loss(model, p, x, y, train=True, return_intermediates=True)  # noqa: E731
        grads, out = jax.jit(jax.grad(loss, has_aux=True))(params)
        z = out["block_outputs"][0]
        # The masks the model drew: the first draw of the step's dropout stream.
        rngs = {"dropout": jax.random.key(3)}
        masks = model.apply({"params": params}, out["stem"], 0.2, method=MDEQ._dropout_masks, rngs=rngs)
        xs = {"injection": out["stem"], "masks": masks}
        block = params["tied"]["block"]
        f = jax.jit(lambda p, z: model._f(p, xs, z))
        rel = jnp.linalg.norm(f(block, z) - z) / jnp.linalg.norm(z)
        assert float(rel) < 1e-9 and float(out["metrics"]["deq_fwd_nonconverged"]) == 0

        head = MDEQHead(10, arch["head_channels"], arch["final_channels"], arch["groups"], norm="group")
        shapes = [b.shape[1:] for b in out["branches"]]

        def head_loss(z):
            logits, _ = head.apply({"params": params["head"]}, unflatten_branches(z, shapes))
            return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

        g_z = jax.jit(jax.grad(head_loss))(z)[0]
        jac = jax.jacrev(lambda z: f(block, z))(z)[0, :, 0, :]
        u = jnp.linalg.solve((jnp.eye(z.shape[1]) - jac).T, g_z)
        want = jax.vjp(lambda p: f(p, z), block)[1](u[None])[0]
        for a, b in zip(jax.tree.leaves(grads["tied"]["block"]), jax.tree.leaves(want), strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-9 * float(jnp.abs(b).max()))
        assert float(jnp.abs(want["branch1"]["conv1"]["scale"]).sum()) > 0


def test_the_training_job_runs_both_phases(tmp_path):
    model = cs.model_config(
        "mdeq",
        **{**SMALL, "channels": (4, 4), "head_channels": (2, 2)},
        deq_pretrain_steps=2,
        f_solver="fixed_point",
        f_max_iter=3,
        b_solver="fixed_point",
        b_max_iter=3,
    )
    config = load_config("tiny", num_devices=1, tensorboard=False, model=model)
    result = train_and_evaluate(config, tmp_path)
    assert np.isfinite(result["train/loss"]) and result["train/model/deq_active"] == 1.0
    assert result["train/model/deq_fwd_nstep"] == 3


@pytest.mark.parametrize(
    "arg", ["size=tiny", "size=large", "size=tiny,variant=phantom", "size=large,variant=tied"]
)
def test_the_config_builds_the_reference_model(arg):
    config = load_config("cifar_mdeq", arg)
    cs.validate(config)
    model = cs.model_from_config(config.model, num_classes=10)
    assert isinstance(model, MDEQ) and model.size == arg.split(",")[0].split("=")[1]


def test_the_fig2_study_lists_mdeq_runs_under_their_own_scale(tmp_path):
    study = sweep.load_study(Path(__file__).parents[1] / "experiments" / "fig2_table1a_wt_vs_deq")
    cpu = study.runs("cpu_mdeq")
    assert {(r.tags["variant"], r.tags["seed"]) for r in cpu} == {
        (v, s) for v in ("mdeq", "tied") for s in (0, 1, 2)
    }
    assert not [r for r in study.runs("cpu") if r.tags["model"] == "mdeq"]  # the cpu table is unchanged
    paper = [r for r in study.runs("paper") if r.tags["model"] == "mdeq"]
    assert {r.tags["size"] for r in paper} == {"tiny", "large"} and len(paper) == 18
    for run in cpu[:2] + paper[:6]:
        config = sweep.load_config(run)
        cs.validate(config)
        assert config.model.name == "mdeq" and config.model.size == run.tags["size"]
    tiny = sweep.load_config(paper[0])
    assert (tiny.model.f_max_iter, tiny.model.b_max_iter, tiny.batch_size) == (22, 24, 64)

    # Aggregation of (made-up) results: per-seed accuracies and paired differences.
    def result(run, acc):
        summary = {"eval/accuracy": acc, "num_params": 158_986}
        return {
            "tags": run.tags,
            "summary": summary,
            "median_step_time_s": 2.0 if run.tags["variant"] == "mdeq" else 1.0,
        }

    accs = {
        ("mdeq", 0): 0.30,
        ("mdeq", 1): 0.32,
        ("mdeq", 2): 0.31,
        ("tied", 0): 0.33,
        ("tied", 1): 0.31,
        ("tied", 2): 0.35,
    }
    results = [result(r, accs[r.tags["variant"], r.tags["seed"]]) for r in cpu]
    study.aggregate(results, tmp_path, "cpu_mdeq")
    table = (tmp_path / "results_mdeq.md").read_text()
    assert "| 30.0 / 32.0 / 31.0 |" in table and "| 2.00x |" in table
    # weight-tied minus MDEQ per seed: +3, -1, +4 (mean +2); the t interval contains 0
    assert "| +3.00 / -1.00 / +4.00 | +2.00 |" in table and "| inconclusive |" in table
