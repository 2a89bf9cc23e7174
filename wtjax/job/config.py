"""The shape of a training config, shared by every file in ``configs/``.

A config is an ``ml_collections.ConfigDict`` with these sections (each field is commented where
it is defined below):

* top level: seed, batch size, length of the run, logging/eval/checkpoint cadence, devices;
* ``model``: ``name`` plus **every** field of the registered model class, filled from the class
  defaults by :func:`model_config` (so ``--config.model.<field>=...`` works for any field and a
  misspelt field fails); the mask is ``model.mask = dict(kind, density, n, m, seed)`` and becomes a
  :class:`wtjax.core.masks.MaskSpec`; ``num_classes`` comes from the dataset;
* ``data``: the fields of :func:`wtjax.data.pipeline.create_dataset`;
* ``optim``: the fields of :mod:`wtjax.job.optim`;
* ``distributed``: multi-process set-up (:mod:`wtjax.job.parallel`).

Config files call ``base_config(model=..., data=..., optim=...)`` and may parse a short
``k=v,k=v`` argument with :func:`parse_arg`. :func:`validate` rejects unknown top-level keys and
builds the model once to check its fields.
"""

from __future__ import annotations

import ast
import dataclasses
import importlib.util
from pathlib import Path

from ml_collections import config_dict

from wtjax.core.masks import MaskSpec

MASK_FIELDS = ("kind", "density", "n", "m", "seed")
# Model fields that are not configuration: the number of classes comes from the dataset.
_FROM_DATA = ("num_classes",)
_TYPES = {"int": int, "float": float, "str": str, "bool": bool, "tuple": tuple}


def parse_arg(arg: str | None, **defaults) -> config_dict.ConfigDict:
    """Parse a config argument ``'k=v,k=v'`` against ``defaults`` (the only keys allowed).

    Values take the type of their default (``bool`` accepts true/false/1/0); keys whose default is
    ``None`` are parsed as Python literals, else kept as strings.

    Example: ``parse_arg('depth=4,mask_mode=same', depth=8, mask_mode='multi')``.

    Raises:
      KeyError: a key that is not in ``defaults`` (the message lists the allowed keys).
      ValueError: a malformed item or a value of the wrong type.
    """
    values = dict(defaults)
    for item in filter(None, (s.strip() for s in (arg or "").split(","))):
        if "=" not in item:
            raise ValueError(f"config argument item {item!r} is not of the form key=value")
        key, raw = (s.strip() for s in item.split("=", 1))
        if key not in defaults:
            raise KeyError(f"unknown config argument {key!r}; allowed: {sorted(defaults)}")
        default = defaults[key]
        if isinstance(default, bool):
            if raw.lower() not in ("true", "false", "1", "0"):
                raise ValueError(f"config argument {key}={raw!r}: expected true or false")
            values[key] = raw.lower() in ("true", "1")
        elif default is None:
            try:
                values[key] = ast.literal_eval(raw)
            except (ValueError, SyntaxError):
                values[key] = raw
        else:
            try:
                values[key] = type(default)(raw)
            except ValueError as e:
                raise ValueError(f"config argument {key}={raw!r}: expected {type(default).__name__}") from e
    return config_dict.ConfigDict(values)


def load_config_file(path, arg: str | None = None) -> config_dict.ConfigDict:
    """``get_config(arg)`` of the config file at ``path`` (e.g. ``configs/cifar_resnet.py``)."""
    path = Path(path)
    spec = importlib.util.spec_from_file_location(f"_wtjax_config_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg or None)


def _field_value(field: dataclasses.Field):
    """A config value for a dataclass field's default, or ``_SKIP`` if it is not plain data."""
    default = field.default
    if isinstance(default, MaskSpec):
        return config_dict.ConfigDict({k: getattr(default, k) for k in MASK_FIELDS})
    if default is None:
        # Optional fields become typed placeholders so ``--config.model.x=...`` can set them.
        annotation = str(field.type)
        kinds = [t for name, t in _TYPES.items() if name in annotation]
        if len(kinds) > 1:
            return None  # a union (e.g. int | str): an untyped None takes a value of any type
        return config_dict.placeholder(kinds[0] if kinds else str)
    if isinstance(default, (bool, int, float, str, tuple)):
        return default
    return _SKIP


_SKIP = object()


def model_config(name: str, **overrides) -> config_dict.ConfigDict:
    """``config.model`` for the registered model ``name``: every plain field, class defaults first.

    Args:
      name: a key of :data:`wtjax.models.MODELS`.
      **overrides: field values; ``mask`` may be a dict with a subset of ``kind, density, n, m,
        seed``.

    Raises:
      KeyError / TypeError: unknown model or field.
    """
    from wtjax.models import MODELS

    if name not in MODELS:
        raise KeyError(f"unknown model {name!r}; registered models: {sorted(MODELS)}")
    cfg = config_dict.ConfigDict({"name": name})
    for field in dataclasses.fields(MODELS[name]):
        if not field.init or field.name in ("parent", "name") + _FROM_DATA:
            continue
        if field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING:
            if field.name not in overrides:
                raise TypeError(f"model {name!r} needs field {field.name!r} in the config")
            continue
        value = _field_value(field)
        if value is not _SKIP:
            cfg[field.name] = value
    for key, value in overrides.items():
        if key not in cfg and key not in {f.name for f in dataclasses.fields(MODELS[name])}:
            raise TypeError(f"model {name!r} has no field {key!r}")
        if key == "mask" and "mask" in cfg:
            unknown = set(value) - set(MASK_FIELDS)
            if unknown:
                raise KeyError(f"unknown mask field(s) {sorted(unknown)}; mask fields are {MASK_FIELDS}")
            cfg.mask.update(value)
        else:
            cfg[key] = value
    return cfg


def mask_spec(mask_config) -> MaskSpec:
    """``config.model.mask`` (``kind, density, n, m, seed``) as a :class:`MaskSpec`."""
    values = dict(mask_config)
    unknown = set(values) - set(MASK_FIELDS)
    if unknown:
        raise KeyError(f"unknown mask field(s) {sorted(unknown)}; mask fields are {MASK_FIELDS}")
    return MaskSpec(**values)


def build_model(model_config, num_classes: int):
    """Build the model of ``config.model`` for a dataset with ``num_classes`` classes."""
    from wtjax import models

    fields = model_config.to_dict() if hasattr(model_config, "to_dict") else dict(model_config)
    name = fields.pop("name")
    if "mask" in fields and fields["mask"] is not None:
        fields["mask"] = mask_spec(fields["mask"])
    return models.build_model(name, num_classes=num_classes, **fields)


def data_config(name: str, **overrides) -> config_dict.ConfigDict:
    """``config.data``: the fields :func:`wtjax.data.pipeline.create_dataset` reads.

    Raises:
      KeyError: an unknown field.
    """
    cfg = config_dict.ConfigDict(
        {
            # digits | cifar10 | imagenet32 | image_folder | synthetic
            "name": name,
            # None: tfds (or the bundled data); a path: a local copy (format auto-detected).
            "data_dir": config_dict.placeholder(str),
            # Load the official python-pickle CIFAR files (pickle can run code: opt in).
            "allow_pickle": False,
            # >0: the last `holdout` training examples (fixed shuffle, seed 0) are the eval split.
            "holdout": 0,
            # Use only the first N training examples (after the fixed shuffle); None: all.
            "train_subset": config_dict.placeholder(int),
            # Use only the first N evaluation examples; None: all.
            "eval_subset": config_dict.placeholder(int),
            # Average-pool images by this integer factor (2: CIFAR 32x32 -> 16x16); 1: as stored.
            "downsample": 1,
            # Random crop (zero padding) + horizontal flip (crop only for digits).
            "augment": True,
            "crop_padding": config_dict.placeholder(int),  # None: 4 (digits: 2)
            "flip": config_dict.placeholder(bool),  # None: True (digits: False)
            # Let tfds download and prepare missing datasets (False: fail fast offline).
            "download": True,
            # Decoded-image cache for image folders; None: $WTJAX_CACHE_DIR or ~/.cache/wtjax; '': off.
            "cache_dir": config_dict.placeholder(str),
            "workers": config_dict.placeholder(int),  # image decoding threads; None: automatic
            # Per-channel normalisation; None: the dataset's standard values.
            "mean": config_dict.placeholder(tuple),
            "std": config_dict.placeholder(tuple),
            # Synthetic data only: classes, HWC shape and split sizes.
            "num_classes": 10,
            "image_shape": (8, 8, 3),
            "num_train": 256,
            "num_eval": 64,
            "data_seed": 0,  # synthetic data content (independent of the run seed)
        }
    )
    for key, value in overrides.items():
        if key not in cfg:
            raise KeyError(f"unknown data field {key!r}; data fields are {sorted(cfg)}")
        cfg[key] = value
    return cfg


def optim_config(name: str, learning_rate: float, **overrides) -> config_dict.ConfigDict:
    """``config.optim``: the fields :func:`wtjax.job.optim.create_optimizer` reads.

    Raises:
      KeyError: an unknown field.
    """
    cfg = config_dict.ConfigDict(
        {
            "name": name,  # adam | adamw | sgd
            "learning_rate": float(learning_rate),  # peak learning rate
            "schedule": "cosine",  # cosine | multistep | constant
            "warmup_epochs": 0.0,  # linear warm-up from 0 (fractions of an epoch allowed)
            "boundaries_epochs": (30, 60, 80),  # multistep: epochs at which the rate is multiplied
            "decay_factor": 0.1,  # multistep: by this factor
            "weight_decay": 0.0,  # adam/sgd: L2 in the gradient (PyTorch style); adamw: decoupled
            "b1": 0.9,  # adam/adamw first-moment decay
            "b2": 0.999,  # adam/adamw second-moment decay
            "eps": 1e-8,  # adam/adamw epsilon
            "momentum": 0.9,  # sgd momentum (0: plain SGD)
            "nesterov": False,  # sgd: Nesterov momentum
            "grad_clip_norm": config_dict.placeholder(float),  # clip the global grad norm; None: off
        }
    )
    for key, value in overrides.items():
        if key not in cfg:
            raise KeyError(f"unknown optim field {key!r}; optim fields are {sorted(cfg)}")
        cfg[key] = value
    return cfg


def pruning_config(**overrides) -> config_dict.ConfigDict:
    """``config.pruning``: pruning at initialisation (:func:`wtjax.methods.pruning.init_masks`).

    Raises:
      KeyError: an unknown field.
    """
    cfg = config_dict.ConfigDict(
        {
            "method": config_dict.placeholder(str),  # None: off | random | magnitude | snip | grasp | synflow
            "sparsity": 0.9,  # fraction of the selected weights removed (exact)
            "scope": "global",  # global | layer
            "include": (),  # prune kernels whose path contains one of these ('mon/': a monDEQ layer)
            "exclude": (),  # ... and none of these ('head': keep the classifier dense)
            "per_reuse": False,  # tied model in mask_mode='stored': K scored masks, one per reuse
            "tied_path": ("tied", "block"),  # params path of the stored-mask tied block
            "iterations": 100,  # SynFlow rounds (exponential schedule)
            "batch_size": 256,  # SNIP/GraSP scoring batch (the first training batch of the seed)
        }
    )
    for key, value in overrides.items():
        if key not in cfg:
            raise KeyError(f"unknown pruning field {key!r}; pruning fields are {sorted(cfg)}")
        cfg[key] = value
    return cfg


def base_config(*, model, data, optim, **overrides) -> config_dict.ConfigDict:
    """A complete training config with every top-level field; ``overrides`` must be known keys."""
    cfg = config_dict.ConfigDict()
    cfg.name = "run"  # used for the default workdir: ./runs/<name>
    cfg.seed = 0  # parameter init, dropout and data order all derive from it
    cfg.model = model
    cfg.data = data
    cfg.optim = optim
    cfg.batch_size = 128  # global batch, split over devices and processes
    # Gradient accumulation: each step averages the gradients of this many equal micro-batches of
    # the global batch (one micro-batch's activations in memory), then updates once: the same
    # update as the whole batch. batch_size must be divisible by grad_accum_steps * devices.
    cfg.grad_accum_steps = 1
    cfg.eval_batch_size = config_dict.placeholder(int)  # None: batch_size
    cfg.num_epochs = 1.0  # length of the run in epochs of the training split ...
    cfg.num_train_steps = config_dict.placeholder(int)  # ... or in steps (overrides num_epochs)
    cfg.log_every_steps = 50  # training metrics (averaged over the interval) + NaN check
    cfg.eval_every_steps = config_dict.placeholder(int)  # None: once per epoch; 0: only at the end
    cfg.checkpoint_every_steps = 1000  # periodic checkpoints (the final step is always saved)
    cfg.keep_checkpoints = 2  # how many checkpoints to keep
    cfg.async_checkpointing = True  # write checkpoints in a background thread
    cfg.num_devices = config_dict.placeholder(int)  # None: every device (of every process)
    cfg.distributed = config_dict.ConfigDict(
        {
            # Multi-process runs: set all three (or leave None to let jax.distributed read the
            # cluster environment, e.g. TPU pods/SLURM, when num_processes > 1 or auto is True).
            "coordinator_address": config_dict.placeholder(str),
            "num_processes": config_dict.placeholder(int),
            "process_id": config_dict.placeholder(int),
            "auto": False,  # call jax.distributed.initialize() with no arguments (cloud TPU pods)
            "cpu_collectives": "gloo",  # cross-process collectives on CPU
        }
    )
    cfg.pruning = pruning_config()  # pruning at initialisation (off unless pruning.method is set)
    # LoRA fine-tuning of a frozen pretrained model (wtjax.methods.lora_finetune.FinetuneHook); None: off.
    cfg.pretrained = config_dict.placeholder(str)  # local public-layout ViT .npz
    cfg.lora = None  # kind, rank, alpha, depth, density, seed, targets, train_base (configs/vtab_lora.py)
    cfg.tensorboard = True  # write TensorBoard event files to <workdir>/tensorboard
    cfg.progress = True  # print a progress line between log steps
    cfg.accounting = True  # print parameter/FLOP accounting at the end
    for key, value in overrides.items():
        if key not in cfg:
            raise KeyError(f"unknown config key {key!r}; keys are {sorted(cfg)}")
        cfg[key] = value
    return cfg


_TOP_LEVEL = frozenset(base_config(model={}, data={}, optim={}).keys())


def validate(config, num_classes: int | None = None) -> None:
    """Fail early, naming the key, on anything the training job would not use.

    Checks: no unknown top-level keys; the ``data`` and ``optim`` sections have exactly the known
    fields; ``grad_accum_steps`` is an int >= 1 dividing ``batch_size`` (the division over
    devices is checked by :func:`wtjax.job.parallel.check_batch_size`); the model builds from
    ``config.model`` (unknown fields, names and mask values fail in
    :func:`wtjax.models.build_model` / :class:`MaskSpec`).
    """
    unknown = sorted(set(config.keys()) - _TOP_LEVEL)
    if unknown:
        raise KeyError(f"unknown top-level config key(s) {unknown}; known keys are {sorted(_TOP_LEVEL)}")
    missing = sorted(_TOP_LEVEL - set(config.keys()))
    if missing:
        raise KeyError(f"config is missing key(s) {missing}; build it with wtjax.job.config.base_config")
    sections = (
        ("data", data_config("x")),
        ("optim", optim_config("adam", 0.0)),
        ("pruning", pruning_config()),
    )
    for section, reference in sections:
        extra = sorted(set(config[section].keys()) - set(reference.keys()))
        if extra:
            raise KeyError(f"unknown {section} field(s) {extra}; known: {sorted(reference.keys())}")
    accum = config.grad_accum_steps
    if isinstance(accum, bool) or not isinstance(accum, int) or accum < 1:
        raise ValueError(f"grad_accum_steps must be an integer >= 1, got {accum!r}")
    if config.batch_size % accum:
        raise ValueError(f"batch_size {config.batch_size} is not divisible by grad_accum_steps {accum}")
    build_model(config.model, num_classes if num_classes is not None else config.data.num_classes)
