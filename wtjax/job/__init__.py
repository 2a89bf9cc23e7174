"""The training job: configs, train state and steps, optimizers, parallelism, checkpoints, metrics.

It needs the ``train`` extra (``pip install 'wtjax[train]'``); a missing part is named at import.
"""

from wtjax import _extras

_extras.require("train", "the training job (wtjax.job)")
