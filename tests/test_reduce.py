"""Examples for sharedquant.core.reduce: the seed's reduction semantics and the gaps it closes."""

from __future__ import annotations

import math

import pytest
import torch

import sharedquant.core.reduce as reduce_module
from sharedquant.core.reduce import (
    convert_quantization_axis_to_reduce_axis,
    is_traced,
    reduce_amax,
    reduce_amax_many,
    reduce_block_amax,
    reduce_sum,
    round_up_to_fp32,
)

FLOAT8 = [torch.float8_e4m3fn, torch.float8_e5m2, torch.float8_e4m3fnuz, torch.float8_e5m2fnuz]


def reference_amax(x: torch.Tensor, dims) -> torch.Tensor:
    """abs-max in fp64, keepdim, the obvious (two-pass, widening) way."""
    return x.double().abs().amax(dim=dims, keepdim=True)


# --- reduce_amax: shape semantics ---------------------------------------------------------


@pytest.mark.parametrize("keepdims", [True, False])
@pytest.mark.parametrize("squeeze_scalar", [True, False])
def test_reduce_amax_axis_none_is_zero_dim_whatever_the_flags(keepdims, squeeze_scalar):
    x = torch.tensor([[1.0, -7.5], [3.0, 2.0]])
    out = reduce_amax(x, keepdims=keepdims, squeeze_scalar=squeeze_scalar)
    assert out.shape == ()
    assert out.item() == 7.5


@pytest.mark.parametrize(
    ("axis", "keepdims", "shape"),
    [
        (0, True, (1, 3, 4)),
        (0, False, (3, 4)),
        (-1, True, (2, 3, 1)),
        (-1, False, (2, 3)),
        ((0, 2), True, (1, 3, 1)),
        ((0, 2), False, (3,)),
        ((-3, -1), False, (3,)),
        ([1, -1], True, (2, 1, 1)),
    ],
)
def test_reduce_amax_axis_and_keepdims_give_the_seed_shapes(axis, keepdims, shape):
    x = torch.randn(2, 3, 4)
    out = reduce_amax(x, axis=axis, keepdims=keepdims)
    assert out.shape == shape
    dims = [axis] if isinstance(axis, int) else list(axis)
    expected = reference_amax(x, dims).float()
    assert torch.equal(out, expected if keepdims else expected.squeeze(dims))


def test_reduce_amax_squeeze_scalar_squeezes_only_one_element_results():
    x = torch.tensor([[2.0, -9.0, 4.0]])
    assert reduce_amax(x, axis=1).shape == ()
    assert reduce_amax(x, axis=1, squeeze_scalar=False).shape == (1, 1)
    assert reduce_amax(x, axis=1, keepdims=False, squeeze_scalar=False).shape == (1,)
    assert reduce_amax(x, axis=0).shape == (1, 3)  # three elements: never squeezed
    assert reduce_amax(x, axis=(0, 1)).item() == 9.0


@pytest.mark.parametrize("axis", [0, -1])
def test_reduce_amax_zero_dim_input_accepts_axis_0_and_minus_1_as_torch_does(axis):
    assert reduce_amax(torch.tensor(-3.0), axis=axis).item() == 3.0


def test_reduce_amax_reads_every_dtype_it_keeps():
    for dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        x = torch.tensor([-4.0, 1.0], dtype=dtype)
        out = reduce_amax(x)
        assert out.dtype == dtype and out.item() == 4.0


# --- reduce_amax: values ------------------------------------------------------------------


@pytest.mark.parametrize("axis", [None, 0, 1])
def test_reduce_amax_nan_propagates(axis):
    x = torch.tensor([[1.0, float("nan")], [2.0, 3.0]])
    out = reduce_amax(x, axis=axis)
    if axis is None:
        assert math.isnan(out.item())
    elif axis == 0:
        assert out[0, 0].item() == 2.0 and math.isnan(out[0, 1].item())
    else:
        assert math.isnan(out[0, 0].item()) and out[1, 0].item() == 3.0


def test_reduce_amax_negative_side_wins_when_larger():
    assert reduce_amax(torch.tensor([-10.0, 9.0])).item() == 10.0
    assert torch.equal(reduce_amax(torch.tensor([[-10.0, 1.0], [2.0, -3.0]]), axis=1), torch.tensor([[10.0], [3.0]]))


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def awkward_floats(dtype: torch.dtype) -> torch.Tensor:
    """A [4, 6, 8] tensor whose abs-max sits on the negative side in some rows, with NaN, inf and -0.0."""
    x = torch.randn(4, 6, 8, generator=torch.Generator().manual_seed(0))
    x[0, 0, 0], x[1, 2, 3], x[2, 5, 7] = float("nan"), float("-inf"), -0.0
    x[3, 1] = -100.0
    x[3, 2] = 0.0
    return x.to(dtype)


@cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("axis", [None, 0, 1, -1, (0, 2), (1, 2)])
def test_reduce_amax_on_cuda_equals_the_cpu_result_exactly(dtype, axis):
    x = awkward_floats(dtype)
    expected = reduce_amax(x, axis=axis)
    actual = reduce_amax(x.cuda(), axis=axis)
    assert actual.is_cuda and actual.dtype == dtype and actual.shape == expected.shape
    torch.testing.assert_close(actual.cpu(), expected, rtol=0, atol=0, equal_nan=True)
    numbers = actual.cpu()[~actual.cpu().isnan()]
    assert not torch.signbit(numbers).any()  # |-0.0| is +0.0


@cuda
def test_reduce_amax_on_cuda_of_a_non_contiguous_view():
    x = awkward_floats(torch.float32).cuda().transpose(0, 2)[::2]
    torch.testing.assert_close(reduce_amax(x, axis=1).cpu(), reduce_amax(x.cpu(), axis=1), rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("axis", [None, 0, (0, 1)])
def test_reduce_amax_int8_gives_true_magnitude_128(axis):
    x = torch.tensor([[-128, 5]], dtype=torch.int8)
    out = reduce_amax(x, axis=axis)
    assert out.dtype == torch.int64
    assert out.max().item() == 128


def test_reduce_amax_int8_per_axis_keeps_each_magnitude():
    x = torch.tensor([[-128, 5], [7, -100]], dtype=torch.int8)
    assert torch.equal(reduce_amax(x, axis=1, keepdims=False), torch.tensor([128, 100]))


def test_reduce_amax_unsigned_and_bool_keep_their_dtype():
    assert reduce_amax(torch.tensor([3, 255], dtype=torch.uint8)).item() == 255
    out = reduce_amax(torch.tensor([False, True]))
    assert out.dtype == torch.bool and out.item() is True


@pytest.mark.parametrize("dtype", FLOAT8)
@pytest.mark.parametrize("axis", [None, 0, 1, -1, (0, 2)])
def test_reduce_amax_float8_equals_fp32_computation(dtype, axis):
    x = (torch.randn(4, 6, 8) * 40).to(dtype)
    out = reduce_amax(x, axis=axis)
    expected = reduce_amax(x.to(torch.float32), axis=axis)
    assert out.dtype == torch.get_default_dtype()
    assert torch.equal(out, expected)


@pytest.mark.parametrize("dtype", FLOAT8)
def test_reduce_amax_float8_nan_propagates(dtype):
    x = torch.tensor([[1.0, float("nan")], [2.0, -3.0]]).to(dtype)
    assert math.isnan(reduce_amax(x).item())
    per_column = reduce_amax(x, axis=0)
    assert per_column[0, 0].item() == 2.0 and math.isnan(per_column[0, 1].item())


def test_reduce_amax_float8_e5m2_infinity_is_the_magnitude():
    x = torch.tensor([-float("inf"), 2.0]).to(torch.float8_e5m2)
    assert reduce_amax(x).item() == float("inf")


def test_reduce_amax_float8_follows_the_default_dtype():
    x = torch.tensor([-2.5, 1.0]).to(torch.float8_e4m3fn)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        out = reduce_amax(x)
    finally:
        torch.set_default_dtype(previous)
    assert out.dtype == torch.float64 and out.item() == 2.5


@pytest.mark.parametrize("dtype", [torch.float8_e4m3fn, torch.float8_e4m3fnuz])
@pytest.mark.parametrize("axis", [None, 0, 1, (0, 1)])
def test_reduce_amax_float8_chunked_reads_equal_one_read(monkeypatch, dtype, axis):
    # Real tensors are reduced in 16M-byte chunks; a tiny chunk exercises the same code.
    x = (torch.randn(9, 7) * 30).to(dtype)
    x[5, 3] = float("nan")
    whole = reduce_amax(x, axis=axis)
    monkeypatch.setattr(reduce_module, "_FLOAT8_CHUNK", 8)
    chunked = reduce_amax(x, axis=axis)
    assert torch.equal(chunked.isnan(), whole.isnan()) and whole.isnan().any()
    assert torch.equal(chunked.nan_to_num(-1.0), whole.nan_to_num(-1.0))


def test_reduce_amax_records_no_gradient():
    x = torch.randn(3, 4, requires_grad=True)
    for out in (reduce_amax(x), reduce_amax(x, axis=1), reduce_sum(x), reduce_block_amax(x, {-1: 2})):
        assert out.requires_grad is False and out.grad_fn is None


# --- reduce_amax: bad input ---------------------------------------------------------------


def test_reduce_amax_empty_input_is_a_value_error():
    with pytest.raises(ValueError, match=r"reduce_amax: input is empty along the reduced axes \(shape \(0, 3\)\)"):
        reduce_amax(torch.empty(0, 3))
    with pytest.raises(ValueError, match="reduce_amax: input is empty"):
        reduce_amax(torch.empty(2, 0), axis=1)


def test_reduce_amax_keeps_an_empty_dimension_it_does_not_reduce():
    assert reduce_amax(torch.empty(0, 3), axis=1).shape == (0, 1)


@pytest.mark.parametrize(
    ("bad", "error", "match"),
    [
        ([1.0, 2.0], TypeError, "reduce_amax: expected a torch.Tensor, got list"),
        (torch.tensor([1 + 1j]), TypeError, "reduce_amax: complex tensors are not supported"),
    ],
)
def test_reduce_amax_refuses_what_is_not_a_real_tensor(bad, error, match):
    with pytest.raises(error, match=match):
        reduce_amax(bad)


@pytest.mark.parametrize(
    ("axis", "error", "match"),
    [
        (2, ValueError, "reduce_amax: axis 2 is out of range for a tensor of rank 2"),
        (-3, ValueError, "reduce_amax: axis -3 is out of range"),
        ((0, -2), ValueError, r"reduce_amax: axis \(0, -2\) names a dimension twice"),
        (1.0, TypeError, "reduce_amax: axis must hold ints, got 1.0"),
        ((True,), TypeError, r"reduce_amax: axis must hold ints, got \(True,\)"),
    ],
)
def test_reduce_amax_refuses_bad_axes(axis, error, match):
    with pytest.raises(error, match=match):
        reduce_amax(torch.ones(2, 3), axis=axis)


# --- reduce_sum ---------------------------------------------------------------------------


def test_reduce_sum_axis_none_is_zero_dim():
    x = torch.arange(6.0).reshape(2, 3)
    assert reduce_sum(x).shape == () and reduce_sum(x, keepdims=False).item() == 15.0


@pytest.mark.parametrize(
    ("axis", "keepdims", "expected"),
    [
        (0, True, [[3.0, 5.0, 7.0]]),
        (-1, False, [3.0, 12.0]),
        ((0, 1), True, [[15.0]]),
        ([-2], False, [3.0, 5.0, 7.0]),
    ],
)
def test_reduce_sum_over_axes(axis, keepdims, expected):
    x = torch.arange(6.0).reshape(2, 3)
    assert torch.equal(reduce_sum(x, axis=axis, keepdims=keepdims), torch.tensor(expected))


def test_reduce_sum_integers_sum_in_int64():
    out = reduce_sum(torch.tensor([100, 100], dtype=torch.int8))
    assert out.dtype == torch.int64 and out.item() == 200


@pytest.mark.parametrize("dtype", FLOAT8)
@pytest.mark.parametrize("axis", [None, 1])
def test_reduce_sum_float8_accumulates_in_the_default_dtype(dtype, axis):
    x = (torch.randn(3, 16) * 4).to(dtype)
    out = reduce_sum(x, axis=axis)
    assert out.dtype == torch.get_default_dtype()
    assert torch.equal(out, reduce_sum(x.float(), axis=axis))


def test_reduce_sum_refuses_bad_input():
    with pytest.raises(ValueError, match="reduce_sum: axis 3 is out of range for a tensor of rank 2"):
        reduce_sum(torch.ones(2, 2), axis=3)
    with pytest.raises(TypeError, match="reduce_sum: expected a torch.Tensor, got tuple"):
        reduce_sum((1.0,))


# --- convert_quantization_axis_to_reduce_axis ---------------------------------------------


@pytest.mark.parametrize(
    ("axis", "expected"),
    [
        (None, None),
        (0, [1, 2]),
        (-1, [0, 1]),
        (1, [0, 2]),
        ([0, -1], [1]),
        ((1,), [0, 2]),
        ((0, 1, 2), []),
    ],
)
def test_convert_quantization_axis_to_reduce_axis(axis, expected):
    assert convert_quantization_axis_to_reduce_axis(torch.empty(2, 3, 4), axis) == expected


def test_converted_axis_reduces_to_one_amax_per_kept_channel():
    x = torch.randn(5, 8)
    per_row = reduce_amax(x, axis=convert_quantization_axis_to_reduce_axis(x, 0))
    assert per_row.shape == (5, 1)
    assert torch.equal(per_row, x.abs().amax(dim=1, keepdim=True))


# --- reduce_block_amax --------------------------------------------------------------------


def test_reduce_block_amax_last_dim_blocks_of_16():
    x = torch.randn(3, 64)
    out = reduce_block_amax(x, {-1: 16})
    assert out.shape == (3, 4)
    assert torch.equal(out, x.reshape(3, 4, 16).abs().amax(-1))


def test_reduce_block_amax_two_dimensional_blocks():
    x = torch.randn(6, 8)
    out = reduce_block_amax(x, {-1: 4, -2: 3})
    assert out.shape == (2, 2)
    expected = torch.tensor([[x[r : r + 3, c : c + 4].abs().max().item() for c in (0, 4)] for r in (0, 3)])
    assert torch.equal(out, expected)


def test_reduce_block_amax_keeps_leading_dimensions():
    x = torch.randn(2, 3, 32)
    assert torch.equal(reduce_block_amax(x, {2: 16}), x.reshape(2, 3, 2, 16).abs().amax(-1))


def test_reduce_block_amax_float8_and_int8_blocks():
    x = (torch.randn(2, 32) * 50).to(torch.float8_e4m3fn)
    out = reduce_block_amax(x, {-1: 16})
    assert out.dtype == torch.get_default_dtype()
    assert torch.equal(out, x.float().reshape(2, 2, 16).abs().amax(-1))
    ints = torch.tensor([[-128, 1, 2, 3]], dtype=torch.int8)
    assert torch.equal(reduce_block_amax(ints, {-1: 2}), torch.tensor([[128, 3]]))


def test_reduce_block_amax_nan_stays_in_its_block():
    x = torch.ones(1, 32)
    x[0, 20] = float("nan")
    out = reduce_block_amax(x, {-1: 16})
    assert out[0, 0].item() == 1.0 and math.isnan(out[0, 1].item())


@pytest.mark.parametrize(
    ("block_sizes", "error", "match"),
    [
        (
            {-1: 16},
            ValueError,
            "reduce_block_amax: dimension -1 of size 20 is not a positive multiple of its block size 16",
        ),
        ({0: 0}, ValueError, "dimension 0 of size 4 is not a positive multiple of its block size 0"),
        ({2: 4}, ValueError, "reduce_block_amax: dim 2 is out of range for a tensor of rank 2"),
        ({-1: 4, 1: 5}, ValueError, r"reduce_block_amax: dim 1 is named twice"),
        ({}, TypeError, "reduce_block_amax: block_sizes must be a non-empty"),
        ([(-1, 4)], TypeError, "reduce_block_amax: block_sizes must be a non-empty"),
        ({-1: 4.0}, TypeError, "block_sizes must map int dims to int sizes, got -1: 4.0"),
        ({"type": "static"}, TypeError, "block_sizes must map int dims to int sizes, got 'type': 'static'"),
    ],
)
def test_reduce_block_amax_refuses_bad_blocks(block_sizes, error, match):
    with pytest.raises(error, match=match):
        reduce_block_amax(torch.ones(4, 20), block_sizes)


# --- reduce_amax_many, round_up_to_fp32, is_traced ----------------------------------------


def test_reduce_amax_many_pools_tensors_into_segments():
    tensors = [torch.tensor([1.0, -5.0]), torch.tensor(3.0), torch.tensor([[-7.0]]), torch.tensor([2.0])]
    out = reduce_amax_many(tensors, torch.tensor([0, 0, 2, 2]), 4)
    assert torch.equal(out, torch.tensor([5.0, float("-inf"), 7.0, float("-inf")]))


def test_reduce_amax_many_widens_and_propagates_nan():
    halves = reduce_amax_many([torch.tensor([2.0], dtype=torch.bfloat16)], torch.tensor([0]), 1)
    assert halves.dtype == torch.float32
    doubles = reduce_amax_many([torch.tensor([1.0 + 2**-40], dtype=torch.float64)], torch.tensor([0]), 1)
    assert doubles.dtype == torch.float64 and doubles.item() == 1.0 + 2**-40
    eights = reduce_amax_many(
        [torch.tensor([-3.0]).to(torch.float8_e4m3fn), torch.tensor([1.0])], torch.tensor([0, 0]), 1
    )
    assert eights.item() == 3.0
    nan = reduce_amax_many([torch.tensor([float("nan")]), torch.tensor([9.0])], torch.tensor([0, 0]), 1)
    assert math.isnan(nan.item())


def test_reduce_amax_many_of_thousands_of_tensors_equals_one_by_one():
    # Enough elements for the CPU cat to be split. Alone, the int64 + float16 lead would promote
    # to float16 (70000 -> inf); among all the tensors it promotes to float64, which holds 70000.
    generator = torch.Generator().manual_seed(0)
    lead = torch.zeros(30000, 1, dtype=torch.int64)
    lead[7] = -70000
    tensors = [lead, torch.full((2767, 1), 1.5, dtype=torch.float16)]
    tensors += [torch.randn(16, 1, generator=generator) * (i % 7 + 1) for i in range(3000)]
    tensors += [torch.tensor([[-(2.0**-20)]]), torch.randn(3, 1, generator=generator).to(torch.float64)]
    segments = torch.arange(len(tensors)) % 97
    out = reduce_amax_many(tensors, segments, 97)
    expected = [max(t.double().abs().max().item() for t in tensors[s::97]) for s in range(97)]
    assert out.dtype == torch.float64 and out.tolist() == expected and out[0].item() == 70000.0
    scalars = [torch.tensor(float(i % 11) - 5.0) for i in range(40000)]  # 0-dim: cat refuses them
    assert reduce_amax_many(scalars, torch.zeros(40000, dtype=torch.int64), 1).tolist() == [5.0]


def test_reduce_amax_many_of_nothing_is_all_unset():
    assert torch.equal(reduce_amax_many([], torch.tensor([], dtype=torch.int64), 2), torch.full((2,), float("-inf")))


def test_round_up_to_fp32_never_goes_below():
    values = torch.tensor([1.0 + 2**-30, 0.1, 2.0, -(1.0 + 2**-30)], dtype=torch.float64)
    out = round_up_to_fp32(values)
    assert out.dtype == torch.float32
    assert out[0].item() == 1.0 + 2**-23  # the next fp32 above 1.0, not 1.0
    assert out[0].item() > 1.0
    assert out[2].item() == 2.0  # exact values stay put
    assert (out.double() >= values).all()
    assert out[1].item() == torch.tensor(0.1).item()  # the nearest fp32 to 0.1 lies above it already
    same = torch.tensor([3.0])
    assert round_up_to_fp32(same) is same


def test_is_traced_only_inside_transforms():
    seen = []

    def probe(t):
        seen.append(is_traced(t))
        return t * 2

    probe(torch.ones(2))
    torch.func.vmap(probe)(torch.ones(3, 2))
    assert seen == [False, True]
