"""``reconcile``: write a copy of a checkpoint in which every fused group shares one scale.

Reading is ``adapters.checkpoint``'s, the decisions the core's. This file copies the
shards (``adapters.copying``, in the background, never as a link) into the staging
directory of ``checkpoint.staged_output``, overwrites in the copy only the bytes of the
tensors that change (same dtype, same shape), one member at a time, rewrites whole only
a shard that gains keys, checks the result, and leaves the rename to ``staged_output``.
The input is never opened for writing.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from sharedquant.core.formats import DEFAULT_PATTERNS, Format
from sharedquant.core.groups import join_fqn
from sharedquant.core.reconcile import GroupReport

from .checkpoint import (
    _FUNCTION_PREFIX,
    INDEX,
    Checkpoint,
    CheckpointError,
    Inspection,
    Progress,
    _inspect,
    _location,
    _open,
    _scalar_like,
    open_checkpoint,
    staged_output,
)
from .copying import Copier, Meter, tree_size
from .sources import is_remote
from .staging import signals_deferred

__all__ = ["Reconciliation", "reconcile_checkpoint", "resolve_device"]


@dataclass
class Reconciliation:
    """What ``reconcile`` did (or, on a dry run, would do)."""

    inspection: Inspection
    requantized: list[str] = field(default_factory=list)
    inputs_unified: list[str] = field(default_factory=list)
    scales_set: list[str] = field(default_factory=list)
    inexact: list[str] = field(default_factory=list)
    out: Path | None = None


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


class _Writer:
    """Byte patches into the copied shards, then whole rewrites of the shards that gain keys."""

    def __init__(self, checkpoint: Checkpoint, staging: Path, copier: Copier) -> None:
        self.checkpoint, self.staging, self.copier = checkpoint, staging, copier
        self.added: dict[str, dict[str, torch.Tensor]] = {}

    def patch(self, key: str, tensor: torch.Tensor) -> None:
        info = self.checkpoint.tensors[key]
        data = memoryview(tensor.cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
        if len(data) != info.end - info.start:
            raise RuntimeError(f"reconcile: new {key!r} has {len(data)} bytes, the slot holds {info.end - info.start}")
        self.copier.wait(info.shard)  # the copy runs in the background; patch it only once it is whole
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


def _requantize_member(
    checkpoint: Checkpoint, writer: _Writer, fmt: Format, fqn: str, shared: float, device: torch.device
) -> bool:
    keys = {role: join_fqn(fqn, getattr(fmt, role)) for role in fmt.required}
    # core's functions are plain torch ops: they run where their inputs lie
    tensors = {role: checkpoint.read(key).to(device) for role, key in keys.items()}
    try:
        new, exact = fmt.requantize(tensors, _scalar_like(shared, checkpoint.tensors[keys["scale"]]).to(device))
    except CheckpointError:
        raise
    except ValueError as err:  # the core names the function; a user needs the file and the member
        raise CheckpointError(f"{checkpoint.path}: {fqn!r}: {_FUNCTION_PREFIX.sub('', str(err))}") from err
    for role, tensor in new.items():
        writer.patch(keys[role], tensor.cpu())
    return exact


def _set_scale(checkpoint: Checkpoint, writer: _Writer, fmt: Format, fqn: str, shared: float) -> None:
    key = join_fqn(fqn, fmt.scale)
    if key in checkpoint.tensors:
        writer.patch_scalar(key, shared)
    else:  # quantizer state without a global amax yet: it gains one
        writer.add(key, join_fqn(fqn, fmt.fallback), torch.tensor(shared, dtype=torch.float32))


def _jobs(checkpoint: Checkpoint, inspection: Inspection) -> list[tuple[tuple[int, int], GroupReport, str]]:
    """The changed members, in file order: one shard's reads at a time, sequential within it."""
    reports = inspection.reports
    jobs = [(_location(checkpoint, report.format, fqn), report, fqn) for report in reports for fqn in report.changed]
    return sorted(jobs, key=lambda job: job[0])


def _member_bytes(checkpoint: Checkpoint, fmt: Format, fqn: str) -> int:
    """Bytes a member's requantization reads and rewrites (its weights and block scales)."""
    if not fmt.requantizes:
        return 0
    infos = [checkpoint.tensors[join_fqn(fqn, getattr(fmt, role))] for role in fmt.required if role != "scale"]
    return sum(info.end - info.start for info in infos)


def _apply(checkpoint: Checkpoint, result: Reconciliation, writer: _Writer | None, meter: Meter, device) -> None:
    """Fill ``result`` with the changes; apply them when there is a writer."""
    jobs = _jobs(checkpoint, result.inspection)
    for done, ((shard, _), report, fqn) in enumerate(jobs):
        if done and jobs[done - 1][0][0] != shard:
            checkpoint.release()  # one shard open at a time
        fmt = report.format
        if not fmt.requantizes:
            result.scales_set.append(fqn)
            if writer is not None:
                _set_scale(checkpoint, writer, fmt, fqn, report.shared_scale)
        else:
            result.requantized.append(fqn)
            if writer is not None and not _requantize_member(checkpoint, writer, fmt, fqn, report.shared_scale, device):
                result.inexact.append(fqn)
        meter.advance("requantize", _member_bytes(checkpoint, fmt, fqn) if writer is not None else 0)
    for report in result.inspection.reports:
        for fqn in report.input_changed:
            result.inputs_unified.append(fqn)
            if writer is not None:
                writer.patch_scalar(join_fqn(fqn, report.format.input_scale), report.shared_input_scale)
    checkpoint.release()


def _inputs(checkpoint: Checkpoint) -> list[Path]:
    """The shards and, from a directory, every other file (the index too, rewritten later if needed).

    The copy follows links: a shard that is a link (as in the Hugging Face cache, into its
    blobs) must become a file of its own, or patching the copy would write through into the input.
    """
    return [checkpoint.path] if checkpoint.path.is_file() else sorted(checkpoint.root.iterdir())


def resolve_device(device: str | torch.device) -> torch.device:
    """``auto`` is CUDA when available, else the CPU; ``cuda`` without a GPU is refused."""
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise CheckpointError("reconcile: --device cuda asked for, but torch sees no CUDA device here")
    return device


def reconcile_checkpoint(
    path: str | os.PathLike,
    out: str | os.PathLike | None,
    patterns: Sequence[str] = DEFAULT_PATTERNS,
    *,
    force: bool = False,
    dry_run: bool = False,
    device: str | torch.device = "auto",
    progress: Progress | None = None,
    require_match: bool = False,
) -> Reconciliation:
    """Write a copy of a checkpoint in which every fused group shares one scale.

    The shards are copied in a background thread while the changed members, shard by
    shard, are requantized on ``device`` and patched into their copies; memory holds
    one member's tensors at a time.

    Args:
        path: the input checkpoint (file or directory); never modified. A URL only with ``dry_run``.
        out: the output directory; may be ``None`` on a dry run.
        patterns: grouping regexes (``core.find_groups``).
        force: replace an existing ``out``.
        dry_run: compute and return the changes, write nothing.
        device: where requantization runs: ``auto`` (CUDA when available), ``cpu`` or ``cuda``.
        progress: called as ``progress(phase, done, total)`` in bytes of the whole run
            (phases ``copy``, ``requantize``, ``verify``).
        require_match: refuse a pattern that matches no quantized module.

    Returns:
        A ``Reconciliation`` listing the changed members.

    Raises:
        CheckpointError, ValueError: bad input; nothing is written.
    """
    if is_remote(path) and not dry_run:  # the output is a copy: a 400 GB download is the user's call, not ours
        raise CheckpointError(
            f"{path}: reconcile writes a copy of a local checkpoint; download it first (e.g. "
            "`hf download ORG/REPO --local-dir DIR`), then reconcile DIR; --dry-run works on a URL"
        )
    device = resolve_device(device)
    checkpoint = open_checkpoint(path)
    result = Reconciliation(inspection=_inspect(checkpoint, patterns, require_match))
    _check_representable(checkpoint, result.inspection)
    if dry_run:
        _apply(checkpoint, result, None, Meter(None, 0), device)
        return result
    if out is None:
        raise CheckpointError("reconcile: --out is required unless --dry-run")
    out = Path(out)
    with staged_output(checkpoint, out, force) as staging:
        _write(checkpoint, result, staging, patterns, device, progress)
    result.out = out
    return result


def _write(checkpoint: Checkpoint, result: Reconciliation, staging: Path, patterns, device, progress) -> None:
    """Copy, patch and verify in the staging directory; the copy runs in the background meanwhile."""
    inputs = _inputs(checkpoint)
    changed = sum(_member_bytes(checkpoint, report.format, fqn) for _, report, fqn in _jobs(checkpoint, result.inspection))
    meter = Meter(progress, sum(tree_size(entry) for entry in inputs) + changed)
    copier = None
    try:
        with signals_deferred():  # a Ctrl-C is raised once ``copier`` is set, so the except below stops it
            copier = Copier(inputs, staging, meter)
        writer = _Writer(checkpoint, staging, copier)
        _apply(checkpoint, result, writer, meter, device)
        copier.finish()
        writer.finish()
        meter.advance("verify", 0)
        target = staging / checkpoint.path.name if checkpoint.path.is_file() else staging
        if not _inspect(_open(target), patterns).consistent:
            raise RuntimeError(f"reconcile: the written copy of {checkpoint.path} still has mismatched groups")
    except BaseException:
        if copier is not None:
            copier.cancel()  # staged_output removes the staging directory once the copy thread has stopped
        raise
