r"""Monotone DEQ (Winston & Kolter 2020) on scikit-learn's bundled digits (16x16x1, 1,500 train /
297 test; no download), optionally pruned at initialisation (Pham et al., "Pruning deep
equilibrium models"). Only the implicit layer (``mon/``: U, A, B) is pruned, as in the paper.
Recipe after the paper's Table D1 (Adam, lr 1e-3, x0.1 step decay), shortened for digits.

    python -m wtjax.main --config=configs/digits_mondeq.py --workdir=runs/digits_mondeq
    python -m wtjax.main --config=configs/digits_mondeq.py:arch=conv,method=snip,sparsity=0.9
    python -m wtjax.main --config=configs/digits_mondeq.py:parametrization=no_a,solver=fb,alpha=0.05
"""

from wtjax.job import config as cs

ARGS = dict(
    arch="fc",  # fc (mondeq_fc) | conv (mondeq_conv, single circular convolution)
    width=0,  # FC hidden units / conv channels; 0: fc 64, conv 16 (the FFT-based conv layer costs
    # O(H W n^2) per solver iteration: 64 channels take seconds per step on a CPU)
    parametrization="full",  # full | no_a | no_b | none (W = (1-m)I)
    solver="pr",  # pr (Peaceman-Rachford) | fb (forward-backward)
    alpha=1.0,  # splitting step (fb needs alpha < 2m/||I-W||^2)
    m=-1.0,  # monotonicity margin; < 0: the monDEQ defaults (fc 0.1, conv 1.0)
    method="none",  # none | random | magnitude | snip | grasp | synflow
    sparsity=0.9,  # fraction of the implicit layer's weights removed
    scope="global",  # global | layer
    epochs=10.0,  # training epochs
    seed=0,  # run seed
)


def model_and_pruning(a):
    """``(config.model, config.pruning)`` shared by the digits and CIFAR-10 monDEQ configs."""
    name = {"fc": "mondeq_fc", "conv": "mondeq_conv"}[a.arch]
    width = a.width or {"fc": 64, "conv": 16}[a.arch]
    size = dict(width=width) if a.arch == "fc" else dict(channels=width)
    solver = dict(parametrization=a.parametrization, solver=a.solver, alpha=a.alpha)
    if a.m >= 0:
        solver["m"] = a.m
    model = cs.model_config(name, **size, **solver)
    method = None if a.method == "none" else a.method
    pruning = cs.pruning_config(method=method, sparsity=a.sparsity, scope=a.scope, include=("mon/",))
    return model, pruning


def get_config(arg=None):
    a = cs.parse_arg(arg, **ARGS)
    model, pruning = model_and_pruning(a)
    return cs.base_config(
        name=f"digits_mondeq_{a.arch}_{a.parametrization}_{a.method}_s{a.sparsity}_seed{a.seed}",
        seed=a.seed,
        model=model,
        data=cs.data_config("digits", augment=False),
        optim=cs.optim_config(
            "adam", 1e-3, schedule="multistep", boundaries_epochs=(int(a.epochs * 2 / 3),), decay_factor=0.1
        ),
        pruning=pruning,
        batch_size=50,  # 30 steps per epoch
        num_epochs=a.epochs,
        log_every_steps=30,
        eval_every_steps=0,
        checkpoint_every_steps=300,
    )
