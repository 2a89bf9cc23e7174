"""Mixed precision (wtjax.core.precision): bf16 compute, float32 parameters, logits, losses and solvers."""

from __future__ import annotations

import importlib

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import traverse_util
from train_utils import load_config

from wtjax.core import precision
from wtjax.core.masks import MaskSpec
from wtjax.core.tied import Tied
from wtjax.job import config as cs
from wtjax.job import metrics
from wtjax.job.train import train_and_evaluate
from wtjax.models import MODELS, build_model
from wtjax.models.mlp import MLPBlock

# The module, not the function of the same name that wtjax.implicit exports.
fixed_point_module = importlib.import_module("wtjax.implicit.fixed_point")
BF16 = jnp.dtype(jnp.bfloat16)
F32 = jnp.dtype(jnp.float32)
MATMULS = ("dot_general", "conv_general_dilated")
KEY = jax.random.PRNGKey(2)
_DEQ = dict(depth=2, f_max_iter=4, b_max_iter=4)

# (fields, image shape) of a tiny model per family. Sizes are chosen so no solver buffer has the
# shape of a weight (the DEQ check below tells weight matmuls from solver maths by shape).
FAMILIES = {
    "resnet_like": (dict(width=8, depth=2, groups=2), (8, 8, 3)),
    "mlp": (dict(width=8, depth=2), (4, 4, 3)),
    "resnet20": (dict(width=4, form="tied", mask_mode="multi"), (8, 8, 3)),
    "vit": (dict(patch_size=4, width=16, depth=2, mlp_dim=32, num_heads=2), (8, 8, 3)),
    "deq_resnet_like": (dict(width=8, groups=2, **_DEQ), (8, 8, 3)),
    "deq_mlp": (dict(width=8, **_DEQ), (4, 4, 3)),
    "mondeq_fc": (dict(width=6, max_iter=4), (4, 4, 3)),
    "mondeq_conv": (dict(channels=4, pool=2, max_iter=4), (4, 4, 3)),
    "cct": (dict(embed_dim=16, depth=2, num_heads=2, conv_hidden=8), (8, 8, 3)),
    "convmixer": (dict(width=8, depth=2, patch_size=2, kernel_size=3, share_rate=1), (8, 8, 3)),
    "vit_shared": (dict(patch_size=4, width=16, depth=2, mlp_dim=32, num_heads=2), (8, 8, 3)),
    "deq_cct": (dict(embed_dim=16, num_heads=2, conv_hidden=8, **_DEQ), (8, 8, 3)),
    "mdeq": (
        dict(size=None, channels=(4, 4), head_channels=(2, 2), final_channels=8, groups=2, **_DEQ),
        (8, 8, 3),
    ),
}
# Weights whose matmuls are solver maths and stay float32: monDEQ builds W from A and B.
SOLVER_WEIGHTS = {"mondeq_fc": ("A", "B"), "mondeq_conv": ("A", "B")}


def test_every_registered_family_is_covered():
    assert set(FAMILIES) == set(MODELS)


def _matmuls(jaxpr):
    """``(primitive, operand avals)`` of every dot_general/conv in ``jaxpr`` and its sub-jaxprs."""
    found = []
    for eqn in jaxpr.eqns:
        if eqn.primitive.name in MATMULS:
            found.append((eqn.primitive.name, tuple(v.aval for v in eqn.invars)))
        for param in eqn.params.values():
            for sub in param if isinstance(param, (list, tuple)) else (param,):
                inner = getattr(sub, "jaxpr", sub)  # ClosedJaxpr -> Jaxpr
                if hasattr(inner, "eqns"):
                    found.extend(_matmuls(inner))
    return found


def _tiny(name, dtype):
    fields, shape = FAMILIES[name]
    model = build_model(name, num_classes=5, dtype=dtype, **fields)
    images = jax.random.normal(jax.random.PRNGKey(1), (2, *shape))
    return model, images


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_bfloat16_matmuls_with_float32_params_and_logits(name):
    model, images = _tiny(name, "bfloat16")
    variables = jax.eval_shape(model.init, jax.random.PRNGKey(0), images)
    assert {leaf.dtype for leaf in jax.tree.leaves(variables)} == {F32}  # master weights
    closed = jax.make_jaxpr(lambda v, x: model.apply(v, x, train=False))(variables, images)
    logits = closed.out_avals[0]
    assert logits.dtype == F32 and logits.shape == (2, 5)

    found = _matmuls(closed.jaxpr)
    assert any(all(a.dtype == BF16 for a in avals) for _, avals in found), name
    flat = traverse_util.flatten_dict(variables["params"])
    exempt = SOLVER_WEIGHTS.get(name, ())
    weight_shapes = {v.shape for p, v in flat.items() if v.ndim >= 2 and not set(p) & set(exempt)}
    for prim, avals in found:
        if name.startswith(("deq", "mondeq", "mdeq")):
            # Solver maths (Anderson/Broyden, monDEQ splitting) is float32 by design; every matmul
            # or convolution that takes a weight runs in bfloat16.
            if any(a.shape in weight_shapes for a in avals):
                assert all(a.dtype == BF16 for a in avals), (prim, avals)
        else:
            assert all(a.dtype == BF16 for a in avals), (prim, avals)


def test_float32_is_the_default_and_runs_in_float32():
    model, images = _tiny("resnet_like", "float32")
    assert build_model("resnet_like").dtype == "float32"
    variables = jax.eval_shape(model.init, jax.random.PRNGKey(0), images)
    closed = jax.make_jaxpr(lambda v, x: model.apply(v, x))(variables, images)
    assert all(a.dtype == F32 for _, avals in _matmuls(closed.jaxpr) for a in avals)


def test_dtype_is_a_config_field_of_every_family_and_is_validated():
    assert {name: cs.model_config(name).dtype for name in MODELS} == dict.fromkeys(MODELS, "float32")
    config = load_config("tiny", None, **{"model.dtype": "bfloat16"})  # --config.model.dtype=bfloat16
    cs.validate(config)
    assert cs.model_from_config(config.model, 4).dtype == "bfloat16"
    config.model.dtype = "float16"
    with pytest.raises(ValueError, match="float16 would need loss scaling"):
        cs.validate(config)


@pytest.mark.parametrize("bad", ["float16", "bf16", "int8", None])
def test_an_invalid_dtype_is_a_clear_error(bad):
    with pytest.raises(ValueError, match="unknown compute dtype.*'bfloat16', 'float32'"):
        build_model("mlp", dtype=bad)
    with pytest.raises(ValueError, match="unknown compute dtype"):
        precision.compute_dtype(bad)
    if bad is not None:  # None is the Tied default: no cast
        with pytest.raises(ValueError, match="unknown compute dtype"):
            Tied(MLPBlock(4), depth=2, dtype=bad)


SEEN_KERNELS = []


class KernelProbe(nn.Module):
    """``z -> tanh(z @ kernel + x)``, recording the dtype in which it sees its kernel."""

    @nn.compact
    def __call__(self, z, x):
        kernel = self.param("kernel", nn.initializers.lecun_normal(), (z.shape[-1], z.shape[-1]))
        SEEN_KERNELS.append(kernel.dtype)
        return jnp.tanh(z @ kernel.astype(z.dtype) + x)


@pytest.mark.parametrize("mode", ["multi", "dropout", "stored"])
def test_tied_masks_bfloat16_kernels_and_the_gradient_reaches_the_float32_weight(mode):
    x = jax.random.normal(jax.random.PRNGKey(0), (2, 8), jnp.bfloat16)
    tied = Tied(KernelProbe(), depth=2, mask_mode=mode, mask=MaskSpec(density=0.5), dtype="bfloat16")
    params = tied.clone(mask_mode="dense").init(jax.random.PRNGKey(1), x, x)["params"]
    assert params["block"]["kernel"].dtype == F32
    variables = {"params": params}
    if mode == "stored":  # one 0/1 mask per reuse
        keep = jax.random.bernoulli(jax.random.PRNGKey(3), 0.5, (2, 8, 8)).astype(F32)
        variables["masks"] = {"block": {"kernel": keep}}

    def loss(p):
        z = tied.apply({**variables, "params": p}, x, x, deterministic=False, rngs={"dropout": KEY})
        return jnp.sum(precision.upcast(z) ** 2)

    SEEN_KERNELS.clear()
    kernel = jax.grad(loss)(params)["block"]["kernel"]
    assert SEEN_KERNELS and set(SEEN_KERNELS) == {BF16}  # the mask was applied in bfloat16
    assert kernel.dtype == F32 and bool(jnp.all(jnp.isfinite(kernel))) and float(jnp.abs(kernel).sum()) > 0
    # Without a dtype the view keeps the parameters' dtype (the float32 behaviour).
    SEEN_KERNELS.clear()
    tied.clone(dtype=None).apply(variables, x, x, deterministic=False, rngs={"dropout": KEY})
    assert set(SEEN_KERNELS) == {F32}


def _train_curve(config, workdir):
    """Train in-process; ``({step: train/loss}, final summary)``."""
    summary = train_and_evaluate(config, workdir)
    records = metrics.read_jsonl(workdir / "metrics.jsonl")
    return {s: r[metrics.TRAIN_LOSS] for s, r in records.items() if metrics.TRAIN_LOSS in r}, summary


# (config, its argument, overrides): the tiny config a little longer, and the digits quickstart
# cut to 20 of its 250 steps. Each pair of runs takes 5-30 s on 2 CPU cores.
RUNS = {
    "tiny": ("tiny", "steps=12", {"log_every_steps": 3}),
    "digits_quickstart": (
        "digits_quickstart",
        None,
        {"num_epochs": None, "num_train_steps": 20, "log_every_steps": 5, "eval_every_steps": 0},
    ),
}


@pytest.mark.parametrize("run", sorted(RUNS))
def test_bfloat16_training_follows_the_float32_loss_curve(run, tmp_path):
    name, arg, overrides = RUNS[run]
    common = dict(
        num_devices=1, tensorboard=False, progress=False, accounting=False, checkpoint_every_steps=1000
    )
    curves, summaries = {}, {}
    for dtype in ("float32", "bfloat16"):
        config = load_config(name, arg, **common, **overrides, **{"model.dtype": dtype})
        curves[dtype], summaries[dtype] = _train_curve(config, tmp_path / dtype)
    assert list(curves["float32"]) == list(curves["bfloat16"]) and len(curves["float32"]) >= 4
    f32, bf16 = (np.array(list(curves[d].values())) for d in ("float32", "bfloat16"))
    assert f32[-1] < f32[0]  # the float32 run learns, so the comparison means something
    # bfloat16 keeps 8 mantissa bits; the losses agree to well under 1% (measured: <= 0.012).
    np.testing.assert_allclose(bf16, f32, rtol=0.02, atol=0.01)
    np.testing.assert_allclose(
        summaries["bfloat16"][metrics.EVAL_LOSS],
        summaries["float32"][metrics.EVAL_LOSS],
        rtol=0.02,
        atol=0.01,
    )


def test_deq_in_bfloat16_solves_in_float32_and_its_implicit_gradient_matches(monkeypatch):
    # A contraction solved to its floor by plain iteration (cheap to compile), forward and adjoint.
    solved = []
    solve = fixed_point_module.solve

    def recording_solve(f, z0, cfg, **kwargs):
        z, stats = solve(f, z0, cfg, **kwargs)
        solved.append({"z0": z0.dtype, "z": z.dtype, **{k: v.dtype for k, v in stats._asdict().items()}})
        return z, stats

    monkeypatch.setattr(fixed_point_module, "solve", recording_solve)
    solver = dict(f_solver="fixed_point", b_solver="fixed_point", f_max_iter=100, b_max_iter=100)
    model = build_model("deq_mlp", num_classes=5, width=8, depth=2, f_tol=1e-5, b_tol=1e-6, **solver)
    images = jax.random.normal(jax.random.PRNGKey(1), (4, 4, 4, 3))
    labels = jnp.arange(4)
    params = model.init(jax.random.PRNGKey(0), images)["params"]

    def grad(model):
        def loss(p):
            logits, out = model.apply({"params": p}, images)
            return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean(), out["metrics"]

        return jax.jit(jax.grad(loss, has_aux=True))(params)

    g32, _ = grad(model)
    solved.clear()
    g16, m16 = grad(model.clone(dtype="bfloat16"))
    assert len(solved) >= 2  # the forward solve and the adjoint (IFT) solve
    for record in solved:  # state, iterate, residuals and traces
        assert {v for k, v in record.items() if k not in ("nstep", "converged", "diverged")} == {F32}, record
    assert m16["deq_fwd_abs_res"].dtype == F32 and float(m16["deq_fwd_abs_res"]) < 1e-2
    leaves16, leaves32 = jax.tree.leaves(g16), jax.tree.leaves(g32)
    assert all(g.dtype == F32 and bool(jnp.all(jnp.isfinite(g))) for g in leaves16)
    flat16, flat32 = (jnp.concatenate([jnp.ravel(g) for g in leaves]) for leaves in (leaves16, leaves32))
    # bfloat16 evaluations of f leave a residual floor near 1e-3; the gradient moves by ~1%.
    assert float(jnp.linalg.norm(flat16 - flat32) / jnp.linalg.norm(flat32)) < 0.05
