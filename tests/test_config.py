"""Configs: every file loads and builds its model; arguments, overrides and unknown keys."""

from __future__ import annotations

import sys

import jax
import jax.numpy as jnp
import pytest
from absl import flags
from ml_collections import config_flags
from train_utils import CONFIGS, load_config

from wtjax.core.masks import MaskSpec
from wtjax.job import config as cs

CONFIG_NAMES = sorted(p.stem for p in CONFIGS.glob("*.py") if not p.stem.startswith("_"))
NUM_CLASSES = {"imagenet32_resnet": 1000}


@pytest.mark.parametrize("name", CONFIG_NAMES)
def test_every_config_loads_validates_and_builds_its_model(name):
    config = load_config(name)
    cs.validate(config)
    model = cs.model_from_config(config.model, NUM_CLASSES.get(name, 10))
    shape = tuple(config.data.image_shape) if config.data.name == "synthetic" else (32, 32, 3)
    if config.data.name == "digits":
        shape = (16, 16, 1)
    # eval_shape builds every parameter without computing (cheap even for the large configs).
    logits, _ = jax.eval_shape(
        lambda: model.init_with_output(jax.random.PRNGKey(0), jnp.zeros((2, *shape)), train=False)[0]
    )
    assert logits.shape == (2, NUM_CLASSES.get(name, 10))
    # The resolved config round-trips through JSON (what the job writes to config.json).
    assert config.to_json_best_effort()


def test_paper_recipes():
    c = load_config("cifar_resnet")
    assert (c.optim.name, c.optim.learning_rate, c.optim.schedule, c.optim.weight_decay) == (
        "adam",
        1e-3,
        "cosine",
        2.5e-6,
    )
    assert (c.num_epochs, c.batch_size, c.model.depth, c.model.mask.density, c.model.mask_mode) == (
        150,
        128,
        8,
        0.5,
        "multi",
    )
    assert c.data.augment
    i = load_config("imagenet32_resnet")
    assert (i.optim.name, i.optim.learning_rate, i.optim.schedule, i.optim.weight_decay, i.num_epochs) == (
        "sgd",
        0.05,
        "multistep",
        1e-4,
        90,
    )


def test_config_argument_sets_typed_fields_and_rejects_unknown_keys():
    c = load_config("cifar_resnet", "mask_mode=same,density=0.3,depth=4,width=32")
    assert (c.model.mask_mode, c.model.mask.density, c.model.depth, c.model.width) == ("same", 0.3, 4, 32)
    assert isinstance(c.model.depth, int) and isinstance(c.model.mask.density, float)
    assert cs.model_from_config(c.model, 10).mask == MaskSpec(density=0.3)
    with pytest.raises(KeyError, match="'widht'"):
        load_config("cifar_resnet", "widht=32")
    with pytest.raises(ValueError, match="depth"):
        load_config("cifar_resnet", "depth=four")
    with pytest.raises(ValueError, match="key=value"):
        load_config("cifar_resnet", "depth")
    args = cs.parse_arg("flag=false,opt=3,other=abc,name=x", flag=True, opt=None, other=None, name="y")
    assert (args.flag, args.opt, args.other, args.name) == (False, 3, "abc", "x")


def _parse_flags(argv, monkeypatch):
    # config_flags reads the overrides from sys.argv (as under app.run), so set it too.
    monkeypatch.setattr(sys, "argv", ["prog", *argv])
    fv = flags.FlagValues()
    config_flags.DEFINE_config_file("config", None, "config", flag_values=fv, lock_config=True)
    fv(sys.argv)
    return fv.config


def test_command_line_overrides_and_misspelt_keys(monkeypatch):
    path = str(CONFIGS / "cifar_resnet.py")
    c = _parse_flags(
        [
            f"--config={path}:width=16",
            "--config.optim.learning_rate=3e-4",
            "--config.model.remat_policy=nothing_saveable",  # an optional (None) field
            "--config.data.data_dir=/tmp/somewhere",
            "--config.model.mask.kind=nm",
        ],
        monkeypatch,
    )
    assert (c.model.width, c.optim.learning_rate, c.model.remat_policy) == (16, 3e-4, "nothing_saveable")
    assert (c.data.data_dir, c.model.mask.kind) == ("/tmp/somewhere", "nm")
    cs.validate(c)
    # Union-typed optional fields (int | str, int | bool) take either from the command line.
    for arg, field, value in [
        ("checkpoint_every=sqrt", "checkpoint_every", "sqrt"),
        ("unroll=1", "unroll", 1),
    ]:
        c = _parse_flags([f"--config={path}", f"--config.model.{arg}"], monkeypatch)
        assert c.model[field] == getattr(cs.model_from_config(c.model, 10), field) == value
    c = _parse_flags([f"--config={path}", "--config.model.checkpoint_every=3"], monkeypatch)
    assert c.model.checkpoint_every == 3
    for bad, key in [("--config.optim.learnig_rate=1", "learnig_rate"), ("--config.model.widht=3", "widht")]:
        with pytest.raises((AttributeError, KeyError, flags.Error), match=key):
            _parse_flags([f"--config={path}", bad], monkeypatch)


def test_validate_names_unknown_keys_and_model_fields():
    c = load_config("tiny")
    with c.unlocked():
        c.epochz = 3
    with pytest.raises(KeyError, match="epochz"):
        cs.validate(c)
    c = load_config("tiny")
    with c.unlocked():
        c.model.widthh = 3
    with pytest.raises(TypeError, match="widthh"):
        cs.validate(c)
    c = load_config("tiny")
    with c.unlocked():
        c.optim.lr = 3
    with pytest.raises(KeyError, match="'lr'"):
        cs.validate(c)
    with pytest.raises(KeyError, match="nosuchmodel"):
        cs.model_config("nosuchmodel")
    with pytest.raises(TypeError, match="blocks"):
        cs.model_config("resnet_like", blocks=3)
    with pytest.raises(KeyError, match="sparsity"):
        cs.model_config("resnet_like", mask=dict(sparsity=0.5))
    c = load_config("tiny", **{"model.mask.density": 1.5})
    with pytest.raises(ValueError, match="density"):
        cs.validate(c)
    c = load_config("tiny")
    with c.unlocked():
        del c.data["download"]
    with pytest.raises(KeyError, match="missing field.*'download'"):
        cs.validate(c)


@pytest.mark.parametrize(
    "key, value, message",
    [
        ("batch_size", 0, "batch_size must be an integer >= 1, got 0"),
        ("batch_size", -1, "batch_size must be an integer >= 1, got -1"),
        ("eval_batch_size", 0, "eval_batch_size must be an integer >= 1 or None, got 0"),
        ("eval_batch_size", -1, "eval_batch_size must be an integer >= 1 or None, got -1"),
        ("num_train_steps", 0, "num_train_steps must be an integer >= 1 or None, got 0"),
        ("log_every_steps", 0, "log_every_steps must be an integer >= 1, got 0"),
        ("eval_every_steps", -2, "eval_every_steps must be an integer >= 0 or None, got -2"),
        ("checkpoint_every_steps", -1, "checkpoint_every_steps must be an integer >= 0, got -1"),
        ("keep_checkpoints", 0, "keep_checkpoints must be an integer >= 1, got 0"),
        ("num_devices", 0, "num_devices must be an integer >= 1 or None, got 0"),
        ("grad_accum_steps", 0, "grad_accum_steps must be an integer >= 1, got 0"),
    ],
)
def test_validate_rejects_run_numbers_out_of_range(key, value, message):
    c = load_config("tiny")
    c[key] = value
    with pytest.raises(ValueError, match=f"^{message}$"):
        cs.validate(c)


@pytest.mark.parametrize("epochs", [0, 0.0, -1.0, float("nan"), float("inf")])
def test_validate_rejects_a_run_of_no_epochs(epochs):
    c = load_config("tiny")
    c.num_train_steps = None
    c.num_epochs = epochs
    with pytest.raises(ValueError, match=r"^num_epochs must be a number > 0 \(or set num_train_steps\)"):
        cs.validate(c)
    c.num_train_steps = 3  # the length in steps wins: num_epochs is then unused
    cs.validate(c)


def test_shared_config_builders_match_the_fields_they_replace():
    a = cs.parse_arg("form=not_tied,mask_mode=same,density=0.3,mask_kind=nm", **cs.tied_args())
    shared = cs.tied_model_config("resnet_like", a, width=16)
    spelled_out = cs.model_config(
        "resnet_like", width=16, form="not_tied", mask_mode="same", mask=dict(kind="nm", density=0.3)
    )
    assert shared.to_dict() == spelled_out.to_dict()
    assert cs.tied_args(density=0.9)["density"] == 0.9
    with pytest.raises(KeyError, match="densty"):
        cs.tied_args(densty=0.9)
    recipe = cs.paper_cifar_recipe()
    assert recipe["data"].to_dict() == cs.data_config("cifar10", augment=True).to_dict()
    assert (recipe["optim"].name, recipe["optim"].learning_rate, recipe["optim"].weight_decay) == (
        "adam",
        1e-3,
        2.5e-6,
    )
    assert recipe["batch_size"] == 128
    # One way to load a config file by path: the module (cifar_mondeq reuses digits_mondeq's
    # builder through it) or its get_config(arg).
    assert cs.load_config_module(CONFIGS / "digits_mondeq.py").ARGS["arch"] == "fc"
    assert cs.load_config_file(CONFIGS / "cifar_mondeq.py", "width=9").model.channels == 9


def test_model_config_covers_every_plain_field_with_class_defaults():
    from wtjax.models import MODELS

    m = cs.model_config("resnet_like")
    cls = MODELS["resnet_like"]
    model = cs.model_from_config(m, 10)
    assert model == cls(num_classes=10)
    assert "num_classes" not in m  # comes from the dataset
    assert set(m.mask.keys()) == set(cs.MASK_FIELDS)


@pytest.mark.parametrize(
    "name, defaults",
    [
        ("mlp", dict(form="tied", mask_mode="multi")),
        ("resnet20", dict(form="not_tied", mask_mode="dense")),
        ("cct", dict(form="tied", mask_mode="multi", share_rate=1, share_params="all")),
        ("convmixer", dict(form="shared", mask_mode="dense", share_rate=2, share_params="pointwise")),
        ("vit_shared", dict(form="shared", mask_mode="dense", share_rate=2, fusion="none")),
    ],
)
def test_inherited_tie_fields_are_config_fields_with_each_familys_defaults(name, defaults):
    """The tie fields come from a shared base (wtjax.models.tying); configs still set them by name."""
    m = cs.model_config(name)
    for key in ("form", "mask_mode", "mask", "scan", "remat_policy", "checkpoint_every", "dtype"):
        assert key in m, key
    for key, value in defaults.items():
        assert m[key] == value, key
    assert cs.model_from_config(m, 10) == cs.model_from_config(cs.model_config(name, **defaults), 10)
