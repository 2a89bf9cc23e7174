"""ViT with the public checkpoint layout: npz round trip, loader errors, posemb resize, fine-tuning."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import traverse_util

from wtjax import Tied
from wtjax.methods.lora import LoraSpec
from wtjax.methods.lora_finetune import LoraFinetune, num_params
from wtjax.models import build_model
from wtjax.models.vit import EncoderBlock, ViT, vit_fields
from wtjax.models.vit_checkpoint import load_pretrained, read_npz, resize_posemb, save_npz

# in21k-style tiny model: cls token + tanh pre_logits, 8x8 images, 4x4 patches (2x2 grid).
PRETRAIN = dict(num_classes=7, representation_size=16, **vit_fields("tiny/4"))
IMG = 8


def _random_params(model, seed=0, image=IMG):
    """The model's param tree with every leaf randomised (zero-initialised heads would hide bugs).

    Every initial value is replaced, so only the shapes are needed (``eval_shape``); numpy draws
    them: jax.random compiled a sampler per leaf (about 10 s for this tiny ViT on 2 cores)."""
    shapes = jax.eval_shape(model.init, jax.random.PRNGKey(seed), jnp.zeros((1, image, image, 3)))["params"]
    rng = np.random.default_rng(seed + 1)
    return jax.tree.map(lambda x: jnp.asarray(0.3 * rng.normal(size=x.shape), x.dtype), shapes)


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    model = ViT(**PRETRAIN)
    params = _random_params(model)
    path = str(tmp_path_factory.mktemp("ckpt") / "ViT-tiny.npz")
    save_npz(path, params)
    images = jax.random.uniform(jax.random.PRNGKey(9), (2, IMG, IMG, 3), minval=-1, maxval=1)
    return model, params, path, images


def test_public_key_names_and_shapes(pretrained):
    _, _, path, _ = pretrained
    flat = {"/".join(k): v.shape for k, v in read_npz(path).items()}
    blk = "Transformer/encoderblock_1/"
    attn = blk + "MultiHeadDotProductAttention_1/"
    assert flat["embedding/kernel"] == (4, 4, 3, 16)
    assert flat["cls"] == (1, 1, 16)
    assert flat["Transformer/posembed_input/pos_embedding"] == (1, 5, 16)
    assert flat[attn + "query/kernel"] == (16, 2, 8) and flat[attn + "query/bias"] == (2, 8)
    assert flat[attn + "out/kernel"] == (2, 8, 16) and flat[attn + "out/bias"] == (16,)
    assert flat[blk + "MlpBlock_3/Dense_0/kernel"] == (16, 32)
    for name in ("LayerNorm_0/scale", "LayerNorm_2/bias"):
        assert flat[blk + name] == (16,)
    assert flat["Transformer/encoder_norm/scale"] == (16,)
    assert flat["pre_logits/kernel"] == (16, 16) and flat["head/kernel"] == (16, 7)
    assert not any("encoderblock_2" in k for k in flat)


def test_npz_round_trip_gives_identical_outputs(pretrained):
    model, params, path, images = pretrained
    loaded = load_pretrained(path, PRETRAIN, image_size=IMG, reset_head=False)
    want, want_out = model.apply({"params": params}, images)
    got, got_out = model.apply({"params": loaded}, images)
    np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(got_out["pre_logits"], want_out["pre_logits"])
    assert np.abs(np.asarray(want)).max() > 1e-3


def test_new_head_and_drop_pre_logits(pretrained):
    _, params, path, _ = pretrained
    cfg = dict(PRETRAIN, num_classes=3, representation_size=None)
    loaded = load_pretrained(path, cfg, image_size=IMG)
    assert "pre_logits" not in loaded
    assert loaded["head"]["kernel"].shape == (16, 3)
    np.testing.assert_array_equal(loaded["head"]["kernel"], 0.0)  # fresh zero-initialised head
    np.testing.assert_array_equal(loaded["embedding"]["kernel"], params["embedding"]["kernel"])


def test_clear_errors(pretrained, tmp_path):
    _, params, path, _ = pretrained
    with pytest.raises(FileNotFoundError, match="nope.npz"):
        load_pretrained(str(tmp_path / "nope.npz"), PRETRAIN, image_size=IMG)
    # A wider MLP in the model than in the file: the message names the key and both shapes.
    with pytest.raises(
        ValueError,
        match=r"MlpBlock_3/Dense_0/bias' has shape \(32,\) in the file but the model expects \(64,\)",
    ):
        load_pretrained(path, dict(PRETRAIN, mlp_dim=64), image_size=IMG)
    flat = traverse_util.flatten_dict(jax.device_get(params))
    del flat[("Transformer", "encoder_norm", "scale")]
    broken = str(tmp_path / "broken.npz")
    save_npz(broken, traverse_util.unflatten_dict(flat))
    with pytest.raises(KeyError, match="Transformer/encoder_norm/scale"):
        load_pretrained(broken, PRETRAIN, image_size=IMG)
    with pytest.raises(KeyError, match="encoderblock_1"):  # file deeper than the model
        load_pretrained(path, dict(PRETRAIN, depth=1), image_size=IMG)


def test_posemb_resize(pretrained):
    _, params, path, _ = pretrained
    loaded = load_pretrained(path, PRETRAIN, image_size=16)  # 2x2 grid -> 4x4 grid
    old = np.asarray(params["Transformer"]["posembed_input"]["pos_embedding"])
    new = loaded["Transformer"]["posembed_input"]["pos_embedding"]
    assert new.shape == (1, 17, 16)
    np.testing.assert_array_equal(new[:, 0], old[:, 0])  # cls position untouched
    grid_old, grid_new = old[0, 1:].reshape(2, 2, 16), new[0, 1:].reshape(4, 4, 16)
    for (i, j), (k, m) in {(0, 0): (0, 0), (0, 1): (0, 3), (1, 0): (3, 0), (1, 1): (3, 3)}.items():
        np.testing.assert_allclose(grid_new[k, m], grid_old[i, j], rtol=1e-5, atol=1e-6)  # corners kept
    # Bilinear resampling reproduces a function linear in the grid position exactly.
    lin = (np.arange(3)[:, None, None] + 2 * np.arange(3)[None, :, None]) * np.ones((1, 1, 4))
    out = resize_posemb(lin.reshape(1, 9, 4).astype(np.float32), 25, has_cls=False).reshape(5, 5, 4)
    want = (np.linspace(0, 2, 5)[:, None, None] + 2 * np.linspace(0, 2, 5)[None, :, None]) * np.ones(
        (1, 1, 4)
    )
    np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-5)
    ViT(**PRETRAIN).apply({"params": loaded}, jnp.zeros((1, 16, 16, 3)))  # the model accepts it


def test_big_vision_layout_is_converted(pretrained, tmp_path):
    model, params, _, images = pretrained
    rename = {
        "MultiHeadDotProductAttention_1": "MultiHeadDotProductAttention_0",
        "LayerNorm_2": "LayerNorm_1",
    }
    rename["MlpBlock_3"] = "MlpBlock_0"
    flat = {}
    for k, v in traverse_util.flatten_dict(jax.device_get(params)).items():
        if k[:2] == ("Transformer", "posembed_input"):
            continue
        if len(k) > 2 and k[1].startswith("encoderblock_"):
            k = k[:2] + (rename.get(k[2], k[2]),) + k[3:]
        flat[k] = v
    # big_vision adds the embedding before prepending cls: fold the cls entry into cls itself.
    pe = np.asarray(params["Transformer"]["posembed_input"]["pos_embedding"])
    flat[("pos_embedding",)] = pe[:, 1:]
    flat[("cls",)] = np.asarray(params["cls"]) + pe[:, :1]
    path = str(tmp_path / "bv.npz")
    save_npz(path, traverse_util.unflatten_dict(flat))
    loaded = load_pretrained(path, PRETRAIN, image_size=IMG, reset_head=False)
    np.testing.assert_allclose(
        model.apply({"params": loaded}, images)[0],
        model.apply({"params": params}, images)[0],
        rtol=1e-5,
        atol=1e-5,
    )


class TiedEncoder(nn.Module):
    @nn.compact
    def __call__(self, z):
        return Tied(EncoderBlock(mlp_dim=32, num_heads=2), depth=3, name="tied")(z)


def test_registry_contract_and_encoder_block_in_tied():
    model = build_model("vit", num_classes=3, **vit_fields("tiny/4"))
    x = jnp.ones((2, IMG, IMG, 3))
    params = model.init(jax.random.PRNGKey(0), x)["params"]
    logits, out = model.apply({"params": params}, x, train=False, return_intermediates=True)
    assert logits.shape == (2, 3) and out["pre_logits"].shape == (2, 16)
    assert out["block_outputs"].shape == (2, 2, 5, 16)
    with pytest.raises(ValueError, match="multiple of patch_size"):
        model.apply({"params": params}, jnp.ones((1, 10, 10, 3)))
    # The encoder block is reusable as a weight-tied block (SPIN / isotropic ViTs).
    tied = TiedEncoder()
    z = jax.random.normal(jax.random.PRNGKey(1), (2, 5, 16))
    tparams = tied.init(jax.random.PRNGKey(2), z)["params"]
    assert tied.apply({"params": tparams}, z).shape == z.shape
    assert num_params(tparams) == num_params(EncoderBlock(32, 2).init(jax.random.PRNGKey(2), z)["params"])


def test_lora_finetune_step_from_npz(pretrained):
    """End to end: public npz -> new head -> one multi-mask LoRA step; only LoRA + head move."""
    _, _, path, images = pretrained
    cfg = dict(PRETRAIN, num_classes=3, representation_size=None)
    model = ViT(**cfg)
    base = load_pretrained(path, cfg, image_size=IMG)
    ft = LoraFinetune(LoraSpec(kind="multi_mask", rank=2, alpha=2.0, depth=2))
    trainable = ft.init(jax.random.PRNGKey(3), base)
    assert set(traverse_util.flatten_dict(trainable["base"])) == {("head", "kernel"), ("head", "bias")}
    labels = jnp.array([0, 2])
    tx = optax.adamw(1e-2, weight_decay=1e-4)
    opt_state = tx.init(trainable)

    @jax.jit
    def step(trainable, opt_state, base):
        def loss_fn(t):
            logits, _ = model.apply({"params": ft.effective(base, t)}, images, train=True)
            return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

        loss, grads = jax.value_and_grad(loss_fn)(trainable)
        updates, opt_state = tx.update(grads, opt_state, trainable)
        return optax.apply_updates(trainable, updates), opt_state, loss

    base_before = jax.tree.map(np.array, base)
    new, opt_state, loss = step(trainable, opt_state, base)
    new, opt_state, loss2 = step(new, opt_state, base)
    assert np.isfinite(loss) and float(loss2) < float(loss)
    jax.tree.map(np.testing.assert_array_equal, base, base_before)  # frozen weights untouched
    for path_, leaf in traverse_util.flatten_dict(new["lora"]).items():
        if path_[-1] == "lora_b":  # B starts at zero; after two steps it has moved
            assert np.abs(np.asarray(leaf)).max() > 0
    # The merged model equals the adapted one (what inference would run).
    np.testing.assert_allclose(
        model.apply({"params": ft.merged(base, new)}, images)[0],
        model.apply({"params": ft.effective(base, new)}, images)[0],
        rtol=1e-5,
        atol=1e-6,
    )


def _vtab_config(arg):
    import importlib.util
    import pathlib

    path = pathlib.Path(__file__).resolve().parents[1] / "configs" / "vtab_lora.py"
    spec = importlib.util.spec_from_file_location("vtab_lora_config", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg)


def test_vtab_lora_config_and_finetune_hook(pretrained):
    from wtjax.methods.lora_finetune import FinetuneHook

    _, _, path, _ = pretrained
    default = _vtab_config(None)  # Table 3: ViT-B/16, rank 8, d=2, batch 64, 100 epochs
    assert (default.model.width, default.model.patch_size, default.lora.rank, default.lora.depth) == (
        768,
        16,
        8,
        2,
    )
    assert (default.batch_size, default.num_epochs, default.data.name) == (64, 100.0, "vtab/cifar100")
    with pytest.raises(ValueError, match="depth 1"):
        _vtab_config("kind=lora,depth=2")
    with pytest.raises(KeyError, match="unknown config argument"):
        _vtab_config("rnak=4")
    cfg = _vtab_config("variant=tiny/4,image_size=8,kind=lora,depth=1,protocol=val")
    assert cfg.data.name == "vtab/cifar100/val"
    with pytest.raises(ValueError, match="config.pretrained"):
        FinetuneHook.from_config(cfg)
    cfg.pretrained = path
    hook = FinetuneHook.from_config(cfg)
    base = hook.base_params(3, (IMG, IMG, 3))
    assert "pre_logits" not in base and base["head"]["kernel"].shape == (16, 3)
    trainable = hook.init(jax.random.PRNGKey(0), base)
    assert num_params(trainable["lora"]) == 2 * 2 * 8 * (16 + 16)  # 2 blocks x (query, value)
    assert "1,024 adapter + 51 head" in hook.describe(base, trainable)
