"""Input pipeline: every source, the determinism contract, process slicing, eval padding, errors.

All data is generated in tmp_path or mocked (tfds.testing.mock_data): no network, no ../shared/data.
"""

from __future__ import annotations

import os
import pickle

import numpy as np
import pytest
from PIL import Image

from wtjax.data import cifar_files, image_folder, loaders, tfds_source, vtab
from wtjax.data.augment import Normalizer, crop_flip, sample_crop_flip
from wtjax.data.dataset import make_dataset
from wtjax.data.fields import DATA_DIR_ENV, data_config, resolve_data_dir
from wtjax.data.loaders import CIFAR_COPY_STATS
from wtjax.data.pipeline import create_dataset
from wtjax.data.sources import ArraySource, DataError, Downsampled, RecordSource


def data(name, **fields):
    """A complete ``config.data`` as a dict; augmentation off unless asked for."""
    return dict(data_config(name, **{"augment": False, **fields}))


def take(it, n):
    return [next(it) for _ in range(n)]


def assert_batches_equal(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        assert x.keys() == y.keys()
        for k in x:
            np.testing.assert_array_equal(x[k], y[k])


def id_dataset(n_train=10, n_test=7, **kw):
    """Images whose every pixel is the example id (labels too), so rows can be traced."""
    ids = np.arange(n_train + n_test)
    images = np.broadcast_to(ids[:, None, None, None], (len(ids), 4, 4, 1)).astype(np.uint8)
    train = ArraySource(images[:n_train], ids[:n_train])
    test = ArraySource(images[n_train:], ids[n_train:])
    kw.setdefault("seed", 0)
    return make_dataset("ids", train=train, test=test, num_classes=256, mean=(0.0,), std=(1 / 255,), **kw)


def ids_of(batch):
    # With mean 0 and std 1/255 the normalised pixel equals the raw uint8 value.
    return np.rint(batch["image"][:, 0, 0, 0]).astype(int)


# ----------------------------------------------------------------------------- augmentation
def test_crop_flip_matches_per_image_reference():
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(6, 5, 7, 3), dtype=np.uint8)
    offsets, flips = sample_crop_flip(rng, 6, padding=2)
    out = crop_flip(images, offsets, flips, padding=2)
    for i in range(6):
        padded = np.pad(images[i], ((2, 2), (2, 2), (0, 0)))
        ref = padded[offsets[i, 0] : offsets[i, 0] + 5, offsets[i, 1] : offsets[i, 1] + 7]
        np.testing.assert_array_equal(out[i], ref[:, ::-1] if flips[i] else ref)
    # Offsets (p, p) without flips is the identity.
    centre = np.full((6, 2), 2)
    np.testing.assert_array_equal(crop_flip(images, centre, None, padding=2), images)


def test_normalizer_is_affine_and_invertible():
    norm = Normalizer((0.5, 0.25), (0.2, 0.1))
    x = np.arange(256, dtype=np.uint8).reshape(2, 8, 8, 2)
    y = norm(x)
    assert y.dtype == np.float32
    np.testing.assert_allclose(y, (x / 255.0 - np.array([0.5, 0.25])) / np.array([0.2, 0.1]), rtol=1e-5)
    np.testing.assert_allclose(norm.invert(y), x, atol=1e-3)


# ----------------------------------------------------------------------------- determinism
def test_training_batches_are_deterministic_and_resumable():
    cfg = data("synthetic", num_train=40, image_shape=(8, 8, 3), augment=True)
    ds = create_dataset(cfg, seed=3)
    run = take(ds.train_batches(8), 12)  # 5 steps per epoch: crosses two epoch boundaries
    assert_batches_equal(run, take(create_dataset(cfg, seed=3).train_batches(8), 12))
    assert_batches_equal(run[7:], take(ds.train_batches(8, start_step=7), 5))
    other = take(create_dataset(cfg, seed=4).train_batches(8), 12)
    assert not all(np.array_equal(a["image"], b["image"]) for a, b in zip(run, other, strict=True))
    # Same step, same examples, but augmentation changes the pixels (some crops/flips differ).
    plain = take(create_dataset({**cfg, "augment": False}, seed=3).train_batches(8), 12)
    np.testing.assert_array_equal(run[0]["label"], plain[0]["label"])
    assert not np.array_equal(run[0]["image"], plain[0]["image"])


def test_each_epoch_visits_distinct_examples_and_drops_remainder():
    ds = id_dataset(n_train=10)
    batches = take(ds.train_batches(3), 9)  # 3 steps per epoch, 1 example dropped each epoch
    epochs = [np.concatenate([ids_of(b) for b in batches[e * 3 : e * 3 + 3]]) for e in range(3)]
    for ids in epochs:
        assert len(set(ids.tolist())) == 9 and set(ids.tolist()) <= set(range(10))
    assert not (np.array_equal(epochs[0], epochs[1]) and np.array_equal(epochs[1], epochs[2]))
    assert all(b["label"].dtype == np.int32 for b in batches)
    np.testing.assert_array_equal(batches[0]["label"], ids_of(batches[0]))


def test_process_slices_concatenate_to_global_batch():
    cfg = data("synthetic", num_train=48, num_eval=21, augment=True)
    whole = take(create_dataset(cfg, seed=5).train_batches(8), 8)
    parts = [
        take(create_dataset(cfg, seed=5, process_index=i, process_count=2).train_batches(8), 8)
        for i in (0, 1)
    ]
    for k in range(8):
        for key in ("image", "label"):
            np.testing.assert_array_equal(np.concatenate([parts[0][k][key], parts[1][k][key]]), whole[k][key])
    whole_eval = list(create_dataset(cfg, seed=5).eval_batches(8))
    eval_parts = [
        list(create_dataset(cfg, seed=5, process_index=i, process_count=2).eval_batches(8)) for i in (0, 1)
    ]
    assert len(eval_parts[0]) == len(eval_parts[1]) == len(whole_eval) == 3
    for k in range(3):
        for key in ("image", "label", "mask"):
            got = np.concatenate([eval_parts[0][k][key], eval_parts[1][k][key]])
            np.testing.assert_array_equal(got, whole_eval[k][key])
    with pytest.raises(ValueError, match="divisible"):
        create_dataset(cfg, seed=5, process_count=3).train_batches(8)


def test_eval_pass_is_padded_with_mask_and_covers_each_example_once():
    ds = id_dataset(n_train=10, n_test=10)
    batches = list(ds.eval_batches(4))
    assert [b["image"].shape[0] for b in batches] == [4, 4, 4]
    assert all(b["mask"].dtype == np.float32 for b in batches)
    np.testing.assert_array_equal(batches[-1]["mask"], [1, 1, 0, 0])
    assert not batches[-1]["image"][2:].any() and not batches[-1]["label"][2:].any()
    real = np.concatenate([ids_of(b)[b["mask"] == 1] for b in batches])
    np.testing.assert_array_equal(np.sort(real), np.arange(10, 20))


def test_holdout_is_disjoint_fixed_and_subset_applies_to_train():
    n = 30
    a = id_dataset(n_train=n, holdout=6, seed=0)
    b = id_dataset(n_train=n, holdout=6, seed=9)
    ev = np.concatenate([ids_of(x) for x in a.eval_batches(6)])
    np.testing.assert_array_equal(ev, np.concatenate([ids_of(x) for x in b.eval_batches(6)]))
    train = np.concatenate([ids_of(x) for x in take(a.train_batches(24), 1)])
    assert a.num_train == 24 and a.num_eval == 6 and "holdout" in a.eval_split
    assert set(ev.tolist()).isdisjoint(train.tolist())
    assert set(ev.tolist()) | set(train.tolist()) == set(range(n))
    sub = id_dataset(n_train=n, holdout=6, train_subset=5)
    sub_ids = np.concatenate([ids_of(x) for x in take(sub.train_batches(5), 1)])
    assert sub.num_train == 5 and set(sub_ids.tolist()) <= set(train.tolist())
    with pytest.raises(ValueError, match="holdout"):
        id_dataset(n_train=n, holdout=n)


# ----------------------------------------------------------------------------- sources
@pytest.mark.parametrize("bad", [-1, 3])
def test_labels_outside_the_classes_are_errors_on_both_sides(bad):
    images = np.zeros((4, 2, 2, 1), np.uint8)
    good = ArraySource(images, [0, 1, 2, 0])
    wrong = ArraySource(images, [0, bad, 2, 0])
    kw = dict(num_classes=3, mean=(0.0,), std=(1.0,), seed=0)
    for train, test in ((wrong, good), (good, wrong)):
        with pytest.raises(DataError, match=rf"ids: label {bad} is outside \[0, 3\)"):
            make_dataset("ids", train=train, test=test, **kw)
    records = [{"image": images[0], "label": lab} for lab in (0, bad)]
    source = RecordSource(records, (2, 2, 1), what="recs", num_classes=3)
    np.testing.assert_array_equal(source.get(np.array([0]))[1], [0])
    with pytest.raises(DataError, match=rf"recs: record 1 has label {bad}, outside \[0, 3\)"):
        source.get(np.array([0, 1]))


def test_downsample_is_an_exact_average_pool_and_rejects_bad_factors():
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (3, 8, 8, 3), dtype=np.uint8)
    src = Downsampled(ArraySource(images, np.arange(3)), 2)
    got, labels = src.get(np.array([2, 0]))
    want = images[[2, 0]].astype(np.float64).reshape(2, 4, 2, 4, 2, 3).mean(axis=(2, 4))
    assert src.image_shape == (4, 4, 3) and got.dtype == np.uint8 and labels.tolist() == [2, 0]
    assert np.max(np.abs(got - want)) <= 0.5
    with pytest.raises(DataError, match="divisor"):
        Downsampled(ArraySource(images, np.arange(3)), 3)
    ds = create_dataset(data("digits", downsample=2), seed=0)
    assert ds.image_shape == (8, 8, 1) and ds.crop_padding == 1
    assert next(ds.train_batches(4))["image"].shape == (4, 8, 8, 1)


def test_digits_shapes_normalisation_and_labels():
    ds = create_dataset(data("digits", augment=True), seed=0)
    assert (ds.name, ds.image_shape, ds.num_classes, ds.num_train, ds.num_eval) == (
        "digits",
        (16, 16, 1),
        10,
        1500,
        297,
    )
    assert ds.flip is False and ds.crop_padding == 2
    x = np.concatenate([b["image"] for b in ds.eval_batches(100)])
    assert x.dtype == np.float32 and abs(x.mean()) < 0.1 and abs(x.std() - 1) < 0.1
    labels = np.concatenate([b["label"] for b in take(ds.train_batches(250), 6)])
    assert set(labels.tolist()) == set(range(10))


def test_synthetic_is_learnable_and_independent_of_run_seed():
    cfg = data("synthetic", num_classes=4, image_shape=(6, 6, 2), num_train=200, num_eval=80)
    ds = create_dataset(cfg, seed=0)
    assert ds.image_shape == (6, 6, 2) and ds.num_classes == 4
    train = next(ds.train_batches(200))
    x, y = train["image"].reshape(200, -1), train["label"]
    centroids = np.stack([x[y == k].mean(0) for k in range(4)])
    ev = next(ds.eval_batches(80))
    pred = np.argmin(((ev["image"].reshape(80, -1)[:, None] - centroids) ** 2).sum(-1), axis=1)
    assert (pred == ev["label"]).mean() > 0.9
    other = next(create_dataset(cfg, seed=1).eval_batches(80))
    np.testing.assert_array_equal(other["image"], ev["image"])
    reseeded = next(create_dataset({**cfg, "data_seed": 1}, seed=0).eval_batches(80))
    assert not np.array_equal(reseeded["image"], ev["image"])


def test_tfds_cifar10_under_mock_data():
    tfds = pytest.importorskip("tensorflow_datasets")
    with tfds.testing.mock_data(num_examples=12):
        ds = create_dataset(data("cifar10", augment=False), seed=0)
        assert (ds.image_shape, ds.num_classes, ds.num_train, ds.num_eval) == ((32, 32, 3), 10, 12, 12)
        batch = next(ds.train_batches(4))
        assert batch["image"].shape == (4, 32, 32, 3) and batch["image"].dtype == np.float32
        assert batch["label"].dtype == np.int32 and ((batch["label"] >= 0) & (batch["label"] < 10)).all()
        # Normalisation is (x / 255 - mean) / std of integer pixels: inverting gives integers in range.
        raw = ds.normalizer.invert(batch["image"])
        np.testing.assert_allclose(raw, np.rint(raw), atol=1e-3)
        assert raw.min() > -0.5 and raw.max() < 255.5
        ev = list(ds.eval_batches(5))
        assert [b["mask"].sum() for b in ev] == [5, 5, 2]
        aug = next(create_dataset(data("cifar10", augment=True), seed=0).train_batches(4))
        assert aug["image"].shape == (4, 32, 32, 3)


def _cifar_records(rng, n):
    labels = rng.integers(0, 10, size=n, dtype=np.uint8)
    pixels = rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)
    return labels, pixels


def _expected_nhwc(pixels):
    # Independent of the loader: pixel (h, w, c) is byte c * 1024 + h * 32 + w of the record.
    h, w, c = np.meshgrid(np.arange(32), np.arange(32), np.arange(3), indexing="ij")
    return pixels[:, c * 1024 + h * 32 + w]


def _write_binary(root, rng, n_per_file=3, n_test=5):
    d = root / "cifar-10-batches-bin"
    d.mkdir(parents=True)
    for name, n in [*[(f"data_batch_{i}.bin", n_per_file) for i in range(1, 6)], ("test_batch.bin", n_test)]:
        labels, pixels = _cifar_records(rng, n)
        np.concatenate([labels[:, None], pixels], axis=1).tofile(d / name)
    return d, labels, pixels  # the last ones written are the test split


def test_cifar_binary_directory_layout_and_pixels(tmp_path):
    d, labels, pixels = _write_binary(tmp_path, np.random.default_rng(0))
    for data_dir in (tmp_path, d):  # the parent folder or cifar-10-batches-bin itself
        ds = create_dataset(data("cifar10", data_dir=str(data_dir)), seed=0)
        assert (ds.num_train, ds.num_eval, ds.eval_split) == (15, 5, "test")
        ev = next(ds.eval_batches(5))
        np.testing.assert_array_equal(ev["label"], labels)
        np.testing.assert_allclose(ds.normalizer.invert(ev["image"]), _expected_nhwc(pixels), atol=1e-3)


def test_cifar_binary_corrupt_or_incomplete_is_an_error(tmp_path):
    d, *_ = _write_binary(tmp_path, np.random.default_rng(1))
    raw = (d / "data_batch_2.bin").read_bytes()
    (d / "data_batch_2.bin").write_bytes(raw[:-1])
    with pytest.raises(DataError, match=r"data_batch_2\.bin.*3073"):
        create_dataset(data("cifar10", data_dir=str(d)), seed=0)
    (d / "data_batch_2.bin").write_bytes(raw)
    os.remove(d / "data_batch_4.bin")
    with pytest.raises(DataError, match="data_batch_4"):
        create_dataset(data("cifar10", data_dir=str(d)), seed=0)


def test_cifar_pickle_requires_opt_in(tmp_path):
    d = tmp_path / "cifar-10-batches-py"
    d.mkdir()
    rng = np.random.default_rng(2)
    for name in [*(f"data_batch_{i}" for i in range(1, 6)), "test_batch"]:
        labels, pixels = _cifar_records(rng, 4)
        with open(d / name, "wb") as f:
            pickle.dump({b"data": pixels, b"labels": labels.tolist(), b"batch_label": b"x"}, f)
    with pytest.raises(DataError, match="allow_pickle=True"):
        create_dataset(data("cifar10", data_dir=str(tmp_path)), seed=0)
    ds = create_dataset(data("cifar10", data_dir=str(tmp_path), allow_pickle=True), seed=0)
    assert (ds.num_train, ds.num_eval) == (20, 4)
    ev = next(ds.eval_batches(4))
    np.testing.assert_array_equal(ev["label"], labels)
    np.testing.assert_allclose(ds.normalizer.invert(ev["image"]), _expected_nhwc(pixels), atol=1e-3)


def _write_pickles(directory, rng, n=4, bad_label=None):
    directory.mkdir()
    for name in [*(f"data_batch_{i}" for i in range(1, 6)), "test_batch"]:
        labels, pixels = _cifar_records(rng, n)
        labels = labels.tolist()
        if bad_label is not None and name == "data_batch_3":
            labels[1] = bad_label
        with open(directory / name, "wb") as f:
            pickle.dump({b"data": pixels, b"labels": labels}, f)


@pytest.mark.parametrize("label", [-1, 10])
def test_cifar_pickle_labels_out_of_range_are_errors(tmp_path, label):
    _write_pickles(tmp_path / "cifar-10-batches-py", np.random.default_rng(6), bad_label=label)
    with pytest.raises(DataError, match=rf"data_batch_3: label {label} out of range \[0, 10\)"):
        create_dataset(data("cifar10", data_dir=str(tmp_path), allow_pickle=True), seed=0)


@pytest.mark.parametrize("value", ["false", "False", 0, None])
def test_allow_pickle_must_be_a_real_bool(tmp_path, monkeypatch, value):
    _write_pickles(tmp_path / "cifar-10-batches-py", np.random.default_rng(7))
    monkeypatch.setattr(cifar_files.pickle, "load", lambda *a, **k: pytest.fail("unpickled"))
    with pytest.raises(TypeError, match=r"config\.data\.allow_pickle must be True or False, got"):
        # A plain dict, as a library call builds it (a ConfigDict would refuse the string itself).
        create_dataset({**data("cifar10", data_dir=str(tmp_path)), "allow_pickle": value}, seed=0)
    with pytest.raises(TypeError, match="allow_pickle must be True or False"):
        cifar_files.load_release("pickle", str(tmp_path / "cifar-10-batches-py"), allow_pickle=value)


def test_boolean_data_fields_reject_strings_and_flip_accepts_none():
    for field in ("augment", "download", "flip"):
        with pytest.raises(TypeError, match=rf"config\.data\.{field} must be True"):
            create_dataset({**data("synthetic"), field: "no"}, seed=0)
    assert create_dataset({**data("synthetic", flip=None), "augment": np.bool_(True)}, seed=0).flip


def _write_folder(root, classes, per_class, shape, rng, ext="png"):
    pixels = {}
    for c in classes:
        (root / c).mkdir(parents=True)
        for i in range(per_class):
            img = rng.integers(0, 256, size=shape, dtype=np.uint8)
            path = root / c / f"{i:04d}.{ext}"
            Image.fromarray(img).save(path)
            pixels[str(path)] = img
    return pixels


def test_image_folder_pixels_labels_and_cache(tmp_path, monkeypatch):
    rng = np.random.default_rng(3)
    root, cache = tmp_path / "imgs", tmp_path / "cache"
    _write_folder(root / "train", ["cat", "ant", "bee"], 4, (8, 6, 3), rng)
    _write_folder(root / "test", ["cat", "ant", "bee"], 2, (8, 6, 3), rng)
    cfg = data("image_folder", data_dir=str(root), cache_dir=str(cache))
    ds = create_dataset(cfg, seed=0)
    assert (ds.num_classes, ds.image_shape, ds.num_train, ds.num_eval) == (3, (8, 6, 3), 12, 6)
    ev = next(ds.eval_batches(6))
    # Sorted class names give labels ant=0, bee=1, cat=2; eval order is the sorted file order.
    np.testing.assert_array_equal(ev["label"], [0, 0, 1, 1, 2, 2])
    want = np.stack(
        [
            np.asarray(Image.open(root / "test" / c / f"{i:04d}.png"))
            for c in ("ant", "bee", "cat")
            for i in (0, 1)
        ]
    )
    np.testing.assert_allclose(ds.normalizer.invert(ev["image"]), want, atol=1e-3)
    assert len(list(cache.glob("*.npz"))) == 2
    # Second load must come from the cache: decoding is made to fail.
    monkeypatch.setattr(image_folder, "_decode", lambda p: (_ for _ in ()).throw(AssertionError(p)))
    again = next(create_dataset(cfg, seed=0).eval_batches(6))
    np.testing.assert_array_equal(again["image"], ev["image"])
    # Touching a file changes the key, so the tree is decoded again.
    os.utime(root / "test" / "ant" / "0000.png", ns=(1, 1))
    with pytest.raises(AssertionError):
        create_dataset(cfg, seed=0)


def _spoil(cache, problem):
    """Overwrites the cache file ``cache`` with a broken or stale one."""
    with np.load(cache) as z:
        images, labels = z["images"], z["labels"]
    if problem == "truncated":
        cache.write_bytes(cache.read_bytes()[: cache.stat().st_size // 2])
    elif problem == "empty":
        cache.write_bytes(b"")
    elif problem == "not_npz":
        cache.write_bytes(b"garbage" * 10)
    elif problem == "missing_key":
        np.savez(cache, images=images)
    elif problem == "wrong_shape":
        np.savez(cache, images=images[:, :4], labels=labels)
    elif problem == "wrong_count":
        np.savez(cache, images=images[:-1], labels=labels[:-1])
    elif problem == "wrong_dtype":
        np.savez(cache, images=images.astype(np.float32), labels=labels)
    else:  # wrong_labels
        np.savez(cache, images=images, labels=labels[::-1])


@pytest.mark.parametrize(
    "problem",
    [
        "truncated",
        "empty",
        "not_npz",
        "missing_key",
        "wrong_shape",
        "wrong_count",
        "wrong_dtype",
        "wrong_labels",
    ],
)
def test_a_bad_image_cache_is_rebuilt_with_one_warning(tmp_path, caplog, problem):
    root, cache_dir = tmp_path / "imgs", tmp_path / "cache"
    _write_folder(root, ["a", "b"], 3, (8, 6, 3), np.random.default_rng(8))
    cfg = data("image_folder", data_dir=str(root), cache_dir=str(cache_dir), holdout=2)
    want = next(create_dataset(cfg, seed=0).eval_batches(2))
    (cache,) = cache_dir.glob("*.npz")
    _spoil(cache, problem)
    with caplog.at_level("WARNING"):
        got = next(create_dataset(cfg, seed=0).eval_batches(2))
    assert_batches_equal([got], [want])
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1 and "rebuilding it" in warnings[0] and "\n" not in warnings[0], warnings
    caplog.clear()  # the rebuilt cache is valid again: read without a warning or decoding
    with caplog.at_level("WARNING"):
        create_dataset(cfg, seed=0)
    assert not [r for r in caplog.records if r.levelname == "WARNING"]
    assert [p.name for p in cache_dir.iterdir()] == [cache.name]


def test_a_killed_cache_writer_leaves_no_partial_cache(tmp_path, monkeypatch):
    root, cache_dir = tmp_path / "imgs", tmp_path / "cache"
    _write_folder(root, ["a", "b"], 2, (8, 8, 3), np.random.default_rng(9))
    cfg = data("image_folder", data_dir=str(root), cache_dir=str(cache_dir), holdout=1)

    def killed(f, **arrays):  # writes part of the file, then the process is interrupted
        f.write(b"PK\x03\x04 partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(image_folder.np, "savez", killed)
    with pytest.raises(KeyboardInterrupt):
        create_dataset(cfg, seed=0)
    assert list(cache_dir.iterdir()) == []  # neither a partial cache nor a stray temporary file


def test_cifar10_class_folder_copy_needs_holdout(tmp_path):
    rng = np.random.default_rng(4)
    classes = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    _write_folder(tmp_path / "train", classes, 2, (32, 32, 3), rng, ext="jpg")
    cfg = data("cifar10", data_dir=str(tmp_path), cache_dir="")
    with pytest.raises(ValueError, match="holdout"):
        create_dataset(cfg, seed=0)
    ds = create_dataset({**cfg, "holdout": 4, "augment": True}, seed=0)
    assert (ds.num_train, ds.num_eval, ds.image_shape) == (16, 4, (32, 32, 3))
    assert (ds.normalizer.mean, ds.normalizer.std) == CIFAR_COPY_STATS
    assert next(ds.train_batches(8))["image"].shape == (8, 32, 32, 3)


@pytest.mark.parametrize(
    "problem",
    ["empty_class", "non_image", "wrong_shape", "corrupt", "wrong_cifar_classes", "wrong_cifar_shape"],
)
def test_image_folder_bad_trees_are_errors(tmp_path, problem):
    rng = np.random.default_rng(5)
    root = tmp_path / "imgs"
    _write_folder(root, ["a", "b"], 2, (8, 8, 3), rng)
    name, match = "image_folder", None
    if problem == "empty_class":
        (root / "c").mkdir()
        match = "empty"
    elif problem == "non_image":
        (root / "a" / "notes.txt").write_text("hi")
        match = "non-image"
    elif problem == "wrong_shape":
        Image.fromarray(np.zeros((9, 8, 3), np.uint8)).save(root / "b" / "odd.png")
        match = r"odd\.png.*\(9, 8, 3\)"
    elif problem == "corrupt":
        (root / "b" / "bad.png").write_bytes(b"not a png")
        match = r"bad\.png"
    elif problem == "wrong_cifar_classes":
        name, match = "cifar10", "2 class folders"
    else:
        name, match = "cifar10", r"\(32, 32, 3\)"
        for c in "cdefghij":
            _write_folder(root, [c], 1, (8, 8, 3), rng)
    with pytest.raises(DataError, match=match):
        create_dataset(data(name, data_dir=str(root), cache_dir="", holdout=1), seed=0)


# ----------------------------------------------------------------------------- errors
def test_config_errors_are_clear(tmp_path):
    with pytest.raises(ValueError, match="unknown dataset name 'mnist'.*cifar10"):
        create_dataset(data("mnist"), seed=0)
    with pytest.raises(DataError, match="does not exist"):
        create_dataset(data("cifar10", data_dir=str(tmp_path / "nope")), seed=0)
    with pytest.raises(DataError, match="no CIFAR-10 copy found"):
        create_dataset(data("cifar10", data_dir=str(tmp_path)), seed=0)
    with pytest.raises(ValueError, match="data_dir"):
        create_dataset(data("image_folder"), seed=0)
    with pytest.raises(ValueError, match="channels"):
        create_dataset(data("synthetic", mean=(0.5,), std=(0.2,)), seed=0)
    ds = create_dataset(data("synthetic", num_train=16), seed=0)
    with pytest.raises(ValueError, match="exceeds"):
        ds.train_batches(32)


def test_unprepared_tfds_fails_fast_with_instructions(tmp_path, monkeypatch):
    pytest.importorskip("tensorflow_datasets")
    cfg = data("imagenet32", data_dir=str(tmp_path))
    monkeypatch.setattr(tfds_source, "tensorflow_available", lambda: False)
    with pytest.raises(DataError, match=r"tensorflow-datasets\[tensorflow\].*data_dir="):
        create_dataset(cfg, seed=0)
    # With TensorFlow present but no network, stop before tfds starts its download retries.
    monkeypatch.setattr(tfds_source, "tensorflow_available", lambda: True)
    monkeypatch.setattr(tfds_source, "host_reachable", lambda host, **kw: False)
    with pytest.raises(DataError, match="unreachable"):
        create_dataset(cfg, seed=0)
    with pytest.raises(DataError, match="download=False"):
        create_dataset({**cfg, "download": False}, seed=0)


def test_locked_configdict_with_placeholders_uses_defaults():
    cfg = data_config("synthetic", num_train=32, augment=True)  # the job's locked ConfigDict
    cfg.lock()
    ds = create_dataset(cfg, seed=0)
    # crop_padding defaults to H / 8 (1 for 8x8 images).
    assert (ds.num_train, ds.crop_padding, ds.flip, ds.augment) == (32, 1, True, True)
    # Default statistics for synthetic data are its own: un-augmented pixels are ~N(0, 1).
    ds.augment = False
    x = next(ds.train_batches(32))["image"]
    assert abs(x.mean()) < 0.05 and abs(x.std() - 1) < 0.05


def test_data_config_must_be_complete_and_known():
    """Loaders have no defaults of their own: a missing field is an error naming it."""
    partial = data("synthetic")
    del partial["augment"], partial["num_eval"]
    with pytest.raises(KeyError, match=r"missing field\(s\) \['augment', 'num_eval'\]"):
        create_dataset(partial, seed=0)
    with pytest.raises(KeyError, match="unknown data field.*'augmnet'"):
        create_dataset({**data("synthetic"), "augmnet": True}, seed=0)
    with pytest.raises(KeyError, match="'augmnet'"):
        data_config("synthetic", augmnet=True)
    # The one set of defaults (docs/data.md's table is checked against FIELDS in test_docs.py).
    cfg = data_config("digits")
    assert (cfg.augment, cfg.download, cfg.holdout, tuple(cfg.image_shape)) == (True, True, 0, (8, 8, 3))
    assert cfg.data_dir is None and cfg.flip is None


def test_loader_registry_names_and_vtab_dispatch():
    assert list(loaders.LOADERS) == ["digits", "cifar10", "imagenet32", "image_folder", "synthetic", "vtab"]
    assert loaders.loader_for("vtab/cifar100/val") is vtab.load_vtab
    with pytest.raises(ValueError, match="VTAB data name"):
        create_dataset(data("vtab/cifar100/test"), seed=0)


def test_data_dir_comes_from_the_config_or_the_environment(tmp_path, monkeypatch):
    d, labels, _ = _write_binary(tmp_path, np.random.default_rng(1))
    monkeypatch.delenv(DATA_DIR_ENV, raising=False)
    assert resolve_data_dir(data("cifar10")) is None  # tfds' own default
    monkeypatch.setenv(DATA_DIR_ENV, str(tmp_path))
    assert resolve_data_dir(data("cifar10")) == str(tmp_path)
    assert resolve_data_dir(data("cifar10", data_dir="~/x")) == os.path.expanduser("~/x")  # config wins
    ds = create_dataset(data("cifar10"), seed=0)  # the binary release found through the environment
    np.testing.assert_array_equal(next(ds.eval_batches(5))["label"], labels)


def test_holdout_and_eval_subset_are_not_class_ordered():
    """Sources stored class by class (image folders) must still give mixed-class eval subsets."""
    from wtjax.data.dataset import make_dataset
    from wtjax.data.sources import ArraySource

    labels = np.repeat(np.arange(10), 100)  # class-ordered, like a class-folder copy
    source = ArraySource(np.zeros((1000, 4, 4, 1), np.uint8), labels)
    ds = make_dataset(
        "ordered",
        train=source,
        test=None,
        num_classes=10,
        mean=(0.0,),
        std=(1.0,),
        seed=0,
        holdout=200,
        eval_subset=50,
    )
    eval_labels = np.concatenate([b["label"][b["mask"] > 0] for b in ds.eval_batches(25)])
    assert len(eval_labels) == 50 and len(np.unique(eval_labels)) >= 8
