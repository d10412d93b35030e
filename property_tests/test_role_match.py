"""find_groups' shortcut for ``(?:(.*)\\.)?(?:role|...)`` patterns agrees with re.fullmatch on every name."""

from __future__ import annotations

import re

from hypothesis import given
from hypothesis import strategies as st

from sharedquant.core.groups import SHARED_PATTERNS, _matcher

ALPHABET = st.sampled_from(["q_proj", "k_proj", "v_proj", "gate_proj", "up_proj", "w1", "w3", "w2", "0", "17", "x", "", "q"])
NAMES = st.lists(ALPHABET, min_size=1, max_size=5).map(".".join)
ROLES = st.lists(st.sampled_from(["q_proj", "k_proj", "w1", "w3", "up_proj", "a1", "b_2"]), min_size=1, max_size=4, unique=True)


@given(name=NAMES, roles=ROLES)
def test_role_shortcut_equals_regex_fullmatch(name, roles):
    regex = re.compile(r"(?:(.*)\.)?(?:" + "|".join(roles) + ")")
    found = regex.fullmatch(name)
    assert _matcher(regex)(name) == (None if found is None else found.groups())


@given(name=NAMES)
def test_default_patterns_take_the_shortcut_and_agree(name):
    for pattern in SHARED_PATTERNS:
        regex = re.compile(pattern)
        found = regex.fullmatch(name)
        assert _matcher(regex)(name) == (None if found is None else found.groups())
