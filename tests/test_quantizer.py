"""Examples for sharedquant.adapters.quantizer: TensorQuantizer, QuantLinear, replace_quant_module."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from sharedquant.adapters import QuantLinear, TensorQuantizer, max_calibrate, replace_quant_module
from sharedquant.adapters.calibrate import calibration_mode
from sharedquant.adapters.models import tiny_llama
from sharedquant.core import nvfp4_fake_quant, reduce_amax, reduce_block_amax

# --- TensorQuantizer ---------------------------------------------------------------------


def test_quantizer_defaults_are_nvfp4_static_blocks_of_16_with_unset_buffers():
    quantizer = TensorQuantizer()
    assert quantizer.block_sizes == {-1: 16, "type": "static", "scale_bits": (4, 3)}
    assert quantizer.block_size == 16
    assert quantizer.is_enabled and quantizer.is_static_block_quant and quantizer.is_nvfp4_static
    # Registered as buffers (so state_dict / .to() know them), None until calibrated.
    assert "_amax" in quantizer._buffers and "_global_amax" in quantizer._buffers
    assert quantizer.amax is None and quantizer.global_amax is None
    assert quantizer.state_dict() == {}


@pytest.mark.parametrize(
    "block_sizes",
    [{-1: 15, "type": "static"}, {-1: 0}, {-1: "16"}, {-1: 16, "type": "weird"}, {"type": "static"}],
)
def test_quantizer_refuses_a_bad_block_config(block_sizes):
    with pytest.raises(ValueError, match=r"TensorQuantizer: block_sizes must look like .* got"):
        TensorQuantizer(block_sizes)


def test_disabled_quantizer_is_the_identity_and_enable_turns_it_back_on():
    quantizer = TensorQuantizer()
    quantizer.amax = reduce_block_amax(torch.ones(2, 16), {-1: 16}).reshape(-1, 1)
    x = torch.randn(2, 16)
    quantizer.disable()
    assert not quantizer.is_enabled
    assert quantizer(x) is x
    quantizer.enable()
    assert quantizer.is_enabled
    assert not torch.equal(quantizer(x), x)  # random values are not all on the E2M1 grid


def test_uncalibrated_quantizer_passes_input_through():
    x = torch.randn(4, 32)
    assert TensorQuantizer()(x) is x


def test_amax_and_global_amax_are_settable_and_stored_as_fp32():
    quantizer = TensorQuantizer()
    quantizer.amax = torch.tensor([[1.5], [2.0]], dtype=torch.float16)
    quantizer.global_amax = 3
    assert quantizer._buffers["_amax"].dtype == torch.float32
    assert quantizer._buffers["_amax"].tolist() == [[1.5], [2.0]]
    assert quantizer.global_amax.dtype == torch.float32 and quantizer.global_amax.item() == 3.0
    quantizer._global_amax = torch.tensor(4.0)  # plain assignment works while untied
    assert quantizer.global_amax.item() == 4.0
    quantizer.amax = None
    quantizer.global_amax = None
    assert quantizer.amax is None and quantizer.global_amax is None
    assert "_amax" in quantizer._buffers  # still a registered (None) buffer


def test_forward_equals_core_fake_quant_with_the_global_amax():
    weight = torch.randn(8, 32)
    quantizer = TensorQuantizer()
    quantizer.amax = reduce_block_amax(weight, {-1: 16}).reshape(-1, 1)
    quantizer.global_amax = torch.tensor(7.0)  # e.g. a group max larger than this tensor's own
    assert torch.equal(quantizer(weight), nvfp4_fake_quant(weight, torch.tensor(7.0)))
    assert not torch.equal(quantizer(weight), nvfp4_fake_quant(weight, reduce_amax(weight)))


def test_an_all_zero_weight_calibrates_and_runs():
    model = replace_quant_module(nn.Sequential(nn.Linear(16, 16), nn.Linear(16, 16)))
    with torch.no_grad():
        model[1].weight.zero_()
    max_calibrate(model)
    assert model[1].weight_quantizer.global_amax.item() == 0.0
    x = torch.randn(2, 16)
    hidden = model[0](x)
    assert torch.equal(model(x), F.linear(hidden, torch.zeros(16, 16), model[1].bias))


def test_forward_without_global_amax_uses_the_tensors_own_amax():
    weight = torch.randn(4, 16)
    quantizer = TensorQuantizer()
    quantizer.amax = reduce_block_amax(weight, {-1: 16}).reshape(-1, 1)
    assert torch.equal(quantizer(weight), nvfp4_fake_quant(weight, reduce_amax(weight)))


def test_forward_keeps_the_input_dtype():
    weight = torch.randn(4, 16).to(torch.bfloat16)
    quantizer = TensorQuantizer()
    quantizer.amax = reduce_block_amax(weight, {-1: 16}).reshape(-1, 1)
    quantizer.global_amax = reduce_amax(weight).float()
    out = quantizer(weight)
    assert out.dtype == torch.bfloat16
    assert torch.equal(out, nvfp4_fake_quant(weight, quantizer.global_amax))


def test_calibrating_static_quantizer_records_per_block_amax_in_the_peer_layout():
    quantizer = TensorQuantizer()
    first = torch.randn(3, 32)
    second = first * torch.tensor([[2.0], [0.5], [1.0]])
    with calibration_mode([quantizer]):
        assert quantizer(first) is first  # observing does not quantize
        quantizer(second)
    expected = torch.maximum(reduce_block_amax(first, {-1: 16}), reduce_block_amax(second, {-1: 16}))
    assert quantizer.amax.shape == (6, 1)  # [blocks, 1]
    assert torch.equal(quantizer.amax, expected.reshape(-1, 1))
    assert not quantizer._calibrating


def test_calibrating_dynamic_quantizer_records_the_running_per_tensor_amax():
    quantizer = TensorQuantizer({-1: 16, "type": "dynamic", "scale_bits": (4, 3)})
    with calibration_mode([quantizer]):
        quantizer(torch.tensor([[1.0, -3.0]]))
        quantizer(torch.tensor([[2.0, 0.5]]))
    assert quantizer.amax.shape == () and quantizer.amax.item() == 3.0
    assert not quantizer.is_nvfp4_static


def test_half_keeps_amax_buffers_fp32_and_exact():
    quantizer = TensorQuantizer()
    exact = 1.0 + 2.0**-20  # not representable in fp16 or bf16
    quantizer.amax = torch.full((2, 1), exact)
    quantizer.global_amax = exact
    for convert in (nn.Module.half, nn.Module.bfloat16, nn.Module.double):
        convert(quantizer)
        assert quantizer.amax.dtype == torch.float32 and quantizer.global_amax.dtype == torch.float32
        assert quantizer.amax[0, 0].item() == exact and quantizer.global_amax.item() == exact


def test_fresh_quantizer_loads_a_calibrated_one_strictly():
    calibrated = TensorQuantizer()
    calibrated.amax = torch.rand(4, 1) + 0.5
    calibrated.global_amax = 2.5
    fresh = TensorQuantizer()
    fresh.load_state_dict(calibrated.state_dict(), strict=True)
    assert torch.equal(fresh.amax, calibrated.amax) and fresh.amax.dtype == torch.float32
    assert fresh.global_amax.item() == 2.5
    assert fresh.amax is not calibrated.amax  # loaded into its own buffer


def test_quantizer_repr_says_state():
    quantizer = TensorQuantizer()
    assert "static blocks of 16, enabled, amax=unset" in repr(quantizer)
    quantizer.amax = torch.ones(3, 1)
    quantizer.disable()
    assert "disabled, amax=(3, 1)" in repr(quantizer)


# --- QuantLinear -------------------------------------------------------------------------


def test_quant_linear_has_three_quantizers_and_only_the_weight_one_starts_enabled():
    layer = QuantLinear(32, 8)
    assert isinstance(layer, nn.Linear)
    assert isinstance(layer.input_quantizer, TensorQuantizer)
    assert isinstance(layer.output_quantizer, TensorQuantizer)
    assert layer.weight_quantizer.is_enabled and layer.weight_quantizer.is_nvfp4_static
    assert not layer.input_quantizer.is_enabled and not layer.output_quantizer.is_enabled
    assert layer.input_quantizer.block_sizes["type"] == "dynamic"
    assert layer.parallel_state is None


def test_quant_linear_forward_is_linear_over_the_fake_quantized_weight():
    layer = QuantLinear(32, 8)
    layer.weight_quantizer.amax = reduce_block_amax(layer.weight.detach(), {-1: 16}).reshape(-1, 1)
    layer.weight_quantizer.global_amax = 5.0
    x = torch.randn(3, 32)
    expected = F.linear(x, nvfp4_fake_quant(layer.weight.detach(), 5.0), layer.bias)
    assert torch.equal(layer(x), expected)


def test_quant_linear_with_input_not_multiple_of_16_has_its_weight_quantizer_disabled():
    layer = QuantLinear(20, 8)
    assert not layer.weight_quantizer.is_enabled
    x = torch.randn(2, 20)
    assert torch.equal(layer(x), F.linear(x, layer.weight, layer.bias))


def test_from_linear_shares_parameters_and_training_flag():
    linear = nn.Linear(16, 4).eval()
    quant = QuantLinear.from_linear(linear)
    assert quant.weight is linear.weight and quant.bias is linear.bias
    assert not quant.training
    no_bias = QuantLinear.from_linear(nn.Linear(16, 4, bias=False))
    assert no_bias.bias is None


# --- replace_quant_module ------------------------------------------------------------------


def test_replace_quant_module_swaps_every_linear_in_place_and_shares_parameters():
    model = tiny_llama(num_layers=1)
    weights = {name: p for name, p in model.named_parameters()}
    linears = [name for name, m in model.named_modules() if type(m) is nn.Linear]
    out = replace_quant_module(model)
    assert out is model
    modules = dict(model.named_modules())
    assert all(type(modules[name]) is QuantLinear for name in linears)
    assert not any(type(m) is nn.Linear for m in model.modules())
    assert all(p is weights[name] for name, p in model.named_parameters())


def test_replace_quant_module_is_idempotent():
    model = replace_quant_module(tiny_llama(num_layers=1))
    before = dict(model.named_modules())
    replace_quant_module(model)
    after = dict(model.named_modules())
    assert before.keys() == after.keys() and all(before[k] is after[k] for k in before)


def test_replace_quant_module_converts_a_bare_linear():
    linear = nn.Linear(32, 4)
    quant = replace_quant_module(linear)
    assert type(quant) is QuantLinear and quant.weight is linear.weight


def test_replace_quant_module_warns_for_input_features_not_multiple_of_16():
    model = nn.Sequential(nn.Linear(24, 32), nn.Linear(32, 8))
    with pytest.warns(UserWarning, match=r"replace_quant_module: 0 has 24 input features, not a multiple of 16"):
        replace_quant_module(model)
    assert not model[0].weight_quantizer.is_enabled
    assert model[1].weight_quantizer.is_enabled


def test_replace_quant_module_no_warning_when_widths_fit():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        replace_quant_module(tiny_llama(num_layers=1))


def test_replace_quant_module_refuses_a_non_module():
    with pytest.raises(TypeError, match="replace_quant_module: expected an nn.Module, got dict"):
        replace_quant_module({})


def test_fresh_quant_model_materialises_buffers_on_the_layers_device():
    # A fresh quantizer owns no tensor that tells its device; its loaded buffers must
    # land next to the layer's weight, not where the checkpoint was read (here: meta
    # stands in for an accelerator; the CUDA file checks the real thing).
    calibrated = QuantLinear(16, 4)
    calibrated.weight_quantizer.amax = torch.ones(4, 1)
    calibrated.weight_quantizer.global_amax = 1.0
    fresh = QuantLinear(16, 4, device="meta")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch: copying into a meta parameter is a no-op
        fresh.load_state_dict(calibrated.state_dict(), strict=True)
    assert fresh.weight_quantizer.amax.device.type == "meta"
    assert fresh.weight_quantizer.global_amax.device.type == "meta"
