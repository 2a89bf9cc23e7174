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
    **cs.tied_args(),  # form (tied | not_tied), mask_mode, density 0.5, mask_kind
    epochs=150.0,  # training epochs
    seed=0,  # run seed
)


def get_config(arg=None):
    a = cs.parse_arg(arg, **ARGS)
    model = cs.tied_model_config("mlp", a, size=a.size, depth=a.depth)
    return cs.base_config(
        name=f"cifar_mlp_{a.size}_{a.form}_{a.mask_mode}_d{a.density}_k{a.depth}_s{a.seed}",
        seed=a.seed,
        model=model,
        num_epochs=a.epochs,
        **cs.paper_cifar_recipe(),
    )
