"""State dict -> state dict transforms. Pure: the input dict and its tensors are never written.

``unify_state_dict`` is the whole lifecycle with no module anywhere: find the
quantized modules from the keys, group them by pattern, finalize, and write every
member's ``_global_amax``. It is what the peer's populate + NVFP4 promotion leave in
a state dict, computed in a handful of kernels.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from .groups import SHARED_PATTERNS, Group, find_groups, parent_fqn
from .lifecycle import AMAX, finalize, member_entries

__all__ = ["find_quantized", "global_amax_entries", "unify_state_dict", "with_singletons"]


def find_quantized(keys, quantizer: str = "weight_quantizer") -> tuple[str, ...]:
    """FQNs of the modules whose ``<quantizer>._amax`` appears among ``keys``, in key order."""
    root = f"{quantizer}.{AMAX}"
    suffix, cut = f".{root}", -len(root) - 1
    # a list comprehension, not a generator: no frame switch per key
    return tuple([key[:cut] if key != root else "" for key in keys if key.endswith(suffix) or key == root])


def with_singletons(groups: Sequence[Group], names: Sequence[str]) -> tuple[Group, ...]:
    """``groups`` followed by a group of one for every name no group holds.

    A module outside any fused group still needs a global amax: its own. Treating it
    as a group of one gives it through the same batched path.
    """
    grouped = {member for group in groups for member in group.members}
    singles = [name for name in names if name not in grouped]
    return (*groups, *[Group((-1, (name,)), parent_fqn(name), (name,)) for name in singles])  # positional: faster


def global_amax_entries(
    groups: Sequence[Group],
    buffers: Mapping[str, torch.Tensor],
    *,
    quantizer: str = "weight_quantizer",
) -> dict[str, torch.Tensor]:
    """The tensor half of ``unify_state_dict``: ``_global_amax`` entries for every member of ``groups``.

    Traceable by ``torch.compile(fullgraph=True)`` once the groups are known.
    """
    return member_entries(finalize(groups, buffers, quantizer=quantizer), quantizer=quantizer)


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
        ValueError: a bad pattern, or a non-finite member amax (named).
    """
    if not isinstance(state_dict, Mapping):
        raise TypeError(f"unify_state_dict: expected a mapping of names to tensors, got {type(state_dict).__name__}")
    unified = dict(state_dict)  # one copy, which the entries are then added to
    names = find_quantized(unified, quantizer)  # a plain dict iterates faster than an OrderedDict
    groups = with_singletons(find_groups(names, patterns), names)
    unified.update(global_amax_entries(groups, unified, quantizer=quantizer))
    return unified

