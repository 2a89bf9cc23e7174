"""Analysis tools (parameter/FLOP accounting, representation similarity, probes, plots).

Import the submodules you need (e.g. ``from wtjax.analysis import accounting``); this package
imports nothing itself so that ``import wtjax`` stays light.
"""
