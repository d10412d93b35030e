"""Checkpoint formats, one class each, recognised per module from the safetensors header. Pure.

A format says which tensors a member ``<m>`` has (``<m>.<suffix>`` by role), their dtypes,
how its per-tensor scales compare, and how a member is requantized to a shared scale
(``base.Format``). Recognition reads names, dtypes and shapes only, never tensor data,
plus the tool named by the config (``quantization_config.quant_method``, or an
``hf_quant_config.json``) where the header cannot tell (modelopt and compressed-tensors
FP8 share their key names). Each module is recognised on its own, so a checkpoint that
mixes formats per module (FP8 attention, NVFP4 MLP) is read per group.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from ..groups import DEFAULT_PATTERNS, MLA_PATTERN
from .base import Format, join_key, tensor_meta
from .nvfp4 import CompressedTensorsNVFP4, ModeloptNVFP4, QuantizerState, block_size
from .pertensor import FP8Format, INT8Format, PerChannel

__all__ = [
    "COMPRESSED_TENSORS",
    "COMPRESSED_TENSORS_FP8",
    "COMPRESSED_TENSORS_INT8",
    "DEFAULT_PATTERNS",
    "FORMATS",
    "FP8_BLOCK",
    "FP8_PER_CHANNEL",
    "INT8_PER_CHANNEL",
    "MLA_PATTERN",
    "MODELOPT",
    "MODELOPT_FP8",
    "QUANTIZER_STATE",
    "Format",
    "block_size",
    "detect_format",
    "family_from_config",
    "find_formats",
    "find_members",
    "join_key",
]

# DEFAULT_PATTERNS and MLA_PATTERN live in core.groups (the one documented list); re-exported here.

QUANTIZER_STATE = QuantizerState(
    name="quantizer-state", scale="weight_quantizer._global_amax", fallback="weight_quantizer._amax", family="modelopt"
)
MODELOPT = ModeloptNVFP4(
    name="modelopt", scale="weight_scale_2", packed="weight", block_scale="weight_scale",
    input_scale="input_scale", family="modelopt",
)  # fmt: skip
COMPRESSED_TENSORS = CompressedTensorsNVFP4(
    name="compressed-tensors", scale="weight_global_scale", packed="weight_packed", block_scale="weight_scale",
    input_scale="input_global_scale", reciprocal=True, family="compressed-tensors",
)  # fmt: skip
_PER_TENSOR = {"scale": "weight_scale", "packed": "weight", "input_scale": "input_scale"}
MODELOPT_FP8 = FP8Format(name="modelopt-fp8", kind="FP8", family="modelopt", **_PER_TENSOR)
COMPRESSED_TENSORS_FP8 = FP8Format(
    name="compressed-tensors-fp8", kind="FP8", family="compressed-tensors", **_PER_TENSOR
)
COMPRESSED_TENSORS_INT8 = INT8Format(
    name="compressed-tensors-int8", kind="INT8", family="compressed-tensors", **_PER_TENSOR
)
FP8_PER_CHANNEL = PerChannel(name="fp8-per-channel", kind="FP8", per_tensor=False, **_PER_TENSOR)
FP8_BLOCK = PerChannel(
    name="fp8-block", kind="FP8", per_tensor=False, **{**_PER_TENSOR, "scale": "weight_scale_inv"}
)
INT8_PER_CHANNEL = PerChannel(name="int8-per-channel", kind="INT8", per_tensor=False, **_PER_TENSOR)

# Tried in order, the first that claims a module wins: the NVFP4 layouts name themselves by a
# key of their own; FP8 and INT8 share names and are told apart by dtypes and shapes.
FORMATS: tuple[Format, ...] = (
    QUANTIZER_STATE, COMPRESSED_TENSORS, MODELOPT, COMPRESSED_TENSORS_INT8, INT8_PER_CHANNEL,
    MODELOPT_FP8, COMPRESSED_TENSORS_FP8, FP8_PER_CHANNEL, FP8_BLOCK,
)  # fmt: skip
# Keys only one NVFP4 layout has: a module holding those of two layouts is refused.
_OWN_KEYS = {
    QUANTIZER_STATE.name: (QUANTIZER_STATE.scale, QUANTIZER_STATE.fallback),
    MODELOPT.name: (MODELOPT.scale,),
    COMPRESSED_TENSORS.name: (COMPRESSED_TENSORS.scale, COMPRESSED_TENSORS.packed, COMPRESSED_TENSORS.input_scale),
}
_IDENTIFYING = tuple(dict.fromkeys(suffix for fmt in FORMATS for suffix in fmt.identifying))
_SUFFIXES = tuple(
    sorted(
        {s for fmt in FORMATS for s in (fmt.scale, fmt.fallback, fmt.packed, fmt.block_scale, fmt.input_scale) if s},
        key=len,
        reverse=True,
    )
)


def _member_of(key: str, suffixes: tuple[str, ...]) -> tuple[str, str] | None:
    """``(module, suffix)`` when ``key`` is ``<module>.<suffix>`` for one of ``suffixes`` (``""``: the root)."""
    for suffix in suffixes:
        if key == suffix:
            return "", suffix
        if key.endswith(suffix) and key[-len(suffix) - 1] == ".":
            return key[: -len(suffix) - 1], suffix
    return None


def family_from_config(config: Mapping[str, Any] | None, hf_quant_config: Mapping[str, Any] | None = None) -> str | None:
    """The tool that wrote a checkpoint, from its ``config.json`` and ``hf_quant_config.json`` (``None``: unsaid)."""
    quantization = (config or {}).get("quantization_config")
    method = quantization.get("quant_method") if isinstance(quantization, Mapping) else None
    if method in ("compressed-tensors", "modelopt"):
        return method
    return "modelopt" if hf_quant_config is not None else None


def _modules(header: Iterable[str] | Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """Module -> {suffix: (dtype, shape) or None}, for modules holding an identifying key."""
    metas = header if isinstance(header, Mapping) else dict.fromkeys(header)
    modules: dict[str, dict[str, Any]] = {}
    for key, entry in metas.items():
        if key.endswith(_SUFFIXES):  # one C call filters the bulk of the keys
            found = _member_of(key, _SUFFIXES)
            if found is not None:
                modules.setdefault(found[0], {})[found[1]] = tensor_meta(entry)
    return {fqn: entries for fqn, entries in modules.items() if any(s in entries for s in _IDENTIFYING) or _fp8(entries)}


def _fp8(entries: Mapping[str, Any]) -> bool:
    """A float8 weight is quantized whatever scale keys survive beside it."""
    meta = entries.get("weight")
    return meta is not None and meta[0] == "F8_E4M3"


def find_formats(header: Iterable[str] | Mapping[str, Any], family: str | None = None) -> dict[str, Format]:
    """Each quantized module's format, in key order.

    Args:
        header: the checkpoint's keys, or key -> header entry (``dtype`` name and ``shape``,
            as a safetensors header gives them); with names alone, dtypes are not used.
        family: the tool named by the config (``family_from_config``), if any.

    Raises:
        ValueError: a module holds keys of two NVFP4 layouts (named with an example key of each).
    """
    found = {}
    for fqn, entries in _modules(header).items():
        own = [name for name, keys in _OWN_KEYS.items() if any(key in entries for key in keys if key)]
        if len(own) > 1:
            raise ValueError(f"find_formats: {fqn!r} has keys of more than one format: {', '.join(own)}")
        fmt = next((fmt for fmt in FORMATS if fmt.claims(entries, family)), None)
        if fmt is not None:
            found[fqn] = fmt
    return found


def detect_format(keys: Iterable[str] | Mapping[str, Any], family: str | None = None) -> Format:
    """The one format of a checkpoint's quantized modules.

    Raises:
        ValueError: no known format, or modules of several (the message names an example
            module of each; ``find_formats`` reads such a checkpoint per module).
    """
    formats = find_formats(keys, family)
    if not formats:
        expected = ", ".join(dict.fromkeys(f"'*.{fmt.scale}'" for fmt in FORMATS))
        raise ValueError(f"detect_format: no key of a known quantized format; expected keys ending in {expected}")
    examples = {fmt.name: fqn for fqn, fmt in reversed(formats.items())}
    if len(examples) > 1:
        listing = ", ".join(f"{name} (e.g. {fqn!r})" for name, fqn in reversed(examples.items()))
        raise ValueError(f"detect_format: modules of more than one format: {listing}")
    return next(iter(formats.values()))


def find_members(keys: Iterable[str], fmt: Format) -> tuple[str, ...]:
    """FQNs of the modules that carry ``fmt``'s identifying keys, in key order, each once (names only)."""
    members: dict[str, None] = {}
    suffixes = fmt.identifying
    for key in keys:
        if key.endswith(suffixes):
            found = _member_of(key, suffixes)
            if found is not None:
                members.setdefault(found[0], None)
    return tuple(members)
