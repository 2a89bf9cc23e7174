r"""Offline quickstart: a multi-mask weight-tied ResNet-like model on scikit-learn's bundled
handwritten digits (16x16 greyscale, 1,500 train / 297 test images; no download), a minute or
two on a laptop CPU.

    python -m wtjax.main --config=configs/digits_quickstart.py --workdir=runs/quickstart
    # the same with one dense weight shared by all reuses, for comparison:
    python -m wtjax.main --config=configs/digits_quickstart.py:mask_mode=dense --workdir=runs/qs_dense
"""

from wtjax.job import config as cs

ARGS = dict(
    width=32,  # channels C
    depth=4,  # reuses K of the tied block
    mask_mode="multi",  # dense | same | multi | dropout
    density=0.5,  # fraction of each tied kernel kept
    epochs=10.0,  # training epochs
    seed=0,  # run seed
)


def get_config(arg=None):
    a = cs.parse_arg(arg, **ARGS)
    model = cs.model_config(
        "resnet_like", width=a.width, depth=a.depth, mask_mode=a.mask_mode, mask=dict(density=a.density)
    )
    return cs.base_config(
        name=f"digits_quickstart_{a.mask_mode}_d{a.density}_k{a.depth}_w{a.width}_s{a.seed}",
        seed=a.seed,
        model=model,
        # No augmentation keeps the quickstart short (set --config.data.augment=True for 2-pixel crops).
        data=cs.data_config("digits", augment=False),
        optim=cs.optim_config("adam", 1e-2, schedule="cosine", warmup_epochs=0.5, weight_decay=2.5e-6),
        batch_size=60,  # 25 steps per epoch
        num_epochs=a.epochs,
        log_every_steps=25,
        eval_every_steps=125,  # every 5 epochs
        checkpoint_every_steps=125,
    )
