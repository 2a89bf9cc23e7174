"""Figure 9: multi-mask weight tying on ImageNet32, and the density table (CIFAR-10 and ImageNet32).

(a) ImageNet32 (tfds ``imagenet_resized/32x32``: 1.28M training images, the 50,000-image
validation split as the test set, 1,000 classes), K = 8, density 0.5: multi-mask, same-mask and
dense weight-tied ResNet-like models at the paper's ResNet-Large width (172) and ResNet-XL ("two
times wider": 344), with the Appendix C ImageNet32 ResNet recipe (``configs/imagenet32_resnet.py``:
SGD lr 0.05, multi-step, weight decay 1e-4, 90 epochs, batch 128); and the CCT-like model
(``configs/cifar_cct.py``'s CCT-7/3x1 on ImageNet32 with the Appendix's AdamW lr 5e-4, cosine,
300 epochs; density 0.5 as the caption says for every weight-tied model).
(b) ResNet-Large (172), K = 8, multi-mask at densities 0.3, 0.5, 0.7, 0.9 and dense (1.0), on
ImageNet32 (the recipe above) and on CIFAR-10 (the paper scale's CIFAR recipe, 150 epochs).

Not defined here: the DEQ bars of (a), since the paper gives neither the size nor the recipe of
its ImageNet32 DEQ. The caption says "all models are trained in the same number of FLOPs"; the
runs use the Appendix's stated epochs (90 ImageNet32, 150 CIFAR-10) for every density, i.e. equal
epochs (Figure 7's study has the equal-FLOP variant on CIFAR-10).

Nothing here is runnable on the CPU machine: ``runs('cpu')`` is empty, and the README states the
commands, the data preparation and the expected cost.
"""

from __future__ import annotations

from experiments import scale as sc
from experiments.report import accuracy, figure, fmt, group, markdown_table, mean_std, save, write
from wtjax.tools.sweep import Run

DEPTH = 8
WIDTHS = {"ResNet-Large": sc.SIZES["large"], "ResNet-XL": 2 * sc.SIZES["large"]}
MODES = ("multi", "same", "dense")
DENSITIES = (0.3, 0.5, 0.7, 0.9, 1.0)  # Figure 9b's table; 1.0 is the dense weight-tied model
IMAGENET_EPOCHS, CCT_EPOCHS = 90.0, 300.0  # Appendix C
JOB = {"progress": False, "tensorboard": False}  # the configs' own log/eval/checkpoint cadence


def imagenet_resnet_run(*, seed: int, width: int, mode: str, density: float = 0.5) -> Run:
    """The ResNet-like model on ImageNet32 with the paper's recipe (``configs/imagenet32_resnet.py``)."""
    if mode == "dense":
        density = 1.0
    arg = (
        f"width={width},depth={DEPTH},form=tied,mask_mode={mode},density={density},"
        f"epochs={IMAGENET_EPOCHS},seed={seed}"
    )
    rid = f"in32_resnet_tied_{mode}_u{density}_w{width}_k{DEPTH}_e{IMAGENET_EPOCHS}_s{seed}"
    tags = dict(dataset="imagenet32", model="resnet_like", mode=mode, density=density, width=width, seed=seed)
    return Run(rid, "configs/imagenet32_resnet.py", arg, {**JOB, "model.mask.seed": seed}, tags)


def imagenet_cct_run(*, seed: int, mode: str, density: float = 0.5) -> Run:
    """CCT-7/3x1 (``configs/cifar_cct.py``) on ImageNet32: AdamW, peak lr 5e-4 (Appendix C), 300 epochs."""
    if mode == "dense":
        density = 1.0
    arg = f"mask_mode={mode},density={density},epochs={CCT_EPOCHS},seed={seed}"
    overrides = {
        **JOB,
        "data.name": "imagenet32",  # the ImageNet statistics and tfds source; crop + flip as on CIFAR
        "optim.learning_rate": 5e-4,
        "model.mask.seed": seed,
    }
    rid = f"in32_cct_tied_{mode}_u{density}_k7_e{CCT_EPOCHS}_s{seed}"
    tags = dict(dataset="imagenet32", model="cct", mode=mode, density=density, width=256, seed=seed)
    return Run(rid, "configs/cifar_cct.py", arg, overrides, tags)


def cifar_density_run(scale: str, *, seed: int, density: float) -> Run:
    """Figure 9b's CIFAR-10 column: ResNet-Large at ``density`` (the shared paper-scale CIFAR run)."""
    mode = "dense" if density == 1.0 else "multi"
    run = sc.resnet_run(
        scale, seed=seed, width_abs=sc.SIZES["large"], depth=DEPTH, mode=mode, density=density
    )
    return Run(run.id, run.config, run.arg, run.overrides, {**run.tags, "dataset": "cifar10"})


SCALES = ("paper",)  # the scales this study defines runs for: accelerators only


def runs(scale: str):
    if scale != "paper":  # ImageNet32 (and ResNet-Large for 150 CIFAR-10 epochs): accelerators only
        return []
    out = []
    for seed in sc.SEEDS:
        for width in WIDTHS.values():
            out += [imagenet_resnet_run(seed=seed, width=width, mode=m) for m in MODES]
        out += [imagenet_cct_run(seed=seed, mode=m) for m in MODES]
        for d in DENSITIES:
            mode = "dense" if d == 1.0 else "multi"
            out.append(imagenet_resnet_run(seed=seed, width=WIDTHS["ResNet-Large"], mode=mode, density=d))
            out.append(cifar_density_run(scale, seed=seed, density=d))
    return list({r.id: r for r in out}.values())  # density 0.5 / 1.0 on ImageNet32 are also (a)'s runs


NO_RESULTS = (
    "# Figure 9 results (generated)\n\nNo results: these runs were not run here (ImageNet32 and "
    "ResNet-Large at 150 CIFAR-10 epochs need an accelerator; see README.md for the commands and cost).\n"
)


def aggregate(results, out_dir, scale):
    if not results:
        write(out_dir, NO_RESULTS)
        return
    imagenet = [r for r in results if r["tags"]["dataset"] == "imagenet32"]
    g = group(imagenet, "model", "width", "mode", "density")
    rows_a = [
        (model, width, mode, fmt([accuracy(r) for r in rs]), len(rs))
        for (model, width, mode, density), rs in sorted(g.items(), key=str)
        if density in (0.5, 1.0)
    ]
    by_density = group(
        [r for r in results if r["tags"]["width"] == WIDTHS["ResNet-Large"]], "dataset", "density"
    )
    rows_b = [
        (d, *(fmt([accuracy(r) for r in by_density.get((ds, d), [])], 2) for ds in ("cifar10", "imagenet32")))
        for d in DENSITIES
    ]
    write(
        out_dir,
        "# Figure 9 results (generated)\n\nTest accuracy (%), mean ± std over seeds.\n\n"
        "(a) ImageNet32, K = 8, density 0.5 (dense: 1.0)\n\n"
        + markdown_table(("model", "width", "mask mode", "accuracy (%)", "seeds"), rows_a)
        + "\n(b) ResNet-Large (width 172), K = 8, multi-mask by density (1.0: dense weight-tied)\n\n"
        + markdown_table(("density", "CIFAR-10 acc. (%)", "ImageNet32 acc. (%)"), rows_b),
    )
    _plot_density(by_density, out_dir)


def _plot_density(by_density: dict, out_dir) -> None:
    fig, axes = figure(2)
    for ax, ds in zip(axes, ("cifar10", "imagenet32"), strict=True):
        pts = [(d, *mean_std([accuracy(r) for r in by_density.get((ds, d), [])])[:2]) for d in DENSITIES]
        pts = [p for p in pts if p[1] == p[1]]  # drop densities without results (NaN mean)
        if pts:
            xs, ms, ss = zip(*pts, strict=True)
            ax.errorbar(xs, ms, yerr=ss, marker="o", capsize=3)
        ax.set_xlabel("mask density (1.0: dense)")
        ax.set_ylabel("test accuracy (%)")
        ax.set_title(f"Figure 9b: ResNet-Large, K = 8, {ds}", fontsize=10)
        ax.grid(alpha=0.3)
    save(fig, out_dir / "fig9.png")
