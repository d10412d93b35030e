"""Cross-rank sync of the shared state over real ``torch.distributed`` process groups.

This is an adapter only because it touches process groups: nothing here mutates a
module, a buffer or the state passed in. ``sync_shared_amax`` hands core's
``sync`` an all-reduce built on the functional collectives
(``torch.distributed._functional_collectives.all_reduce``), which return a new
tensor, leave their input untouched and trace under ``torch.compile``. Every group
of a model travels in ONE collective per process group (core packs the values),
whatever the number of groups.

Groups come as plain ``ProcessGroup`` objects or as wrappers with ``.group`` and
``.is_initialized()`` (the shape of modelopt's ``DistributedProcessGroup``); a
wrapper whose ``.group`` is ``None`` means the default (world) group, as there.
"""

from __future__ import annotations

from collections.abc import Callable
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from sharedquant.core.lifecycle import sync
from sharedquant.core.groups import Group
from sharedquant.core.state import SharedAmax

__all__ = [
    "SYNC_ERROR",
    "ParallelState",
    "group_all_reduce",
    "process_groups",
    "resolve_group",
    "sync_by_process_groups",
    "sync_shared_amax",
]

SYNC_ERROR = "Failed to sync shared weight global_amax"
_FIELDS = ("expert_model_parallel_group", "tensor_parallel_group")

# modelopt marks an unset group with -1; torch.distributed hands ranks outside a
# new_group this sentinel (-100) instead of a ProcessGroup.
_UNSET_GROUP = -1
_NOT_A_MEMBER = dist.GroupMember.NON_GROUP_MEMBER if dist.is_available() else -100


@dataclass(frozen=True)
class ParallelState:
    """The process groups a module's shards are spread over.

    Each field may be ``None`` (skipped), a ``torch.distributed`` ``ProcessGroup``, or
    an object with ``.group`` and ``.is_initialized()`` (modelopt's
    ``DistributedProcessGroup``). Weights are identical across data-parallel ranks, so
    there is no data-parallel field.

    Attributes:
        expert_model_parallel_group: the ranks that hold different experts.
        tensor_parallel_group: the ranks that hold different slices of one weight.
    """

    expert_model_parallel_group: Any = None
    tensor_parallel_group: Any = None


def _is_sentinel(group: Any) -> bool:
    return type(group) is int and group in (_UNSET_GROUP, _NOT_A_MEMBER)


def resolve_group(group: Any, where: str = "resolve_group") -> dist.ProcessGroup | None:
    """The ``ProcessGroup`` to reduce over, or ``None`` when there is nothing to do.

    ``None``, an uninitialised wrapper, a group this rank is not in, and any group
    while ``torch.distributed`` is not initialised all resolve to ``None``.

    Args:
        group: ``None``, a ``ProcessGroup``, or an object with ``.group`` and ``.is_initialized()``.
        where: what to name in error messages.

    Raises:
        TypeError: ``group`` is none of those.
    """
    if not dist.is_available():
        return None
    if group is not None and not _is_sentinel(group) and not isinstance(group, dist.ProcessGroup):
        if not (hasattr(group, "group") and callable(getattr(group, "is_initialized", None))):
            raise TypeError(
                f"{where}: expected None, a torch.distributed ProcessGroup or an object with .group and "
                f".is_initialized(), got {type(group).__name__}"
            )
        if not group.is_initialized():
            return None
        group = dist.group.WORLD if group.group is None else group.group
        if not (group is None or _is_sentinel(group) or isinstance(group, dist.ProcessGroup)):
            raise TypeError(f"{where}: the wrapped .group must be None or a ProcessGroup, got {group!r}")
    if group is None or _is_sentinel(group) or not dist.is_initialized():
        return None
    return group


def group_all_reduce(group: dist.ProcessGroup) -> Callable[[torch.Tensor], torch.Tensor]:
    """An elementwise MAX over ``group``'s ranks that returns a new tensor (core's ``all_reduce``).

    The tensor stays on its device (CPU for gloo, CUDA for NCCL). Any failure of the
    collective, a timeout included, is raised as ``RuntimeError(SYNC_ERROR)`` chained
    to the cause.
    """
    import torch.distributed._functional_collectives as funcol

    def all_reduce(tensor: torch.Tensor) -> torch.Tensor:
        try:
            reduced = funcol.all_reduce(tensor, "max", group)
            # Eagerly the result is a lazy AsyncCollectiveTensor: wait here, so a failure
            # surfaces inside this try and not at the caller's first read.
            return reduced.wait() if isinstance(reduced, funcol.AsyncCollectiveTensor) else reduced
        except Exception as err:
            raise RuntimeError(SYNC_ERROR) from err

    return all_reduce


def process_groups(parallel_state: Any, where: str = "process_groups") -> tuple[dist.ProcessGroup, ...]:
    """The distinct initialised groups to reduce over, expert-parallel first; ``()`` when none.

    Two parallel states over the same process groups give the same tuple, so a caller
    can batch all their groups into one ``sync_shared_amax`` (modelopt gives every
    module its own ``ParallelState`` object).

    Args:
        parallel_state: ``None``, a ``ParallelState``, or any object with
            ``expert_model_parallel_group`` and ``tensor_parallel_group`` (modelopt's).
        where: what to name in error messages.

    Raises:
        TypeError: ``parallel_state`` has neither field, or a group is of an unknown kind.
    """
    if parallel_state is None:
        return ()
    if not any(hasattr(parallel_state, name) for name in _FIELDS):
        raise TypeError(
            f"{where}: parallel_state must be None or have {' / '.join(_FIELDS)}, got {type(parallel_state).__name__}"
        )
    groups: list[dist.ProcessGroup] = []
    for name in _FIELDS:
        group = resolve_group(getattr(parallel_state, name, None), f"{where}: parallel_state.{name}")
        if group is not None and not any(group is seen for seen in groups):
            groups.append(group)
    return tuple(groups)


def sync_shared_amax(state: SharedAmax, parallel_state: Any) -> SharedAmax:
    """MAX every group's ``global_amax`` over the expert-, then the tensor-parallel group.

    Each process group gets ONE collective for all the groups; the same group given
    twice is reduced once. Unset groups (``-inf``) take part without changing the max
    and come out set when another rank had a value. With no parallel state, or no
    initialised group, ``state`` itself is returned and nothing is communicated.

    Args:
        state: the local state (on the device the backend reduces on).
        parallel_state: ``None``, a ``ParallelState``, or any object with
            ``expert_model_parallel_group`` and ``tensor_parallel_group`` (modelopt's).

    Returns:
        A new state with the reduced values; ``state`` is untouched.

    Raises:
        TypeError: ``state`` is not a ``SharedAmax``, or ``parallel_state`` or a group
            is of an unknown kind.
        RuntimeError: ``SYNC_ERROR`` when a collective fails or times out (chained to
            the cause); core's message when the ranks hold different groups.
    """
    if not isinstance(state, SharedAmax):
        raise TypeError(f"sync_shared_amax: expected a SharedAmax state, got {type(state).__name__}")
    for group in process_groups(parallel_state, "sync_shared_amax"):
        state = sync(state, group_all_reduce(group))
    return state


def sync_by_process_groups(groups: Sequence[Group], values: torch.Tensor, parallel_states: Sequence) -> torch.Tensor:
    """``sync_shared_amax`` over every group at once: one collective per distinct set of process groups.

    Args:
        groups: the groups, one per value.
        values: each group's local value (``-inf`` where unset: it still takes part).
        parallel_states: each group's parallel state (``None``: not synced).

    Returns:
        The values, reduced where a group has process groups; ``values`` is untouched.
    """
    # Keyed by the process groups, not the ParallelState object: the peer gives every
    # module its own object, which would cost one collective per group.
    batches: dict[tuple[int, ...], tuple[object, list[int]]] = {}
    resolved: dict[int, tuple[int, ...]] = {}
    for position, parallel_state in enumerate(parallel_states):
        if parallel_state is None:
            continue
        key = resolved.get(id(parallel_state))
        if key is None:
            key = resolved[id(parallel_state)] = tuple(map(id, process_groups(parallel_state, "populate")))
        if key:
            batches.setdefault(key, (parallel_state, []))[1].append(position)
    for parallel_state, positions in batches.values():
        index = torch.tensor(positions, device=values.device)
        local = SharedAmax(tuple(groups[p] for p in positions), values[index])
        values = values.index_put((index,), sync_shared_amax(local, parallel_state).global_amax)
    return values
