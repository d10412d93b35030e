"""Examples for sharedquant.core.state: SharedAmax as an immutable pytree under optree and torch."""

from __future__ import annotations

import dataclasses

import optree
import pytest
import torch
import torch.utils._pytree as torch_pytree

from sharedquant.core.groups import Group
from sharedquant.core.state import NAMESPACE, UNSET, SharedAmax

GROUPS = (
    Group(key=(0, ("blk.attn",)), parent="blk.attn", members=("blk.attn.q_proj", "blk.attn.k_proj")),
    Group(key=(1, ("blk.mlp",)), parent="blk.mlp", members=("blk.mlp.gate_proj", "blk.mlp.up_proj")),
)


@pytest.fixture
def state() -> SharedAmax:
    return SharedAmax(groups=GROUPS, global_amax=torch.tensor([2.0, UNSET]))


def test_namespace_is_the_projects_own():
    assert NAMESPACE == "sharedquant"


def test_optree_tree_map_returns_new_state_and_leaves_the_old_one(state):
    doubled = optree.tree_map(lambda t: t.double() * 2, state, namespace=NAMESPACE)
    assert isinstance(doubled, SharedAmax) and doubled is not state
    assert doubled.groups is state.groups
    assert doubled.global_amax.dtype == torch.float64
    assert doubled.global_amax.tolist() == [4.0, UNSET]
    assert state.global_amax.dtype == torch.float32 and state.global_amax.tolist() == [2.0, UNSET]


def test_optree_without_the_namespace_sees_an_opaque_leaf(state):
    assert optree.tree_leaves(state) == [state]
    (leaf,) = optree.tree_leaves(state, namespace=NAMESPACE)
    assert leaf is state.global_amax


def test_torch_pytree_tree_map_moves_state_to_another_device(state):
    moved = torch_pytree.tree_map(lambda t: t.to("meta"), state)
    assert isinstance(moved, SharedAmax) and moved is not state
    assert moved.global_amax.is_meta and moved.groups == state.groups
    assert state.global_amax.device.type == "cpu"


def test_optree_flatten_unflatten_round_trip(state):
    leaves, treedef = optree.tree_flatten(state, namespace=NAMESPACE)
    assert len(leaves) == 1 and leaves[0] is state.global_amax
    rebuilt = optree.tree_unflatten(treedef, leaves)
    assert rebuilt.groups == state.groups and rebuilt.global_amax is state.global_amax


def test_torch_flatten_unflatten_round_trip_and_key_path(state):
    leaves, spec = torch_pytree.tree_flatten(state)
    assert leaves == [state.global_amax]
    assert spec.context == GROUPS
    rebuilt = torch_pytree.tree_unflatten(leaves, spec)
    assert rebuilt.groups == GROUPS and rebuilt.global_amax is state.global_amax
    ((path, leaf),), _ = torch_pytree.tree_flatten_with_path(state)
    assert torch_pytree.keystr(path) == ".global_amax" and leaf is state.global_amax


def test_metadata_is_hashable_and_part_of_the_structure(state):
    hash(state.groups)
    _, treedef = optree.tree_flatten(state, namespace=NAMESPACE)
    _, same = optree.tree_flatten(SharedAmax(GROUPS, torch.zeros(2)), namespace=NAMESPACE)
    _, other = optree.tree_flatten(SharedAmax(GROUPS[:1], torch.zeros(1)), namespace=NAMESPACE)
    assert hash(treedef) == hash(same) and treedef == same
    assert treedef != other
    assert torch_pytree.tree_structure(state) != torch_pytree.tree_structure(SharedAmax(GROUPS[:1], torch.zeros(1)))


def test_vmap_flattens_a_stacked_state(state):
    stacked = SharedAmax(GROUPS, torch.tensor([[1.0, 5.0], [3.0, 2.0]]))
    assert torch.equal(torch.func.vmap(lambda s: s.global_amax.amax())(stacked), torch.tensor([5.0, 3.0]))


def test_state_is_frozen(state):
    with pytest.raises(dataclasses.FrozenInstanceError):
        state.global_amax = torch.zeros(2)


def test_keys_index_and_lookup(state):
    assert state.keys == ((0, ("blk.attn",)), (1, ("blk.mlp",)))
    assert state.index((1, ("blk.mlp",))) == 1
    assert state[(0, ("blk.attn",))].item() == 2.0
    assert state[(1, ("blk.mlp",))].item() == UNSET
    with pytest.raises(KeyError, match=r"SharedAmax: no group with key \(2, \('nowhere',\)\)"):
        state[(2, ("nowhere",))]


def test_is_set_marks_groups_with_a_value(state):
    assert state.is_set().tolist() == [True, False]


def test_replace_returns_a_copy(state):
    updated = state.replace(global_amax=torch.tensor([1.0, 1.0]))
    assert updated.global_amax.tolist() == [1.0, 1.0]
    assert state.global_amax.tolist() == [2.0, UNSET]
    assert updated.groups is state.groups
