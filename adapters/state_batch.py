"""Batched plumbing between the module states and the core's pure lifecycle.

Gathers every state's member buffers in one pass, runs the core's batched
finalize / restore / sync on all groups at once, and moves the results back:
in place into states that already hold a value (their members stay tied), else as
new values that the states tie. Mutates state and quantizer buffers only.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, NamedTuple

import torch
from torch import nn

from sharedquant.core import lifecycle
from sharedquant.core.groups import Group
from sharedquant.core.state import UNSET, SharedAmax

from .modules import quantizer_attr

if TYPE_CHECKING:
    from .shared_state import SharedQuantState

def first_parallel_state(state: SharedQuantState):
    """The first ``parallel_state`` a member carries, or ``None``."""
    for member in state.members:
        attrs = member.__dict__  # a plain attribute on QuantLinear: skip nn.Module.__getattr__
        parallel_state = attrs["parallel_state"] if "parallel_state" in attrs else getattr(member, "parallel_state", None)
        if parallel_state is not None:
            return parallel_state
    return None


def member_device(state: SharedQuantState) -> torch.device:
    """Where the members' weights live (the device a collective must use), CPU if nowhere."""
    weights = (p for m in state.members for p in m.parameters(recurse=False) if not p.is_meta)
    return next((p.device for p in weights), torch.device("cpu"))


class Probe(NamedTuple):
    """A group not attached yet: what restore checks before attaching anything."""

    group: Group
    members: tuple[nn.Module, ...]
    target_quantizer_kind: str


def _member_buffers(states: Sequence, attr: str) -> Iterator[tuple[int, int, torch.Tensor]]:
    """``(state position, member index, buffer)`` for every member quantizer holding ``attr``."""
    qattr = quantizer_attr(states[0].target_quantizer_kind) if states else "weight_quantizer"
    for position, state in enumerate(states):
        for index, member in enumerate(state.members):
            quantizer = member._modules.get(qattr)
            value = None if quantizer is None else quantizer._buffers.get(attr)
            if value is not None:
                yield position, index, value


def core_view(states: Sequence, attr: str) -> tuple[tuple[Group, ...], dict[str, torch.Tensor], str]:
    """The states' groups and a buffer dict of their members' ``attr``, keyed as the core expects."""
    qattr = quantizer_attr(states[0].target_quantizer_kind) if states else "weight_quantizer"
    groups = tuple(state.group for state in states)
    names = [m for g in groups for m in g.members]
    if len(set(names)) != len(names):  # states attached under different roots: make names unique
        groups = tuple(Group(g.key, f"[{i}]", tuple(f"[{i}].{m}" for m in g.members)) for i, g in enumerate(groups))
    buffers = {
        lifecycle.buffer_key(groups[position].members[index], qattr, attr): value
        for position, index, value in _member_buffers(states, attr)
    }
    return groups, buffers, qattr


def finalize_tensor(states: Sequence) -> torch.Tensor:
    """Every state's group max through the core's batched kernel, gathered by reference, not by name."""
    qattr = quantizer_attr(states[0].target_quantizer_kind) if states else "weight_quantizer"
    gathered = [(position, index, amax) for position, index, amax in _member_buffers(states, "_amax") if not amax.is_meta]

    def describe(i: int) -> str:
        position, index, _ = gathered[i]
        return lifecycle.buffer_key(states[position].group.members[index], qattr, "_amax")

    tensors = [amax for _, _, amax in gathered]
    device = None if tensors or not states else member_device(states[0])
    return lifecycle.group_amax(tensors, [position for position, _, _ in gathered], len(states), describe=describe, device=device)


def finalize_values(states: Sequence) -> list[torch.Tensor | None]:
    return unpack(finalize_tensor(states))


def restore_values(states: Sequence, attr: str) -> list[torch.Tensor | None]:
    groups, buffers, qattr = core_view(states, attr)
    return unpack(lifecycle.restore(groups, buffers, quantizer=qattr, attr=attr).global_amax)


def unpack(values: torch.Tensor) -> list[torch.Tensor | None]:
    # One storage for all groups: unbind gives 0-dim views without a copy each.
    return [value if ok else None for value, ok in zip(values.unbind(), (values > UNSET).tolist())]


def sync_by_parallel_state(states: Sequence[SharedQuantState], values: torch.Tensor) -> torch.Tensor:
    """One ``sync_shared_amax`` per distinct set of process groups; unset groups take part too."""
    from .distributed import process_groups, sync_shared_amax

    # Keyed by the process groups, not the ParallelState object: modelopt gives every
    # module its own object, which would cost one collective per state.
    by_parallel_state: dict[tuple[int, ...], tuple[object, list[int]]] = {}
    resolved: dict[int, tuple[int, ...]] = {}
    for position, state in enumerate(states):
        parallel_state = first_parallel_state(state)
        if parallel_state is None:
            continue
        key = resolved.get(id(parallel_state))
        if key is None:
            key = resolved[id(parallel_state)] = tuple(map(id, process_groups(parallel_state, "populate")))
        if key:
            by_parallel_state.setdefault(key, (parallel_state, []))[1].append(position)
    if not by_parallel_state:
        return values

    for parallel_state, positions in by_parallel_state.values():
        index = torch.tensor(positions, device=values.device)
        local = SharedAmax(tuple(states[p].group for p in positions), values[index])
        values = values.index_put((index,), sync_shared_amax(local, parallel_state).global_amax)
    return values


def assign(states: Sequence[SharedQuantState], values: torch.Tensor, attr: str) -> None:
    """Move new values into the states: in place where a state already holds one, else set and tie."""
    targets, sources = [], []
    for state, value in zip(states, unpack(values)):
        if value is None:
            continue
        current = state._buffers.get(attr)
        if current is not None and current.device == value.device and current.dtype == value.dtype and current.dim() == 0:
            targets.append(current)
            sources.append(value)
        else:
            state._set_value(attr, value)
        state.tie_member_quantizers()
    if targets:
        torch._foreach_copy_(targets, sources)
