"""Mask identity: masks follow a tie's explicit ``mask_scope``, not where the tie sits.

A trained tie keeps its function when renamed, nested or wrapped; the model families keep the
masks they always had; two ties drawing the same masks are caught; init returns what apply does.
"""

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest

from wtjax import MaskSpec, Tied, apply_masks, mask_sites
from wtjax.core import mask_sites as sites_lib
from wtjax.models import MODELS, build_model

K = 3
SPEC = MaskSpec(density=0.5, seed=3)
X = jax.random.normal(jax.random.PRNGKey(1), (2, 8))


class DenseBlock(nn.Module):
    @nn.compact
    def __call__(self, z, x):
        return jnp.tanh(nn.Dense(z.shape[-1], name="dense")(z) + x)


def tie(**fields):
    return Tied(DenseBlock(), depth=K, mask_mode="multi", mask=SPEC, **fields)


class Named(nn.Module):
    """The tie under a given module name (``None``: Flax's automatic ``Tied_0``)."""

    tie_name: str | None = None
    mask_scope: str | None = "tie"

    @nn.compact
    def __call__(self, x):
        return tie(mask_scope=self.mask_scope, name=self.tie_name)(jnp.zeros_like(x), x)


class Outer(nn.Module):
    """The tie two levels down: ``Outer/backbone/Tied_0``."""

    mask_scope: str | None = "tie"

    @nn.compact
    def __call__(self, x):
        return Named(mask_scope=self.mask_scope, name="backbone")(x)


def _close(a, b):
    chex.assert_trees_all_close(a, b, atol=1e-6, rtol=1e-6)


BLOCK = Named().init(jax.random.PRNGKey(0), X)["params"]["Tied_0"]["block"]


def _definition(block_params, scope):
    z = jnp.zeros_like(X)
    for i in range(K):
        z = DenseBlock().apply({"params": apply_masks(block_params, SPEC, i, scope)}, z, X)
    return z


def test_renaming_nesting_and_the_top_level_keep_the_function():
    expected = _definition(BLOCK, ("tie", "block"))
    _close(Named().apply({"params": {"Tied_0": {"block": BLOCK}}}, X), expected)
    _close(Named(tie_name="renamed").apply({"params": {"renamed": {"block": BLOCK}}}, X), expected)
    nested = {"backbone": {"Tied_0": {"block": BLOCK}}}
    _close(Outer().apply({"params": nested}, X), expected)
    top = tie(mask_scope="tie")
    _close(top.apply({"params": {"block": BLOCK}}, jnp.zeros_like(X), X), expected)
    # The masks matter: another scope is another function (so the checks above could fail).
    assert (
        jnp.abs(Named(mask_scope="other").apply({"params": {"Tied_0": {"block": BLOCK}}}, X) - expected).max()
        > 0.05
    )


def test_an_unscoped_tie_hashes_block_and_its_leaf_path():
    """``mask_scope=None`` hashes ``('block', ...)``: what a top-level tie always hashed."""
    expected = _definition(BLOCK, ("block",))
    _close(tie().apply({"params": {"block": BLOCK}}, jnp.zeros_like(X), X), expected)
    _close(Outer(mask_scope=None).apply({"params": {"backbone": {"Tied_0": {"block": BLOCK}}}}, X), expected)


@pytest.mark.parametrize("bad", ["", "a//b", "/a", 3])
def test_a_bad_scope_is_a_clear_error(bad):
    with pytest.raises(ValueError, match="mask_scope"):
        tie(mask_scope=bad)


def _family(name):
    cls = MODELS[name]
    fields = {f for f in cls.__dataclass_fields__}
    kw = {"mask_mode": "multi"} if "mask_mode" in fields else {}
    forms = getattr(cls, "FORMS", ())
    if "tied" in forms:
        kw["form"] = "tied"
    return build_model(name, **kw)


def test_every_family_keeps_the_masks_of_the_module_path():
    """The families pass their tie's name as the scope: the hashed path is the one the
    path-based formula gave when the family is the top-level module (trained runs keep masks)."""
    images = jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.float32)
    with_ties = set()
    for name in MODELS:
        for site in sites_lib.find_ties(_family(name), images):
            with_ties.add(name)
            assert site.mask_scope is not None and site.mask_path == site.path + ("block",), (name, site)
    assert {"mlp", "resnet_like", "resnet20", "cct", "convmixer", "vit_shared", "deq_mlp"} <= with_ties


class TwoTies(nn.Module):
    scopes: tuple = ("first", "second")
    seeds: tuple = (3, 3)

    @nn.compact
    def __call__(self, x):
        outs = []
        for scope, seed in zip(self.scopes, self.seeds, strict=True):
            t = Tied(
                DenseBlock(),
                depth=K,
                mask_mode="multi",
                mask=MaskSpec(density=0.5, seed=seed),
                mask_scope=scope,
            )
            outs.append(t(jnp.zeros_like(x), x))
        return outs


def test_two_ties_with_their_own_scopes_have_distinct_masks():
    sites = mask_sites(TwoTies(), X)
    assert [s.mask_scope for s in sites] == ["first", "second"]
    same_weights = {"Tied_0": {"block": BLOCK}, "Tied_1": {"block": BLOCK}}
    first, second = TwoTies().apply({"params": same_weights}, X)
    assert jnp.abs(first - second).max() > 0.05
    mask_sites(TwoTies(scopes=(None, None), seeds=(1, 2)), X)  # distinct seeds: no clash


@pytest.mark.parametrize("scopes", [("a", "a"), (None, None)])
def test_two_ties_with_one_identity_are_caught_naming_both(scopes):
    with pytest.raises(ValueError, match="'Tied_0' and 'Tied_1'.*same mask identity"):
        mask_sites(TwoTies(scopes=scopes), X)


def test_the_fingerprint_follows_the_masks_not_the_path():
    def identity(model):
        return sites_lib.model_mask_identity(model, X)

    (named,) = identity(Named(tie_name="renamed"))
    (nested,) = identity(Outer())
    assert named["fingerprint"] == nested["fingerprint"] and named["mask_scope"] == "tie"
    assert named["path"] == "renamed" and nested["path"] == "backbone/Tied_0"
    (other,) = identity(Outer(mask_scope="other"))
    assert other["fingerprint"] != named["fingerprint"]
    (dense,) = sites_lib.mask_identity(
        [sites_lib.TiedSite(("t",), K, "dense", SPEC, True)], {"t": {"block": BLOCK}}
    )
    assert dense["fingerprint"] is None


@pytest.mark.parametrize("mode", ["dense", "same", "multi", "dropout", "nm"])
@pytest.mark.parametrize("scan", [True, False])
@pytest.mark.parametrize("shared", [True, False])
def test_init_returns_what_apply_returns(mode, scan, shared):
    """Parameters are created by an unmasked pass; init then runs the masked one (issue 17)."""
    spec = MaskSpec(kind="nm", seed=3) if mode == "nm" else SPEC
    t = Tied(
        DenseBlock(),
        depth=K,
        mask_mode="multi" if mode == "nm" else mode,
        mask=spec,
        scan=scan,
        shared=shared,
    )
    (out, states), variables = t.init_with_output(
        jax.random.PRNGKey(0), jnp.zeros_like(X), X, method="trajectory"
    )
    applied, applied_states = t.apply(variables, jnp.zeros_like(X), X, method="trajectory")
    _close(out, applied)
    _close(states, applied_states)
    if mode in ("multi", "nm"):  # and the masks do change the output (else the check is empty)
        dense = t.clone(mask_mode="dense").apply(variables, jnp.zeros_like(X), X)
        assert jnp.abs(dense - applied).max() > 1e-3
