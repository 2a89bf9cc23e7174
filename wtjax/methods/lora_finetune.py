"""Parameter-efficient fine-tuning of a frozen pretrained model with (multi-mask) LoRA.

Two ways to hold the parameters, both supported:

1. **Trainable-only state (recommended for a training loop).** The train state holds only the
   trainable tree ``{'lora': ..., 'base': {<trained base leaves, e.g. the new head>}}``; the
   frozen pretrained params are a separate constant passed to the step. The optimizer state and
   every checkpoint then contain only trainable parameters (0.29M + head for ViT-B/16 rank 8,
   instead of 86M), and the frozen weights cannot change by construction::

       ft = LoraFinetune(LoraSpec(kind='multi_mask', rank=8, depth=2))
       trainable = ft.init(key, base)                    # base: load_pretrained(...)
       def loss(trainable, base, batch):
           logits, _ = model.apply({'params': ft.effective(base, trainable)}, batch['image'], train=True)
           ...
       # checkpoint `trainable` (and the optimizer state); on restore, reload `base` from the .npz.

2. **One combined tree + optax masking.** ``params = ft.combined(base, trainable)`` (``{'base':
   all base params, 'lora': ...}``), ``tx = ft.masked_optimizer(tx)`` (optax.multi_transform:
   ``tx`` for trainable leaves, ``optax.set_to_zero()`` for frozen ones, so frozen leaves get
   zero updates and no optimizer state), ``ft.trainable(params)`` extracts what to checkpoint.
"""

from __future__ import annotations

import dataclasses
import os
import re
from typing import TYPE_CHECKING, Any

import jax
import numpy as np
from flax import traverse_util

from wtjax.methods.lora import LoraSpec, init_lora, lora_view, merge

if TYPE_CHECKING:  # the library needs only jax, flax and numpy; optax comes with the optimizer passed in
    import optax

TRAINABLE, FROZEN = "trainable", "frozen"


@dataclasses.dataclass(frozen=True)
class LoraFinetune:
    """LoRA adapters plus a set of base parameters that are trained in full (the new head).

    Attributes:
      spec: the adapters (:class:`wtjax.methods.lora.LoraSpec`).
      train_base: regex searched in each base parameter's ``'/'``-joined path; matches are
        trained in full (default: the classifier ``head``, reinitialised for the new task).
        ``''`` trains LoRA parameters only.
    """

    spec: LoraSpec
    train_base: str = r"^head/"

    def _trains(self, path) -> bool:
        return bool(self.train_base) and re.search(self.train_base, "/".join(path)) is not None

    def init(self, key: jax.Array, base_params) -> dict:
        """The initial trainable tree ``{'lora': adapters, 'base': trained base leaves}``."""
        flat = traverse_util.flatten_dict(base_params)
        trained = {p: v for p, v in flat.items() if self._trains(p)}
        return {"lora": init_lora(key, base_params, self.spec), "base": traverse_util.unflatten_dict(trained)}

    def _overlay(self, base_params, trained_base):
        flat = traverse_util.flatten_dict(base_params)
        for p, v in traverse_util.flatten_dict(trained_base).items():
            if p not in flat:
                raise KeyError(f"trained base parameter '{'/'.join(p)}' is not in the base params")
            flat[p] = v
        return traverse_util.unflatten_dict(flat)

    def effective(self, base_params, trainable):
        """The params the model runs with: trained base leaves overlaid, then LoRA applied."""
        return lora_view(self._overlay(base_params, trainable["base"]), trainable["lora"], self.spec)

    def merged(self, base_params, trainable):
        """Plain numpy params with the adapters folded in, for inference or export."""
        return merge(self._overlay(base_params, trainable["base"]), trainable["lora"], self.spec)

    # ------------------------------------------------------------ combined tree + optax masking
    def combined(self, base_params, trainable) -> dict:
        """``{'base': base with trained leaves overlaid, 'lora': adapters}`` (layout 2)."""
        return {"base": self._overlay(base_params, trainable["base"]), "lora": trainable["lora"]}

    def labels(self, params) -> dict:
        """``'trainable'`` / ``'frozen'`` per leaf of a combined tree."""
        flat = traverse_util.flatten_dict(params)
        out = {p: TRAINABLE if p[0] == "lora" or self._trains(p[1:]) else FROZEN for p in flat}
        return traverse_util.unflatten_dict(out)

    def trainable_mask(self, params) -> dict:
        """Boolean tree: True for the leaves of a combined tree that are trained."""
        return jax.tree.map(lambda label: label == TRAINABLE, self.labels(params))

    def masked_optimizer(self, tx: optax.GradientTransformation) -> optax.GradientTransformation:
        """``tx`` on trainable leaves; ``set_to_zero`` (no state, zero update) on frozen ones."""
        import optax  # lazy: only this method needs it, and ``tx`` is already an optax transformation

        return optax.multi_transform({TRAINABLE: tx, FROZEN: optax.set_to_zero()}, self.labels)

    def trainable(self, params) -> dict:
        """The trainable tree (what to checkpoint) of a combined tree."""
        flat = traverse_util.flatten_dict(params["base"])
        base = {p: v for p, v in flat.items() if self._trains(p)}
        return {"lora": params["lora"], "base": traverse_util.unflatten_dict(base)}


def num_params(tree) -> int:
    """Total number of entries in a parameter tree."""
    return sum(int(np.prod(np.shape(x))) for x in jax.tree.leaves(tree))


def from_config(lora_config) -> LoraFinetune:
    """A :class:`LoraFinetune` from ``config.lora`` (fields of ``configs/vtab_lora.py``)."""
    fields = dict(lora_config)
    train_base = fields.pop("train_base", r"^head/")
    known = {f.name for f in dataclasses.fields(LoraSpec)}
    unknown = sorted(set(fields) - known)
    if unknown:
        raise ValueError(f"unknown config.lora field(s) {unknown}; known: {sorted(known | {'train_base'})}")
    if "input_ndims" in fields:
        fields["input_ndims"] = tuple(tuple(x) for x in fields["input_ndims"])
    return LoraFinetune(LoraSpec(**fields), train_base=train_base)


@dataclasses.dataclass(frozen=True)
class FinetuneHook:
    """Fine-tuning a pretrained ViT with (multi-mask) LoRA in the training job.

    Implements :class:`wtjax.job.hooks.TrainHook`: the state's params are only the trainable tree
    (layout 1 of the module docstring), the frozen base is every step's extra argument and the
    model runs with :meth:`effective` of both. Built from a config with ``config.lora`` (see
    ``configs/vtab_lora.py``) and ``config.pretrained`` (a local public-layout ``.npz``)::

        hook = FinetuneHook.from_config(config)             # None: ordinary training
        hook = hook.loaded(num_classes, image_shape, key)   # on every (re)start
        logits, out = model.apply({'params': hook.effective(hook.base, params)}, images, ...)

    Attributes:
      finetune: the adapters and trained base leaves.
      pretrained: path of the checkpoint.
      model_fields: the ViT fields of ``config.model`` (without ``name``/``num_classes``).
      base: the frozen pretrained params (:meth:`loaded`; ``None`` before).
      trainable: the initial trainable tree (:meth:`loaded`; ``None`` before).
    """

    finetune: LoraFinetune
    pretrained: str = ""
    model_fields: dict = dataclasses.field(default_factory=dict)
    base: Any = None
    trainable: Any = None
    trains_model_params = False  # the state holds adapters and head, not the model's params

    @classmethod
    def from_config(cls, config) -> FinetuneHook | None:
        """The hook of ``config``, or ``None`` if ``config`` has no (or a ``None``) ``lora`` section."""
        lora = config.get("lora") if hasattr(config, "get") else None
        if lora is None:
            return None
        pretrained = config.get("pretrained")
        if not pretrained:
            raise ValueError(
                "config.lora is set but config.pretrained is not: pass the local .npz checkpoint, e.g. "
                "--config.pretrained=/path/to/ViT-B_16.npz"
            )
        fields = config.model.to_dict() if hasattr(config.model, "to_dict") else dict(config.model)
        if fields.pop("name", None) != "vit":
            raise ValueError("LoRA fine-tuning loads public ViT checkpoints: config.model.name must be 'vit'")
        fields.pop("num_classes", None)
        return cls(from_config(lora), os.path.expanduser(str(pretrained)), fields)

    def base_params(self, num_classes: int, image_shape, rng: jax.Array | None = None):
        """The frozen pretrained params (numpy): head reinitialised for ``num_classes``,
        position embeddings resized to ``image_shape``'s grid."""
        from wtjax.models.vit_checkpoint import load_pretrained  # lazy: scipy for the resize

        return load_pretrained(
            self.pretrained,
            {**self.model_fields, "num_classes": num_classes},
            image_size=int(image_shape[0]),
            rng=rng,
        )

    def loaded(self, num_classes: int, image_shape, key: jax.Array) -> FinetuneHook:
        """This hook with :attr:`base` (new head from ``key``) and :attr:`trainable` (from ``key``)."""
        base = self.base_params(num_classes, image_shape, rng=key)
        return dataclasses.replace(self, base=base, trainable=self.init(key, base))

    def init(self, key: jax.Array, base_params) -> dict:
        return self.finetune.init(key, base_params)

    def effective(self, base_params, trainable):
        return self.finetune.effective(base_params, trainable)

    # ------------------------------------------------------------- wtjax.job.hooks.TrainHook
    def init_state(self, state):
        return state.replace(params=self.trainable)

    def frozen(self):
        return self.base

    def variables(self, variables: dict, state, frozen) -> dict:
        return {**variables, "params": self.effective(frozen, variables["params"])}

    def describe(self, base_params=None, trainable=None) -> str:
        base_params = self.base if base_params is None else base_params
        trainable = self.trainable if trainable is None else trainable
        spec = self.finetune.spec
        return (
            f"LoRA fine-tuning ({spec.kind}, rank {spec.rank}, depth {spec.depth}, density {spec.density}): "
            f"{num_params(trainable['lora']):,} adapter + {num_params(trainable['base']):,} head parameters "
            f"trained; {num_params(base_params):,} frozen from {self.pretrained}"
        )

    def summary(self) -> dict:
        return {}
