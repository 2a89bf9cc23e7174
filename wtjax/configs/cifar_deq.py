r"""DEQ baselines on CIFAR-10 over the ResNet-like block of ``configs/cifar_resnet.py`` (same
parameter tree as the weight-tied model), with the paper's Appendix C recipes:

* ``variant=mdeq`` (the original DEQ/MDEQ): implicit differentiation, Broyden (or Anderson)
  forward and backward, Adam lr 1e-3 cosine, weight decay 2.5e-6, batch 64, 50 epochs
  (single-stream), weight-tied pre-training first;
* ``variant=phantom`` (DEQ with phantom gradient, Geng et al. 2021): SGD lr 0.2 cosine, weight
  decay 1e-4, batch 64, 50 epochs.

    python -m wtjax.main --config=configs/cifar_deq.py --workdir=runs/cifar_deq_mdeq
    python -m wtjax.main --config=configs/cifar_deq.py:variant=phantom --workdir=runs/cifar_deq_phantom
    python -m wtjax.main --config=configs/cifar_deq.py:solver=anderson,f_iters=30,b_iters=40,jac_weight=0.5

Our choices where the paper is silent (all are arguments): width 64 and pre-training depth 8 as
``cifar_resnet.py``; forward/backward budgets 18/20 (the DEQ papers use 18-30 forward and 20-40
backward iterations); pre-training for 8 epochs in the ``mdeq`` variant (the paper's Figure 10
switches at epoch 8) and none for ``phantom``; phantom gradient with 5 damped steps at tau 0.5.
Pre-training steps are counted for the 50,000-image CIFAR-10 training split.
"""

from wtjax.job import config as cs

CIFAR_TRAIN = 50_000
VARIANTS = ("mdeq", "phantom")

ARGS = dict(
    variant="mdeq",  # mdeq (IFT) | phantom (phantom gradient)
    solver="broyden",  # forward (and IFT backward) solver: broyden | anderson | fixed_point
    f_iters=18,  # forward solver iterations
    b_iters=20,  # backward (adjoint) solver iterations, mdeq variant
    width=64,  # channels C of the stem and the block
    depth=8,  # reuses K during weight-tied pre-training
    pretrain_epochs=-1.0,  # weight-tied pre-training; < 0: the variant's default (8 mdeq, 0 phantom)
    jac_weight=0.0,  # Jacobian regularisation weight (Bai et al. 2021 use 0.4-1.0)
    epochs=50.0,  # training epochs (single-stream DEQ)
    seed=0,  # run seed
)


def get_config(arg=None):
    a = cs.parse_arg(arg, **ARGS)
    if a.variant not in VARIANTS:
        raise ValueError(f"unknown variant {a.variant!r}; choose one of {VARIANTS}")
    batch_size = 64
    pretrain_epochs = a.pretrain_epochs if a.pretrain_epochs >= 0 else (8.0 if a.variant == "mdeq" else 0.0)
    model = cs.model_config(
        "deq_resnet_like",
        width=a.width,
        depth=a.depth,
        deq_pretrain_steps=int(pretrain_epochs * CIFAR_TRAIN / batch_size),
        f_solver=a.solver,
        f_max_iter=a.f_iters,
        b_solver=a.solver,
        b_max_iter=a.b_iters,
        grad="ift" if a.variant == "mdeq" else "phantom",
        phantom_steps=5,
        phantom_tau=0.5,
        jac_weight=a.jac_weight,
        monitor_backward=a.variant == "mdeq",  # logs deq_bwd_* (an adjoint solve on 8 samples per step)
    )
    optim = cs.deq_optim(phantom=a.variant != "mdeq")
    return cs.base_config(
        name=f"cifar_deq_{a.variant}_{a.solver}_f{a.f_iters}_b{a.b_iters}_w{a.width}_s{a.seed}",
        seed=a.seed,
        model=model,
        data=cs.data_config("cifar10", augment=True),
        optim=optim,
        batch_size=batch_size,
        num_epochs=a.epochs,
    )
