"""safetensors checkpoints: open them (local or remote) and inspect the fused groups of a quantized one.

The decisions are the core's (``core.formats``, ``core.reconcile``, ``core.groups``);
this file only reads files; ``adapters.rewrite`` writes the repaired copy, inside
``staged_output``. What the two guarantee:

* ``inspect`` reads the shard headers, ``config.json`` / ``hf_quant_config.json`` and the
  per-tensor scale tensors, never weights or block scales (formats, dtypes and block sizes
  come from the header), through a source (``adapters.sources``): local files, or
  ``hf://`` / ``http(s)://`` by range requests; every member of a group must carry the
  tensors its format needs;
* ``reconcile`` copies every shard as it is (``adapters.copying``, in the background,
  never as a link) and overwrites, in the copy, only the
  bytes of the tensors that change (same dtype, same shape), one member at a time, so
  every other tensor and the safetensors metadata stay byte for byte; a shard that
  gains keys (quantizer state without ``_global_amax``) is rewritten whole;
* output goes to a temporary directory next to ``--out``, is checked, and is renamed
  into place only when complete; the input is never opened for writing.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import re
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import torch

from sharedquant.core.formats import DEFAULT_PATTERNS, Format, detect_format, family_from_config, find_formats
from sharedquant.core.groups import Group, compile_patterns, find_groups, in_role_order, join_fqn
from sharedquant.core.reconcile import GroupReport, MemberScales, report_groups
from sharedquant.core.reduce import reduce_amax, round_up_to_fp32

from .layout import INDEX, SINGLE, CheckpointError, read_index
from .sources import LocalSource, RemoteSource, SourceError, is_remote, open_remote
from .staging import is_staging, move_into_place, staging_directory

Source = LocalSource | RemoteSource
Progress = Callable[[str, int, int], None]  # (phase, bytes done, bytes in the run)

__all__ = [
    "Checkpoint",
    "CheckpointError",
    "Inspection",
    "inspect_checkpoint",
    "open_checkpoint",
    "staged_output",
]

_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
           "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2, "I64": torch.int64, "I32": torch.int32,
           "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool}  # fmt: skip
_MAX_HEADER = 100 << 20  # safetensors' own limit on the JSON header
_FUNCTION_PREFIX = re.compile(r"^[a-z_]+: ")  # "report_groups: ...": the core's messages name their function


class TensorInfo(NamedTuple):
    """A tensor's entry in its shard header; ``start`` and ``end`` are absolute file offsets."""

    shard: str
    dtype: str
    shape: tuple[int, ...]
    start: int
    end: int


def _read_header(source: Source, shard: str) -> dict[str, TensorInfo]:
    """Parse and validate one shard's header; a truncated or corrupt file raises ``CheckpointError``."""
    path = source.where(shard)
    try:
        size = source.size(shard)
        prefix = source.read_range(shard, 0, 8) if size >= 8 else b""
        length = int.from_bytes(prefix, "little") if len(prefix) == 8 else -1
        if length < 0 or length > min(size - 8, _MAX_HEADER):
            raise CheckpointError(f"{path}: not a safetensors file (truncated or corrupt header, {size} bytes)")
        header = json.loads(source.read_range(shard, 8, 8 + length))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{path}: cannot read safetensors header: {err}") from err
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: corrupt safetensors header (not a JSON object)")
    header.pop("__metadata__", None)
    base, tensors, data_end = 8 + length, {}, 0
    for key, entry in header.items():
        try:
            dtype, shape, (begin, end) = entry["dtype"], tuple(entry["shape"]), entry["data_offsets"]
            known = _DTYPES.get(dtype)
            # math.prod refuses non-numbers; a float dimension gives a float product that differs
            if not 0 <= begin <= end or (known is not None and end - begin != math.prod(shape) * known.itemsize):
                raise ValueError
        except (KeyError, TypeError, ValueError) as err:
            raise CheckpointError(f"{path}: corrupt safetensors header entry for {key!r}: {entry!r}") from err
        tensors[key] = TensorInfo(shard, dtype, shape, base + begin, base + end)
        data_end = max(data_end, end)
    if base + data_end > size:
        raise CheckpointError(f"{path}: truncated: its header needs {base + data_end} bytes, the file holds {size}")
    return tensors


class Checkpoint:
    """A safetensors checkpoint opened for lazy reads: headers parsed, tensors read on demand.

    Attributes:
        path: what the user named (file or directory).
        root: the directory holding the shards.
        shards: shard file names, in order.
        index: the parsed ``model.safetensors.index.json`` (``None`` when not sharded).
        tensors: key -> ``TensorInfo``.
    """

    def __init__(
        self,
        path: Path | str,
        root: Path,
        shards: Sequence[str],
        index: dict | None,
        source: Source | None = None,
        progress: Progress | None = None,
    ) -> None:
        self.path, self.root, self.shards, self.index = path, root, tuple(shards), index
        self.source = LocalSource(root) if source is None else source
        self.family = _read_family(self.source, path)
        self.position = {shard: position for position, shard in enumerate(self.shards)}
        self.tensors: dict[str, TensorInfo] = {}
        self._ahead: dict[str, bytearray] = {}
        sizes = [self.source.size(shard) for shard in self.shards]
        self.starts = dict(zip(self.shards, itertools.accumulate([0, *sizes])))  # each shard's place in the run
        self.size = sum(sizes)
        for shard in self.shards:
            for key, info in _read_header(self.source, shard).items():
                if self.tensors.setdefault(key, info) is not info:
                    where = self.source.where(shard)
                    raise CheckpointError(f"{where}: {key!r} is in two shards, {self.tensors[key].shard} and {shard}")
            if progress is not None:
                progress("headers", self.starts[shard] + self.source.size(shard), self.size)

    @property
    def remote(self) -> bool:
        return isinstance(self.source, RemoteSource)

    def read(self, key: str) -> torch.Tensor:
        """The tensor ``key``, read as its own byte range (nothing else of its shard)."""
        info = self.tensors[key]
        try:
            data = self._ahead.pop(key, None) or self.source.read_range(info.shard, info.start, info.end)
        except OSError as err:
            raise CheckpointError(f"{self.source.where(info.shard)}: cannot read {key!r}: {err}") from err
        dtype = _DTYPES.get(info.dtype)
        if dtype is None:
            raise CheckpointError(f"{self.source.where(info.shard)}: {key!r} has dtype {info.dtype}, not read here")
        flat = torch.frombuffer(data, dtype=torch.uint8) if data else torch.empty(0, dtype=torch.uint8)
        return flat.view(dtype).reshape(info.shape)

    def prefetch(self, keys: Sequence[str]) -> None:
        """Read these (small) tensors ahead, one shard's in a few requests, for ``read`` to hand out."""
        by_shard: dict[str, list[str]] = {}
        for key in keys:
            by_shard.setdefault(self.tensors[key].shard, []).append(key)
        for shard, names in by_shard.items():
            ranges = [(self.tensors[key].start, self.tensors[key].end) for key in names]
            self._ahead.update(zip(names, self.source.read_ranges(shard, ranges)))

    def release(self) -> None:
        """Close the open shards: reads hold no pages or connections past the shard they need."""
        self._ahead.clear()
        self.source.close()


def _read_family(source: Source, path: Path | str) -> str | None:
    """The tool that wrote a checkpoint directory, as its configs say (``core.formats.family_from_config``)."""
    if isinstance(path, Path) and not path.is_dir():
        return None  # a lone .safetensors file: its header decides
    configs = []
    for name in ("config.json", "hf_quant_config.json"):
        try:
            configs.append(json.loads(source.read_text(name)) if source.exists(name) else None)
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
            raise CheckpointError(f"{source.where(name)}: not valid JSON: {err}") from err
    if not all(config is None or isinstance(config, dict) for config in configs):
        raise CheckpointError(f"{path}: config.json or hf_quant_config.json is not a JSON object")
    return family_from_config(*configs)


def open_checkpoint(path: str | os.PathLike, progress: Progress | None = None) -> Checkpoint:
    """Open a ``.safetensors`` file, or a directory with ``model.safetensors`` or a sharded index.

    ``path`` may also be an ``hf://ORG/REPO[@REVISION]`` or ``http(s)://`` URL of any of these
    (see ``adapters.sources``). ``progress`` is told of each shard header read.

    Raises:
        CheckpointError: a missing or unreadable path, no model file in the directory or
            both kinds (ambiguous), an index that is not valid or names a shard outside the
            directory or a missing one, a truncated or corrupt shard, an unfinished
            ``reconcile`` staging directory.
    """
    if is_remote(path):
        return _open_remote(str(path), progress)
    path = Path(path)
    if path.is_dir() and is_staging(path):
        raise CheckpointError(f"{path}: an unfinished reconcile staging directory, not a checkpoint")
    return _open(path, progress)


def _open(path: Path, progress: Progress | None = None) -> Checkpoint:
    if not path.exists():
        raise CheckpointError(f"{path}: no such file or directory")
    if path.is_file():
        return Checkpoint(path, path.parent, [path.name], None, progress=progress)
    if not path.is_dir():
        raise CheckpointError(f"{path}: not a regular file or directory")
    if (path / INDEX).is_file():
        # transformers would load model.safetensors and ignore the index; other tools the
        # reverse: which tensors are "the checkpoint" is not ours to guess
        if (path / SINGLE).exists():
            raise CheckpointError(f"{path}: holds both {SINGLE} and {INDEX}; ambiguous, remove the one not meant")
        index, shards = read_index(path)
        return _check_index(Checkpoint(path, path, shards, index, progress=progress), path / INDEX)
    if (path / SINGLE).exists():
        return Checkpoint(path, path, [SINGLE], None, progress=progress)
    raise CheckpointError(f"{path}: directory holds neither {SINGLE} nor {INDEX}")


def _load_index(read_text: Callable[[], str], where: object) -> tuple[dict, list[str]]:
    """The parsed index and its shard names, in order of first mention."""
    try:
        index = json.loads(read_text())
        shards = list(dict.fromkeys(index["weight_map"].values()))
        if not all(isinstance(name, str) for name in [*shards, *index["weight_map"]]):
            raise ValueError("weight_map must map tensor names to shard file names")
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
        if isinstance(err, SourceError):
            raise
        raise CheckpointError(f"{where}: not a valid safetensors index: {err!r}") from err
    return index, shards


def _check_index(checkpoint: Checkpoint, where: object) -> Checkpoint:
    for key, shard in checkpoint.index["weight_map"].items():
        if key not in checkpoint.tensors or checkpoint.tensors[key].shard != shard:
            raise CheckpointError(f"{where}: maps {key!r} to {shard}, which does not hold it")
    return checkpoint


def _open_remote(url: str, progress: Progress | None) -> Checkpoint:
    """A checkpoint at an ``hf://`` or ``http(s)://`` URL: the same layouts as on disk, read by range requests."""
    source, name = open_remote(url)
    root = Path(source.shown)  # only for messages: a remote checkpoint has no local root
    if name is None:
        has_index, has_single = source.exists(INDEX), source.exists(SINGLE)
        if has_index and has_single:  # as on disk: which one is "the checkpoint" is not ours to guess
            raise CheckpointError(f"{source.shown}: holds both {SINGLE} and {INDEX}; ambiguous, name the file meant")
        name = INDEX if has_index else SINGLE if has_single else None
        if name is None:
            raise CheckpointError(f"{source.shown}: holds neither {SINGLE} nor {INDEX}")
    if not name.endswith(".json"):
        return Checkpoint(url, root, [name], None, source, progress)
    index, shards = _load_index(lambda: source.read_text(name), source.where(name))
    missing = [shard for shard in shards if not source.exists(shard)]
    if missing:
        raise CheckpointError(f"{source.where(name)}: names shard(s) that do not exist: {', '.join(missing)}")
    return _check_index(Checkpoint(url, root, shards, index, source, progress), source.where(name))


@dataclass(frozen=True)
class Inspection:
    """What ``inspect`` found: the format (``None`` when groups differ), a report per fused group,
    and notes on what was recognised and left alone (per-channel scales)."""

    path: Path
    format: Format | None
    reports: tuple[GroupReport, ...]
    notes: tuple[str, ...] = ()

    @property
    def formats(self) -> tuple[Format, ...]:
        """The formats of the reported groups, each once, in order."""
        return tuple(dict.fromkeys(report.format for report in self.reports if report.format is not None))

    @property
    def consistent(self) -> bool:
        return all(report.consistent for report in self.reports)


def _read_scalar(checkpoint: Checkpoint, key: str) -> float:
    info = checkpoint.tensors[key]
    if math.prod(info.shape) != 1 or not getattr(_DTYPES.get(info.dtype), "is_floating_point", False):
        got = f"{info.dtype} {list(info.shape)}"
        raise CheckpointError(f"{checkpoint.path}: {key!r} should hold one float scale, got {got}")
    return checkpoint.read(key).item()


def _scalar_like(value: float, info: TensorInfo) -> torch.Tensor:
    """``value`` in the dtype and shape of an existing scale entry (exact: it is one of the stored values)."""
    return torch.tensor(value, dtype=torch.float64).to(_DTYPES[info.dtype]).reshape(info.shape)


def _scale_keys(checkpoint: Checkpoint, fmt: Format, fqn: str) -> list[str]:
    """The keys ``_member_scales`` reads for ``fqn``: its scale (or the amax it derives one from) and input scale."""
    keys = [join_fqn(fqn, name) for name in (fmt.scale, fmt.input_scale) if name]
    keys = [key for key in keys if key in checkpoint.tensors]
    if join_fqn(fqn, fmt.scale) in keys or fmt.fallback is None:
        return keys
    return [*keys, join_fqn(fqn, fmt.fallback)]


def _member_scales(checkpoint: Checkpoint, fmt: Format, fqn: str) -> MemberScales:
    keys = checkpoint.tensors
    scale_key = join_fqn(fqn, fmt.scale)
    derived = scale_key not in keys
    if not derived:
        scale = _read_scalar(checkpoint, scale_key)
    else:  # calibration state without a promoted global amax: its own amax is its scale
        scale = round_up_to_fp32(reduce_amax(checkpoint.read(join_fqn(fqn, fmt.fallback)))).item()
    input_key = join_fqn(fqn, fmt.input_scale) if fmt.input_scale else None
    input_scale = _read_scalar(checkpoint, input_key) if input_key in keys else None
    size = fmt.block_size(fqn, keys)
    return MemberScales(fqn=fqn, scale=scale, input_scale=input_scale, block_size=size, derived=derived)


def _per_channel_note(groups: Sequence[Group], formats: dict[str, Format]) -> tuple[str, ...]:
    if not groups:
        return ()
    kinds = "/".join(dict.fromkeys(formats[group.members[0]].kind for group in groups))
    return (
        f"{len(groups)} fused group(s) with per-channel {kinds} weight scales (e.g. {groups[0].parent!r}) "
        "left as they are: each output row keeps its own scale when siblings are fused, so none is shared",
    )


def _inspect(
    checkpoint: Checkpoint, patterns: Sequence[str], require_match: bool = False, progress: Progress | None = None
) -> Inspection:
    try:
        formats = find_formats(checkpoint.tensors, checkpoint.family)
        if not formats:
            detect_format(checkpoint.tensors, checkpoint.family)  # raises, naming the keys it looks for
        names = sorted(formats, key=_natural)
        if require_match:
            _check_patterns_match(checkpoint, names, patterns)
        # members as their pattern names them (q, k, v), not as the sorted keys list them
        groups = in_role_order(find_groups(names, patterns), patterns)
        per_channel = [g for g in groups if not any(formats[fqn].per_tensor for fqn in g.members)]
        groups = [group for group in groups if group not in per_channel]
        members = {fqn for group in groups for fqn in group.members}
        for fqn in members:  # completeness and dtypes, from the header, before any tensor is read
            formats[fqn].check_member(fqn, checkpoint.tensors)
        scales = _read_member_scales(checkpoint, formats, members, progress)
        reports = report_groups(groups, scales, formats)
    except CheckpointError:
        raise
    except ValueError as err:  # the core names the function; a user needs the file
        raise CheckpointError(f"{checkpoint.path}: {_FUNCTION_PREFIX.sub('', str(err))}") from err
    found = set(report.format for report in reports) or set(formats.values())
    fmt = next(iter(found)) if len(found) == 1 else None
    return Inspection(checkpoint.path, fmt, reports, _per_channel_note(per_channel, formats))


def _read_member_scales(
    checkpoint: Checkpoint, formats: dict[str, Format], members: set[str], progress: Progress | None
) -> dict[str, MemberScales]:
    """Every member's scales, shard by shard in file order, each shard's scalars fetched in a few reads."""
    ordered = sorted(members, key=lambda fqn: _location(checkpoint, formats[fqn], fqn))
    scales = {}
    for shard, in_shard in itertools.groupby(ordered, key=lambda fqn: _location(checkpoint, formats[fqn], fqn)[0]):
        in_shard = list(in_shard)
        checkpoint.prefetch([key for fqn in in_shard for key in _scale_keys(checkpoint, formats[fqn], fqn)])
        scales.update((fqn, _member_scales(checkpoint, formats[fqn], fqn)) for fqn in in_shard)
        if progress is not None:
            name = checkpoint.shards[shard]
            progress("scales", checkpoint.starts[name] + checkpoint.source.size(name), checkpoint.size)
    if progress is not None:
        progress("scales", checkpoint.size, checkpoint.size)
    checkpoint.release()
    return scales


def _check_patterns_match(checkpoint: Checkpoint, names: Sequence[str], patterns: Sequence[str]) -> None:
    """Refuse a pattern that no quantized module's name matches: a typo would otherwise report "no groups"."""
    for regex in compile_patterns(patterns, where="--patterns"):
        if not any(regex.fullmatch(name) for name in names):
            raise CheckpointError(f"{checkpoint.path}: --patterns {regex.pattern!r} matches no quantized module")


def _natural(name: str) -> list:
    """Sort key that puts ``layers.2`` before ``layers.10``."""
    return [(0, int(part), "") if part.isdigit() else (1, 0, part) for part in re.split(r"(\d+)", name)]


def _location(checkpoint: Checkpoint, fmt: Format, fqn: str) -> tuple[int, int]:
    """Where a member's scale lies: reading in file order keeps page-ins sequential."""
    keys = checkpoint.tensors
    info = keys.get(join_fqn(fqn, fmt.scale)) or keys[join_fqn(fqn, fmt.fallback)]
    return checkpoint.position[info.shard], info.start


def inspect_checkpoint(
    path: str | os.PathLike,
    patterns: Sequence[str] = DEFAULT_PATTERNS,
    progress: Progress | None = None,
    *,
    require_match: bool = False,
) -> Inspection:
    """Report every fused group of a checkpoint, reading only its headers and scale tensors.

    ``progress(phase, done, total)`` is told how far through the checkpoint's bytes the
    ``headers`` and then the ``scales`` phase are. ``require_match`` refuses a pattern that
    matches no quantized module (user-given patterns).

    Raises:
        CheckpointError, ValueError: bad input (see ``open_checkpoint``; unknown format,
            mixed block sizes, a non-finite scale, a bad pattern).
    """
    return _inspect(open_checkpoint(path, progress), patterns, require_match, progress)


def _check_out(checkpoint: Checkpoint, out: Path, force: bool) -> None:
    source, target = checkpoint.path.resolve(), out.resolve()
    if target == source or target in source.parents or source in target.parents or target == checkpoint.root.resolve():
        raise CheckpointError(f"{out}: --out must lie outside the input {checkpoint.path}, which is never modified")
    if (out.exists() or out.is_symlink()) and not force:
        raise CheckpointError(f"{out}: already exists; pass --force to replace it")
    if not out.parent.is_dir():
        raise CheckpointError(f"{out.parent}: no such directory to create --out in")


@contextmanager
def staged_output(checkpoint: Checkpoint, out: Path, force: bool) -> Iterator[Path]:
    """A marked staging directory beside ``out``, renamed to ``out`` when the block ends, removed if it raises.

    See ``adapters.staging``: signals, killed runs' leftovers, the atomic rename.

    Raises:
        CheckpointError: ``out`` overlaps the input, exists without ``force``, or has no parent.
    """
    _check_out(checkpoint, out, force)
    with staging_directory(out, checkpoint.root) as staging:
        yield staging
        move_into_place(staging, out)
