r"""A tiny config for tests and smoke runs: synthetic 8x8 data, a width-8 multi-mask model at
depth 2, a few steps. Runs in seconds on a CPU.

    python -m wtjax.main --config=configs/tiny.py --workdir=runs/tiny
    python -m wtjax.main --config=configs/tiny.py:model=mlp,steps=10 --workdir=runs/tiny_mlp
"""

from wtjax.job import config as cs

ARGS = dict(
    model="resnet_like",  # any registered model with width/depth fields
    steps=4,  # training steps
    mask_mode="multi",  # dense | same | multi | dropout
    seed=0,  # run seed
)


def get_config(arg=None):
    a = cs.parse_arg(arg, **ARGS)
    model = cs.model_config(a.model, width=8, depth=2, mask_mode=a.mask_mode, mask=dict(density=0.5))
    if a.model == "resnet_like":
        model.groups = 2
    data = cs.data_config(
        "synthetic", num_classes=4, image_shape=(8, 8, 3), num_train=64, num_eval=12, augment=True
    )
    return cs.base_config(
        name=f"tiny_{a.model}_{a.mask_mode}",
        seed=a.seed,
        model=model,
        data=data,
        optim=cs.optim_config("adam", 1e-2, schedule="cosine", warmup_epochs=0.25, weight_decay=2.5e-6),
        batch_size=8,
        num_train_steps=a.steps,
        log_every_steps=2,
        eval_every_steps=0,
        checkpoint_every_steps=2,
        progress=False,
        accounting=False,
        plots=False,  # matplotlib's import would double a tiny run's time (tests that plot turn it on)
    )
