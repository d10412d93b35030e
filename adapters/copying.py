"""Copies of a checkpoint's files for ``reconcile``, made by the kernel in a background thread, counted in bytes.

``copy_file`` hands the bytes to ``os.sendfile`` (no pass through Python, and no link: a
copy that shared storage with the input would let a patch write through into it) in
chunks, so a multi-GB shard reports progress as it goes. ``Copier`` runs the copies in
one thread while the caller requantizes: ``sendfile`` and torch both release the GIL, so
the copy of shard N+1 overlaps the requantization of shard N. ``Meter`` sums the bytes
both report. Everything here writes only under the target it is given.
"""

from __future__ import annotations

import errno
import os
import shutil
import threading
from collections.abc import Callable, Sequence
from pathlib import Path

__all__ = ["Copier", "Meter", "copy_file", "tree_size"]

_CHUNK = 1 << 27  # 128 MiB per sendfile call: progress every few tens of ms at memory speed
_NO_SENDFILE = {errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP}


class Meter:
    """Bytes done of a run's total, reported as ``progress(phase, done, total)``; safe to call from two threads."""

    def __init__(self, progress: Callable[[str, int, int], None] | None, total: int) -> None:
        self.progress, self.total, self.done = progress, total, 0
        self._lock = threading.Lock()

    def advance(self, phase: str, count: int) -> None:
        with self._lock:
            self.done += count
            if self.progress is not None:
                self.progress(phase, self.done, self.total)


def tree_size(path: Path) -> int:
    """Bytes of a file, or of every file under a directory (links followed, as the copy follows them)."""
    if not path.is_dir():
        return path.stat().st_size
    return sum(entry.stat().st_size for entry in path.rglob("*") if entry.is_file())


def copy_file(source: Path, target: Path, meter: Meter, stop: threading.Event | None = None) -> None:
    """Copy ``source`` (a link is followed) to a new regular file ``target``, with its mode and times.

    ``stop`` is checked between chunks: an interrupted run need not wait for a 5 GB shard to finish.
    """
    with open(source, "rb") as reader, open(target, "xb") as writer:
        size, offset = os.fstat(reader.fileno()).st_size, 0
        while offset < size:
            if stop is not None and stop.is_set():
                raise InterruptedError(f"{target}: copy stopped")
            try:
                count = os.sendfile(writer.fileno(), reader.fileno(), offset, min(_CHUNK, size - offset))
            except OSError as err:
                if err.errno not in _NO_SENDFILE:
                    raise
                reader.seek(offset)  # a file system without sendfile: the plain buffered copy
                shutil.copyfileobj(reader, writer, _CHUNK)
                count = size - offset
            if count == 0:
                raise OSError(f"{source}: shorter than its {size} bytes: it changed while being copied")
            offset += count
            meter.advance("copy", count)
    shutil.copystat(source, target)


def _copy_entry(source: Path, target: Path, meter: Meter, stop: threading.Event) -> None:
    if source.is_dir():
        shutil.copytree(source, target)  # a side directory (e.g. a tokenizer's): rare and small
        meter.advance("copy", tree_size(target))
    else:
        copy_file(source, target, meter, stop)


class Copier:
    """Copies entries into a directory, in order, in one background thread; ``wait(name)`` blocks on one.

    The thread is this object's own (no pool), so that ``cancel`` can always join it: a
    signal that lands while the thread starts must not leave a copy running after the
    staging directory is removed.
    """

    def __init__(self, entries: Sequence[Path], target: Path, meter: Meter) -> None:
        self._stop = threading.Event()
        self._done = {entry.name: threading.Event() for entry in entries}
        self._errors: dict[str, BaseException] = {}
        self._thread = threading.Thread(
            target=self._run, args=(list(entries), target, meter), name="sharedquant-copy", daemon=True
        )
        try:
            self._thread.start()
        except BaseException:  # e.g. Ctrl-C while the thread starts: it must not outlive the constructor
            self.cancel()
            raise

    def _run(self, entries: list[Path], target: Path, meter: Meter) -> None:
        for entry in entries:
            try:
                if not self._stop.is_set():  # checked before any file is created
                    _copy_entry(entry, target / entry.name, meter, self._stop)
            except BaseException as err:  # handed to whoever waits on this entry
                self._errors[entry.name] = err
            finally:
                self._done[entry.name].set()

    def wait(self, name: str) -> None:
        """Return once ``name`` (a path relative to the target, e.g. a nested shard) is copied; re-raises its error."""
        entry = Path(name).parts[0]
        self._done[entry].wait()
        if entry in self._errors:
            raise self._errors[entry]

    def finish(self) -> None:
        """Wait for every copy; re-raises the first entry's error."""
        self._thread.join()
        for entry in self._done:
            if entry in self._errors:
                raise self._errors[entry]

    def cancel(self) -> None:
        """On the way out of a failure: the running copy stops at its next chunk, the rest never start.

        ``stop`` is set before the thread is looked at: a thread with no ident yet has not begun
        ``_run``, and will find ``stop`` set before it creates a file.
        """
        self._stop.set()
        if self._thread.ident is not None:
            self._thread.join()
