"""The mask identity of a run: recorded in its workdir when it starts, checked on resume and analysis.

A tie's masks are a pure function of ``(seed, reuse, mask_scope/block/leaf)``, regenerated at every
step, never stored in a checkpoint. A code change (e.g. to how masks are drawn) or a config change
(e.g. a tie's name, hence the scope a family gives it) could therefore silently change a trained
model's masks, hence its function, and a resumed or analysed run would be another model. So the
job writes each tie's identity (:func:`wtjax.core.mask_sites.mask_identity`: path, mode, scope,
kind, density, seed and a fingerprint of its reuse-0 and reuse-1 masks) to
``<workdir>/mask_identity.json`` when the run first starts, and :func:`check` refuses a resume or
an analysis whose model would draw other masks. Two ties of the model drawing the same masks are
refused at the start (:func:`wtjax.core.mask_sites.check_distinct`).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path

import jax
import jax.numpy as jnp

from wtjax.core import mask_sites
from wtjax.job import steps

FILE = "mask_identity.json"


def model_identity(model, image_shape: Sequence[int]) -> list[dict]:
    """The JSON mask identity of ``model`` as the job calls it (one abstract ``init``, no allocation)."""
    images = jax.ShapeDtypeStruct((1, *image_shape), jnp.float32)
    extra = {"step": 0} if steps.takes_step(model) else {}
    identity = mask_sites.model_mask_identity(model, images, train=False, **extra)
    return json.loads(json.dumps(identity))  # as read back from the file (tuples become lists)


def check(
    workdir: Path,
    model,
    image_shape: Sequence[int],
    *,
    write: bool,
    allow_change: bool = False,
    log: Callable[[str], None] = print,
) -> None:
    """Record ``model``'s mask identity in ``workdir`` (``write``, if none is there) or compare.

    Args:
      workdir: the run directory.
      model: the run's model; image_shape: one example's shape.
      write: write the file when it is missing (the job's process 0; analysis only reads).
      allow_change: a changed identity is logged and recorded instead of refused (the job's
        ``resume_despite_changes``).

    Raises:
      ValueError: two ties of ``model`` draw the same masks, or its masks differ from the
        recorded ones (each changed tie named with the old and new values).
    """
    current = model_identity(model, image_shape)
    path = Path(workdir) / FILE
    if not path.exists():
        if write:
            _write(path, current)
        return
    recorded = json.loads(path.read_text())
    if recorded == current:
        return
    changes = describe_changes(recorded, current)
    if allow_change:
        if write:
            log(f"wtjax: the masks of this run's ties changed ({changes}); recorded (resume_despite_changes)")
            _write(path, current)
        return
    raise ValueError(
        f"this model's masks differ from those recorded in {path} when the run started: {changes}. "
        "Masks are regenerated from (seed, mask_scope), never stored, so the checkpoints would run as "
        "another model; restore the code and config the run was trained with (or set "
        "resume_despite_changes=True to train on with the new masks)"
    )


def _write(path: Path, identity: list[dict]) -> None:
    """Write through a temporary file, so a reader never sees half a record."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(identity, indent=1) + "\n")
    tmp.replace(path)


def describe_changes(recorded: list[dict], current: list[dict]) -> str:
    """``'<path>: field old -> new, ...'`` for each tie whose identity differs (ties by path)."""
    old = {site["path"]: site for site in recorded}
    new = {site["path"]: site for site in current}
    parts = [f"tie {p} removed" for p in old if p not in new]
    parts += [f"tie {p} added" for p in new if p not in old]
    for p in (p for p in new if p in old):
        fields = [
            f"{k} {json.dumps(old[p].get(k))} -> {json.dumps(new[p].get(k))}"
            for k in sorted(set(old[p]) | set(new[p]))
            if old[p].get(k) != new[p].get(k)
        ]
        if fields:
            parts.append(f"{p}: {', '.join(fields)}")
    return "; ".join(parts)
