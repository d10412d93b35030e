"""The quantization configs ``convert`` reads and writes, for NVFP4 and FP8 per-tensor. Pure: dicts in, dicts out.

modelopt describes a checkpoint in ``hf_quant_config.json`` (``quant_algo`` ``NVFP4`` or
``FP8``, ``exclude_modules`` as shell wildcards) and mirrors it in ``config.json``'s
``quantization_config``; compressed-tensors has only the latter (``config_groups`` of
``weights`` / ``input_activations`` arguments, a ``format`` per kind, ``ignore`` as names or
``re:`` regexes). ``QuantSettings`` is what both say in common; each writer emits the config as
its tool saves it (modelopt's HF export; llm-compressor / compressed-tensors).
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from .formats import Format

__all__ = [
    "CT_FORMATS",
    "QuantSettings",
    "compressed_tensors_config",
    "modelopt_configs",
    "read_quant_settings",
    "translate_ignore",
]

CT_FORMATS = {"NVFP4": "nvfp4-pack-quantized", "FP8": "float-quantized"}
"""Format kind -> compressed-tensors' ``format`` name; modelopt's ``quant_algo`` is the kind itself."""
_BITS = {"NVFP4": 4, "FP8": 8}


@dataclass(frozen=True)
class QuantSettings:
    """What a checkpoint's quantization config says, in terms both layouts share.

    Attributes:
        group_size: elements per block scale (``None``: FP8 per-tensor has no blocks).
        ignore: modules left unquantized: exact names, or patterns in the source's syntax
            (modelopt: shell wildcards; compressed-tensors: ``re:`` regexes).
        kind: ``NVFP4`` or ``FP8`` (per-tensor weights and static per-tensor inputs).
    """

    group_size: int | None
    ignore: tuple[str, ...] = ()
    kind: str = "NVFP4"


def _quant_args(args: object, where: str, kind: str) -> int | None:
    """The group size of one compressed-tensors weights/input entry of ``kind`` (``None`` for FP8)."""
    bits = _BITS[kind]
    if not isinstance(args, dict) or (args.get("num_bits"), args.get("type")) != (bits, "float"):
        raise ValueError(f"convert: {where} is not {kind} ({bits}-bit float): {args!r}")
    if kind == "FP8":  # modelopt's FP8 is one static scale per weight and per input
        if args.get("strategy") not in (None, "tensor"):
            raise ValueError(f"convert: {where} has strategy {args['strategy']!r}; only per-tensor FP8 converts")
        if args.get("dynamic") not in (None, False):
            raise ValueError(f"convert: {where} is dynamic; modelopt's FP8 has static input scales")
        return None
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


def _modelopt_settings(hf_quant_config: dict, where: str, kind: str) -> QuantSettings:
    quantization = hf_quant_config.get("quantization")
    if not isinstance(quantization, dict) or quantization.get("quant_algo") != kind:
        algo = quantization.get("quant_algo") if isinstance(quantization, dict) else None
        raise ValueError(f"convert: {where}: quant_algo is {algo!r}, but the tensors are {kind}")
    if quantization.get("kv_cache_quant_algo") is not None:
        kv_cache = quantization["kv_cache_quant_algo"]
        raise ValueError(f"convert: {where}: a quantized kv cache ({kv_cache}) does not convert")
    size = quantization.get("group_size")
    if kind == "NVFP4" and (not isinstance(size, int) or size <= 0):
        raise ValueError(f"convert: {where}: no valid group_size: {size!r}")
    ignore = _names(quantization.get("exclude_modules"), f"{where}: exclude_modules")
    return QuantSettings(size if kind == "NVFP4" else None, ignore, kind)


def _compressed_tensors_settings(config: dict, where: str, kind: str) -> QuantSettings:
    expected = CT_FORMATS[kind]
    if config.get("format") not in (None, expected):
        raise ValueError(f"convert: {where}: format {config['format']!r} is not {expected!r}")
    if config.get("kv_cache_scheme") is not None:
        raise ValueError(f"convert: {where}: a quantized kv cache (kv_cache_scheme) does not convert")
    groups = config.get("config_groups")
    if not isinstance(groups, dict) or not groups:
        raise ValueError(f"convert: {where}: no config_groups")
    sizes = set()
    for name, group in groups.items():
        if not isinstance(group, dict) or group.get("format", expected) != expected:
            raise ValueError(f"convert: {where}: config group {name!r} is not {expected!r}")
        sizes.add(_quant_args(group.get("weights"), f"{where}: {name}.weights", kind))
        if group.get("input_activations") is None:
            raise ValueError(f"convert: {where}: {name} quantizes weights only; modelopt's {kind} has input scales")
        sizes.add(_quant_args(group["input_activations"], f"{where}: {name}.input_activations", kind))
    if len(sizes) != 1:
        raise ValueError(f"convert: {where}: config groups disagree on group_size: {sorted(sizes)}")
    return QuantSettings(sizes.pop(), _names(config.get("ignore"), f"{where}: ignore"), kind)


def read_quant_settings(fmt: Format, config: dict | None, hf_quant_config: dict | None) -> QuantSettings | None:
    """The quantization settings of a ``fmt`` checkpoint, from its configs (``None``: it has none).

    modelopt's ``hf_quant_config.json`` wins over the ``quantization_config`` of ``config.json``;
    compressed-tensors has only the latter.

    Raises:
        ValueError: the config is not ``fmt.kind`` in ``fmt``'s layout, or has a quantized kv cache.
    """
    section = (config or {}).get("quantization_config")
    if fmt.family == "modelopt":
        if hf_quant_config is not None:
            return _modelopt_settings(hf_quant_config, "hf_quant_config.json", fmt.kind)
        if section is None:
            return None
        algo = {"quant_algo": section.get("quant_algo"), "group_size": _group_size_of(section)}
        exclude = {"exclude_modules": section.get("ignore"), "kv_cache_quant_algo": section.get("kv_cache_quant_algo")}
        return _modelopt_settings({"quantization": {**algo, **exclude}}, "config.json quantization_config", fmt.kind)
    if section is None:
        return None
    if section.get("quant_method") != "compressed-tensors":
        method = section.get("quant_method")
        raise ValueError(f"convert: config.json: quant_method is {method!r}, not compressed-tensors")
    return _compressed_tensors_settings(section, "config.json quantization_config", fmt.kind)


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
    direction = (source.family, target.family)
    for entry in ignore:
        if direction == ("modelopt", "compressed-tensors") and any(char in entry for char in "*?["):
            translated.append("re:" + fnmatch.translate(entry))
        elif direction == ("compressed-tensors", "modelopt") and entry.startswith("re:"):
            pattern = re.compile(entry[3:])  # compressed-tensors matches with re.match
            translated.extend(name for name in modules if pattern.match(name))
        else:
            translated.append(entry)
    return tuple(dict.fromkeys(translated))


def _args(settings: QuantSettings, **extra: object) -> dict:
    args = {"dynamic": False, "num_bits": _BITS[settings.kind], "type": "float"}
    if settings.group_size is not None:
        args["group_size"] = settings.group_size
    return {**args, **extra}


def _ct_group(settings: QuantSettings) -> dict:
    """One compressed-tensors config group for every Linear, as its tools save the kind's preset."""
    if settings.kind == "FP8":  # llm-compressor's FP8 scheme: static per-tensor weights and inputs
        common = {"strategy": "tensor", "symmetric": True}
        weights = _args(settings, observer="memoryless_minmax", **common)
        inputs = _args(settings, observer="static_minmax", **common)
    else:
        common = {"scale_dtype": "torch.float8_e4m3fn", "strategy": "tensor_group", "symmetric": True}
        weights = _args(settings, **common)
        inputs = {**_args(settings, **common), "dynamic": "local", "observer": "static_minmax"}
    return {
        "format": CT_FORMATS[settings.kind],
        "input_activations": inputs,
        "output_activations": None,
        "targets": ["Linear"],
        "weights": weights,
    }


def compressed_tensors_config(settings: QuantSettings) -> dict:
    """``config.json``'s ``quantization_config`` as compressed-tensors writes it (one group, every Linear)."""
    return {
        "config_groups": {"group_0": _ct_group(settings)},
        "format": CT_FORMATS[settings.kind],
        "ignore": list(settings.ignore),
        "kv_cache_scheme": None,
        "quant_method": "compressed-tensors",
        "quantization_status": "compressed",
    }


def modelopt_configs(settings: QuantSettings, producer: Mapping[str, str]) -> tuple[dict, dict]:
    """``hf_quant_config.json`` and ``config.json``'s ``quantization_config`` as modelopt's HF export writes them."""
    quantization = {"quant_algo": settings.kind, "kv_cache_quant_algo": None}
    if settings.group_size is not None:
        quantization["group_size"] = settings.group_size
    quantization["exclude_modules"] = list(settings.ignore)
    args = _args(settings)
    group = {"input_activations": args, "weights": dict(args), "targets": ["Linear"]}
    section = {
        "config_groups": {"group_0": group},
        "ignore": list(settings.ignore),
        "quant_algo": settings.kind,
        "producer": dict(producer),
        "quant_method": "modelopt",
    }
    return {"producer": dict(producer), "quantization": quantization}, section
