"""Random-access image sources: ``len(source)`` and ``source.get(indices) -> (images, labels)``.

A source holds one split. Images come back as uint8 NHWC, labels as int32. Everything above
(splitting, shuffling, batching) only ever asks a source for rows by index, so in-memory arrays
and lazily-decoding tfds data sources are interchangeable.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any, Protocol

import numpy as np


class DataError(ValueError):
    """Bad, corrupt, mismatched or missing input data (the message says what and where)."""


class Source(Protocol):
    """One split of a dataset with random access by integer index."""

    image_shape: tuple[int, int, int]

    def __len__(self) -> int: ...

    def get(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Returns ``(uint8 [n, H, W, C], int32 [n])`` for the given indices."""
        ...


@dataclasses.dataclass(frozen=True)
class Splits:
    """What a dataset loader returns (:data:`wtjax.data.loaders.LOADERS`): its splits and defaults.

    Attributes:
      train, test: the training split and the official test split (None: the source has none,
        so the config must set ``holdout``).
      num_classes: labels are in ``[0, num_classes)``.
      stats: ``(mean, std)`` per channel on the [0, 1] scale, used when ``mean``/``std`` are None.
      description: where the data came from, for the log.
      test_name: how to describe the test split (``validation`` for ImageNet).
      flip: whether augmentation flips when the config's ``flip`` is None.
    """

    train: Source
    test: Source | None
    num_classes: int
    stats: tuple[tuple[float, ...], tuple[float, ...]]
    description: str
    test_name: str = "test"
    flip: bool = True


class ArraySource:
    """A split held in memory as a uint8 NHWC array and integer labels."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, *, what: str = "arrays"):
        images = np.asarray(images)
        labels = np.asarray(labels)
        if images.dtype != np.uint8 or images.ndim != 4:
            raise DataError(f"{what}: images must be uint8 [N, H, W, C], got {images.dtype} {images.shape}")
        if labels.ndim != 1 or labels.shape[0] != images.shape[0]:
            raise DataError(f"{what}: {images.shape[0]} images but labels of shape {labels.shape}")
        if not np.issubdtype(labels.dtype, np.integer):
            raise DataError(f"{what}: labels must be integers, got {labels.dtype}")
        self.images = images
        self.labels = labels.astype(np.int32)
        self.image_shape = tuple(int(d) for d in images.shape[1:])

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def get(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return self.images[indices], self.labels[indices]


class RecordSource:
    """A split backed by a random-access sequence of ``{'image', 'label'}`` records.

    This wraps ``tfds.data_source`` (array_record files, decoded on access, no TensorFlow), so
    large datasets such as ImageNet 32x32 are never fully loaded: a batch decodes only its rows.
    Every record is checked against ``image_shape`` (and its label against ``num_classes`` if
    given) so a mismatched dataset fails loudly.
    """

    def __init__(
        self,
        records: Sequence[Any],
        image_shape: tuple[int, int, int],
        *,
        what: str,
        num_classes: int | None = None,
    ):
        self._records = records
        self.image_shape = tuple(int(d) for d in image_shape)
        self._what = what
        self._num_classes = num_classes

    def __len__(self) -> int:
        return len(self._records)

    def get(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        n = len(indices)
        images = np.empty((n, *self.image_shape), np.uint8)
        labels = np.empty((n,), np.int32)
        for k, i in enumerate(np.asarray(indices).tolist()):
            rec = self._records[i]
            img = np.asarray(rec["image"])
            if img.shape != self.image_shape or img.dtype != np.uint8:
                raise DataError(
                    f"{self._what}: record {i} has image {img.dtype} {img.shape}, expected uint8 "
                    f"{self.image_shape}"
                )
            images[k] = img
            labels[k] = self._label(rec, i)
        return images, labels

    def _label(self, rec, i: int) -> int:
        label = int(rec["label"])
        if self._num_classes is not None and not 0 <= label < self._num_classes:
            raise DataError(f"{self._what}: record {i} has label {label}, outside [0, {self._num_classes})")
        return label


class Downsampled:
    """A source whose images are average-pooled by an integer ``factor`` (e.g. 32x32 -> 16x16).

    Pools on access, so it wraps in-memory and lazily decoded sources alike. Used to shrink
    experiments to what a CPU can afford while keeping the real images and labels.
    """

    def __init__(self, source: Source, factor: int):
        h, w, c = source.image_shape
        if factor < 1 or h % factor or w % factor:
            raise DataError(f"downsample={factor} must be a positive divisor of the image size {h}x{w}")
        self._source = source
        self._factor = int(factor)
        self.image_shape = (h // factor, w // factor, c)

    def __len__(self) -> int:
        return len(self._source)

    def get(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        images, labels = self._source.get(indices)
        f = self._factor
        n, h, w, c = images.shape
        pooled = images.reshape(n, h // f, f, w // f, f, c).astype(np.float32).mean(axis=(2, 4))
        return np.round(pooled).astype(np.uint8), labels
