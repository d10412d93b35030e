"""Where a model's states are, found without walking the model: an index checked in O(states).

``populate`` and ``iter_shared_quant_states`` need every state in a model, and walking
the ~80k modules of a 48-layer, 128-expert MoE costs more than all the rest of a
populate. So ``attach`` (and ``restore``) leave an index on the root: every link
on the paths from the root to its states, as (``_modules`` dict, name, module).

An index is used only when it is still exact:

* every link still holds, checked by identity (a module replaced, deleted or moved on
  a path, a state list swapped, a state removed: the link fails);
* every state alive in the process is in it (a state attached through another root, a
  subtree with states moved in, a deep copy alive beside the model: the count differs).

Otherwise the caller walks the model, as it would without an index. The checks are
C-level iterations: about 0.1 us per link.
"""

from __future__ import annotations

import operator
import weakref
from collections.abc import Mapping, Sequence
from itertools import repeat
from typing import TYPE_CHECKING, NamedTuple

from torch import nn

if TYPE_CHECKING:
    from .shared_state import SharedQuantState

INDEX = "_shared_quant_state_index"
SHARED_STATES = "_shared_quant_states"

# Every SharedQuantState alive in the process (added by SharedQuantState.__new__).
_LIVE: weakref.WeakSet = weakref.WeakSet()
# Bumped whenever a state's members are set: a batch gathered before names stale members.
_membership = 0


def track(state: SharedQuantState) -> None:
    """Count ``state`` among the live states (``SharedQuantState.__new__`` calls this)."""
    _LIVE.add(state)


def membership_changed() -> None:
    """Record that some state's members were set (``SharedQuantState.set_members`` calls this)."""
    global _membership
    _membership += 1


def membership() -> int:
    """How many times states' members were set in this process."""
    return _membership


def any_live() -> bool:
    """Whether any state is alive in the process (none before the first attach)."""
    return bool(_LIVE)


class Batches(dict):
    """State class -> the ``StateBatch`` of its states in one model; empty in any copy.

    A batch holds its modules' own ``__dict__`` objects; a deep copy or an unpickled
    model has new modules, whose dicts a copied batch would not be.
    """

    def __copy__(self) -> Batches:
        return Batches()

    def __deepcopy__(self, memo) -> Batches:
        return Batches()

    def __reduce__(self):
        return Batches, ()


class StateIndex(NamedTuple):
    """The links from a root to its states, the states in model order, and their batches."""

    dicts: tuple[dict, ...]
    names: tuple[str, ...]
    targets: tuple[object, ...]
    states: tuple[SharedQuantState, ...]
    batches: Batches  # gathered on first use

    def holds(self) -> bool:
        """Whether the index still names exactly the states in its model."""
        return len(self.states) == len(_LIVE) and all(
            map(operator.is_, map(dict.get, self.dicts, self.names), self.targets)
        )


def build(model: nn.Module, modules: Mapping[str, nn.Module], holders: Sequence[str]) -> StateIndex:
    """Index the state lists of ``holders`` on ``model``.

    ``modules`` maps FQN -> module for one walk of ``model``; ``holders`` names, in
    model order, every module in it that owns a state list.
    """
    paths: dict[str, tuple[dict, str, object]] = {}  # shared prefixes, once each
    dicts: list[dict] = []
    names: list[str] = []
    targets: list[object] = []
    states: list[SharedQuantState] = []
    for fqn in holders:
        module = modules[fqn]
        state_list = module._modules[SHARED_STATES]
        if not _link_path(paths, modules, fqn):
            continue
        # a holder's own links are met once: appended, not deduplicated
        listed = state_list._modules
        dicts += [module._modules, *repeat(listed, len(listed))]
        names += [SHARED_STATES, *listed]
        targets += [state_list, *listed.values()]
        states += listed.values()
    if paths:
        path_dicts, path_names, path_targets = zip(*paths.values())
        dicts += path_dicts
        names += path_names
        targets += path_targets
    index = model.__dict__[INDEX] = StateIndex(tuple(dicts), tuple(names), tuple(targets), tuple(dict.fromkeys(states)), Batches())
    return index


def _link_path(links: dict, modules: Mapping[str, nn.Module], fqn: str) -> bool:
    # One link per step from the root to ``fqn``, shared prefixes added once, keyed by
    # the child's FQN (``modules`` lists each module once: one FQN is one link). A name
    # that is not a plain dotted path (no parent in ``modules``) is left unindexed,
    # which makes the index fail its count: the walk then finds that state.
    while fqn and fqn not in links:
        parent, _, name = fqn.rpartition(".")
        owner = modules.get(parent)
        if owner is None:
            return False
        links[fqn] = (owner._modules, name, modules[fqn])
        fqn = parent
    return True


def holding(model: nn.Module) -> StateIndex | None:
    """The index of ``model``, or ``None`` when it has none that holds."""
    index = model.__dict__.get(INDEX)
    return index if index is not None and index.holds() else None


def indexed_states(model: nn.Module) -> tuple[SharedQuantState, ...] | None:
    """The states of ``model`` from its index, or ``None`` when it has none that holds."""
    index = holding(model)
    return None if index is None else index.states
