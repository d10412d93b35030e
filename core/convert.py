"""Conversion between the modelopt and compressed-tensors NVFP4 layouts. Pure: names, scales, configs in; new ones out.

The two layouts hold the same numbers under other names (``core.formats``): the packed
codes and the float8 block scales are copied as they are, and the per-tensor scales are
stored as reciprocals (``weight_global_scale = 1 / weight_scale_2``, ``input_global_scale
= 1 / input_scale``). Each library writes its per-tensor scales in its own shape: modelopt's
HF export a 0-d tensor, compressed-tensors' ``initialize`` a tensor of shape ``(1,)``.

A correctly rounded reciprocal does not always invert: in fp32 ``1 / (1 / x)`` can land one
ulp from ``x`` (both directions lose information somewhere in each binade). The converted
value is always the correctly rounded reciprocal, what each library and engine computes;
where converting it back would not give the source bytes, the source bytes are recorded in
the shard's safetensors metadata under ``ORIGINALS_KEY``, and a later conversion back
restores them when the stored reciprocal still matches. So A -> B -> A is byte for byte,
and the members whose plain inverse is off are listed with the relative error.
"""

from __future__ import annotations

import fnmatch
import json
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import torch

from .formats import COMPRESSED_TENSORS, MODELOPT, Format, find_members
from .groups import join_fqn

__all__ = [
    "LAYOUTS",
    "ORIGINALS_KEY",
    "ConvertedScale",
    "QuantSettings",
    "compressed_tensors_config",
    "convert_scale",
    "find_renames",
    "modelopt_configs",
    "read_originals",
    "read_quant_settings",
    "translate_ignore",
    "write_originals",
]

LAYOUTS: dict[str, Format] = {MODELOPT.name: MODELOPT, COMPRESSED_TENSORS.name: COMPRESSED_TENSORS}
SCALE_SHAPES: dict[str, tuple[int, ...]] = {MODELOPT.name: (), COMPRESSED_TENSORS.name: (1,)}
ORIGINALS_KEY = "sharedquant.convert.originals"
"""Shard metadata: target key -> [shape, hex bytes] of a source scale whose reciprocal does not invert."""
_ROLES = ("packed", "block_scale", "scale", "input_scale")
CT_FORMAT = "nvfp4-pack-quantized"


def find_renames(keys: Iterable[str], source: Format, target: Format) -> dict[str, str]:
    """Old key -> new key for every tensor of every NVFP4 member of ``source``; other keys keep their names.

    Raises:
        ValueError: a member lacks its packed codes or block scales, a scale belongs to no
            NVFP4 member (FP8 layers, kv-cache scales), or a new name is already taken.
    """
    keys = list(keys)
    present = set(keys)
    renames: dict[str, str] = {}
    for fqn in find_members(keys, source):
        for role in _ROLES:
            old = join_fqn(fqn, getattr(source, role))
            if old in present:
                renames[old] = join_fqn(fqn, getattr(target, role))
            elif role in ("packed", "block_scale"):
                raise ValueError(f"convert: {fqn!r} has {source.scale} but no {getattr(source, role)}")
    taken = present - renames.keys()
    # a scale of a module that is not an NVFP4 member (FP8, a kv cache) would keep a name the target misreads
    stray = {getattr(fmt, role) for fmt in LAYOUTS.values() for role in _ROLES[1:]} | {"k_scale", "v_scale"}
    strays = [key for key in taken if key.rpartition(".")[2] in stray]
    if strays:
        first = sorted(strays)[0]
        raise ValueError(f"convert: {first!r} is a quantization scale outside any NVFP4 member; only NVFP4 converts")
    clashes = sorted(new for new in renames.values() if new in taken)
    if clashes:
        raise ValueError(f"convert: the {target.name} name {clashes[0]!r} is already taken by another tensor")
    return renames


@dataclass(frozen=True)
class ConvertedScale:
    """One per-tensor scale in the target layout.

    Attributes:
        tensor: the value to store (the reciprocal, or a recorded original restored).
        record: ``(shape, hex bytes)`` of the source tensor to record in the shard metadata
            (``None``: converting ``tensor`` back gives the source bytes as they are).
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


def _hex(tensor: torch.Tensor) -> str:
    return tensor.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes().hex()


def _from_hex(record: tuple[list[int], str], like: torch.Tensor) -> torch.Tensor:
    shape, data = record
    return torch.frombuffer(bytearray(bytes.fromhex(data)), dtype=torch.uint8).view(like.dtype).reshape(shape).clone()


def convert_scale(
    key: str, value: torch.Tensor, source: Format, target: Format, original: tuple[list[int], str] | None = None
) -> ConvertedScale:
    """A per-tensor scale of ``source`` in ``target``'s convention: the reciprocal, in ``target``'s shape.

    Args:
        key: the source key, for messages.
        value: the stored scale (one positive finite float).
        source, target: the layouts.
        original: the record a previous conversion left for this tensor, if any: it is restored
            when its reciprocal is exactly ``value`` (nothing has changed the scale since).

    Raises:
        ValueError: not one positive finite float, or one whose reciprocal overflows its dtype.
    """
    if value.numel() != 1 or not value.dtype.is_floating_point or not 0 < value.double().item() < math.inf:
        got = value.item() if value.numel() == 1 else f"{value.dtype} of shape {list(value.shape)}"
        raise ValueError(f"convert: {key!r} should hold one positive finite float scale, got {got!r}")
    if original is not None:
        try:
            restored = _from_hex(original, value)
            if _hex(_reciprocal(restored, value.shape)) == _hex(value):
                return ConvertedScale(restored, restored=True)
        except (TypeError, ValueError, RuntimeError):
            pass  # a record that does not parse is not this tensor's: convert plainly
    converted = _reciprocal(value, SCALE_SHAPES[target.name])
    if not 0 < converted.double().item() < math.inf:
        raise ValueError(f"convert: the reciprocal of {key!r} is not a positive finite {value.dtype}")
    back = _reciprocal(converted, value.shape)
    if _hex(back) == _hex(value) and tuple(value.shape) == SCALE_SHAPES[source.name]:
        return ConvertedScale(converted)
    error = abs(back.double().item() - value.double().item()) / value.double().item()
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


@dataclass(frozen=True)
class QuantSettings:
    """What a checkpoint's quantization config says, in terms both layouts share.

    Attributes:
        group_size: elements per block scale.
        ignore: modules left unquantized: exact names, or patterns in the source's syntax
            (modelopt: shell wildcards; compressed-tensors: ``re:`` regexes).
    """

    group_size: int
    ignore: tuple[str, ...] = ()


def _nvfp4_args(args: object, where: str) -> int:
    """The group size of one compressed-tensors weights/input entry that is NVFP4."""
    if not isinstance(args, dict) or (args.get("num_bits"), args.get("type")) != (4, "float"):
        raise ValueError(f"convert: {where} is not NVFP4 (4-bit float): {args!r}")
    size = args.get("group_size")
    if not isinstance(size, int) or size <= 0:
        raise ValueError(f"convert: {where} has no valid group_size: {size!r}")
    return size


def _names(values: object, where: str) -> tuple[str, ...]:
    if values is None:
        return ()
    if not isinstance(values, list) or not all(isinstance(value, str) for value in values):
        raise ValueError(f"convert: {where} should be a list of module names, got {values!r}")
    return tuple(values)


def _modelopt_settings(hf_quant_config: dict, where: str) -> QuantSettings:
    quantization = hf_quant_config.get("quantization")
    if not isinstance(quantization, dict) or quantization.get("quant_algo") != "NVFP4":
        algo = quantization.get("quant_algo") if isinstance(quantization, dict) else None
        raise ValueError(f"convert: {where}: quant_algo is {algo!r}; only NVFP4 converts (FP8 comes later)")
    if quantization.get("kv_cache_quant_algo") is not None:
        kv_cache = quantization["kv_cache_quant_algo"]
        raise ValueError(f"convert: {where}: a quantized kv cache ({kv_cache}) does not convert")
    size = quantization.get("group_size")
    if not isinstance(size, int) or size <= 0:
        raise ValueError(f"convert: {where}: no valid group_size: {size!r}")
    return QuantSettings(size, _names(quantization.get("exclude_modules"), f"{where}: exclude_modules"))


def _compressed_tensors_settings(config: dict, where: str) -> QuantSettings:
    if config.get("format") not in (None, CT_FORMAT):
        raise ValueError(f"convert: {where}: format {config['format']!r} is not {CT_FORMAT!r}")
    if config.get("kv_cache_scheme") is not None:
        raise ValueError(f"convert: {where}: a quantized kv cache (kv_cache_scheme) does not convert")
    groups = config.get("config_groups")
    if not isinstance(groups, dict) or not groups:
        raise ValueError(f"convert: {where}: no config_groups")
    sizes = set()
    for name, group in groups.items():
        if not isinstance(group, dict) or group.get("format", CT_FORMAT) != CT_FORMAT:
            raise ValueError(f"convert: {where}: config group {name!r} is not {CT_FORMAT!r}")
        sizes.add(_nvfp4_args(group.get("weights"), f"{where}: {name}.weights"))
        if group.get("input_activations") is None:
            raise ValueError(f"convert: {where}: {name} quantizes weights only; modelopt's NVFP4 has input scales")
        sizes.add(_nvfp4_args(group["input_activations"], f"{where}: {name}.input_activations"))
    if len(sizes) != 1:
        raise ValueError(f"convert: {where}: config groups disagree on group_size: {sorted(sizes)}")
    return QuantSettings(sizes.pop(), _names(config.get("ignore"), f"{where}: ignore"))


def read_quant_settings(fmt: Format, config: dict | None, hf_quant_config: dict | None) -> QuantSettings | None:
    """The quantization settings of a ``fmt`` checkpoint, from its configs (``None``: it has none).

    modelopt's ``hf_quant_config.json`` wins over the ``quantization_config`` of ``config.json``;
    compressed-tensors has only the latter.

    Raises:
        ValueError: the config is not NVFP4 in ``fmt``'s layout, or has a quantized kv cache.
    """
    section = (config or {}).get("quantization_config")
    if fmt.name == MODELOPT.name:
        if hf_quant_config is not None:
            return _modelopt_settings(hf_quant_config, "hf_quant_config.json")
        if section is None:
            return None
        algo = {"quant_algo": section.get("quant_algo"), "group_size": _group_size_of(section)}
        exclude = {"exclude_modules": section.get("ignore"), "kv_cache_quant_algo": section.get("kv_cache_quant_algo")}
        return _modelopt_settings({"quantization": {**algo, **exclude}}, "config.json quantization_config")
    if section is None:
        return None
    if section.get("quant_method") != "compressed-tensors":
        method = section.get("quant_method")
        raise ValueError(f"convert: config.json: quant_method is {method!r}, not compressed-tensors")
    return _compressed_tensors_settings(section, "config.json quantization_config")


def _group_size_of(section: dict) -> int | None:
    groups = section.get("config_groups")
    if isinstance(groups, dict):
        for group in groups.values():
            if isinstance(group, dict) and isinstance(group.get("weights"), dict):
                return group["weights"].get("group_size")
    return None


def translate_ignore(ignore: Sequence[str], source: Format, target: Format, modules: Sequence[str]) -> tuple[str, ...]:
    """The ignore list in ``target``'s syntax; exact names pass through.

    modelopt's shell wildcards become ``re:`` regexes with the same matches; a ``re:`` regex
    (which no wildcard can express in general) becomes the names of ``modules`` it matches.
    """
    translated: list[str] = []
    direction = (source.name, target.name)
    for entry in ignore:
        if direction == (MODELOPT.name, COMPRESSED_TENSORS.name) and any(char in entry for char in "*?["):
            translated.append("re:" + fnmatch.translate(entry))
        elif direction == (COMPRESSED_TENSORS.name, MODELOPT.name) and entry.startswith("re:"):
            pattern = re.compile(entry[3:])  # compressed-tensors matches with re.match
            translated.extend(name for name in modules if pattern.match(name))
        else:
            translated.append(entry)
    return tuple(dict.fromkeys(translated))


def _args(group_size: int, **extra: object) -> dict:
    return {"dynamic": False, "num_bits": 4, "type": "float", "group_size": group_size, **extra}


def compressed_tensors_config(settings: QuantSettings) -> dict:
    """``config.json``'s ``quantization_config`` as compressed-tensors writes it for NVFP4 (one group, every Linear)."""
    common = {"scale_dtype": "torch.float8_e4m3fn", "strategy": "tensor_group", "symmetric": True}
    group = {
        "format": CT_FORMAT,
        "input_activations": {**_args(settings.group_size, **common), "dynamic": "local", "observer": "static_minmax"},
        "output_activations": None,
        "targets": ["Linear"],
        "weights": _args(settings.group_size, **common),
    }
    return {
        "config_groups": {"group_0": group},
        "format": CT_FORMAT,
        "ignore": list(settings.ignore),
        "kv_cache_scheme": None,
        "quant_method": "compressed-tensors",
        "quantization_status": "compressed",
    }


def modelopt_configs(settings: QuantSettings, producer: Mapping[str, str]) -> tuple[dict, dict]:
    """``hf_quant_config.json`` and ``config.json``'s ``quantization_config`` as modelopt's HF export writes them."""
    hf_quant_config = {
        "producer": dict(producer),
        "quantization": {
            "quant_algo": "NVFP4",
            "kv_cache_quant_algo": None,
            "group_size": settings.group_size,
            "exclude_modules": list(settings.ignore),
        },
    }
    args = _args(settings.group_size)
    group = {"input_activations": args, "weights": dict(args), "targets": ["Linear"]}
    section = {
        "config_groups": {"group_0": group},
        "ignore": list(settings.ignore),
        "quant_algo": "NVFP4",
        "producer": dict(producer),
        "quant_method": "modelopt",
    }
    return hf_quant_config, section
