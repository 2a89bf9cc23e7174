"""Table 3: LoRA vs multi-mask LoRA (d = 2, 4) on VTAB-1k with the ImageNet-21k ViT-B/16.

``configs/vtab_lora.py`` (its docstring says where each setting comes from: the paper's rank 8
and 100 epochs, NOAH's optimiser, schedule and preprocessing): the frozen ViT-B/16 pretrained on
ImageNet-21k, rank-8 adapters on the attention query and value kernels (294,912 parameters, the
paper's 0.29M) and a new head; the ``final`` protocol (train on the 1,000 examples of
``train800val200``, test on the task's test split). The twelve tasks of the paper's Table 3;
seeds 0, 1, 2 (the paper averages three trials), each also the seed of the LoRA masks.

The pretrained checkpoint is a local file: ``$WTJAX_VIT_B16`` (default ``~/ckpt/ViT-B_16.npz``,
``gs://vit_models/imagenet21k/ViT-B_16.npz``); the tfds data_dir is ``$WTJAX_DATA_DIR`` (or tfds'
default). Not runnable on the CPU machine: ``runs('cpu')`` is empty.
"""

from __future__ import annotations

import os

from experiments import scale as sc
from experiments.report import accuracy, figure, fmt, group, markdown_table, mean_std, save, write
from wtjax.tools.sweep import Run

VIT_B16 = os.environ.get("WTJAX_VIT_B16", "~/ckpt/ViT-B_16.npz")
# Table 3's columns: keys of wtjax.data.vtab.TASKS, with the paper's names.
TASKS = {
    "cifar100": "CIFAR-100",
    "dtd": "DTD",
    "oxford_flowers102": "Flower102",
    "oxford_iiit_pet": "Pets",
    "svhn": "SVHN",
    "eurosat": "Eurosat",
    "resisc45": "Resisc45",
    "clevr_count": "Clevr-Count",
    "clevr_dist": "Clevr-Dist",
    "dmlab": "DMLab",
    "dsprites_ori": "dSpr-Ori",
    "smallnorb_azi": "sNORB-Azim",
}
MODELS = {
    ("lora", 1): "LoRA",
    ("multi_mask", 2): "multi-mask LoRA (d=2)",
    ("multi_mask", 4): "multi-mask LoRA (d=4)",
}
EPOCHS = 100.0


def vtab_run(*, task: str, kind: str, depth: int, seed: int) -> Run:
    """One fine-tuning run of ``configs/vtab_lora.py`` (``final`` protocol, rank 8, 100 epochs)."""
    arg = f"task={task},kind={kind},depth={depth},mask_seed={seed},epochs={EPOCHS},seed={seed}"
    overrides = {"pretrained": VIT_B16, "progress": False, "tensorboard": False}
    rid = f"vtab_{task}_{kind}_d{depth}_r8_e{EPOCHS}_s{seed}"
    tags = dict(model="vit_b16_lora", task=task, kind=kind, depth=depth, seed=seed)
    return Run(rid, "configs/vtab_lora.py", arg, overrides, tags)


SCALES = ("paper",)  # the scales this study defines runs for: accelerators only


def runs(scale: str):
    if scale != "paper":  # ViT-B/16 at 224x224: accelerators only
        return []
    return [
        vtab_run(task=task, kind=kind, depth=depth, seed=seed)
        for seed in sc.SEEDS
        for (kind, depth) in MODELS
        for task in TASKS
    ]


NO_RESULTS = (
    "# Table 3 results (generated)\n\nNo results: these runs were not run here (ViT-B/16 fine-tuning "
    "needs an accelerator, the ImageNet-21k checkpoint and the prepared VTAB data; see README.md).\n"
)


def aggregate(results, out_dir, scale):
    if not results:
        write(out_dir, NO_RESULTS)
        return
    g = group(results, "kind", "depth", "task")
    rows, means = [], {}
    for (kind, depth), label in MODELS.items():
        cells = [[accuracy(r) for r in g.get((kind, depth, t), [])] for t in TASKS]
        task_means = [mean_std(c)[0] for c in cells]  # NaN for a task without results
        # The paper's "Average" is the mean over the twelve tasks of the per-task means.
        avg = sum(task_means) / len(task_means) if all(cells) else None
        means[label] = task_means
        rows.append((label, *(fmt(c, 2) for c in cells), "" if avg is None else f"{avg:.2f}"))
    write(
        out_dir,
        "# Table 3 results (generated)\n\nVTAB-1k test accuracy (%), mean ± std over seeds; the average "
        "is over the twelve tasks (empty until every task has results).\n\n"
        + markdown_table(("model", *TASKS.values(), "average"), rows),
    )
    fig, (ax,) = figure(1, width=9)
    width = 0.8 / len(MODELS)
    for i, (label, task_means) in enumerate(means.items()):
        ax.bar([x + i * width for x in range(len(TASKS))], task_means, width, label=label)
    ax.set_xticks(range(len(TASKS)), list(TASKS.values()), rotation=45, ha="right", fontsize=7)
    ax.set_ylabel("test accuracy (%)")
    ax.set_title("Table 3: LoRA vs multi-mask LoRA, VTAB-1k, ViT-B/16 (in21k)", fontsize=10)
    ax.legend(fontsize=8)
    save(fig, out_dir / "table3.png")
