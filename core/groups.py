"""Fused-sibling discovery over fully-qualified names. Pure: strings in, ``Group`` values out.

A group is the set of modules that export fuses into one tensor (q/k/v -> qkv,
gate/up -> gate_up, Mixtral w1/w3 per expert). Each pattern is ``re.fullmatch``-ed
against a name; names that give the same (pattern index, capture tuple) form one
group, so *what a pattern captures* sets the group boundary:

* ``(?:(.*)\\.)?(?:w1|w3)`` captures the immediate parent: one group per expert;
* ``(?:(.*)\\.)?(?:experts|local_experts)\\.\\d+\\.(?:w1|w3)`` leaves the expert index
  uncaptured: one group across all experts of a layer.

No module is involved: the adapter hands in names, the checkpoint tool hands in
state-dict prefixes, and both get the same groups.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

__all__ = [
    "SHARED_PATTERNS",
    "SHARED_PATTERNS_ACROSS_EXPERTS",
    "Group",
    "compile_patterns",
    "find_groups",
    "parent_fqn",
]

SHARED_PATTERNS: tuple[str, ...] = (
    r"(?:(.*)\.)?(?:q_proj|k_proj|v_proj)",
    r"(?:(.*)\.)?(?:gate_proj|up_proj)",
    r"(?:(.*)\.)?(?:w1|w3)",
)

SHARED_PATTERNS_ACROSS_EXPERTS: tuple[str, ...] = (
    r"(?:(.*)\.)?(?:q_proj|k_proj|v_proj)",
    r"(?:(.*)\.)?(?:gate_proj|up_proj)",
    r"(?:(.*)\.)?(?:experts|local_experts)\.\d+\.(?:w1|w3)",
)

GroupKey = tuple[int, tuple["str | None", ...]]


@dataclass(frozen=True, slots=True)
class Group:
    """One fused group: its key, the FQN of the module that owns it, its members.

    Attributes:
        key: ``(pattern index, capture tuple)``; unique among the groups of one call.
        parent: FQN of the members' deepest common ancestor (``""`` is the root),
            climbed past any container named in ``find_groups(containers=...)``.
        members: member FQNs in the order they were first seen.
    """

    key: GroupKey
    parent: str
    members: tuple[str, ...]


def compile_patterns(patterns: Iterable[str], where: str = "find_groups") -> tuple[re.Pattern, ...]:
    """Compile regexes, naming the offender on failure.

    Raises:
        TypeError: a pattern is not a string (a bare string passed as the sequence too).
        ValueError: a pattern is not a valid regex.
    """
    if isinstance(patterns, (str, bytes)):
        raise TypeError(f"{where}: patterns must be a sequence of regex strings, got the string {patterns!r}")
    if not isinstance(patterns, Iterable):
        raise TypeError(f"{where}: patterns must be a sequence of regex strings, got {patterns!r}")
    compiled = []
    for pattern in patterns:
        if not isinstance(pattern, str):
            raise TypeError(f"{where}: a pattern must be a string, got {pattern!r}")
        try:
            compiled.append(re.compile(pattern))
        except re.error as err:
            raise ValueError(f"{where}: invalid regex {pattern!r}: {err}") from err
    return tuple(compiled)


# The defaults' shape, ``(?:(.*)\.)?(?:role|role|...)``: such a pattern fully matches exactly
# the names whose last component is one of the roles, capturing what precedes the last dot.
# A set lookup then replaces the regex, whose greedy ``.*`` backtracks over the whole name
# (three patterns over 20k names: most of the cost of discovery).
_ROLE_PATTERN = re.compile(r"\(\?:\(\.\*\)\\\.\)\?\(\?:(\w+(?:\|\w+)*)\)")


def _matcher(regex: re.Pattern) -> Callable[[str], tuple | None]:
    """``name -> capture tuple`` if ``regex`` fully matches ``name``, else ``None``."""
    shape = _ROLE_PATTERN.fullmatch(regex.pattern)
    if shape is None:

        def match(name: str) -> tuple | None:
            found = regex.fullmatch(name)
            return None if found is None else found.groups()

        return match
    roles = frozenset(shape.group(1).split("|"))

    def match_role(name: str) -> tuple | None:
        prefix, dot, last = name.rpartition(".")
        return ((prefix if dot else None),) if last in roles else None

    return match_role


def parent_fqn(fqn: str) -> str:
    """The FQN of a module's parent (``""`` for a top-level child and for the root)."""
    return fqn.rpartition(".")[0]


def _common_ancestor(members: Sequence[str]) -> str:
    """Deepest module that is a strict ancestor of every member."""
    parts = [parent_fqn(m).split(".") if "." in m else [] for m in members]
    common = parts[0]
    for other in parts[1:]:
        length = 0
        for a, b in zip(common, other):
            if a != b:
                break
            length += 1
        common = common[:length]
    return ".".join(common)


def find_groups(
    names: Iterable[str],
    patterns: Sequence[str] | None,
    *,
    containers: Iterable[str] = (),
) -> tuple[Group, ...]:
    """Group names by the first pattern that fully matches them and its capture tuple.

    Args:
        names: module FQNs (``""`` is the root). Duplicates are ignored.
        patterns: regexes, ``re.fullmatch``-ed; a name belongs to the first that matches.
            ``None`` or empty finds nothing.
        containers: FQNs of modules that cannot own state (e.g. an ``nn.ModuleList``);
            a group parent that is one of them is climbed past to its own parent.

    Returns:
        Groups of two or more members, in the order their first member was seen.

    Raises:
        TypeError: a pattern is not a string.
        ValueError: a pattern is not a valid regex.
    """
    compiled = compile_patterns(patterns or ())
    if not compiled:
        return ()
    matchers = [_matcher(regex) for regex in compiled]
    buckets: dict[GroupKey, list[str]] = {}
    seen: set[str] = set()
    for name in names:
        if name in seen:
            continue
        seen.add(name)
        for index, match in enumerate(matchers):
            captures = match(name)
            if captures is not None:
                buckets.setdefault((index, captures), []).append(name)
                break
    skip = set(containers)
    groups = []
    for key, members in buckets.items():
        if len(members) < 2:
            continue
        parent = _common_ancestor(members)
        while parent in skip and parent:
            parent = parent_fqn(parent)
        groups.append(Group(key=key, parent=parent, members=tuple(members)))
    return tuple(groups)
