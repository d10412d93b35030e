"""Shared quantization state on real modules: ``SharedQuantState`` and ``SharedWeightGlobalAmaxState``.

A state is an ``nn.Module`` appended to its group's parent's ``_shared_quant_states``
``ModuleList``; it holds the group's canonical tensor(s) as non-persistent buffers,
and the member quantizers are tied to them (``tying.tie_``). The math is the core's:
``populate`` gathers every member's ``_amax`` in one loop, hands them to
``core.lifecycle.group_amax`` once, syncs with one collective per process group and
ties in one loop. What this file mutates: the parents (a state list and one load
pre-hook each, both through torch's public API), the states' buffers, and, through
``tying``, the member quantizers' buffers.

The extension contract: a subclass that overrides ``finalize``, ``sync`` or
``tie_member_quantizer`` has those methods called per state; the batched path only
stands in for this file's own methods.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator, Mapping, Sequence
from typing import ClassVar

import torch
from torch import nn

from sharedquant.core import config, lifecycle
from sharedquant.core.groups import SHARED_PATTERNS, Group
from sharedquant.core.reduce import round_up_to_fp32
from sharedquant.core.state import UNSET, SharedAmax

from .distributed import sync_by_process_groups, sync_shared_amax
from .modules import discover_groups, first_parallel_state, quantizer_attr, weight_device
from .quantizer import TensorQuantizer
from .state_lists import SHARED_STATES, attach_groups, state_list
from .tying import is_tied, keep_fp32_, tie_, untie_

__all__ = ["SHARED_STATES", "SharedQuantState", "SharedWeightGlobalAmaxState", "iter_shared_quant_states"]

class SharedQuantState(nn.Module, ABC):
    """Base of the shared quantization states owned by a group's parent.

    Subclasses say which quantizer they apply to (``target_quantizer_kind``), which
    per-group scalars they own (``managed_attrs``), their default grouping patterns,
    how they are produced (``finalize``) and synced (``sync``). Runtime states may
    override ``install_hooks`` to compute group-level values once at the parent.
    """

    name: ClassVar[str]
    managed_attrs: ClassVar[tuple[str, ...]] = ()
    target_quantizer_kind: ClassVar[str] = "weight"
    default_patterns: ClassVar[tuple[str, ...]] = ()

    def __init__(self) -> None:
        """An empty state: no parent, no members, no hooks."""
        super().__init__()
        # The parent is a plain attribute, not a submodule: it already lives in the model
        # tree, and registering it here would put a cycle into modules() and state_dict.
        object.__setattr__(self, "_parent", None)
        self._members: tuple[nn.Module, ...] = ()
        self._hook_handles: list = []
        self._group: Group | None = None

    # -- membership -------------------------------------------------------------------
    def set_members(self, parent: nn.Module, members: Sequence[nn.Module]) -> None:
        """Set the owning parent and the member modules."""
        object.__setattr__(self, "_parent", parent)
        self._members = tuple(members)

    @property
    def members(self) -> tuple[nn.Module, ...]:
        """The member modules."""
        return self._members

    @property
    def group(self) -> Group:
        """The core's view of this state: key, parent FQN and member FQNs."""
        if self._group is None:  # set_members without attach: name members by position
            return Group(key=(-1, ()), parent="", members=tuple(f"<member {i}>" for i in range(len(self._members))))
        return self._group

    def member_quantizers(self) -> list[nn.Module]:
        """The members' target quantizers (members without one are left out)."""
        attr = quantizer_attr(self.target_quantizer_kind)
        return [q for q in (getattr(m, attr, None) for m in self._members) if q is not None]

    # -- hooks ------------------------------------------------------------------------
    def install_hooks(self) -> None:
        """Install parent/member hooks for runtime shared computation (none by default)."""

    def remove_hooks(self) -> None:
        """Remove the hooks ``install_hooks`` installed."""
        for handle in self._hook_handles:
            handle.remove()
        self._hook_handles = []

    # -- values -----------------------------------------------------------------------
    def finalize(self) -> bool:
        """Whether the managed buffers hold a (non-meta) value; states produced on demand override it."""
        return any((v := self._buffers.get(attr)) is not None and not v.is_meta for attr in self.managed_attrs)

    @abstractmethod
    def sync(self, parallel_state=None) -> None:
        """Synchronize the canonical value across distributed process groups."""

    def tie_member_quantizer(self, quantizer: nn.Module) -> bool:
        """Alias ``quantizer``'s managed buffers to this state's tensors (one storage); return whether any was tied."""
        tied = False
        for attr in self.managed_attrs:
            value = self._buffers.get(attr)
            if value is not None:
                tie_(quantizer, attr, value)
                tied = True
        return tied

    def tie_member_quantizers(self) -> None:
        """Tie every eligible member quantizer."""
        for quantizer in self.member_quantizers():
            self.tie_member_quantizer(quantizer)

    def restore_from_members(self) -> bool:
        """Rebuild the canonical buffers from the members' loaded ones and tie; return whether any was set.

        Raises:
            ValueError: the members disagree (nothing is tied).
        """
        qattr = quantizer_attr(self.target_quantizer_kind)
        quantizers = [getattr(m, qattr, None) for m in self._members]
        values = {attr: _restored((self.group,), quantizers, qattr, attr)[0] for attr in self.managed_attrs}
        for attr, value in values.items():
            if value is not None:
                self._set_value(attr, value)
        self.tie_member_quantizers()
        return any(value is not None for value in values.values())

    def _set_value(self, attr: str, value: torch.Tensor | None) -> None:
        self.register_buffer(attr, value, persistent=False)

    def _apply(self, fn, recurse=True):
        # .to()/.cuda()/.half() give every buffer a new tensor, ending the aliases; keep
        # the shared value in its own precision and tie the members to it again.
        before = {attr: self._buffers.get(attr) for attr in self.managed_attrs}
        module = super()._apply(fn, recurse=recurse)
        keep_fp32_(self, before, self.managed_attrs)
        self.tie_member_quantizers()
        return module

    # -- the lifecycle over a whole model ---------------------------------------------
    @classmethod
    def attach(cls, model: nn.Module, patterns: Sequence[str] | None = None) -> int:
        """Create a state at each discovered group's parent; return how many were created.

        ``patterns=None`` means the class's ``default_patterns``; an empty list attaches
        nothing. Attaching again is a no-op.

        Raises:
            ValueError: a module already belongs to another state of this class, or a bad regex.
        """
        patterns = cls.default_patterns if patterns is None else patterns
        groups, modules = discover_groups(model, patterns, cls.target_quantizer_kind, where=f"{cls.__name__}.attach")
        return sum(created for _, created in attach_groups(cls, groups, modules))

    @classmethod
    def resolve_patterns(cls, shared_states: Mapping[str, Mapping[str, Sequence[str]]] | None = None) -> list[str]:
        """This state's grouping patterns from a ``shared_states`` calibration config.

        Raises:
            ValueError: an unknown state name or field, or an invalid regex.
        """
        return config.resolve_patterns(shared_states, cls.name, cls.default_patterns)

    @classmethod
    @torch.no_grad()
    def populate(cls, model: nn.Module) -> int:
        """Finalize and sync every state of this class in ``model``; return how many were populated.

        A state whose ``finalize`` returns ``False`` is skipped (its hooks stay); the
        others are synced and their hooks removed: calibration is over.
        """
        states = list(iter_shared_quant_states(model, cls))
        batched = [type(state)._batches_populate() for state in states]
        done = set(map(id, _populate_batched([s for s, b in zip(states, batched) if b]))) if any(batched) else set()
        count = 0
        for state, batch in zip(states, batched):
            if batch:
                if id(state) not in done:
                    continue
            elif state.finalize():  # an override, called per state as the seed's contract says
                state.sync(first_parallel_state(state.members))
            else:
                continue
            state.remove_hooks()
            count += 1
        return count

    @classmethod
    def _batches_populate(cls) -> bool:
        """Whether ``_populate_batched`` stands in for this class's ``finalize`` and ``sync`` (none does here)."""
        return False

    @classmethod
    def restore(cls, model: nn.Module, patterns: Sequence[str] | None = None) -> None:
        """Attach states and rebuild the ties from the members' loaded buffers (after ``load_state_dict``).

        Every group is checked before anything is attached or tied.

        Raises:
            ValueError: the members of a group disagree (named with their values).
        """
        patterns = cls.default_patterns if patterns is None else patterns
        groups, modules = discover_groups(model, patterns, cls.target_quantizer_kind, where=f"{cls.__name__}.restore")
        attr = quantizer_attr(cls.target_quantizer_kind)
        quantizers = [getattr(modules[m], attr, None) for group in groups for m in group.members]
        values = {name: _restored(groups, quantizers, attr, name) for name in cls.managed_attrs}
        states = [state for state, _ in attach_groups(cls, groups, modules)]
        for name, restored in values.items():
            for state, value in zip(states, restored):
                if value is not None:
                    state._set_value(name, value)
        for state in states:
            state.tie_member_quantizers()

    @classmethod
    def metadata(cls, model: nn.Module) -> dict[str, bool]:
        """``{name: True}`` when ``model`` holds states of this class, else ``{}``."""
        return {cls.name: True} if any(True for _ in iter_shared_quant_states(model, cls)) else {}


class SharedWeightGlobalAmaxState(SharedQuantState):
    """The shared NVFP4 weight ``global_amax`` of one fused group (q/k/v, gate/up, w1/w3)."""

    name: ClassVar[str] = "weight_global_amax"
    managed_attrs: ClassVar[tuple[str, ...]] = ("_global_amax",)
    target_quantizer_kind: ClassVar[str] = "weight"
    default_patterns: ClassVar[tuple[str, ...]] = SHARED_PATTERNS

    def __init__(self) -> None:
        """A state with an unset (``None``) canonical ``global_amax``."""
        super().__init__()
        # Non-persistent: the value is saved through the members' own entries.
        self.register_buffer("_global_amax", None, persistent=False)

    @property
    def global_amax(self) -> torch.Tensor | None:
        """The canonical shared global amax (fp32, 0-dim) or ``None``."""
        return self._buffers.get("_global_amax")

    @global_amax.setter
    def global_amax(self, value) -> None:
        # Replacing the tensor re-ties the members, so none keeps the old value. An
        # unset state shares nothing: its members keep their own, unguarded copy.
        if value is None:
            current = self.global_amax
            for quantizer in self.member_quantizers():
                if is_tied(quantizer, "_global_amax", current):
                    untie_(quantizer, "_global_amax")
        # A copy: a state owns its value, so a populate updating it in place never
        # writes through to the caller's tensor or to another state given the same one.
        value = None if value is None else round_up_to_fp32(torch.as_tensor(value).detach().reshape(())).clone()
        self._set_value("_global_amax", value)
        self.tie_member_quantizers()

    def tie_member_quantizer(self, quantizer: nn.Module) -> bool:
        """Tie one member quantizer when it can hold a global amax and the value is set."""
        value = self._buffers.get("_global_amax")
        if value is None or not _holds_global_amax(quantizer):
            return False
        tie_(quantizer, "_global_amax", value)
        return True

    def finalize(self) -> bool:
        """Set ``global_amax`` to the max over the members' calibrated ``_amax``; return whether set."""
        (value,) = _Gathered([self]).values.unbind()
        if not value > UNSET:
            return False
        self.global_amax = value
        return True

    def sync(self, parallel_state=None) -> None:
        """MAX ``global_amax`` over the expert-parallel group, then the tensor-parallel group.

        Raises:
            RuntimeError: ``"Failed to sync shared weight global_amax"``, chained to the failure.
        """
        if parallel_state is None:
            return
        current = self.global_amax
        # An unset rank still takes part (-inf), else the ranks holding a value wait on it.
        local = torch.full((1,), UNSET, device=weight_device(self.members)) if current is None else current.reshape(1)
        synced = sync_shared_amax(SharedAmax((self.group,), local), parallel_state).global_amax[0]
        if current is not None:
            current.copy_(synced)  # in place: the members see it
        elif synced > UNSET:
            self.global_amax = synced

    @classmethod
    def _batches_populate(cls) -> bool:
        own = SharedWeightGlobalAmaxState
        return cls.finalize is own.finalize and cls.sync is own.sync and cls.tie_member_quantizer is own.tie_member_quantizer


def _holds_global_amax(quantizer: nn.Module) -> bool:
    """Whether a quantizer can hold a global amax: ours, or one with a ``global_amax`` attribute (the peer's)."""
    return isinstance(quantizer, TensorQuantizer) or hasattr(quantizer, "global_amax")


class _Gathered:
    """What populate reads from the members of a list of states, in one loop over them.

    Per state: the members' quantizers and the first ``parallel_state``; over all of
    them: every ``_amax`` and its group max, through the core's batched kernel.
    """

    def __init__(self, states: Sequence[SharedQuantState]) -> None:
        attr = quantizer_attr(states[0].target_quantizer_kind) if states else "weight_quantizer"
        self.quantizers: list[list[nn.Module]] = []
        self.parallel_states: list = []
        amaxes, group_ids, where = [], [], []
        for position, state in enumerate(states):
            quantizers = []
            for index, member in enumerate(state.members):
                # reads of torch's child and buffer registries: getattr's __getattr__
                # fallback costs a third of a populate on a 12k-member model
                quantizer = member._modules.get(attr)
                if quantizer is None:
                    continue
                quantizers.append(quantizer)
                amax = quantizer._buffers.get("_amax")
                if amax is not None and not amax.is_meta:
                    amaxes.append(amax)
                    group_ids.append(position)
                    where.append((state, index))
            self.quantizers.append(quantizers)
            self.parallel_states.append(first_parallel_state(state.members))

        def describe(i: int) -> str:
            state, index = where[i]
            return lifecycle.buffer_key(state.group.members[index], attr, "_amax")

        device = None if amaxes or not states else weight_device(states[0].members)
        self.values = lifecycle.group_amax(amaxes, group_ids, len(states), describe=describe, device=device)


def _populate_batched(states: list[SharedWeightGlobalAmaxState]) -> list[SharedWeightGlobalAmaxState]:
    """Finalize, sync and tie ``states`` together; return those that now hold a value."""
    gathered = _Gathered(states)
    values = sync_by_process_groups([state.group for state in states], gathered.values, gathered.parallel_states)
    flags = (values > UNSET).tolist()
    # States that hold a value already are updated in place, in one op: their members stay tied.
    in_place = [(s.global_amax, v) for s, v, ok in zip(states, values.unbind(), flags) if ok and _updatable(s.global_amax, v)]
    if in_place:
        torch._foreach_copy_([current for current, _ in in_place], [value for _, value in in_place])
    updated = {id(current) for current, _ in in_place}
    populated = []
    for state, value, ok, quantizers in zip(states, values.unbind(), flags, gathered.quantizers):
        if ok and id(state.global_amax) not in updated:
            state._set_value("_global_amax", value)  # a 0-dim view: all states share one storage
        current = state.global_amax
        if current is None or current.is_meta:
            continue
        populated.append(state)
        for quantizer in quantizers:
            if _holds_global_amax(quantizer):
                tie_(quantizer, "_global_amax", current)
    return populated


def _updatable(current: torch.Tensor | None, value: torch.Tensor) -> bool:
    return current is not None and current.dim() == 0 and current.dtype == value.dtype and current.device == value.device


def _restored(groups: Sequence[Group], quantizers: Sequence, qattr: str, attr: str) -> list[torch.Tensor | None]:
    """Each group's value from its members' ``attr`` (``quantizers`` flat, in group order); ``None`` where unset.

    Raises:
        ValueError: the members of a group disagree (the core names them).
    """
    members = (m for group in groups for m in group.members)
    buffers = {
        lifecycle.buffer_key(member, qattr, attr): value
        for member, quantizer in zip(members, quantizers)
        if quantizer is not None and (value := quantizer._buffers.get(attr)) is not None
    }
    values = lifecycle.restore(groups, buffers, quantizer=qattr, attr=attr).global_amax
    return [value if ok else None for value, ok in zip(values.unbind(), (values > UNSET).tolist())]


def iter_shared_quant_states(model: nn.Module, state_cls: type[SharedQuantState] = SharedQuantState) -> Iterator[SharedQuantState]:
    """Yield the shared quant states of class ``state_cls`` owned anywhere in ``model``, in model order."""
    seen: set[int] = set()  # a module reachable by two paths owns its states once
    stack = [model]
    while stack:
        module = stack.pop()
        states = state_list(module)
        if states is not None:
            yield from (state for state in states if isinstance(state, state_cls))
        # only modules with children can own a state list: leaves (most of a MoE) are not visited
        children = [c for c in module._modules.values() if c is not None and c._modules and c is not states]
        for child in reversed(children):
            if id(child) not in seen:
                seen.add(id(child))
                stack.append(child)
