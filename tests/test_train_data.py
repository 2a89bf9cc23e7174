"""The CIFAR-10 config end to end (a tiny width, 2 steps) on each kind of CIFAR source.

tfds under ``tfds.testing.mock_data``, a generated binary release and a generated class-folder copy
with a holdout (the layout of the local CIFAR copy). No network, no shared data.
"""

from __future__ import annotations

import numpy as np
import pytest
from train_utils import (
    checkpoint_steps,
    compilation_cache,
    load_config,
    write_cifar_binary,
    write_image_folder,
)

from wtjax.job import metrics
from wtjax.job.train import train_and_evaluate

CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


@pytest.fixture(scope="module", autouse=True)
def _cache(tmp_path_factory):
    # The three runs compile the same programs: compile once.
    with compilation_cache(tmp_path_factory.mktemp("xla_cache")):
        yield


def cifar_config(**data):
    config = load_config(
        "cifar_resnet",
        "width=8,depth=2",
        batch_size=8,
        eval_batch_size=8,
        num_train_steps=2,
        log_every_steps=1,
        checkpoint_every_steps=2,
        num_devices=1,
        tensorboard=False,
        accounting=False,
        progress=False,
        **{"model.groups": 2, **{f"data.{k}": v for k, v in data.items()}},
    )
    return config


def check_run(workdir, result, num_eval):
    assert result["step"] == 2 and checkpoint_steps(workdir) == [2]
    assert result[metrics.EVAL_COUNT] == num_eval
    records = metrics.read_jsonl(workdir / "metrics.jsonl")
    assert all(np.isfinite(records[s][metrics.TRAIN_LOSS]) for s in (1, 2))
    # A 10-class model at initialisation: cross-entropy near log(10), far from 0 or infinity.
    assert 0.5 < records[1][metrics.TRAIN_XENT] < 10


def test_tfds_cifar10_under_mock_data(tmp_path):
    tfds = pytest.importorskip("tensorflow_datasets")
    with tfds.testing.mock_data(num_examples=16):
        result = train_and_evaluate(cifar_config(), tmp_path)
    check_run(tmp_path, result, num_eval=16)


def test_cifar10_binary_release_directory(tmp_path):
    data_dir = write_cifar_binary(tmp_path / "data", n_per_file=4, n_test=12)
    result = train_and_evaluate(cifar_config(data_dir=str(data_dir)), tmp_path / "run")
    check_run(tmp_path / "run", result, num_eval=12)
    assert "test" in result["eval_split"]


def test_cifar10_class_folder_copy_with_holdout(tmp_path):
    data_dir = write_image_folder(tmp_path / "train", CLASSES, per_class=3, shape=(32, 32, 3))
    config = cifar_config(data_dir=str(data_dir), holdout=10, cache_dir="")
    result = train_and_evaluate(config, tmp_path / "run")
    check_run(tmp_path / "run", result, num_eval=10)
    assert "holdout" in result["eval_split"]
