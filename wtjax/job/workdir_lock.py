"""One process per workdir: an exclusive lock the kernel releases when its owner dies.

The training job (process 0) and the sweep runner lock a run's workdir before writing to it, so a
second job on a live workdir is refused at once instead of racing the first one's checkpoints
and metrics. The lock is ``fcntl.flock(LOCK_EX | LOCK_NB)`` on ``<workdir>/.wtjax.lock``, held
open for the owner's lifetime:

* the kernel releases it when its owner exits, however it dies (``kill -9`` included), so there
  is no stale lock to detect and nothing to take over: the next claimant simply gets it;
* taking it is one atomic system call, so of any number of concurrent claimants exactly one wins;
* the file holds ``"<host> <pid>"`` of the owner, for the message of those refused. It is never
  deleted: deleting a lock file lets a claimant lock the old file while another locks a new one.

Re-entrant within a thread: the sweep runner locks a run's workdir and the job it runs in the
same thread locks it again (a count); another thread of the same process is refused. A forked
child does not inherit the lock (it closes its copies of the descriptors).

Filesystems: any local filesystem (one host), and NFS mounted with locking (the Linux default:
the client turns ``flock`` into NFS byte-range locks that the server arbitrates between hosts;
``nolock`` or ``local_lock=flock`` mounts only exclude processes of the same host). A filesystem
without ``flock`` (e.g. Lustre without ``-o flock``) is refused with an ``OSError`` naming it.
"""

from __future__ import annotations

import dataclasses
import errno
import fcntl
import os
import re
import socket
import threading
from pathlib import Path

LOCK_FILE = ".wtjax.lock"


class WorkdirLocked(RuntimeError):
    """Another live process (or another thread of this one) holds the workdir's lock."""


class UnsupportedWorkdir(ValueError):
    """The workdir is a URL (``gs://...``): the job reads and writes it with local file I/O."""


def local_workdir(workdir: str | Path) -> Path:
    """``workdir`` as an absolute local path; a URL is refused.

    ``Path("gs://bucket/run")`` is the local folder ``gs:/bucket/run``: without this check a cloud
    URL would silently become a local directory. The job's files, orbax's checkpoints and this
    lock all need a filesystem: mount the bucket (e.g. gcsfuse) or use a shared filesystem.
    """
    scheme = re.match(r"([A-Za-z][A-Za-z0-9+.-]*)://", str(workdir))
    if scheme:
        raise UnsupportedWorkdir(
            f"workdir {workdir} is a {scheme.group(1)}:// URL, which the job does not support (it would "
            "become a local folder): use a local or mounted path (a shared filesystem, or the bucket "
            "mounted with e.g. gcsfuse)"
        )
    return Path(workdir).absolute()


@dataclasses.dataclass
class _Held:
    fd: int
    depth: int
    thread: int


_held: dict[str, _Held] = {}  # real path of a lock file -> this process's hold on it
_guard = threading.Lock()


def _forget_in_child() -> None:
    # A forked child shares the parent's open lock files; closing its copies (no LOCK_UN, which
    # would release the parent's lock) leaves the lock with the parent alone. A new guard: another
    # thread of the parent may have held the old one at the fork.
    global _guard
    for held in _held.values():
        os.close(held.fd)
    _held.clear()
    _guard = threading.Lock()


os.register_at_fork(after_in_child=_forget_in_child)


class WorkdirLock:
    """A hold on a workdir's lock (from :func:`acquire`/:func:`try_acquire`); a context manager."""

    def __init__(self, path: Path, key: str):
        self.path, self._key, self._released = path, key, False

    def release(self) -> None:
        """Give up this hold (the lock is released when the outermost hold of the thread is)."""
        with _guard:
            if self._released:
                return
            self._released = True
            held = _held.get(self._key)
            if held is None:  # forgotten in a forked child
                return
            held.depth -= 1
            if held.depth == 0:
                del _held[self._key]
                fcntl.flock(held.fd, fcntl.LOCK_UN)
                os.close(held.fd)

    def __enter__(self) -> WorkdirLock:
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def lock_path(workdir: str | Path) -> Path:
    """The lock file of ``workdir``."""
    return Path(workdir) / LOCK_FILE


def try_acquire(workdir: str | Path) -> WorkdirLock | None:
    """Lock ``workdir`` (created if missing); ``None`` if another process or thread holds it.

    Raises:
      OSError: the workdir's filesystem does not support ``flock`` (module docstring).
    """
    path = lock_path(workdir)
    path.parent.mkdir(parents=True, exist_ok=True)
    key = os.path.realpath(path)
    with _guard:
        held = _held.get(key)
        if held is not None:
            if held.thread != threading.get_ident():
                return None
            held.depth += 1
            return WorkdirLock(path, key)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            os.close(fd)
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                return None
            raise OSError(
                e.errno,
                f"cannot lock {path}: {e.strerror}; the workdir must be on a filesystem with flock "
                "(local, or NFS mounted with locking)",
            ) from None
        owner = f"{socket.gethostname()} {os.getpid()}\n".encode()
        os.pwrite(fd, owner, 0)  # overwrite, then cut: a reader never sees an empty file
        os.ftruncate(fd, len(owner))
        _held[key] = _Held(fd, 1, threading.get_ident())
        return WorkdirLock(path, key)


def acquire(workdir: str | Path) -> WorkdirLock:
    """Lock ``workdir`` or fail at once.

    Raises:
      WorkdirLocked: another live process (or thread) holds it; the message names its pid and host.
      OSError: the workdir's filesystem does not support ``flock``.
    """
    lock = try_acquire(workdir)
    if lock is None:
        path = lock_path(workdir)
        raise WorkdirLocked(
            f"workdir {Path(workdir).absolute()} is in use by {owner(workdir)} (lock {path.name}): "
            "wait for that job to end or stop it, or use another workdir"
        )
    return lock


def owner(workdir: str | Path) -> str:
    """``'process <pid> on host <host>'`` as written in the lock file by its last owner."""
    try:
        host, pid = lock_path(workdir).read_text().split()
    except (OSError, ValueError):
        return "another process (its lock file names none)"
    return f"process {pid} on host {host}"
