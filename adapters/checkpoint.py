"""safetensors checkpoints on disk: inspect and reconcile the fused groups of a quantized checkpoint.

The decisions are the core's (``core.formats``, ``core.reconcile``, ``core.groups``);
this file only reads and writes files. What it guarantees:

* ``inspect`` reads the shard headers, ``config.json`` / ``hf_quant_config.json`` and the
  per-tensor scale tensors, never weights or block scales (formats, dtypes and block sizes
  come from the header); every member of a group must carry the tensors its format needs;
* ``reconcile`` copies every shard as it is and overwrites, in the copy, only the
  bytes of the tensors that change (same dtype, same shape), one member at a time, so
  every other tensor and the safetensors metadata stay byte for byte; a shard that
  gains keys (quantizer state without ``_global_amax``) is rewritten whole;
* output goes to a temporary directory next to ``--out``, is checked, and is renamed
  into place only when complete; the input is never opened for writing.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from sharedquant.core.formats import DEFAULT_PATTERNS, Format, detect_format, family_from_config, find_formats
from sharedquant.core.groups import Group, compile_patterns, find_groups, in_role_order, join_fqn
from sharedquant.core.reconcile import GroupReport, MemberScales, report_groups
from sharedquant.core.reduce import reduce_amax, round_up_to_fp32

from .layout import INDEX, SINGLE, CheckpointError, read_index
from .staging import is_staging, move_into_place, staging_directory

__all__ = [
    "Checkpoint",
    "CheckpointError",
    "Inspection",
    "Reconciliation",
    "inspect_checkpoint",
    "open_checkpoint",
    "reconcile_checkpoint",
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


def _read_header(path: Path, shard: str) -> dict[str, TensorInfo]:
    """Parse and validate one shard's header; a truncated or corrupt file raises ``CheckpointError``."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as handle:
            prefix = handle.read(8)
            length = int.from_bytes(prefix, "little") if len(prefix) == 8 else -1
            if length < 0 or length > min(size - 8, _MAX_HEADER):
                raise CheckpointError(f"{path}: not a safetensors file (truncated or corrupt header, {size} bytes)")
            header = json.loads(handle.read(length))
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

    def __init__(self, path: Path, root: Path, shards: Sequence[str], index: dict | None) -> None:
        self.path, self.root, self.shards, self.index = path, root, tuple(shards), index
        self.family = _read_family(path) if path.is_dir() else None
        self.tensors: dict[str, TensorInfo] = {}
        for shard in self.shards:
            for key, info in _read_header(root / shard, shard).items():
                if self.tensors.setdefault(key, info) is not info:
                    raise CheckpointError(f"{root}: {key!r} is in two shards, {self.tensors[key].shard} and {shard}")
        self.position = {shard: position for position, shard in enumerate(self.shards)}
        self._handles: dict[str, object] = {}

    def read(self, key: str) -> torch.Tensor:
        """The tensor ``key``, read through ``safetensors.safe_open`` (only its own bytes)."""
        info = self.tensors[key]
        handle = self._handles.get(info.shard)
        try:
            if handle is None:
                handle = self._handles[info.shard] = safe_open(str(self.root / info.shard), "pt")
            tensor = handle.get_tensor(key)
        except (SafetensorError, OSError) as err:
            raise CheckpointError(f"{self.root / info.shard}: cannot read {key!r}: {err}") from err
        return tensor

    def release(self) -> None:
        """Drop the open shard maps, so the pages read so far stop counting against memory."""
        self._handles.clear()


def _read_family(directory: Path) -> str | None:
    """The tool that wrote a checkpoint directory, as its configs say (``core.formats.family_from_config``)."""
    configs = []
    for name in ("config.json", "hf_quant_config.json"):
        try:
            configs.append(json.loads((directory / name).read_text()) if (directory / name).is_file() else None)
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
            raise CheckpointError(f"{directory / name}: not valid JSON: {err}") from err
    if not all(config is None or isinstance(config, dict) for config in configs):
        raise CheckpointError(f"{directory}: config.json or hf_quant_config.json is not a JSON object")
    return family_from_config(*configs)


def open_checkpoint(path: str | os.PathLike) -> Checkpoint:
    """Open a ``.safetensors`` file, or a directory with ``model.safetensors`` or a sharded index.

    Raises:
        CheckpointError: a missing or unreadable path, no model file in the directory or
            both kinds (ambiguous), an index that is not valid or names a shard outside the
            directory or a missing one, a truncated or corrupt shard, an unfinished
            ``reconcile`` staging directory.
    """
    path = Path(path)
    if path.is_dir() and is_staging(path):
        raise CheckpointError(f"{path}: an unfinished reconcile staging directory, not a checkpoint")
    return _open(path)


def _open(path: Path) -> Checkpoint:
    if not path.exists():
        raise CheckpointError(f"{path}: no such file or directory")
    if path.is_file():
        return Checkpoint(path, path.parent, [path.name], None)
    if not path.is_dir():
        raise CheckpointError(f"{path}: not a regular file or directory")
    if (path / INDEX).is_file():
        # transformers would load model.safetensors and ignore the index; other tools the
        # reverse: which tensors are "the checkpoint" is not ours to guess
        if (path / SINGLE).exists():
            raise CheckpointError(f"{path}: holds both {SINGLE} and {INDEX}; ambiguous, remove the one not meant")
        return _open_index(path)
    if (path / SINGLE).exists():
        return Checkpoint(path, path, [SINGLE], None)
    raise CheckpointError(f"{path}: directory holds neither {SINGLE} nor {INDEX}")


def _open_index(path: Path) -> Checkpoint:
    index, shards = read_index(path)
    checkpoint = Checkpoint(path, path, shards, index)
    for key, shard in index["weight_map"].items():
        if key not in checkpoint.tensors or checkpoint.tensors[key].shard != shard:
            raise CheckpointError(f"{path / INDEX}: maps {key!r} to {shard}, which does not hold it")
    return checkpoint


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


def _inspect(checkpoint: Checkpoint, patterns: Sequence[str], require_match: bool = False) -> Inspection:
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
        members = sorted(members, key=lambda fqn: _location(checkpoint, formats[fqn], fqn))
        scales = {fqn: _member_scales(checkpoint, formats[fqn], fqn) for fqn in members}
        checkpoint.release()
        reports = report_groups(groups, scales, formats)
    except CheckpointError:
        raise
    except ValueError as err:  # the core names the function; a user needs the file
        raise CheckpointError(f"{checkpoint.path}: {_FUNCTION_PREFIX.sub('', str(err))}") from err
    found = set(report.format for report in reports) or set(formats.values())
    fmt = next(iter(found)) if len(found) == 1 else None
    return Inspection(checkpoint.path, fmt, reports, _per_channel_note(per_channel, formats))


def _check_patterns_match(checkpoint: Checkpoint, names: Sequence[str], patterns: Sequence[str]) -> None:
    """Refuse a pattern that no quantized module's name matches: a typo would otherwise report "no groups"."""
    for regex in compile_patterns(patterns, where="--patterns"):
        if not any(regex.fullmatch(name) for name in names):
            raise CheckpointError(f"{checkpoint.path}: --patterns {regex.pattern!r} matches no quantized module")


def _check_representable(checkpoint: Checkpoint, inspection: Inspection) -> None:
    """Refuse a group whose shared scale has no exact form in a member's stored dtype.

    Scales are written back in their own dtype (fp16, bf16, fp32, fp64); a group mixing
    dtypes can need a value that the narrower one rounds, and stay mismatched.
    """
    for report in inspection.reports:
        fmt = report.format
        wanted = [(fqn, fmt.scale, report.shared_scale) for fqn in report.changed]
        wanted += [(fqn, fmt.input_scale, report.shared_input_scale) for fqn in report.input_changed]
        for fqn, role, shared in wanted:
            info = checkpoint.tensors.get(join_fqn(fqn, role))
            if info is not None and _scalar_like(shared, info).item() != shared:
                raise CheckpointError(
                    f"{checkpoint.path}: {join_fqn(fqn, role)!r} is stored as {info.dtype}, which cannot hold "
                    f"the group's shared {role} {shared!r} exactly; store the group's {role} in one dtype"
                )


def _natural(name: str) -> list:
    """Sort key that puts ``layers.2`` before ``layers.10``."""
    return [(0, int(part), "") if part.isdigit() else (1, 0, part) for part in re.split(r"(\d+)", name)]


def _location(checkpoint: Checkpoint, fmt: Format, fqn: str) -> tuple[int, int]:
    """Where a member's scale lies: reading in file order keeps page-ins sequential."""
    keys = checkpoint.tensors
    info = keys.get(join_fqn(fqn, fmt.scale)) or keys[join_fqn(fqn, fmt.fallback)]
    return checkpoint.position[info.shard], info.start


def inspect_checkpoint(
    path: str | os.PathLike, patterns: Sequence[str] = DEFAULT_PATTERNS, *, require_match: bool = False
) -> Inspection:
    """Report every fused group of a checkpoint, reading only its headers and scale tensors.

    ``require_match`` refuses a pattern that matches no quantized module (user-given patterns).

    Raises:
        CheckpointError, ValueError: bad input (see ``open_checkpoint``; unknown format,
            mixed block sizes, a non-finite scale, a bad pattern).
    """
    return _inspect(open_checkpoint(path), patterns, require_match)


@dataclass
class Reconciliation:
    """What ``reconcile`` did (or, on a dry run, would do)."""

    inspection: Inspection
    requantized: list[str] = field(default_factory=list)
    inputs_unified: list[str] = field(default_factory=list)
    scales_set: list[str] = field(default_factory=list)
    inexact: list[str] = field(default_factory=list)
    out: Path | None = None


def _check_out(checkpoint: Checkpoint, out: Path, force: bool) -> None:
    source, target = checkpoint.path.resolve(), out.resolve()
    if target == source or target in source.parents or source in target.parents or target == checkpoint.root.resolve():
        raise CheckpointError(f"{out}: --out must lie outside the input {checkpoint.path}, which is never modified")
    if (out.exists() or out.is_symlink()) and not force:
        raise CheckpointError(f"{out}: already exists; pass --force to replace it")
    if not out.parent.is_dir():
        raise CheckpointError(f"{out.parent}: no such directory to create --out in")


class _Writer:
    """Byte patches into the copied shards, then whole rewrites of the shards that gain keys."""

    def __init__(self, checkpoint: Checkpoint, staging: Path) -> None:
        self.checkpoint, self.staging = checkpoint, staging
        self.added: dict[str, dict[str, torch.Tensor]] = {}

    def patch(self, key: str, tensor: torch.Tensor) -> None:
        info = self.checkpoint.tensors[key]
        data = tensor.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
        if len(data) != info.end - info.start:
            raise RuntimeError(f"reconcile: new {key!r} has {len(data)} bytes, the slot holds {info.end - info.start}")
        with open(self.staging / info.shard, "r+b") as handle:
            handle.seek(info.start)
            handle.write(data)

    def patch_scalar(self, key: str, value: float) -> None:
        self.patch(key, _scalar_like(value, self.checkpoint.tensors[key]))

    def add(self, key: str, beside: str, tensor: torch.Tensor) -> None:
        self.added.setdefault(self.checkpoint.tensors[beside].shard, {})[key] = tensor

    def finish(self) -> None:
        for shard, new in self.added.items():
            target = self.staging / shard
            with safe_open(str(target), "pt") as handle:
                tensors, metadata = {key: handle.get_tensor(key) for key in handle.keys()}, handle.metadata()
            save_file({**tensors, **new}, str(target) + ".rewrite", metadata=metadata)
            shutil.copymode(target, str(target) + ".rewrite")
            os.replace(str(target) + ".rewrite", target)
        index = self.checkpoint.index
        if index is not None and self.added:
            index = json.loads(json.dumps(index))
            for shard, new in self.added.items():
                index["weight_map"].update(dict.fromkeys(new, shard))
                if isinstance(index.get("metadata", {}).get("total_size"), int):
                    index["metadata"]["total_size"] += sum(t.numel() * t.element_size() for t in new.values())
            index["weight_map"] = dict(sorted(index["weight_map"].items()))
            (self.staging / INDEX).write_text(json.dumps(index, indent=2) + "\n")


def _requantize_member(checkpoint: Checkpoint, writer: _Writer, fmt: Format, fqn: str, shared: float) -> bool:
    keys = {role: join_fqn(fqn, getattr(fmt, role)) for role in fmt.required}
    tensors = {role: checkpoint.read(key) for role, key in keys.items()}
    try:
        new, exact = fmt.requantize(tensors, _scalar_like(shared, checkpoint.tensors[keys["scale"]]))
    except CheckpointError:
        raise
    except ValueError as err:  # the core names the function; a user needs the file and the member
        raise CheckpointError(f"{checkpoint.path}: {fqn!r}: {_FUNCTION_PREFIX.sub('', str(err))}") from err
    for role, tensor in new.items():
        writer.patch(keys[role], tensor)
    return exact


def _set_scale(checkpoint: Checkpoint, writer: _Writer, fmt: Format, fqn: str, shared: float) -> None:
    key = join_fqn(fqn, fmt.scale)
    if key in checkpoint.tensors:
        writer.patch_scalar(key, shared)
    else:  # quantizer state without a global amax yet: it gains one
        writer.add(key, join_fqn(fqn, fmt.fallback), torch.tensor(shared, dtype=torch.float32))


def _apply(checkpoint: Checkpoint, result: Reconciliation, writer: _Writer | None, progress) -> None:
    """Fill ``result`` with the changes; apply them when there is a writer."""
    reports = result.inspection.reports
    jobs = [(_location(checkpoint, report.format, fqn), report, fqn) for report in reports for fqn in report.changed]
    jobs.sort(key=lambda job: job[0])
    for done, ((shard, _), report, fqn) in enumerate(jobs):
        if done and jobs[done - 1][0][0] != shard:
            checkpoint.release()  # one shard's pages at a time
        fmt = report.format
        if not fmt.requantizes:
            result.scales_set.append(fqn)
            if writer is not None:
                _set_scale(checkpoint, writer, fmt, fqn, report.shared_scale)
        else:
            result.requantized.append(fqn)
            if writer is not None and not _requantize_member(checkpoint, writer, fmt, fqn, report.shared_scale):
                result.inexact.append(fqn)
        if progress is not None:
            progress(done + 1, len(jobs), f"reconciled {fqn}")
    for report in result.inspection.reports:
        for fqn in report.input_changed:
            result.inputs_unified.append(fqn)
            if writer is not None:
                writer.patch_scalar(join_fqn(fqn, report.format.input_scale), report.shared_input_scale)
    checkpoint.release()


def _copy_inputs(checkpoint: Checkpoint, staging: Path, progress) -> None:
    """Copy the shards and, from a directory, every other file (the index too, rewritten later if needed).

    Links are followed: a shard that is a link (as in the Hugging Face cache, into its blobs)
    must become a file of its own, or patching the copy would write through into the input.
    """
    entries = [checkpoint.path] if checkpoint.path.is_file() else sorted(checkpoint.root.iterdir())
    for done, entry in enumerate(entries):
        if entry.is_dir():
            shutil.copytree(entry, staging / entry.name)
        else:
            shutil.copy2(entry, staging / entry.name)
        if progress is not None:
            progress(done + 1, len(entries), f"copied {entry.name}")


def reconcile_checkpoint(
    path: str | os.PathLike,
    out: str | os.PathLike | None,
    patterns: Sequence[str] = DEFAULT_PATTERNS,
    *,
    force: bool = False,
    dry_run: bool = False,
    progress: Callable[[int, int, str], None] | None = None,
    require_match: bool = False,
) -> Reconciliation:
    """Write a copy of a checkpoint in which every fused group shares one scale.

    Args:
        path: the input checkpoint (file or directory); never modified.
        out: the output directory; may be ``None`` on a dry run.
        patterns: grouping regexes (``core.find_groups``).
        force: replace an existing ``out``.
        dry_run: compute and return the changes, write nothing.
        progress: called as ``progress(done, total, what)`` after each copied file and each
            changed member.
        require_match: refuse a pattern that matches no quantized module.

    Returns:
        A ``Reconciliation`` listing the changed members.

    Raises:
        CheckpointError, ValueError: bad input; nothing is written.
    """
    checkpoint = open_checkpoint(path)
    result = Reconciliation(inspection=_inspect(checkpoint, patterns, require_match))
    _check_representable(checkpoint, result.inspection)
    if dry_run:
        _apply(checkpoint, result, None, None)
        return result
    if out is None:
        raise CheckpointError("reconcile: --out is required unless --dry-run")
    out = Path(out)
    with staged_output(checkpoint, out, force) as staging:
        _copy_inputs(checkpoint, staging, progress)
        writer = _Writer(checkpoint, staging)
        _apply(checkpoint, result, writer, progress)
        writer.finish()
        target = staging / checkpoint.path.name if checkpoint.path.is_file() else staging
        if not _inspect(_open(target), patterns).consistent:
            raise RuntimeError(f"reconcile: the written copy of {checkpoint.path} still has mismatched groups")
    result.out = out
    return result


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
