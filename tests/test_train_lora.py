"""End-to-end LoRA fine-tuning through the training job (needs lora_wiring.py/.patch applied).

Copy to tests/ once the wiring is merged. Synthetic 8x8 data, a tiny ViT whose "pretrained"
weights are written in the public npz layout; a few steps, then a resumed run.
"""

import importlib.util
import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from train_utils import compilation_cache

from wtjax.job import config as cs
from wtjax.job import train
from wtjax.models.vit import ViT, vit_fields
from wtjax.models.vit_checkpoint import save_npz

CONFIG = pathlib.Path(__file__).resolve().parents[1] / "configs" / "vtab_lora.py"


@pytest.fixture(scope="module", autouse=True)
def _cache(tmp_path_factory):
    # The resumed run compiles the programs of the first run again: a persistent cache loads them.
    with compilation_cache(tmp_path_factory.mktemp("xla_cache")):
        yield


def _config(npz, steps):
    spec = importlib.util.spec_from_file_location("vtab_lora_config", CONFIG)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    cfg = module.get_config(f"variant=tiny/4,image_size=8,steps={steps},kind=multi_mask,depth=2")
    cfg.data = cs.data_config("synthetic", num_classes=4, image_shape=(8, 8, 3), num_train=32, num_eval=8)
    cfg.data.augment = False
    cfg.pretrained = str(npz)
    cfg.batch_size = 8
    cfg.num_devices = 1
    cfg.async_checkpointing = False
    cfg.checkpoint_every_steps = 2
    cfg.log_every_steps = 2
    cfg.progress = False
    cfg.tensorboard = False
    return cfg


def test_lora_job_trains_and_checkpoints_only_adapters_and_head(tmp_path):
    npz = tmp_path / "vit_tiny.npz"
    pre = ViT(num_classes=11, representation_size=16, **vit_fields("tiny/4"))
    save_npz(npz, pre.init(jax.random.PRNGKey(0), jnp.zeros((1, 8, 8, 3)))["params"])
    before = dict(np.load(npz))
    summary = train.train_and_evaluate(_config(npz, 4), tmp_path / "run")
    assert summary["step"] == 4 and np.isfinite(summary["eval/loss"])
    # 2 blocks x (query, value) x rank 8 x (16 + 16) adapter + a 16x4 head with bias.
    assert summary["num_params"] == 1024 + 68
    after = dict(np.load(npz))
    assert all(np.array_equal(before[k], after[k]) for k in before)  # the pretrained file is untouched
    restored = ocp.StandardCheckpointer().restore(tmp_path / "run" / "checkpoints" / "4" / "default")
    assert set(restored["params"]) == {"lora", "base"} and set(restored["params"]["base"]) == {"head"}
    resumed = train.train_and_evaluate(_config(npz, 6), tmp_path / "run")
    assert resumed["step"] == 6
    json.dumps(resumed)
