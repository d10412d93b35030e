"""Examples for buffer tying (sharedquant.adapters.tying) and what it must survive on a real model.

One storage per group at runtime, a guard against rebinding it on a member, and on the
way out (state_dict, safetensors) independent tensors that restore ties back together.
"""

from __future__ import annotations

import copy

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from sharedquant.adapters import (
    QuantLinear,
    SharedWeightGlobalAmaxState,
    TensorQuantizer,
    iter_shared_quant_states,
    max_calibrate,
    replace_quant_module,
)
from sharedquant.adapters.models import tiny_llama
from sharedquant.adapters.tying import TIED_ATTRS, is_tied, keep_fp32_, tie_, tie_all_, tied_attrs, untie_
from sharedquant.core import unify_state_dict

EXACT = 1.0 + 2.0**-20  # an fp32 amax that fp16 and bf16 cannot hold


def calibrated(seed: int = 0, num_layers: int = 1) -> nn.Module:
    return max_calibrate(replace_quant_module(tiny_llama(seed=seed, num_layers=num_layers)))


def states(model: nn.Module) -> list[SharedWeightGlobalAmaxState]:
    return list(iter_shared_quant_states(model, SharedWeightGlobalAmaxState))


def assert_all_tied(model: nn.Module) -> None:
    found = states(model)
    assert found
    for state in found:
        assert state.global_amax.dtype == torch.float32
        for member in state.members:
            quantizer = member.weight_quantizer
            assert quantizer._buffers["_global_amax"] is state.global_amax
            assert "_global_amax" in quantizer.__dict__[TIED_ATTRS]


def global_amax_of(model: nn.Module) -> dict[str, float]:
    return {n: m.weight_quantizer.global_amax.item() for n, m in model.named_modules() if isinstance(m, QuantLinear)}


# --- the primitives ----------------------------------------------------------------------


def test_tie_aliases_the_buffer_records_the_marker_and_guards_the_name():
    quantizer, shared = TensorQuantizer(), torch.tensor(2.0)
    tie_(quantizer, "_global_amax", shared)
    assert quantizer._buffers["_global_amax"] is shared
    assert tied_attrs(quantizer) == {"_global_amax"} and is_tied(quantizer, "_global_amax", shared)
    assert not is_tied(quantizer, "_global_amax", torch.tensor(2.0))
    with pytest.raises(RuntimeError, match="TensorQuantizer: _global_amax is tied to a shared quant state"):
        quantizer._global_amax = torch.tensor(3.0)
    with pytest.raises(RuntimeError, match="update it in place"):
        quantizer.global_amax = 3.0  # the property assigns the tied name too
    assert quantizer.global_amax is shared and shared.item() == 2.0
    quantizer.amax = torch.ones(1, 1)  # untied names stay assignable


def test_untie_gives_a_private_copy_and_lifts_the_guard():
    quantizer, shared = TensorQuantizer(), torch.tensor(2.0)
    tie_(quantizer, "_global_amax", shared)
    untie_(quantizer, "_global_amax")
    assert quantizer.global_amax is not shared and quantizer.global_amax.item() == 2.0
    assert not is_tied(quantizer, "_global_amax")
    quantizer.global_amax = 5.0
    assert shared.item() == 2.0
    untie_(quantizer, "_global_amax")  # untying twice is a no-op
    assert quantizer.global_amax.item() == 5.0


class ForeignQuantizer(nn.Module):
    """A quantizer class this package does not own (like nvidia-modelopt's)."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("_amax", torch.ones(2, 1))


def test_tie_registers_an_absent_buffer_and_clones_it_in_a_foreign_state_dict():
    quantizer, shared = ForeignQuantizer(), torch.tensor(3.0)
    tie_(quantizer, "_global_amax", shared)
    tie_(quantizer, "_global_amax", shared)
    assert quantizer._buffers["_global_amax"] is shared
    assert len(quantizer._state_dict_hooks) == 1  # one clone hook, however often it is tied
    entry = quantizer.state_dict()["_global_amax"]
    assert entry.item() == 3.0 and entry.untyped_storage().data_ptr() != shared.untyped_storage().data_ptr()


def test_tie_all_ties_each_quantizer_to_its_own_tensor_and_repairs_only_broken_ties():
    quantizers = [TensorQuantizer(), TensorQuantizer(), ForeignQuantizer()]
    shared = [torch.tensor(1.0), torch.tensor(1.0), torch.tensor(2.0)]
    tie_all_(quantizers, "_global_amax", shared)
    assert all(is_tied(q, "_global_amax", t) for q, t in zip(quantizers, shared))
    untie_(quantizers[1], "_global_amax")
    kept = quantizers[0]._buffers["_global_amax"]
    tie_all_(quantizers, "_global_amax", shared)
    assert quantizers[0]._buffers["_global_amax"] is kept
    assert is_tied(quantizers[1], "_global_amax", shared[1])
    assert len(quantizers[2]._state_dict_hooks) == 1  # tied twice, one clone hook


def test_keep_fp32_puts_back_the_original_object_when_only_the_dtype_changed():
    quantizer, shared = TensorQuantizer(), torch.tensor(EXACT)
    tie_(quantizer, "_global_amax", shared)
    before = dict(quantizer._buffers)
    quantizer._buffers["_global_amax"] = shared.half()  # what nn.Module._apply does
    keep_fp32_(quantizer, before, ["_global_amax"])
    assert quantizer._buffers["_global_amax"] is shared


# --- on a calibrated model ---------------------------------------------------------------


def test_every_member_aliases_its_state_tensor_after_max_calibrate():
    model = calibrated(num_layers=2)
    assert len(states(model)) == 4
    assert_all_tied(model)


def test_in_place_update_is_seen_by_every_member_and_reassignment_is_refused():
    model = calibrated()
    attn = model.model.layers[0].self_attn
    attn.k_proj.weight_quantizer.global_amax.copy_(torch.tensor(9.0))
    assert [getattr(attn, r).weight_quantizer.global_amax.item() for r in ("q_proj", "k_proj", "v_proj")] == [9.0] * 3
    assert attn._shared_quant_states[0].global_amax.item() == 9.0
    with pytest.raises(RuntimeError, match="_global_amax is tied to a shared quant state"):
        attn.v_proj.weight_quantizer._global_amax = torch.tensor(1.0)
    assert_all_tied(model)


def test_state_lives_at_the_parent_with_a_non_persistent_buffer():
    model = calibrated()
    attn = model.model.layers[0].self_attn
    (state,) = attn._shared_quant_states
    assert isinstance(attn._shared_quant_states, nn.ModuleList)
    assert "_global_amax" in state._non_persistent_buffers_set
    assert state.state_dict() == {}
    assert not any("_shared_quant_states" in key for key in model.state_dict())


@pytest.mark.parametrize(
    "convert",
    [
        lambda m: m.half(),
        lambda m: m.bfloat16(),
        lambda m: m.double(),
        lambda m: m.float(),
        lambda m: m.to(torch.float16),
        lambda m: m.to("cpu", torch.bfloat16),
        lambda m: m.to("cpu"),
    ],
    ids=["half", "bfloat16", "double", "float", "to_fp16", "to_cpu_bf16", "to_cpu"],
)
def test_dtype_and_device_conversions_keep_aliases_and_the_exact_fp32_value(convert):
    model = calibrated()
    for state in states(model):
        state.global_amax.fill_(EXACT)
    convert(model)
    assert_all_tied(model)
    assert all(s.global_amax.item() == EXACT for s in states(model))
    assert all(m.weight_quantizer.amax.dtype == torch.float32 for m in model.modules() if isinstance(m, QuantLinear))


def test_deepcopy_keeps_ties_inside_the_copy_and_none_to_the_original():
    model = calibrated()
    clone = copy.deepcopy(model)
    assert_all_tied(clone)
    for original, copied in zip(states(model), states(clone)):
        assert copied.global_amax is not original.global_amax
        assert copied.members[0] is not original.members[0]
    states(clone)[0].global_amax.fill_(7.0)
    assert states(model)[0].global_amax.item() != 7.0
    assert states(clone)[0].members[1].weight_quantizer.global_amax.item() == 7.0


def test_state_dict_gives_each_member_an_independent_tensor_and_saves_with_safetensors(tmp_path):
    model = calibrated()
    state_dict = model.state_dict()
    keys = [f"model.layers.0.self_attn.{r}.weight_quantizer._global_amax" for r in ("q_proj", "k_proj", "v_proj")]
    pointers = {state_dict[k].untyped_storage().data_ptr() for k in keys}
    assert len(pointers) == 3
    assert states(model)[0].global_amax.untyped_storage().data_ptr() not in pointers
    assert len({state_dict[k].item() for k in keys}) == 1
    # The entries are exactly what the core computes from the same state dict.
    expected = unify_state_dict({k: v for k, v in state_dict.items() if not k.endswith("_global_amax")})
    assert all(torch.equal(state_dict[k], expected[k]) for k in expected if k.endswith("_global_amax"))
    path = tmp_path / "model.safetensors"
    save_file(state_dict, str(path))
    loaded = load_file(str(path))
    assert loaded.keys() == state_dict.keys()


def test_fresh_model_loads_strictly_and_restore_rebuilds_the_ties(tmp_path):
    model = calibrated(seed=0)
    path = tmp_path / "model.safetensors"
    save_file(model.state_dict(), str(path))
    fresh = replace_quant_module(tiny_llama(seed=1, num_layers=1))
    assert all(q.amax is None for q in fresh.modules() if isinstance(q, TensorQuantizer))
    result = fresh.load_state_dict(load_file(str(path)), strict=True)
    assert result.missing_keys == [] and result.unexpected_keys == []
    assert global_amax_of(fresh) == global_amax_of(model)
    SharedWeightGlobalAmaxState.restore(fresh)
    assert_all_tied(fresh)
    assert [s.global_amax.item() for s in states(fresh)] == [s.global_amax.item() for s in states(model)]
    x = torch.randint(0, 128, (1, 6))
    assert torch.equal(fresh(x), model(x))


def disagreeing_state_dict() -> dict[str, torch.Tensor]:
    state_dict = calibrated().state_dict()
    state_dict["model.layers.0.self_attn.k_proj.weight_quantizer._global_amax"] = torch.tensor(5.0)
    return state_dict


def test_restore_refuses_a_checkpoint_whose_members_disagree_and_ties_nothing():
    fresh = replace_quant_module(tiny_llama(seed=1, num_layers=1))
    fresh.load_state_dict(disagreeing_state_dict(), strict=True)
    with pytest.raises(ValueError, match=r"restore: group 'model.layers.0.self_attn' .* members disagree .*k_proj=5\.0"):
        SharedWeightGlobalAmaxState.restore(fresh)
    assert states(fresh) == []
    assert not any(TIED_ATTRS in m.__dict__ and m.__dict__[TIED_ATTRS] for m in fresh.modules())


def test_loading_a_disagreeing_checkpoint_into_a_tied_model_reports_it_and_unties():
    model = calibrated()
    attn = model.model.layers[0].self_attn
    state_dict = disagreeing_state_dict()
    with pytest.raises(RuntimeError, match=r"Error\(s\) in loading state_dict(.|\n)*group 'model.layers.0.self_attn'"):
        model.load_state_dict(state_dict)
    assert attn.k_proj.weight_quantizer.global_amax.item() == 5.0  # its own value, not last-wins
    assert attn.q_proj.weight_quantizer.global_amax.item() == state_dict[
        "model.layers.0.self_attn.q_proj.weight_quantizer._global_amax"
    ].item()
    assert not any(is_tied(getattr(attn, r).weight_quantizer, "_global_amax") for r in ("q_proj", "k_proj", "v_proj"))
    assert attn.q_proj.weight_quantizer.global_amax is not attn.v_proj.weight_quantizer.global_amax
    assert is_tied(model.model.layers[0].mlp.up_proj.weight_quantizer, "_global_amax")  # other groups untouched


def test_loading_a_disagreeing_layer_into_a_submodule_is_reported_too():
    model = calibrated()
    layer = model.model.layers[0]
    layer_state = layer.state_dict()
    layer_state["self_attn.k_proj.weight_quantizer._global_amax"] = torch.tensor(5.0)
    with pytest.raises(RuntimeError, match="group 'model.layers.0.self_attn'"):
        layer.load_state_dict(layer_state)
    assert layer.self_attn.k_proj.weight_quantizer.global_amax.item() == 5.0
    assert layer.self_attn.q_proj.weight_quantizer.global_amax.item() != 5.0


def test_a_deep_copy_checks_its_own_loads_and_leaves_the_original_tied():
    model = calibrated()
    clone = copy.deepcopy(model)
    with pytest.raises(RuntimeError, match="group 'model.layers.0.self_attn'"):
        clone.load_state_dict(disagreeing_state_dict())
    assert clone.model.layers[0].self_attn.k_proj.weight_quantizer.global_amax.item() == 5.0
    assert not is_tied(clone.model.layers[0].self_attn.q_proj.weight_quantizer, "_global_amax")
    assert_all_tied(model)
    assert model.model.layers[0].self_attn.k_proj.weight_quantizer.global_amax.item() != 5.0


def test_a_parent_whose_states_are_attached_again_checks_a_load_once():
    model = calibrated()
    attn = model.model.layers[0].self_attn
    del attn._shared_quant_states
    assert SharedWeightGlobalAmaxState.attach(model) == 1
    SharedWeightGlobalAmaxState.populate(model)
    with pytest.raises(RuntimeError) as raised:
        model.load_state_dict(disagreeing_state_dict())
    assert str(raised.value).count("group 'model.layers.0.self_attn'") == 1


def test_loading_an_agreeing_checkpoint_into_a_tied_model_updates_the_shared_value():
    model = calibrated()
    state_dict = model.state_dict()
    for role in ("q_proj", "k_proj", "v_proj"):
        state_dict[f"model.layers.0.self_attn.{role}.weight_quantizer._global_amax"] = torch.tensor(3.0)
    model.load_state_dict(state_dict, strict=True)
    assert states(model)[0].global_amax.item() == 3.0
    assert_all_tied(model)
