"""Readers for the official CIFAR-10 releases (binary and python pickle) and format detection.

Binary (``cifar-10-batches-bin/``): ``data_batch_{1..5}.bin`` and ``test_batch.bin``, each a
sequence of 3073-byte records: 1 label byte, then 3072 pixel bytes, channel-major (1024 R, 1024 G,
1024 B), each plane row-major 32x32.

Python (``cifar-10-batches-py/``): ``data_batch_{1..5}`` and ``test_batch``, pickled dicts with
``b'data'`` (uint8 [N, 3072], same pixel layout) and ``b'labels'``. Unpickling can execute
arbitrary code, so it happens only when the caller opts in (``allow_pickle=True``).
"""

from __future__ import annotations

import os
import pickle

import numpy as np

from wtjax.data.sources import ArraySource, DataError

IMAGE_SHAPE = (32, 32, 3)
NUM_CLASSES = 10
RECORD_BYTES = 1 + 32 * 32 * 3
TRAIN_FILES = tuple(f"data_batch_{i}" for i in range(1, 6))
TEST_FILE = "test_batch"
SUBDIRS = ("", "cifar-10-batches-bin", "cifar-10-batches-py")


def find_release(data_dir: str) -> tuple[str, str] | None:
    """Looks for an official release in ``data_dir`` or its usual sub-folders.

    Returns:
      ``('binary' | 'pickle', directory)`` or None if neither layout is present.
    """
    for sub in SUBDIRS:
        d = os.path.join(data_dir, sub)
        if os.path.isfile(os.path.join(d, TRAIN_FILES[0] + ".bin")):
            return "binary", d
        if os.path.isfile(os.path.join(d, TRAIN_FILES[0])):
            return "pickle", d
    return None


def _planes_to_nhwc(flat: np.ndarray) -> np.ndarray:
    return flat.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1).copy()


def _check_labels(labels: np.ndarray, path: str) -> None:
    bad = labels[(labels < 0) | (labels >= NUM_CLASSES)]
    if bad.size:
        raise DataError(f"{path}: label {int(bad[0])} out of range [0, {NUM_CLASSES}); not a CIFAR-10 file?")


def read_binary_file(path: str) -> tuple[np.ndarray, np.ndarray]:
    """Reads one CIFAR-10 binary batch file into ``(uint8 [N, 32, 32, 3], int32 [N])``."""
    raw = np.fromfile(path, dtype=np.uint8)
    if raw.size == 0 or raw.size % RECORD_BYTES:
        raise DataError(
            f"{path}: {raw.size} bytes is not a positive multiple of the {RECORD_BYTES}-byte CIFAR-10 "
            "record (1 label byte + 3072 pixel bytes); the file is truncated, corrupt or not CIFAR-10 "
            "(CIFAR-100 binaries have 2 label bytes)"
        )
    records = raw.reshape(-1, RECORD_BYTES)
    labels = records[:, 0].astype(np.int32)
    _check_labels(labels, path)
    return _planes_to_nhwc(records[:, 1:]), labels


def read_pickle_file(path: str) -> tuple[np.ndarray, np.ndarray]:
    """Reads one CIFAR-10 python batch (only call after the user opted in to unpickling)."""
    try:
        with open(path, "rb") as f:
            entry = pickle.load(f, encoding="bytes")
    except (pickle.UnpicklingError, EOFError, ValueError) as e:
        raise DataError(f"{path}: not a readable CIFAR-10 python pickle ({e})") from e
    if not isinstance(entry, dict):
        raise DataError(f"{path}: expected a dict in the pickle, got {type(entry).__name__}")
    get = lambda k: entry.get(k.encode(), entry.get(k))
    data, labels = get("data"), get("labels")
    if data is None or labels is None:
        raise DataError(
            f"{path}: pickle has no 'data'/'labels' entries (keys: {sorted(map(str, entry))[:5]})"
        )
    data = np.asarray(data)
    labels = np.asarray(labels, dtype=np.int64)
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != RECORD_BYTES - 1:
        raise DataError(f"{path}: 'data' is {data.dtype} {data.shape}, expected uint8 [N, 3072]")
    if labels.shape != (data.shape[0],):
        raise DataError(f"{path}: {data.shape[0]} images but {labels.shape} labels")
    _check_labels(labels, path)
    return _planes_to_nhwc(data), labels.astype(np.int32)


def load_release(kind: str, directory: str, *, allow_pickle: bool) -> tuple[ArraySource, ArraySource | None]:
    """Loads the train (all five batches) and, if present, test split of an official release.

    Args:
      kind: ``'binary'`` or ``'pickle'`` (from :func:`find_release`).
      directory: the folder holding the batch files.
      allow_pickle: must be True for ``'pickle'`` (a real bool: a string such as ``"false"`` is
        a TypeError, never coerced).

    Returns:
      ``(train, test)`` sources; ``test`` is None when ``test_batch[.bin]`` is absent.
    """
    if not isinstance(allow_pickle, (bool, np.bool_)):  # bool("false") is True: never coerce
        raise TypeError(f"allow_pickle must be True or False, got {allow_pickle!r}")
    if kind == "pickle" and not allow_pickle:
        raise DataError(
            f"{directory} holds the python-pickle CIFAR-10 release. Unpickling can run arbitrary code, so "
            "it is off by default: pass --config.data.allow_pickle=True if you trust these files, or use "
            "the binary release (cifar-10-batches-bin)."
        )
    ext, reader = (".bin", read_binary_file) if kind == "binary" else ("", read_pickle_file)
    paths = [os.path.join(directory, f + ext) for f in TRAIN_FILES]
    missing = [p for p in paths if not os.path.isfile(p)]
    if missing:
        raise DataError(f"incomplete CIFAR-10 {kind} release in {directory}: missing {missing}")
    parts = [reader(p) for p in paths]
    train = ArraySource(
        np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts]), what=directory
    )
    test_path = os.path.join(directory, TEST_FILE + ext)
    test = ArraySource(*reader(test_path), what=test_path) if os.path.isfile(test_path) else None
    return train, test
