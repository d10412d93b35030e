"""Idempotence: applying a transform to its own output changes nothing."""

from __future__ import annotations

import torch
from hypothesis import given
from hypothesis import strategies as st

from sharedquant.core.lifecycle import sync
from sharedquant.core.transforms import unify_state_dict

from strategies import amax_buffers, pattern_sets, states, trees


@given(st.data())
def test_unify_state_dict_twice_equals_once(data):
    tree = data.draw(trees())
    patterns = data.draw(pattern_sets())
    state_dict = data.draw(amax_buffers(tree.names))
    once = unify_state_dict(state_dict, patterns)
    twice = unify_state_dict(once, patterns)
    assert list(twice) == list(once)
    for key, value in once.items():
        assert twice[key].dtype == value.dtype and twice[key].shape == value.shape, key
        if not value.is_meta:
            assert torch.equal(twice[key], value), key


@given(states())
def test_sync_on_one_rank_is_the_identity(state):
    synced = sync(state, lambda packed: packed.clone())
    assert synced.groups == state.groups and torch.equal(synced.global_amax, state.global_amax)
    again = sync(synced, lambda packed: packed.clone())
    assert torch.equal(again.global_amax, synced.global_amax)
