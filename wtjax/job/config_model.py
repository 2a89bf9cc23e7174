"""``config.model``: the model section of a config, from and back to a registered model class.

:func:`model_config` fills the section from the class's dataclass fields (class defaults first,
so ``--config.model.<field>=...`` works for any plain field and a misspelt one fails);
:func:`model_from_config` builds the model the section describes. The mask is
``model.mask = dict(kind, density, n, m, seed)`` and becomes a :class:`wtjax.core.masks.MaskSpec`;
``num_classes`` is not configuration (it comes from the dataset).
"""

from __future__ import annotations

import dataclasses

from ml_collections import config_dict

from wtjax.core.masks import MaskSpec

MASK_FIELDS = ("kind", "density", "n", "m", "seed")
# Model fields that are not configuration: the number of classes comes from the dataset.
_FROM_DATA = ("num_classes",)
_TYPES = {"int": int, "float": float, "str": str, "bool": bool, "tuple": tuple}


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
            # A union (e.g. int | str): an object placeholder takes a value of any type, from
            # Python or the command line (which parses it as a literal: 4, True, sqrt).
            return config_dict.placeholder(object)
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


def _model_fields(model_config) -> tuple[str, dict]:
    """``(name, fields)`` of a model section, its ``mask`` made a :class:`MaskSpec` (checked)."""
    fields = model_config.to_dict() if hasattr(model_config, "to_dict") else dict(model_config)
    name = fields.pop("name")
    if "mask" in fields and fields["mask"] is not None:
        fields["mask"] = mask_spec(fields["mask"])
    return name, fields


def check_model_config(model_config) -> None:
    """Fail on an unknown model, field, mask field or value, or dtype, without building the model."""
    from wtjax import models

    name, fields = _model_fields(model_config)
    models.check_fields(name, fields)


def model_from_config(model_config, num_classes: int):
    """The model of ``config.model`` for a dataset with ``num_classes`` classes.

    Unlike :func:`wtjax.models.build_model` (keyword fields), this reads a config section: ``name``
    picks the registered class and ``mask`` (a dict) becomes a :class:`MaskSpec`.
    """
    from wtjax import models

    name, fields = _model_fields(model_config)
    return models.build_model(name, num_classes=num_classes, **fields)
