"""find_groups' shortcut for ``(?:(.*)\\.)?(?:role|...)`` patterns agrees with a loop of re.fullmatch."""

from __future__ import annotations

import re

from hypothesis import given
from hypothesis import strategies as st

from sharedquant.core.groups import SHARED_PATTERNS, SHARED_PATTERNS_ACROSS_EXPERTS, _classifier

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


@given(name=NAMES, patterns=ROLE_PATTERNS)
def test_role_shortcut_equals_the_first_fullmatch(name, patterns):
    assert _classifier([re.compile(p) for p in patterns])(name) == first_fullmatch(patterns, name)


@given(name=NAMES)
def test_default_pattern_sets_agree_with_the_first_fullmatch(name):
    for patterns in (SHARED_PATTERNS, SHARED_PATTERNS_ACROSS_EXPERTS):
        assert _classifier([re.compile(p) for p in patterns])(name) == first_fullmatch(patterns, name)
