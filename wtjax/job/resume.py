"""What a resumed run may change: its config compared with the one stored in the workdir.

A workdir holds the config its checkpoints were trained with (``config.json``). A run that resumes
from those checkpoints with a config differing in a field that changes what is trained (batch
size, seed, data, optimizer, model ...) would silently be neither run: it
is refused, unless ``config.resume_despite_changes`` is True. Fields that only change how the run
is computed, logged, evaluated or stored (:data:`HARMLESS`) may change. Every accepted change is
appended to ``config_history.jsonl`` (old and new values) before ``config.json`` is replaced.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from pathlib import Path

CONFIG_FILE = "config.json"
HISTORY_FILE = "config_history.jsonl"

#: Config fields (dotted paths; a section covers its fields) that a resumed run may change: they
#: change how the run is computed, logged, evaluated or stored, not what it trains. Every other
#: field, including fields this list does not know yet, changes the run.
HARMLESS = frozenset(
    {
        "name",
        # The run's length: extending a finished run is what resuming is for. The schedule (e.g.
        # cosine) then follows the new length from the resumed step on; the change is recorded.
        "num_train_steps",
        "num_epochs",
        "eval_batch_size",
        "log_every_steps",
        "eval_every_steps",
        "checkpoint_every_steps",
        "keep_checkpoints",
        "async_checkpointing",
        "num_devices",
        "grad_accum_steps",  # the same update, computed in smaller micro-batches
        "distributed",
        "tensorboard",
        "progress",
        "accounting",
        "plots",
        "resume_despite_changes",
        "solver_failure",  # what the job does on a failed solve from now on (log, skip, stop)
        "data.data_dir",
        "data.download",
        "data.cache_dir",
        "data.workers",
        "data.allow_pickle",  # another release of the same data
        "data.eval_subset",
        "model.scan",  # scan, unroll, remat and the convolution's implementation: the same maths
        "model.unroll",
        "model.remat_policy",
        "model.checkpoint_every",
        "model.conv_impl",
    }
)


def _flatten(tree, prefix: str = "") -> dict:
    """``{dotted path: leaf}`` of nested dicts (a non-dict value, None included, is a leaf)."""
    if not isinstance(tree, dict) or not tree:
        return {prefix: tree}
    flat = {}
    for key, value in tree.items():
        flat.update(_flatten(value, f"{prefix}.{key}" if prefix else key))
    return flat


def _harmless(path: str) -> bool:
    parts = path.split(".")
    return any(".".join(parts[:i]) in HARMLESS for i in range(1, len(parts) + 1))


def config_dict(config) -> dict:
    """The config as the plain JSON tree stored in ``config.json``."""
    return json.loads(config.to_json_best_effort())


ABSENT = "<absent>"


def changes(stored: dict, current: dict) -> dict[str, tuple]:
    """``{dotted path: (stored value, current value)}`` of the fields that differ (:data:`ABSENT`
    where one side lacks the field)."""
    old, new = _flatten(stored), _flatten(current)
    diff = {p: (old.get(p, ABSENT), new.get(p, ABSENT)) for p in sorted(old.keys() | new.keys())}
    return {p: (a, b) for p, (a, b) in diff.items() if a != b}


def _show(value) -> str:
    return ABSENT if value is ABSENT else json.dumps(value)


def _describe(diff: dict, limit: int = 6) -> str:
    items = [f"{p} {_show(a)} -> {_show(b)}" for p, (a, b) in diff.items()]
    more = f" and {len(items) - limit} more" if len(items) > limit else ""
    return ", ".join(items[:limit]) + more


def _split(diff: dict) -> tuple[dict, dict]:
    """``(changes of the run's meaning, harmless changes)`` of ``diff``."""
    meaningful = {p: v for p, v in diff.items() if not _harmless(p)}
    return meaningful, {p: v for p, v in diff.items() if p not in meaningful}


def _resuming(workdir: Path) -> bool:
    """Whether ``workdir`` holds a complete checkpoint to resume from."""
    checkpoints = workdir / "checkpoints"
    return checkpoints.is_dir() and any(p.name.isdigit() for p in checkpoints.iterdir())


def check(config, workdir: str | Path, log: Callable[[str], None] = print) -> dict[str, tuple]:
    """The stored config's fields that ``config`` changes (empty unless resuming); refuses a change
    of the run's meaning.

    Run on every process (a refusal stops them all), before anything is written.

    Raises:
      ValueError: resuming with a field outside :data:`HARMLESS` changed and
        ``config.resume_despite_changes`` False.
    """
    workdir = Path(workdir)
    if not _resuming(workdir):
        return {}
    try:
        stored = json.loads((workdir / CONFIG_FILE).read_text())
    except (OSError, ValueError) as e:
        log(f"resuming without a readable {CONFIG_FILE} to compare the config with ({type(e).__name__})")
        return {}
    diff = changes(stored, config_dict(config))
    meaningful, _ = _split(diff)
    if meaningful and not config.resume_despite_changes:
        raise ValueError(
            f"resuming {workdir} with a config that changes the run: {_describe(meaningful)}; rerun with "
            f"the config in {CONFIG_FILE}, use a new --workdir, or set "
            "--config.resume_despite_changes=True to continue anyway (recorded)"
        )
    return diff


def record(config, workdir: str | Path, diff: dict[str, tuple], log: Callable[[str], None] = print) -> None:
    """Append ``diff`` (if any) to ``config_history.jsonl``, then write ``config.json`` atomically
    (process 0)."""
    workdir = Path(workdir)
    if diff:
        meaningful, harmless = _split(diff)
        entry = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "changes": {p: {"stored": a, "new": b} for p, (a, b) in diff.items()},
            "changes_the_run": sorted(meaningful),
        }
        with open(workdir / HISTORY_FILE, "a") as f:
            f.write(json.dumps(entry, sort_keys=True) + "\n")
        if meaningful:
            log(f"resuming DESPITE changes to the run (resume_despite_changes=True): {_describe(meaningful)}")
        if harmless:
            log(f"config changed on resume: {_describe(harmless)}")
        log(f"(changes recorded in {workdir / HISTORY_FILE})")
    partial = workdir / (CONFIG_FILE + ".partial")
    partial.write_text(config.to_json_best_effort(indent=2, sort_keys=True) + "\n")
    os.replace(partial, workdir / CONFIG_FILE)
