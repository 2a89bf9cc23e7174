"""The dataset loaders: ``config.data.name`` -> a function returning the dataset's :class:`Splits`.

:data:`LOADERS` is the registry :func:`wtjax.data.pipeline.create_dataset` dispatches through.
Each loader reads the complete data fields (:func:`wtjax.data.fields.read_data_config`) it needs
and returns the sources plus its normalisation statistics (the constants beside it):

- ``digits``: scikit-learn's bundled 8x8 digits at 16x16x1, fixed 1,500/297 split; no download.
- ``cifar10``: no ``data_dir``: tfds; a path: a local copy, auto-detected as the official binary
  release, the python-pickle release (needs ``allow_pickle``), a prepared tfds data_dir, or a
  class-folder tree ``<dir>/<class>/*.jpg`` (train only: set ``holdout``).
- ``imagenet32``: tfds ``imagenet_resized/32x32`` (``data_dir`` is the tfds data_dir).
- ``image_folder``: any ``<dir>/<class>/*`` tree (``data_dir`` required), optionally with
  ``<dir>/train`` and ``<dir>/test`` splits.
- ``synthetic``: class prototypes plus noise, sized by config fields.
- ``vtab``: ``vtab/<task>`` or ``vtab/<task>/val``, the VTAB-1k protocol (:mod:`wtjax.data.vtab`).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from typing import Any

from wtjax.data import builtin, cifar_files, image_folder, tfds_source, vtab
from wtjax.data.fields import resolve_data_dir
from wtjax.data.sources import DataError, Splits

Fields = Mapping[str, Any]

# CIFAR-10: the usual published statistics of the original release (tfds and the official files),
# and those measured through this pipeline on the JPEG-recompressed class-folder copy.
CIFAR_STATS = ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616))
CIFAR_COPY_STATS = ((0.4913, 0.4821, 0.4465), (0.2452, 0.2428, 0.2606))
# ImageNet's standard values: ImageNet-32 and arbitrary image folders.
IMAGENET_STATS = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))


def load_digits(fields: Fields) -> Splits:
    """scikit-learn's digits, their own pixel statistics; no flip (a mirrored digit is another symbol)."""
    train, test = builtin.load_digits()
    return Splits(train, test, 10, builtin.pixel_stats(train, test), "scikit-learn digits", flip=False)


def load_synthetic(fields: Fields) -> Splits:
    """Class prototypes plus noise (``num_classes, image_shape, num_train, num_eval, data_seed``)."""
    num_classes = int(fields["num_classes"])
    train, test = builtin.make_synthetic(
        num_classes=num_classes,
        image_shape=tuple(fields["image_shape"]),
        num_train=int(fields["num_train"]),
        num_eval=int(fields["num_eval"]),
        data_seed=int(fields["data_seed"]),
    )
    return Splits(train, test, num_classes, builtin.pixel_stats(train), "synthetic")


def load_imagenet32(fields: Fields) -> Splits:
    """tfds ``imagenet_resized/32x32`` in ``data_dir`` (None: tfds' default)."""
    train, test, k, test_name = tfds_source.load_tfds(
        "imagenet32", resolve_data_dir(fields), download=bool(fields["download"])
    )
    return Splits(train, test, k, IMAGENET_STATS, "tfds imagenet_resized/32x32", test_name)


def load_image_folder(fields: Fields) -> Splits:
    """A ``<dir>/<class>/*`` tree (or ``<dir>/{train,test}/<class>/*``) in ``data_dir``."""
    data_dir = resolve_data_dir(fields)
    if data_dir is None:
        raise ValueError("image_folder needs data_dir=<dir> holding <dir>/<class>/*.jpg|png")
    train_dir, test_dir = image_folder.split_dirs(data_dir)
    train, test, classes = _load_folders(train_dir, test_dir, fields, None)
    return Splits(train, test, len(classes), IMAGENET_STATS, f"class folders {train_dir}")


def load_cifar10(fields: Fields) -> Splits:
    """CIFAR-10 from tfds (no ``data_dir``) or a local copy in any of the formats it detects."""
    data_dir = resolve_data_dir(fields)
    download = bool(fields["download"])
    if data_dir is None:
        train, test, k, test_name = tfds_source.load_tfds("cifar10", None, download=download)
        return Splits(train, test, k, CIFAR_STATS, "tfds cifar10", test_name)
    if not os.path.isdir(data_dir):
        raise DataError(f"cifar10 data_dir {data_dir!r} does not exist or is not a directory")
    found = cifar_files.find_release(data_dir)
    if found is not None:
        kind, directory = found
        train, test = cifar_files.load_release(kind, directory, allow_pickle=fields["allow_pickle"])
        return Splits(train, test, 10, CIFAR_STATS, f"CIFAR-10 {kind} release {directory}")
    if os.path.isdir(os.path.join(data_dir, "cifar10")):  # a prepared tfds data_dir
        train, test, k, test_name = tfds_source.load_tfds("cifar10", data_dir, download=False)
        return Splits(train, test, k, CIFAR_STATS, f"tfds cifar10 in {data_dir}", test_name)
    return _cifar10_class_folders(data_dir, fields)


def _cifar10_class_folders(data_dir: str, fields: Fields) -> Splits:
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
    train, test, _ = _load_folders(train_dir, test_dir, fields, cifar_files.IMAGE_SHAPE)
    return Splits(train, test, 10, CIFAR_COPY_STATS, f"class folders {train_dir}")


def _load_folders(train_dir: str, test_dir: str | None, fields: Fields, shape):
    kwargs = dict(expected_shape=shape, cache_dir=fields["cache_dir"], workers=fields["workers"])
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


#: ``config.data.name`` (its part before the first ``/``) -> loader.
LOADERS: dict[str, Callable[[Fields], Splits]] = {
    "digits": load_digits,
    "cifar10": load_cifar10,
    "imagenet32": load_imagenet32,
    "image_folder": load_image_folder,
    "synthetic": load_synthetic,
    "vtab": vtab.load_vtab,
}


def loader_for(name: str) -> Callable[[Fields], Splits]:
    """The loader of dataset ``name`` (``vtab/<task>...`` names go to the ``vtab`` loader).

    Raises:
      ValueError: an unknown name.
    """
    key = "vtab" if str(name).startswith("vtab/") else name
    if key not in LOADERS:
        raise ValueError(
            f"unknown dataset name {name!r}; choose one of {list(LOADERS)} (vtab as vtab/<task>)"
        )
    return LOADERS[key]
