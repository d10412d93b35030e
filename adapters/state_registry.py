"""Where states live: attach planning, registration at a group's parent, the tied-load check.

Every group is planned (and refused, if a member is already claimed) before any
state is registered, so a refused attach leaves the model as it was. Mutates the
parents: their ``_shared_quant_states`` list and one load-state-dict pre-hook each.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from functools import partial
from typing import TYPE_CHECKING

from torch import nn

from sharedquant.core import lifecycle
from sharedquant.core.groups import Group

from . import blank_modules, state_index
from .modules import CONTAINERS, quantizer_attr
from .state_batch import MemberQuantizers, StateBatch
from .state_index import SHARED_STATES
from .tying import untie_

if TYPE_CHECKING:
    from .shared_state import SharedQuantState


def attach_groups(
    cls: type[SharedQuantState],
    groups: Sequence[Group],
    modules: Mapping[str, nn.Module],
    gathered: MemberQuantizers | None = None,
):
    """The state of each group, created where missing; ``[(state, created), ...]`` in group order.

    Every group is checked before any state is registered, so a refused attach
    leaves the model as it was. ``gathered``, when the caller has them (restore does),
    are the groups' members and their quantizers, in group order: they are kept on the
    index as populate's batch (attach leaves it to the first populate, which gathers it
    in less time than attach would, its members' dicts fresher in cache).
    """
    holders = _holders(modules)
    owner: dict[int, SharedQuantState] = {}
    for fqn in holders:
        for state in modules[fqn]._modules[SHARED_STATES]:
            if same_kind(state, cls):
                owner.update((id(m), state) for m in state.members)
    plan = []
    for group in groups:
        members = [modules[m] for m in group.members]
        owners = {id(s): s for s in (owner.get(id(m)) for m in members) if s is not None} if owner else None
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
    holding = set(holders)
    new_state = blank_modules.maker(cls)
    for group, members, existing in plan:
        if existing is not None:
            result.append((existing, False))
            continue
        holding.add(group.parent)
        state = new_state()
        state.set_members(modules[group.parent], members)
        state.__dict__["_group"] = group
        register(modules[group.parent], state)
        state.install_hooks()
        result.append((state, True))
    # the holders before, and the new parents, in model order (no second read of every module)
    index = state_index.build(modules[""], modules, [fqn for fqn in modules if fqn in holding])
    if gathered is not None:  # the members are at hand: populate's batch costs nothing more
        states = [state for state in index.states if isinstance(state, cls)]
        if states == [state for state, _ in result]:
            index.batches[cls] = StateBatch.of(states, gathered)
    return result


def _holders(modules: Mapping[str, nn.Module]) -> list[str]:
    """FQNs of the modules that own a state list, in model order (none while no state is alive).

    A list with no state in it holds nothing an attach needs, so the read of every
    module is skipped when no state exists: a first attach, 50 ms at 49k members.
    """
    if not state_index.any_live():
        return []
    return [fqn for fqn, module in modules.items() if module._modules.get(SHARED_STATES) is not None]


def same_kind(state: SharedQuantState, cls: type[SharedQuantState]) -> bool:
    """Whether ``state`` and states of ``cls`` would tie the same buffer of the same quantizer."""
    return state.target_quantizer_kind == cls.target_quantizer_kind and not set(state.managed_attrs).isdisjoint(
        cls.managed_attrs
    )


_CHECK_KEY = "sharedquant.check_incoming_agree"  # the parents' load pre-hook


def register(parent: nn.Module, state: SharedQuantState) -> None:
    # Straight into _modules: add_module's name checks cost more than the rest of an
    # attach per group, and the names here are fixed and valid.
    states = parent._modules.get(SHARED_STATES)
    if states is None:
        states = parent._modules[SHARED_STATES] = blank_modules.maker(nn.ModuleList)()
        # On the parent, not the root: a load into any module that holds the group
        # (the whole model, one layer, a wrapper around either) must run the check.
        # Written as register_load_state_dict_pre_hook would, without its handle and
        # the name and docs it copies onto each hook (a sixth of an attach). One per
        # parent, under a fixed key: a parent whose list is rebuilt keeps one check.
        parent._load_state_dict_pre_hooks[_CHECK_KEY] = partial(check_incoming_agree, parent)
    states._modules[str(len(states._modules))] = state


def check_incoming_agree(parent, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
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
