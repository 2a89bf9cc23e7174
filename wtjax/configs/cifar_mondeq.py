r"""Single-convolution monotone DEQ on CIFAR-10, optionally pruned at initialisation (Pham et al.):
81 channels, Adam lr 1e-3, 40 epochs, x0.1 decay every 10 epochs (the paper's Table D1).

    python -m wtjax.main --config=configs/cifar_mondeq.py --workdir=runs/cifar_mondeq
    python -m wtjax.main --config=configs/cifar_mondeq.py:method=snip,sparsity=0.9
    # a local CIFAR-10 copy (docs/data.md):
    python -m wtjax.main --config=configs/cifar_mondeq.py --config.data.data_dir=path/to/cifar10
"""

from pathlib import Path

from wtjax.job import config as cs

# Config files are loaded by path (not as a package): the sibling digits config too.
model_and_pruning = cs.load_config_module(Path(__file__).with_name("digits_mondeq.py")).model_and_pruning

ARGS = dict(
    arch="conv",  # conv (the paper's CIFAR model) | fc
    width=81,  # conv channels / FC hidden units
    parametrization="full",  # full | no_a | no_b | none
    solver="pr",  # pr | fb
    alpha=1.0,  # splitting step
    m=-1.0,  # monotonicity margin; < 0: the model default
    method="none",  # none | random | magnitude | snip | grasp | synflow
    sparsity=0.9,  # fraction of the implicit layer's weights removed
    scope="global",  # global | layer
    epochs=40.0,  # training epochs
    train_subset=0,  # > 0: train on the first N images only (cheap studies)
    seed=0,  # run seed
)


def get_config(arg=None):
    a = cs.parse_arg(arg, **ARGS)
    model, pruning = model_and_pruning(a)
    data = cs.data_config("cifar10", augment=True, train_subset=a.train_subset or None)
    return cs.base_config(
        name=f"cifar_mondeq_{a.arch}_{a.parametrization}_{a.method}_s{a.sparsity}_seed{a.seed}",
        seed=a.seed,
        model=model,
        data=data,
        optim=cs.optim_config(
            "adam", 1e-3, schedule="multistep", boundaries_epochs=(10, 20, 30), decay_factor=0.1
        ),
        pruning=pruning,
        batch_size=128,
        num_epochs=a.epochs,
    )
