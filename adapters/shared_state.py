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
from typing import ClassVar

import torch
from torch import nn

from sharedquant.core import config, lifecycle
from sharedquant.core.groups import SHARED_PATTERNS, Group
from sharedquant.core.reduce import round_up_to_fp32
from sharedquant.core.state import UNSET, SharedAmax

from .modules import CONTAINERS, discover_groups, quantizer_attr, walk_modules
from .quantizer import TensorQuantizer
from .tying import is_tied, keep_fp32_, tie_, untie_

__all__ = ["SHARED_STATES", "SharedQuantState", "SharedWeightGlobalAmaxState", "iter_shared_quant_states"]

SHARED_STATES = "_shared_quant_states"


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
        # Plain attributes, not submodules: the members and parent already live in
        # the model tree, registering them here would duplicate them in state_dict.
        self.__dict__.update(_parent=None, _members=(), _hook_handles=[], _group=None)

    # -- membership -------------------------------------------------------------------
    def set_members(self, parent: nn.Module, members: Sequence[nn.Module]) -> None:
        """Set the owning parent and the member modules."""
        self.__dict__["_parent"] = parent
        self.__dict__["_members"] = tuple(members)

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
        attr = quantizer_attr(self.target_quantizer_kind)
        return [q for q in (m._modules.get(attr) for m in self.members) if q is not None]

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

    def restore_from_members(self) -> bool:
        """Rebuild the canonical buffers from the members' loaded ones and tie; return whether any was set.

        Raises:
            ValueError: the members disagree (nothing is tied).
        """
        values = {attr: _restore_values([self], attr)[0] for attr in self.managed_attrs}
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
        return sum(created for _, created in _attach_groups(cls, groups, modules))

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
        states = list(iter_shared_quant_states(model, cls))
        cls._populate_states(states)
        populated = 0
        for state in states:
            if SharedQuantState.finalize(state):
                state.remove_hooks()  # calibration is over
                populated += 1
        return populated

    @classmethod
    def _populate_states(cls, states: list[SharedQuantState]) -> None:
        for state in states:
            if state.finalize():
                state.sync(first_parallel_state(state))

    @classmethod
    def restore(cls, model: nn.Module, patterns: Sequence[str] | None = None) -> None:
        """Attach states and rebuild the ties from the members' loaded buffers (after ``load_state_dict``).

        Every group is checked before anything is attached or tied.

        Raises:
            ValueError: the members of a group disagree (named with their values).
        """
        patterns = cls.default_patterns if patterns is None else patterns
        groups, modules = discover_groups(model, patterns, cls.target_quantizer_kind, where=f"{cls.__name__}.restore")
        probes = [_Probe(group, modules, cls) for group in groups]
        values = {attr: _restore_values(probes, attr) for attr in cls.managed_attrs}
        for position, (state, _) in enumerate(_attach_groups(cls, groups, modules)):
            for attr in cls.managed_attrs:
                if values[attr][position] is not None:
                    state._set_value(attr, values[attr][position])
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
        value = None if value is None else round_up_to_fp32(torch.as_tensor(value).detach().reshape(()))
        self._set_value("_global_amax", value)
        self.tie_member_quantizers()

    def tie_member_quantizer(self, quantizer: nn.Module) -> bool:
        """Tie one member quantizer when it can hold a global amax and the value is set."""
        value = self._buffers.get("_global_amax")
        if value is None or not (isinstance(quantizer, TensorQuantizer) or hasattr(quantizer, "global_amax")):
            return False
        if not is_tied(quantizer, "_global_amax", value):
            tie_(quantizer, "_global_amax", value)
        return True

    def finalize(self) -> bool:
        """Set ``global_amax`` to the max over the members' calibrated ``_amax``; return whether set."""
        (value,) = _finalize_values([self])
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
        local = torch.full((1,), UNSET, device=_member_device(self)) if current is None else current.reshape(1)
        synced = sync_shared_amax(SharedAmax((self.group,), local), parallel_state).global_amax[0]
        if current is not None:
            current.copy_(synced)  # in place: the members see it
        elif synced > UNSET:
            self.global_amax = synced

    @classmethod
    def _populate_states(cls, states: list[SharedQuantState]) -> None:
        # All groups at once: one finalize, one collective per process group, then
        # in-place updates (states already holding a value) or new values + ties.
        values = _finalize_tensor(states)
        values = _sync_by_parallel_state(states, values)
        _assign(states, values, "_global_amax")


def iter_shared_quant_states(model: nn.Module, state_cls: type[SharedQuantState] = SharedQuantState) -> Iterator[SharedQuantState]:
    """Yield the shared quant states of class ``state_cls`` owned anywhere in ``model``, in model order."""
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


def first_parallel_state(state: SharedQuantState):
    """The first ``parallel_state`` a member carries, or ``None``."""
    for member in state.members:
        attrs = member.__dict__  # a plain attribute on QuantLinear: skip nn.Module.__getattr__
        parallel_state = attrs["parallel_state"] if "parallel_state" in attrs else getattr(member, "parallel_state", None)
        if parallel_state is not None:
            return parallel_state
    return None


def _member_device(state: SharedQuantState) -> torch.device:
    """Where the members' weights live (the device a collective must use), CPU if nowhere."""
    weights = (p for m in state.members for p in m.parameters(recurse=False) if not p.is_meta)
    return next((p.device for p in weights), torch.device("cpu"))


# -- batched plumbing between states and the core --------------------------------------
class _Probe:
    """A group not attached yet: what restore checks before attaching anything."""

    def __init__(self, group: Group, modules: Mapping[str, nn.Module], cls: type[SharedQuantState]) -> None:
        self.group = group
        attr = quantizer_attr(cls.target_quantizer_kind)
        self.members = tuple(modules[m] for m in group.members)
        self.target_quantizer_kind = cls.target_quantizer_kind
        self._attr = attr

    def member_quantizers(self) -> list[nn.Module]:
        return [q for q in (m._modules.get(self._attr) for m in self.members) if q is not None]


def _core_view(states: Sequence, attr: str) -> tuple[tuple[Group, ...], dict[str, torch.Tensor], str]:
    """The states' groups and a buffer dict of their members' ``attr``, keyed as the core expects."""
    kind = states[0].target_quantizer_kind if states else "weight"
    qattr = quantizer_attr(kind)
    groups = tuple(state.group for state in states)
    names = [m for g in groups for m in g.members]
    if len(set(names)) != len(names):  # states attached under different roots: make names unique
        groups = tuple(Group(g.key, f"[{i}]", tuple(f"[{i}].{m}" for m in g.members)) for i, g in enumerate(groups))
    buffers: dict[str, torch.Tensor] = {}
    for state, group in zip(states, groups):
        for member, name in zip(state.members, group.members):
            quantizer = member._modules.get(qattr)
            value = None if quantizer is None else quantizer._buffers.get(attr)
            if value is not None:
                buffers[lifecycle.buffer_key(name, qattr, attr)] = value
    return groups, buffers, qattr


def _finalize_tensor(states: Sequence) -> torch.Tensor:
    """Every state's group max through the core's batched kernel, gathered by reference, not by name."""
    qattr = quantizer_attr(states[0].target_quantizer_kind) if states else "weight_quantizer"
    tensors, group_ids, where = [], [], []
    for position, state in enumerate(states):
        for index, member in enumerate(state.members):
            quantizer = member._modules.get(qattr)
            amax = None if quantizer is None else quantizer._buffers.get("_amax")
            if amax is not None and not amax.is_meta:
                tensors.append(amax)
                group_ids.append(position)
                where.append((position, index))

    def describe(i: int) -> str:
        position, index = where[i]
        return lifecycle.buffer_key(states[position].group.members[index], qattr, "_amax")

    device = None if tensors or not states else _member_device(states[0])
    return lifecycle.group_amax(tensors, group_ids, len(states), describe=describe, device=device)


def _finalize_values(states: Sequence) -> list[torch.Tensor | None]:
    return _unpack(_finalize_tensor(states))


def _restore_values(states: Sequence, attr: str) -> list[torch.Tensor | None]:
    groups, buffers, qattr = _core_view(states, attr)
    return _unpack(lifecycle.restore(groups, buffers, quantizer=qattr, attr=attr).global_amax)


def _unpack(values: torch.Tensor) -> list[torch.Tensor | None]:
    # One storage for all groups: unbind gives 0-dim views without a copy each.
    return [value if ok else None for value, ok in zip(values.unbind(), (values > UNSET).tolist())]


def _sync_by_parallel_state(states: Sequence[SharedQuantState], values: torch.Tensor) -> torch.Tensor:
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


def _assign(states: Sequence[SharedQuantState], values: torch.Tensor, attr: str) -> None:
    """Move new values into the states: in place where a state already holds one, else set and tie."""
    targets, sources = [], []
    for state, value in zip(states, _unpack(values)):
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


def _attach_groups(cls: type[SharedQuantState], groups: Sequence[Group], modules: Mapping[str, nn.Module]):
    """The state of each group, created where missing; ``[(state, created), ...]`` in group order.

    Every group is checked before any state is registered, so a refused attach
    leaves the model as it was.
    """
    owner: dict[int, SharedQuantState] = {}
    for module in modules.values():
        for state in module._modules.get(SHARED_STATES, ()) or ():
            if _same_kind(state, cls):
                owner.update((id(m), state) for m in state.members)
    plan = []
    for group in groups:
        members = [modules[m] for m in group.members]
        owners = {id(s): s for s in (owner.get(id(m)) for m in members) if s is not None}
        if not owners:
            plan.append((group, members, None))
            continue
        existing = next(iter(owners.values())) if len(owners) == 1 else None
        if (
            existing is None
            or not isinstance(existing, cls)
            or tuple(map(id, existing.members)) != tuple(map(id, members))
        ):
            claimed = next(m for m in group.members if id(modules[m]) in owner)
            holder = type(owner[id(modules[claimed])]).__name__
            raise ValueError(
                f"attach: {claimed!r} already belongs to a {holder} group; a module cannot be claimed by two "
                f"states of the same kind (new {cls.__name__} group {group.parent or '<root>'!r} {group.key!r})"
            )
        plan.append((group, members, existing))
    for group, _, existing in plan:
        if existing is None and isinstance(modules[group.parent], CONTAINERS):
            # Only the root can be left: find_groups climbs past every other container.
            raise ValueError(
                f"attach: group {group.key!r} ({', '.join(group.members)}) has no parent that can own a "
                f"state: the model itself is a {type(modules[group.parent]).__name__}; attach to a module "
                "that contains it"
            )
    result = []
    for group, members, existing in plan:
        if existing is not None:
            result.append((existing, False))
            continue
        state = cls()
        state.set_members(modules[group.parent], members)
        state.__dict__["_group"] = group
        _register(modules[group.parent], state)
        state.install_hooks()
        result.append((state, True))
    return result


def _same_kind(state: SharedQuantState, cls: type[SharedQuantState]) -> bool:
    """Whether ``state`` and states of ``cls`` would tie the same buffer of the same quantizer."""
    return state.target_quantizer_kind == cls.target_quantizer_kind and not set(state.managed_attrs).isdisjoint(
        cls.managed_attrs
    )


def _register(parent: nn.Module, state: SharedQuantState) -> None:
    # Straight into _modules: add_module's name checks cost more than the rest of an
    # attach per group, and the names here are fixed and valid.
    states = parent._modules.get(SHARED_STATES)
    if states is None:
        states = parent._modules[SHARED_STATES] = nn.ModuleList()
        # On the parent, not the root: a load into any module that holds the group
        # (the whole model, one layer, a wrapper around either) must run the check.
        parent.register_load_state_dict_pre_hook(_check_incoming_agree)
    states._modules[str(len(states._modules))] = state


def _check_incoming_agree(parent, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
    """Before a parent's tied groups load: each group's incoming values must agree.

    Loading copies each member's entry into the one shared tensor, so disagreeing
    entries would silently leave the last one for all. Instead those members are
    untied (each loads its own value) and the disagreement is reported like any
    other load error.
    """
    for state in parent._modules.get(SHARED_STATES, ()) or ():
        group = state.group
        strip = f"{group.parent}." if group.parent else ""
        relative = Group(group.key, group.parent, tuple(m.removeprefix(strip) for m in group.members))
        qattr = quantizer_attr(state.target_quantizer_kind)
        for attr in state.managed_attrs:
            keys = [lifecycle.buffer_key(m, qattr, attr) for m in relative.members]
            incoming = {key: state_dict[prefix + key] for key in keys if prefix + key in state_dict}
            try:
                lifecycle.restore((relative,), incoming, quantizer=qattr, attr=attr)
            except ValueError as err:
                error_msgs.append(str(err))
                for quantizer in state.member_quantizers():
                    untie_(quantizer, attr)
