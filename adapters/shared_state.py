"""Shared quantization state on real modules: ``SharedQuantState`` and ``SharedWeightGlobalAmaxState``.

A state is an ``nn.Module`` registered at its group's parent, in the parent's
``_shared_quant_states`` list, holding the group's canonical tensor(s) as
non-persistent buffers; member quantizers are tied to them (``tying.tie_``).
The adapter is thin: discovery, finalize, sync and restore are the core's pure
functions, run over all states at once; this file only moves their results into
buffers and ties. What it mutates: the parents (state lists, one load hook each),
the states' buffers and the member quantizers' buffers.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator, Mapping, Sequence
from itertools import chain, repeat
from operator import attrgetter, is_, itemgetter
from typing import ClassVar

import torch
from torch import nn

from sharedquant.core import config
from sharedquant.core.groups import SHARED_PATTERNS, Group
from sharedquant.core.reduce import round_up_to_fp32
from sharedquant.core.state import UNSET, SharedAmax

from .blank_modules import fields_only
from .modules import discover_groups
from .quantizer import TensorQuantizer
from .state_batch import (
    MemberQuantizers,
    Probe,
    StateBatch,
    assign,
    finalize_tensor,
    finalize_values,
    first_parallel_state,
    first_parallel_states,
    member_device,
    restore_values,
    sync_by_parallel_state,
)
from .state_index import holding, indexed_states, membership_changed, track
from .state_registry import SHARED_STATES, attach_groups
from .tying import is_tied, keep_fp32_, tie_, tie_all_, untie_

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

    def __new__(cls, *args, **kwargs):
        # Here, not in __init__: copy, unpickling and blank_modules make states
        # without __init__, and every live state must be counted.
        state = super().__new__(cls)
        track(state)
        return state

    @fields_only
    def __init__(self) -> None:
        """An empty state: no parent, no members, no hooks."""
        super().__init__()
        # Plain attributes, not submodules: the members and parent already live in
        # the model tree, registering them here would duplicate them in state_dict.
        self.__dict__.update(_parent=None, _members=(), _hook_handles=[], _group=None)

    # -- membership -------------------------------------------------------------------
    def set_members(self, parent: nn.Module, members: Sequence[nn.Module]) -> None:
        """Set the owning parent and the member modules."""
        self.__dict__["_parent"] = parent
        self.__dict__["_members"] = tuple(members)
        membership_changed()

    @property
    def members(self) -> tuple[nn.Module, ...]:
        """The member modules."""
        return self.__dict__["_members"]

    @property
    def group(self) -> Group:
        """The core's view of this state: key, parent FQN and member FQNs."""
        group = self.__dict__["_group"]
        if group is None:  # set_members without attach: name members by position
            group = Group(key=(-1, (str(id(self)),)), parent="", members=tuple(f"<member {i}>" for i in range(len(self.members))))
        return group

    def member_quantizers(self) -> list[nn.Module]:
        """The members' target quantizers (members without one are left out)."""
        return [q for q in MemberQuantizers.of([self]).quantizers if q is not None]

    # -- hooks ------------------------------------------------------------------------
    def install_hooks(self) -> None:
        """Install parent/member hooks for runtime shared computation (none by default)."""

    def remove_hooks(self) -> None:
        """Remove the hooks ``install_hooks`` installed."""
        for handle in self.__dict__["_hook_handles"]:
            handle.remove()
        self.__dict__["_hook_handles"] = []

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

    @classmethod
    def tie_states(cls, batch: StateBatch) -> None:
        """``tie_member_quantizers`` on every state of ``batch`` (subclasses tie them all at once)."""
        for state in batch.states:
            state.tie_member_quantizers()

    def restore_from_members(self) -> bool:
        """Rebuild the canonical buffers from the members' loaded ones and tie; return whether any was set.

        Raises:
            ValueError: the members disagree (nothing is tied).
        """
        values = {attr: restore_values([self], attr)[0] for attr in self.managed_attrs}
        for attr, value in values.items():
            if value is not None:
                self._set_value(attr, value)
        self.tie_member_quantizers()
        return any(value is not None for value in values.values())

    def _set_value(self, attr: str, value: torch.Tensor | None) -> None:
        if attr in self._buffers:
            self._buffers[attr] = value
        else:
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
        """Finalize and sync every state of this class in ``model``; return how many hold a value."""
        batch = _batch_of(model, cls)
        populated = [state for state, ok in zip(batch.states, cls._populate_states(batch)) if ok]
        if any(map(itemgetter("_hook_handles"), map(_DICT, populated))):
            for state in populated:
                if state.__dict__["_hook_handles"]:
                    state.remove_hooks()  # calibration is over
        return len(populated)

    @classmethod
    def _populate_states(cls, batch: StateBatch) -> list[bool]:
        """Finalize and sync the states of ``batch``; whether each now holds a value."""
        for state in batch.states:
            if state.finalize():
                state.sync(first_parallel_state(state))
        return [SharedQuantState.finalize(state) for state in batch.states]

    @classmethod
    def restore(cls, model: nn.Module, patterns: Sequence[str] | None = None) -> None:
        """Attach states and rebuild the ties from the members' loaded buffers (after ``load_state_dict``).

        Every group is checked before anything is attached or tied.

        Raises:
            ValueError: the members of a group disagree (named with their values).
        """
        patterns = cls.default_patterns if patterns is None else patterns
        groups, modules = discover_groups(model, patterns, cls.target_quantizer_kind, where=f"{cls.__name__}.restore")
        probes = [Probe(group, tuple(modules[m] for m in group.members), cls.target_quantizer_kind) for group in groups]
        members = MemberQuantizers.of(probes)  # the states attached below have these same members
        values = {attr: restore_values(probes, attr, members) for attr in cls.managed_attrs}
        states = [state for state, _ in attach_groups(cls, groups, modules, members)]
        for position, state in enumerate(states):
            for attr in cls.managed_attrs:
                if values[attr][position] is not None:
                    state._set_value(attr, values[attr][position])
        cls.tie_states(StateBatch.of(states, members))

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

    @fields_only
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
        tie_all_((quantizer,), "_global_amax", (value,))
        return True

    def tie_member_quantizers(self) -> None:
        """Tie every member quantizer that can hold a global amax (none while unset)."""
        type(self).tie_states(StateBatch.of([self]))

    @classmethod
    def tie_states(cls, batch: StateBatch) -> None:
        """Tie the members of every state of ``batch`` in one pass."""
        members = batch.members
        state_values = map(dict.get, batch.state_buffers, repeat("_global_amax"))
        values = list(chain.from_iterable(map(repeat, state_values, members.counts)))
        quantizers = members.quantizers
        kinds = set(map(type, quantizers))  # read each time: a class can be swapped in place (the peer's promotion does)
        if type(None) in kinds or not all(map(_holds_global_amax_kind, kinds)) or any(map(is_, values, repeat(None))):
            pairs = [(q, v) for q, v in zip(quantizers, values) if v is not None and q is not None and _holds_global_amax(q)]
            tie_all_([q for q, _ in pairs], "_global_amax", [v for _, v in pairs])
            return
        tie_all_(quantizers, "_global_amax", values, (members.quantizer_buffers, members.quantizer_dicts), kinds)

    def finalize(self) -> bool:
        """Set ``global_amax`` to the max over the members' calibrated ``_amax``; return whether set."""
        (value,) = finalize_values([self])
        if value is None:
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
        from .distributed import sync_shared_amax

        current = self.global_amax
        # An unset rank still takes part (-inf), else the ranks holding a value wait on it.
        local = torch.full((1,), UNSET, device=member_device(self)) if current is None else current.reshape(1)
        synced = sync_shared_amax(SharedAmax((self.group,), local), parallel_state).global_amax[0]
        if current is not None:
            current.copy_(synced)  # in place: the members see it
        elif synced > UNSET:
            self.global_amax = synced

    @classmethod
    def _populate_states(cls, batch: StateBatch) -> list[bool]:
        # All groups at once: one finalize, one collective per process group, then
        # in-place updates (states already holding a value) or new values, then ties.
        states, members = batch.states, batch.members
        values = finalize_tensor(batch)
        values = sync_by_parallel_state(states, values, first_parallel_states(states, members))
        assigned = assign(batch, values, "_global_amax")
        if all(assigned):
            cls.tie_states(batch)
            return assigned  # every state holds a new, real value
        cls.tie_states(StateBatch.of([state for state, ok in zip(states, assigned) if ok]))
        # SharedQuantState.finalize for the one managed attribute, without its generator per state
        currents = map(dict.get, batch.state_buffers, repeat("_global_amax"))
        return [value is not None and not value.is_meta for value in currents]


_DICT = attrgetter("__dict__")
_HOLDS_GLOBAL_AMAX: dict[type, bool] = {}


def _holds_global_amax_kind(kind: type) -> bool:
    """Whether every quantizer of class ``kind`` can hold a global amax."""
    holds = _HOLDS_GLOBAL_AMAX.get(kind)
    if holds is None:
        holds = _HOLDS_GLOBAL_AMAX[kind] = issubclass(kind, TensorQuantizer) or hasattr(kind, "global_amax")
    return holds


def _holds_global_amax(quantizer: nn.Module) -> bool:
    """Whether a quantizer can hold a global amax: ours, or one with a ``global_amax`` attribute."""
    return _holds_global_amax_kind(type(quantizer)) or hasattr(quantizer, "global_amax")


def _batch_of(model: nn.Module, cls: type[SharedQuantState]) -> StateBatch:
    """The states of ``cls`` in ``model`` as a batch: the one kept on its index while it holds."""
    index = holding(model)
    if index is None:
        return StateBatch.of(list(iter_shared_quant_states(model, cls)))
    batch = index.batches.get(cls)
    if batch is None or not batch.holds():
        batch = index.batches[cls] = StateBatch.of([state for state in index.states if isinstance(state, cls)])
    return batch


def iter_shared_quant_states(model: nn.Module, state_cls: type[SharedQuantState] = SharedQuantState) -> Iterator[SharedQuantState]:
    """Yield the shared quant states of class ``state_cls`` owned anywhere in ``model``, in model order."""
    indexed = indexed_states(model)
    if indexed is not None:
        yield from (state for state in indexed if isinstance(state, state_cls))
        return
    # A state list is a ModuleList of leaves; only modules with children can own one.
    # No names are needed here, so this walk skips building them (populate's main cost).
    seen: set[int] = set()
    stack = [model._modules]
    while stack:
        children = stack.pop()
        states = children.get(SHARED_STATES)
        if states is not None:
            for state in states._modules.values():
                if isinstance(state, state_cls) and id(state) not in seen:
                    seen.add(id(state))
                    yield state
        stack += [child._modules for child in reversed(children.values()) if child is not None and child._modules]
