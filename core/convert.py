"""Conversion between the modelopt and compressed-tensors layouts of NVFP4 and of FP8 per-tensor checkpoints.

Pure: names and scales in, new ones out (the configs are ``core.convert_configs``'s).

The two layouts of a kind hold the same numbers, under other names for NVFP4
(``core.formats``): quantized weights and float8 block scales are copied as they are. NVFP4's
per-tensor scales are stored as reciprocals in compressed-tensors (``weight_global_scale =
1 / weight_scale_2``, ``input_global_scale = 1 / input_scale``); FP8's ``weight_scale`` and
``input_scale`` mean the same in both and keep their values. Each library writes its
per-tensor scales in its own shape: modelopt's HF export a 0-d tensor, compressed-tensors'
``initialize`` a tensor of shape ``(1,)``.

A correctly rounded reciprocal does not always invert: in fp32 ``1 / (1 / x)`` can land one
ulp from ``x`` (both directions lose information somewhere in each binade). The converted
value is always the correctly rounded reciprocal, what each library and engine computes;
where converting it back would not give the source bytes (or shape), the source is recorded in
the shard's safetensors metadata under ``ORIGINALS_KEY``, and a later conversion back
restores it when the stored value still matches. So A -> B -> A is byte for byte,
and the members whose plain inverse is off are listed with the relative error.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import torch

from .convert_configs import (  # re-exported: the configs are part of this module's interface
    QuantSettings,
    compressed_tensors_config,
    modelopt_configs,
    read_quant_settings,
    translate_ignore,
)
from .formats import COMPRESSED_TENSORS, COMPRESSED_TENSORS_FP8, MODELOPT, MODELOPT_FP8, Format, find_members
from .groups import join_fqn

__all__ = [
    "LAYOUTS",
    "ORIGINALS_KEY",
    "PAIRS",
    "ConvertedScale",
    "QuantSettings",
    "compressed_tensors_config",
    "convert_scale",
    "find_renames",
    "find_target",
    "modelopt_configs",
    "read_originals",
    "read_quant_settings",
    "translate_ignore",
    "write_originals",
]

LAYOUTS: dict[str, Format] = {MODELOPT.name: MODELOPT, COMPRESSED_TENSORS.name: COMPRESSED_TENSORS}
"""The ``--to`` names, each the NVFP4 layout of that tool."""
PAIRS: dict[str, dict[str, Format]] = {
    "NVFP4": LAYOUTS,
    "FP8": {MODELOPT.name: MODELOPT_FP8, COMPRESSED_TENSORS.name: COMPRESSED_TENSORS_FP8},
}
"""Format kind -> ``--to`` name -> that tool's layout of the kind: the formats that convert."""
SCALE_SHAPES: dict[str, tuple[int, ...]] = {"modelopt": (), "compressed-tensors": (1,)}
"""Tool (``Format.family``) -> the shape its export gives a per-tensor scale."""
ORIGINALS_KEY = "sharedquant.convert.originals"
"""Shard metadata: target key -> [shape, hex bytes] of a source scale the plain conversion back would not restore."""
_ROLES = ("packed", "block_scale", "scale", "input_scale")
_WHY_NOT = {
    "INT8": "modelopt exports INT8 only with a scale per output channel: no per-tensor layout to convert to",
    "FP8": "only FP8 with one weight scale per tensor converts, not a scale per channel or per block",
}


def find_target(source: Format, to: str) -> Format:
    """The layout ``to`` of ``source``'s kind.

    Raises:
        ValueError: ``to`` is unknown, ``source`` is already in it, or ``source`` is no
            format that converts (per-channel or block FP8, INT8, calibration state); the
            message is worded to follow the checkpoint's name.
    """
    if to not in LAYOUTS:
        raise ValueError(f"unknown layout {to!r}; expected one of {', '.join(LAYOUTS)}")
    pair = PAIRS.get(source.kind, {})
    if source not in pair.values():
        why = _WHY_NOT.get(source.kind, "only packed NVFP4 and per-tensor FP8 weights convert")
        raise ValueError(f"holds {source.name} ({source.kind}); {why}")
    if pair[to] == source:
        raise ValueError(f"already in the {to} layout; nothing to convert")
    return pair[to]


def find_renames(keys: Iterable[str], source: Format, target: Format) -> dict[str, str]:
    """Old key -> new key for every tensor of every member of ``source``; other keys keep their names.

    Raises:
        ValueError: a member lacks its quantized weight or block scales, a scale belongs to no
            member (a kv-cache scale, a module of another format), or a new name is already taken.
    """
    keys = list(keys)
    present = set(keys)
    renames: dict[str, str] = {}
    roles = [role for role in _ROLES if getattr(source, role) is not None]
    for fqn in find_members(keys, source):
        for role in roles:
            old = join_fqn(fqn, getattr(source, role))
            if old in present:
                renames[old] = join_fqn(fqn, getattr(target, role))
            elif role in ("packed", "block_scale"):
                raise ValueError(f"convert: {fqn!r} has {source.scale} but no {getattr(source, role)}")
    taken = present - renames.keys()
    # a scale of a module that is no member (another format, a kv cache) would keep a name the target misreads
    layouts = [fmt for pair in PAIRS.values() for fmt in pair.values()]
    stray = {getattr(fmt, role) for fmt in layouts for role in _ROLES[1:]} - {None} | {"k_scale", "v_scale"}
    strays = [key for key in taken if key.rpartition(".")[2] in stray]
    if strays:
        first = sorted(strays)[0]
        outside = f"a quantization scale outside any {source.kind} member"
        raise ValueError(f"convert: {first!r} is {outside}; it would not convert")
    clashes = sorted(new for new in renames.values() if new in taken)
    if clashes:
        raise ValueError(f"convert: the {target.family} name {clashes[0]!r} is already taken by another tensor")
    return renames


@dataclass(frozen=True)
class ConvertedScale:
    """One per-tensor scale in the target layout.

    Attributes:
        tensor: the value to store (the reciprocal, or the value reshaped where neither layout
            inverts, or a recorded original restored).
        record: ``(shape, hex bytes)`` of the source tensor to record in the shard metadata
            (``None``: converting ``tensor`` back gives the source bytes and shape as they are).
        relative_error: ``|1 / tensor - source| / source`` in the source dtype, when that is
            not zero (the plain inverse's error, which the record makes good).
        restored: ``tensor`` is the recorded original, not a reciprocal.
    """

    tensor: torch.Tensor
    record: tuple[list[int], str] | None = None
    relative_error: float = 0.0
    restored: bool = False


def _reciprocal(value: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    # an fp64 quotient rounded once more to fp32/fp16/bf16 is the correctly rounded quotient
    # (53 >= 2 * 24 + 2 bits), so this is the reciprocal every library computes in its dtype
    return (1.0 / value.double()).to(value.dtype).reshape(tuple(shape))


def _reshaped(value: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    return value.reshape(tuple(shape))


def _valid(scale: torch.Tensor, zero_allowed: bool) -> bool:
    """Positive and finite; zero too where nothing is inverted (an FP8 scale of an all-zero weight)."""
    value = scale.double().item()
    return (0 < value or (zero_allowed and value == 0)) and value < math.inf


def _hex(tensor: torch.Tensor) -> str:
    return tensor.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes().hex()


def _from_hex(record: tuple[list[int], str], like: torch.Tensor) -> torch.Tensor:
    shape, data = record
    return torch.frombuffer(bytearray(bytes.fromhex(data)), dtype=torch.uint8).view(like.dtype).reshape(shape).clone()


def convert_scale(
    key: str, value: torch.Tensor, source: Format, target: Format, original: tuple[list[int], str] | None = None
) -> ConvertedScale:
    """A per-tensor scale of ``source`` in ``target``'s convention and shape (a reciprocal where one of them is).

    Args:
        key: the source key, for messages.
        value: the stored scale (one positive finite float; zero too where nothing is inverted).
        source, target: the layouts.
        original: the record a previous conversion left for this tensor, if any: it is restored
            when converting it gives exactly ``value`` (nothing has changed the scale since).

    Raises:
        ValueError: not one positive finite float, or one whose reciprocal overflows its dtype.
    """
    mapped = _reciprocal if source.reciprocal != target.reciprocal else _reshaped
    if value.numel() != 1 or not value.dtype.is_floating_point or not _valid(value, mapped is _reshaped):
        got = value.item() if value.numel() == 1 else f"{value.dtype} of shape {list(value.shape)}"
        raise ValueError(f"convert: {key!r} should hold one positive finite float scale, got {got!r}")
    if original is not None:
        try:
            restored = _from_hex(original, value)
            if _hex(mapped(restored, value.shape)) == _hex(value):
                return ConvertedScale(restored, restored=True)
        except (TypeError, ValueError, RuntimeError):
            pass  # a record that does not parse is not this tensor's: convert plainly
    converted = mapped(value, SCALE_SHAPES[target.family])
    if not _valid(converted, mapped is _reshaped):
        raise ValueError(f"convert: the reciprocal of {key!r} is not a positive finite {value.dtype}")
    back = mapped(converted, value.shape)
    if _hex(back) == _hex(value) and tuple(value.shape) == SCALE_SHAPES[source.family]:
        return ConvertedScale(converted)
    error = abs(back.double().item() - value.double().item()) / (value.double().item() or 1.0)
    return ConvertedScale(converted, (list(value.shape), _hex(value)), error)


def read_originals(metadata: object, where: str) -> dict[str, tuple[list[int], str]]:
    """The records of ``ORIGINALS_KEY`` in a shard's metadata (``where`` names the shard in errors).

    Raises:
        ValueError: the entry is not the JSON object this module writes.
    """
    if metadata is not None and not isinstance(metadata, Mapping):
        raise ValueError(f"convert: {where}: the safetensors __metadata__ is not an object: {metadata!r}")
    text = (metadata or {}).get(ORIGINALS_KEY)
    if text is None:
        return {}
    try:
        records = json.loads(text)
        if not isinstance(records, dict):
            raise ValueError("not an object")
        return {key: (list(shape), str(data)) for key, (shape, data) in records.items()}
    except (ValueError, TypeError) as err:
        raise ValueError(f"convert: {where}: metadata {ORIGINALS_KEY!r} is not valid: {err}") from err


def write_originals(
    metadata: Mapping[str, str] | None, records: Mapping[str, tuple[list[int], str]]
) -> dict[str, str] | None:
    """A shard's metadata with the old records dropped and ``records`` added (``None`` stays ``None`` when empty)."""
    kept = {key: value for key, value in (metadata or {}).items() if key != ORIGINALS_KEY}
    if records:
        kept[ORIGINALS_KEY] = json.dumps({key: list(record) for key, record in records.items()}, separators=(",", ":"))
    return kept if kept or metadata is not None else None
