"""Data loading internals behind :mod:`wtjax.data.pipeline` (the public entry point).

Modules, one responsibility each:

- ``fields``: the fields of ``config.data`` with their one set of defaults, and the check that a
  section is complete.
- ``loaders``: the registry ``name -> loader`` (digits, cifar10, imagenet32, image_folder,
  synthetic, vtab), each with its normalisation statistics.
- ``sources``: random-access image sources (in-memory uint8 arrays, tfds data sources).
- ``augment``: vectorised NumPy random crop / flip and normalisation.
- ``dataset``: the :class:`~wtjax.data.dataset.Dataset` (splits, deterministic batching,
  per-process slicing, padded evaluation).
- ``cifar_files``: the official CIFAR-10 binary and python-pickle releases.
- ``image_folder``: ``<dir>/<class>/*.jpg|png`` trees, decoded with a thread pool and cached.
- ``tfds_source``: tensorflow-datasets data sources (no TensorFlow needed to read).
- ``builtin``: scikit-learn's bundled digits and a synthetic learnable dataset.
- ``vtab``: the VTAB-1k tasks, splits and labels (its loader is registered in ``loaders``).

Nothing here is imported by ``import wtjax``; tensorflow-datasets is imported lazily. The data
pipeline is the training job's: it needs the ``train`` extra, named at import when incomplete.
"""

from wtjax import _extras

_extras.require("train", "the data pipeline (wtjax.data)")
