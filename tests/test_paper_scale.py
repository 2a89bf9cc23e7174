"""Every paper-scale run definition of every study launches (issue 18, item 4).

Each run is loaded as the sweep loads it (:func:`wtjax.tools.sweep.load_config`: its config file,
argument and overrides), then only its data source is swapped for a tiny synthetic one with the
real data's number of classes and channels (small images, 4 training examples), and its length
for 2 steps at batch 2 on one device. Everything else, the model, the optimiser and its schedule,
pruning and LoRA, is the run's own. Two levels, because the 146 distinct definitions (of 471
runs) at 5-100 s each (compiling on 2 shared cores) do not fit in the suite:

* every distinct definition (runs differing only in seed, epochs or batch size count once) builds
  its model, optimiser and schedule and initialises the model abstractly (``jax.eval_shape``),
  which catches bad values (a width the GroupNorm groups or the 2:4 masks do not divide, an
  unknown key, a missing pretrained file);
* one definition of each *kind* of run (:func:`kind`: config file, model, data loader, optimiser
  and schedule, DEQ gradient, pruning, LoRA kind; 22 kinds), the one with the smallest model,
  trains 2 real steps through the training job and evaluates. The models' own code paths (mask
  modes, tying forms, pruning scorers) have their own tests.
"""

from __future__ import annotations

import contextlib
import functools
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments import report
from experiments import scale as sc
from wtjax.data import pipeline, vtab
from wtjax.job import config as cs
from wtjax.job import optim, train
from wtjax.models.vit import ViT
from wtjax.models.vit_checkpoint import save_npz
from wtjax.tools import sweep

ROOT = Path(__file__).resolve().parents[1]
STUDIES = sorted(p.parent for p in (ROOT / "experiments").glob("*/study.py"))
# The real data's classes and channels; images are shrunk to SIDE x SIDE (the models are
# convolutional or resize their position embeddings, so they are the same models).
CLASSES_CHANNELS = {"cifar10": (10, 3), "imagenet32": (1000, 3), "digits": (10, 1)}
SIDE, VIT_SIDE = 8, 32  # ViT-B/16: 32x32 is a 2x2 patch grid


@pytest.fixture(autouse=True)
def _from_the_repository_root(monkeypatch):
    monkeypatch.chdir(ROOT)  # runs name their configs relative to the repository root


@functools.cache
def paper_runs() -> list[sweep.Run]:
    """Every study's paper-scale runs (loaded from the repository root, also at collection)."""
    with contextlib.chdir(ROOT):
        return sweep.study_runs(STUDIES, "paper")


def data_classes_channels(data) -> tuple[int, int]:
    """The number of classes and channels of a run's real data (``config.data``)."""
    name = data.name
    if name.startswith("vtab/"):
        return vtab.TASKS[name.split("/")[1]].num_classes, 3
    if name not in CLASSES_CHANNELS:
        raise ValueError(f"add the classes and channels of dataset {name!r} to CLASSES_CHANNELS")
    return CLASSES_CHANNELS[name]


def launch_config(run: sweep.Run, pretrained: Path | None = None):
    """The run's config with a tiny synthetic stand-in of its data, 2 steps at batch 2."""
    config = sweep.load_config(run)
    real = config.data
    classes, channels = data_classes_channels(real)
    side = VIT_SIDE if config.model.name == "vit" else SIDE
    config.data = cs.data_config(
        "synthetic",
        num_classes=classes,
        image_shape=(side, side, channels),
        num_train=4,
        num_eval=2,
        augment=real.augment,
        flip=real.flip,
        mean=real.mean,
        std=real.std,
    )
    config.batch_size = config.eval_batch_size = 2
    config.num_train_steps = 2
    config.num_devices = 1
    config.async_checkpointing = False
    # Reports after training (progress bars, TensorBoard, plots, the FLOP accounting's lowering of
    # the unrolled model) are not what is tested, and the accounting costs seconds per run.
    config.progress = config.tensorboard = config.plots = config.accounting = False
    # A warm-up of epochs is longer than 2 steps (2 steps per epoch here): one step of warm-up,
    # then the schedule as defined (the optimiser refuses a warm-up as long as the run).
    config.optim.warmup_epochs = min(config.optim.warmup_epochs, 0.5)
    if "deq_pretrain_steps" in config.model:  # leave weight-tied pre-training after step 1, so
        config.model.deq_pretrain_steps = min(config.model.deq_pretrain_steps, 1)  # the solver runs
    if config.get("lora") is not None:
        config.pretrained = str(pretrained)
    return config


def definition(run: sweep.Run) -> str:
    """The run's config with the seeds, the run length and the batch size left out."""
    c = sweep.load_config(run).to_dict()
    c.update(seed=0, name="", num_epochs=0, batch_size=0, pretrained="")
    c["model"]["mask"] = {**c["model"].get("mask", {}), "seed": 0}
    if c.get("lora"):
        c["lora"]["seed"] = 0
    return json.dumps(c, sort_keys=True, default=str)


def kind(run: sweep.Run) -> tuple:
    """What a launch exercises beyond the model code (tested on its own): the config file, the
    model, the data loader, the optimiser and schedule, a DEQ's gradient, pruning, LoRA."""
    c = sweep.load_config(run)
    lora = c.get("lora")
    return (
        run.config,
        c.model.name,
        c.model.get("grad"),
        c.data.name.split("/")[0],
        c.optim.name,
        c.optim.schedule,
        c.pruning.method is not None,
        c.pruning.per_reuse,
        None if lora is None else lora.kind,
    )


def distinct(runs) -> list[sweep.Run]:
    return list({definition(r): r for r in reversed(runs)}.values())[::-1]


@pytest.fixture(scope="module")
def vit_b16(tmp_path_factory) -> Path:
    """A randomly initialised ViT-B/16 in the public npz layout (ImageNet-21k: 21,843 classes)."""
    path = tmp_path_factory.mktemp("vit") / "ViT-B_16.npz"
    model = ViT(num_classes=21843, representation_size=768, **vtab_fields())
    shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, VIT_SIDE, VIT_SIDE, 3)))
    rng = np.random.default_rng(0)
    params = jax.tree.map(lambda s: rng.normal(0, 0.02, s.shape).astype(np.float32), shapes["params"])
    save_npz(path, params)
    return path


def vtab_fields() -> dict:
    from wtjax.models.vit import vit_fields

    return vit_fields("B/16")


def test_every_paper_run_builds_its_model_optimiser_and_schedule(vit_b16):
    runs = distinct(paper_runs())
    assert len(runs) > 50  # every study's runs, seeds folded
    for run in runs:
        config = launch_config(run, vit_b16)
        cs.validate(config)
        dataset = pipeline.create_dataset(config.data, seed=0)
        model = cs.model_from_config(config.model, dataset.num_classes)
        tx, schedule = optim.create_optimizer(config.optim, 2, 2)
        assert np.isfinite(float(schedule(1)))
        if config.get("lora") is None:  # a LoRA model's base comes from the checkpoint (launched below)
            images = jnp.zeros((1, *dataset.image_shape))
            jax.eval_shape(model.init, jax.random.PRNGKey(0), images)


def launch_runs() -> list[sweep.Run]:
    """One run of each kind: the one with the fewest parameters (cheapest to compile and run)."""
    by_kind: dict = {}
    with contextlib.chdir(ROOT):
        for run in distinct(paper_runs()):
            by_kind.setdefault(kind(run), []).append(run)
        return [min(rs, key=_size) for rs in by_kind.values()]


def _size(run: sweep.Run) -> int:
    m = sweep.load_config(run).model
    return int(m.get("width", 0) or m.get("embed_dim", 0) or 0) ** 2 * int(m.get("depth", 1) or 1)


@pytest.mark.parametrize("run", launch_runs(), ids=lambda r: r.id)
def test_a_paper_run_of_each_kind_trains_two_steps(run, vit_b16, tmp_path):
    summary = train.train_and_evaluate(launch_config(run, vit_b16), tmp_path / run.id)
    assert summary["step"] == 2 and np.isfinite(summary["eval/loss"])


def test_the_paper_scale_is_the_papers_setting():
    """The values issue 18 item 4 names, as the runs define them (Appendix C, Tables 1b and 2)."""
    configs = {r.id: sweep.load_config(r) for r in paper_runs() if r.tags["seed"] == 0}
    widths = {c.model.width for i, c in configs.items() if i.startswith("resnet_tied_") and "_nm" in i}
    assert widths == set(sc.SIZES.values()) == {44, 172}  # Table 2's Small / Large
    deqs = [c for i, c in configs.items() if i.startswith("deq_")]
    assert deqs and all((c.model.f_max_iter, c.model.b_max_iter, c.batch_size) == (18, 20, 64) for c in deqs)
    assert all(c.num_epochs == 50 for c in deqs)
    matched = [c for i, c in configs.items() if "_bs64_" in i]  # Fig. 2's weight-tied models
    assert len(matched) == 4 and all((c.num_epochs, c.batch_size) == (50, 64) for c in matched)
    r20 = {c.model.size for i, c in configs.items() if i.startswith("resnet20_")}
    assert r20 == {"small", "large"}


def fake_results(runs, seed=0) -> list[dict]:
    """A result per run with a random accuracy (what the aggregators read of a result)."""
    rng = np.random.default_rng(seed)
    return [
        {"id": r.id, "tags": r.tags, "summary": {"eval/accuracy": float(rng.uniform(0.3, 0.9))}} for r in runs
    ]


def seed_accuracies(results, **tags) -> list[float]:
    return [100 * r["summary"]["eval/accuracy"] for r in results if tags.items() <= r["tags"].items()]


@pytest.mark.parametrize(
    "name, cell",
    [
        ("fig9_imagenet32", dict(dataset="imagenet32", density=0.3)),
        ("table3_lora_vtab", dict(task="dsprites_ori", kind="multi_mask", depth=4)),
    ],
)
def test_the_paper_only_studies_tabulate_their_results(name, cell, tmp_path):
    study = sweep.load_study(ROOT / "experiments" / name)
    assert study.runs("cpu") == []  # not runnable on the CPU machine
    study.aggregate([], tmp_path, "paper")
    assert "No results" in (tmp_path / "results.md").read_text()
    results = fake_results(study.runs("paper"))
    study.aggregate(results, tmp_path, "paper")
    text = (tmp_path / "results.md").read_text()
    accs = seed_accuracies(results, **cell)
    assert len(accs) == 3 and f"| {report.fmt(accs, 2)} |" in text and list(tmp_path.glob("*.png"))
