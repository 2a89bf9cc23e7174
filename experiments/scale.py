"""The scales the studies run at, and the canonical runs they share.

Every study builds its runs with :func:`resnet_run` / :func:`deq_run` / :func:`explicit_run`, so a
run needed by several studies (e.g. the multi-mask depth-8 model of Figures 5, 6, 7 and 8) has one
id and is trained once.

* ``cpu``: what the shared 2-core machine affords. The local CIFAR-10 copy
  (``$WTJAX_CIFAR_DIR``, default ``/tmp/cifar10/train``; extract it with
  ``mkdir -p /tmp/cifar10 && tar -xJf ../shared/data/cifar10-train-jpeg.tar.xz -C /tmp/cifar10``),
  average-pooled to 16x16, trained on a fixed 10,000 of the 45,000 non-holdout images for
  2 epochs at batch 64 (312 steps), evaluated on the whole 5,000-image holdout (the last 5,000 training
  images after the fixed seed-0 shuffle; never the CIFAR-10 test split). Base width 16.
* ``cpu32``: a CPU scale that can resolve the central claim: full 32x32 resolution, all 45,000
  non-holdout training images, batch 64, no augmentation, base width 32, 6 epochs, evaluated on the
  same 5,000-image holdout once per epoch. The 20k-parameter models underfit (training accuracy
  tracks the holdout's), so augmentation only slows them: the batch and augmentation are chosen to
  get past 50% in a CPU budget, and the epochs for the multi-mask model to pass 55%
  (experiments/central_claim_32px/README.md has the pilot runs). About 35-60 minutes per
  ResNet-like run at K = 4 on a 2-core machine; only
  ``experiments/central_claim_32px`` uses it, as a sweep resumed across sessions.
* ``paper``: the paper's setting (Appendix C): tfds ``cifar10`` at 32x32, all 50,000 training
  images, the official test split; the ResNet recipe (Adam, lr 1e-3, cosine, weight decay 2.5e-6)
  at batch 128 for 150 epochs; DEQs and the weight-tied models compared with them (Fig. 2 /
  Table 1a) with the DEQ's recipe at batch 64 for 50 epochs; DEQ solver budgets of MDEQ's CIFAR-10
  code (locuslab/mdeq ``experiments/cifar/cls_mdeq_LARGE.yaml``: Broyden, 18 forward / 20 backward
  iterations). The paper's Small / Large ResNet widths (Tables 1b and 2) are 44 / 172
  (:data:`SIZES`: the widths whose parameter counts are its 35k / 0.53M). The paper gives no width
  for Figures 2 and 5-8: base width 64 is our choice (not the paper's).
"""

from __future__ import annotations

import os

from wtjax.models.resnet_like import SIZES  # noqa: F401 (for the studies: the paper's Small / Large widths 44 / 172)
from wtjax.tools.sweep import Run

SEEDS = (0, 1, 2)
CIFAR_DIR = os.environ.get("WTJAX_CIFAR_DIR", "/tmp/cifar10/train")

JOB = {"log_every_steps": 25, "progress": False, "tensorboard": False}  # every study run's job settings
SCALES = {
    "cpu": dict(
        base_width=16,
        epochs=2.0,
        deq_epochs=2.0,
        deq_batch_size=64,
        deq_iters=(12, 12),  # forward / backward solver iterations (fewer than the DEQ papers')
        train_images=10_000,
        overrides={
            **JOB,
            "batch_size": 64,
            "eval_every_steps": 0,  # evaluate once, at the end
            "checkpoint_every_steps": 100,
            "data.data_dir": CIFAR_DIR,
            "data.holdout": 5000,
            "data.train_subset": 10_000,
            "data.downsample": 2,
        },
    ),
    "cpu32": dict(
        base_width=32,
        epochs=6.0,
        deq_epochs=6.0,
        train_images=45_000,
        overrides={
            **JOB,
            "batch_size": 64,
            "eval_every_steps": 703,  # about once per epoch (45,000 / 64 = 703.1 steps)
            "checkpoint_every_steps": 234,
            "data.augment": False,
            "data.data_dir": CIFAR_DIR,
            "data.holdout": 5000,
        },
    ),
    "paper": dict(
        base_width=64,  # the paper is silent on it (Figs 2, 5-8): our choice
        epochs=150.0,
        deq_epochs=50.0,  # Appendix C: 50 epochs for the single-stream DEQ, batch 64
        deq_batch_size=64,
        # MDEQ's CIFAR budget (cls_mdeq_LARGE.yaml F_THRES / B_THRES; MDEQ-Tiny uses 30 / 30), for
        # both DEQ variants (the phantom-gradient one uses the forward budget only).
        deq_iters=(18, 20),
        train_images=50_000,
        overrides={**JOB, "batch_size": 128},
    ),
}


# One line per scale for the claim table (experiments/README.md): what a number of that scale means.
SETTINGS = {
    "cpu": "cpu scale (16x16 px, 10k images, 2 epochs, width 16)",
    "cpu32": "cpu32 scale (32x32 px, 45k images, no augmentation, 6 epochs, width 32)",  # central_claim_32px
    "cpu_mdeq": "cpu scale's data (16x16 px, 10k images, 2 epochs), MDEQ-Tiny widths",  # fig2's MDEQ runs
    "paper": "paper scale",
}


def setting(name: str) -> str:
    """The one-line description of scale ``name`` (its name when it has none)."""
    return SETTINGS.get(name, f"scale {name}")


def scale(name: str) -> dict:
    if name not in SCALES:
        raise KeyError(f"unknown scale {name!r}; choose one of {sorted(SCALES)}")
    return SCALES[name]


def width(name: str, factor: float) -> int:
    """The base width of the scale times a width factor (the paper's Figure 8 'width scaling')."""
    return max(1, round(scale(name)["base_width"] * factor))


def resnet_run(
    name: str,
    *,
    seed: int,
    width_factor: float = 1.0,
    depth: int = 8,
    mode: str = "multi",
    density: float = 0.5,
    kind: str = "unstructured",
    form: str = "tied",
    epoch_factor: float = 1.0,
    recipe: str = "adam",
    width_abs: int | None = None,
    deq_matched: bool = False,
) -> Run:
    """The ResNet-like model of ``configs/cifar_resnet.py`` at scale ``name``.

    ``mode``: dense | same | multi | dropout (DropConnect at rate ``1 - density``);
    ``form='not_tied'``: K independent dense blocks. ``epoch_factor`` stretches training (the
    equal-FLOP runs of Figure 7). ``recipe='sgd'``: the phantom-gradient DEQ's optimiser (SGD lr
    0.2, weight decay 1e-4; the paper trains the weight-tied model of each DEQ comparison with the
    DEQ's recipe) instead of the paper's Adam. ``width_abs``: this width instead of the scale's
    base width times ``width_factor`` (the paper's Small / Large: :data:`SIZES`).
    ``deq_matched``: the DEQ's epochs and batch size (Appendix C: "the training parameters of the
    weight-tied models are fixed to be of the same values as their corresponding DEQ models").
    Masks are drawn from the run seed.
    """
    s = scale(name)
    if mode == "dense" or form == "not_tied":
        density, kind = 1.0, "unstructured"
        mode = "dense"
    base_epochs = s["deq_epochs"] if deq_matched else s["epochs"]
    epochs = round(base_epochs * epoch_factor, 3)
    w = width(name, width_factor) if width_abs is None else int(width_abs)
    if width_abs is not None:
        width_factor = w / s["base_width"]
    arg = (
        f"width={w},depth={depth},form={form},mask_mode={mode},density={density},"
        f"mask_kind={kind},epochs={epochs},seed={seed}"
    )
    overrides = {**s["overrides"], "model.mask.seed": seed}
    batch = s["deq_batch_size"] if deq_matched else overrides["batch_size"]
    bs_tag = "" if batch == overrides["batch_size"] else f"_bs{batch}"  # a batch other than the scale's
    overrides["batch_size"] = batch
    kind_tag = "nm" if kind == "nm" else "u"
    rid = f"resnet_{form}_{mode}_{kind_tag}{density}_w{w}_k{depth}_e{epochs}{bs_tag}_s{seed}"
    if recipe == "sgd":
        rid = rid.replace("resnet_", "resnet_sgd_", 1)
        overrides.update({"optim.name": "sgd", "optim.learning_rate": 0.2, "optim.weight_decay": 1e-4})
    elif recipe != "adam":
        raise ValueError(f"unknown recipe {recipe!r}: adam | sgd")
    tags = dict(
        model="resnet_like",
        recipe=recipe,
        form=form,
        mode=mode,
        density=density,
        kind=kind,
        width=w,
        width_factor=width_factor,
        depth=depth,
        epochs=epochs,
        seed=seed,
    )
    return Run(rid, "configs/cifar_resnet.py", arg, overrides, tags)


def deq_run(
    name: str, *, seed: int, variant: str = "mdeq", f_iters: int | None = None, b_iters: int | None = None
) -> Run:
    """The DEQ of ``configs/cifar_deq.py`` over the same ResNet-like block (base width).

    ``mdeq``: implicit differentiation with Broyden and Adam, weight-tied pre-training for the
    first 16% of training (the paper's Figure 10: 8 of 50 epochs); ``phantom``: phantom gradient,
    SGD. Solver budgets default to the scale's ``deq_iters``; batch size to its ``deq_batch_size``.
    """
    s = scale(name)
    w = width(name, 1.0)
    epochs = s["deq_epochs"]
    f_default, b_default = s["deq_iters"]
    f_iters = f_default if f_iters is None else f_iters
    b_iters = b_default if b_iters is None else b_iters
    batch = s["deq_batch_size"]
    pretrain_steps = int(0.16 * epochs * s["train_images"] / batch) if variant == "mdeq" else 0
    arg = f"variant={variant},width={w},f_iters={f_iters},b_iters={b_iters},epochs={epochs},seed={seed}"
    overrides = {
        **s["overrides"],
        "model.deq_pretrain_steps": pretrain_steps,
        "model.monitor_backward": False,  # the extra adjoint solve would distort the runtime
    }
    overrides["batch_size"] = batch  # Appendix C: batch 64 for both DEQ recipes
    rid = f"deq_{variant}_w{w}_f{f_iters}_b{b_iters}_e{epochs}_s{seed}"
    tags = dict(model="deq", variant=variant, width=w, f_iters=f_iters, epochs=epochs, seed=seed)
    return Run(rid, "configs/cifar_deq.py", arg, overrides, tags)


def explicit_run(name: str, *, seed: int, size: str = "small") -> Run:
    """ResNet-20 (``configs/cifar_resnet20.py``), the paper's explicit baseline of Table 1b."""
    s = scale(name)
    arg = f"size={size},form=not_tied,mask_mode=dense,epochs={s['epochs']},seed={seed}"
    rid = f"resnet20_{size}_e{s['epochs']}_s{seed}"
    tags = dict(model="resnet20", size=size, epochs=s["epochs"], seed=seed)
    return Run(rid, "configs/cifar_resnet20.py", arg, dict(s["overrides"]), tags)


def mdeq_run(name: str, *, seed: int, size: str = "tiny", variant: str = "mdeq") -> Run:
    """The multiscale DEQ of ``configs/cifar_mdeq.py`` (``size`` tiny | large) at scale ``name``.

    ``variant``: ``mdeq`` (implicit gradient, Broyden, Adam), ``phantom`` (phantom gradient, SGD)
    or ``tied`` (its weight-tied counterpart: the multiscale layer applied 10 times, Adam).
    Solver budgets are the reference's at every scale (Tiny 22 forward / 24 backward, Large
    18 / 20): the runs train at the budget they are timed at. ``cpu``: the scale's data and
    ``deq_epochs``, weight-tied pretraining for the first 16% of the steps (as :func:`deq_run`),
    no backward monitor (it would distort the runtime). ``paper``: the config's own recipe
    (the paper's Appendix C: batch 64, 50 epochs Tiny / 220 Large, the reference's pretraining).
    """
    s = scale(name)
    overrides = dict(s["overrides"])
    if name == "paper":
        overrides["batch_size"] = 64  # the paper's Appendix C batch for MDEQ (the config's)
        epochs = None  # the config's: 50 Tiny, 220 Large
        arg = f"size={size},variant={variant},seed={seed}"
    else:
        epochs = s["deq_epochs"]
        arg = f"size={size},variant={variant},epochs={epochs},seed={seed}"
        if variant != "phantom":
            steps = int(0.16 * epochs * s["train_images"] / overrides["batch_size"])
            overrides["model.deq_pretrain_steps"] = steps
        overrides["model.monitor_backward"] = False
    rid = f"mdeq_{size}_{variant}_e{epochs or 'paper'}_s{seed}"
    tags = dict(model="mdeq", size=size, variant=variant, epochs=epochs, seed=seed)
    return Run(rid, "configs/cifar_mdeq.py", arg, overrides, tags)
