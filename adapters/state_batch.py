"""Batched plumbing between the module states and the core's pure lifecycle.

Gathers every state's member buffers in one pass, runs the core's batched
finalize / restore / sync on all groups at once, and moves the results back:
in place into states that already hold a value (their members stay tied), else as
new values that the states tie. Mutates state and quantizer buffers only.
"""

from __future__ import annotations

from bisect import bisect_right
from collections import deque
from collections.abc import Sequence
from itertools import accumulate, chain, compress, repeat
from operator import attrgetter, contains, is_, itemgetter, setitem
from typing import TYPE_CHECKING, NamedTuple

import torch
from torch import Tensor, nn

from sharedquant.core import lifecycle
from sharedquant.core.groups import Group
from sharedquant.core.state import UNSET, SharedAmax

from . import state_index
from .modules import quantizer_attr

if TYPE_CHECKING:
    from .shared_state import SharedQuantState

_DICT = attrgetter("__dict__")
_MEMBERS = attrgetter("members")
_BUFFERS = attrgetter("_buffers")
_IS_META = attrgetter("is_meta")
_BASE = attrgetter("_base")
_ABSENT = object()  # a member without a parallel_state of its own


def first_parallel_state(state: SharedQuantState):
    """The first ``parallel_state`` a member carries, or ``None``."""
    return first_parallel_states([state])[0]


def first_parallel_states(states: Sequence[SharedQuantState], members: MemberQuantizers | None = None) -> list:
    """``first_parallel_state`` of every state, in one pass over the flat members."""
    members = MemberQuantizers.of(states) if members is None else members
    # A plain attribute on QuantLinear, a class-level one (a property) on modelopt's
    # modules; the nn.Module.__getattr__ fallback (slow, and it raises) is never needed.
    found = list(map(dict.get, members.member_dicts, repeat("parallel_state"), repeat(_ABSENT)))
    if any(map(is_, found, repeat(_ABSENT))):
        found = [_class_level_parallel_state(m) if p is _ABSENT else p for m, p in zip(members.members, found)]
    if found.count(None) == len(found):
        return [None] * len(states)
    firsts, start = [], 0
    for count in members.counts:
        firsts.append(next((p for p in found[start : start + count] if p is not None), None))
        start += count
    return firsts


def _class_level_parallel_state(member: nn.Module):
    return getattr(member, "parallel_state", None) if hasattr(type(member), "parallel_state") else None


def member_device(state: SharedQuantState) -> torch.device:
    """Where the members' weights live (the device a collective must use), CPU if nowhere."""
    weights = (p for m in state.members for p in m.parameters(recurse=False) if not p.is_meta)
    return next((p.device for p in weights), torch.device("cpu"))


class Probe(NamedTuple):
    """A group not attached yet: what restore checks before attaching anything."""

    group: Group
    members: tuple[nn.Module, ...]
    target_quantizer_kind: str


class MemberQuantizers(NamedTuple):
    """The members of a list of states and their target quantizers, flat, in state order.

    With them, the dicts a populate reads and writes for each: the member's
    ``__dict__`` (its ``parallel_state``) and ``_modules`` (where its quantizer is
    looked up), the quantizer's ``_buffers`` and ``__dict__`` (its tie marker). Held,
    they are reached in one step instead of a chain of lookups, each link of which is
    a cache miss on a 48-layer, 128-expert MoE (12k members). A module keeps these
    dicts for its lifetime (``nn.Module`` never rebinds them).
    """

    members: list[nn.Module]
    quantizers: list[nn.Module | None]  # None: the member has no target quantizer
    counts: list[int]  # members per state
    qattr: str  # the attribute that holds the target quantizer
    member_dicts: list[dict]
    member_modules: list[dict]  # each member's _modules
    quantizer_buffers: list[dict]  # each quantizer's _buffers, an empty dict where there is no quantizer
    quantizer_dicts: list[dict]  # each quantizer's __dict__, an empty dict where there is no quantizer

    @classmethod
    def of(cls, states: Sequence) -> MemberQuantizers:
        qattr = quantizer_attr(states[0].target_quantizer_kind) if states else "weight_quantizer"
        per_state = list(map(_MEMBERS, states))
        members = list(chain.from_iterable(per_state))
        member_dicts = list(map(_DICT, members))
        member_modules = list(map(itemgetter("_modules"), member_dicts))
        quantizers = list(map(dict.get, member_modules, repeat(qattr)))
        if any(map(is_, quantizers, repeat(None))):
            quantizer_dicts = [{} if q is None else q.__dict__ for q in quantizers]
        else:
            quantizer_dicts = list(map(_DICT, quantizers))
        quantizer_buffers = list(map(dict.get, quantizer_dicts, repeat("_buffers"), repeat({})))
        counts = list(map(len, per_state))
        return cls(members, quantizers, counts, qattr, member_dicts, member_modules, quantizer_buffers, quantizer_dicts)

    def holds(self) -> bool:
        """Whether every member still holds the quantizer gathered for it."""
        return all(map(is_, map(dict.get, self.member_modules, repeat(self.qattr)), self.quantizers))

    def positions(self) -> list[int]:
        """The state position of each flat entry."""
        return list(chain.from_iterable(map(repeat, range(len(self.counts)), self.counts)))

    def buffers(self, attr: str) -> list[torch.Tensor | None]:
        """Each quantizer's ``attr`` buffer (``None`` where absent)."""
        return list(map(dict.get, self.quantizer_buffers, repeat(attr)))

    def locate(self, flat: int) -> tuple[int, int]:
        """``(state position, member index)`` of flat entry ``flat``."""
        position = bisect_right(list(accumulate(self.counts)), flat)
        return position, flat - sum(self.counts[:position])


class StateBatch(NamedTuple):
    """States handled together, with the dicts a batched step reads and writes for them.

    ``populate`` keeps the batch of a model's states on its index (``state_index``) and
    uses it again while it holds: the index holds, no state's members were set since
    (``state_index.membership``), and every member still holds its quantizer.
    """

    states: list[SharedQuantState]
    state_buffers: list[dict]  # each state's _buffers
    members: MemberQuantizers
    positions: torch.Tensor  # int64, the state position of each member (CPU)
    membership: int

    @classmethod
    def of(cls, states: Sequence[SharedQuantState], members: MemberQuantizers | None = None) -> StateBatch:
        members = MemberQuantizers.of(states) if members is None else members
        positions = torch.tensor(members.positions(), dtype=torch.int64)
        return cls(list(states), list(map(_BUFFERS, states)), members, positions, state_index.membership())

    def holds(self) -> bool:
        """Whether the batch still names the members and quantizers of its states."""
        return self.membership == state_index.membership() and self.members.holds()


def core_view(
    states: Sequence, attr: str, members: MemberQuantizers | None = None
) -> tuple[tuple[Group, ...], dict[str, torch.Tensor], str]:
    """The states' groups and a buffer dict of their members' ``attr``, keyed as the core expects."""
    members = MemberQuantizers.of(states) if members is None else members
    groups = tuple(state.group for state in states)
    names = [m for g in groups for m in g.members]
    if len(set(names)) != len(names):  # states attached under different roots: make names unique
        groups = tuple(Group(g.key, f"[{i}]", tuple(f"[{i}].{m}" for m in g.members)) for i, g in enumerate(groups))
    indices = chain.from_iterable(map(range, members.counts))
    buffers = {
        lifecycle.buffer_key(groups[position].members[index], members.qattr, attr): value
        for position, index, value in zip(members.positions(), indices, members.buffers(attr))
        if value is not None
    }
    return groups, buffers, members.qattr


def finalize_tensor(batch: StateBatch) -> torch.Tensor:
    """Every state's group max through the core's batched kernel, gathered by reference, not by name."""
    states, members = batch.states, batch.members
    amaxes, positions = members.buffers("_amax"), batch.positions
    present = range(len(amaxes))
    if any(map(is_, amaxes, repeat(None))) or any(map(_IS_META, amaxes)):
        present = [i for i, amax in enumerate(amaxes) if amax is not None and not amax.is_meta]
        amaxes, positions = [amaxes[i] for i in present], positions[present]

    def describe(i: int) -> str:
        position, index = members.locate(present[i])
        return lifecycle.buffer_key(states[position].group.members[index], members.qattr, "_amax")

    device = None if amaxes or not states else member_device(states[0])
    return lifecycle.group_amax(amaxes, positions, len(states), describe=describe, device=device)


def finalize_values(states: Sequence) -> list[torch.Tensor | None]:
    return unpack(finalize_tensor(StateBatch.of(states)))


def restore_values(states: Sequence, attr: str, members: MemberQuantizers | None = None) -> list[torch.Tensor | None]:
    groups, buffers, qattr = core_view(states, attr, members)
    return unpack(lifecycle.restore(groups, buffers, quantizer=qattr, attr=attr).global_amax)


def unpack(values: torch.Tensor) -> list[torch.Tensor | None]:
    # One storage for all groups: unbind gives 0-dim views without a copy each.
    return [value if ok else None for value, ok in zip(values.unbind(), (values > UNSET).tolist())]


def sync_by_parallel_state(states: Sequence[SharedQuantState], values: torch.Tensor, parallel_states: Sequence) -> torch.Tensor:
    """One ``sync_shared_amax`` per distinct set of process groups; unset groups take part too.

    ``parallel_states`` holds each state's ``first_parallel_state``.
    """
    from .distributed import process_groups, sync_shared_amax

    # Keyed by the process groups, not the ParallelState object: modelopt gives every
    # module its own object, which would cost one collective per state.
    by_parallel_state: dict[tuple[int, ...], tuple[object, list[int]]] = {}
    resolved: dict[int, tuple[int, ...]] = {}
    for position, parallel_state in enumerate(parallel_states):
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


def assign(batch: StateBatch, values: torch.Tensor, attr: str) -> list[bool]:
    """Move new values into the states: in place where a state already holds one, else set.

    Returns which states got a value; the caller ties their members to it.
    """
    assigned = values > UNSET
    currents = list(map(dict.get, batch.state_buffers, repeat(attr)))
    base = _shared_base(currents, values)
    if base is not None:  # every state holds its own element of one tensor: one copy for all
        base.copy_(torch.where(assigned, values, base))
        return assigned.tolist()
    flags = assigned.tolist()
    if all(map(is_, currents, repeat(None))) and all(map(contains, batch.state_buffers, repeat(attr))):
        # A first populate: each state gets its 0-dim view of one tensor (unbind), which
        # leaves the shared base that the next populate updates with one copy.
        targets = compress(batch.state_buffers, flags)
        deque(map(setitem, targets, repeat(attr), compress(values.unbind(), flags)), maxlen=0)
        return flags
    targets, sources = [], []
    device, dtype = values.device, values.dtype
    for state, current, value, ok in zip(batch.states, currents, values.unbind(), flags):
        if not ok:
            continue
        if current is not None and current.dtype is dtype and current.device == device and current.dim() == 0:
            targets.append(current)
            sources.append(value)
        else:
            state._set_value(attr, value)
    if targets:
        torch._foreach_copy_(targets, sources)
    return flags


def _shared_base(currents: list[torch.Tensor | None], values: torch.Tensor) -> torch.Tensor | None:
    """The 1-D tensor whose element ``i`` is ``currents[i]``, if there is one, else ``None``.

    A populate leaves each state a 0-dim view of one tensor (``unpack``); the next
    populate then updates all of them with one copy instead of one per state.
    """
    first = currents[0] if currents else None
    base = None if first is None else first._base
    if base is None or base.dim() != 1 or len(base) != len(currents) or base.dtype is not values.dtype:
        return None
    if base.device != values.device or any(map(is_, currents, repeat(None))):
        return None
    if not all(map(is_, map(_BASE, currents), repeat(base))):
        return None
    start, stride = base.storage_offset(), base.stride(0)
    offsets = range(start, start + stride * len(currents), stride)
    if any(map(Tensor.dim, currents)) or list(map(Tensor.storage_offset, currents)) != list(offsets):
        return None
    return base

