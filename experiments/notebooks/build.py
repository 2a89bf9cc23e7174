"""Writes the three Colab notebooks of this folder (run it after editing the cells below).

The notebooks are generated, not hand-edited, so their diffs stay readable and they are saved
without outputs. Every notebook reads ``WTJAX_NOTEBOOK_SMOKE=1`` (set by tests/test_notebooks.py)
to shrink itself to a CPU run of seconds; otherwise it runs at the size its title says. The TPU
quickstart refuses to run off a TPU unless ``REQUIRE_TPU`` is off (``WTJAX_REQUIRE_TPU=0``).

    python -m experiments.notebooks.build                            # the notebooks, no badges
    python -m experiments.notebooks.build --repository=owner/wtjax   # + "Open in Colab" badges
    python -m experiments.notebooks.build --execute                  # + executed/ copies with outputs

``--repository=owner/name`` (the public GitHub repository holding this folder on ``--branch``,
default ``main``) adds an "Open in Colab" badge to each notebook and makes that repository the
setup cell's default ``REPO_URL``; without it the badges are left out (a badge needs the public
URL). ``--execute`` also runs each notebook on CPU at smoke-test size and saves it with its outputs
(plots included) as ``executed/<name>.ipynb``, for reading on the web; the build machine's paths
in the outputs are written as ``<repository>``, ``<tmp>`` and ``<site-packages>``.
tests/test_notebooks.py checks that the notebooks and the executed copies' code are what this file
generates.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import sysconfig
import tempfile
from pathlib import Path

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

HERE = Path(__file__).resolve().parent
EXECUTED = HERE / "executed"
PLACEHOLDER_URL = "https://github.com/<owner>/wtjax.git"

SETUP = r'''# @title Setup { display-mode: "form" }
# On Colab: clone wtjax into /content/wtjax and install it around the runtime's own jax,
# jaxlib and libtpu / CUDA plugins (they match the accelerator: pip must not replace them).
# Elsewhere: run from a checkout installed as its README says. Safe to rerun: every path is
# absolute, and the clone and the install are skipped once done.
import importlib.metadata
import os
import re
import subprocess
import sys
import tempfile

IN_COLAB = "google.colab" in sys.modules
SMOKE = os.environ.get("WTJAX_NOTEBOOK_SMOKE") == "1"  # tests: a few steps on CPU
REPO_URL = "<REPO_URL>"  # @param {type:"string"}
REPO_URL = os.environ.get("WTJAX_REPO_URL", REPO_URL)  # the environment variable wins
RUNTIME_JAX = re.compile(r"jax|jaxlib|libtpu.*|jax-cuda\d+-(plugin|pjrt)")


def runtime_jax():
    """{distribution: version} of the installed jax, jaxlib and accelerator plugins."""
    names = {re.sub(r"[-_.]+", "-", d.metadata["Name"] or "").lower(): d.version
             for d in importlib.metadata.distributions()}
    return {name: version for name, version in names.items() if RUNTIME_JAX.fullmatch(name)}


def clone(url, root):
    """git clone `url` into `root`, failing clearly on the placeholder or an unreachable URL."""
    if not url or "<owner>" in url:
        raise ValueError("set REPO_URL (the form field above, or $WTJAX_REPO_URL) to wtjax's git URL")
    probe = subprocess.run(["git", "ls-remote", "-q", url], capture_output=True, text=True)
    if probe.returncode != 0:
        raise RuntimeError(f"cannot read the git repository REPO_URL={url!r}: is it right, and public "
                           f"or reachable from this runtime? git says: {probe.stderr.strip()}")
    subprocess.run(["git", "clone", "-q", url, root], check=True)


def check_jax_bound(root, versions):
    """Fail clearly if the runtime's jax is older than wtjax's lower bound (pyproject.toml)."""
    import tomllib  # Python >= 3.11, as on Colab

    from packaging.requirements import Requirement

    with open(os.path.join(root, "pyproject.toml"), "rb") as f:
        needed = next(r for r in map(Requirement, tomllib.load(f)["project"]["dependencies"])
                      if r.name == "jax")
    if not needed.specifier.contains(versions.get("jax", "0")):
        raise RuntimeError(
            f"this runtime has jax {versions.get('jax')}, and wtjax needs {needed}. Choose a newer "
            "runtime (Runtime > Change runtime type > Runtime version), or upgrade jax together with "
            "its accelerator plugin (e.g. pip install -U 'jax[tpu]') and restart the session.")


def install_keeping_runtime_jax(root):
    """pip-install wtjax from `root` with its train and analysis extras, leaving jax as it is."""
    before = runtime_jax()
    check_jax_bound(root, before)
    # The runtime's versions pinned as constraints: pip resolves flax, optax, orbax, ... against
    # them, or fails naming the conflict, but never replaces them (wtjax caps no jax version).
    constraints = os.path.join(tempfile.gettempdir(), "wtjax_runtime_jax.txt")
    with open(constraints, "w") as f:
        f.write("".join(f"{name}=={version}\n" for name, version in sorted(before.items())))
    pip = [sys.executable, "-m", "pip", "install", "-q", "-c", constraints]
    subprocess.run([*pip, "-e", f"{root}[train,analysis]"], check=True)
    after = runtime_jax()
    assert after == before, f"the install changed the runtime's jax: {before} -> {after}"
    print("installed wtjax; kept", ", ".join(f"{n} {v}" for n, v in sorted(before.items())))


if IN_COLAB:
    ROOT = "/content/wtjax"
    if not os.path.isdir(ROOT):
        clone(REPO_URL, ROOT)
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
print("repository:", ROOT, "| run workdirs:", WORK, "| smoke test:", SMOKE)'''


def setup_cell(repository: str | None = None) -> str:
    """The setup cell's source, with ``REPO_URL`` defaulting to ``repository``'s GitHub URL if given."""
    url = f"https://github.com/{repository}.git" if repository else PLACEHOLDER_URL
    return SETUP.replace("<REPO_URL>", url)


def badge(repository: str, branch: str, name: str) -> str:
    """Markdown of an "Open in Colab" badge for ``experiments/notebooks/<name>.ipynb``."""
    target = f"https://colab.research.google.com/github/{repository}/blob/{branch}/experiments/notebooks/{name}.ipynb"
    return f"[![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)]({target})"


def notebook(
    name: str, title: str, intro: str, cells: list[str], repository: str | None = None, branch: str = "main"
) -> nbformat.NotebookNode:
    """The notebook ``name``: a title cell (with a Colab badge if ``repository`` is given), the setup
    cell, then ``cells`` (one starting with ``## `` or ``**`` is markdown, any other one code)."""
    nb = new_notebook()
    nb.metadata = {
        "kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"},
        "language_info": {"name": "python"},
        "accelerator": "TPU",
        "colab": {"provenance": []},
    }
    if repository:
        colab = f"{badge(repository, branch, name)}\n\nOn Colab, the setup cell clones {repository}."
    else:
        colab = "On Colab, first set `REPO_URL` in the setup cell to the git URL of your copy of wtjax."
    nb.cells = [new_markdown_cell(f"# {title}\n\n{intro}\n\n{colab}"), new_code_cell(setup_cell(repository))]
    for cell in cells:
        if cell.startswith("## ") or cell.startswith("**"):
            nb.cells.append(new_markdown_cell(cell))
        else:
            nb.cells.append(new_code_cell(cell.strip("\n")))
    return nb


QUICKSTART = (
    "wtjax quickstart (Colab TPU)",
    "Train the paper's multi-mask weight-tied ResNet-like model on CIFAR-10 with every TPU core "
    "(Runtime > Change runtime type > TPU), then evaluate the saved checkpoint. The same code runs "
    "on a CPU or GPU: the training job shards the batch over whatever `jax.devices()` returns.",
    [
        """
import jax

# A silent fallback to the CPU would train for hours: insist on the TPU unless told otherwise.
REQUIRE_TPU = True  # @param {type:"boolean"}
if os.environ.get("WTJAX_REQUIRE_TPU") == "0":  # the tests' CPU dry run
    REQUIRE_TPU = False
print("backend:", jax.default_backend(), "| devices:", jax.devices())  # TPU v2-8: eight TpuDevice
if REQUIRE_TPU:
    assert jax.default_backend() == "tpu", (
        f"JAX runs on {jax.default_backend()!r}, not on a TPU. On Colab: Runtime > Change runtime type > "
        "TPU, then run all cells again (if a TPU was attached, a pip install replaced the runtime's "
        "jax/libtpu: Runtime > Disconnect and delete runtime). For a CPU dry run set REQUIRE_TPU = False."
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

ANALYSIS = (
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

WT_VS_DEQ = (
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


SPECS = {"quickstart_tpu": QUICKSTART, "analysis": ANALYSIS, "wt_vs_deq": WT_VS_DEQ}


def notebooks(repository: str | None = None, branch: str = "main") -> dict[str, nbformat.NotebookNode]:
    """Every notebook of this folder by name, built (badges only with ``repository``)."""
    return {name: notebook(name, *spec, repository=repository, branch=branch) for name, spec in SPECS.items()}


def execute(nb: nbformat.NotebookNode, name: str) -> nbformat.NotebookNode:
    """A copy of ``nb`` run on CPU at smoke-test size, with its outputs, for reading on the web."""
    from nbclient import NotebookClient

    nb = nbformat.from_dict(nb)
    with tempfile.TemporaryDirectory() as tmp:
        smoke = {"WTJAX_NOTEBOOK_SMOKE": "1", "WTJAX_REQUIRE_TPU": "0", "JAX_PLATFORMS": "cpu", "TMPDIR": tmp}
        with _environ(smoke):  # the kernel inherits this process's environment
            resources = {"metadata": {"path": str(HERE)}}  # started in this folder, as Jupyter would
            NotebookClient(
                nb, timeout=900, kernel_name="python3", record_timing=False, resources=resources
            ).execute()
        machine = {str(HERE.parents[1]): "<repository>", os.path.realpath(tmp): "<tmp>", tmp: "<tmp>"}
        _neutral_paths(nb, {**machine, sysconfig.get_paths()["purelib"]: "<site-packages>"})
    note = (
        f"*An executed copy of [`{name}.ipynb`](../{name}.ipynb), with its outputs: run on CPU at the "
        "smoke-test size (`WTJAX_NOTEBOOK_SMOKE=1`, `WTJAX_REQUIRE_TPU=0`) by `build.py --execute`, "
        "so its numbers are a few training steps', not the full run's.*"
    )
    nb.cells.insert(0, new_markdown_cell(note))
    return nb


@contextlib.contextmanager
def _environ(values: dict[str, str]):
    """``os.environ`` updated with ``values`` inside the block, restored after it."""
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k)
            else:
                os.environ[k] = v


def _neutral_paths(nb: nbformat.NotebookNode, replace: dict[str, str]) -> None:
    """Write the build machine's paths in text outputs as placeholders (in place)."""
    pattern = re.compile("|".join(re.escape(k) for k in sorted(replace, key=len, reverse=True)))

    def sub(text: str) -> str:
        return pattern.sub(lambda m: replace[m.group()], text)

    for cell in nb.cells:
        for out in cell.get("outputs", []):
            if isinstance(out.get("text"), str):
                out["text"] = sub(out["text"])
            for key, value in out.get("data", {}).items():
                if key.startswith("text/") and isinstance(value, str):
                    out["data"][key] = sub(value)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repository", help="owner/name of the public GitHub repository: adds Colab badges")
    parser.add_argument("--branch", default="main", help="the branch the badges open (default: main)")
    parser.add_argument("--execute", action="store_true", help="also write executed/<name>.ipynb (on CPU)")
    args = parser.parse_args(argv)
    if args.repository and not re.fullmatch(r"[\w.-]+/[\w.-]+", args.repository):
        parser.error(f"--repository={args.repository!r}: expected owner/name")
    for name, nb in notebooks(args.repository, args.branch).items():
        nbformat.write(nb, HERE / f"{name}.ipynb")
        print("wrote", HERE / f"{name}.ipynb")
        if args.execute:
            EXECUTED.mkdir(exist_ok=True)
            nbformat.write(execute(nb, name), EXECUTED / f"{name}.ipynb")
            print("wrote", EXECUTED / f"{name}.ipynb")


if __name__ == "__main__":
    main()
