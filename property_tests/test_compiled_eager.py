"""Compiled == eager: the core's tensor work under torch.compile(fullgraph=True) gives the eager bits.

Compiling costs a fraction of a second per example, so these run few examples; each
starts from an empty dynamo cache so no example inherits another's guards.
"""

from __future__ import annotations

import torch
import torch._dynamo
from hypothesis import given, settings
from hypothesis import strategies as st

from sharedquant.core.groups import find_groups
from sharedquant.core.lifecycle import finalize
from sharedquant.core.nvfp4 import nvfp4_fake_quant, nvfp4_quantize
from sharedquant.core.reduce import reduce_amax, reduce_block_amax

from strategies import amax_buffers, pattern_sets, trees, weights

FEW = settings(max_examples=4)


def bits(value):
    """Raw bytes of every tensor in ``value`` (so -0.0, NaN and float8 compare exactly)."""
    if isinstance(value, torch.Tensor):
        return value.dtype, tuple(value.shape), value.detach().reshape(-1).contiguous().view(torch.uint8).tolist()
    if isinstance(value, (tuple, list)):
        return [bits(item) for item in value]
    return value.groups, bits(value.global_amax)  # SharedAmax


def compiled(fn):
    torch._dynamo.reset()
    return torch.compile(fn, fullgraph=True, backend="aot_eager", dynamic=False)


@FEW
@given(
    weights(dtypes=(torch.float32, torch.bfloat16, torch.float8_e4m3fn, torch.int8)),
    st.sampled_from([None, 0, -1, (0, 1)]),
)
def test_compiled_reduce_amax_equals_eager(weight, axis):
    fn = lambda x: reduce_amax(x, axis=axis)  # noqa: E731 - axis is static
    assert bits(compiled(fn)(weight)) == bits(fn(weight))


@FEW
@given(weights(), st.sampled_from([{-1: 16}, {-1: 8}, {-1: 16, 0: 1}]))
def test_compiled_block_amax_equals_eager(weight, block_sizes):
    fn = lambda x: reduce_block_amax(x, block_sizes)  # noqa: E731
    assert bits(compiled(fn)(weight)) == bits(fn(weight))


@FEW
@given(weights(), st.floats(0.5, 1000.0))
def test_compiled_nvfp4_equals_eager(weight, headroom):
    global_amax = weight.float().abs().max() * headroom + 1e-3
    assert bits(compiled(nvfp4_quantize)(weight, global_amax)) == bits(nvfp4_quantize(weight, global_amax))
    assert bits(compiled(nvfp4_fake_quant)(weight, global_amax)) == bits(nvfp4_fake_quant(weight, global_amax))


@FEW
@given(st.data())
def test_compiled_finalize_equals_eager(data):
    tree = data.draw(trees())
    groups = find_groups(tree.names, data.draw(pattern_sets()), containers=tree.containers)
    buffers = data.draw(amax_buffers(tree.names, missing=False))
    fn = lambda b: finalize(groups, b)  # noqa: E731 - groups are static metadata
    assert bits(compiled(fn)(buffers)) == bits(fn(buffers))
