"""The analysis command runs on checkpoints of the training job and writes its plots and numbers."""

import json

import numpy as np
from train_utils import load_config

from wtjax.analysis import run
from wtjax.job.train import train_and_evaluate


def test_analysis_on_a_trained_checkpoint(tmp_path):
    config = load_config("tiny", "steps=4")
    config.data.num_eval = 40
    train_and_evaluate(config, tmp_path / "multi")
    results = run.analyse([tmp_path / "multi"], tmp_path / "out", num_examples=40, cka_batch=0)
    res = results["multi"]
    assert res["layers"] == ["stem", "1", "2", "pool"] and res["examples"] == 40
    cka = np.asarray(res["cka"])
    np.testing.assert_allclose(np.diag(cka), 1.0, atol=1e-6)
    np.testing.assert_allclose(cka, cka.T)
    assert all(0.0 <= a <= 1.0 for a in res["probe_accuracy"])
    for name in ("multi_cka.png", "multi_cka.npy", "probes.png", "analysis.json"):
        assert (tmp_path / "out" / name).stat().st_size > 0
    assert json.loads((tmp_path / "out" / "analysis.json").read_text())["multi"]["checkpoint_step"] == 4
