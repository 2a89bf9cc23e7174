"""The :class:`Dataset`: fixed splits, deterministic batching, per-process slices, padded eval.

Determinism contract (what makes resuming exact and multi-host runs consistent):

- the train/holdout split and ``train_subset`` come from one fixed shuffle,
  ``numpy.random.default_rng(0).permutation(n)``, independent of the run seed;
- the global batch at step ``s`` is rows ``[p * B, (p + 1) * B)`` of the epoch permutation,
  where ``epoch, p = divmod(s, num_train // B)`` and the permutation is drawn from
  ``SeedSequence([seed, 0, epoch])``; the last ``num_train % B`` rows of an epoch are dropped;
- augmentation draws for the whole global batch come from ``SeedSequence([seed, 1, s])``;
- process ``i`` of ``P`` receives rows ``[i * B / P, (i + 1) * B / P)`` of that global batch.

So a batch depends only on ``(seed, s)``: restarting at ``start_step = s`` yields exactly the
batches an uninterrupted run would, and the processes' slices concatenate to the global batch.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Sequence

import numpy as np

from wtjax.data.augment import Normalizer, crop_flip, sample_crop_flip
from wtjax.data.sources import DataError, Source

_EPOCH_STREAM = 0
_AUGMENT_STREAM = 1
HOLDOUT_SHUFFLE_SEED = 0


def _rng(seed: int, stream: int, counter: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([seed, stream, counter]))


def epoch_permutation(seed: int, epoch: int, n: int) -> np.ndarray:
    """The order in which epoch ``epoch`` visits the ``n`` training examples."""
    return _rng(seed, _EPOCH_STREAM, epoch).permutation(n)


@dataclasses.dataclass
class Dataset:
    """One dataset ready for training: metadata plus train/eval batch iterators.

    Attributes:
      name: dataset name (``cifar10``, ``digits``, ...).
      num_classes: number of classes; labels are in ``[0, num_classes)``.
      image_shape: ``(H, W, C)`` of every image.
      num_train: training examples (after holdout and ``train_subset``).
      num_eval: evaluation examples.
      eval_split: human-readable description of the evaluation split.
      train_source, eval_source: where rows are read from (see :mod:`wtjax.data.sources`).
      train_index, eval_index: source rows making up each split (holdout/subsets applied).
      normalizer: uint8 -> float32 ``(x / 255 - mean) / std``.
      seed: run seed for epoch order and augmentation.
      process_index, process_count: which slice of every global batch this process gets.
      augment, crop_padding, flip: training augmentation (random crop with ``crop_padding`` zero
        pixels per side, then a horizontal flip with probability 1/2 if ``flip``).

    A run must keep the same global batch size when it resumes: step ``s`` means rows
    ``[p * B, (p + 1) * B)`` of an epoch only for a fixed ``B``.
    """

    name: str
    num_classes: int
    image_shape: tuple[int, int, int]
    num_train: int
    num_eval: int
    eval_split: str
    train_source: Source = dataclasses.field(repr=False)
    train_index: np.ndarray = dataclasses.field(repr=False)
    eval_source: Source = dataclasses.field(repr=False)
    eval_index: np.ndarray = dataclasses.field(repr=False)
    normalizer: Normalizer = dataclasses.field(repr=False)
    seed: int = 0
    process_index: int = 0
    process_count: int = 1
    augment: bool = False
    crop_padding: int = 4
    flip: bool = True

    def _local_size(self, batch_size: int) -> int:
        if not isinstance(batch_size, (int, np.integer)) or batch_size <= 0:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        if batch_size % self.process_count:
            raise ValueError(
                f"global batch_size {batch_size} is not divisible by process_count {self.process_count}"
            )
        return batch_size // self.process_count

    def steps_per_epoch(self, batch_size: int) -> int:
        """Full global batches per epoch (the remainder is dropped)."""
        return self.num_train // batch_size

    def train_batches(self, batch_size: int, start_step: int = 0) -> Iterator[dict[str, np.ndarray]]:
        """Infinite iterator over this process's slice of each global training batch.

        Args:
          batch_size: the GLOBAL batch size (divisible by ``process_count``).
          start_step: the step of the first batch yielded (to resume a run exactly).

        Yields:
          ``{'image': float32 [b, H, W, C] normalised (and augmented if enabled),
          'label': int32 [b]}`` with ``b = batch_size // process_count``.
        """
        local = self._local_size(batch_size)
        steps = self.steps_per_epoch(batch_size)
        if steps == 0:
            raise ValueError(f"batch_size {batch_size} exceeds the {self.num_train} training examples")
        if start_step < 0:
            raise ValueError(f"start_step must be >= 0, got {start_step}")
        return self._train_iter(batch_size, local, steps, int(start_step))

    def _train_iter(self, batch_size: int, local: int, steps: int, step: int):
        lo = self.process_index * local
        epoch, perm = -1, None
        while True:
            e, pos = divmod(step, steps)
            if e != epoch:
                epoch, perm = e, epoch_permutation(self.seed, e, self.num_train)
            rows = perm[pos * batch_size + lo : pos * batch_size + lo + local]
            images, labels = self.train_source.get(self.train_index[rows])
            if self.augment:
                offsets, flips = sample_crop_flip(
                    _rng(self.seed, _AUGMENT_STREAM, step), batch_size, self.crop_padding
                )
                images = crop_flip(
                    images,
                    offsets[lo : lo + local],
                    flips[lo : lo + local] if self.flip else None,
                    self.crop_padding,
                )
            yield {"image": self.normalizer(images), "label": labels}
            step += 1

    def eval_batches(self, batch_size: int) -> Iterator[dict[str, np.ndarray]]:
        """One pass over the eval split, no augmentation, this process's slice of each batch.

        The last global batch is padded to ``batch_size`` rows; ``'mask'`` (float32, 1 = real row,
        0 = padding) is present in every batch. Padding rows have zero images and label 0.

        Args:
          batch_size: the GLOBAL batch size (divisible by ``process_count``).

        Yields:
          ``{'image': float32 [b, H, W, C], 'label': int32 [b], 'mask': float32 [b]}``.
        """
        local = self._local_size(batch_size)
        return self._eval_iter(batch_size, local)

    def _eval_iter(self, batch_size: int, local: int):
        n = self.num_eval
        for start in range(0, n, batch_size):
            pos = start + self.process_index * local + np.arange(local)
            real = pos < n
            images = np.zeros((local, *self.image_shape), np.float32)
            labels = np.zeros((local,), np.int32)
            if real.any():
                img, lab = self.eval_source.get(self.eval_index[pos[real]])
                images[real] = self.normalizer(img)
                labels[real] = lab
            yield {"image": images, "label": labels, "mask": real.astype(np.float32)}


def make_dataset(
    name: str,
    *,
    train: Source,
    test: Source | None,
    num_classes: int,
    mean: Sequence[float],
    std: Sequence[float],
    seed: int,
    holdout: int = 0,
    train_subset: int | None = None,
    eval_subset: int | None = None,
    augment: bool = False,
    crop_padding: int = 4,
    flip: bool = True,
    process_index: int = 0,
    process_count: int = 1,
    test_name: str = "test",
) -> Dataset:
    """Assembles a :class:`Dataset` from a train source and an optional test source.

    Args:
      name: dataset name for logs.
      train: the training split.
      test: the official test split, or None if the source has none (then ``holdout`` > 0).
      num_classes: number of classes; the labels of in-memory sources must be in
        ``[0, num_classes)`` (checked here; record sources check each record as it is read).
      mean, std: per-channel normalisation statistics on the [0, 1] scale.
      seed: run seed (epoch order and augmentation; NOT the holdout split).
      holdout: if > 0, the last ``holdout`` training examples after the fixed seed-0 shuffle are
        the eval split and are removed from training (the test split, if any, is unused).
      train_subset: keep only the first N training examples after the fixed shuffle.
      eval_subset: keep a fixed random N of the evaluation examples (cheap CPU evals).
      augment: random crop (``crop_padding`` zero pixels) and, if ``flip``, horizontal flips.
      process_index, process_count: this process's position among data-loading processes.
      test_name: how to describe the test split (e.g. ``validation`` for ImageNet).

    Returns:
      The :class:`Dataset`.
    """
    _check_arguments(name, train, test, num_classes, seed, process_index, process_count, crop_padding)
    train_index, eval_source, eval_index, eval_split = _eval_split(
        name, train, test, int(holdout or 0), test_name
    )
    train_index, eval_index, eval_split = _subsets(
        name, train_index, eval_index, eval_split, train_subset, eval_subset
    )
    return Dataset(
        name=name,
        num_classes=int(num_classes),
        image_shape=tuple(train.image_shape),
        num_train=len(train_index),
        num_eval=len(eval_index),
        eval_split=eval_split,
        train_source=train,
        train_index=train_index,
        eval_source=eval_source,
        eval_index=eval_index,
        normalizer=Normalizer(mean, std),
        seed=int(seed),
        process_index=int(process_index),
        process_count=int(process_count),
        augment=bool(augment),
        crop_padding=int(crop_padding),
        flip=bool(flip),
    )


def _check_arguments(
    name, train, test, num_classes, seed, process_index, process_count, crop_padding
) -> None:
    for source in (train, test):
        _check_labels(name, source, int(num_classes))
    if not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be a non-negative int, got {seed!r}")
    if not 0 <= process_index < process_count:
        raise ValueError(f"need 0 <= process_index < process_count, got {process_index}, {process_count}")
    if crop_padding < 0:
        raise ValueError(f"crop_padding must be >= 0, got {crop_padding}")
    if test is not None and test.image_shape != train.image_shape:
        raise ValueError(f"{name}: train images are {train.image_shape} but test images {test.image_shape}")


def _check_labels(name: str, source: Source | None, num_classes: int) -> None:
    """Labels held in memory must be in ``[0, num_classes)``: the loss would not notice one outside."""
    labels = getattr(source, "labels", None)
    if labels is None or not len(labels):
        return
    bad = labels[(labels < 0) | (labels >= num_classes)]
    if bad.size:
        raise DataError(
            f"{name}: label {int(bad[0])} is outside [0, {num_classes}) ({bad.size} such labels); the "
            "labels must be class indices 0..num_classes-1"
        )


def _eval_split(name: str, train: Source, test: Source | None, holdout: int, test_name: str):
    """``(train_index, eval_source, eval_index, eval_split)``: a holdout slice of train, or the test split."""
    n = len(train)
    fixed = np.random.default_rng(HOLDOUT_SHUFFLE_SEED).permutation(n)
    if holdout < 0 or holdout >= n:
        raise ValueError(f"{name}: holdout must be in [0, {n}) (the training set size), got {holdout}")
    if holdout:
        # Kept in the shuffled order (not sorted): a prefix (eval_subset) must not be class-ordered.
        split = f"holdout: last {holdout} of train after shuffle(seed={HOLDOUT_SHUFFLE_SEED})"
        return fixed[: n - holdout], train, fixed[n - holdout :], split
    if test is not None:
        return fixed, test, np.arange(len(test)), test_name
    raise ValueError(
        f"{name}: this source has no test split; set holdout > 0 (e.g. --config.data.holdout=5000) "
        "to evaluate on a held-out slice of the training images"
    )


def _subsets(name, train_index, eval_index, eval_split: str, train_subset, eval_subset):
    """The first ``train_subset`` training rows and a fixed random ``eval_subset`` of the eval rows."""
    if train_subset is not None:
        if not 0 < train_subset <= len(train_index):
            raise ValueError(f"{name}: train_subset must be in [1, {len(train_index)}], got {train_subset}")
        train_index = train_index[:train_subset]
    if eval_subset is not None:
        if not 0 < eval_subset <= len(eval_index):
            raise ValueError(f"{name}: eval_subset must be in [1, {len(eval_index)}], got {eval_subset}")
        # A fixed random subset: sources may be stored class by class, so a prefix could be one class.
        pick = np.random.default_rng(HOLDOUT_SHUFFLE_SEED + 1).permutation(len(eval_index))[:eval_subset]
        eval_index = eval_index[np.sort(pick)]
        eval_split = f"{eval_split} (random {eval_subset}, fixed seed)"
    return train_index, eval_index, eval_split


__all__ = ["Dataset", "epoch_permutation", "make_dataset"]
