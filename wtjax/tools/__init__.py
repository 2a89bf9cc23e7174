"""Commands built on the job: study sweeps, run analysis, ahead-of-time accelerator compiles.

They need the ``train`` extra (``pip install 'wtjax[train]'``); a missing part is named at import.
"""

from wtjax import _extras

_extras.require("train", "the wtjax commands (wtjax.tools)")
