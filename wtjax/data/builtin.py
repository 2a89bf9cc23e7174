"""Datasets that need no download: scikit-learn's bundled digits, and a synthetic task.

Digits: the 1,797 8x8 greyscale handwritten digits shipped inside scikit-learn (values 0..16),
rescaled to uint8 0..255 and upsampled 2x by pixel repetition to 16x16x1 (no information added or
lost; 16x16 leaves room for two stride-2 stages). Fixed split: a seed-0 shuffle, the first 1,500
are train and the last 297 test.

Synthetic: each class has a fixed random prototype image; an example is its class prototype plus
Gaussian pixel noise, clipped to uint8. A nearest-class-mean classifier separates the classes,
so a model can learn it; the data depends only on ``data_seed``.
"""

from __future__ import annotations

import numpy as np

from wtjax.data.sources import ArraySource

DIGITS_SHAPE = (16, 16, 1)
DIGITS_NUM_TRAIN = 1500


def load_digits() -> tuple[ArraySource, ArraySource]:
    """Returns the fixed ``(train, test)`` split of scikit-learn's digits at 16x16x1 uint8."""
    from sklearn.datasets import load_digits as _sk_load_digits  # bundled with sklearn, no download

    d = _sk_load_digits()
    images = np.round(d.images * (255.0 / 16.0)).astype(np.uint8)  # [N, 8, 8], 0..16 -> 0..255
    images = images.repeat(2, axis=1).repeat(2, axis=2)[..., None]  # nearest upsample to 16x16x1
    order = np.random.default_rng(0).permutation(len(images))
    tr, te = order[:DIGITS_NUM_TRAIN], order[DIGITS_NUM_TRAIN:]
    return (
        ArraySource(images[tr], d.target[tr], what="digits/train"),
        ArraySource(images[te], d.target[te], what="digits/test"),
    )


def pixel_stats(*sources: ArraySource) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std on the [0, 1] scale over all images of ``sources``."""
    x = np.concatenate([s.images for s in sources]).astype(np.float64) / 255.0
    axes = tuple(range(x.ndim - 1))
    return tuple(x.mean(axes).tolist()), tuple(x.std(axes).tolist())


def make_synthetic(
    *,
    num_classes: int,
    image_shape: tuple[int, int, int],
    num_train: int,
    num_eval: int,
    data_seed: int = 0,
    noise: float = 48.0,
) -> tuple[ArraySource, ArraySource]:
    """Builds a learnable synthetic ``(train, test)`` pair.

    ``x = clip(prototype[y] + noise * N(0, 1), 0, 255)`` with prototypes uniform in [64, 192] per
    pixel and labels uniform over classes.

    Args:
      num_classes: number of classes (>= 2).
      image_shape: ``(H, W, C)``.
      num_train, num_eval: split sizes.
      data_seed: the only source of randomness (independent of the run seed).
      noise: pixel noise standard deviation on the 0..255 scale.

    Returns:
      ``(train, test)`` array sources.
    """
    shape = tuple(int(d) for d in image_shape)
    if len(shape) != 3 or min(shape) <= 0:
        raise ValueError(f"synthetic image_shape must be (H, W, C) with positive sizes, got {image_shape}")
    if num_classes < 2 or num_train <= 0 or num_eval <= 0:
        raise ValueError(
            f"synthetic needs num_classes >= 2 and positive sizes, got {num_classes}, {num_train}, {num_eval}"
        )
    rng = np.random.default_rng(np.random.SeedSequence([data_seed, 7]))
    protos = rng.uniform(64, 192, size=(num_classes, *shape))

    def split(n: int) -> ArraySource:
        labels = rng.integers(0, num_classes, size=n)
        x = protos[labels] + noise * rng.standard_normal((n, *shape))
        return ArraySource(np.clip(np.round(x), 0, 255).astype(np.uint8), labels, what="synthetic")

    return split(num_train), split(num_eval)
