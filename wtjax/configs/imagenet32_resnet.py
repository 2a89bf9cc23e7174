r"""The paper's ImageNet32 recipe for the ResNet-like model: SGD (momentum 0.9), lr 0.05,
multi-step schedule, weight decay 1e-4 (L2, PyTorch style), 90 epochs, batch 128; multi-mask
weight tying at depth 8, density 0.5, width 172 (the paper's ResNet-Large).

The paper does not give the multi-step boundaries or the momentum: we use the usual ImageNet
choice, x0.1 at epochs 30, 60 and 80, momentum 0.9. Data: tfds ``imagenet_resized/32x32``
(1.28M train / 50k validation images; preparing it downloads ~4 GB).

    python -m wtjax.main --config=configs/imagenet32_resnet.py --workdir=runs/imagenet32
    # ResNet-XL (Figure 9: twice as wide as ResNet-Large), dense:
    python -m wtjax.main --config=configs/imagenet32_resnet.py:width=344,mask_mode=dense \
        --config.data.data_dir=/path/to/tensorflow_datasets
"""

from wtjax.job import config as cs

ARGS = dict(
    width=172,  # channels C: the paper's ResNet-Large (Table 1b's 0.53M at 10 classes; "size='large'")
    depth=8,  # reuses K
    **cs.tied_args(),  # form (tied | not_tied), mask_mode, density 0.5, mask_kind
    epochs=90.0,  # training epochs
    seed=0,  # run seed
)


def get_config(arg=None):
    a = cs.parse_arg(arg, **ARGS)
    model = cs.tied_model_config("resnet_like", a, width=a.width, depth=a.depth)
    optim = cs.optim_config(
        "sgd", 0.05, schedule="multistep", boundaries_epochs=(30, 60, 80), decay_factor=0.1, weight_decay=1e-4
    )
    return cs.base_config(
        name=f"imagenet32_resnet_{a.form}_{a.mask_mode}_d{a.density}_k{a.depth}_w{a.width}_s{a.seed}",
        seed=a.seed,
        model=model,
        data=cs.data_config("imagenet32", augment=True),
        optim=optim,
        batch_size=128,
        eval_batch_size=500,
        num_epochs=a.epochs,
        log_every_steps=100,
        eval_every_steps=10000,
        checkpoint_every_steps=5000,
    )
