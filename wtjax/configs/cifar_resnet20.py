r"""ResNet-20 on CIFAR-10 with the paper's CIFAR recipe (Adam, lr 1e-3, cosine, weight decay
2.5e-6, 150 epochs, batch 128; crop + flip + normalisation). Default: the weight-tied form
(within each stage the shape-compatible blocks share one weight) with multi-masks at density 0.5.

    python -m wtjax.main --config=configs/cifar_resnet20.py --workdir=runs/cifar_resnet20
    # the explicit (not tied) ResNet-20 baseline, Large size:
    python -m wtjax.main --config=configs/cifar_resnet20.py:form=not_tied,mask_mode=dense,size=large
"""

from wtjax.job import config as cs

ARGS = dict(
    size="small",  # small (base width 8, ~68k params not tied) | large (64, ~4.3M)
    **cs.tied_args(),  # form (tied | not_tied), mask_mode (tied form), density 0.5, mask_kind
    epochs=150.0,  # training epochs
    seed=0,  # run seed
)


def get_config(arg=None):
    a = cs.parse_arg(arg, **ARGS)
    model = cs.tied_model_config("resnet20", a, size=a.size)
    return cs.base_config(
        name=f"cifar_resnet20_{a.size}_{a.form}_{a.mask_mode}_d{a.density}_s{a.seed}",
        seed=a.seed,
        model=model,
        num_epochs=a.epochs,
        **cs.paper_cifar_recipe(),
    )
