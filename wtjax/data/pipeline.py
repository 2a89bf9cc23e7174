"""Input pipeline: ``create_dataset(config.data, seed=...)`` -> :class:`Dataset`.

Sources (``data_config.name``):

- ``digits``: scikit-learn's bundled 8x8 digits at 16x16x1, fixed 1,500/297 split; no download.
- ``cifar10``: ``data_dir=None`` uses tfds; a path is a local copy, auto-detected as the official
  binary release, the python-pickle release (needs ``allow_pickle=True``), a prepared tfds
  data_dir, or a class-folder tree ``<dir>/<class>/*.jpg`` (train only: set ``holdout``).
- ``imagenet32``: tfds ``imagenet_resized/32x32`` (``data_dir`` is the tfds data_dir).
- ``image_folder``: any ``<dir>/<class>/*`` tree (``data_dir`` required), optionally with
  ``<dir>/train`` and ``<dir>/test`` splits.
- ``synthetic``: class prototypes plus noise, sized by config fields.

Images stay uint8 in memory; each batch is gathered, augmented (vectorised NumPy) and normalised
to float32 on the fly. See :mod:`wtjax.data.dataset` for the determinism contract.
"""

from __future__ import annotations

import logging
import os
from typing import Any

from wtjax.data import builtin, cifar_files, image_folder, sources, tfds_source
from wtjax.data.dataset import Dataset, make_dataset
from wtjax.data.sources import DataError

NAMES = ("digits", "cifar10", "imagenet32", "image_folder", "synthetic")

# Statistics of the JPEG-recompressed class-folder copy (../shared/data/README.md) and of the
# original release (the usual published values); ImageNet's standard values for the rest.
CIFAR_COPY_STATS = ((0.4913, 0.4821, 0.4465), (0.2452, 0.2428, 0.2606))
CIFAR_STATS = ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616))
IMAGENET_STATS = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))

__all__ = ["NAMES", "DataError", "Dataset", "create_dataset"]


def _field(cfg: Any, name: str, default: Any = None) -> Any:
    """Reads ``cfg.name`` from a ConfigDict, dataclass, namespace or dict; ``default`` if absent/None."""
    if isinstance(cfg, dict):
        value = cfg.get(name, default)
    else:
        value = getattr(cfg, name, default)
    return default if value is None else value


def _load_cifar10(data_dir: str | None, cfg: Any):
    """Returns ``(train, test, num_classes, stats, description, test_name)`` for CIFAR-10."""
    if data_dir is None:
        train, test, k, test_name = tfds_source.load_tfds(
            "cifar10", None, download=_field(cfg, "download", True)
        )
        return train, test, k, CIFAR_STATS, "tfds cifar10", test_name
    if not os.path.isdir(data_dir):
        raise DataError(f"cifar10 data_dir {data_dir!r} does not exist or is not a directory")
    found = cifar_files.find_release(data_dir)
    if found is not None:
        kind, directory = found
        train, test = cifar_files.load_release(
            kind, directory, allow_pickle=_field(cfg, "allow_pickle", False)
        )
        return train, test, 10, CIFAR_STATS, f"CIFAR-10 {kind} release {directory}", "test"
    if os.path.isdir(os.path.join(data_dir, "cifar10")):  # a prepared tfds data_dir
        train, test, k, test_name = tfds_source.load_tfds("cifar10", data_dir, download=False)
        return train, test, k, CIFAR_STATS, f"tfds cifar10 in {data_dir}", test_name
    train_dir, test_dir = image_folder.split_dirs(data_dir)
    classes = image_folder.subdirs(train_dir)
    if not classes:
        raise DataError(
            f"no CIFAR-10 copy found in {data_dir!r}: expected data_batch_1.bin..test_batch.bin (binary "
            "release, possibly in cifar-10-batches-bin/), data_batch_1..test_batch (python release, "
            "needs allow_pickle=True), a tfds data_dir holding cifar10/, or class folders "
            "<dir>/<class>/*.jpg|png"
        )
    if len(classes) != cifar_files.NUM_CLASSES:  # checked before decoding anything
        raise DataError(f"{train_dir!r} has {len(classes)} class folders {classes}; CIFAR-10 needs 10")
    train, test, _ = _load_folders(train_dir, test_dir, cfg, cifar_files.IMAGE_SHAPE)
    return train, test, 10, CIFAR_COPY_STATS, f"class folders {train_dir}", "test"


def _load_folders(train_dir: str, test_dir: str | None, cfg: Any, shape):
    kwargs = dict(expected_shape=shape, cache_dir=_field(cfg, "cache_dir"), workers=_field(cfg, "workers"))
    classes, train = image_folder.load_split(train_dir, **kwargs)
    test = None
    if test_dir is not None:
        test_classes, test = image_folder.load_split(
            test_dir, **{**kwargs, "expected_shape": train.image_shape}
        )
        if test_classes != classes:
            raise DataError(
                f"class folders differ between {train_dir!r} {classes} and {test_dir!r} {test_classes}"
            )
    return train, test, classes


def create_dataset(data_config: Any, *, seed: int, process_index: int = 0, process_count: int = 1) -> Dataset:
    """Builds the dataset described by ``data_config``.

    Args:
      data_config: ConfigDict (or anything with attribute access, or a dict). Fields (absent or
        None means the default in brackets):

        - ``name``: one of :data:`NAMES`.
        - ``data_dir`` [None]: local copy / tfds data_dir (see the module docstring).
        - ``allow_pickle`` [False]: load the python-pickle CIFAR-10 release.
        - ``holdout`` [0]: evaluate on the last N training examples after a fixed seed-0 shuffle.
        - ``train_subset`` / ``eval_subset`` [None]: keep only the first N examples.
        - ``downsample`` [1]: average-pool images by this integer factor (2: 32x32 -> 16x16;
          the CPU scale of the studies in experiments/). Normalisation statistics are unchanged
          (pooling keeps the per-channel mean).
        - ``augment`` [False]: random crop with zero padding, plus horizontal flip.
        - ``crop_padding`` [image height / 8: 4 for 32x32, 2 for the 16x16 digits].
        - ``flip`` [True; digits False].
        - ``mean``, ``std`` [dataset statistics]: per channel, on the [0, 1] scale.
        - ``download`` [True]: let tfds prepare missing data (needs TensorFlow and internet).
        - ``cache_dir`` [``$WTJAX_CACHE_DIR`` or ~/.cache/wtjax; '' disables]: decoded images.
        - ``workers`` [min(8, cpus)]: image decoding threads.
        - synthetic only: ``num_classes`` [10], ``image_shape`` [(8, 8, 3)], ``num_train`` [256],
          ``num_eval`` [64], ``data_seed`` [0].
      seed: run seed: epoch order and augmentation (never the holdout split or synthetic data).
      process_index, process_count: this process among the data-loading processes
        (``jax.process_index()``, ``jax.process_count()``).

    Returns:
      A :class:`Dataset`.

    Raises:
      ValueError: unknown name or inconsistent fields. DataError (a ValueError): missing,
        corrupt or mismatched data, or data that cannot be prepared here.
    """
    name = _field(data_config, "name")
    if str(name).startswith("vtab/"):  # 'vtab/<task>' or 'vtab/<task>/val' (wtjax/data/vtab.py)
        from wtjax.data import vtab

        return vtab.from_data_config(
            data_config, seed=seed, process_index=process_index, process_count=process_count
        )
    if name not in NAMES:
        raise ValueError(f"unknown dataset name {name!r}; choose one of {list(NAMES)}")
    data_dir = _field(data_config, "data_dir")
    data_dir = os.path.expanduser(str(data_dir)) if data_dir is not None else None
    flip, test_name = True, "test"

    if name == "digits":
        train, test = builtin.load_digits()
        num_classes, stats, source = 10, builtin.pixel_stats(train, test), "scikit-learn digits"
        flip = False  # a mirrored digit is another symbol (or none): crop only
    elif name == "cifar10":
        train, test, num_classes, stats, source, test_name = _load_cifar10(data_dir, data_config)
    elif name == "imagenet32":
        train, test, num_classes, test_name = tfds_source.load_tfds(
            "imagenet32", data_dir, download=_field(data_config, "download", True)
        )
        stats, source = IMAGENET_STATS, "tfds imagenet_resized/32x32"
    elif name == "image_folder":
        if data_dir is None:
            raise ValueError("image_folder needs data_dir=<dir> holding <dir>/<class>/*.jpg|png")
        train_dir, test_dir = image_folder.split_dirs(data_dir)
        train, test, classes = _load_folders(train_dir, test_dir, data_config, None)
        num_classes, stats, source = len(classes), IMAGENET_STATS, f"class folders {train_dir}"
    else:  # synthetic
        train, test = builtin.make_synthetic(
            num_classes=int(_field(data_config, "num_classes", 10)),
            image_shape=tuple(_field(data_config, "image_shape", (8, 8, 3))),
            num_train=int(_field(data_config, "num_train", 256)),
            num_eval=int(_field(data_config, "num_eval", 64)),
            data_seed=int(_field(data_config, "data_seed", 0)),
        )
        num_classes, stats, source = (
            int(_field(data_config, "num_classes", 10)),
            builtin.pixel_stats(train),
            "synthetic",
        )

    factor = int(_field(data_config, "downsample", 1))
    if factor != 1:
        train = sources.Downsampled(train, factor)
        test = sources.Downsampled(test, factor) if test is not None else None
    mean = tuple(_field(data_config, "mean", stats[0]))
    std = tuple(_field(data_config, "std", stats[1]))
    # The usual CIFAR recipe pads 4 pixels on 32x32 images; keep that ratio (H / 8) on other sizes
    # (16x16 digits: 2; 8x8 synthetic: 1) so tiny images are not mostly black padding.
    crop_padding = max(1, round(train.image_shape[0] / 8))
    channels = train.image_shape[-1]
    if len(mean) != channels or len(std) != channels:
        raise ValueError(f"{name}: images have {channels} channels but mean={mean}, std={std}")
    ds = make_dataset(
        name,
        train=train,
        test=test,
        num_classes=num_classes,
        mean=mean,
        std=std,
        seed=seed,
        holdout=int(_field(data_config, "holdout", 0)),
        train_subset=_field(data_config, "train_subset"),
        eval_subset=_field(data_config, "eval_subset"),
        augment=bool(_field(data_config, "augment", False)),
        crop_padding=int(_field(data_config, "crop_padding", crop_padding)),
        flip=bool(_field(data_config, "flip", flip)),
        process_index=process_index,
        process_count=process_count,
        test_name=test_name,
    )
    logging.info(
        "dataset %s from %s: %d train, %d eval (%s), images %s, %d classes",
        name,
        source,
        ds.num_train,
        ds.num_eval,
        ds.eval_split,
        ds.image_shape,
        ds.num_classes,
    )
    return ds
