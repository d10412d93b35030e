"""find_groups' shortcut for ``(?:(.*)\\.)?(?:role|...)`` patterns agrees with a loop of re.fullmatch."""

from __future__ import annotations

import re

from hypothesis import given
from hypothesis import strategies as st

from sharedquant.core.groups import SHARED_PATTERNS, SHARED_PATTERNS_ACROSS_EXPERTS, _buckets, find_groups, parent_fqn

PARTS = st.sampled_from(["q_proj", "k_proj", "v_proj", "gate_proj", "up_proj", "w1", "w3", "w2", "experts", "0", "17", "x", ""])
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
    for patterns in (SHARED_PATTERNS, SHARED_PATTERNS_ACROSS_EXPERTS):
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
