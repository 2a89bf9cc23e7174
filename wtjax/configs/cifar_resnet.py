r"""The paper's CIFAR-10 recipe for the ResNet-like model (appendix: Adam, lr 1e-3, cosine,
weight decay 2.5e-6, 150 epochs, batch 128; crop + flip + normalisation), multi-mask weight tying
at depth 8 and density 0.5.

    python -m wtjax.main --config=configs/cifar_resnet.py --workdir=runs/cifar_resnet
    # variants through the config argument (keys: see ARGS below; unknown keys fail):
    python -m wtjax.main --config=configs/cifar_resnet.py:mask_mode=same,density=0.3,depth=4,width=32
    # the local CIFAR copy (class folders, train split only: hold out 5,000 for evaluation):
    python -m wtjax.main --config=configs/cifar_resnet.py:width=32 \
        --config.data.data_dir=path/to/cifar10/train --config.data.holdout=5000

Any field can also be set with ``--config.<path>=<value>`` (e.g. ``--config.optim.learning_rate=3e-4``).
The paper gives no width for most figures; 64 is the width of the performance notes. Its Small and
Large ResNet (Tables 1b and 2) are widths 44 and 172 (``wtjax.models.resnet_like.SIZES``: the widths
whose parameter counts are the paper's 35k and 0.53M).
"""

from wtjax.job import config as cs

# Config argument keys and their defaults (the paper's setting).
ARGS = dict(
    width=64,  # channels C of the stem and the tied block
    depth=8,  # reuses K of the tied block
    **cs.tied_args(),  # form (tied | not_tied), mask_mode, density 0.5, mask_kind
    epochs=150.0,  # training epochs
    seed=0,  # run seed (init, dropout, data order); masks use model.mask.seed
)


def get_config(arg=None):
    a = cs.parse_arg(arg, **ARGS)
    model = cs.tied_model_config("resnet_like", a, width=a.width, depth=a.depth)
    return cs.base_config(
        name=f"cifar_resnet_{a.form}_{a.mask_mode}_d{a.density}_k{a.depth}_w{a.width}_s{a.seed}",
        seed=a.seed,
        model=model,
        num_epochs=a.epochs,
        **cs.paper_cifar_recipe(),
    )
