"""The job records its ties' mask identity when a run starts and refuses other masks later."""

from __future__ import annotations

import json
import shutil

import pytest
from train_utils import compilation_cache, load_config

from wtjax import MaskSpec
from wtjax.job import mask_record
from wtjax.job.train import train_and_evaluate
from wtjax.models import build_model
from wtjax.tools import analyse


@pytest.fixture(scope="module", autouse=True)
def _cache(tmp_path_factory):
    with compilation_cache(tmp_path_factory.mktemp("xla_cache")):
        yield


def tiny(**overrides):
    overrides.setdefault("num_devices", 1)
    overrides.setdefault("tensorboard", False)
    return load_config("tiny", None, **overrides)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("trained")
    train_and_evaluate(tiny(), workdir)
    return workdir


@pytest.fixture
def workdir(trained, tmp_path):
    shutil.copytree(trained, tmp_path / "run")
    return tmp_path / "run"


def _tamper(workdir, **fields):
    path = workdir / mask_record.FILE
    identity = json.loads(path.read_text())
    identity[0].update(fields)
    path.write_text(json.dumps(identity))


def test_the_run_records_each_ties_mask_identity(trained):
    (site,) = json.loads((trained / mask_record.FILE).read_text())
    assert site["path"] == "tied" and site["mask_scope"] == "tied" and site["mask_mode"] == "multi"
    assert site["kind"] == "unstructured" and site["density"] == 0.5 and len(site["fingerprint"]) == 16


def test_a_resume_or_analysis_with_other_masks_is_refused(workdir):
    """A code change that draws other masks looks like a changed fingerprint in the record."""
    _tamper(workdir, fingerprint="0" * 16)
    with pytest.raises(ValueError, match=r"masks differ from those recorded .*tied: fingerprint \"0+\" ->"):
        train_and_evaluate(tiny(num_train_steps=6), workdir)
    with pytest.raises(ValueError, match="masks differ from those recorded"):
        analyse.load_run(workdir)


def test_resume_despite_changes_records_the_new_masks(workdir):
    _tamper(workdir, fingerprint="0" * 16)
    train_and_evaluate(tiny(num_train_steps=6, resume_despite_changes=True), workdir)
    (site,) = json.loads((workdir / mask_record.FILE).read_text())
    assert site["fingerprint"] != "0" * 16
    analyse.load_run(workdir)  # the record now matches


def test_the_identity_follows_seed_and_scope_not_the_run():
    small = dict(width=8, depth=2, groups=2, mask_mode="multi")
    base = mask_record.model_identity(build_model("resnet_like", **small), (8, 8, 3))
    assert base == mask_record.model_identity(build_model("resnet_like", **small, scan=False), (8, 8, 3))
    reseeded = mask_record.model_identity(
        build_model("resnet_like", **small, mask=MaskSpec(density=0.5, seed=1)), (8, 8, 3)
    )
    assert "tied: fingerprint" in mask_record.describe_changes(base, reseeded)
    assert "seed 0 -> 1" in mask_record.describe_changes(base, reseeded)
