"""The paper's studies, benchmarks and notebooks (a package so its modules import each other).

Run everything from the repository root: studies through ``python -m wtjax.tools.sweep``, the
scripts as modules (``python -m experiments.accelerator_check``); see ``experiments/README.md``.
"""
