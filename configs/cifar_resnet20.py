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
    form="tied",  # tied | not_tied
    mask_mode="multi",  # dense | same | multi | dropout (tied form)
    density=0.5,  # fraction of each tied kernel kept
    mask_kind="unstructured",  # unstructured | nm (2:4)
    epochs=150.0,  # training epochs
    seed=0,  # run seed
)


def get_config(arg=None):
    a = cs.parse_arg(arg, **ARGS)
    model = cs.model_config(
        "resnet20",
        size=a.size,
        form=a.form,
        mask_mode=a.mask_mode,
        mask=dict(kind=a.mask_kind, density=a.density),
    )
    return cs.base_config(
        name=f"cifar_resnet20_{a.size}_{a.form}_{a.mask_mode}_d{a.density}_s{a.seed}",
        seed=a.seed,
        model=model,
        data=cs.data_config("cifar10", augment=True),
        optim=cs.optim_config("adam", 1e-3, schedule="cosine", weight_decay=2.5e-6),
        batch_size=128,
        num_epochs=a.epochs,
    )
