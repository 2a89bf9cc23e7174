"""Vectorised NumPy augmentation and normalisation of uint8 NHWC batches.

Everything works on a whole batch at once (one gather for crop + flip, one fused multiply-add for
normalisation): no per-image Python loops. Randomness comes from a ``numpy.random.Generator`` the
caller derives from ``(seed, step)``, so a batch's augmentation is reproducible.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def sample_crop_flip(rng: np.random.Generator, batch: int, padding: int) -> tuple[np.ndarray, np.ndarray]:
    """Draws the random-crop offsets and flip decisions for ``batch`` images.

    Args:
      rng: the generator (derived from ``(seed, step)`` by the caller).
      batch: number of images (the GLOBAL batch, so every process slices the same draws).
      padding: crop padding ``p``; offsets are uniform in ``[0, 2p]`` on each axis.

    Returns:
      ``(offsets, flips)``: int64 ``[batch, 2]`` (row, column offsets into the padded image) and
      bool ``[batch]``. Both are always drawn, whatever is used, so the random stream does not
      depend on which augmentations are switched on.
    """
    offsets = rng.integers(0, 2 * padding + 1, size=(batch, 2))
    flips = rng.random(batch) < 0.5
    return offsets, flips


def crop_flip(images: np.ndarray, offsets: np.ndarray, flips: np.ndarray | None, padding: int) -> np.ndarray:
    """Random crop with ``padding`` zero pixels on each side, then optional horizontal flip.

    Output pixel ``(i, j)`` of image ``b`` is ``padded[b, oy + i, ox + j']`` with
    ``j' = W - 1 - j`` when ``flips[b]`` else ``j``, where ``padded`` is the image with ``padding``
    black (value 0, i.e. before normalisation, as in torchvision's ``RandomCrop(padding=p)``)
    pixels around it. Implemented as a single fancy-index gather.

    Args:
      images: uint8 ``[B, H, W, C]``.
      offsets: int ``[B, 2]`` in ``[0, 2 * padding]``.
      flips: bool ``[B]`` or None for no flipping.
      padding: zero padding on each spatial side.

    Returns:
      uint8 ``[B, H, W, C]``.
    """
    b, h, w, _ = images.shape
    if padding == 0 and flips is None:
        return images
    padded = np.pad(images, ((0, 0), (padding, padding), (padding, padding), (0, 0)))
    rows = offsets[:, 0, None] + np.arange(h)  # [B, H]
    cols_fwd = np.arange(w)
    cols = cols_fwd if flips is None else np.where(flips[:, None], cols_fwd[::-1], cols_fwd)
    cols = offsets[:, 1, None] + cols  # [B, W]
    return padded[np.arange(b)[:, None, None], rows[:, :, None], cols[:, None, :]]


class Normalizer:
    """``x -> (x / 255 - mean) / std`` per channel, uint8 in, float32 out.

    Precomputes ``scale = 1 / (255 std)`` and ``shift = -mean / std`` so each batch costs one
    fused multiply-add.
    """

    def __init__(self, mean: Sequence[float], std: Sequence[float]):
        mean = np.asarray(mean, np.float64)
        std = np.asarray(std, np.float64)
        if mean.ndim != 1 or mean.shape != std.shape:
            raise ValueError(f"mean and std must be 1-D of equal length, got {mean!r} and {std!r}")
        if np.any(std <= 0):
            raise ValueError(f"std must be positive, got {tuple(std)}")
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)
        self._scale = (1.0 / (255.0 * std)).astype(np.float32)
        self._shift = (-mean / std).astype(np.float32)

    def __call__(self, images: np.ndarray) -> np.ndarray:
        if images.shape[-1] != self._scale.shape[0]:
            raise ValueError(f"images have {images.shape[-1]} channels, mean/std have {self._scale.shape[0]}")
        out = images.astype(np.float32)
        out *= self._scale
        out += self._shift
        return out

    def invert(self, images: np.ndarray) -> np.ndarray:
        """Maps normalised images back to the [0, 255] pixel scale (float, for tests and plots)."""
        return (np.asarray(images, np.float64) * np.asarray(self.std) + np.asarray(self.mean)) * 255.0
