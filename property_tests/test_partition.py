"""Grouping: a partition of the matched names, exactly by first-match key, independent of arrival order."""

from __future__ import annotations

import re

from hypothesis import given
from hypothesis import strategies as st

from sharedquant.core.groups import find_groups

from strategies import pattern_sets, trees


def first_key(name: str, patterns) -> tuple | None:
    """The brute-force key: the first pattern that fully matches, with its captures."""
    for index, pattern in enumerate(patterns):
        match = re.fullmatch(pattern, name)
        if match:
            return index, match.groups()
    return None


def ancestors(fqn: str) -> list[str]:
    """Every strict ancestor of ``fqn``, root (``""``) first."""
    parts = fqn.split(".") if fqn else []
    return [".".join(parts[:depth]) for depth in range(len(parts))]


def normalized(groups) -> set:
    return {(g.key, g.parent, frozenset(g.members)) for g in groups}


@given(trees(), pattern_sets())
def test_groups_are_disjoint_and_hold_at_least_two_names(tree, patterns):
    groups = find_groups(tree.names, patterns, containers=tree.containers)
    members = [m for g in groups for m in g.members]
    assert len(members) == len(set(members))
    assert all(len(g.members) >= 2 for g in groups)
    assert set(members) <= set(tree.names)
    assert len({g.key for g in groups}) == len(groups)


@given(trees(), pattern_sets())
def test_each_group_is_exactly_the_names_sharing_a_first_match_key(tree, patterns):
    by_key: dict = {}
    for name in dict.fromkeys(tree.names):
        key = first_key(name, patterns)
        if key is not None:
            by_key.setdefault(key, []).append(name)
    expected = {key: tuple(names) for key, names in by_key.items() if len(names) >= 2}
    groups = find_groups(tree.names, patterns, containers=tree.containers)
    assert {g.key: g.members for g in groups} == expected


@given(trees(), pattern_sets(), st.randoms(use_true_random=False))
def test_arrival_order_changes_only_member_and_group_order(tree, patterns, rng):
    shuffled = list(tree.names)
    rng.shuffle(shuffled)
    original = find_groups(tree.names, patterns, containers=tree.containers)
    reordered = find_groups(shuffled, patterns, containers=tree.containers)
    assert normalized(original) == normalized(reordered)
    position = {name: shuffled.index(name) for name in shuffled}
    for group in reordered:
        assert list(group.members) == sorted(group.members, key=position.__getitem__)
    firsts = [position[g.members[0]] for g in reordered]
    assert firsts == sorted(firsts)


@given(trees(), pattern_sets())
def test_parent_is_the_deepest_common_ancestor_that_is_not_a_container(tree, patterns):
    containers = set(tree.containers)
    for group in find_groups(tree.names, patterns, containers=tree.containers):
        common = set.intersection(*(set(ancestors(m)) for m in group.members))
        deepest = max(common, key=lambda fqn: len(ancestors(fqn)))
        while deepest in containers and deepest:
            deepest = ancestors(deepest)[-1]
        assert group.parent == deepest
        assert group.parent == "" or group.parent not in containers


@given(trees(), pattern_sets())
def test_grouping_the_grouped_names_again_changes_nothing(tree, patterns):
    groups = find_groups(tree.names, patterns, containers=tree.containers)
    again = find_groups([m for g in groups for m in g.members], patterns, containers=tree.containers)
    assert again == groups
