"""Optional dependencies ("extras") of the parts of wtjax, and a clear error when one is missing.

``pip install wtjax`` gives the library, which needs only jax, flax and numpy: the tie and its masks
(``core``), ``implicit``, ``models``, ``methods``, and ``analysis.accounting``/``analysis.cka``. The
training job and what it is built of (``data``, ``job``, ``tools``, ``main``) need the ``train``
extra; the CKA heatmaps and linear probes (``analysis.plots``, ``analysis.probes``) the ``analysis``
extra. Those modules call :func:`require` before their first import of an optional package, so a
missing one stops at once with the command that installs it, instead of a bare
``ModuleNotFoundError`` deep in an import chain.

:data:`EXTRAS` names import names, not distributions; ``tests/test_extras.py`` checks that it
lists exactly the distributions of each extra in ``pyproject.toml``.
"""

from __future__ import annotations

import importlib.util

EXTRAS: dict[str, tuple[str, ...]] = {
    "train": (
        "optax",
        "orbax.checkpoint",
        "tensorflow_datasets",
        "ml_collections",
        "absl",
        "tensorboardX",
        "tqdm",
        "PIL",
        "matplotlib",
        "sklearn",
    ),
    "analysis": ("matplotlib", "sklearn"),
    "tensorboard": ("tensorboard",),
}


class MissingExtraError(ModuleNotFoundError):
    """A module of an optional extra is not installed (an ``ImportError``, as pip users expect)."""


def missing(extra: str) -> list[str]:
    """The modules of ``extra`` (a key of :data:`EXTRAS`) that cannot be imported, in order."""
    if extra not in EXTRAS:
        raise KeyError(f"unknown extra {extra!r}; the extras are {sorted(EXTRAS)}")
    return [name for name in EXTRAS[extra] if not _importable(name)]


def require(extra: str, user: str) -> None:
    """Raise :class:`MissingExtraError` naming ``pip install 'wtjax[extra]'`` if ``extra`` is incomplete.

    ``user`` says what needs it (``"the training job (wtjax.job)"``). The check only looks for the
    modules (``importlib.util.find_spec``): it imports none of the heavy ones.
    """
    absent = missing(extra)
    if absent:
        raise MissingExtraError(
            f"{user} needs the '{extra}' extra of wtjax, and {', '.join(absent)} "
            f"{'is' if len(absent) == 1 else 'are'} not installed: pip install 'wtjax[{extra}]'",
            name=absent[0],
        )


def _importable(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):  # a missing parent package, or a module without a spec
        return False
