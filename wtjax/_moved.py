"""Old flat module paths (``wtjax.tied``, ``wtjax.train``, ...) keep importing, with a warning.

wtjax 0.1 kept every module side by side in ``wtjax/``; they now live in layer packages
(``core``, ``methods``, ``data``, ``job``, ``tools``). ``import wtjax.tied`` returns the very
module ``wtjax.core.tied`` (same objects, so ``isinstance`` and pickles keep working) and emits a
``DeprecationWarning`` naming the new path. The aliases will be removed in wtjax 0.3.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
import warnings

MOVED = {
    "wtjax.tied": "wtjax.core.tied",
    "wtjax.masks": "wtjax.core.masks",
    "wtjax.conv": "wtjax.core.conv",
    "wtjax.precision": "wtjax.core.precision",
    "wtjax.sharing": "wtjax.core.spin.sharing",
    "wtjax.models.spin": "wtjax.core.spin.options",
    "wtjax.lora": "wtjax.methods.lora",
    "wtjax.lora_finetune": "wtjax.methods.lora_finetune",
    "wtjax.pruning": "wtjax.methods.pruning",
    "wtjax.input_pipeline": "wtjax.data.pipeline",
    "wtjax.vtab": "wtjax.data.vtab",
    "wtjax.train": "wtjax.job.train",
    "wtjax.steps": "wtjax.job.steps",
    "wtjax.optim": "wtjax.job.optim",
    "wtjax.parallel": "wtjax.job.parallel",
    "wtjax.checkpointing": "wtjax.job.checkpointing",
    "wtjax.metrics": "wtjax.job.metrics",
    "wtjax.config_schema": "wtjax.job.config",
    "wtjax.preemption": "wtjax.job.preemption",
    "wtjax.sweep": "wtjax.tools.sweep",
    "wtjax.aot": "wtjax.tools.aot",
    "wtjax.analysis.run": "wtjax.tools.analyse",
}


class _AliasLoader(importlib.abc.Loader):
    def __init__(self, target: str):
        self.target = target

    def create_module(self, spec):
        warnings.warn(
            f"{spec.name} moved to {self.target}; the old path will be removed in wtjax 0.3",
            DeprecationWarning,
            stacklevel=3,
        )
        module = importlib.import_module(self.target)
        self._spec = module.__spec__
        return module

    def exec_module(self, module):
        module.__spec__ = self._spec  # the import system overwrote it with the alias's spec


class _AliasFinder(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name in MOVED:
            return importlib.util.spec_from_loader(name, _AliasLoader(MOVED[name]))
        return None


def install() -> None:
    """Register the aliases (once per interpreter)."""
    if not any(isinstance(f, _AliasFinder) for f in sys.meta_path):
        sys.meta_path.append(_AliasFinder())
