"""Reconciling fused groups of a quantized checkpoint. Pure: scales and tensors in, reports and new tensors out.

A fused group is consistent when its members hold one per-tensor scale. Inference
engines that meet a mismatched group take the coarsest scale and keep every member's
codes and block scales ("max without rescaling"), which multiplies the finer members'
weights by the mismatch ratio. Reconciling instead gives every member the coarsest
scale and requantizes the members whose scale changed: dequantize with their own
scales, quantize again with the shared one, both through ``core.nvfp4``.

The shared value is *chosen* among the members' stored values, never recomputed, so
the member that holds it is left bit for bit as it was. Nothing here reads a file.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from .groups import Group
from .nvfp4 import E2M1_MAX, E4M3_MAX, NVFP4Tensor, nvfp4_dequantize, nvfp4_global_scale, nvfp4_quantize

if TYPE_CHECKING:  # formats' NVFP4 classes requantize through this module: no import back at run time
    from .formats import Format

__all__ = [
    "GroupReport",
    "MemberScales",
    "dequantize_without_rescaling",
    "global_amax_for",
    "report_groups",
    "requantize",
    "shared_value",
    "weight_scale_2",
]

# Rows quantized at once: blocks never span rows, so the result is the same for any
# chunking, and the scratch memory of a huge member stays bounded.
_CHUNK_ELEMENTS = 1 << 21


@dataclass(frozen=True, slots=True)
class MemberScales:
    """What a checkpoint says about one member, in its format's own units.

    Attributes:
        fqn: the module name.
        scale: the per-tensor weight scale (``weight_scale_2``, ``weight_global_scale``
            or the global amax, by format).
        input_scale: the per-tensor activation scale, ``None`` when absent.
        block_size: elements per block scale, ``None`` when nothing is packed.
        derived: the scale is not stored but derived (calibration state without a
            ``_global_amax``): in a mismatched group the member gains a stored one.
    """

    fqn: str
    scale: float
    input_scale: float | None = None
    block_size: int | None = None
    derived: bool = False


@dataclass(frozen=True, slots=True)
class GroupReport:
    """One fused group: its members' scales and the values they should share."""

    group: Group
    members: tuple[MemberScales, ...]
    shared_scale: float
    shared_input_scale: float | None
    format: Format | None = None

    @property
    def ratio(self) -> float:
        """Mismatch of the weight scales, largest over smallest (1.0 when consistent)."""
        scales = [member.scale for member in self.members]
        return max(scales) / min(scales)

    @property
    def input_ratio(self) -> float:
        """Mismatch of the input scales present (1.0 when none or consistent)."""
        scales = [m.input_scale for m in self.members if m.input_scale is not None]
        return max(scales) / min(scales) if scales else 1.0

    @property
    def changed(self) -> tuple[str, ...]:
        """Members whose weight scale must be written: it differs from the shared one, or the
        group is mismatched and the member has no stored scale yet."""
        mismatched = any(m.scale != self.shared_scale for m in self.members)
        return tuple(m.fqn for m in self.members if m.scale != self.shared_scale or (mismatched and m.derived))

    @property
    def input_changed(self) -> tuple[str, ...]:
        """Members whose input scale differs from the shared one."""
        shared = self.shared_input_scale
        return tuple(m.fqn for m in self.members if m.input_scale is not None and m.input_scale != shared)

    @property
    def consistent(self) -> bool:
        """Whether every member already holds the shared weight and input scales."""
        return not self.changed and not self.input_changed


def shared_value(values: Sequence[float], fmt: Format) -> float:
    """The coarsest of ``values``: the largest, or the smallest for a reciprocal format."""
    return fmt.shared(values)


def _check_scale(fqn: str, what: str, value: float | None) -> None:
    if value is not None and not (math.isfinite(value) and value > 0):
        raise ValueError(f"report_groups: {fqn!r} has a {what} of {value!r}; expected a finite positive scale")


def _group_format(group: Group, fmt: Format | Mapping[str, Format]) -> Format:
    """The one format of a group's members; members in different formats cannot be fused."""
    if not isinstance(fmt, Mapping):
        return fmt
    formats = {fqn: fmt[fqn] for fqn in group.members}
    if len({f.name for f in formats.values()}) > 1:
        listing = ", ".join(f"{fqn}={f.name}" for fqn, f in formats.items())
        raise ValueError(f"report_groups: members of group {group.parent!r} are in different formats: {listing}")
    return formats[group.members[0]]


def report_groups(
    groups: Sequence[Group], scales: Mapping[str, MemberScales], fmt: Format | Mapping[str, Format]
) -> tuple[GroupReport, ...]:
    """A report per group, with the values its members should share.

    Args:
        groups: the fused groups (from ``find_groups`` over the checkpoint's members).
        scales: member FQN -> its scales; every member of every group must be present.
        fmt: the checkpoint's format, or member FQN -> its format (a checkpoint that mixes
            formats per module): whether the shared value is the max or the min.

    Returns:
        One ``GroupReport`` per group, in order.

    Raises:
        KeyError: a group member has no entry in ``scales`` (or in ``fmt``).
        ValueError: a scale is not finite and positive, the members of a group disagree
            on the block size or the format.
    """
    reports = []
    for group in groups:
        group_format = _group_format(group, fmt)
        members = tuple(scales[fqn] for fqn in group.members)
        for member in members:
            _check_scale(member.fqn, group_format.fallback if member.derived else group_format.scale, member.scale)
            _check_scale(member.fqn, group_format.input_scale or "input scale", member.input_scale)
        sizes = {member.block_size for member in members}
        if len(sizes) > 1:
            listing = ", ".join(f"{m.fqn}={m.block_size}" for m in members)
            raise ValueError(f"report_groups: members of group {group.parent!r} have different block sizes: {listing}")
        inputs = [m.input_scale for m in members if m.input_scale is not None]
        reports.append(
            GroupReport(
                group=group,
                members=members,
                shared_scale=group_format.shared([m.scale for m in members]),
                shared_input_scale=group_format.shared(inputs) if inputs else None,
                format=group_format,
            )
        )
    return tuple(reports)


def weight_scale_2(scale: torch.Tensor, fmt: Format) -> torch.Tensor:
    """A stored per-tensor scale as ``weight_scale_2`` (fp32, 0-dim), whatever the format stores."""
    return fmt.weight_scale_2(scale)


def global_amax_for(scale_2: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """The ``global_amax`` whose NVFP4 scale is ``scale_2``, and whether it reproduces it exactly.

    Every ``weight_scale_2`` the peer exports is ``global_amax / 2688`` of some fp32
    amax, and ``scale_2 * 2688`` gives that amax back. A scale written some other way
    (e.g. as ``1 / weight_global_scale``) may have no exact preimage; then the nearest
    amax is returned, whose scale is one fp32 ulp away (relative 6e-8).
    """
    scale_2 = scale_2.reshape(()).to(torch.float32)
    global_amax = scale_2 * (E2M1_MAX * E4M3_MAX)
    return global_amax, bool(nvfp4_global_scale(global_amax) == scale_2)


def requantize(
    packed: torch.Tensor,
    block_scale: torch.Tensor,
    scale_2: torch.Tensor,
    shared_scale_2: torch.Tensor,
) -> tuple[NVFP4Tensor, bool]:
    """Requantize one member from its own ``weight_scale_2`` to the group's shared one.

    Args:
        packed: uint8 codes ``[..., C // 2]``.
        block_scale: float8_e4m3fn ``[..., C // block]``.
        scale_2: the member's own ``weight_scale_2``.
        shared_scale_2: the group's ``weight_scale_2``.

    Returns:
        ``(NVFP4Tensor, exact)``: new codes and block scales of the same shapes and
        dtypes, the scale they were quantized with, and whether that scale is
        bit-identical to ``shared_scale_2`` (see ``global_amax_for``).

    Raises:
        ValueError: the shapes do not tile, or the member's values are not finite.
    """
    if packed.dim() == 0 or packed.numel() == 0 or block_scale.dim() == 0 or block_scale.numel() == 0:
        raise ValueError(
            f"requantize: expected non-empty codes and block scales, got shapes {tuple(packed.shape)} "
            f"and {tuple(block_scale.shape)}"
        )
    global_amax, exact = global_amax_for(shared_scale_2)
    rows_packed = packed.reshape(-1, packed.shape[-1])
    rows_scale = block_scale.reshape(-1, block_scale.shape[-1])
    step = max(1, _CHUNK_ELEMENTS // (2 * packed.shape[-1]))
    out_packed, out_scale = torch.empty_like(rows_packed), torch.empty_like(rows_scale)
    for start in range(0, rows_packed.shape[0], step):
        rows = slice(start, start + step)
        values = nvfp4_dequantize(rows_packed[rows], rows_scale[rows], scale_2)
        if not torch.isfinite(values).all():
            raise ValueError("requantize: the member's dequantized weights are not finite (a NaN block scale?)")
        quantized = nvfp4_quantize(values, global_amax, block_size=values.shape[-1] // rows_scale.shape[-1])
        out_packed[rows] = quantized.packed
        out_scale[rows] = quantized.block_scale.to(block_scale.dtype)
    shared = nvfp4_global_scale(global_amax)
    return NVFP4Tensor(out_packed.reshape(packed.shape), out_scale.reshape(block_scale.shape), shared), exact


def dequantize_without_rescaling(
    packed: torch.Tensor, block_scale: torch.Tensor, shared_scale_2: torch.Tensor
) -> torch.Tensor:
    """What an engine computes for a mismatched member: its codes and block scales times the group's scale."""
    return nvfp4_dequantize(packed, block_scale, shared_scale_2)
