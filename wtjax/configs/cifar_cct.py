r"""The paper's CIFAR-10 recipe for the CCT-like model: AdamW, peak lr 6e-4, cosine, 300 epochs
(appendix C, "following CCT open-source code default settings"), batch 128; crop + flip +
normalisation. Weight decay 0.06 and 10 warm-up epochs are not in the paper: they are the public
CCT defaults (SHI-Labs/Compact-Transformers, configs/pretrained/cct_7-3x1_cifar10_300epochs.yml,
which also uses lr 5.5e-4, label smoothing 0.1, mixup/cutmix and AutoAugment; those augmentations
are not implemented here). Default model: CCT-7/3x1 with one encoder layer reused 7 times and
multi-masks at density 0.9 (the paper's practical guide #2 for transformers).

    python -m wtjax.main --config=configs/cifar_cct.py --workdir=runs/cifar_cct
    # the not-tied CCT-7/3x1 baseline (3.76M parameters) and the small width of Table 1b:
    python -m wtjax.main --config=configs/cifar_cct.py:form=not_tied
    python -m wtjax.main --config=configs/cifar_cct.py:embed_dim=128,num_heads=2
    # SPIN sharing of the encoder (share rate 7 = one set; here 7 layers, so 1 or 7):
    python -m wtjax.main --config=configs/cifar_cct.py:form=shared,share_rate=7,mask_mode=dense

Any field can also be set with ``--config.<path>=<value>`` (e.g. ``--config.model.share_params=mlp``).
"""

from wtjax.job import config as cs

# Config argument keys and their defaults (the paper's setting).
ARGS = dict(
    embed_dim=256,  # transformer width (CCT-7/3x1: 256; the paper's "small": 128)
    num_heads=4,  # attention heads
    depth=7,  # encoder layers (reuses of the tied layer)
    share_rate=1,  # form=shared: layers per distinct weight set (must divide depth)
    # form (not_tied | tied | shared), mask_mode, density of the attention and MLP kernels, mask_kind
    **cs.tied_args(density=0.9),
    epochs=300.0,  # training epochs
    seed=0,  # run seed (init, dropout, data order); masks use model.mask.seed
)


def get_config(arg=None):
    a = cs.parse_arg(arg, **ARGS)
    model = cs.tied_model_config(
        "cct", a, embed_dim=a.embed_dim, num_heads=a.num_heads, depth=a.depth, share_rate=a.share_rate
    )
    data = cs.data_config("cifar10", augment=True)  # mean/std None: the CIFAR statistics
    optim = cs.optim_config("adamw", 6e-4, schedule="cosine", warmup_epochs=10.0, weight_decay=0.06)
    return cs.base_config(
        name=f"cifar_cct_{a.form}_{a.mask_mode}_d{a.density}_k{a.depth}_w{a.embed_dim}_s{a.seed}",
        seed=a.seed,
        model=model,
        data=data,
        optim=optim,
        batch_size=128,
        num_epochs=a.epochs,
    )
