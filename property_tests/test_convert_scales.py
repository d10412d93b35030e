"""core.convert: every per-tensor scale survives a conversion and its way back byte for byte."""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sharedquant.core.convert import convert_scale
from sharedquant.core.formats import COMPRESSED_TENSORS, MODELOPT

POSITIVE_FP32 = st.floats(min_value=2.0**-120, max_value=2.0**120, width=32, allow_subnormal=False)
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
SHAPES = {MODELOPT.name: (), COMPRESSED_TENSORS.name: (1,)}


@settings(max_examples=400, deadline=None)
@given(value=POSITIVE_FP32, dtype=st.sampled_from(DTYPES), forward=st.booleans())
def test_there_and_back_is_byte_identical_and_the_target_is_the_rounded_reciprocal(value, dtype, forward):
    source, target = (MODELOPT, COMPRESSED_TENSORS) if forward else (COMPRESSED_TENSORS, MODELOPT)
    stored = torch.tensor(value, dtype=dtype).reshape(SHAPES[source.name])
    reciprocal = torch.tensor(1 / stored.double().item()).to(dtype) if stored.item() else torch.tensor(0.0)
    if not (0 < stored.double().item() < float("inf") and 0 < reciprocal.item() < float("inf")):
        with pytest.raises(ValueError, match=r"'k'"):  # zero, or a reciprocal out of this dtype's range
            convert_scale("k", stored, source, target)
        return
    there = convert_scale("k", stored, source, target)
    assert there.tensor.shape == SHAPES[target.name] and there.tensor.dtype == dtype
    assert there.tensor.item() == reciprocal.item()
    if dtype == torch.float32:  # numpy's own fp32 division as an independent oracle
        assert there.tensor.item() == float(np.float32(1) / np.float32(stored.item()))
    back = convert_scale("k", there.tensor, target, source, there.record)
    assert back.tensor.shape == stored.shape
    assert torch.equal(back.tensor.reshape(-1).view(torch.uint8), stored.reshape(-1).view(torch.uint8))
    assert (there.record is None) == (there.relative_error == 0) and back.restored == (there.record is not None)
