"""A resumed run must be the same run: changed fields that change it are refused, others recorded;
the masks of its ties are the recorded ones."""

from __future__ import annotations

import json
import shutil

import pytest
from train_utils import compilation_cache, load_config

from wtjax import MaskSpec
from wtjax.job import mask_record, resume
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
    """A finished 4-step run (checkpoints 2 and 4) to resume from; tests work on copies."""
    workdir = tmp_path_factory.mktemp("trained")
    train_and_evaluate(tiny(), workdir)
    return workdir


@pytest.fixture
def workdir(trained, tmp_path):
    shutil.copytree(trained, tmp_path / "run")
    return tmp_path / "run"


def _stored(workdir) -> dict:
    return json.loads((workdir / resume.CONFIG_FILE).read_text())


@pytest.mark.parametrize(
    "field, value, shown",
    [
        ("batch_size", 16, "batch_size 8 -> 16"),
        ("seed", 1, "seed 0 -> 1"),
        ("data.num_train", 32, "data.num_train 64 -> 32"),
        ("optim.learning_rate", 0.1, "optim.learning_rate 0.01 -> 0.1"),
        ("model.width", 16, "model.width 8 -> 16"),
        ("pruning.method", "random", 'pruning.method null -> "random"'),
    ],
)
def test_resuming_with_a_field_that_changes_the_run_is_refused(workdir, field, value, shown):
    before = (workdir / resume.CONFIG_FILE).read_text()
    with pytest.raises(ValueError, match=rf"^resuming .* with a config that changes the run: {shown}; .*"):
        train_and_evaluate(tiny(**{field: value}), workdir)
    assert (workdir / resume.CONFIG_FILE).read_text() == before  # the run's config is kept
    assert not (workdir / resume.HISTORY_FILE).exists()


def test_harmless_changes_resume_and_are_recorded(workdir, capsys):
    config = tiny(**{"log_every_steps": 4, "data.eval_subset": 6, "keep_checkpoints": 3})
    assert train_and_evaluate(config, workdir)["step"] == 4
    out = capsys.readouterr().out
    assert "config changed on resume: data.eval_subset null -> 6, keep_checkpoints 2 -> 3" in out
    (entry,) = [json.loads(line) for line in (workdir / resume.HISTORY_FILE).read_text().splitlines()]
    assert entry["changes"]["log_every_steps"] == {"stored": 2, "new": 4}
    assert entry["changes_the_run"] == []
    assert _stored(workdir)["data"]["eval_subset"] == 6


def test_the_override_continues_and_is_recorded(workdir, capsys):
    config = tiny(**{"optim.learning_rate": 0.005, "num_train_steps": 6, "resume_despite_changes": True})
    assert train_and_evaluate(config, workdir)["step"] == 6  # a longer run is a harmless change
    out = capsys.readouterr().out
    assert "resuming DESPITE changes to the run (resume_despite_changes=True): optim.learning_rate" in out
    assert "config changed on resume: num_train_steps 4 -> 6, resume_despite_changes false -> true" in out
    (entry,) = [json.loads(line) for line in (workdir / resume.HISTORY_FILE).read_text().splitlines()]
    assert entry["changes_the_run"] == ["optim.learning_rate"]
    assert (
        _stored(workdir)["resume_despite_changes"] is True
        and _stored(workdir)["optim"]["learning_rate"] == 0.005
    )
    # The stored config is now the run's: the same config resumes without the override.
    config = tiny(**{"optim.learning_rate": 0.005, "num_train_steps": 6})
    assert train_and_evaluate(config, workdir)["step"] == 6


def test_a_new_workdir_or_one_without_checkpoints_is_not_compared(tmp_path):
    (tmp_path / resume.CONFIG_FILE).write_text(json.dumps({"batch_size": 1}))
    assert resume.check(tiny(), tmp_path) == {}  # no checkpoint: nothing is resumed
    (tmp_path / "checkpoints" / "4.orbax-checkpoint-tmp").mkdir(parents=True)
    assert resume.check(tiny(), tmp_path) == {}  # an unfinished save is not a checkpoint


def test_fields_one_side_lacks_are_changes():
    diff = resume.changes({"a": 1, "b": {"c": 2}}, {"a": 1, "b": {"c": 2, "d": 3}, "lora": None})
    assert diff == {"b.d": (resume.ABSENT, 3), "lora": (resume.ABSENT, None)}
    assert resume._describe(diff) == "b.d <absent> -> 3, lora <absent> -> null"


def test_every_harmless_path_is_a_config_field():
    fields = resume._flatten(resume.config_dict(tiny()))
    for path in resume.HARMLESS:
        assert any(f == path or f.startswith(path + ".") for f in fields), path


# The mask identity of the run's ties (wtjax/job/mask_record.py): recorded when the run starts,
# refused when a resume or an analysis would see other masks.


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
