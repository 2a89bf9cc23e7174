r"""The paper's MLP on CIFAR-10 (two weight-tied Dense layers reused K times), trained with the
ResNet recipe (Adam, lr 1e-3, cosine, weight decay 2.5e-6, 150 epochs, batch 128): the paper
states no separate MLP recipe, so this is our choice.

    python -m wtjax.main --config=configs/cifar_mlp.py --workdir=runs/cifar_mlp
    python -m wtjax.main --config=configs/cifar_mlp.py:size=large,mask_mode=dense
"""

from wtjax.job import config as cs

ARGS = dict(
    size="small",  # small (width 256) | large (512)
    depth=8,  # reuses K of the tied block
    form="tied",  # tied | not_tied
    mask_mode="multi",  # dense | same | multi | dropout
    density=0.5,  # fraction of each tied kernel kept
    mask_kind="unstructured",  # unstructured | nm (2:4)
    epochs=150.0,  # training epochs
    seed=0,  # run seed
)


def get_config(arg=None):
    a = cs.parse_arg(arg, **ARGS)
    model = cs.model_config(
        "mlp",
        size=a.size,
        depth=a.depth,
        form=a.form,
        mask_mode=a.mask_mode,
        mask=dict(kind=a.mask_kind, density=a.density),
    )
    return cs.base_config(
        name=f"cifar_mlp_{a.size}_{a.form}_{a.mask_mode}_d{a.density}_k{a.depth}_s{a.seed}",
        seed=a.seed,
        model=model,
        data=cs.data_config("cifar10", augment=True),
        optim=cs.optim_config("adam", 1e-3, schedule="cosine", weight_decay=2.5e-6),
        batch_size=128,
        num_epochs=a.epochs,
    )
