"""Examples for the state index: populate finds every state, and only those, whatever was edited."""

from __future__ import annotations

import copy
import gc
import io
import weakref

import pytest
import torch
from torch import nn

from sharedquant.adapters import (
    QuantLinear,
    SharedQuantState,
    SharedWeightGlobalAmaxState,
    iter_shared_quant_states,
    replace_quant_module,
)
from sharedquant.adapters import state_index
from sharedquant.adapters.models import tiny_mixtral
from sharedquant.adapters.state_index import indexed_states
from sharedquant.core import unify_state_dict

from _models import set_weight_amax  # pytest puts tests/ on sys.path (it has no __init__.py)

State = SharedWeightGlobalAmaxState


def calibrated(seed: int = 0, layers: int = 2) -> nn.Module:
    return set_weight_amax(replace_quant_module(tiny_mixtral(seed=seed, num_layers=layers, num_experts=3)))


def every_state(model: nn.Module) -> list[SharedQuantState]:
    """The states in ``model`` by brute force: nn.Module's own walk, in model order."""
    return [m for m in model.modules() if isinstance(m, SharedQuantState)]


def expected_global_amax(model: nn.Module) -> dict[str, torch.Tensor]:
    """Each member's global amax as the pure core computes it from the model's own amaxes."""
    unified = unify_state_dict({k: v for k, v in model.state_dict().items() if not k.endswith("_global_amax")})
    return {k: v for k, v in unified.items() if k.endswith("weight_quantizer._global_amax")}


def assert_populated_like_the_core(model: nn.Module) -> None:
    expected = expected_global_amax(model)
    for state in every_state(model):
        assert state.global_amax is not None
        for member in state.members:
            assert member.weight_quantizer._buffers["_global_amax"] is state.global_amax
    grouped = {name: module for name, module in model.named_modules() if isinstance(module, QuantLinear)}
    for name, module in grouped.items():
        key = f"{name}.weight_quantizer._global_amax"
        if any(module in state.members for state in every_state(model)):
            assert torch.equal(module.weight_quantizer._buffers["_global_amax"], expected[key]), name


@pytest.fixture(autouse=True)
def _no_stray_states():
    # States of earlier tests wait for the cycle collector; they count as alive until then.
    gc.collect()


def test_after_attach_the_states_come_from_the_index_in_model_order():
    model = calibrated()
    State.attach(model)
    assert indexed_states(model) == tuple(every_state(model))
    assert list(iter_shared_quant_states(model)) == every_state(model)
    assert State.populate(model) == len(every_state(model))
    assert_populated_like_the_core(model)


def test_a_layer_deleted_after_attach_is_no_longer_populated():
    model = calibrated(layers=3)
    State.attach(model)
    gone = model.model.layers[1]
    del model.model.layers[1]
    assert indexed_states(model) is None  # a link on the path changed
    assert list(iter_shared_quant_states(model)) == every_state(model)
    assert State.populate(model) == len(every_state(model))
    assert all(s.global_amax is None for s in every_state(gone))


def test_a_subtree_with_states_moved_in_without_attach_is_found():
    model, donor = calibrated(seed=0), calibrated(seed=1)
    State.attach(model)
    State.attach(donor)
    model.model.layers.insert(len(model.model.layers), donor.model.layers[0])  # a raw _modules write
    del donor
    gc.collect()
    assert indexed_states(model) is None  # a live state is not in the index
    assert list(iter_shared_quant_states(model)) == every_state(model)
    State.populate(model)
    assert_populated_like_the_core(model)


def test_states_attached_through_a_submodule_are_found_from_the_root():
    model = calibrated()
    State.attach(model, patterns=[r"(.*)\.self_attn\.(?:q|k|v)_proj"])
    State.attach(model.model.layers[0], patterns=[r"(.*)\.block_sparse_moe\.experts\.(\d+)\.(?:w1|w3)"])
    assert list(iter_shared_quant_states(model)) == every_state(model)
    State.populate(model)
    assert_populated_like_the_core(model)


def test_a_deep_copy_and_its_original_each_populate_their_own_states():
    model = calibrated()
    State.attach(model)
    twin = copy.deepcopy(model)
    with torch.no_grad():
        twin.model.layers[0].self_attn.q_proj.weight_quantizer._amax.mul_(4)
    State.populate(model)
    State.populate(twin)
    assert list(iter_shared_quant_states(twin)) == every_state(twin)
    assert_populated_like_the_core(model)
    assert_populated_like_the_core(twin)
    q = twin.model.layers[0].self_attn._shared_quant_states[0].global_amax
    assert q > model.model.layers[0].self_attn._shared_quant_states[0].global_amax


def test_a_state_removed_from_its_list_is_not_yielded():
    model = calibrated()
    State.attach(model)
    states = model.model.layers[0].self_attn._shared_quant_states
    removed = states[0]
    del states[0]
    assert removed not in list(iter_shared_quant_states(model))
    assert list(iter_shared_quant_states(model)) == every_state(model)


def test_a_second_populate_updates_every_state_in_place():
    model = calibrated()
    State.attach(model)
    State.populate(model)
    before = [s.global_amax for s in every_state(model)]
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, QuantLinear):
                module.weight_quantizer._amax.mul_(2)
    State.populate(model)
    assert [s.global_amax for s in every_state(model)] == before  # same tensors: the ties hold
    assert_populated_like_the_core(model)


def test_populate_gives_each_state_its_own_value_when_one_was_set_to_anothers_tensor():
    model = calibrated()
    State.attach(model)
    State.populate(model)
    first, second = every_state(model)[:2]
    first.global_amax = second.global_amax  # the same element of the same storage
    State.populate(model)
    assert_populated_like_the_core(model)
    assert first.global_amax.data_ptr() != second.global_amax.data_ptr()


def test_a_model_pickled_whole_and_loaded_populates_its_own_states():
    model = calibrated()
    State.attach(model)
    State.populate(model)
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    with torch.no_grad():
        loaded.model.layers[0].self_attn.q_proj.weight_quantizer._amax.mul_(3)
    assert list(iter_shared_quant_states(loaded)) == every_state(loaded)
    assert State.populate(loaded) == len(every_state(loaded))
    assert_populated_like_the_core(loaded)
    assert_populated_like_the_core(model)


def test_a_first_attach_in_a_process_fills_state_lists_left_empty(monkeypatch):
    model = calibrated()
    State.attach(model)
    lists = [m for m in model.modules() if isinstance(m, nn.ModuleList) and m and isinstance(m[0], SharedQuantState)]
    for state_list in lists:
        state_list._modules.clear()
    monkeypatch.setattr(state_index, "_LIVE", weakref.WeakSet())  # as in a fresh process: no state alive
    assert not state_index.any_live()
    created = State.attach(model)
    assert created == len(every_state(model)) > 0
    assert all(len(state_list) >= 1 for state_list in lists)  # the old lists were filled, not replaced
    assert list(indexed_states(model)) == every_state(model)
    assert State.populate(model) == created
    assert_populated_like_the_core(model)
