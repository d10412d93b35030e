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
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

__all__ = [
    "DEFAULT_PATTERNS",
    "MLA_PATTERN",
    "SHARED_PATTERNS",
    "SHARED_PATTERNS_ACROSS_EXPERTS",
    "Group",
    "compile_patterns",
    "find_groups",
    "group_kind",
    "in_role_order",
    "is_expert",
    "join_fqn",
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

MLA_PATTERN = r"(?:(.*)\.)?(?:q_a_proj|kv_a_proj_with_mqa)"
"""DeepSeek-style MLA: the two down-projections of the attention input are fused at export."""

# The checkpoint tool's defaults (``inspect`` / ``reconcile``), documented here and nowhere
# else. Each line is one set of siblings that an engine loads into ONE fused tensor with
# ONE per-tensor scale; the fused names are those of vLLM's ``packed_modules_mapping``
# (vllm/model_executor/models/*.py). Members are listed in the order the fused tensor
# stacks them: the first role is the one vLLM's MoE path keeps the scale of (the gate).
# Keep one pattern a line, each of the shape ``(?:(.*)\.)?(?:role|role...)``: that shape
# takes find_groups' fast path (``_ROLE_PATTERN``), and a line is an easy merge.
DEFAULT_PATTERNS: tuple[str, ...] = (
    *SHARED_PATTERNS,  # qkv_proj, gate_up_proj (dense and per expert), Mixtral/InternLM2 w1/w3
    MLA_PATTERN,  # fused_qkv_a_proj: DeepSeek V2/V3 MLA, deepseek_v2.py (SGLang: fused_qkv_a_proj_with_mqa)
    r"(?:(.*)\.)?(?:in_proj_qkv|in_proj_z)",  # in_proj_qkvz: Qwen3.5 gated delta net, qwen3_5.py
    r"(?:(.*)\.)?(?:in_proj_b|in_proj_a)",  # in_proj_ba: Qwen3.5 gated delta net, qwen3_5.py
    r"(?:(.*)\.)?(?:to_q|to_k|to_v)",  # diffusers Attention.fuse_projections: to_qkv
    r"(?:(.*)\.)?(?:add_q_proj|add_k_proj|add_v_proj)",  # diffusers joint attention: to_added_qkv
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
# When every pattern has it, one dict lookup per name replaces a regex per pattern, whose
# greedy ``.*`` backtracks over the whole name (most of the cost of discovery on MoE models).
_ROLE_PATTERN = re.compile(r"\(\?:\(\.\*\)\\\.\)\?\(\?:(\w+(?:\|\w+)*)\)")


def _role_table(compiled: Sequence[re.Pattern]) -> dict[str, int] | None:
    """``role -> index of the first pattern naming it`` when every pattern has the defaults' shape, else ``None``."""
    shapes = [_ROLE_PATTERN.fullmatch(regex.pattern) for regex in compiled]
    if not all(shapes):
        return None
    first: dict[str, int] = {}
    for index, shape in enumerate(shapes):
        for role in shape.group(1).split("|"):
            first.setdefault(role, index)
    return first


def join_fqn(fqn: str, name: str) -> str:
    """The FQN of ``name`` under module ``fqn`` (``""`` is the root)."""
    return f"{fqn}.{name}" if fqn else name


def parent_fqn(fqn: str) -> str:
    """The FQN of a module's parent (``""`` for a top-level child and for the root)."""
    return fqn.rpartition(".")[0]


def _common_ancestor(members: Sequence[str]) -> str:
    """Deepest module that is a strict ancestor of every member."""
    parents = {parent_fqn(m) for m in members}
    if len(parents) == 1:  # siblings, the usual case
        return parents.pop()
    parts = [parent.split(".") if parent else [] for parent in parents]
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
    unique = dict.fromkeys(names)  # first-seen order, duplicates dropped
    skip = set(containers)
    groups = []
    for key, parent, members in _buckets(unique, compiled):
        if len(members) < 2:
            continue
        if parent is None:
            parent = _common_ancestor(members)
        while parent in skip and parent:
            parent = parent_fqn(parent)
        groups.append(Group(key, parent, tuple(members)))  # positional: keywords cost a third more
    return tuple(groups)


# Names by group key: (key, the group's parent when known without a walk over the members
# or else None, the members in first-seen order).
_Buckets = list[tuple[GroupKey, "str | None", list[str]]]


def _buckets(names: Iterable[str], compiled: Sequence[re.Pattern]) -> _Buckets:
    """Each name under the first pattern that fully matches it, with the role shortcut when every pattern allows it."""
    first = _role_table(compiled)
    return _buckets_by_regex(names, compiled) if first is None else _buckets_by_role(names, first)


def _buckets_by_regex(names: Iterable[str], compiled: Sequence[re.Pattern]) -> _Buckets:
    buckets: dict[GroupKey, list[str]] = {}
    for name in names:
        for index, regex in enumerate(compiled):
            found = regex.fullmatch(name)
            if found is not None:
                buckets.setdefault((index, found.groups()), []).append(name)
                break
    return [(key, None, members) for key, members in buckets.items()]


def _buckets_by_role(names: Iterable[str], first: dict[str, int]) -> _Buckets:
    """``_buckets_by_regex`` for role-shaped patterns (``_ROLE_PATTERN``): a ``rpartition`` and two lookups a name.

    Members of one bucket share what precedes their last dot, which is therefore their
    parent: no common-ancestor walk.
    """
    buckets: dict[tuple[int, str, str], list[str]] = {}
    for name in names:
        prefix, dot, last = name.rpartition(".")
        index = first.get(last)
        if index is not None:
            buckets.setdefault((index, prefix, dot), []).append(name)
    return [((index, (prefix if dot else None,)), prefix, members) for (index, prefix, dot), members in buckets.items()]


# The last ``(?:word|word...)`` of a pattern: the alternation that names the roles.
_ALTERNATION = re.compile(r"\(\?:(\w+(?:\|\w+)+)\)")
# An expert's own module: ``...experts.7`` (Mixtral's ``block_sparse_moe.experts.7``, DeepSeek's
# ``mlp.experts.7``); shared experts (``mlp.shared_experts``) are dense layers to an engine.
_EXPERT = re.compile(r"(?:^|\.)(?:experts|local_experts)\.\d+$")


def _roles(pattern: str) -> tuple[str, ...]:
    """The role names of a pattern's last word alternation (``()`` when it has none)."""
    found = _ALTERNATION.findall(pattern)
    return tuple(found[-1].split("|")) if found else ()


def in_role_order(groups: Sequence[Group], patterns: Sequence[str]) -> tuple[Group, ...]:
    """The groups with their members in the order of their pattern's role alternation.

    ``find_groups`` keeps members in first-seen order (``k_proj`` before ``q_proj`` in a
    sorted checkpoint); this orders each module's siblings as the pattern names them
    (q, k, v; gate, up), modules in first-seen order. A member whose last name component
    is not one of the roles keeps its place after those that are.

    Args:
        groups: what ``find_groups(names, patterns)`` returned.
        patterns: the same patterns (a group's key holds its pattern's index).
    """
    ranks = [{role: rank for rank, role in enumerate(_roles(pattern))} for pattern in patterns]
    ordered = []
    for group in groups:
        rank = ranks[group.key[0]]
        splits = [fqn.rpartition(".") for fqn in group.members]
        # module (first-seen), then role: one sort key a member, no regex (this runs per group of 40k)
        modules = {prefix: index for index, prefix in enumerate(dict.fromkeys(split[0] for split in splits))}
        keys = [(modules[prefix], rank.get(last, len(rank))) for prefix, _, last in splits]
        if all(a <= b for a, b in zip(keys, keys[1:])):
            ordered.append(group)  # already in order: the same value back
        else:
            members = tuple(group.members[i] for i in sorted(range(len(keys)), key=keys.__getitem__))  # stable
            ordered.append(Group(group.key, group.parent, members))
    return tuple(ordered)


def is_expert(fqn: str) -> bool:
    """Whether module ``fqn`` is one routed expert of an MoE layer (``...experts.<index>``)."""
    return _EXPERT.search(fqn) is not None


def group_kind(group: Group) -> str:
    """A group's kind, from its members' last name components: ``"q_proj/k_proj/v_proj"``.

    Siblings inside one routed expert get ``" (per expert)"``; a group whose members
    repeat a role (one group across the experts of a layer) gets ``" (across experts)"``.
    Engines treat these differently, so they are summarised apart.
    """
    lasts = [fqn.rpartition(".")[2] for fqn in group.members]
    roles = "/".join(dict.fromkeys(lasts))
    if len(set(lasts)) < len(lasts):
        return f"{roles} (across experts)"
    return f"{roles} (per expert)" if is_expert(parent_fqn(group.members[0])) else roles
