"""Examples for populate on a model that changed since attach: it ties what the model holds now.

Whatever changes between calls (a quantizer replaced, a state's members set, a
``parallel_state`` assigned, a quantizer class swapped, the model copied) must give
the ties a fresh attach and populate would.
"""

from __future__ import annotations

import copy
import gc
import io

import pytest
import safetensors.torch
import torch
from torch import nn

from sharedquant.adapters import QuantLinear, SharedWeightGlobalAmaxState, TensorQuantizer, replace_quant_module, shared_state
from sharedquant.adapters.distributed import ParallelState
from sharedquant.adapters.models import tiny_mixtral
from sharedquant.adapters.tying import TIED_ATTRS, is_tied, untie_

from _models import set_weight_amax  # pytest puts tests/ on sys.path (it has no __init__.py)

State = SharedWeightGlobalAmaxState


def calibrated(seed: int = 0) -> nn.Module:
    return set_weight_amax(replace_quant_module(tiny_mixtral(seed=seed, num_layers=2, num_experts=3)))


def states_of(model: nn.Module) -> list[SharedWeightGlobalAmaxState]:
    return [m for m in model.modules() if isinstance(m, State)]


def assert_every_member_tied(model: nn.Module) -> None:
    """Each member's own quantizer, as the model holds it now, aliases its state's value and is guarded."""
    for state in states_of(model):
        expected = max(m.weight_quantizer._buffers["_amax"].max() for m in state.members)
        assert state.global_amax == expected
        for member in state.members:
            assert is_tied(member.weight_quantizer, "_global_amax", state.global_amax)


@pytest.mark.parametrize("populated_first", [False, True])
def test_a_quantizer_replaced_after_attach_or_a_populate_is_the_one_tied(populated_first):
    model = calibrated()
    State.attach(model)
    if populated_first:
        State.populate(model)
    member = model.model.layers[1].self_attn.k_proj
    member.weight_quantizer = TensorQuantizer()
    member.weight_quantizer.amax = torch.full((4, 1), 100.0)
    State.populate(model)
    assert_every_member_tied(model)
    assert model.model.layers[1].self_attn._shared_quant_states[0].global_amax == 100.0


def test_members_set_between_populates_are_the_ones_tied():
    model = calibrated()
    State.attach(model)
    State.populate(model)
    state = model.model.layers[0].self_attn._shared_quant_states[0]
    attn = model.model.layers[0].self_attn
    state.set_members(attn, [attn.q_proj, attn.o_proj])
    State.populate(model)
    assert is_tied(attn.o_proj.weight_quantizer, "_global_amax", state.global_amax)
    assert_every_member_tied(model)


def test_a_parallel_state_assigned_after_attach_reaches_the_sync(monkeypatch):
    model = calibrated()
    State.attach(model)
    State.populate(model)
    seen = []

    def recording(groups, values, parallel_states):
        seen.append(list(parallel_states))
        return values

    monkeypatch.setattr(shared_state, "sync_by_process_groups", recording)
    parallel = ParallelState()
    model.model.layers[1].block_sparse_moe.experts[2].w3.parallel_state = parallel
    State.populate(model)
    (firsts,) = seen
    owner = model.model.layers[1].block_sparse_moe.experts[2]._shared_quant_states[0]
    assert [p is parallel for p in firsts] == [s is owner for s in states_of(model)]


def test_a_second_populate_repairs_the_ties_that_no_longer_hold_and_keeps_the_rest():
    model = calibrated()
    State.attach(model)
    State.populate(model)
    state = states_of(model)[0]
    cut, unmarked, kept = (m.weight_quantizer for m in state.members)
    untie_(cut, "_global_amax")  # its own copy now
    unmarked.__dict__[TIED_ATTRS].discard("_global_amax")  # same tensor, guard lost
    shared = kept._buffers["_global_amax"]
    State.populate(model)
    assert_every_member_tied(model)
    assert state.global_amax is shared  # updated in place, not replaced


@pytest.mark.parametrize("ties_hold", [False, True], ids=["ties lifted, as a fresh load leaves them", "ties still holding"])
def test_a_quantizer_class_swapped_to_one_we_do_not_own_still_saves_cleanly(tmp_path, ties_hold):
    class Foreign(TensorQuantizer):
        clones_tied_entries = False  # the tie must register its state-dict clone as a hook

        def _save_to_state_dict(self, destination, prefix, keep_vars):
            nn.Module._save_to_state_dict(self, destination, prefix, keep_vars)

    model = calibrated()
    State.attach(model)
    State.populate(model)
    for module in model.modules():
        if isinstance(module, QuantLinear):
            if not ties_hold:
                module.weight_quantizer.__dict__.pop(TIED_ATTRS, None)
                module.weight_quantizer._buffers["_global_amax"] = None
            module.weight_quantizer.__class__ = Foreign
    State.populate(model)
    assert_every_member_tied(model)
    path = tmp_path / "model.safetensors"
    safetensors.torch.save_file(model.state_dict(), str(path))  # refuses tensors that share storage
    assert len(safetensors.torch.load_file(str(path))) == len(model.state_dict())


@pytest.mark.parametrize("copy_kind", ["deepcopy", "torch.save"])
def test_a_copy_outliving_its_original_ties_its_own_quantizers(copy_kind):
    model = calibrated()
    State.attach(model)
    State.populate(model)
    if copy_kind == "deepcopy":
        twin = copy.deepcopy(model)
    else:
        buffer = io.BytesIO()
        torch.save(model, buffer)
        buffer.seek(0)
        twin = torch.load(buffer, weights_only=False)
    del model
    gc.collect()
    for module in twin.modules():
        if isinstance(module, QuantLinear):
            module.weight_quantizer.__dict__.pop(TIED_ATTRS, None)
            module.weight_quantizer._buffers["_global_amax"] = None
    State.populate(twin)
    assert_every_member_tied(twin)
