"""The demo's FP8 part: unshared FP8 export, vLLM's float16 load-time repair, and the errors printed."""

import re

import torch

from sharedquant.adapters.cli import main
from sharedquant.adapters.demo import _input_amax, _is_quantized, skew_siblings_
from sharedquant.adapters.demo_fp8 import fp8_member_errors, quantize_unshared_fp8, vllm_requantize_with_max_scale
from sharedquant.adapters.models import tiny_llama
from sharedquant.core.fp8 import fp8_requantize

K_PROJ = "model.layers.0.self_attn.k_proj"


def unshared_fp8():
    model = skew_siblings_(tiny_llama(num_layers=1)).eval()
    tokens = torch.randint(0, 128, (2, 16))
    return model, quantize_unshared_fp8(model, _input_amax(model, tokens), _is_quantized)


def test_each_linear_gets_its_own_scale_and_its_largest_weight_maps_to_448():
    model, state = unshared_fp8()
    assert state["lm_head.weight"].dtype == torch.float32
    weight = model.model.layers[0].self_attn.k_proj.weight
    assert state[f"{K_PROJ}.weight"].dtype == torch.float8_e4m3fn and state[f"{K_PROJ}.weight_scale"].shape == ()
    assert state[f"{K_PROJ}.weight"].float().abs().max() == 448
    assert state[f"{K_PROJ}.weight_scale"] == (weight.abs().max() / 448).float()
    assert state[f"{K_PROJ}.weight_scale"] < 0.6 * state["model.layers.0.self_attn.q_proj.weight_scale"]


def test_vllm_repair_dequantizes_through_float16():
    # a scale so small that float16 flushes w * scale to zero: vLLM's path loses the member, the exact one does not
    weight = torch.full((4, 4), 2.0).to(torch.float8_e4m3fn)
    tiny, shared = torch.tensor(1e-9), torch.tensor(2e-9)
    assert vllm_requantize_with_max_scale(weight, tiny, shared).float().abs().max() == 0
    assert fp8_requantize(weight, tiny, shared).float().unique().tolist() == [1.0]


def test_member_errors_are_ordered_as_the_repair_claims():
    model, state = unshared_fp8()
    shared = {**state, f"{K_PROJ}.weight_scale": state["model.layers.0.self_attn.q_proj.weight_scale"]}
    shared[f"{K_PROJ}.weight"] = fp8_requantize(state[f"{K_PROJ}.weight"], state[f"{K_PROJ}.weight_scale"],
                                                shared[f"{K_PROJ}.weight_scale"])  # fmt: skip
    errors = fp8_member_errors(model.model.layers[0].self_attn.k_proj.weight, state, shared, K_PROJ)
    assert errors["exported"] < errors["reconciled"] < 0.1 < errors["engine max"]
    assert abs(errors["vllm load"] - errors["reconciled"]) < 0.002


def test_the_demo_shows_the_fp8_errors_side_by_side(capsys):
    assert main(["demo"]) == 0
    text = capsys.readouterr().out
    assert "format modelopt-fp8" in text
    found = re.search(
        r"repaired FP8 members: as exported ([\d.]+)%, reconciled offline ([\d.]+)%, "
        r"vLLM load-time repair \(float16\) ([\d.]+)%, engine max without requantizing ([\d.]+)%",
        text,
    )
    exported, offline, vllm, engine = map(float, found.groups())
    assert exported < offline and abs(offline - vllm) < 0.2 and offline * 5 < engine
