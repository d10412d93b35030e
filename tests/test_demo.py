"""``sharedquant demo``: unshared quantization of the tiny models, and the before/after comparison it prints."""

import re

import torch

from sharedquant.adapters.cli import main
from sharedquant.adapters.demo import member_errors, quantize_unshared, skew_siblings_
from sharedquant.adapters.models import tiny_llama, tiny_mixtral
from sharedquant.core.nvfp4 import nvfp4_dequantize


def test_unshared_quantization_gives_each_linear_its_own_scale_and_skips_head_and_router():
    model = skew_siblings_(tiny_mixtral(num_layers=1, num_experts=2))
    state = quantize_unshared(model)
    assert state["lm_head.weight"].dtype == torch.float32
    assert state["model.layers.0.block_sparse_moe.gate.weight"].dtype == torch.float32
    expert = "model.layers.0.block_sparse_moe.experts.0"
    assert state[f"{expert}.w1.weight"].dtype == torch.uint8
    assert state[f"{expert}.w1.weight_scale"].dtype == torch.float8_e4m3fn
    # each member's own amax: the largest weight maps to the largest code (6) times its block scale
    for name in ("w1", "w3"):
        values = nvfp4_dequantize(state[f"{expert}.{name}.weight"], state[f"{expert}.{name}.weight_scale"],
                                  state[f"{expert}.{name}.weight_scale_2"])  # fmt: skip
        weight = getattr(model.model.layers[0].block_sparse_moe.experts[0], name).weight
        torch.testing.assert_close(values.abs().max(), weight.abs().max(), rtol=0.07, atol=0)
    # w3 of expert 0 was scaled down: its scale is smaller than its sibling's
    assert state[f"{expert}.w3.weight_scale_2"] < 0.5 * state[f"{expert}.w1.weight_scale_2"]
    # siblings read the same input, so they share an input scale
    assert state[f"{expert}.w1.input_scale"] == state[f"{expert}.w3.input_scale"] > 0


def test_member_errors_are_zero_for_an_untouched_member_and_large_for_engine_max():
    state = quantize_unshared(skew_siblings_(tiny_llama(num_layers=1)))
    k_proj = "model.layers.0.self_attn.k_proj"
    assert member_errors(state, state, k_proj) == (0.0, 0.0)
    shared = {**state, f"{k_proj}.weight_scale_2": state["model.layers.0.self_attn.q_proj.weight_scale_2"]}
    _, engine = member_errors(state, shared, k_proj)
    ratio = (shared[f"{k_proj}.weight_scale_2"] / state[f"{k_proj}.weight_scale_2"]).item()
    assert abs(engine - (ratio - 1)) < 1e-4  # every value inflated by the ratio


def test_the_demo_shows_both_tables_and_reconciled_errors_far_below_engine_max(capsys):
    assert main(["demo"]) == 0
    text = capsys.readouterr().out
    assert text.count("(sharedquant inspect)") == 3 and text.count("after sharedquant reconcile") == 3  # + FP8
    assert re.search(r"\d+ fused groups, 0 consistent, \d+ mismatched", text)
    assert re.search(r"\d+ fused groups, \d+ consistent, 0 mismatched", text)
    summaries = re.findall(r"repaired members: reconciled ([\d.]+)%, engine max without rescaling ([\d.]+)%", text)
    assert len(summaries) == 2
    for reconciled, engine in summaries:
        assert float(reconciled) * 5 < float(engine)
