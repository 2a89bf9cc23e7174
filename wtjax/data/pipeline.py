"""Input pipeline: ``create_dataset(config.data, seed=...)`` -> :class:`Dataset`.

``config.data`` must be complete (its fields and their one set of defaults:
:mod:`wtjax.data.fields`); ``name`` picks the loader from the registry
:data:`wtjax.data.loaders.LOADERS` (digits, cifar10, imagenet32, image_folder, synthetic,
vtab/<task>). The loader returns the splits and the dataset's statistics; the fields common to
every dataset (downsampling, holdout and subsets, normalisation, augmentation) are applied here.

Images stay uint8 in memory; each batch is gathered, augmented (vectorised NumPy) and normalised
to float32 on the fly. See :mod:`wtjax.data.dataset` for the determinism contract.
"""

from __future__ import annotations

import logging
from typing import Any

from wtjax.data import loaders, sources
from wtjax.data.dataset import Dataset, make_dataset
from wtjax.data.fields import read_data_config
from wtjax.data.sources import DataError, Splits

__all__ = ["DataError", "Dataset", "create_dataset"]


def create_dataset(data_config: Any, *, seed: int, process_index: int = 0, process_count: int = 1) -> Dataset:
    """Builds the dataset described by ``data_config``.

    Args:
      data_config: a complete ``config.data`` (ConfigDict or mapping), e.g. from
        :func:`wtjax.data.fields.data_config`; the fields are defined in :data:`wtjax.data.fields.FIELDS`.
      seed: run seed: epoch order and augmentation (never the holdout split or synthetic data).
      process_index, process_count: this process among the data-loading processes
        (``jax.process_index()``, ``jax.process_count()``).

    Returns:
      A :class:`Dataset`.

    Raises:
      KeyError: missing or unknown fields. TypeError: a boolean field holding a non-bool.
      ValueError: unknown name or inconsistent fields.
      DataError (a ValueError): missing, corrupt or mismatched data, or data that cannot be
      prepared here.
    """
    fields = read_data_config(data_config)
    splits = loaders.loader_for(fields["name"])(fields)
    ds = _assemble(fields, splits, seed=seed, process_index=process_index, process_count=process_count)
    logging.info(
        "dataset %s from %s: %d train, %d eval (%s), images %s, %d classes",
        ds.name,
        splits.description,
        ds.num_train,
        ds.num_eval,
        ds.eval_split,
        ds.image_shape,
        ds.num_classes,
    )
    return ds


def _assemble(fields, splits: Splits, *, seed: int, process_index: int, process_count: int) -> Dataset:
    """The :class:`Dataset` of a loader's splits with the fields every dataset shares applied."""
    name, train, test = fields["name"], splits.train, splits.test
    factor = int(fields["downsample"])
    if factor != 1:
        train = sources.Downsampled(train, factor)
        test = sources.Downsampled(test, factor) if test is not None else None
    mean = tuple(fields["mean"] if fields["mean"] is not None else splits.stats[0])
    std = tuple(fields["std"] if fields["std"] is not None else splits.stats[1])
    channels = train.image_shape[-1]
    if len(mean) != channels or len(std) != channels:
        raise ValueError(f"{name}: images have {channels} channels but mean={mean}, std={std}")
    # The usual CIFAR recipe pads 4 pixels on 32x32 images; keep that ratio (H / 8) on other sizes
    # (16x16 digits: 2; 8x8 synthetic: 1) so tiny images are not mostly black padding.
    crop_padding = fields["crop_padding"]
    if crop_padding is None:
        crop_padding = max(1, round(train.image_shape[0] / 8))
    return make_dataset(
        name,
        train=train,
        test=test,
        num_classes=splits.num_classes,
        mean=mean,
        std=std,
        seed=seed,
        holdout=int(fields["holdout"]),
        train_subset=fields["train_subset"],
        eval_subset=fields["eval_subset"],
        augment=bool(fields["augment"]),
        crop_padding=int(crop_padding),
        flip=bool(splits.flip if fields["flip"] is None else fields["flip"]),
        process_index=process_index,
        process_count=process_count,
        test_name=splits.test_name,
    )
