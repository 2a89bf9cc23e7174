"""The shape of a training config, shared by every file in ``configs/``: sections and defaults.

A config is an ``ml_collections.ConfigDict`` with these sections (each field is commented where
it is defined):

* top level (:func:`base_config`): seed, batch size, length of the run, logging/eval/checkpoint
  cadence, devices;
* ``model``: ``name`` plus **every** field of the registered model class
  (:mod:`wtjax.job.config_model`: :func:`model_config`, :func:`model_from_config`);
* ``data``: the fields of :data:`wtjax.data.fields.FIELDS` (their one definition, in the data
  layer that reads them), built by :func:`data_config`;
* ``optim``: the fields of :mod:`wtjax.job.optim`;
* ``pruning``, ``distributed``, ``pretrained``/``lora``.

Config files call ``base_config(model=..., data=..., optim=...)``, parse a short ``k=v,k=v``
argument with :func:`parse_arg`, and share the argument keys and model section of the weight-tied
families (:func:`tied_args`, :func:`tied_model_config`) and the paper's CIFAR-10 recipe
(:func:`paper_cifar_recipe`). :func:`load_config_file` is the one way to load a config file by
path; :func:`validate` rejects unknown or missing keys and fields.
"""

from __future__ import annotations

import ast
import importlib.util
import math
from pathlib import Path
from types import ModuleType

from ml_collections import config_dict

from wtjax.data.fields import data_config, read_data_config
from wtjax.job.config_model import MASK_FIELDS, check_model_config, model_config, model_from_config
from wtjax.job.steps import SOLVER_FAILURE_POLICIES

__all__ = [
    "MASK_FIELDS",
    "base_config",
    "data_config",
    "load_config_file",
    "load_config_module",
    "model_config",
    "model_from_config",
    "optim_config",
    "paper_cifar_recipe",
    "parse_arg",
    "pruning_config",
    "tied_args",
    "tied_model_config",
    "validate",
]


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


#: The configs shipped in the package (``wtjax/configs``; a path, not an import: configs sit above the job).
PACKAGED_CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def resolve_config(path: str | Path) -> Path:
    """``path`` if it names a file, else the packaged config of that name (``cifar_resnet`` or
    ``cifar_resnet.py``: :data:`PACKAGED_CONFIGS`), so a config is found from any folder.

    Raises:
      FileNotFoundError: neither exists (the message lists the packaged names).
    """
    path = Path(path)
    if path.is_file():
        return path
    packaged = PACKAGED_CONFIGS / path.with_suffix(".py").name
    if path.parent == Path(".") and packaged.is_file():
        return packaged
    names = sorted(p.stem for p in PACKAGED_CONFIGS.glob("*.py") if p.stem != "__init__")
    raise FileNotFoundError(
        f"no config file {str(path)!r}, and no packaged config of that name (packaged: {names})"
    )


def load_config_module(path) -> ModuleType:
    """The config file at ``path`` (or the packaged config of that name, :func:`resolve_config`) as
    a module (config files are loaded by path, not as a package)."""
    path = resolve_config(path)
    spec = importlib.util.spec_from_file_location(f"_wtjax_config_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def load_config_file(path, arg: str | None = None) -> config_dict.ConfigDict:
    """``get_config(arg)`` of the config file at ``path`` (e.g. ``configs/cifar_resnet.py``, or the
    packaged name ``cifar_resnet``)."""
    return load_config_module(path).get_config(arg or None)


def tied_args(**overrides) -> dict:
    """Config-argument defaults of a weight-tied family (``form, mask_mode, density, mask_kind``).

    For a config file's ``ARGS``; ``overrides`` change these defaults (e.g. ``density=0.9``).
    """
    args = dict(
        form="tied",  # tied | not_tied (| shared in the families that have it)
        mask_mode="multi",  # dense | same | multi | dropout
        density=0.5,  # fraction of each tied kernel kept
        mask_kind="unstructured",  # unstructured | nm (2:4)
    )
    unknown = set(overrides) - set(args)
    if unknown:
        raise KeyError(f"unknown tied argument(s) {sorted(unknown)}; tied arguments are {sorted(args)}")
    return args | overrides


def tied_model_config(name: str, args, **fields) -> config_dict.ConfigDict:
    """``config.model`` of a weight-tied family from parsed :func:`tied_args` values plus ``fields``."""
    mask = dict(kind=args.mask_kind, density=args.density)
    return model_config(name, form=args.form, mask_mode=args.mask_mode, mask=mask, **fields)


def paper_cifar_recipe() -> dict:
    """``data``, ``optim`` and ``batch_size`` of the paper's CIFAR-10 recipe, for :func:`base_config`.

    Adam, peak lr 1e-3, cosine schedule, weight decay 2.5e-6 (L2), batch 128; random crop + flip
    and the CIFAR statistics (``mean``/``std`` None).
    """
    return dict(
        data=data_config("cifar10", augment=True),
        optim=optim_config("adam", 1e-3, schedule="cosine", weight_decay=2.5e-6),
        batch_size=128,
    )


def deq_optim(phantom: bool) -> config_dict.ConfigDict:
    """``config.optim`` of the DEQ papers' recipes: SGD lr 0.2, weight decay 1e-4 for the
    phantom-gradient DEQ; otherwise the paper's Adam (lr 1e-3, weight decay 2.5e-6). Both cosine."""
    if phantom:
        return optim_config("sgd", 0.2, schedule="cosine", weight_decay=1e-4)
    return optim_config("adam", 1e-3, schedule="cosine", weight_decay=2.5e-6)


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
    cfg.checkpoint_every_steps = 1000  # periodic checkpoints; 0: only the final step (always saved)
    cfg.keep_checkpoints = 2  # how many checkpoints to keep
    # A failed solve (a model metric *_nonconverged or *_diverged > 0, e.g. a DEQ's): 'log' (count it
    # in train/solver_failed_steps and train on), 'skip' (also leave the step's update out) or 'stop'.
    cfg.solver_failure = "log"
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
    # Resume even though fields that change the run differ from the workdir's config.json
    # (wtjax.job.resume; the changes are recorded in <workdir>/config_history.jsonl).
    cfg.resume_despite_changes = False
    cfg.tensorboard = True  # write TensorBoard event files to <workdir>/tensorboard
    cfg.progress = True  # progress bars (train, eval) with rate and ETA on stderr (tqdm)
    cfg.accounting = True  # print parameter/FLOP accounting at the end
    cfg.plots = True  # <workdir>/curves.png (loss, eval accuracy, learning rate) at each evaluation
    for key, value in overrides.items():
        if key not in cfg:
            raise KeyError(f"unknown config key {key!r}; keys are {sorted(cfg)}")
        cfg[key] = value
    return cfg


_TOP_LEVEL = frozenset(base_config(model={}, data={}, optim={}).keys())


def validate(config) -> None:
    """Fail early, naming the key, on anything the training job would not use.

    Checks: no unknown or missing top-level keys; the ``data`` section is complete with no unknown
    fields (:func:`wtjax.data.fields.read_data_config`); ``optim`` and ``pruning`` have no unknown
    fields; the batch sizes, run length and cadences are integers in range (``batch_size``,
    ``eval_batch_size``, ``num_train_steps``, ``log_every_steps``, ``keep_checkpoints`` ... >= 1,
    ``eval_every_steps`` and ``checkpoint_every_steps`` >= 0, ``num_epochs`` > 0 unless
    ``num_train_steps`` is set); ``grad_accum_steps`` divides ``batch_size`` (the division over
    devices is checked by :func:`wtjax.job.parallel.check_batch_size`); ``solver_failure`` is a
    policy of :data:`wtjax.job.steps.SOLVER_FAILURE_POLICIES`; ``config.model`` names a
    registered model and only its fields, with valid mask values and dtype
    (:func:`~wtjax.job.config_model.check_model_config`; the job builds the model once, when
    the dataset's number of classes is known, and the model checks its own values then).
    """
    unknown = sorted(set(config.keys()) - _TOP_LEVEL)
    if unknown:
        raise KeyError(f"unknown top-level config key(s) {unknown}; known keys are {sorted(_TOP_LEVEL)}")
    missing = sorted(_TOP_LEVEL - set(config.keys()))
    if missing:
        raise KeyError(f"config is missing key(s) {missing}; build it with wtjax.job.config.base_config")
    read_data_config(config.data)
    sections = (
        ("optim", optim_config("adam", 0.0)),
        ("pruning", pruning_config()),
    )
    for section, reference in sections:
        extra = sorted(set(config[section].keys()) - set(reference.keys()))
        if extra:
            raise KeyError(f"unknown {section} field(s) {extra}; known: {sorted(reference.keys())}")
    _check_run_numbers(config)
    accum = config.grad_accum_steps
    if config.batch_size % accum:
        raise ValueError(f"batch_size {config.batch_size} is not divisible by grad_accum_steps {accum}")
    if config.solver_failure not in SOLVER_FAILURE_POLICIES:
        raise ValueError(
            f"solver_failure must be one of {SOLVER_FAILURE_POLICIES}, got {config.solver_failure!r}"
        )
    check_model_config(config.model)


# The run's integer fields: (key, smallest allowed value, whether None is allowed). Checked before
# anything runs: a bad value here would otherwise fail late (after compiling, at the first
# evaluation or the final save) or be silently replaced by a default.
_RUN_INTEGERS = (
    ("batch_size", 1, False),
    ("grad_accum_steps", 1, False),
    ("eval_batch_size", 1, True),
    ("num_train_steps", 1, True),
    ("log_every_steps", 1, False),
    ("eval_every_steps", 0, True),
    ("checkpoint_every_steps", 0, False),
    ("keep_checkpoints", 1, False),
    ("num_devices", 1, True),
)


def _check_run_numbers(config) -> None:
    """The run's lengths, batch sizes and cadences are in range (one-line errors naming the key)."""
    for key, low, optional in _RUN_INTEGERS:
        value = config[key]
        if value is None and optional:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            allowed = f"an integer >= {low}" + (" or None" if optional else "")
            raise ValueError(f"{key} must be {allowed}, got {value!r}")
    epochs = config.num_epochs
    if config.num_train_steps is None and (
        isinstance(epochs, bool) or not isinstance(epochs, (int, float)) or not 0 < epochs < math.inf
    ):
        raise ValueError(f"num_epochs must be a number > 0 (or set num_train_steps), got {epochs!r}")
