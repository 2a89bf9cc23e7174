"""The im2col convolution equals XLA's convolution in value and gradient, in and out of loops."""

import collections
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax
from jax.test_util import check_grads

from wtjax.core.conv import Conv, conv2d, conv_im2col, resolve_impl, same_padding
from wtjax.core.masks import MaskSpec
from wtjax.models.resnet_like import ResNetLike

F32 = dict(rtol=1e-5, atol=1e-5)


def assert_close(a, b, rtol=2e-5):
    """float32 comparison whose absolute slack scales with the largest entry (sums of many terms)."""
    b = np.asarray(b)
    np.testing.assert_allclose(a, b, rtol=rtol, atol=rtol * max(1.0, float(np.abs(b).max())))


def _data(shape_hw, kernel, cin=3, cout=5, batch=2, dtype=jnp.float32):
    kx, kw = jax.random.split(jax.random.PRNGKey(sum(shape_hw) + kernel[0]))
    x = jax.random.normal(kx, (batch, *shape_hw, cin), dtype)
    w = jax.random.normal(kw, (*kernel, cin, cout), dtype)
    return x, w


# Strides 1 and 2, even and odd sizes, 3x3 and 1x1 (ResNet shortcut) kernels, with and without bias.
CASES = [
    ((1, 1), (8, 8), (3, 3), False),
    ((1, 1), (7, 9), (3, 3), True),
    ((2, 2), (8, 8), (3, 3), True),
    ((2, 2), (7, 9), (3, 3), False),
    ((2, 2), (8, 8), (1, 1), False),
    ((2, 2), (7, 9), (1, 1), True),
    ((1, 1), (7, 9), (1, 1), False),
]


@pytest.mark.parametrize("strides,hw,kernel,use_bias", CASES)
def test_module_im2col_matches_xla_and_nn_conv(strides, hw, kernel, use_bias):
    """Same params as nn.Conv (names, init); forward and input/kernel/bias gradients agree."""
    x, _ = _data(hw, kernel)
    key = jax.random.PRNGKey(1)
    ref = nn.Conv(5, kernel, strides, padding="SAME", use_bias=use_bias)
    mods = {impl: Conv(5, kernel, strides, use_bias, impl=impl) for impl in ("xla", "im2col")}
    params = mods["xla"].init(key, x)
    ref_params = ref.init(key, x)
    assert jax.tree.structure(params) == jax.tree.structure(ref_params)
    jax.tree.map(np.testing.assert_array_equal, params, ref_params)
    if use_bias:  # a non-zero bias, so its gradient and value matter
        params = jax.tree.map(lambda v: v + 0.1 if v.ndim == 1 else v, params)

    def loss(mod):
        return lambda p, x: jnp.sum(jnp.sin(mod.apply(p, x)) * jnp.arange(5.0))

    def grad(mod):
        return jax.jit(jax.grad(loss(mod), argnums=(0, 1)))

    y_ref = ref.apply(params, x)
    out_hw = tuple(-(-n // s) for n, s in zip(hw, strides, strict=True))
    assert y_ref.shape == (2, *out_hw, 5)
    grads = {}
    for impl, mod in mods.items():
        np.testing.assert_allclose(mod.apply(params, x), y_ref, **F32)
        grads[impl] = grad(mod)(params, x)
    ref_grads = grad(ref)(params, x)
    for impl in mods:
        jax.tree.map(assert_close, grads[impl], ref_grads)
    # The input gradient is not trivially zero anywhere it should not be.
    assert float(jnp.abs(grads["im2col"][1]).sum()) > 0


@pytest.mark.parametrize("strides,hw", [((1, 1), (6, 6)), ((2, 2), (5, 7))])
def test_float64_gradients_exact_and_match_finite_differences(strides, hw):
    with jax.enable_x64(True):  # (jax.experimental.enable_x64 was removed in JAX 0.10)
        x, w = _data(hw, (3, 3), dtype=jnp.float64)
        assert x.dtype == jnp.float64
        pads = same_padding(hw, (3, 3), strides)
        f_im2col = jax.jit(lambda x, w: jnp.sum(jnp.tanh(conv_im2col(x, w, strides, pads)) ** 2))
        f_xla = lambda x, w: jnp.sum(jnp.tanh(conv2d(x, w, strides, impl="xla")) ** 2)
        g1 = jax.jit(jax.grad(f_im2col, (0, 1)))(x, w)
        g2 = jax.jit(jax.grad(f_xla, (0, 1)))(x, w)
        for a, b in zip(g1, g2, strict=True):
            assert a.dtype == jnp.float64
            np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-12)
        # Reverse mode (and, once, reverse-over-reverse) against finite differences.
        order = 2 if strides == (2, 2) and hw == (5, 7) else 1
        check_grads(f_im2col, (x, w), order=order, modes=["rev"], atol=1e-5, rtol=1e-5)


def test_inside_scan_equals_unrolled():
    """A tied conv reused in lax.scan (im2col) equals the unrolled XLA reference, values and grads."""
    x, _ = _data((8, 8), (3, 3), cin=4, cout=4)
    w = jax.random.normal(jax.random.PRNGKey(7), (3, 3, 4, 4)) * 0.2
    w2 = jax.random.normal(jax.random.PRNGKey(8), (3, 3, 4, 4)) * 0.2

    def block(z, ws, impl):
        h = jnp.tanh(conv2d(z, ws[0], impl=impl))
        return jnp.tanh(conv2d(h, ws[1], impl=impl) + x)

    def scanned(ws, z0):
        z, _ = lax.scan(lambda z, _: (block(z, ws, "im2col"), None), z0, None, length=3)
        return jnp.sum(z**2)

    def unrolled(ws, z0):
        z = z0
        for _ in range(3):
            z = block(z, ws, "xla")
        return jnp.sum(z**2)

    z0 = jnp.ones_like(x) * 0.1
    v1, g1 = jax.jit(jax.value_and_grad(scanned, argnums=(0, 1)))((w, w2), z0)
    v2, g2 = jax.jit(jax.value_and_grad(unrolled, argnums=(0, 1)))((w, w2), z0)
    np.testing.assert_allclose(v1, v2, **F32)
    jax.tree.map(assert_close, g1, g2)


def test_forward_over_reverse_works_and_pure_forward_mode_fails_loudly():
    """Hessian-vector products (jvp of grad, as GraSP uses) agree; jvp of the conv itself raises."""
    x, w = _data((6, 6), (3, 3))
    loss = lambda impl: lambda w: jnp.sum(jnp.tanh(conv2d(x, w, (2, 2), impl)) ** 2)
    tangent = jax.random.normal(jax.random.PRNGKey(3), w.shape)
    hvp = {impl: jax.jvp(jax.grad(loss(impl)), (w,), (tangent,))[1] for impl in ("xla", "im2col")}
    assert_close(hvp["im2col"], hvp["xla"])
    with pytest.raises(TypeError, match="forward-mode"):
        jax.jvp(loss("im2col"), (w,), (tangent,))


def test_leading_batch_dims_and_vmap():
    x, w = _data((6, 6), (3, 3), batch=6)
    flat = conv2d(x, w, impl="im2col")
    stacked = conv2d(x.reshape(2, 3, 6, 6, 3), w, impl="im2col")
    np.testing.assert_allclose(stacked.reshape(flat.shape), flat, **F32)
    per_kernel = jax.vmap(lambda w: conv2d(x, w, impl="im2col"))(jnp.stack([w, 2 * w]))
    np.testing.assert_allclose(per_kernel[1], 2 * flat, **F32)
    g = jax.grad(lambda ws: jnp.sum(jax.vmap(lambda w: conv2d(x, w, impl="im2col"))(ws) ** 2))(
        jnp.stack([w, w])
    )
    g_ref = jax.grad(lambda w: jnp.sum(conv2d(x, w, impl="xla") ** 2))(w)
    np.testing.assert_allclose(g[0], g_ref, rtol=1e-4, atol=1e-4)


def test_auto_choice_by_backend():
    assert resolve_impl("auto", "cpu") == "im2col"
    for backend in ("gpu", "tpu", "cuda", "rocm"):
        assert resolve_impl("auto", backend) == "xla"
    for impl in ("xla", "im2col"):
        assert resolve_impl(impl, "cpu") == resolve_impl(impl, "tpu") == impl
    with pytest.raises(ValueError, match="unknown conv impl"):
        resolve_impl("fft")
    assert jax.default_backend() == "cpu" and resolve_impl("auto") == "im2col"


def _compiled_op_counts(impl: str) -> collections.Counter:
    """Opcode histogram of the CPU program of a kernel gradient through a 3-step scan."""
    x, w = _data((8, 8), (3, 3))

    def loss(w):
        z, _ = jax.lax.scan(
            lambda z, _: (jnp.tanh(conv2d(z, w, impl=impl)), None), x[..., :3], None, length=3
        )
        return jnp.sum(z)

    hlo = jax.jit(jax.grad(loss)).lower(w[:, :, :3, :3]).compile().as_text()
    return collections.Counter(re.findall(r"= \S+ (\w[\w-]*)\(", hlo))


def test_auto_is_chosen_by_the_lowering_platform():
    """'auto' stages both implementations; lowering for CPU keeps im2col (TPU/GPU: tests/test_aot.py)."""
    x, w = _data((4, 4), (3, 3))
    jaxpr = str(jax.make_jaxpr(lambda x, w: conv2d(x, w, impl="auto"))(x, w))
    assert "platform_index" in jaxpr and "custom_vjp_call" in jaxpr
    assert "custom_vjp_call" not in str(jax.make_jaxpr(lambda x, w: conv2d(x, w, impl="xla"))(x, w))
    auto, im2col, xla = (_compiled_op_counts(impl) for impl in ("auto", "im2col", "xla"))
    assert auto == im2col != xla


def test_bad_inputs_fail_loudly():
    x, w = _data((4, 4), (3, 3))
    with pytest.raises(ValueError, match="ndim >= 4"):
        conv2d(x[0], w)
    with pytest.raises(ValueError, match="HWIO"):
        conv2d(x, w[:, :, :2])
    with pytest.raises(ValueError, match="unknown conv impl"):
        Conv(4, impl="nope").init(jax.random.PRNGKey(0), x)


def test_resnet_like_paths_and_gradients_match_across_impls():
    """The model sees kernels at ``<conv>/kernel``; its scanned im2col gradient equals unrolled XLA's."""
    images = jax.random.normal(jax.random.PRNGKey(0), (2, 8, 8, 3))
    labels = jnp.array([1, 3])
    fields = dict(num_classes=4, width=8, depth=2, mask_mode="multi", mask=MaskSpec(density=0.5))
    fast = ResNetLike(scan=True, conv_impl="im2col", **fields)
    ref = ResNetLike(scan=False, conv_impl="xla", **fields)
    params = fast.init(jax.random.PRNGKey(1), images)["params"]
    assert params["stem_conv"]["kernel"].shape == (3, 3, 3, 8)
    assert params["tied"]["block"]["conv1"]["kernel"].shape == (3, 3, 8, 8)

    def loss(model):
        def f(p):
            logits, _ = model.apply({"params": p}, images, train=True)
            return -jnp.mean(jax.nn.log_softmax(logits)[jnp.arange(2), labels])

        return jax.jit(jax.value_and_grad(f))

    (v1, g1), (v2, g2) = loss(fast)(params), loss(ref)(params)
    np.testing.assert_allclose(v1, v2, **F32)
    jax.tree.map(assert_close, g1, g2)
