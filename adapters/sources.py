"""Where a checkpoint's bytes come from: a local directory, or a remote one read by HTTP range requests.

A source answers three questions about the files next to each other in one checkpoint
directory: ``size(name)``, ``exists(name)`` and ``read_range(name, start, end)``. Local files
are read with ``readinto``; ``hf://ORG/REPO[@REVISION]`` goes through ``huggingface_hub``'s
``HfFileSystem`` (which honours ``HF_TOKEN`` and ``HF_ENDPOINT``) and ``http(s)://`` through
``fsspec``'s HTTP file system, both opened without read-ahead, so that a read of a 4-byte
scale costs one 4-byte range request, and as fresh instances rather than fsspec's shared
ones. Nothing here writes; a source holds open file handles only until ``close``.
"""

from __future__ import annotations

import bisect
import posixpath
from collections.abc import Sequence
from pathlib import Path

__all__ = ["LocalSource", "RemoteSource", "SourceError", "is_remote", "open_remote"]

_SCHEMES = ("hf://", "http://", "https://")
_GAP = 64 << 10  # bytes of other tensors worth reading to save a round trip (~1 ms at 100 MB/s)


class SourceError(ValueError):
    """A file that cannot be read as asked (missing, unreachable, refused, cut short); names the location."""


def is_remote(path: object) -> bool:
    """Whether ``path`` names a remote checkpoint (``hf://``, ``http://``, ``https://``)."""
    return isinstance(path, str) and path.lower().startswith(_SCHEMES)


class LocalSource:
    """Files in one local directory."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._handles: dict[str, object] = {}

    def where(self, name: str) -> str:
        return str(self.root / name)

    def size(self, name: str) -> int:
        return (self.root / name).stat().st_size

    def exists(self, name: str) -> bool:
        return (self.root / name).is_file()

    def read_range(self, name: str, start: int, end: int) -> bytearray:
        handle = self._handles.get(name)
        if handle is None:
            handle = self._handles[name] = open(self.root / name, "rb")  # noqa: SIM115 closed by close()
        return _read_exactly(handle, start, end, self.where(name))

    def read_ranges(self, name: str, ranges: Sequence[tuple[int, int]]) -> list[bytearray]:
        return [self.read_range(name, start, end) for start, end in ranges]

    def read_text(self, name: str) -> str:
        return (self.root / name).read_text()

    def close(self) -> None:
        for handle in self._handles.values():
            handle.close()
        self._handles.clear()


def _read_exactly(handle, start: int, end: int, where: str) -> bytearray:
    """Bytes ``[start, end)`` of an open file; a short read (a file cut while read) raises."""
    data = bytearray(end - start)
    handle.seek(start)
    view, got = memoryview(data), 0
    while got < len(data):
        count = handle.readinto(view[got:])
        if not count:
            raise SourceError(f"{where}: truncated: got {got} of the {len(data)} bytes at offset {start}")
        got += count
    return data


def _confined(name: str, where: str) -> str:
    """A file name from the index, as a path inside the checkpoint directory.

    An entry such as ``../x``, ``/etc/x`` or ``https://elsewhere/x`` would make the reader
    fetch a file the user did not name, so it is refused.
    """
    if "://" in name or name.startswith(("/", "\\")) or not name or ".." in posixpath.normpath(name).split("/"):
        raise SourceError(f"{where}: names a shard outside the checkpoint directory: {name!r}")
    return posixpath.normpath(name)


class RemoteSource:
    """Files under one remote directory URL, read through an fsspec file system without caching.

    Every error the network libraries raise (their exception types differ: aiohttp, httpx,
    huggingface_hub, asyncio timeouts) becomes one ``SourceError`` naming the URL.
    """

    def __init__(self, fs, root: str, shown: str) -> None:
        self.fs, self.root, self.shown = fs, root.rstrip("/"), shown.rstrip("/")
        self._handles: dict[str, object] = {}
        self._sizes: dict[str, int] = {}

    def where(self, name: str) -> str:
        return f"{self.shown}/{name}"

    def _url(self, name: str) -> str:
        return f"{self.root}/{_confined(name, self.shown)}"

    def size(self, name: str) -> int:
        if name not in self._sizes:
            info = self._call(name, self.fs.info, self._url(name))
            if info.get("size") is None:
                raise SourceError(f"{self.where(name)}: the server does not say how large it is")
            self._sizes[name] = int(info["size"])
        return self._sizes[name]

    def exists(self, name: str) -> bool:
        try:
            self.size(name)
        except SourceError as err:
            if _status(err.__cause__) == 404:
                return False
            raise
        return True

    def read_range(self, name: str, start: int, end: int) -> bytearray:
        handle = self._handles.get(name)
        if handle is None:
            size = self.size(name)
            # cache "none": each read is one range request for exactly its bytes, no read-ahead
            options = {"block_size": 1 << 20, "cache_type": "none", "size": size}
            handle = self._call(name, self.fs.open, self._url(name), "rb", **options)
            self._handles[name] = handle
        return self._call(name, _read_exactly, handle, start, end, self.where(name))

    def read_ranges(self, name: str, ranges: Sequence[tuple[int, int]]) -> list[bytearray]:
        """Several ranges of one file in few requests: ranges less than ``_GAP`` apart are fetched as one span.

        safetensors stores tensors of one dtype side by side, so a shard's hundreds of fp32
        scalar scales usually come in one request; the spans are fetched concurrently over HTTP.
        """
        spans: list[list[int]] = []
        for start, end in sorted(ranges):
            if spans and start - spans[-1][1] <= _GAP:
                spans[-1][1] = max(spans[-1][1], end)
            else:
                spans.append([start, end])
        starts, ends = [span[0] for span in spans], [span[1] for span in spans]
        if getattr(self.fs, "async_impl", False):  # fsspec's HTTP: the spans fetched concurrently
            urls = [self._url(name)] * len(spans)
            datas = self._call(name, self.fs.cat_ranges, urls, starts, ends, on_error="raise")
        else:  # HfFileSystem's cat_ranges opens the file with read-ahead: use the handle without it
            datas = [self.read_range(name, start, end) for start, end in spans]
        for start, end, data in zip(starts, ends, datas):
            if len(data) != end - start:
                got = f"got {len(data)} bytes for the {end - start} at {start}"
                raise SourceError(f"{self.where(name)}: {got} (a response cut short, or a server ignoring Range)")
        found = []
        for start, end in ranges:
            at = bisect.bisect_right(starts, start) - 1
            found.append(bytearray(datas[at][start - starts[at] : end - starts[at]]))
        return found

    def read_text(self, name: str) -> str:
        data = self.read_range(name, 0, self.size(name))
        try:
            return data.decode()
        except UnicodeDecodeError as err:
            raise SourceError(f"{self.where(name)}: not UTF-8 text: {err}") from err

    def close(self) -> None:
        for handle in self._handles.values():
            try:
                handle.close()
            except Exception:  # noqa: BLE001 closing a read-only remote file never loses data
                pass
        self._handles.clear()

    def _call(self, name: str, function, *args, **kwargs):
        try:
            return function(*args, **kwargs)
        except SourceError:
            raise
        except Exception as err:  # noqa: BLE001 network libraries raise their own types; see the class docstring
            raise SourceError(f"{self.where(name)}: {_describe(err)}") from err


def _status(err: BaseException | None) -> int | None:
    """The HTTP status behind an error, looking through the causes fsspec wraps it in.

    fsspec's HTTP ``info`` turns every failure (a 401 or a refused connection alike) into
    ``FileNotFoundError``; ``HfFileSystem`` raises a bare ``FileNotFoundError`` for a path
    that its listing lacks, which is a 404.
    """
    while err is not None:
        status = getattr(err, "status", None) or getattr(getattr(err, "response", None), "status_code", None)
        if isinstance(status, int):
            return status
        if isinstance(err, FileNotFoundError) and err.__cause__ is None:
            return 404
        err = err.__cause__
    return None


def _describe(err: BaseException) -> str:
    status = _status(err)
    if status == 404:
        return "not found (404; a private Hub repository without a valid HF_TOKEN also reads so)"
    if status is not None:
        return f"refused: HTTP {status}"
    while isinstance(err, FileNotFoundError) and err.__cause__ is not None:
        err = err.__cause__
    message = " ".join(str(err).split()) or type(err).__name__
    return f"cannot read: {type(err).__name__}: {message[:300]}"


def open_remote(url: str) -> tuple[RemoteSource, str | None]:
    """The source for a remote checkpoint URL and the file it names (``None`` for a directory).

    ``hf://ORG/REPO[@REVISION][/SUBDIR]`` and ``http(s)://HOST/DIR`` name directories; a URL
    ending in ``.safetensors`` or ``.json`` names that file (a single file or an index).

    Raises:
        SourceError: the packages for remote reads are not installed.
    """
    try:
        if url.lower().startswith("hf://"):
            from huggingface_hub import HfFileSystem

            fs, root = HfFileSystem(skip_instance_cache=True), url[len("hf://") :]
            if len(root.split("/", 2)) < 2 or not all(root.split("/", 2)[:2]):
                raise SourceError(f"{url}: expected hf://ORG/REPO[@REVISION][/PATH]")
        else:
            from fsspec.implementations.http import HTTPFileSystem

            fs, root = HTTPFileSystem(skip_instance_cache=True), url
    except ImportError as err:
        raise SourceError(f"{url}: remote checkpoints need `pip install 'sharedquant[remote]'` ({err})") from err
    directory, name = root.rstrip("/"), None
    if directory.endswith((".safetensors", ".json")):
        directory, name = directory.rsplit("/", 1)
    shown = url.rstrip("/") if name is None else url.rstrip("/").rsplit("/", 1)[0]
    return RemoteSource(fs, directory, shown), name
