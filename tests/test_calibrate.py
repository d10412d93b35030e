"""Examples for sharedquant.adapters.calibrate: max_calibrate on a module, calibrate as a pure function."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from sharedquant.adapters import (
    SHARED_PATTERNS_ACROSS_EXPERTS,
    QuantLinear,
    TensorQuantizer,
    calibrate,
    calibration_mode,
    iter_shared_quant_states,
    max_calibrate,
    replace_quant_module,
)
from sharedquant.adapters.models import tiny_llama, tiny_mixtral
from sharedquant.core import reduce_amax, reduce_block_amax, unify_state_dict

NO_GROUPS = {"weight_global_amax": {"patterns": []}}


def llama(num_layers: int = 1, inputs: bool = False) -> nn.Module:
    model = replace_quant_module(tiny_llama(num_layers=num_layers))
    if inputs:
        for module in model.modules():
            if isinstance(module, QuantLinear):
                module.input_quantizer.enable()
    return model


def batches(count: int = 2) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    return [torch.randint(0, 128, (2, 6), generator=generator) for _ in range(count)]


def quantizer_entries(state_dict) -> dict[str, torch.Tensor]:
    return {k: v for k, v in state_dict.items() if "_quantizer." in k}


def linears(model: nn.Module) -> dict[str, QuantLinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear)}


# --- max_calibrate -----------------------------------------------------------------------


def test_weight_amax_is_per_block_from_the_weight():
    model = llama()
    assert max_calibrate(model) is model
    for module in linears(model).values():
        expected = reduce_block_amax(module.weight.detach(), {-1: 16}).reshape(-1, 1)
        assert torch.equal(module.weight_quantizer.amax, expected)
        assert module.input_quantizer.amax is None  # no forward, no activation amax


def test_global_amax_is_the_group_max_for_members_and_its_own_amax_otherwise():
    model = llama(num_layers=2)
    max_calibrate(model)
    state_dict = model.state_dict()
    without = {k: v for k, v in state_dict.items() if not k.endswith("_global_amax")}
    expected = unify_state_dict(without)
    global_keys = [k for k in state_dict if k.endswith("weight_quantizer._global_amax")]
    assert len(global_keys) == len(linears(model))  # every NVFP4 weight has one
    assert all(torch.equal(state_dict[k], expected[k]) for k in global_keys)
    o_proj = model.model.layers[1].self_attn.o_proj
    assert o_proj.weight_quantizer.global_amax.item() == reduce_amax(o_proj.weight.detach()).item()
    assert len(list(iter_shared_quant_states(model))) == 4


def test_members_1000x_apart_share_the_largest_value():
    model = llama()
    attn = model.model.layers[0].self_attn
    with torch.no_grad():
        attn.k_proj.weight.mul_(1000.0)
    max_calibrate(model)
    k_amax = reduce_amax(attn.k_proj.weight.detach()).item()
    assert [getattr(attn, r).weight_quantizer.global_amax.item() for r in ("q_proj", "k_proj", "v_proj")] == [k_amax] * 3


def test_forward_loop_records_activation_amax_of_what_each_layer_saw():
    model = llama(inputs=True)
    seen: dict[str, float] = {}

    def record(name):
        def hook(module, args):
            seen[name] = max(seen.get(name, 0.0), args[0].detach().abs().max().item())

        return hook

    handles = [m.register_forward_pre_hook(record(n)) for n, m in linears(model).items()]
    calls = []
    data = batches()
    max_calibrate(model, forward_loop=lambda m: calls.append([m(x) for x in data]))
    for handle in handles:
        handle.remove()
    assert len(calls) == 1
    for name, module in linears(model).items():
        assert module.input_quantizer.amax.shape == ()
        assert module.input_quantizer.amax.item() == seen[name]
    assert not any(q._calibrating for q in model.modules() if isinstance(q, TensorQuantizer))


def test_an_activation_quantizer_no_batch_reached_stays_unset():
    model = llama(inputs=True)
    model.unused = QuantLinear(64, 16)
    model.unused.input_quantizer.enable()
    max_calibrate(model, forward_loop=lambda m: m(batches(1)[0]))
    assert model.unused.input_quantizer.amax is None
    assert model.lm_head.input_quantizer.amax is not None


def test_a_forward_loop_that_raises_leaves_activation_amax_as_they_were():
    model = llama(inputs=True)
    data = batches(1)
    max_calibrate(model, forward_loop=lambda m: m(data[0]))
    before = {n: m.input_quantizer.amax.clone() for n, m in linears(model).items()}

    def dies(m):
        raise RuntimeError("data loader died")

    def dies_midway(m):
        m(torch.full_like(data[0], 127))  # some observers move, then the loop dies
        dies(m)

    with pytest.raises(RuntimeError, match="data loader died"):
        max_calibrate(model, forward_loop=dies_midway)
    assert all(torch.equal(m.input_quantizer.amax, before[n]) for n, m in linears(model).items())
    assert model(data[0]).isfinite().all()  # still usable: no unobserved (-inf) scale left behind
    fresh = llama(inputs=True)
    with pytest.raises(RuntimeError, match="data loader died"):
        max_calibrate(fresh, forward_loop=dies)
    assert all(m.input_quantizer.amax is None for m in linears(fresh).values())
    assert not any(q._calibrating for q in fresh.modules() if isinstance(q, TensorQuantizer))


def test_a_disabled_weight_quantizer_gets_nothing():
    model = nn.Sequential(nn.Linear(24, 16), nn.Linear(16, 16))
    with pytest.warns(UserWarning, match="not a multiple of 16"):
        replace_quant_module(model)
    max_calibrate(model)
    assert model[0].weight_quantizer.amax is None and model[0].weight_quantizer.global_amax is None
    assert model[1].weight_quantizer.global_amax is not None


def test_shared_states_config_selects_the_patterns():
    model = llama()
    max_calibrate(model, shared_states=NO_GROUPS)
    assert list(iter_shared_quant_states(model)) == []
    state_dict = model.state_dict()
    expected = unify_state_dict({k: v for k, v in state_dict.items() if not k.endswith("_global_amax")}, None)
    assert all(torch.equal(state_dict[k], expected[k]) for k in expected if k.endswith("_global_amax"))
    moe = replace_quant_module(tiny_mixtral(num_layers=1, num_experts=3))
    max_calibrate(moe, shared_states={"weight_global_amax": {"patterns": list(SHARED_PATTERNS_ACROSS_EXPERTS)}})
    block = moe.model.layers[0].block_sparse_moe
    (state,) = block._shared_quant_states
    assert len(state.members) == 6
    assert len({e.w1.weight_quantizer.global_amax.item() for e in block.experts}) == 1


def test_a_bad_config_is_refused_before_anything_is_touched():
    model = llama()
    with pytest.raises(ValueError, match=r"shared_states: unknown state\(s\) \['weight_amax'\]"):
        max_calibrate(model, shared_states={"weight_amax": {"patterns": []}})
    assert all(q.amax is None for q in model.modules() if isinstance(q, TensorQuantizer))
    assert list(iter_shared_quant_states(model)) == []


def test_a_model_on_the_meta_device_calibrates_to_nothing_without_error():
    with torch.device("meta"):
        model = tiny_llama(num_layers=1)
    replace_quant_module(model)
    max_calibrate(model)
    states = list(iter_shared_quant_states(model))
    assert len(states) == 2 and all(s.global_amax is None for s in states)
    assert all(m.weight_quantizer.global_amax is None for m in linears(model).values())


def test_calibration_mode_resets_flags_when_the_body_raises():
    quantizers = [TensorQuantizer(), TensorQuantizer()]
    with pytest.raises(RuntimeError, match="stop"):
        with calibration_mode(quantizers):
            assert all(q._calibrating for q in quantizers)
            raise RuntimeError("stop")
    assert not any(q._calibrating for q in quantizers)


# --- calibrate (pure) --------------------------------------------------------------------


def snapshot(tensors) -> dict[str, tuple[torch.Tensor, int]]:
    return {k: (v.detach().clone(), v.data_ptr()) for k, v in tensors.items()}


def assert_unchanged(tensors, before) -> None:
    assert tensors.keys() == before.keys()
    for key, value in tensors.items():
        assert torch.equal(value, before[key][0]) and value.data_ptr() == before[key][1], key


@pytest.mark.parametrize("shared_states", [None, NO_GROUPS], ids=["default", "no-groups"])
def test_calibrate_equals_max_calibrate_and_mutates_nothing(shared_states):
    model = llama(inputs=True)
    reference = copy.deepcopy(model)
    data = batches()
    variables = {**dict(model.named_parameters()), **dict(model.named_buffers())}
    before_dict, before_module = snapshot(variables), snapshot(model.state_dict(keep_vars=True))
    result = calibrate(model, variables, data, shared_states=shared_states)
    assert_unchanged(variables, before_dict)
    assert_unchanged(model.state_dict(keep_vars=True), before_module)
    assert list(iter_shared_quant_states(model)) == []
    assert not any(q._calibrating for q in model.modules() if isinstance(q, TensorQuantizer))
    max_calibrate(reference, lambda m: [m(x) for x in data], shared_states=shared_states)
    expected = quantizer_entries(reference.state_dict())
    assert result.keys() == expected.keys()
    assert all(torch.equal(result[k], expected[k]) for k in expected)


def test_calibrate_reads_the_given_tensors_not_the_modules():
    model = llama()
    doubled = {k: v.detach() * 2 for k, v in model.named_parameters()}
    plain = calibrate(model, dict(model.named_parameters()), [])
    scaled = calibrate(model, doubled, [])
    key = "model.layers.0.self_attn.q_proj.weight_quantizer._global_amax"
    assert torch.equal(scaled[key], plain[key] * 2)


def test_calibrate_on_a_tied_model_keeps_its_ties_and_values():
    model = llama(inputs=True)
    data = batches()
    max_calibrate(model, lambda m: [m(x) for x in data])
    state = model.model.layers[0].self_attn._shared_quant_states[0]
    shared, before = state.global_amax, model.state_dict()
    variables = {**dict(model.named_parameters()), **dict(model.named_buffers())}
    result = calibrate(model, variables, data)
    assert state.global_amax is shared
    assert all(m.weight_quantizer._buffers["_global_amax"] is shared for m in state.members)
    after = model.state_dict()
    assert all(torch.equal(after[k], before[k]) for k in before)
    assert all(torch.equal(result[k], before[k]) for k in result)


class TwoInputs(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.q_proj = nn.Linear(16, 16)
        self.k_proj = nn.Linear(16, 16)

    def forward(self, a, b):
        return self.q_proj(a) + self.k_proj(b)


def test_calibrate_unpacks_tuple_batches_as_positional_arguments():
    model = replace_quant_module(TwoInputs())
    model.q_proj.input_quantizer.enable()
    model.k_proj.input_quantizer.enable()
    a, b = torch.full((1, 16), 2.0), torch.full((1, 16), -5.0)
    result = calibrate(model, dict(model.named_parameters()), [(a, b)], shared_states={"weight_global_amax": {"patterns": [r"(?:q|k)_proj"]}})
    assert result["q_proj.input_quantizer._amax"].item() == 2.0
    assert result["k_proj.input_quantizer._amax"].item() == 5.0
    shared = max(reduce_amax(model.q_proj.weight.detach()), reduce_amax(model.k_proj.weight.detach()))
    assert result["q_proj.weight_quantizer._global_amax"].item() == shared.item()
    assert result["k_proj.weight_quantizer._global_amax"].item() == shared.item()


def test_calibrate_refuses_a_bad_config():
    model = llama()
    with pytest.raises(ValueError, match=r"shared_states\['weight_global_amax'\]: unknown field"):
        calibrate(model, dict(model.named_parameters()), [], shared_states={"weight_global_amax": {"pattern": []}})
