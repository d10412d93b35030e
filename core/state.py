"""The shared state as an immutable pytree.

``SharedAmax`` holds one fp32 value per group, packed in a single 1-D tensor (the
only leaf), and the groups themselves as static metadata. Packing is what makes the
lifecycle batched: finalize is one scatter, sync is one collective, restore is one
comparison, whatever the number of groups. A group no member has calibrated holds
``-inf``, the identity of max: it takes part in a MAX all-reduce without changing
anyone's value and comes out set if another rank had one.

The class is registered with optree (namespace ``"sharedquant"``) and with
``torch.utils._pytree`` (what ``torch.func.vmap`` and ``torch.compile`` flatten with),
so ``tree_map`` moves or casts it and returns a new state. Nothing is validated in
the constructor: unflatten runs it under tracing. Public functions validate.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import optree
import torch
import torch.utils._pytree as torch_pytree

from .groups import Group, GroupKey

__all__ = ["NAMESPACE", "SharedAmax", "UNSET"]

NAMESPACE = "sharedquant"
UNSET = float("-inf")


@dataclass(frozen=True, slots=True)
class SharedAmax:
    """The canonical ``global_amax`` of every group, one tensor for all.

    Attributes:
        groups: the groups, in order; static metadata (hashable, part of the treedef).
        global_amax: fp32, shape ``[len(groups)]``; ``-inf`` marks an unset group.
    """

    groups: tuple[Group, ...]
    global_amax: torch.Tensor

    @property
    def keys(self) -> tuple[GroupKey, ...]:
        """The group keys, ``(pattern index, capture tuple)``, in order."""
        return tuple(group.key for group in self.groups)

    def index(self, key: GroupKey) -> int:
        """Position of the group with ``key``.

        Raises:
            KeyError: no group has that key.
        """
        for position, group in enumerate(self.groups):
            if group.key == key:
                return position
        raise KeyError(f"SharedAmax: no group with key {key!r}")

    def __getitem__(self, key: GroupKey) -> torch.Tensor:
        """The 0-dim value of the group with ``key`` (``-inf`` when unset)."""
        return self.global_amax[self.index(key)]

    def is_set(self) -> torch.Tensor:
        """Bool mask of the groups that hold a value."""
        return self.global_amax > UNSET

    def replace(self, **changes) -> SharedAmax:
        """A copy with ``changes`` applied (the original is untouched)."""
        return dataclasses.replace(self, **changes)


def _flatten(state: SharedAmax):
    return (state.global_amax,), state.groups


def _flatten_with_keys(state: SharedAmax):
    return ((torch_pytree.GetAttrKey("global_amax"), state.global_amax),), state.groups


def _unflatten(groups, children) -> SharedAmax:
    (global_amax,) = children
    return SharedAmax(groups=groups, global_amax=global_amax)


optree.register_pytree_node(
    SharedAmax,
    lambda state: ((state.global_amax,), state.groups, ("global_amax",)),
    lambda groups, children: _unflatten(groups, tuple(children)),
    namespace=NAMESPACE,
)
torch_pytree.register_pytree_node(
    SharedAmax,
    _flatten,
    lambda children, groups: _unflatten(groups, tuple(children)),
    serialized_type_name="sharedquant.core.state.SharedAmax",
    flatten_with_keys_fn=_flatten_with_keys,
)
