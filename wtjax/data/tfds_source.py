"""tensorflow-datasets sources through ``tfds.data_source`` (array_record, random access).

Reading a prepared dataset needs no TensorFlow (records are decoded with PIL/NumPy). *Preparing*
one (download + conversion) does: tfds encodes images with TensorFlow while writing, so a machine
that must prepare CIFAR-10 or ImageNet 32x32 needs ``pip install "tensorflow-datasets[tensorflow]"``
(or ``tensorflow``). When the data is not prepared we fail fast, before any download retry loop,
if TensorFlow is missing or the download host is unreachable, and say how to use a local copy.
"""

from __future__ import annotations

import importlib.util
import socket

from wtjax.data.sources import DataError, RecordSource

# name -> (tfds name, test split name, download host checked before trying to download)
TFDS_NAMES = {
    "cifar10": ("cifar10", "test", "www.cs.toronto.edu"),
    "imagenet32": ("imagenet_resized/32x32", "validation", "www.image-net.org"),
}

LOCAL_COPY_HINT = (
    "To use a local copy instead, point the job at it with --config.data.data_dir (or the "
    "WTJAX_DATA_DIR environment variable), e.g. --config.data.data_dir=/path/to/cifar-10-batches-bin "
    "(official binary release) or --config.data.data_dir=/path/to/images --config.data.holdout=5000 "
    "(class-folder tree <dir>/<class>/*.jpg)."
)


def host_reachable(host: str, port: int = 443, timeout: float = 3.0) -> bool:
    """True if a TCP connection to ``host:port`` opens within ``timeout`` seconds."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def tensorflow_available() -> bool:
    return importlib.util.find_spec("tensorflow") is not None


def _prepare(builder, name: str, host: str) -> None:
    where = f"tfds dataset {name!r} is not prepared in {builder.data_dir!r}"
    if not tensorflow_available():
        raise DataError(
            f"{where}, and preparing it needs TensorFlow, which is not installed (reading a prepared "
            'dataset does not). Install it with: pip install "tensorflow-datasets[tensorflow]" '
            "(or prepare the data on another machine and pass its tfds data_dir). " + LOCAL_COPY_HINT
        )
    if not host_reachable(host):
        raise DataError(
            f"{where}, and the download host {host} is unreachable (offline?). " + LOCAL_COPY_HINT
        )
    builder.download_and_prepare(file_format="array_record")


def load_tfds(dataset: str, data_dir: str | None, *, download: bool = True):
    """Opens the train and test splits of a registered tfds dataset for random access.

    Args:
      dataset: a key of :data:`TFDS_NAMES` (``cifar10`` or ``imagenet32``).
      data_dir: the tfds data_dir (None: tfds default, ``$TFDS_DATA_DIR`` or ~/tensorflow_datasets).
      download: prepare the dataset if it is missing (needs TensorFlow and internet).

    Returns:
      ``(train, test, num_classes, test_split_name)``.
    """
    import tensorflow_datasets as tfds  # lazy: heavy, and only these two datasets need it

    name, test_split, host = TFDS_NAMES[dataset]

    def open_split(split: str):
        return tfds.data_source(name, split=split, data_dir=data_dir, download=False)

    try:
        train = open_split("train")
    except Exception as first_error:  # noqa: BLE001 - tfds raises several types; we re-raise below
        builder = tfds.builder(name, data_dir=data_dir)
        if builder.is_prepared():
            raise DataError(
                f"tfds dataset {name!r} exists in {builder.data_dir!r} but cannot be opened for random "
                f"access ({first_error}). tfds.data_source needs the array_record format: delete that "
                "folder and re-prepare with file_format='array_record'."
            ) from first_error
        if not download:
            raise DataError(
                f"tfds dataset {name!r} is not prepared in {builder.data_dir!r} and download=False. "
                + LOCAL_COPY_HINT
            ) from first_error
        _prepare(builder, name, host)
        train = open_split("train")
    test = open_split(test_split)
    features = train.dataset_info.features
    num_classes = features["label"].num_classes
    shape = tuple(features["image"].shape)
    if len(shape) != 3 or None in shape:
        raise DataError(f"tfds dataset {name!r} has image shape {shape}; a fixed (H, W, C) is required")
    return (
        RecordSource(train, shape, what=f"{name}/train", num_classes=num_classes),
        RecordSource(test, shape, what=f"{name}/{test_split}", num_classes=num_classes),
        num_classes,
        test_split,
    )
