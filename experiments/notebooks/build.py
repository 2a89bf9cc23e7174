"""Writes the three Colab notebooks of this folder (run it after editing the cells below).

The notebooks are generated, not hand-edited, so their diffs stay readable and they are saved
without outputs. Every notebook reads ``WTJAX_NOTEBOOK_SMOKE=1`` (set by tests/test_notebooks.py)
to shrink itself to a CPU run of seconds; otherwise it runs at the size its title says.

    python -m experiments.notebooks.build
"""

from __future__ import annotations

from pathlib import Path

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

HERE = Path(__file__).resolve().parent

SETUP = """\
# Setup. On Colab: clone wtjax into /content/wtjax and install it around the runtime's own jax,
# jaxlib and libtpu (they match the TPU; a pip upgrade or downgrade of them loses it). Elsewhere:
# run from a checkout installed with `pip install -e ".[dev]"`. Safe to rerun: every path is
# absolute, and the clone and the install are skipped once done.
import importlib.metadata
import os
import re
import subprocess
import sys
import tempfile

IN_COLAB = "google.colab" in sys.modules
SMOKE = os.environ.get("WTJAX_NOTEBOOK_SMOKE") == "1"  # CI: a few steps on CPU
REPO_URL = "https://github.com/<you>/wtjax.git"  # @param {type:"string"}
REPO_URL = os.environ.get("WTJAX_REPO_URL", REPO_URL)  # the environment variable wins


def install_keeping_runtime_jax(root):
    \"\"\"pip-install wtjax from `root` without changing the installed jax, jaxlib or libtpu.\"\"\"
    # A constraints file pins the runtime's versions, so wtjax's other dependencies (flax, optax,
    # orbax, ...) are resolved against them: pip picks compatible versions or fails naming the
    # conflict, but never replaces them. wtjax itself is installed with --no-deps, so its own
    # tested jax range (pyproject.toml) does not force another jax either.
    installed = {d.metadata["Name"] or "": d.version for d in importlib.metadata.distributions()}
    keep = re.compile(r"jax|jaxlib|libtpu.*", re.IGNORECASE)
    pins = sorted(f"{name}=={version}" for name, version in installed.items() if keep.fullmatch(name))
    constraints = os.path.join(tempfile.gettempdir(), "wtjax_keep_runtime_jax.txt")
    with open(constraints, "w") as f:
        f.write("\\n".join(pins) + "\\n")
    import tomllib  # Python >= 3.11, as on Colab

    with open(os.path.join(root, "pyproject.toml"), "rb") as f:
        deps = tomllib.load(f)["project"]["dependencies"]
    deps = [d for d in deps if re.match(r"[A-Za-z0-9_.-]+", d).group().lower() not in ("jax", "jaxlib")]
    pip = [sys.executable, "-m", "pip", "install", "-q"]
    subprocess.run([*pip, "-c", constraints, *deps], check=True)
    subprocess.run([*pip, "--no-deps", "-e", root], check=True)
    print("installed wtjax; kept", ", ".join(pins))


if IN_COLAB:
    ROOT = "/content/wtjax"
    if not os.path.isdir(ROOT):
        if not REPO_URL or "<you>" in REPO_URL:
            raise ValueError("set REPO_URL (form field above, or $WTJAX_REPO_URL) to your copy's git URL")
        subprocess.run(["git", "clone", "-q", REPO_URL, ROOT], check=True)
    try:
        importlib.metadata.version("wtjax")
    except importlib.metadata.PackageNotFoundError:
        install_keeping_runtime_jax(ROOT)
else:  # a checkout: Jupyter starts in <root>/experiments/notebooks (on a rerun we are in <root>)
    ROOT = os.path.abspath("../.." if os.path.basename(os.getcwd()) == "notebooks" else ".")
os.chdir(ROOT)  # configs/ are addressed from the repository root
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)  # an editable install made in this session is only seen by new processes
WORK = os.path.join(tempfile.gettempdir(), "wtjax_notebooks" + ("_smoke" if SMOKE else ""))  # run workdirs
print("repository:", ROOT, "| run workdirs:", WORK, "| smoke test:", SMOKE)"""


def notebook(title: str, intro: str, cells: list[str]) -> nbformat.NotebookNode:
    nb = new_notebook()
    nb.metadata = {
        "kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"},
        "language_info": {"name": "python"},
        "accelerator": "TPU",
        "colab": {"provenance": []},
    }
    colab = "On Colab, first set `REPO_URL` in the setup cell to the git URL of your copy of wtjax."
    nb.cells = [new_markdown_cell(f"# {title}\n\n{intro}\n\n{colab}"), new_code_cell(SETUP)]
    for cell in cells:
        if cell.startswith("## ") or cell.startswith("**"):
            nb.cells.append(new_markdown_cell(cell))
        else:
            nb.cells.append(new_code_cell(cell.strip("\n")))
    return nb


QUICKSTART = notebook(
    "wtjax quickstart (Colab TPU)",
    "Train the paper's multi-mask weight-tied ResNet-like model on CIFAR-10 with every TPU core "
    "(Runtime > Change runtime type > TPU), then evaluate the saved checkpoint. The same code runs "
    "on a CPU or GPU: the training job shards the batch over whatever `jax.devices()` returns.",
    [
        """
import glob

import jax

# Signs of an attached TPU (Colab's TPU runtimes, Cloud TPU VMs): then JAX must be running on it.
TPU_ATTACHED = bool(
    os.environ.get("COLAB_TPU_ADDR") or os.environ.get("TPU_NAME")
    or glob.glob("/dev/accel*") or glob.glob("/dev/vfio/[0-9]*")
)
print("backend:", jax.default_backend(), "| devices:", jax.devices())  # TPU v2-8: eight TpuDevice
if TPU_ATTACHED:
    assert jax.default_backend() == "tpu", (
        f"a TPU is attached but JAX runs on {jax.default_backend()!r}: the runtime's jax/libtpu were "
        "probably replaced by a pip install. Runtime > Disconnect and delete runtime, then rerun."
    )
""",
        "## Configure\n\nA run is a config file plus arguments and overrides, exactly as on the command "
        "line (`python -m wtjax.main --config=configs/cifar_resnet.py:width=64,epochs=30`). tfds downloads "
        "CIFAR-10 on first use (about 160 MB). The smoke test uses the bundled digits data instead.",
        """
from wtjax.tools import sweep

if SMOKE:
    run = sweep.Run("quickstart", "configs/digits_quickstart.py", "width=8,depth=2,epochs=1",
                    {"batch_size": 64, "eval_every_steps": 0, "accounting": False})
else:
    run = sweep.Run("quickstart", "configs/cifar_resnet.py", "width=64,depth=8,mask_mode=multi,epochs=30", {})
config = sweep.load_config(run)
workdir = f"{WORK}/quickstart"
print(run.command(workdir))
""",
        "## Train\n\nRerunning this cell resumes from the newest checkpoint in `workdir`.",
        """
from wtjax.job import train

summary = train.train_and_evaluate(config, workdir)
print({k: summary[k] for k in ("step", "eval/accuracy", "num_params", "wall_time_s")})
""",
        "## Curves\n\nThe job redraws `curves.png` in the workdir at every evaluation (every point "
        "marked, so a short run shows its few values); `metrics.jsonl` holds the numbers.",
        """
from IPython.display import Image, display

display(Image(f"{workdir}/curves.png"))
""",
        "## Evaluate the checkpoint\n\nRestore the saved state and score the evaluation split by hand.",
        """
import jax.numpy as jnp
import numpy as np

from wtjax.tools.analyse import load_run

config, model, variables, dataset, step = load_run(workdir)
correct = total = 0
for batch in dataset.eval_batches(256):
    logits, _ = model.apply(variables, jnp.asarray(batch["image"]), train=False)
    real = batch["mask"] > 0
    correct += int(np.sum((np.argmax(logits, -1) == batch["label"])[real]))
    total += int(real.sum())
print(f"checkpoint step {step}: {correct / total:.4f} accuracy on {total} examples ({dataset.eval_split})")
assert abs(correct / total - summary["eval/accuracy"]) < 1e-6  # the training job's own final eval
""",
    ],
)

ANALYSIS = notebook(
    "Layer similarity (CKA) and linear probes: same-mask vs multi-mask",
    "Train a same-mask and a multi-mask weight-tied model, then look at how similar their layers "
    "are (linear CKA, the paper's Figure 6) and how linearly separable the classes are after each "
    "reuse. `python -m wtjax.tools.analyse --workdir=A --workdir=B --out=DIR` does the same from "
    "the command line.",
    [
        """
from wtjax.tools import sweep
from wtjax.job import train

steps = 20 if SMOKE else 1000
overrides = {"num_train_steps": steps, "eval_every_steps": 0, "accounting": False, "progress": False}
width = 8 if SMOKE else 32
runs = {
    mode: sweep.Run(mode, "configs/digits_quickstart.py", f"mask_mode={mode},width={width}", overrides)
    for mode in ("same", "multi")
}
workdirs = {}
for mode, run in runs.items():
    workdirs[mode] = f"{WORK}/analysis_{mode}"
    summary = train.train_and_evaluate(sweep.load_config(run), workdirs[mode])
    print(mode, "eval accuracy", summary["eval/accuracy"])
""",
        "## CKA and probes",
        """
import numpy as np
from IPython.display import Image, display

from wtjax.analysis import plots
from wtjax.tools.analyse import analyse_run

n = 200 if SMOKE else 297  # the digits test split
results = {mode: analyse_run(wd, num_examples=n, cka_batch=100) for mode, wd in workdirs.items()}
layers = results["same"]["layers"]
plots.cka_heatmaps({f"{m}-mask": np.asarray(r["cka"]) for m, r in results.items()}, layers, f"{WORK}/cka.png")
probe = {f"{m}-mask": r["probe_accuracy"] for m, r in results.items()}
plots.probe_curve(probe, layers, f"{WORK}/probes.png")
display(Image(f"{WORK}/cka.png"))
display(Image(f"{WORK}/probes.png"))
for m, r in results.items():
    cka = np.asarray(r["cka"])
    assert np.allclose(np.diag(cka), 1.0, atol=0.05)  # every layer is identical to itself
    print(m, "probe accuracy per layer:", np.round(r["probe_accuracy"], 3), "|", r["split"])
""",
    ],
)

WT_VS_DEQ = notebook(
    "Weight-tied vs DEQ: accuracy and time per step",
    "The DEQ solves for the fixed point of the very block the weight-tied model repeats K times "
    "(same parameter tree). Train both with the same data and budget and compare accuracy and "
    "training time per batch (the paper's Figure 2). `experiments/fig2_table1a_wt_vs_deq` is the "
    "full study.",
    [
        """
from wtjax.tools import sweep
from wtjax.job import train

common = {"eval_every_steps": 0, "accounting": False, "progress": False, "log_every_steps": 10,
          "num_train_steps": 20 if SMOKE else 500, "batch_size": 64}
width = 8 if SMOKE else 32
runs = {
    "weight-tied (K=4, multi-mask)": sweep.Run(
        "wt", "configs/digits_quickstart.py", f"width={width},depth=4", common),
    "DEQ (implicit gradient)": sweep.Run(
        "deq", "configs/cifar_deq.py", f"variant=mdeq,width={width},depth=4,f_iters=8,b_iters=8",
        {**common, "data.name": "digits", "data.augment": False, "model.deq_pretrain_steps": 0,
         "model.monitor_backward": False}),
}
summaries = {}
for name, run in runs.items():
    summaries[name] = train.train_and_evaluate(sweep.load_config(run), f"{WORK}/wt_vs_deq_{run.id}")
""",
        "## Compare",
        """
import matplotlib.pyplot as plt

from wtjax.job import metrics

fig, ax = plt.subplots(figsize=(5, 3.5))
for name, run in runs.items():
    records = metrics.read_jsonl(f"{WORK}/wt_vs_deq_{run.id}/metrics.jsonl").values()
    step_time = sorted(r["train/step_time_s"] for r in records if "train/step_time_s" in r)
    median = step_time[len(step_time) // 2]
    ax.scatter([median * 1000], [100 * summaries[name]["eval/accuracy"]], label=name)
    acc = 100 * summaries[name]["eval/accuracy"]
    print(f"{name}: {acc:.1f}% eval accuracy, {median * 1000:.0f} ms per step")
ax.set_xlabel("training time per batch (ms)")
ax.set_ylabel("eval accuracy (%)")
ax.legend()
plt.show()
""",
    ],
)


if __name__ == "__main__":
    for name, nb in (("quickstart_tpu", QUICKSTART), ("analysis", ANALYSIS), ("wt_vs_deq", WT_VS_DEQ)):
        nbformat.write(nb, HERE / f"{name}.ipynb")
        print("wrote", HERE / f"{name}.ipynb")
