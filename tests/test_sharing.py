"""SPIN sharing: topologies drawn by hand from the paper, and the Tied weight-map machinery.

Tiny Dense blocks only (fast, exact checks against a hand-written per-layer loop).
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from wtjax import MaskSpec, Tied, masks_for
from wtjax.core.spin import fold_fusion, sharing

# ---------------------------------------------------------------------------------------------
# Topologies (Figure 2 / Table 1 of the SPIN paper, written out by hand)
# ---------------------------------------------------------------------------------------------


def test_uniform_mappings_by_hand():
    assert sharing.layer_to_weight(8, 2, "sequential") == (0, 0, 1, 1, 2, 2, 3, 3)
    assert sharing.layer_to_weight(8, 2, "strided") == (0, 1, 2, 3, 0, 1, 2, 3)
    assert sharing.layer_to_weight(6, 3, "sequential") == (0, 0, 0, 1, 1, 1)
    assert sharing.layer_to_weight(6, 3, "strided") == (0, 1, 0, 1, 0, 1)
    assert sharing.layer_to_weight(5, 1, "sequential") == (0, 1, 2, 3, 4)
    assert sharing.layer_to_weight(4, 4, "strided") == (0, 0, 0, 0)


def test_random_mapping_uses_each_set_share_rate_times_and_follows_the_seed():
    m = sharing.layer_to_weight(12, 3, "random", seed=1)
    assert sorted(np.bincount(m)) == [3, 3, 3, 3]
    assert m[0] == 0 and sharing.canonical(m) == m
    assert m == sharing.layer_to_weight(12, 3, "random", seed=1)
    others = {sharing.layer_to_weight(12, 3, "random", seed=s) for s in range(2, 8)}
    assert len(others | {m}) > 1


def test_non_uniform_distributions_by_hand():
    # L=12, S=2, section rate 3: 9 layers share in 3 groups of 3, 3 layers stay independent.
    assert sharing.layer_to_weight(12, 2, "sequential", "front") == (0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 4, 5)
    assert sharing.layer_to_weight(12, 2, "sequential", "back") == (0, 1, 2, 3, 3, 3, 4, 4, 4, 5, 5, 5)
    assert sharing.layer_to_weight(12, 2, "sequential", "middle") == (0, 1, 1, 1, 2, 2, 2, 3, 3, 3, 4, 5)
    assert sharing.layer_to_weight(12, 2, "strided", "front") == (0, 1, 2, 0, 1, 2, 0, 1, 2, 3, 4, 5)
    # The paper's ConvMixer-768/32 at share rate 2: 24 layers shared by 8 sets, 8 independent.
    front = sharing.layer_to_weight(32, 2, "sequential", "front")
    assert front == tuple(i // 3 for i in range(24)) + tuple(range(8, 16))
    assert sharing.num_weights(front) == 16 and sharing.share_rate(front) == 2


def test_middle_pyramid_is_the_papers_table1_profile():
    m = sharing.layer_to_weight(32, 2, "pyramid", "middle")
    counts = [len(g) for g in sharing.groups(m)]
    # [4 x 1, 1 x 2, 2 x 3, 2 x 4, 2 x 3, 1 x 2, 4 x 1]
    assert counts == [1] * 4 + [2] + [3] * 2 + [4] * 2 + [3] * 2 + [2] + [1] * 4
    assert m == tuple(w for w, c in enumerate(counts) for _ in range(c))  # contiguous groups
    # Any pyramid: symmetric, rate 1 at the ends, never decreasing towards the centre.
    for n_layers, rate in [(16, 2), (24, 3), (12, 4)]:
        r = sharing.pyramid_rates(n_layers, n_layers // rate)
        assert r == r[::-1] and sum(r) == n_layers and r[0] == 1
        half = r[: (len(r) + 1) // 2]
        assert all(a <= b for a, b in zip(half, half[1:], strict=False))


def test_topology_errors_are_loud():
    with pytest.raises(ValueError, match="divisor"):
        sharing.layer_to_weight(10, 3)
    with pytest.raises(ValueError, match="middle"):
        sharing.layer_to_weight(8, 2, "pyramid", "uniform")
    with pytest.raises(ValueError, match="section"):
        sharing.layer_to_weight(8, 2, "sequential", "front", section_rate=4)
    with pytest.raises(ValueError, match="mapping"):
        sharing.layer_to_weight(8, 2, "cycle")
    with pytest.raises(ValueError, match="every weight index"):
        sharing.validate_map((0, 2, 2))


def test_affine_apply_matches_the_grouped_pointwise_formula():
    c, g = 6, 3
    w = jax.random.normal(jax.random.PRNGKey(0), (2, 5, c))
    scale = jax.random.normal(jax.random.PRNGKey(1), (c, g))
    bias = jax.random.normal(jax.random.PRNGKey(2), (c,))
    out = np.asarray(sharing.affine_apply(w, scale, bias))
    w = np.asarray(w)
    for o in range(c):
        ref = sum(scale[o, j] * w[..., g * (o // g) + j] for j in range(g)) + bias[o]
        np.testing.assert_allclose(out[..., o], ref, rtol=1e-5, atol=1e-5)
    ident = sharing.affine_init(c, g, depth=1)
    np.testing.assert_allclose(sharing.affine_apply(w, ident["scale"][0], ident["bias"][0]), w, atol=1e-6)


def test_fuse_matches_the_paper_formulas():
    wm = (0, 0, 1, 1, 1)
    v = jax.random.normal(jax.random.PRNGKey(0), (5, 3, 4))
    alpha = jax.random.normal(jax.random.PRNGKey(1), (5, 4))
    np.testing.assert_allclose(sharing.fuse(v, wm, "choose_first"), v[jnp.array([0, 2])])
    np.testing.assert_allclose(sharing.fuse(v, wm, "mean")[1], v[2:].mean(0), rtol=1e-6)
    np.testing.assert_allclose(
        sharing.fuse(v, wm, "channel", alpha)[0], (v[0] * alpha[0] + v[1] * alpha[1]) / 2, rtol=1e-5
    )
    a = jax.random.normal(jax.random.PRNGKey(2), (5, 4, 4))
    ref = sum(v[k] @ a[k].T for k in (2, 3, 4)) / 3
    np.testing.assert_allclose(sharing.fuse(v, wm, "pointwise", a, row=1), ref, rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# Tied with a weight map
# ---------------------------------------------------------------------------------------------

D = 8
X = jax.random.normal(jax.random.PRNGKey(1), (3, D))


class Block(nn.Module):
    """z -> tanh(A z + b + C x): two kernels and a bias."""

    @nn.compact
    def __call__(self, z, x):
        return jnp.tanh(nn.Dense(D, name="a")(z) + nn.Dense(D, use_bias=False, name="c")(x))


def only_a(path, leaf):
    return path[0] == "a"


class Net(nn.Module):
    weight_map: tuple | None = (0, 0, 1, 1)
    scan: bool = True
    shared: bool = True
    opts: tuple = ()  # extra Tied fields as (name, value) pairs (hashable)

    @nn.compact
    def __call__(self, x):
        depth = 4 if self.weight_map is None else len(self.weight_map)
        tied = Tied(
            Block(),
            depth=depth,
            weight_map=self.weight_map,
            scan=self.scan,
            shared=self.shared,
            mask_scope="tied",
            name="tied",
            **dict(self.opts),
        )
        return tied(jnp.zeros_like(x), x)


def reference(block_params_per_layer, x):
    """The hand-written loop: layer i applies Block with its own parameter dict."""
    z = jnp.zeros_like(x)
    for p in block_params_per_layer:
        z = Block().apply({"params": p}, z, x)
    return z


def layer_params(block, weight_map, shares=lambda path: True):
    """Per-layer parameter dicts: set ``weight_map[i]`` of shared leaves, entry ``i`` of the others."""
    out = []
    for i, w in enumerate(weight_map):
        out.append(
            jax.tree_util.tree_map_with_path(
                lambda path, v, w=w, i=i: v[w] if shares(tuple(k.key for k in path)) else v[i], block
            )
        )
    return out


def n_params(tree):
    return sum(int(np.prod(v.shape)) for v in jax.tree.leaves(tree))


@pytest.mark.parametrize("wm", [(0, 0, 1, 1), (0, 1, 0, 1), (0, 1, 2, 2, 2, 3)])
def test_weight_map_equals_the_per_layer_loop_and_counts_match(wm):
    params = Net(wm).init(jax.random.PRNGKey(0), X)["params"]
    block = params["tied"]["block"]
    per_layer = D * D + D + D * D  # a (kernel + bias) + c
    assert n_params(params) == sharing.parameter_count(wm, per_layer, 0)
    ref = reference(layer_params(block, wm), X)
    for scan in (True, False):
        np.testing.assert_allclose(Net(wm, scan=scan).apply({"params": params}, X), ref, rtol=1e-5, atol=1e-6)
    # Distinct sets really are distinct (independent init per set).
    assert not np.allclose(block["a"]["kernel"][0], block["a"]["kernel"][1])


def test_share_predicate_shares_only_the_selected_leaves():
    wm = (0, 0, 0, 1, 1, 1)
    net = Net(wm, opts=(("share_predicate", only_a),))
    params = net.init(jax.random.PRNGKey(0), X)["params"]
    block = params["tied"]["block"]
    assert block["a"]["kernel"].shape == (2, D, D) and block["c"]["kernel"].shape == (6, D, D)
    assert n_params(params) == sharing.parameter_count(wm, D * D + D, D * D)
    ref = reference(layer_params(block, wm, lambda path: path[0] == "a"), X)
    np.testing.assert_allclose(net.apply({"params": params}, X), ref, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(
        Net(wm, scan=False, opts=(("share_predicate", only_a),)).apply({"params": params}, X),
        ref,
        rtol=1e-5,
        atol=1e-6,
    )


def test_identity_map_is_the_not_tied_stack_and_constant_map_is_the_tied_block():
    distinct = Net(None, shared=False).init(jax.random.PRNGKey(0), X)["params"]
    np.testing.assert_allclose(
        Net((0, 1, 2, 3)).apply({"params": distinct}, X),
        Net(None, shared=False).apply({"params": distinct}, X),
        rtol=1e-6,
    )
    tied = Net(None).init(jax.random.PRNGKey(0), X)["params"]
    one_set = jax.tree.map(lambda v: v[None], tied)
    np.testing.assert_allclose(
        Net((0, 0, 0, 0)).apply({"params": one_set}, X), Net(None).apply({"params": tied}, X), rtol=1e-6
    )
    # weight_map=None keeps today's tree: no leading axis, no extra collections.
    assert tied["tied"]["block"]["a"]["kernel"].shape == (D, D) and set(tied["tied"]) == {"block"}


def test_weight_map_combines_with_multi_masks():
    wm = (0, 0, 1, 1)
    spec = MaskSpec(density=0.5, seed=4)
    net = Net(wm, opts=(("mask_mode", "multi"), ("mask", spec)))
    params = net.init(jax.random.PRNGKey(0), X)["params"]
    layers = layer_params(params["tied"]["block"], wm)
    masked = []
    for i, p in enumerate(layers):
        masks = masks_for(p, spec, i, scope=("tied", "block"))
        masked.append(
            jax.tree_util.tree_map_with_path(
                lambda path, v, masks=masks: (
                    v * masks[tuple(k.key for k in path)] if tuple(k.key for k in path) in masks else v
                ),
                p,
            )
        )
    # Reuses 0 and 1 share weights but see different masks.
    assert not np.array_equal(masked[0]["a"]["kernel"], masked[1]["a"]["kernel"])
    np.testing.assert_allclose(net.apply({"params": params}, X), reference(masked, X), rtol=1e-5, atol=1e-6)


def test_affine_index_leaves_the_first_user_of_each_set_untransformed():
    assert sharing.affine_index((0, 0, 1, 1)) == (-1, 0, -1, 1)
    assert sharing.affine_index((0, 1, 0, 1, 0, 1)) == (-1, -1, 0, 1, 2, 3)
    assert sharing.affine_index((0, 1, 2)) == (-1, -1, -1)


def test_affine_transforms_start_as_identity_and_count_c_times_g_per_later_layer():
    wm, g = (0, 0, 1, 1), 2
    plain = Net(wm).init(jax.random.PRNGKey(0), X)["params"]
    net = Net(wm, opts=(("affine_groups", g),))
    params = net.init(jax.random.PRNGKey(0), X)["params"]
    # Affine params: for each of the 2 shared kernels, (L - P) * (C*G + C) (SPIN Table 2).
    assert n_params(params) - n_params(plain) == 2 * (len(wm) - 2) * (D * g + D)
    np.testing.assert_allclose(
        net.apply({"params": params}, X), Net(wm).apply({"params": plain}, X), rtol=1e-6
    )
    # A non-identity transform 1 (layer 3) changes the function; the loop reference agrees.
    aff = params["tied"]["affine"]["a"]["kernel"]
    aff = {"scale": aff["scale"].at[1].multiply(1.5), "bias": aff["bias"].at[1].add(0.1)}
    params["tied"]["affine"]["a"]["kernel"] = aff
    layers = layer_params(params["tied"]["block"], wm)
    layers[3]["a"]["kernel"] = sharing.affine_apply(layers[3]["a"]["kernel"], aff["scale"][1], aff["bias"][1])
    np.testing.assert_allclose(net.apply({"params": params}, X), reference(layers, X), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(
        Net(wm, scan=False, opts=(("affine_groups", g),)).apply({"params": params}, X),
        reference(layers, X),
        rtol=1e-5,
        atol=1e-6,
    )


@pytest.mark.parametrize("fusion", sharing.FUSIONS)
def test_fusion_of_identical_layers_reproduces_the_pretrained_model_and_export_is_exact(fusion):
    wm = (0, 0, 1, 1)
    not_tied = Net(None, shared=False)
    pretrained = not_tied.init(jax.random.PRNGKey(0), X)["params"]
    # Make the layers of each group identical: fusing them must then be the identity.
    pretrained = jax.tree.map(lambda v: v[jnp.array([0, 0, 2, 2])], pretrained)
    opts = (("fusion", fusion),)
    fused_net = Net(wm, opts=opts)
    init = fused_net.init(jax.random.PRNGKey(1), X)["params"]
    fused = {"tied": {**init["tied"], "block": pretrained["tied"]["block"]}}
    np.testing.assert_allclose(
        fused_net.apply({"params": fused}, X), not_tied.apply({"params": pretrained}, X), rtol=1e-5
    )

    # Perturb every fusion weight and the per-layer V; the folded export computes the same thing.
    key = jax.random.PRNGKey(7)
    fused = jax.tree.map(lambda v: v + 0.1 * jax.random.normal(key, v.shape), fused)
    exported = {"tied": fold_fusion(fused["tied"], wm, fusion)}
    assert "fusion" not in exported["tied"] and exported["tied"]["block"]["a"]["kernel"].shape == (2, D, D)
    np.testing.assert_allclose(
        Net(wm).apply({"params": exported}, X), fused_net.apply({"params": fused}, X), rtol=1e-5, atol=1e-6
    )
    # Gradients reach the underlying per-layer weights (and the fusion weights when learnable).
    grads = jax.grad(lambda p: fused_net.apply({"params": p}, X).sum())(fused)["tied"]
    used = [0, 2] if fusion == "choose_first" else [0, 1, 2, 3]
    g = np.abs(np.asarray(grads["block"]["a"]["kernel"])).sum(axis=(1, 2))
    assert all(g[i] > 0 for i in used) and all(g[i] == 0 for i in set(range(4)) - set(used))
    if fusion in sharing.LEARNABLE_FUSIONS:
        assert float(jnp.abs(grads["fusion"]["a"]["kernel"]).sum()) > 0


def test_weight_map_validation():
    with pytest.raises(ValueError, match="entries"):
        Tied(Block(), depth=3, weight_map=(0, 0, 1, 1))
    with pytest.raises(ValueError, match="shared=False"):
        Tied(Block(), depth=2, weight_map=(0, 1), shared=False)
    with pytest.raises(ValueError, match="need a weight_map"):
        Tied(Block(), depth=2, fusion="mean")
    with pytest.raises(ValueError, match="unknown fusion"):
        Tied(Block(), depth=2, weight_map=(0, 0), fusion="median")


def test_tied_works_as_the_top_level_module_in_every_mode():
    # The block is then adopted by Flax as Tied's `block` field (no parent module to clone from).
    x = jnp.ones((2, D))
    for kw in [
        {},
        dict(shared=False),
        dict(scan=False),
        dict(shared=False, scan=False),
        dict(weight_map=(0, 0, 1)),
    ]:
        tied = Tied(Block(), depth=3, **kw)
        params = tied.init(jax.random.PRNGKey(0), jnp.zeros_like(x), x)["params"]
        unrolled_not_tied = kw == dict(shared=False, scan=False)
        assert set(params) == ({"block_0", "block_1", "block_2"} if unrolled_not_tied else {"block"})
        assert tied.apply({"params": params}, jnp.zeros_like(x), x).shape == x.shape


def test_spin_view_selects_the_mapped_set_and_keeps_per_layer_leaves():
    from wtjax.core.spin import SpinView

    view = SpinView((0, 0, 1), share_predicate=lambda path, leaf: path[-1] == "kernel")
    kernel = jnp.arange(2 * 3).reshape(2, 3).astype(jnp.float32)  # P = 2 sets
    bias = jnp.arange(3 * 4).reshape(3, 4).astype(jnp.float32)  # one per layer
    params = {"dense": {"kernel": kernel, "bias": bias}}
    for i, slot in enumerate(view.weight_map):
        seen = view.select(params, i, {})
        np.testing.assert_array_equal(seen["dense"]["kernel"], kernel[slot])
        np.testing.assert_array_equal(seen["dense"]["bias"], bias[i])
    with pytest.raises(ValueError, match="unknown fusion"):
        SpinView((0, 1), fusion="median")
