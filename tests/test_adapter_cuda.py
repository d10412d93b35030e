"""Tying, the guard, ``_apply`` moves, populate and checkpoints on CUDA tensors.

Skipped where no GPU is present. ``SHAREDQUANT_TEST_DEVICE=cpu`` runs the same checks
on the CPU, a dry run of the test logic for machines without a GPU.
"""

from __future__ import annotations

import copy
import os

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
from sharedquant.adapters.models import tiny_llama, tiny_mixtral
from sharedquant.adapters.tying import TIED_ATTRS, is_tied
from sharedquant.core import nvfp4_fake_quant

DEVICE = torch.device(os.environ.get("SHAREDQUANT_TEST_DEVICE", "cuda"))
pytestmark = pytest.mark.skipif(
    DEVICE.type == "cuda" and not torch.cuda.is_available(), reason="needs a CUDA device"
)
EXACT = 1.0 + 2.0**-20  # an fp32 amax that fp16 cannot hold


def quantized(seed: int = 0) -> nn.Module:
    return replace_quant_module(tiny_llama(seed=seed, num_layers=1))


def states(model: nn.Module) -> list[SharedWeightGlobalAmaxState]:
    return list(iter_shared_quant_states(model, SharedWeightGlobalAmaxState))


def assert_tied_on(model: nn.Module, device: torch.device) -> None:
    found = states(model)
    assert found
    for state in found:
        value = state.global_amax
        assert value.device.type == device.type and value.dtype == torch.float32
        for member in state.members:
            assert member.weight_quantizer._buffers["_global_amax"] is value
            assert "_global_amax" in member.weight_quantizer.__dict__[TIED_ATTRS]


def quantizer_buffers(model: nn.Module) -> list[torch.Tensor]:
    return [b for q in model.modules() if isinstance(q, TensorQuantizer) for b in q._buffers.values() if b is not None]


def test_max_calibrate_on_device_ties_and_matches_the_cpu_values():
    cpu = max_calibrate(quantized())
    model = max_calibrate(quantized().to(DEVICE))
    assert_tied_on(model, DEVICE)
    assert all(b.device.type == DEVICE.type for b in quantizer_buffers(model))
    for on_device, on_cpu in zip(states(model), states(cpu)):
        assert on_device.global_amax.item() == on_cpu.global_amax.item()


def test_guard_and_in_place_update_on_device():
    model = max_calibrate(quantized().to(DEVICE))
    attn = model.model.layers[0].self_attn
    with pytest.raises(RuntimeError, match="_global_amax is tied to a shared quant state"):
        attn.q_proj.weight_quantizer._global_amax = torch.tensor(1.0, device=DEVICE)
    attn.k_proj.weight_quantizer.global_amax.copy_(torch.tensor(6.0))
    assert [getattr(attn, r).weight_quantizer.global_amax.item() for r in ("q_proj", "k_proj", "v_proj")] == [6.0] * 3


@pytest.mark.parametrize(
    "move",
    [lambda m: m.to(DEVICE), lambda m: m.to(DEVICE, torch.half), lambda m: m.to(DEVICE).half()],
    ids=["to_device", "to_device_half", "to_device_then_half"],
)
def test_moving_a_tied_cpu_model_keeps_aliases_fp32_and_exact_values(move):
    model = max_calibrate(quantized())
    for state in states(model):
        state.global_amax.fill_(EXACT)
    move(model)
    assert_tied_on(model, DEVICE)
    assert all(s.global_amax.item() == EXACT for s in states(model))
    assert all(b.dtype == torch.float32 and b.device.type == DEVICE.type for b in quantizer_buffers(model))
    model.cpu()
    assert_tied_on(model, torch.device("cpu"))
    assert all(s.global_amax.item() == EXACT for s in states(model))


def test_cuda_method_keeps_aliases():
    if DEVICE.type != "cuda":
        pytest.skip(".cuda() needs a CUDA device")
    model = max_calibrate(quantized())
    model.cuda()
    assert_tied_on(model, DEVICE)


def test_re_populate_on_device_updates_in_place_and_keeps_ties():
    model = max_calibrate(replace_quant_module(tiny_mixtral(num_layers=1, num_experts=2)).to(DEVICE))
    expert = model.model.layers[0].block_sparse_moe.experts[1]
    state = expert._shared_quant_states[0]
    shared = state.global_amax
    with torch.no_grad():
        expert.w3.weight.mul_(10.0)
    max_calibrate(model)
    assert state.global_amax is shared
    assert_tied_on(model, DEVICE)
    assert shared.item() == expert.w3.weight.detach().abs().max().item()


def test_forward_on_device_uses_the_shared_global_amax():
    model = max_calibrate(quantized().to(DEVICE))
    q_proj = model.model.layers[0].self_attn.q_proj
    x = torch.randn(2, 64, device=DEVICE)
    shared = q_proj.weight_quantizer.global_amax
    expected = nn.functional.linear(x, nvfp4_fake_quant(q_proj.weight.detach(), shared))
    assert torch.equal(q_proj(x), expected)


def test_checkpoint_round_trip_from_device_through_a_cpu_read_file(tmp_path):
    model = max_calibrate(quantized(seed=0).to(DEVICE))
    state_dict = model.state_dict()
    keys = [f"model.layers.0.self_attn.{r}.weight_quantizer._global_amax" for r in ("q_proj", "k_proj", "v_proj")]
    assert len({state_dict[k].untyped_storage().data_ptr() for k in keys}) == 3
    path = tmp_path / "model.safetensors"
    save_file(state_dict, str(path))
    fresh = quantized(seed=1).to(DEVICE)
    fresh.load_state_dict(load_file(str(path)), strict=True)  # the file is read to the CPU
    assert all(b.device.type == DEVICE.type for b in quantizer_buffers(fresh))
    SharedWeightGlobalAmaxState.restore(fresh)
    assert_tied_on(fresh, DEVICE)
    assert [s.global_amax.item() for s in states(fresh)] == [s.global_amax.item() for s in states(model)]


def test_disagreeing_load_into_a_tied_device_model_is_reported_and_unties():
    model = max_calibrate(quantized().to(DEVICE))
    state_dict = copy.deepcopy(model.state_dict())
    state_dict["model.layers.0.self_attn.v_proj.weight_quantizer._global_amax"] = torch.tensor(4.0)
    with pytest.raises(RuntimeError, match="group 'model.layers.0.self_attn'"):
        model.load_state_dict(state_dict)
    attn = model.model.layers[0].self_attn
    assert attn.v_proj.weight_quantizer.global_amax.item() == 4.0
    assert attn.q_proj.weight_quantizer.global_amax.item() != 4.0
    assert not is_tied(attn.q_proj.weight_quantizer, "_global_amax")
    assert attn.v_proj.weight_quantizer.global_amax.device.type == DEVICE.type


def test_deepcopy_on_device_keeps_ties_inside_the_copy():
    model = max_calibrate(quantized().to(DEVICE))
    clone = copy.deepcopy(model)
    assert_tied_on(clone, DEVICE)
    assert states(clone)[0].global_amax is not states(model)[0].global_amax


def test_quant_linear_built_on_device_calibrates_there():
    layer = QuantLinear(32, 16, device=DEVICE)
    max_calibrate(layer)
    assert layer.weight_quantizer.amax.device.type == DEVICE.type
    assert layer.weight_quantizer.global_amax.device.type == DEVICE.type
