"""reduce_amax over integer dtypes: the true magnitude of every extreme, or a clear refusal."""

import pytest
import torch

from sharedquant.core.reduce import reduce_amax

NARROW = [torch.int8, torch.int16, torch.int32, torch.uint8, torch.uint16, torch.uint32]


@pytest.mark.parametrize("dtype", NARROW, ids=str)
@pytest.mark.parametrize("axis", [None, 0])
def test_the_extremes_of_each_narrow_integer_dtype_give_their_true_magnitude(dtype, axis):
    info = torch.iinfo(dtype)
    x = torch.tensor([info.min, info.max, 0], dtype=dtype)
    out = reduce_amax(x, axis=axis, keepdims=False)
    assert out.item() == max(-info.min, info.max)
    assert out.dtype == (torch.uint8 if dtype == torch.uint8 else torch.int64)


def test_int64_magnitudes_are_exact_up_to_its_maximum():
    x = torch.tensor([[-(2**63) + 1, 3], [2**63 - 1, -(2**62)]])
    assert reduce_amax(x).item() == 2**63 - 1
    assert reduce_amax(x, axis=1, keepdims=False).tolist() == [2**63 - 1, 2**63 - 1]


@pytest.mark.parametrize("axis", [None, 0, 1])
def test_int64_minimum_is_refused_rather_than_dropped(axis):
    # abs(-2**63) wraps to -2**63 in int64; a max over it then returned 1
    with pytest.raises(ValueError, match=r"reduce_amax: int64 input holds -2\*\*63"):
        reduce_amax(torch.tensor([[-(2**63), 1]]), axis=axis)


def test_uint64_is_refused_by_name():
    with pytest.raises(TypeError, match="reduce_amax: uint64 is not supported"):
        reduce_amax(torch.tensor([1, 2], dtype=torch.uint64))
