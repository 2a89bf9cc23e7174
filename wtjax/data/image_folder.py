"""Class-folder image trees: ``<root>/<class>/*.jpg|png`` (optionally ``<root>/{train,test}/...``).

Images are decoded once with PIL in a thread pool (PIL releases the GIL while decoding) and the
uint8 array is cached as ``.npz`` in a cache directory, keyed by the tree's path and every file's
relative name, size and mtime, so a changed, added or removed file invalidates the cache. The cache
is written atomically (a temporary file renamed into place) and checked when read: a cache that is
unreadable (truncated, empty) or holds other labels, another number of images or another image
shape than the files is rebuilt, with one warning in the log. Classes are the sorted sub-folder
names (for the CIFAR-10 copy this is the usual airplane..truck order).
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
import zipfile
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from tqdm.auto import tqdm

from wtjax.data.sources import ArraySource, DataError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp")
TRAIN_DIRS = ("train",)
TEST_DIRS = ("test", "val", "validation")
_CACHE_VERSION = 1


def default_cache_dir() -> str:
    """``$WTJAX_CACHE_DIR`` if set, else ``~/.cache/wtjax``."""
    return os.environ.get("WTJAX_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "wtjax")


def subdirs(path: str) -> list[str]:
    """Sorted names of the non-hidden sub-folders of ``path``."""
    return sorted(e.name for e in os.scandir(path) if e.is_dir() and not e.name.startswith("."))


def split_dirs(root: str) -> tuple[str, str | None]:
    """Returns ``(train_dir, test_dir or None)`` for ``root``.

    ``root/train/<class>/`` (with optional ``root/test|val|validation/<class>/``) or, when there is
    no ``train`` folder, ``root/<class>/`` as the training split with no test split.
    """
    if not os.path.isdir(root):
        raise DataError(f"image folder {root!r} does not exist or is not a directory")
    subs = subdirs(root)
    train = next((d for d in TRAIN_DIRS if d in subs), None)
    if train is None:
        return root, None
    test = next((d for d in TEST_DIRS if d in subs), None)
    return os.path.join(root, train), (os.path.join(root, test) if test else None)


def list_files(split_dir: str) -> tuple[list[str], list[tuple[str, int]]]:
    """Lists ``(class names, [(path, label), ...])`` and rejects empty classes / non-image files."""
    classes = subdirs(split_dir)
    if not classes:
        raise DataError(f"{split_dir!r} has no class sub-folders; expected <dir>/<class>/*.jpg|png")
    files = []
    for label, cls in enumerate(classes):
        cdir = os.path.join(split_dir, cls)
        names = sorted(e.name for e in os.scandir(cdir) if e.is_file() and not e.name.startswith("."))
        if not names:
            raise DataError(f"class folder {cdir!r} is empty")
        bad = [n for n in names if not n.lower().endswith(IMAGE_EXTENSIONS)]
        if bad:
            raise DataError(f"{cdir!r} holds non-image file(s) {bad[:3]}; allowed: {IMAGE_EXTENSIONS}")
        files.extend((os.path.join(cdir, n), label) for n in names)
    return classes, files


def _cache_key(split_dir: str, files: list[tuple[str, int]], expected_shape) -> str:
    h = hashlib.sha256(f"v{_CACHE_VERSION}|{os.path.abspath(split_dir)}|{expected_shape}".encode())
    for path, label in files:
        st = os.stat(path)
        h.update(f"|{os.path.relpath(path, split_dir)}|{label}|{st.st_size}|{st.st_mtime_ns}".encode())
    return h.hexdigest()[:20]


def _decode(path: str) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError  # local: only this loader needs PIL

    try:
        with Image.open(path) as im:
            return np.asarray(im.convert("RGB"), dtype=np.uint8)
    except (UnidentifiedImageError, OSError, ValueError) as e:
        raise DataError(f"cannot decode image {path!r}: {e}") from e


def decode_all(paths: list[str], expected_shape: tuple[int, int, int] | None, workers: int) -> np.ndarray:
    """Decodes ``paths`` to one uint8 ``[N, H, W, 3]`` array; every image must have one shape.

    ``expected_shape`` None means "the shape of the first image".
    """
    first = _decode(paths[0])
    shape = tuple(expected_shape) if expected_shape is not None else first.shape
    out = np.empty((len(paths), *shape), np.uint8)

    def put(i: int) -> None:
        img = first if i == 0 else _decode(paths[i])
        if img.shape != shape:
            raise DataError(
                f"image {paths[i]!r} has shape {img.shape}, expected {shape} (all images must match)"
            )
        out[i] = img

    bar = tqdm(total=len(paths), desc="decoding images", unit="img", mininterval=2.0, leave=False)
    with bar, ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        # Consuming the results in order re-raises the first worker exception here.
        for _ in pool.map(put, range(len(paths)), chunksize=256):
            bar.update()
    return out


def load_split(
    split_dir: str,
    *,
    expected_shape: tuple[int, int, int] | None = None,
    cache_dir: str | None = None,
    workers: int | None = None,
) -> tuple[list[str], ArraySource]:
    """Loads one class-folder split, using the decoded-array cache when it is valid.

    A cache that cannot be read (truncated, empty) or does not match the files (number of images,
    image shape, labels) is rebuilt from the images, with one warning in the log.

    Args:
      split_dir: ``<split_dir>/<class>/<image files>``.
      expected_shape: required ``(H, W, 3)``, or None to take the first image's shape.
      cache_dir: where to keep ``.npz`` caches (None: :func:`default_cache_dir`; ``''`` disables).
      workers: decoding threads (None: ``min(8, os.cpu_count())``).

    Returns:
      ``(class names, source)``.
    """
    classes, files = list_files(split_dir)
    labels = np.asarray([lab for _, lab in files], np.int32)
    cache_dir = default_cache_dir() if cache_dir is None else cache_dir
    key = _cache_key(split_dir, files, expected_shape)
    cache = os.path.join(cache_dir, f"image_folder-{os.path.basename(os.path.abspath(split_dir))}-{key}.npz")
    if cache_dir and os.path.isfile(cache):
        shape = tuple(expected_shape) if expected_shape is not None else _header_shape(files[0][0])
        images = read_cache(cache, labels, shape)
        if images is not None:
            logging.info("loaded %d decoded images of %s from cache %s", len(labels), split_dir, cache)
            return classes, ArraySource(images, labels, what=split_dir)
    workers = workers or min(8, os.cpu_count() or 1)
    images = decode_all([p for p, _ in files], expected_shape, workers)
    if cache_dir:
        _write_cache(cache, images, labels)
    return classes, ArraySource(images, labels, what=split_dir)


def _header_shape(path: str) -> tuple[int, int, int] | None:
    """``(H, W, 3)`` of an image from its header (no decoding); None if PIL cannot read it."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            return (im.height, im.width, 3)
    except (UnidentifiedImageError, OSError, ValueError):
        return None  # the rebuild decodes it and reports the problem


def read_cache(path: str, labels: np.ndarray, image_shape: tuple[int, int, int] | None) -> np.ndarray | None:
    """The images of the cache at ``path`` if it holds ``labels`` and images of ``image_shape``.

    Returns None, after one warning naming the problem, when the file cannot be read (truncated,
    empty, not an ``.npz``) or does not match, so the caller rebuilds it.
    """
    try:
        with np.load(path, allow_pickle=False) as z:
            images, cached = z["images"], z["labels"]
    except (OSError, EOFError, ValueError, KeyError, zipfile.BadZipFile) as e:
        problem = f"unreadable ({type(e).__name__}: {e})"
    else:
        problem = _cache_mismatch(images, cached, labels, image_shape)
        if problem is None:
            return images
    logging.warning("image cache %s is %s; rebuilding it from the image files", path, problem)
    return None


def _cache_mismatch(images, cached_labels, labels, image_shape) -> str | None:
    """What is wrong with cached ``(images, cached_labels)`` for these files, or None."""
    n = len(labels)
    if not (
        images.dtype == np.uint8
        and images.ndim == 4
        and images.shape[0] == n
        and (image_shape is None or images.shape[1:] == tuple(image_shape))
    ):
        want = f"uint8 {(n, *image_shape)}" if image_shape is not None else f"{n} uint8 images"
        return f"inconsistent: it holds {images.dtype} {images.shape} images, the files are {want}"
    if cached_labels.shape != labels.shape:
        return f"inconsistent: it holds labels of shape {cached_labels.shape}, the files are {n}"
    differ = np.flatnonzero(cached_labels != labels)
    if differ.size:
        return f"inconsistent: {differ.size} of its labels differ from the folders' (first: row {differ[0]})"
    return None


def _write_cache(path: str, images: np.ndarray, labels: np.ndarray) -> None:
    # Written to a temporary file, flushed to disk, then renamed: os.replace is atomic, so a killed
    # writer or a concurrent reader never sees a partial cache at `path`.
    tmp = None
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), suffix=".tmp.npz")
        with os.fdopen(fd, "wb") as f:
            np.savez(f, images=images, labels=labels)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        tmp = None
        logging.info("cached decoded images at %s", path)
    except OSError as e:  # a read-only home must not stop training
        logging.warning("could not write image cache %s: %s", path, e)
    finally:
        if tmp is not None and os.path.exists(tmp):
            os.remove(tmp)
