"""The fusion guarantee: with the library's shared global amax, quantizing the fused tensor
equals fusing the quantized members, bit for bit."""

from __future__ import annotations

import torch
from hypothesis import given

from sharedquant.core.nvfp4 import nvfp4_fake_quant, nvfp4_quantize
from sharedquant.core.reduce import reduce_amax, reduce_block_amax
from sharedquant.core.transforms import unify_state_dict

from strategies import fused_members


def shared_global_amax(patterns, names, members, per_block: bool) -> list[torch.Tensor]:
    """Each member's ``_global_amax`` as ``unify_state_dict`` writes it from calibrated amax."""
    state_dict = {}
    for name, weight in zip(names, members):
        state_dict[f"{name}.weight"] = weight
        amax = reduce_block_amax(weight, {-1: 16}) if per_block else reduce_amax(weight)
        state_dict[f"{name}.weight_quantizer._amax"] = amax
    unified = unify_state_dict(state_dict, patterns)
    return [unified[f"{name}.weight_quantizer._global_amax"] for name in names]


@given(fused_members())
def test_quantizing_the_fused_weight_equals_concatenating_quantized_members(case):
    patterns, names, members = case
    for per_block in (False, True):
        global_amax = shared_global_amax(patterns, names, members, per_block)
        assert all(torch.equal(value, global_amax[0]) for value in global_amax)  # one scale for the group
        fused = nvfp4_quantize(torch.cat(members), global_amax[0])
        parts = [nvfp4_quantize(weight, value) for weight, value in zip(members, global_amax)]
        assert torch.equal(fused.packed, torch.cat([p.packed for p in parts]))
        assert torch.equal(
            fused.block_scale.view(torch.uint8), torch.cat([p.block_scale.view(torch.uint8) for p in parts])
        )
        assert all(torch.equal(fused.global_scale, p.global_scale) for p in parts)


@given(fused_members())
def test_fake_quantizing_the_fused_weight_equals_concatenating_fake_quantized_members(case):
    patterns, names, members = case
    global_amax = shared_global_amax(patterns, names, members, per_block=True)
    fused = nvfp4_fake_quant(torch.cat(members), global_amax[0])
    parts = torch.cat([nvfp4_fake_quant(weight, value) for weight, value in zip(members, global_amax)])
    assert torch.equal(fused.view(torch.uint8), parts.view(torch.uint8))  # bits: -0.0 is not 0.0 here
