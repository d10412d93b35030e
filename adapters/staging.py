"""The staging directory of a ``reconcile`` run: made beside ``--out``, marked, renamed into place.

This file mutates the file system and nothing else. What it guarantees:

* every byte a run writes goes into one hidden directory beside ``--out``,
  ``.<out>.<random>.partial``, holding a marker file that names the owning process
  (pid and host); the directory is renamed to ``--out`` only when complete, so
  ``--out`` is at every moment absent, the old output or the complete new one;
* an exception, ``KeyboardInterrupt`` or the CLI's SIGTERM exception removes it;
* a run killed outright (SIGKILL, power loss) leaves it behind, marked: the next run
  for the same ``--out`` on the same host finds the marker, sees that its process is
  gone, and removes it; a directory whose owner still runs, or that another host
  made, is left alone;
* ``open_checkpoint`` refuses a marked directory as input, so a leftover is never
  taken for output.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import tempfile
from collections.abc import Iterator
from pathlib import Path

__all__ = ["MARKER", "is_staging", "move_into_place", "remove_stale", "signals_deferred", "staging_directory"]

MARKER = ".sharedquant-staging.json"
_SUFFIXES = (".partial", ".old")


def _write_marker(directory: Path) -> None:
    owner = {"pid": os.getpid(), "host": socket.gethostname()}
    (directory / MARKER).write_text(json.dumps(owner) + "\n")


def is_staging(directory: Path) -> bool:
    """Whether ``directory`` is a run's unfinished (or abandoned) staging directory."""
    return (directory / MARKER).is_file()


def _owner_gone(directory: Path) -> bool:
    """Whether the process named by the marker has ended (same host only: another host's pid says nothing)."""
    try:
        owner = json.loads((directory / MARKER).read_text())
        pid, host = int(owner["pid"]), owner["host"]
    except (OSError, ValueError, KeyError, TypeError):
        return False  # not ours, or half-written: leave it for a person to look at
    if host != socket.gethostname():
        return False
    if pid == os.getpid():
        return False  # our own staging directory, made earlier in this process
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # alive, owned by another user
        return False
    return False


def remove_stale(out: Path) -> list[Path]:
    """Remove the staging directories of ``out`` that killed runs left behind; returns them."""
    removed = []
    for entry in out.parent.glob(f".{out.name}.*"):
        if entry.name.endswith(_SUFFIXES) and entry.is_dir() and not entry.is_symlink() and is_staging(entry):
            if _owner_gone(entry):
                shutil.rmtree(entry, ignore_errors=True)
                removed.append(entry)
    return removed


@contextlib.contextmanager
def signals_deferred() -> Iterator[None]:
    """SIGINT and SIGTERM held back inside: a directory is never made without its marker."""
    if not hasattr(signal, "pthread_sigmask"):  # Windows: no signal masks, and no SIGTERM to hold
        yield
        return
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
    try:
        yield
    finally:  # a signal that came meanwhile is delivered here, once the marker is written
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def _make(out: Path, suffix: str) -> Path:
    """A marked directory beside ``out``; call it with signals deferred, and assign its result there too."""
    directory = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=suffix, dir=out.parent))
    _write_marker(directory)
    return directory


@contextlib.contextmanager
def staging_directory(out: Path, mode_from: Path) -> Iterator[Path]:
    """A fresh marked directory beside ``out``, removed on any exit but a completed ``move_into_place``.

    Args:
        out: the final output directory (its parent must exist).
        mode_from: a directory whose permission bits the output takes (mkdtemp makes it private).
    """
    remove_stale(out)
    staging = None
    try:
        with signals_deferred():  # a signal is raised on the way out, once ``staging`` is set
            staging = _make(out, ".partial")
        shutil.copymode(mode_from, staging)
        yield staging
    finally:
        # BaseException included: KeyboardInterrupt and the CLI's SIGTERM exception land here;
        # a signal during the removal waits for its end
        with signals_deferred():
            if staging is not None and staging.exists():
                shutil.rmtree(staging, ignore_errors=True)


def move_into_place(staging: Path, out: Path) -> None:
    """Rename the finished ``staging`` to ``out``; an old ``out`` (with --force) is moved aside first.

    Renames only, with SIGINT and SIGTERM held back, so ``out`` is never half-written and a
    signal finds it either the old or the new one; between the two renames it is absent
    for an instant. The old one is deleted after, from a marked ``.old`` directory that the
    next run removes if this one is killed first.
    """
    aside = None
    try:
        with signals_deferred():
            (staging / MARKER).unlink()
            if out.exists() or out.is_symlink():
                aside = _make(out, ".old")
                os.replace(out, aside / "old")
                try:
                    os.replace(staging, out)
                except OSError:
                    os.replace(aside / "old", out)  # the old output back where it was
                    raise
            else:
                os.replace(staging, out)
    finally:
        if aside is not None:
            shutil.rmtree(aside, ignore_errors=True)
