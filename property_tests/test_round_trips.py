"""Round trips: state -> member entries (-> safetensors file) -> restore, and pytree flatten -> unflatten."""

from __future__ import annotations

import os
import tempfile

import optree
import safetensors.torch
import torch
import torch.utils._pytree as torch_pytree
from hypothesis import given

from sharedquant.core.lifecycle import member_entries, restore
from sharedquant.core.state import NAMESPACE, SharedAmax

from strategies import states


def assert_same_state(actual: SharedAmax, expected: SharedAmax) -> None:
    assert isinstance(actual, SharedAmax)
    assert actual.groups == expected.groups
    assert actual.global_amax.dtype == expected.global_amax.dtype
    assert torch.equal(actual.global_amax, expected.global_amax)


@given(states())
def test_restore_of_member_entries_gives_back_the_state(state):
    assert_same_state(restore(state.groups, member_entries(state)), state)


@given(states())
def test_member_entries_survive_a_safetensors_file(state):
    entries = member_entries(state)
    with tempfile.TemporaryDirectory() as directory:
        path = os.path.join(directory, "shared.safetensors")
        safetensors.torch.save_file(entries, path)
        loaded = safetensors.torch.load_file(path)
    assert_same_state(restore(state.groups, loaded), state)


@given(states())
def test_optree_flatten_unflatten_gives_back_the_state(state):
    leaves, treedef = optree.tree_flatten(state, namespace=NAMESPACE)
    assert_same_state(optree.tree_unflatten(treedef, leaves), state)
    assert hash(treedef) == hash(optree.tree_structure(state, namespace=NAMESPACE))


@given(states())
def test_torch_pytree_flatten_unflatten_gives_back_the_state(state):
    leaves, spec = torch_pytree.tree_flatten(state)
    assert_same_state(torch_pytree.tree_unflatten(leaves, spec), state)
    assert_same_state(torch_pytree.tree_map(lambda t: t.clone(), state), state)
