"""Configuration helpers. Pure: dicts in, new dicts or pattern lists out.

``shared_states`` is the calibration knob that names each shared state and its
grouping patterns: ``{"weight_global_amax": {"patterns": [...]}}``. Omitted patterns
mean the state's defaults; an empty list disables grouping. It is validated as a
whole before anything uses it, so a typo fails at parse time, not after calibration.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from .groups import compile_patterns

__all__ = ["SHARED_STATE_NAMES", "resolve_patterns", "update_quant_cfg_with_kv_cache_quant", "validate_shared_states"]

SHARED_STATE_NAMES: tuple[str, ...] = ("weight_global_amax",)
_FIELDS = ("patterns",)


def validate_shared_states(shared_states: Mapping[str, Mapping[str, Sequence[str]]] | None) -> None:
    """Refuse unknown state names, unknown fields and invalid regexes.

    Raises:
        TypeError: the config or an entry is not a mapping, or patterns is a bare string.
        ValueError: an unknown state or field, or an invalid regex; the message names it.
    """
    if shared_states is None:
        return
    if not isinstance(shared_states, Mapping):
        raise TypeError(f"shared_states must be a mapping of state name to config, got {type(shared_states).__name__}")
    unknown = sorted(set(shared_states) - set(SHARED_STATE_NAMES))
    if unknown:
        raise ValueError(f"shared_states: unknown state(s) {unknown}; expected keys from {list(SHARED_STATE_NAMES)}")
    for name, entry in shared_states.items():
        if not isinstance(entry, Mapping):
            raise TypeError(f"shared_states[{name!r}] must be a mapping like {{'patterns': [...]}}, got {entry!r}")
        extra = sorted(set(entry) - set(_FIELDS))
        if extra:
            raise ValueError(f"shared_states[{name!r}]: unknown field(s) {extra}; expected {list(_FIELDS)}")
        if "patterns" in entry:
            compile_patterns(entry["patterns"], where=f"shared_states[{name!r}]['patterns']")


def resolve_patterns(
    shared_states: Mapping[str, Mapping[str, Sequence[str]]] | None,
    name: str,
    default_patterns: Sequence[str],
) -> list[str]:
    """The grouping patterns of state ``name``: its configured ones, else ``default_patterns``.

    Raises:
        TypeError, ValueError: as ``validate_shared_states``.
    """
    validate_shared_states(shared_states)
    entry = (shared_states or {}).get(name, {})
    return list(entry.get("patterns", default_patterns))


def update_quant_cfg_with_kv_cache_quant(quant_cfg: dict[str, Any], kv_cache_quant_cfg: list) -> dict[str, Any]:
    """A deep copy of ``quant_cfg`` with the KV-cache entries appended to ``quant_cfg["quant_cfg"]``.

    An empty or missing inner list starts from ``[{"quantizer_name": "*", "enable": False}]``
    (quantize only the KV cache); a missing or empty ``"algorithm"`` becomes ``"max"``.

    Args:
        quant_cfg: the outer config, with ``"quant_cfg"`` and ``"algorithm"`` keys.
        kv_cache_quant_cfg: the KV-cache quantizer entries (a list of dicts).

    Returns:
        The new config; neither argument is modified.

    Raises:
        TypeError: ``quant_cfg`` is not a mapping, or either list of entries is not a
            list (e.g. the legacy ``{pattern: cfg}`` dict format, whose keys would
            otherwise be appended as if they were entries).
    """
    fn = "update_quant_cfg_with_kv_cache_quant"
    if not isinstance(quant_cfg, Mapping):
        raise TypeError(f"{fn}: quant_cfg must be a mapping with 'quant_cfg' and 'algorithm', got {type(quant_cfg).__name__}")
    if isinstance(kv_cache_quant_cfg, (Mapping, str)) or not isinstance(kv_cache_quant_cfg, Iterable):
        raise TypeError(
            f"{fn}: kv_cache_quant_cfg must be a list of quantizer entries (e.g. kv_cfg['quant_cfg']), "
            f"got {type(kv_cache_quant_cfg).__name__}"
        )
    updated = copy.deepcopy(quant_cfg)
    inner = updated.get("quant_cfg") or [{"quantizer_name": "*", "enable": False}]
    if not isinstance(inner, (list, tuple)):
        raise TypeError(f"{fn}: quant_cfg['quant_cfg'] must be a list of quantizer entries, got {type(inner).__name__}")
    updated["quant_cfg"] = list(inner) + copy.deepcopy(list(kv_cache_quant_cfg))
    if not updated.get("algorithm"):
        updated["algorithm"] = "max"
    return updated
