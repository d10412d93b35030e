"""Where states live: each group parent's ``_shared_quant_states`` list and its load check.

``attach_groups`` plans every group (and refuses a member already claimed) before it
registers any state, so a refused attach leaves the model as it was. Mutates the
parents only, through torch's public API: ``add_module``, ``ModuleList.append`` and
``register_load_state_dict_pre_hook`` (its handle kept on the list). Works on any
``SharedQuantState`` class, passed in: nothing here imports the states.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from functools import partial

from torch import nn

from sharedquant.core import lifecycle
from sharedquant.core.groups import Group

from .modules import CONTAINERS, quantizer_attr
from .tying import untie_

__all__ = ["SHARED_STATES", "attach_groups", "state_list"]

SHARED_STATES = "_shared_quant_states"  # the peer's name too: its models and ours read alike


def state_list(module: nn.Module) -> nn.ModuleList | None:
    # A read of torch's child registry: getattr would raise and catch an AttributeError
    # for each of the tens of thousands of modules without a list.
    return module._modules.get(SHARED_STATES)


def _state_list_of(parent: nn.Module) -> nn.ModuleList:
    """The parent's state list, created (with its load check) where missing."""
    states = state_list(parent)
    if states is None:
        states = nn.ModuleList()
        parent.add_module(SHARED_STATES, states)
        # On the parent, not the root: a load into any module that holds the group (the
        # whole model, one layer, a wrapper around either) must run the check. The handle
        # lives on the list; a hook whose list was replaced does nothing.
        states.load_check = parent.register_load_state_dict_pre_hook(partial(_check_incoming_agree, states))
    return states


def _same_kind(state: nn.Module, cls: type) -> bool:
    """Whether ``state`` and states of ``cls`` would tie the same buffer of the same quantizer."""
    return state.target_quantizer_kind == cls.target_quantizer_kind and not set(state.managed_attrs).isdisjoint(
        cls.managed_attrs
    )


def attach_groups(cls: type, groups: Sequence[Group], modules: Mapping[str, nn.Module]):
    """The state of each group, created where missing; ``[(state, created), ...]`` in group order.

    Every group is checked before any state is registered, so a refused attach leaves
    the model as it was.
    """
    owner: dict[int, nn.Module] = {}
    for module in modules.values():
        for state in state_list(module) or ():
            if _same_kind(state, cls):
                owner.update((id(m), state) for m in state.members)
    plan = []
    for group in groups:
        members = [modules[m] for m in group.members]
        owners = {id(s): s for s in (owner.get(id(m)) for m in members) if s is not None}
        existing = next(iter(owners.values())) if len(owners) == 1 else None
        if owners and (existing is None or not isinstance(existing, cls) or list(map(id, existing.members)) != list(map(id, members))):
            claimed = next(m for m in group.members if id(modules[m]) in owner)
            holder = type(owner[id(modules[claimed])]).__name__
            raise ValueError(
                f"attach: {claimed!r} already belongs to a {holder} group; a module cannot be claimed by two "
                f"states of the same kind (new {cls.__name__} group {group.parent or '<root>'!r} {group.key!r})"
            )
        if existing is None and isinstance(modules[group.parent], CONTAINERS):
            # Only the root can be left: find_groups climbs past every other container.
            raise ValueError(
                f"attach: group {group.key!r} ({', '.join(group.members)}) has no parent that can own a "
                f"state: the model itself is a {type(modules[group.parent]).__name__}; attach to a module "
                "that contains it"
            )
        plan.append((group, members, existing))
    result = []
    for group, members, existing in plan:
        if existing is not None:
            result.append((existing, False))
            continue
        state = cls()
        state.set_members(modules[group.parent], members)
        state._group = group
        _state_list_of(modules[group.parent]).append(state)
        state.install_hooks()
        result.append((state, True))
    return result


def _check_incoming_agree(
    states, parent, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
) -> None:
    """Before a parent's tied groups load: each group's incoming values must agree.

    Loading copies each member's entry into the one shared tensor, so disagreeing
    entries would silently leave the last one for all. Instead those members are
    untied (each loads its own value) and the disagreement is reported like any
    other load error.
    """
    if state_list(parent) is not states:
        return  # the list this check was made for was replaced; its successor has its own
    for state in states:
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
