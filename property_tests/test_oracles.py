"""The code against independent oracles, over values that reach the edges of each format.

Each expected value is computed here from Python floats, never from the package: the
abs-max is ``max(abs(v))`` over a list (NaN if any), a group's ``global_amax`` the
same over its members rounded up to fp32, the E2M1 code the nearest grid value with
ties to the even code. Values reach negatives, NaN, inf, subnormals, signed zeros and
the E2M1 tie points, so a reduction that drops ``abs``, a finalize that takes the
min, or a rounding that breaks ties the other way fails here.
"""

from __future__ import annotations

import math
import struct

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sharedquant.adapters import SharedWeightGlobalAmaxState, replace_quant_module
from sharedquant.adapters.models import tiny_llama
from sharedquant.core.nvfp4 import nvfp4_dequantize, nvfp4_quantize
from sharedquant.core.reduce import reduce_amax

DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
E2M1 = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
TIES = (0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0)


def edge_values(dtype: torch.dtype) -> st.SearchStrategy[float]:
    """Floats of ``dtype``: signed zeros, subnormals, the largest finite, inf, NaN, ties, and any other."""
    info = torch.finfo(dtype)
    edges = [0.0, -0.0, info.smallest_normal, info.smallest_normal / 4, info.max, math.inf, math.nan, *TIES]
    edges += [-v for v in edges]
    anything = st.floats(allow_nan=True, allow_infinity=True, allow_subnormal=True, width=64 if dtype == torch.float64 else 32)
    return st.one_of(st.sampled_from(edges), anything)


def representable(values: list[float], dtype: torch.dtype) -> list[float]:
    """``values`` as ``dtype`` holds them (what the oracle must see)."""
    return torch.tensor(values, dtype=torch.float64).to(dtype).to(torch.float64).tolist()


def python_abs_max(values: list[float]) -> float:
    return math.nan if any(math.isnan(v) for v in values) else max(abs(v) for v in values)


def fp32_at_or_above(value: float) -> float:
    """The smallest fp32 >= ``value`` (value >= 0, finite), by bit arithmetic."""
    nearest = struct.unpack("<f", struct.pack("<f", value))[0] if value < 3.5e38 else math.inf
    if nearest >= value:
        return nearest
    (bits,) = struct.unpack("<I", struct.pack("<f", nearest))
    return struct.unpack("<f", struct.pack("<I", bits + 1))[0]


def same(actual: float, expected: float) -> bool:
    return (math.isnan(actual) and math.isnan(expected)) or actual == expected


@given(st.data(), st.sampled_from(DTYPES), st.integers(1, 4), st.integers(1, 6))
def test_reduce_amax_is_the_python_abs_max_whole_and_per_row(data, dtype, rows, columns):
    drawn = data.draw(st.lists(edge_values(dtype), min_size=rows * columns, max_size=rows * columns))
    values = representable(drawn, dtype)
    x = torch.tensor(values, dtype=torch.float64).to(dtype).reshape(rows, columns)
    assert same(reduce_amax(x).item(), python_abs_max(values))
    per_row = reduce_amax(x, axis=-1).reshape(-1).tolist()
    expected = [python_abs_max(values[r * columns : (r + 1) * columns]) for r in range(rows)]
    assert all(same(a, e) for a, e in zip(per_row, expected)), (per_row, expected)


def e2m1_round(value: float) -> float:
    """Nearest E2M1 magnitude (saturating at 6) with the sign; ties go to the even code."""
    magnitude = min(abs(value), 6.0)
    best = min(range(len(E2M1)), key=lambda code: (abs(E2M1[code] - magnitude), code % 2))
    return math.copysign(E2M1[best], value)


@given(st.lists(st.one_of(st.sampled_from(TIES + E2M1), st.floats(0, 6)), min_size=15, max_size=15), st.lists(st.booleans(), min_size=15, max_size=15))
def test_nvfp4_rounds_each_value_to_the_nearest_e2m1_ties_to_even(magnitudes, negative):
    # A block whose amax is 6 under global_amax 6 * 448 has both scales 1: the codes are the values.
    values = [6.0] + [-m if n else m for m, n in zip(magnitudes, negative)]
    x = torch.tensor([values], dtype=torch.float32)
    quantized = nvfp4_quantize(x, 6.0 * 448.0)
    assert quantized.block_scale.float().item() == 1.0
    decoded = nvfp4_dequantize(quantized.packed, quantized.block_scale, quantized.global_scale).reshape(-1).tolist()
    assert decoded == [e2m1_round(v) for v in values]


def nonnegative_amax(dtype: torch.dtype) -> st.SearchStrategy[float]:
    """What a calibrated amax holds: finite magnitudes, subnormals and zeros included, and ties."""
    info = torch.finfo(dtype)
    edges = [0.0, info.smallest_normal, info.smallest_normal / 4, info.max, 1.0, 2.0]
    return st.one_of(st.sampled_from(edges), st.floats(0, float(info.max), allow_subnormal=True, width=32))


@settings(max_examples=40, deadline=None)
@given(st.data(), st.sampled_from((torch.float32, torch.bfloat16, torch.float16)))
def test_populate_sets_each_group_to_the_python_max_over_its_members(data, dtype):
    """q/k/v of one layer: the shared value is the largest |amax| of any member, rounded up to fp32."""
    model = replace_quant_module(tiny_llama(num_layers=1))
    attention = model.model.layers[0].self_attn
    members = [attention.q_proj, attention.k_proj, attention.v_proj]
    values = []
    for member in members:
        drawn = data.draw(st.lists(nonnegative_amax(dtype), min_size=1, max_size=3))
        sign = data.draw(st.sampled_from([1.0, -1.0]))  # a sign bit an abs-max must ignore
        amax = torch.tensor([sign * v for v in drawn], dtype=torch.float64).to(dtype)
        member.weight_quantizer.amax = amax.reshape(-1, 1)
        values += [abs(v) for v in amax.to(torch.float64).tolist()]
    SharedWeightGlobalAmaxState.attach(model)
    SharedWeightGlobalAmaxState.populate(model)
    (state,) = list(attention._shared_quant_states)
    assert state.global_amax.item() == fp32_at_or_above(max(values))


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_populate_refuses_a_member_that_is_not_finite_naming_it(bad):
    model = replace_quant_module(tiny_llama(num_layers=1))
    attention = model.model.layers[0].self_attn
    for member in (attention.q_proj, attention.k_proj, attention.v_proj):
        member.weight_quantizer.amax = torch.tensor([[1.0]])
    attention.k_proj.weight_quantizer.amax = torch.tensor([[2.0], [bad]])
    SharedWeightGlobalAmaxState.attach(model)
    with pytest.raises(ValueError, match=r"model\.layers\.0\.self_attn\.k_proj\.weight_quantizer\._amax.* not finite"):
        SharedWeightGlobalAmaxState.populate(model)


@settings(max_examples=30, deadline=None)
@given(st.data(), st.sampled_from((torch.float32, torch.bfloat16)), st.integers(1, 4), st.integers(1, 6))
def test_reduce_amax_agrees_with_the_peer_on_finite_values(data, dtype, rows, columns):
    peer = pytest.importorskip("modelopt.torch.quantization.utils")
    finite = st.floats(allow_nan=False, allow_infinity=False, allow_subnormal=True, width=32)
    values = data.draw(st.lists(st.one_of(st.sampled_from([0.0, -0.0, *TIES]), finite), min_size=rows * columns, max_size=rows * columns))
    x = torch.tensor(values, dtype=torch.float32).to(dtype).reshape(rows, columns)
    for axis in (None, -1):
        assert torch.equal(reduce_amax(x, axis=axis), peer.reduce_amax(x, axis=axis).to(reduce_amax(x, axis=axis).dtype))
