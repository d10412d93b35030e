"""State dict -> state dict transforms. Pure: the input dict and its tensors are never written.

``unify_state_dict`` is the whole lifecycle with no module anywhere: find the
quantized modules from the keys, group them by pattern, finalize, and write every
member's ``_global_amax``. It is what the peer's populate + NVFP4 promotion leave in
a state dict, computed in a handful of kernels.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from .groups import SHARED_PATTERNS, find_groups
from .lifecycle import AMAX, global_amax_entries

__all__ = ["find_quantized", "global_amax_entries", "unify_state_dict"]


def find_quantized(keys, quantizer: str = "weight_quantizer") -> tuple[str, ...]:
    """FQNs of the modules whose ``<quantizer>._amax`` appears among ``keys``, in key order."""
    root = f"{quantizer}.{AMAX}"
    suffix, cut = f".{root}", -len(root) - 1
    # a list comprehension, not a generator: no frame switch per key
    return tuple([key[:cut] if key != root else "" for key in keys if key.endswith(suffix) or key == root])


def _check_non_negative(state_dict: Mapping[str, torch.Tensor], keys: Sequence[str]) -> None:
    """Refuse a negative ``_amax``, naming its key; one pass over all of them when they concatenate."""
    tensors = [state_dict[key] for key in keys]
    if not tensors or torch.compiler.is_compiling() or not all(isinstance(t, torch.Tensor) for t in tensors):
        return  # wrong types are finalize's to name
    try:
        if not bool(torch.cat([t.reshape(-1) for t in tensors]).lt(0).any()):
            return
    except RuntimeError:  # several devices, dtypes that do not concatenate, float8: look one by one
        pass
    for key, tensor in zip(keys, tensors):
        if tensor.is_floating_point() and tensor.element_size() == 1:
            tensor = tensor.float()  # torch has no float8 comparison kernel
        if tensor.numel() and not tensor.is_meta and bool(tensor.lt(0).any()):
            low = tensor.min().item()
            raise ValueError(f"unify_state_dict: {key!r} holds a negative amax ({low}); an amax is a magnitude")


def unify_state_dict(
    state_dict: Mapping[str, torch.Tensor],
    patterns: Sequence[str] | None = SHARED_PATTERNS,
    *,
    quantizer: str = "weight_quantizer",
) -> dict[str, torch.Tensor]:
    """Give every ``<fqn>.<quantizer>._amax`` a ``<fqn>.<quantizer>._global_amax``.

    Grouped members get their group's max; every other quantized module its own amax
    (fp32, rounded up). Existing ``_global_amax`` entries are replaced, so applying the
    transform twice gives the same dict as once.

    Args:
        state_dict: FQN -> tensor, e.g. a calibrated model's ``state_dict()``.
        patterns: grouping regexes (see ``find_groups``); ``None`` or empty groups nothing.
        quantizer: the quantizer attribute to unify.

    Returns:
        A new dict: the input's entries plus the ``_global_amax`` entries.

    Raises:
        TypeError: ``state_dict`` is not a mapping.
        ValueError: a bad pattern, or a non-finite or negative ``_amax`` (named): a
            calibrated amax is a magnitude, so a negative one is a corrupt state dict.
    """
    if not isinstance(state_dict, Mapping):
        raise TypeError(f"unify_state_dict: expected a mapping of names to tensors, got {type(state_dict).__name__}")
    unified = dict(state_dict)  # one copy, which the entries are then added to
    names = find_quantized(unified, quantizer)  # a plain dict iterates faster than an OrderedDict
    _check_non_negative(unified, [f"{name}.{quantizer}.{AMAX}" if name else f"{quantizer}.{AMAX}" for name in names])
    groups = find_groups(names, patterns)
    unified.update(global_amax_entries(groups, unified, names=names, quantizer=quantizer))
    return unified

