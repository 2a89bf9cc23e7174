"""The tied block: scan equals the unrolled loop, masks are the documented ones, gradients sum.

Tiny models only: a Dense block (fast, exact checks) and a 8x8 ResNet-like model (convs).
"""

import re
import subprocess
import sys

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from wtjax import MaskSpec, Tied, apply_masks, masks_for
from wtjax.core.tied import CPU_UNROLL_MAX_DEPTH, default_unroll
from wtjax.models.resnet_like import ResNetLike

K = 4


class DenseBlock(nn.Module):
    """z -> tanh(W z + b + x): a block with input injection and one maskable kernel."""

    @nn.compact
    def __call__(self, z, x):
        return jnp.tanh(nn.Dense(z.shape[-1], name="dense")(z) + x)


class Net(nn.Module):
    mode: str = "multi"
    scan: bool = True
    kind: str = "unstructured"
    remat_policy: str | None = None
    shared: bool = True

    @nn.compact
    def __call__(self, x, depth=None, deterministic=True, return_intermediates=False):
        tied = Tied(
            DenseBlock(),
            depth=K,
            mask_mode=self.mode,
            mask=MaskSpec(kind=self.kind, density=0.5, seed=3),
            scan=self.scan,
            remat_policy=self.remat_policy,
            shared=self.shared,
            mask_scope="tied",  # the mask identity the definition below hashes
            name="tied",
        )
        run = tied.trajectory if return_intermediates else tied
        return run(jnp.zeros_like(x), x, depth=depth, deterministic=deterministic)


X = jax.random.normal(jax.random.PRNGKey(1), (3, 8))
PARAMS = Net().init(jax.random.PRNGKey(0), X)


def _close(a, b, tol=1e-5):
    chex.assert_trees_all_close(a, b, atol=tol, rtol=tol)


def manual_loop(params, x, mode, depth=K, seed=3, kind="unstructured"):
    """The definition: z_{i+1} = block(W * m_i)(z_i, x), with the masks from wtjax.core.masks."""
    spec = MaskSpec(kind=kind, density=0.5, seed=seed)
    block_params = params["params"]["tied"]["block"]
    z = jnp.zeros_like(x)
    for i in range(depth):
        index = 0 if mode == "same" else i
        p = block_params if mode == "dense" else apply_masks(block_params, spec, index, ("tied", "block"))
        z = DenseBlock().apply({"params": p}, z, x)
    return z


def test_params_live_under_tied_block_and_hold_no_masks():
    leaves = jax.tree_util.tree_leaves_with_path(PARAMS)
    paths = {tuple(k.key for k in path) for path, _ in leaves}
    assert paths == {
        ("params", "tied", "block", "dense", "kernel"),
        ("params", "tied", "block", "dense", "bias"),
    }
    assert all(leaf.dtype == jnp.float32 for _, leaf in leaves)


@pytest.mark.parametrize("mode", ["dense", "same", "multi"])
@pytest.mark.parametrize("kind", ["unstructured", "nm"])
def test_scan_equals_unrolled_and_the_definition(mode, kind):
    scan = Net(mode=mode, kind=kind).apply(PARAMS, X)
    unrolled = Net(mode=mode, kind=kind, scan=False).apply(PARAMS, X)
    _close(scan, unrolled)
    _close(scan, manual_loop(PARAMS, X, mode, kind=kind))

    def loss(p, scan):
        return jnp.sum(Net(mode=mode, kind=kind, scan=scan).apply(p, X) ** 2)

    _close(jax.grad(loss)(PARAMS, True), jax.grad(loss)(PARAMS, False))


def test_multi_masks_differ_per_reuse_and_same_masks_do_not():
    block_params = PARAMS["params"]["tied"]["block"]
    spec = MaskSpec(density=0.5, seed=3)
    per_reuse = [masks_for(block_params, spec, i, ("tied", "block"))[("dense", "kernel")] for i in range(K)]
    for i in range(K):
        for j in range(i):
            assert not jnp.array_equal(per_reuse[i], per_reuse[j])
    multi = Net(mode="multi").apply(PARAMS, X)
    same = Net(mode="same").apply(PARAMS, X)
    dense = Net(mode="dense").apply(PARAMS, X)
    assert not jnp.allclose(multi, same) and not jnp.allclose(same, dense)


def test_gradient_is_the_sum_of_masked_per_reuse_gradients():
    spec = MaskSpec(density=0.5, seed=3)
    block_params = PARAMS["params"]["tied"]["block"]
    w = block_params["dense"]["kernel"]
    ms = [masks_for(block_params, spec, i, ("tied", "block"))[("dense", "kernel")] for i in range(K)]

    def untied_loss(kernels):
        z = jnp.zeros_like(X)
        for kernel in kernels:
            p = {"dense": {"kernel": kernel, "bias": block_params["dense"]["bias"]}}
            z = DenseBlock().apply({"params": p}, z, X)
        return jnp.sum(z**2)

    per_reuse = jax.grad(untied_loss)([w * m for m in ms])
    expected = sum(m * g for m, g in zip(ms, per_reuse, strict=True))
    tied = jax.grad(lambda p: jnp.sum(Net(mode="multi").apply(p, X) ** 2))(PARAMS)
    _close(tied["params"]["tied"]["block"]["dense"]["kernel"], expected)


def test_parameter_count_is_independent_of_depth():
    def count(depth):
        model = ResNetLike(width=8, depth=depth, mask_mode="multi")
        v = jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, 8, 8, 3)))
        return sum(x.size for x in jax.tree_util.tree_leaves(v))

    assert count(2) == count(5) == count(9)


@pytest.mark.parametrize("unroll", [1, None])  # a while loop, and the default (unrolled on CPU)
def test_resnet_like_scan_equals_unrolled_with_masks(unroll):
    images = jax.random.normal(jax.random.PRNGKey(2), (2, 8, 8, 3))
    mask = MaskSpec(kind="nm", seed=1)
    model = ResNetLike(width=8, depth=3, mask_mode="multi", mask=mask, unroll=unroll)
    # Everything jitted: eager init/apply/grad dispatch the scan op by op, slower than compiling.
    params = jax.jit(model.init)(jax.random.PRNGKey(0), images)
    ref = ResNetLike(width=8, depth=3, mask_mode="multi", mask=mask, scan=False)

    def apply(m):
        return jax.jit(lambda p: m.apply(p, images)[0])(params)

    def grad(m):
        return jax.jit(jax.grad(lambda p: jnp.mean(m.apply(p, images)[0] ** 2)))(params)

    _close(apply(model), apply(ref), 1e-4)
    _close(grad(model), grad(ref), 1e-4)


def test_default_unroll_unrolls_shallow_ties_on_cpu_only():
    """The families' default: no while loop for a shallow tie on CPU; a scan on GPU/TPU and deep ties."""
    assert default_unroll(CPU_UNROLL_MAX_DEPTH, "cpu") is True
    assert default_unroll(CPU_UNROLL_MAX_DEPTH + 1, "cpu") == 1
    assert default_unroll(2, "tpu") == default_unroll(2, "cuda") == 1
    images = jnp.zeros((1, 8, 8, 3))

    def whiles(depth, unroll):  # mask generation has loops of its own: compare with a real scan
        model = ResNetLike(width=4, depth=depth, unroll=unroll)
        variables = jax.eval_shape(model.init, jax.random.PRNGKey(0), images)
        return jax.jit(model.apply).lower(variables, images).as_text().count("stablehlo.while")

    assert jax.default_backend() == "cpu"
    assert whiles(3, None) == whiles(3, 1) - 1
    deep = CPU_UNROLL_MAX_DEPTH + 1
    assert whiles(deep, None) == whiles(deep, 1)


def test_not_tied_scan_equals_unrolled_separate_blocks():
    scan_params = Net(mode="dense", shared=False).init(jax.random.PRNGKey(0), X)
    kernel = scan_params["params"]["tied"]["block"]["dense"]["kernel"]
    assert kernel.shape == (K, 8, 8)
    # The unrolled not-tied model holds the same K weights as K separate submodules.
    unrolled = {
        f"block_{i}": jax.tree_util.tree_map(lambda a, i=i: a[i], scan_params["params"]["tied"]["block"])
        for i in range(K)
    }
    out_scan = Net(mode="dense", shared=False).apply(scan_params, X)
    out_unrolled = Net(mode="dense", shared=False, scan=False).apply({"params": {"tied": unrolled}}, X)
    _close(out_scan, out_unrolled)
    with pytest.raises(ValueError, match="not-tied"):
        Net(mode="dense", shared=False).apply(scan_params, X, depth=K + 1)


def test_evaluation_at_another_depth_follows_the_seed():
    for depth in (2, K + 3):
        _close(Net(mode="multi").apply(PARAMS, X, depth=depth), manual_loop(PARAMS, X, "multi", depth=depth))


def test_intermediates_are_returned_without_changing_the_output():
    out, zs = Net().apply(PARAMS, X, return_intermediates=True)
    assert zs.shape == (K,) + X.shape
    _close(zs[-1], out)
    _close(out, Net().apply(PARAMS, X))
    _, zs_unrolled = Net(scan=False).apply(PARAMS, X, return_intermediates=True)
    _close(zs, zs_unrolled)


def test_dropout_mode_is_stochastic_in_training_and_dense_in_evaluation():
    _close(Net(mode="dropout").apply(PARAMS, X), Net(mode="dense").apply(PARAMS, X))

    def run(seed):
        return Net(mode="dropout").apply(
            PARAMS, X, deterministic=False, rngs={"dropout": jax.random.PRNGKey(seed)}
        )

    a, b = run(0), run(1)
    assert not jnp.allclose(a, b)
    _close(a, run(0))


def test_remat_gives_the_same_gradients():
    def loss(p, policy):
        return jnp.sum(Net(remat_policy=policy).apply(p, X) ** 2)

    _close(jax.grad(loss)(PARAMS, "nothing_saveable"), jax.grad(loss)(PARAMS, None))
    with pytest.raises(ValueError, match="unknown remat policy"):
        Net(remat_policy="save_everything_please").apply(PARAMS, X)


def test_bad_configuration_fails_loudly():
    with pytest.raises(ValueError, match="unknown mask_mode"):
        Tied(DenseBlock(), depth=2, mask_mode="multiple")
    with pytest.raises(ValueError, match="depth"):
        Tied(DenseBlock(), depth=0)


@pytest.mark.parametrize("depth", [0, -1, 2.0, True, "3"])
def test_depth_must_be_an_int_of_at_least_one_at_construction(depth):
    with pytest.raises(ValueError, match=rf"Tied depth={depth!r} at construction: .* static int depth >= 1"):
        Tied(DenseBlock(), depth=depth)


@pytest.mark.parametrize("scan", [True, False])
@pytest.mark.parametrize("depth", [0, -1, 1.5])
def test_depth_must_be_an_int_of_at_least_one_at_call_time(scan, depth):
    with pytest.raises(ValueError, match=rf"Tied depth={depth!r} at call time"):
        Net(scan=scan).apply(PARAMS, X, depth=depth)  # depth=0 used to return the input itself


def test_a_traced_depth_is_a_clear_error():
    with pytest.raises(ValueError, match=r"at call time: a tie needs a static int depth"):
        jax.jit(lambda p, d: Net().apply(p, X, depth=d))(PARAMS, 2)


class BatchNormBlock(nn.Module):
    @nn.compact
    def __call__(self, z, x):
        return nn.BatchNorm(use_running_average=False)(nn.Dense(z.shape[-1])(z)) + x


class ReshapingBlock(nn.Module):
    """Returns a carry of another width or dtype."""

    change: str

    @nn.compact
    def __call__(self, z, x):
        if self.change == "shape":
            return nn.Dense(z.shape[-1] + 1)(z)
        return nn.Dense(z.shape[-1])(z).astype(jnp.bfloat16)


def _error(block, scan, **fields):
    tie = Tied(block, depth=2, scan=scan, **fields)
    with pytest.raises(ValueError) as info:
        tie.init(jax.random.PRNGKey(0), X, X)
    message = str(info.value)
    assert "\n" not in message and info.value.__cause__ is None, message
    return message


@pytest.mark.parametrize("scan", [True, False])
@pytest.mark.parametrize("weight_map", [None, (0, 1)])
def test_a_batchnorm_block_is_a_clear_error_naming_the_alternative(scan, weight_map):
    message = _error(BatchNormBlock(), scan, weight_map=weight_map)
    assert "BatchNormBlock" in message and "'batch_stats' (BatchNorm)" in message
    assert "GroupNorm or LayerNorm" in message


@pytest.mark.parametrize("scan", [True, False])
@pytest.mark.parametrize("change, output", [("shape", r"float32\[3, 9\]"), ("dtype", r"bfloat16\[3, 8\]")])
def test_a_block_changing_the_carry_is_a_clear_error(scan, change, output):
    message = _error(ReshapingBlock(change), scan)
    assert re.search(rf"ReshapingBlock of Tied .*input float32\[3, 8\] -> output {output}$", message), message


def test_one_compile_per_input_shape():
    @jax.jit
    @chex.assert_max_traces(n=2)
    def forward(p, x):
        return Net().apply(p, x)

    forward(PARAMS, X)
    forward(PARAMS, X + 1.0)
    forward(PARAMS, jnp.ones((5, 8)))  # a new shape: the second and last trace
    forward(PARAMS, jnp.zeros((5, 8)))


def _output_digest():
    return np.asarray(Net(mode="multi").apply(PARAMS, X)).round(5).tolist()


def test_outputs_are_identical_in_a_separate_process():
    code = (
        "import sys; sys.path.insert(0, 'tests');"
        "from test_tied import _output_digest; print(_output_digest())"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == str(_output_digest())


def test_importing_the_block_pulls_in_no_heavy_dependencies():
    code = (
        "import sys, wtjax, wtjax.core.tied, wtjax.core.masks;"
        "heavy = [m for m in sys.modules if m.split('.')[0] in "
        "('tensorflow', 'tensorflow_datasets', 'orbax', 'ml_collections')];"
        "print(heavy)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_stored_masks_one_or_one_per_reuse():
    kernel = PARAMS["params"]["tied"]["block"]["dense"]["kernel"]
    per_reuse = jax.random.bernoulli(jax.random.PRNGKey(5), 0.5, (K,) + kernel.shape)
    variables = {**PARAMS, "masks": {"tied": {"block": {"dense": {"kernel": per_reuse}}}}}
    z = jnp.zeros_like(X)
    bias = PARAMS["params"]["tied"]["block"]["dense"]["bias"]
    for i in range(K):
        z = DenseBlock().apply({"params": {"dense": {"kernel": kernel * per_reuse[i], "bias": bias}}}, z, X)
    _close(Net(mode="stored").apply(variables, X), z)
    _close(Net(mode="stored", scan=False).apply(variables, X), z)
    # One stored mask of the kernel's shape is used at every reuse.
    one = {**PARAMS, "masks": {"tied": {"block": {"dense": {"kernel": per_reuse[0]}}}}}
    one_stacked = {
        **PARAMS,
        "masks": {"tied": {"block": {"dense": {"kernel": jnp.stack([per_reuse[0]] * K)}}}},
    }
    _close(Net(mode="stored").apply(one, X), Net(mode="stored").apply(one_stacked, X))
    with pytest.raises(ValueError, match="needs the masks"):
        Net(mode="stored").apply(PARAMS, X)


class CheckpointedNet(nn.Module):
    """The Dense tie at ``depth`` reuses with a depth-memory mode."""

    depth: int = K
    checkpoint_every: int | str | None = None

    @nn.compact
    def __call__(self, x, return_intermediates=False):
        tied = Tied(
            DenseBlock(),
            depth=self.depth,
            mask_mode="multi",
            mask=MaskSpec(density=0.5, seed=3),
            checkpoint_every=self.checkpoint_every,
            mask_scope="tied",
            name="tied",
        )
        return (tied.trajectory if return_intermediates else tied)(jnp.zeros_like(x), x)


@pytest.mark.parametrize("depth", [4, 7])
@pytest.mark.parametrize("every", [1, 2, 3, "sqrt"])
def test_checkpointed_segments_equal_the_plain_scan(depth, every):
    """Segments of ``every`` reuses (and a shorter last one) give the plain scan's outputs,
    intermediates and gradients: only what is stored for the backward pass changes."""
    plain, segmented = CheckpointedNet(depth), CheckpointedNet(depth, every)
    chex.assert_trees_all_equal(segmented.init(jax.random.PRNGKey(0), X), PARAMS)

    # Jitted (both models alike): eager dispatch of the scans op by op is slower than compiling.
    def trajectory(model):
        return jax.jit(lambda p: model.apply(p, X, True))(PARAMS)

    def grad(model):
        return jax.jit(jax.grad(lambda p: jnp.sum(model.apply(p, X) ** 2)))(PARAMS)

    _close(trajectory(segmented), trajectory(plain))
    _close(grad(segmented), grad(plain))


def test_checkpointing_needs_a_valid_segment_and_a_tied_scan():
    for bad in (0, -2, 1.5, "log", True):
        with pytest.raises(ValueError, match="checkpoint_every"):
            Tied(DenseBlock(), depth=4, checkpoint_every=bad)
    with pytest.raises(ValueError, match="scan=True and shared=True"):
        Tied(DenseBlock(), depth=4, checkpoint_every=2, shared=False)
    with pytest.raises(ValueError, match="scan=True and shared=True"):
        Tied(DenseBlock(), depth=4, checkpoint_every=2, scan=False)


def test_call_returns_the_state_and_trajectory_the_states_as_top_level_module():
    """``Tied(...)(z)`` is always the final state; ``trajectory`` is always ``(z_K, zs)``."""
    tie = Tied(DenseBlock(), depth=K, mask_mode="multi", mask=MaskSpec(density=0.5, seed=3))
    z0 = jnp.zeros_like(X)
    variables = tie.init(jax.random.PRNGKey(0), z0, X)
    z = tie.apply(variables, z0, X)
    z_k, zs = tie.apply(variables, z0, X, method="trajectory")
    assert isinstance(z, jax.Array) and zs.shape == (K,) + X.shape
    _close(z, z_k)
    _close(zs[-1], z)
    # The states are the successive reuses: reuse i maps zs[i - 1] to zs[i].
    _close(tie.apply(variables, z0, X, depth=2), zs[1])


def test_mask_view_rejects_unknown_modes_and_leaves_dense_params_untouched():
    from wtjax.core.views import MaskView

    with pytest.raises(ValueError, match="unknown mask_mode"):
        MaskView("sparse")
    with pytest.raises(ValueError, match="unknown mask_mode"):
        Tied(DenseBlock(), depth=K, mask_mode="sparse")
    params = PARAMS["params"]["tied"]["block"]
    assert MaskView("dense")(params, None, 0, None, ("tied", "block")) is params
    masked = MaskView("multi", MaskSpec(density=0.5, seed=3))(params, None, 1, None, ("tied", "block"))
    _close(masked, apply_masks(params, MaskSpec(density=0.5, seed=3), 1, ("tied", "block")))
    # dropout without a key (evaluation) is dense
    assert MaskView("dropout", MaskSpec(density=0.5))(params, None, 0, None, ("tied", "block")) is params
