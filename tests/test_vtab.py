"""VTAB-1k splits, label derivations and the Dataset it builds (tfds mock data, no downloads)."""

import numpy as np
import pytest

from wtjax.data import vtab
from wtjax.data.sources import DataError


def test_nineteen_tasks_with_the_1k_protocol():
    assert len(vtab.TASKS) == 19
    big = 10**6
    for name, task in vtab.TASKS.items():
        sizes = {s: big for s in ("train", "validation", "test")}
        train, evaluation = task.splits("final")
        assert sum(len(ix) for _, ix in vtab.resolve_split(train, sizes)) == 1000, name
        train, evaluation = task.splits("val")
        assert sum(len(ix) for _, ix in vtab.resolve_split(train, sizes)) == 800, name
        assert sum(len(ix) for _, ix in vtab.resolve_split(evaluation, sizes)) == 200, name
        # The validation slice never overlaps the 800 training examples.
        (tr_split, tr_ix), (va_split, va_ix) = (
            vtab.resolve_split(task.train800, sizes)[0],
            vtab.resolve_split(task.val200, sizes)[0],
        )
        assert tr_split != va_split or not set(tr_ix) & set(va_ix), name


def test_split_parsing_percent_and_errors():
    pieces = vtab.resolve_split("train[:3]+test[50%:]", {"train": 10, "test": 9})
    assert [(s, ix.tolist()) for s, ix in pieces] == [("train", [0, 1, 2]), ("test", [4, 5, 6, 7, 8])]
    with pytest.raises(DataError, match="outside"):
        vtab.resolve_split("train[5:20]", {"train": 10})
    with pytest.raises(DataError, match="has splits"):
        vtab.resolve_split("validation[:2]", {"train": 10})
    with pytest.raises(ValueError, match="cannot parse"):
        vtab.parse_split("train[::2]")
    with pytest.raises(ValueError, match="protocol"):
        vtab.TASKS["dtd"].splits("test")


def test_structured_label_functions():
    T = vtab.TASKS
    objs = {"size": np.zeros(5), "pixel_coords": np.array([[1.0, 2.0, 9.2], [0.0, 0.0, 12.0]])}
    assert T["clevr_count"].label({"objects": objs}) == 2  # 5 objects -> class 2
    assert T["clevr_dist"].label({"objects": objs}) == 3  # 9.0 < 9.2 <= 9.5
    car_near = {"type": np.array([0, 4]), "location": np.array([[0, 0, 5.0], [0, 0, 2.0]])}
    car_mid = {"type": np.array([2]), "location": np.array([[0, 0, 10.0]])}
    no_vehicle = {"type": np.array([4]), "location": np.array([[0, 0, 3.0]])}
    assert [T["kitti"].label({"objects": o}) for o in (car_near, car_mid, no_vehicle)] == [0, 1, 3]
    assert T["dsprites_ori"].label({"label_orientation": 39}) == 15
    assert T["dsprites_ori"].label({"label_orientation": 2}) == 0
    assert T["dsprites_loc"].label({"label_x_position": 31}) == 15
    assert T["smallnorb_azi"].label({"label_azimuth": 17, "label_elevation": 1}) == 17


def test_gray_and_binary_images_become_rgb():
    task = vtab.TASKS["dsprites_ori"]
    rec = {"image": np.eye(4, dtype=np.uint8)[..., None], "label_orientation": 0}
    src = vtab.VtabSource({"train": [rec] * 3}, "train[:2]", task, 4, "t")
    images, labels = src.get(np.array([0, 1]))
    assert images.shape == (2, 4, 4, 3) and images.dtype == np.uint8 and labels.tolist() == [0, 0]
    np.testing.assert_array_equal(images[0, ..., 1], np.eye(4) * 255)
    bad = vtab.VtabSource(
        {"train": [{"image": rec["image"], "label": 7}]}, "train", vtab.TASKS["dmlab"], 4, "t"
    )
    with pytest.raises(DataError, match="label 7"):
        bad.get(np.array([0]))


def test_dataset_from_tfds_mock_data():
    tfds = pytest.importorskip("tensorflow_datasets")
    small = vtab.VtabTask("cifar100", "train[:12]", "train[12:16]", "test[:6]", 100)
    with tfds.testing.mock_data(num_examples=20):
        ds = vtab.create_vtab_dataset(small, protocol="final", image_size=16, seed=1)
        val = vtab.create_vtab_dataset(small, protocol="val", image_size=16, seed=1)
    assert (ds.num_train, ds.num_eval, ds.image_shape) == (16, 6, (16, 16, 3))
    assert (val.num_train, val.num_eval) == (12, 4)
    batch = next(ds.train_batches(8))
    assert batch["image"].shape == (8, 16, 16, 3) and batch["image"].dtype == np.float32
    assert -1.0 <= batch["image"].min() and batch["image"].max() <= 1.0  # ViT [-1, 1] scaling
    assert ((0 <= batch["label"]) & (batch["label"] < 100)).all()
    evals = list(ds.eval_batches(4))
    assert sum(int(b["mask"].sum()) for b in evals) == 6


def test_config_path_gives_the_same_batches_as_create_vtab_dataset(monkeypatch):
    """``config.data.name = 'vtab/<task>'`` goes through the loader registry to the same dataset."""
    tfds = pytest.importorskip("tensorflow_datasets")
    from wtjax.data.fields import data_config
    from wtjax.data.pipeline import create_dataset

    small = vtab.VtabTask("cifar100", "train[:12]", "train[12:16]", "test[:6]", 100)
    monkeypatch.setitem(vtab.TASKS, "cifar100", small)
    cfg = data_config("vtab/cifar100/val", image_shape=(16, 16, 3), augment=False, download=False)
    with tfds.testing.mock_data(num_examples=20):
        direct = vtab.create_vtab_dataset("cifar100", protocol="val", image_size=16, seed=1)
        ds = create_dataset(cfg, seed=1)
    assert (ds.num_train, ds.num_eval, ds.eval_split) == (12, 4, "train[12:16]")
    a, b = next(ds.train_batches(4)), next(direct.train_batches(4))
    np.testing.assert_array_equal(a["image"], b["image"])  # same order, ViT [-1, 1] statistics
    np.testing.assert_array_equal(a["label"], b["label"])
    np.testing.assert_array_equal(next(ds.eval_batches(4))["image"], next(direct.eval_batches(4))["image"])
