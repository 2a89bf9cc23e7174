"""The fields of ``config.data``: their one definition (name, default, meaning) and their check.

:data:`FIELDS` is the only place a data field or its default is written down. The job's configs
build ``config.data`` with :func:`data_config` (re-exported by :mod:`wtjax.job.config`), and
:func:`wtjax.data.pipeline.create_dataset` accepts only a complete section
(:func:`read_data_config`): a missing field is an error naming it, never a default chosen by a
loader. The table of these fields in docs/data.md is checked against :data:`FIELDS` by
``tests/test_docs.py``.

A few fields mean "the dataset's own value" when None (``mean``/``std``: the loader's
statistics, ``flip``: False for digits, ``crop_padding``: image height / 8); that choice is the
loader's, documented here.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from typing import Any

import numpy as np
from ml_collections import config_dict

#: Environment variable read when ``data_dir`` is None (documented in docs/data.md).
DATA_DIR_ENV = "WTJAX_DATA_DIR"


@dataclasses.dataclass(frozen=True)
class Field:
    """One field of ``config.data``.

    Attributes:
      name: the key.
      default: its value in a new config; None becomes a placeholder of type ``kind``, so
        ``--config.data.<name>=...`` can still set it on a locked config.
      doc: what it means (the table in docs/data.md shows this text).
      kind: the type of a None default.
    """

    name: str
    default: Any
    doc: str
    kind: type | None = None

    def config_value(self):
        """The value this field starts with in a new ``config.data``."""
        return config_dict.placeholder(self.kind) if self.default is None else self.default


FIELDS: tuple[Field, ...] = (
    Field("name", None, "digits, cifar10, imagenet32, image_folder, synthetic, `vtab/<task>[/val]`", str),
    Field(
        "data_dir",
        None,
        f"local copy or tfds data_dir; None: ${DATA_DIR_ENV} if set, else tfds' default (cifar10, "
        "imagenet32, vtab)",
        str,
    ),
    Field("allow_pickle", False, "load the python-pickle CIFAR-10 release (unpickling can run code)"),
    Field("holdout", 0, "> 0: the last N training examples after a fixed seed-0 shuffle are the eval split"),
    Field("train_subset", None, "keep the first N training examples after the fixed shuffle; None: all", int),
    Field("eval_subset", None, "evaluate on a fixed random N of the eval split; None: all", int),
    Field(
        "downsample",
        1,
        "average-pool every image by this integer factor as it is read (2: 32x32 -> 16x16); "
        "normalisation statistics unchanged",
    ),
    Field("augment", True, "random crop with zero padding, then a horizontal flip (if `flip`)"),
    Field("crop_padding", None, "crop padding in pixels; None: image height / 8 (4 for 32x32)", int),
    Field(
        "flip",
        None,
        "flip when augmenting; None: True, except digits (a mirrored digit is another symbol)",
        bool,
    ),
    Field("download", True, "let tfds download and prepare missing data (False: fail fast offline)"),
    Field(
        "cache_dir",
        None,
        "decoded image-folder cache; None: $WTJAX_CACHE_DIR or ~/.cache/wtjax; '': off",
        str,
    ),
    Field("workers", None, "image decoding threads; None: min(8, CPUs)", int),
    Field("mean", None, "per-channel mean on the [0, 1] scale; None: the dataset's statistics", tuple),
    Field("std", None, "per-channel std on the [0, 1] scale; None: the dataset's statistics", tuple),
    Field("num_classes", 10, "synthetic: number of classes"),
    Field("image_shape", (8, 8, 3), "synthetic: (H, W, C); vtab: the resize target (its height)"),
    Field("num_train", 256, "synthetic: training examples"),
    Field("num_eval", 64, "synthetic: eval examples"),
    Field("data_seed", 0, "synthetic: the data's content (independent of the run seed)"),
)
NAMES = tuple(f.name for f in FIELDS)


def data_config(name: str, **overrides) -> config_dict.ConfigDict:
    """``config.data`` for dataset ``name``: every field of :data:`FIELDS`, defaults first.

    Raises:
      KeyError: an unknown field.
    """
    cfg = config_dict.ConfigDict({f.name: name if f.name == "name" else f.config_value() for f in FIELDS})
    for key, value in overrides.items():
        if key not in cfg:
            raise KeyError(f"unknown data field {key!r}; data fields are {sorted(NAMES)}")
        cfg[key] = value
    return cfg


def read_data_config(data_config: Any) -> dict[str, Any]:
    """The fields of a complete ``config.data`` (ConfigDict or mapping) as a plain dict.

    Raises:
      KeyError: missing or unknown fields (named); build the section with :func:`data_config`.
      TypeError: a boolean field (``allow_pickle``, ``augment``, ``download``, ``flip``) holding
        anything but a bool (``flip`` may be None); a string such as ``"false"`` is not coerced.
    """
    if not isinstance(data_config, (Mapping, config_dict.ConfigDict)):
        raise TypeError(f"config.data must be a ConfigDict or a mapping, got {type(data_config).__name__}")
    values = {key: data_config[key] for key in data_config.keys()}  # resolves placeholders
    missing = [n for n in NAMES if n not in values]
    if missing:
        raise KeyError(
            f"config.data is missing field(s) {missing}; build it with wtjax.data.fields.data_config "
            "(the job's configs do) so every field has its one default"
        )
    unknown = sorted(set(values) - set(NAMES))
    if unknown:
        raise KeyError(f"unknown data field(s) {unknown}; data fields are {sorted(NAMES)}")
    _check_booleans(values)
    return values


def _check_booleans(values: Mapping[str, Any]) -> None:
    """Boolean fields must hold real booleans: ``bool("false")`` is True, so nothing is coerced."""
    for f in FIELDS:
        if not (isinstance(f.default, bool) or f.kind is bool):
            continue
        value = values[f.name]
        if isinstance(value, (bool, np.bool_)) or (value is None and f.default is None):
            continue
        allowed = "True, False or None" if f.default is None else "True or False"
        raise TypeError(f"config.data.{f.name} must be {allowed}, got {value!r} ({type(value).__name__})")


def resolve_data_dir(fields: Mapping[str, Any]) -> str | None:
    """``data_dir``, else ``$WTJAX_DATA_DIR``, with ``~`` expanded; None if neither is set."""
    data_dir = fields["data_dir"] or os.environ.get(DATA_DIR_ENV) or None
    return os.path.expanduser(str(data_dir)) if data_dir is not None else None
