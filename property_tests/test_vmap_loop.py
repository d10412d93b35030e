"""vmap == loop: torch.func.vmap over a stack of expert weights gives what a Python loop gives."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sharedquant.core.nvfp4 import nvfp4_fake_quant, nvfp4_quantize
from sharedquant.core.reduce import reduce_amax, reduce_block_amax

from strategies import FLOAT_DTYPES, weights_of_shape


@st.composite
def expert_stacks(draw) -> torch.Tensor:
    """``[experts, rows, 16 * blocks]`` with each expert's magnitude drawn on its own (up to 1000x apart)."""
    dtype = draw(st.sampled_from(FLOAT_DTYPES))
    shape = (draw(st.integers(1, 4)), 16 * draw(st.integers(1, 3)))
    return torch.stack([draw(weights_of_shape(shape, dtype)) for _ in range(draw(st.integers(1, 4)))])


@settings(max_examples=20)
@given(expert_stacks())
def test_vmap_amax_and_block_amax_equal_a_loop(stack):
    assert torch.equal(torch.func.vmap(reduce_amax)(stack), torch.stack([reduce_amax(w) for w in stack]))
    mapped = torch.func.vmap(lambda w: reduce_block_amax(w, {-1: 16}))(stack)
    assert torch.equal(mapped, torch.stack([reduce_block_amax(w, {-1: 16}) for w in stack]))


@settings(max_examples=20)
@given(expert_stacks(), st.booleans())
def test_vmap_nvfp4_equals_a_loop(stack, shared):
    own = torch.stack([reduce_amax(w).float() for w in stack]).clamp(min=1e-6)
    amax = own.max().expand(len(stack)) if shared else own
    fake = torch.func.vmap(nvfp4_fake_quant)(stack, amax)
    looped = torch.stack([nvfp4_fake_quant(w, a) for w, a in zip(stack, amax)])
    assert torch.equal(fake.view(torch.uint8), looped.view(torch.uint8))
    mapped = torch.func.vmap(nvfp4_quantize)(stack, amax)
    parts = [nvfp4_quantize(w, a) for w, a in zip(stack, amax)]
    assert torch.equal(mapped.packed, torch.stack([p.packed for p in parts]))
    assert torch.equal(
        mapped.block_scale.view(torch.uint8), torch.stack([p.block_scale.view(torch.uint8) for p in parts])
    )
    assert torch.equal(mapped.global_scale, torch.stack([p.global_scale for p in parts]))
