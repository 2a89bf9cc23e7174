"""VTAB-1k (Zhai et al. 2019) through ``tfds.data_source``: 19 tasks, the 1k-example protocol.

Every task trains on 1,000 labelled examples. Splits, as in google-research/task_adaptation
(its ``train800``, ``val200`` and ``train800val200``; the exact slices as listed by scenic's VTAB
config) and as used by NOAH (Zhang et al. 2022), whose setting Table 3 of the paper follows:

* ``protocol='val'``: train on ``train800``, evaluate on ``val200`` (hyper-parameter tuning);
* ``protocol='final'``: train on ``train800val200`` (1,000 examples), evaluate on ``test``.

Labels are derived from tfds features as task_adaptation does (CLEVR counts/distances, KITTI
closest-vehicle distance, dSprites bins, smallNORB azimuth/elevation). Images are resized to
``image_size`` x ``image_size`` (bicubic, NOAH's ``direct_resize``: no crop, no augmentation),
grayscale ones are repeated to 3 channels, and the result plugs into the general pipeline as a
:class:`wtjax.data.dataset.Dataset` (``train_batches`` / ``eval_batches``).

Reading needs the datasets prepared in tfds' ``array_record`` format in ``data_dir`` (no
TensorFlow needed to read). Preparing needs TensorFlow (``pip install
"tensorflow-datasets[tensorflow]"``), e.g. ``tfds build cifar100 --file_format=array_record``;
some sources are manual downloads (``diabetic_retinopathy_detection``, ``sun397``, ``dmlab``'s
size): see each dataset's tfds catalogue page.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from wtjax.data.dataset import Dataset, make_dataset
from wtjax.data.fields import resolve_data_dir
from wtjax.data.sources import ArraySource, DataError, Splits

PROTOCOLS = ("final", "val")
# The public ViT checkpoints expect pixels in [-1, 1]: (x - 0.5) / 0.5 on the [0, 1] scale.
VIT_MEAN, VIT_STD = (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)


def _threshold_label(value: float, thresholds: Sequence[float]) -> int:
    """Index of the last threshold strictly below ``value`` (task_adaptation's binning)."""
    return int(np.max(np.nonzero(np.asarray(thresholds) < value)[0]))


def _clevr_count(rec) -> int:
    return len(rec["objects"]["size"]) - 3  # 3..10 objects -> classes 0..7


def _clevr_dist(rec) -> int:
    dist = float(np.min(np.asarray(rec["objects"]["pixel_coords"])[:, 2]))
    return _threshold_label(dist, [0.0, 8.0, 8.5, 9.0, 9.5, 10.0, 100.0])


def _kitti_dist(rec) -> int:
    types = np.asarray(rec["objects"]["type"])
    z = np.asarray(rec["objects"]["location"]).reshape(-1, 3)[types < 3, 2]  # car, van, truck
    dist = float(np.min(np.concatenate([z, [1000.0]])))  # no vehicle -> the last class
    return _threshold_label(dist, [-100.0, 8.0, 20.0, 999.0])


def _binned(key: str, num_original: int, num_classes: int) -> Callable[[Any], int]:
    def label(rec) -> int:
        return int(np.floor(float(rec[key]) / (num_original / num_classes)))

    return label


def _key(key: str) -> Callable[[Any], int]:
    return lambda rec: int(rec[key])


@dataclasses.dataclass(frozen=True)
class VtabTask:
    """One VTAB-1k task.

    Attributes:
      tfds_name: tfds name with version pattern (the slices below assume these versions).
      train800, val200, test: tfds split strings (``split[a:b]`` slices joined by ``+``).
      num_classes: classes after the label function.
      label: ``label(record) -> int``.
      pixel_scale: multiply pixels by this first (dSprites stores 0/1 images).
    """

    tfds_name: str
    train800: str
    val200: str
    test: str
    num_classes: int
    label: Callable[[Any], int] = _key("label")
    pixel_scale: int = 1

    def splits(self, protocol: str) -> tuple[str, str]:
        """``(train split, eval split)`` of ``protocol``."""
        if protocol not in PROTOCOLS:
            raise ValueError(f"unknown VTAB protocol {protocol!r}; choose one of {PROTOCOLS}")
        if protocol == "val":
            return self.train800, self.val200
        return f"{self.train800}+{self.val200}", self.test


def _task(name, val, test, n, **kw) -> VtabTask:
    return VtabTask(name, "train[:800]", val, test, n, **kw)


#: The 19 VTAB-1k tasks (names as in NOAH / the VTAB paper's task list).
TASKS: dict[str, VtabTask] = {
    # Natural
    "caltech101": _task("caltech101:3.*.*", "train[2754:2954]", "test", 102),
    "cifar100": _task("cifar100:3.*.*", "train[45000:45200]", "test", 100),
    "dtd": _task("dtd:3.*.*", "validation[:200]", "test", 47),
    "oxford_flowers102": _task("oxford_flowers102:2.*.*", "validation[:200]", "test", 102),
    "oxford_iiit_pet": _task("oxford_iiit_pet:3.*.*", "train[2944:3144]", "test", 37),
    "svhn": _task("svhn_cropped:3.*.*", "train[65931:66131]", "test", 10),
    "sun397": _task("sun397/tfds:4.*.*", "validation[:200]", "test", 397),
    # Specialized
    "patch_camelyon": _task("patch_camelyon:2.*.*", "validation[:200]", "test", 2),
    "eurosat": _task("eurosat/rgb:2.*.*", "train[16200:16400]", "train[21600:]", 10),
    "resisc45": _task("resisc45:3.*.*", "train[18900:19100]", "train[25200:]", 45),
    "diabetic_retinopathy": _task(
        "diabetic_retinopathy_detection/btgraham-300:3.*.*", "validation[:200]", "test", 5
    ),
    # Structured
    "clevr_count": _task("clevr:3.*.*", "train[63000:63200]", "validation", 8, label=_clevr_count),
    "clevr_dist": _task("clevr:3.*.*", "train[63000:63200]", "validation", 6, label=_clevr_dist),
    "dmlab": _task("dmlab:2.0.1", "validation[:200]", "test", 6),
    "kitti": _task("kitti:3.*.*", "validation[:200]", "test", 4, label=_kitti_dist),
    "dsprites_loc": _task(
        "dsprites:2.*.*",
        "train[589824:590024]",
        "train[663552:]",
        16,
        label=_binned("label_x_position", 32, 16),
        pixel_scale=255,
    ),
    "dsprites_ori": _task(
        "dsprites:2.*.*",
        "train[589824:590024]",
        "train[663552:]",
        16,
        label=_binned("label_orientation", 40, 16),
        pixel_scale=255,
    ),
    "smallnorb_azi": _task("smallnorb:2.*.*", "test[:200]", "test[50%:]", 18, label=_key("label_azimuth")),
    "smallnorb_ele": _task("smallnorb:2.*.*", "test[:200]", "test[50%:]", 9, label=_key("label_elevation")),
}

_SLICE = re.compile(r"^(\w+)(?:\[(-?\d*)(%?):(-?\d*)(%?)\])?$")


def parse_split(spec: str) -> list[tuple[str, str, str]]:
    """``'train[:800]+test[50%:]'`` -> ``[('train', '', '800'), ('test', '50%', '')]``."""
    parts = []
    for part in spec.split("+"):
        m = _SLICE.match(part.strip())
        if not m:
            raise ValueError(
                f"cannot parse split {part!r} of {spec!r}; expected name or name[a:b] / name[a%:b%]"
            )
        name, a, ap, b, bp = m.groups()
        parts.append((name, (a or "") + (ap if a else ""), (b or "") + (bp if b else "")))
    return parts


def _bound(text: str, n: int, default: int) -> int:
    if not text:
        return default
    if text.endswith("%"):
        return int(round(float(text[:-1]) * n / 100))  # tfds' default 'closest' rounding
    value = int(text)
    return value + n if value < 0 else value


def resolve_split(spec: str, split_sizes: Mapping[str, int]) -> list[tuple[str, np.ndarray]]:
    """The ``(split name, indices)`` pieces of ``spec`` given each split's size; checks bounds."""
    pieces = []
    for name, a, b in parse_split(spec):
        if name not in split_sizes:
            raise DataError(
                f"split {spec!r} reads {name!r}, but the dataset has splits {sorted(split_sizes)}"
            )
        n = split_sizes[name]
        start, stop = _bound(a, n, 0), _bound(b, n, n)
        if not 0 <= start < stop <= n:
            raise DataError(f"split {spec!r}: slice [{start}:{stop}] is outside {name!r} ({n} examples)")
        pieces.append((name, np.arange(start, stop)))
    return pieces


def _to_rgb(image: np.ndarray, size: int, scale: int) -> np.ndarray:
    from PIL import Image  # lazy: only the data path needs PIL

    image = np.asarray(image)
    if scale != 1:
        image = image * scale
    image = image.astype(np.uint8)
    if image.ndim == 3 and image.shape[-1] == 1:
        image = image[..., 0]
    pil = Image.fromarray(image)
    if pil.size != (size, size):
        pil = pil.resize((size, size), Image.BICUBIC)
    out = np.asarray(pil.convert("RGB"))
    return out


class VtabSource:
    """A VTAB split as a random-access :class:`~wtjax.data.sources.Source` (resized RGB uint8).

    Args:
      records: ``{tfds split name: random-access records}`` (``tfds.data_source`` objects).
      spec: the split string (``'train[:800]+train[45000:45200]'``).
      task: the :class:`VtabTask` (label function, classes, pixel scale).
      image_size: output side length.
      what: a name for error messages.
    """

    def __init__(
        self, records: Mapping[str, Sequence], spec: str, task: VtabTask, image_size: int, what: str
    ):
        self._records = records
        self._pieces = resolve_split(spec, {k: len(v) for k, v in records.items()})
        self._offsets = np.cumsum([0] + [len(ix) for _, ix in self._pieces])
        self._task, self._size, self._what = task, int(image_size), what
        self.image_shape = (self._size, self._size, 3)

    def __len__(self) -> int:
        return int(self._offsets[-1])

    def get(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        indices = np.asarray(indices)
        images = np.empty((len(indices), *self.image_shape), np.uint8)
        labels = np.empty((len(indices),), np.int32)
        for k, i in enumerate(indices.tolist()):
            if not 0 <= i < len(self):
                raise IndexError(f"{self._what}: index {i} out of range ({len(self)} examples)")
            piece = int(np.searchsorted(self._offsets, i, side="right") - 1)
            split, ix = self._pieces[piece]
            rec = self._records[split][int(ix[i - self._offsets[piece]])]
            images[k] = _to_rgb(rec["image"], self._size, self._task.pixel_scale)
            label = self._task.label(rec)
            if not 0 <= label < self._task.num_classes:
                raise DataError(
                    f"{self._what}: example {i} has label {label}, outside [0, {self._task.num_classes})"
                )
            labels[k] = label
        return images, labels

    def materialize(self) -> ArraySource:
        """All examples decoded into memory (1,000 at 224px is 150 MB: fine for the train split)."""
        images, labels = self.get(np.arange(len(self)))
        return ArraySource(images, labels, what=self._what)


def _open_records(task: VtabTask, splits: set[str], data_dir: str | None, download: bool) -> dict:
    import tensorflow_datasets as tfds  # lazy: heavy

    try:
        return {
            s: tfds.data_source(task.tfds_name, split=s, data_dir=data_dir, download=False) for s in splits
        }
    except Exception as error:  # noqa: BLE001 - tfds raises several types; re-raised with advice
        if not download:
            raise DataError(
                f"VTAB: tfds dataset {task.tfds_name!r} is not readable in data_dir={data_dir!r} ({error}). "
                f"Prepare it in array_record format (needs TensorFlow), e.g. `tfds build "
                f"{task.tfds_name.split(':')[0]} --file_format=array_record --data_dir=...`, then pass "
                "that data_dir, or set download=True."
            ) from error
        tfds.builder(task.tfds_name, data_dir=data_dir).download_and_prepare(file_format="array_record")
        return {
            s: tfds.data_source(task.tfds_name, split=s, data_dir=data_dir, download=False) for s in splits
        }


def vtab_splits(
    task: str | VtabTask,
    *,
    protocol: str = "final",
    data_dir: str | None = None,
    image_size: int = 224,
    download: bool = False,
    records: Mapping[str, Sequence] | None = None,
) -> Splits:
    """The train (decoded into memory) and eval (decoded lazily) splits of one VTAB-1k task.

    Arguments as :func:`create_vtab_dataset`; the statistics are the ViT checkpoints' [-1, 1]
    scaling, the test split is described by its split string.
    """
    if isinstance(task, str):
        if task not in TASKS:
            raise ValueError(f"unknown VTAB task {task!r}; choose one of {sorted(TASKS)}")
        name, task = task, TASKS[task]
    else:
        name = task.tfds_name
    train_spec, eval_spec = task.splits(protocol)
    if records is None:
        needed = {s for spec in (train_spec, eval_spec) for s, _, _ in parse_split(spec)}
        records = _open_records(task, needed, data_dir, download)
    train = VtabSource(records, train_spec, task, image_size, f"vtab/{name} {train_spec}").materialize()
    test = VtabSource(records, eval_spec, task, image_size, f"vtab/{name} {eval_spec}")
    return Splits(train, test, task.num_classes, (VIT_MEAN, VIT_STD), f"vtab/{name}", eval_spec)


def create_vtab_dataset(
    task: str | VtabTask,
    *,
    protocol: str = "final",
    data_dir: str | None = None,
    image_size: int = 224,
    seed: int = 0,
    mean: Sequence[float] = VIT_MEAN,
    std: Sequence[float] = VIT_STD,
    eval_subset: int | None = None,
    download: bool = False,
    process_index: int = 0,
    process_count: int = 1,
    records: Mapping[str, Sequence] | None = None,
) -> Dataset:
    """The VTAB-1k :class:`~wtjax.data.dataset.Dataset` of one task, without augmentation.

    Args:
      task: a key of :data:`TASKS` or a :class:`VtabTask`.
      protocol: ``'final'`` (train800val200 -> test) or ``'val'`` (train800 -> val200).
      data_dir: tfds data_dir holding the prepared (array_record) dataset.
      image_size: side of the resized square images (224 for ViT-B/16 as in Table 3).
      seed: run seed (epoch order).
      mean, std: normalisation on the [0, 1] scale (default: the ViT checkpoints' [-1, 1]).
      eval_subset: evaluate on the first N examples only (cheap checks).
      download: let tfds prepare a missing dataset (needs TensorFlow and internet).
      process_index, process_count: this process among the data-loading processes.
      records: ``{split: records}`` to read instead of tfds (tests, custom storage).

    Returns:
      A Dataset with the 1,000 (or 800) training images in memory and a lazily decoded eval split.
    """
    splits = vtab_splits(
        task, protocol=protocol, data_dir=data_dir, image_size=image_size, download=download, records=records
    )
    return make_dataset(
        splits.description,
        train=splits.train,
        test=splits.test,
        num_classes=splits.num_classes,
        mean=mean,
        std=std,
        seed=seed,
        eval_subset=eval_subset,
        augment=False,  # NOAH's VTAB setting: --no_aug --direct_resize
        process_index=process_index,
        process_count=process_count,
        test_name=splits.test_name,
    )


def load_vtab(fields: Mapping[str, Any]) -> Splits:
    """The loader of ``config.data.name = 'vtab/<task>'`` (final) or ``'vtab/<task>/val'``.

    Reads ``data_dir`` (None: ``$WTJAX_DATA_DIR``, else tfds' default), ``image_shape`` (its
    height is the resize target) and ``download``. NOAH's setting has no augmentation: set
    ``augment=False`` (``configs/vtab_lora.py`` does).
    """
    parts = str(fields["name"]).split("/")
    if len(parts) not in (2, 3) or parts[0] != "vtab" or (len(parts) == 3 and parts[2] != "val"):
        raise ValueError(f"VTAB data name must be 'vtab/<task>' or 'vtab/<task>/val', got {fields['name']!r}")
    return vtab_splits(
        parts[1],
        protocol="val" if len(parts) == 3 else "final",
        data_dir=resolve_data_dir(fields),
        image_size=int(tuple(fields["image_shape"])[0]),
        download=bool(fields["download"]),
    )
