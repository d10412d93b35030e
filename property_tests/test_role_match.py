"""find_groups' shortcut for ``(?:(.*)\\.)?(?:role|...)`` patterns agrees with a loop of re.fullmatch."""

from __future__ import annotations

import re

from hypothesis import given
from hypothesis import strategies as st

from sharedquant.core.groups import (
    DEFAULT_PATTERNS,
    SHARED_PATTERNS,
    SHARED_PATTERNS_ACROSS_EXPERTS,
    _buckets,
    find_groups,
    in_role_order,
    parent_fqn,
)

# Every role of the default checkpoint vocabulary, and names that share its prefixes and suffixes.
VOCABULARY = ["q_proj", "k_proj", "v_proj", "gate_proj", "up_proj", "w1", "w3", "w2", "q_a_proj", "kv_a_proj_with_mqa",
              "in_proj_qkv", "in_proj_z", "in_proj_b", "in_proj_a", "in_proj_qkvz", "to_q", "to_k", "to_v", "to_out",
              "add_q_proj", "add_k_proj", "add_v_proj"]  # fmt: skip
PARTS = st.sampled_from([*VOCABULARY, "experts", "0", "17", "x", ""])
NAMES = st.lists(PARTS, min_size=1, max_size=5).map(".".join)
ROLES = st.lists(st.sampled_from(["q_proj", "k_proj", "w1", "w3", "up_proj", "a1", "b_2"]), min_size=1, max_size=3, unique=True)
ROLE_PATTERNS = st.lists(ROLES.map(lambda roles: r"(?:(.*)\.)?(?:" + "|".join(roles) + ")"), min_size=1, max_size=4)


def first_fullmatch(patterns, name):
    for index, pattern in enumerate(patterns):
        found = re.fullmatch(pattern, name)
        if found is not None:
            return index, found.groups()
    return None


def bucket_key(patterns, name):
    """The key find_groups files ``name`` under, ``None`` when no pattern matches it."""
    buckets = _buckets([name], [re.compile(p) for p in patterns])
    return buckets[0][0] if buckets else None


@given(name=NAMES, patterns=ROLE_PATTERNS)
def test_role_shortcut_equals_the_first_fullmatch(name, patterns):
    assert bucket_key(patterns, name) == first_fullmatch(patterns, name)


@given(name=NAMES)
def test_default_pattern_sets_agree_with_the_first_fullmatch(name):
    for patterns in (SHARED_PATTERNS, SHARED_PATTERNS_ACROSS_EXPERTS, DEFAULT_PATTERNS):
        assert bucket_key(patterns, name) == first_fullmatch(patterns, name)


def regex_buckets(patterns, names):
    """(key, members) of every key two or more names share, by a loop of re.fullmatch."""
    buckets = {}
    for name in dict.fromkeys(names):
        key = first_fullmatch(patterns, name)
        if key is not None:
            buckets.setdefault(key, []).append(name)
    return [(key, tuple(members)) for key, members in buckets.items() if len(members) > 1]


# Few prefixes and roles, so that names often share a group; "" and "." differ only by the dot.
SIBLINGS = st.tuples(
    st.sampled_from(["", ".", "blk.", "blk.0.", "0."]),
    st.sampled_from(["q_proj", "k_proj", "w1", "w3", "up_proj", "a1", "w2"]),
).map("".join)


@given(names=st.lists(SIBLINGS, max_size=16), patterns=ROLE_PATTERNS)
def test_role_shortcut_groups_like_the_regex_loop_with_the_shared_prefix_as_parent(names, patterns):
    groups = find_groups(names, patterns)
    assert [(group.key, group.members) for group in groups] == regex_buckets(patterns, names)
    assert all(parent_fqn(member) == group.parent for group in groups for member in group.members)


@given(names=st.lists(NAMES, max_size=24), patterns=st.sampled_from([DEFAULT_PATTERNS, SHARED_PATTERNS_ACROSS_EXPERTS]))
def test_role_order_permutes_each_group_into_its_alternation_order(names, patterns):
    groups = find_groups(names, patterns)
    ordered = in_role_order(groups, patterns)
    assert [(g.key, g.parent, sorted(g.members)) for g in ordered] == [(g.key, g.parent, sorted(g.members)) for g in groups]
    for group in ordered:
        roles = re.findall(r"\(\?:(\w+(?:\|\w+)+)\)", patterns[group.key[0]])[-1].split("|")
        by_parent = {}
        for member in group.members:
            by_parent.setdefault(parent_fqn(member), []).append(roles.index(member.rpartition(".")[2]))
        assert all(positions == sorted(positions) for positions in by_parent.values())
