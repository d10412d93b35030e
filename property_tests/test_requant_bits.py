"""Bit-identity of the fast paths against their references.

* ``nvfp4_quantize`` against the search over E2M1 midpoints it replaced (kept here as
  the reference): every bf16 bit pattern, the fp32 neighbours of every midpoint, and
  generated tensors with exact ties, signed zeros, subnormals, inf and NaN.
* ``requantize`` (byte lookups) against ``_requantize_reference`` (dequantize, then
  quantize with the shared scale): every block-scale byte with every largest code and
  every code, and generated members, scale pairs and non-finite blocks.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from sharedquant.core import requant
from sharedquant.core.nvfp4 import _e2m1_codes, nvfp4_global_scale, nvfp4_quantize
from sharedquant.core.reconcile import _requantize_reference, global_amax_for, requantize
from sharedquant.core.reduce import reduce_block_amax

_TIES_DOWN = (0.25, 1.25, 2.5, 5.0)  # a midpoint that rounds to the code below
_TIES_UP = (0.75, 1.75, 3.5)  # a midpoint that rounds to the code above
_E2M1 = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)


def _reference_codes(scaled: torch.Tensor) -> torch.Tensor:
    """The codes as ``nvfp4_quantize`` found them before: two searches over the midpoints."""
    magnitude = scaled.abs()
    down = torch.tensor(_TIES_DOWN, dtype=magnitude.dtype)
    up = torch.tensor(_TIES_UP, dtype=magnitude.dtype)
    code = torch.bucketize(magnitude, down, out_int32=True) + torch.bucketize(magnitude, up, out_int32=True, right=True)
    return code.to(torch.uint8) | ((scaled < 0).to(torch.uint8) << 3)


def _reference_quantize(x: torch.Tensor, global_amax: float, block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Packed codes and block-scale bytes by the former ``nvfp4_quantize``, op for op."""
    global_scale = nvfp4_global_scale(torch.tensor(float(global_amax)))
    block_scale = reduce_block_amax(x, {-1: block_size}).float() / (6.0 * global_scale)
    block_scale = torch.where(block_scale == 0, torch.ones_like(block_scale), block_scale)
    block_scale = block_scale.clamp(min=2.0**-9, max=448.0).to(torch.float8_e4m3fn)
    blocks = x.reshape(*x.shape[:-1], -1, block_size)
    scaled = blocks / (block_scale.to(torch.float32) * global_scale).unsqueeze(-1)
    code = _reference_codes(scaled).reshape(x.shape)
    return code[..., 0::2] | (code[..., 1::2] << 4), block_scale.view(torch.uint8)


def _assert_quantize_matches(x: torch.Tensor, global_amax: float, block_size: int) -> None:
    ours = nvfp4_quantize(x, global_amax, block_size=block_size)
    packed, scale_bytes = _reference_quantize(x, global_amax, block_size)
    assert torch.equal(ours.block_scale.view(torch.uint8), scale_bytes)
    assert torch.equal(ours.packed, packed)


# --- the rounding, exhaustively --------------------------------------------------------------


def test_codes_of_every_bf16_bit_pattern_match_the_midpoint_search():
    every = torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16).view(torch.bfloat16).float()
    assert torch.equal(_e2m1_codes(every).to(torch.uint8), _reference_codes(every))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_codes_of_every_midpoint_and_grid_value_and_their_neighbours_match(dtype):
    points = torch.tensor(_TIES_DOWN + _TIES_UP + _E2M1 + (7.0, 1e30, 2.0**-149), dtype=dtype)
    up, down = torch.full_like(points, float("inf")), torch.full_like(points, -float("inf"))
    near = torch.cat([points, torch.nextafter(points, up), torch.nextafter(points, down)])
    special = torch.tensor([0.0, -0.0, float("inf"), float("nan"), -float("nan")], dtype=dtype)
    values = torch.cat([near, -near, special])
    assert torch.equal(_e2m1_codes(values).to(torch.uint8), _reference_codes(values))


# --- nvfp4_quantize, generated ---------------------------------------------------------------

_DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]


@st.composite
def _tied_tensors(draw):
    """Blocks whose values land exactly on E2M1 midpoints: powers of two for both scales."""
    block_size = draw(st.sampled_from([16, 32]))
    rows, blocks = draw(st.integers(1, 4)), draw(st.integers(1, 3))
    exponent = draw(st.integers(-20, 20))
    grid = _TIES_DOWN + _TIES_UP + _E2M1
    picks = draw(st.lists(st.sampled_from(grid), min_size=rows * blocks * block_size, max_size=rows * blocks * block_size))
    signs = draw(st.lists(st.sampled_from([1.0, -1.0]), min_size=len(picks), max_size=len(picks)))
    x = torch.tensor([p * s for p, s in zip(picks, signs)]).reshape(rows, blocks, block_size)
    x[..., 0] = 6.0  # each block's amax is 6 * scale, so its block scale is a power of two
    block_scales = torch.tensor(draw(st.lists(st.integers(-9, 8), min_size=rows * blocks, max_size=rows * blocks)))
    x = x * torch.exp2(block_scales.float()).reshape(rows, blocks, 1)
    dtype = draw(st.sampled_from(_DTYPES))
    return (x * 2.0**exponent).reshape(rows, -1).to(dtype), 2688.0 * 2.0**exponent, block_size


@given(_tied_tensors())
def test_quantize_is_bit_identical_at_exact_ties(case):
    x, global_amax, block_size = case
    _assert_quantize_matches(x, global_amax, block_size)


@st.composite
def _rough_tensors(draw):
    block_size = draw(st.sampled_from([2, 16, 32]))
    rows, blocks = draw(st.integers(1, 5)), draw(st.integers(1, 4))
    seed = draw(st.integers(0, 2**31 - 1))
    gen = torch.Generator().manual_seed(seed)
    magnitude = 10.0 ** torch.empty(rows, blocks, 1).uniform_(-42, 38, generator=gen)
    x = (torch.randn(rows, blocks, block_size, generator=gen) * magnitude).reshape(rows, -1)
    specials = [0.0, -0.0, float("inf"), -float("inf"), float("nan"), 1e-45, -1e-45, 3e38]
    for _ in range(draw(st.integers(0, 4))):
        x[draw(st.integers(0, rows - 1)), draw(st.integers(0, x.shape[1] - 1))] = draw(st.sampled_from(specials))
    if draw(st.booleans()):
        x[0, :block_size] = draw(st.sampled_from([0.0, -0.0]))  # a zero block
    global_amax = draw(st.sampled_from([1e-30, 1e-6, 1.0, 448.0, 1.5e38])) * draw(st.floats(0.5, 2.0))
    return x.to(draw(st.sampled_from(_DTYPES))), global_amax, block_size


@given(_rough_tensors())
def test_quantize_is_bit_identical_on_any_values(case):
    x, global_amax, block_size = case
    _assert_quantize_matches(x, global_amax, block_size)


def test_quantize_in_many_steps_matches_one_step(monkeypatch):
    from sharedquant.core import nvfp4

    x = torch.randn(64, 256) * torch.logspace(-3, 3, 64).unsqueeze(1)
    whole = nvfp4_quantize(x, 300.0)
    monkeypatch.setattr(nvfp4, "_CHUNK_ELEMENTS", 160)  # 10 blocks a step: steps end mid-row
    stepped = nvfp4_quantize(x, 300.0)
    assert torch.equal(whole.packed, stepped.packed)
    assert torch.equal(whole.block_scale.view(torch.uint8), stepped.block_scale.view(torch.uint8))
    _assert_quantize_matches(x, 300.0, 16)


# --- requantize: every block-scale byte, every largest code, every code -------------------------


def _every_block(block_size: int, scale_bytes: range) -> tuple[torch.Tensor, torch.Tensor]:
    """One block per (scale byte, largest magnitude): every code up to it, both signs, padded with it."""
    rows = []
    for largest in range(8):
        codes = [c for c in range(16) if c & 7 <= largest]
        rows.append(codes + [largest] * (block_size - len(codes)))
    codes = torch.tensor(rows, dtype=torch.uint8).repeat(len(scale_bytes), 1)
    packed = codes[:, 0::2] | (codes[:, 1::2] << 4)
    scales = torch.tensor(list(scale_bytes), dtype=torch.uint8).repeat_interleave(8).unsqueeze(-1)
    return packed, scales.view(torch.float8_e4m3fn)


def _outcome(fn, *args):
    try:
        out_packed, out_scale = fn(*args)
    except ValueError:
        return "ValueError"
    return out_packed, out_scale.view(torch.uint8)


def _fast(packed, block_scale, scale_2, shared):
    result, _ = requantize(packed, block_scale, scale_2, shared)
    return result.packed, result.block_scale


def _reference(packed, block_scale, scale_2, shared):
    return _requantize_reference(packed, block_scale, scale_2, global_amax_for(shared)[0])


def _assert_requantize_matches(packed, block_scale, scale_2, shared):
    scale_2, shared = torch.tensor(scale_2), torch.tensor(shared)
    ours, reference = _outcome(_fast, packed, block_scale, scale_2, shared), _outcome(
        _reference, packed, block_scale, scale_2, shared
    )
    if isinstance(reference, str) or isinstance(ours, str):
        assert ours == reference
    else:
        assert torch.equal(ours[0], reference[0]) and torch.equal(ours[1], reference[1])


_PAIRS = [
    (1e-3, 2.5e-3),  # the usual repair: a coarser shared scale
    (2.5e-3, 1e-3),  # a finer one
    (1e-3, 1e-3),
    (3.3e-5, 3.3e-5 * 1.0000001),
    (1e-30, 7e-21),  # tiny
    (1e-39, 2e-38),  # subnormal own scale
    (1e-3, 1e-41),  # subnormal shared scale
    (2e34, 3e35),  # huge: 448 * scale_2 * 6 overflows for the largest codes
    (-1e-3, 2e-3),  # a negative own scale flips every sign
    (0.0, 1e-3),  # a zero own scale dequantizes to zeros
]
_FINITE_BYTES = [b for b in range(256) if b not in (0x7F, 0xFF)]


@pytest.mark.parametrize("block_size", [16, 32])
@pytest.mark.parametrize("pair", _PAIRS, ids=[f"{a:g}->{b:g}" for a, b in _PAIRS])
def test_requantize_matches_the_reference_on_every_scale_byte_and_code(block_size, pair):
    packed, block_scale = _every_block(block_size, range(256))
    keep = torch.tensor([b in _FINITE_BYTES for b in range(256)]).repeat_interleave(8)
    _assert_requantize_matches(packed[keep], block_scale[keep], *pair)


@pytest.mark.parametrize("nan_byte", [0x7F, 0xFF])
def test_a_nan_block_scale_is_refused_like_the_reference(nan_byte):
    packed, block_scale = _every_block(16, range(nan_byte, nan_byte + 1))
    _assert_requantize_matches(packed, block_scale, 1e-3, 2e-3)
    with pytest.raises(ValueError, match="requantize: .* not finite"):
        requantize(packed, block_scale, torch.tensor(1e-3), torch.tensor(2e-3))


@pytest.mark.parametrize("pair", [(float("inf"), 1.0), (float("nan"), 1.0), (1.0, 0.0), (1.0, float("inf")), (3e38, 1.0)])
def test_non_finite_scales_are_refused_like_the_reference(pair):
    packed, block_scale = _every_block(16, range(0x38, 0x39))
    assert _outcome(_fast, packed, block_scale, *map(torch.tensor, pair)) == "ValueError"
    _assert_requantize_matches(packed, block_scale, *pair)


_SCALES = st.one_of(
    st.floats(1e-12, 1e12),
    st.sampled_from([1e-40, 1.2e-38, 3e-39, 1e36, 3.4e38, 1e-3]),
    st.floats(-1.0, 1.0),
)


@st.composite
def _members(draw):
    block_size = draw(st.sampled_from([16, 32]))
    lead = draw(st.lists(st.integers(1, 3), min_size=1, max_size=2))
    blocks = draw(st.integers(1, 3))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    packed = torch.randint(0, 256, (*lead, blocks * block_size // 2), dtype=torch.uint8, generator=gen)
    scale_bytes = torch.randint(0, 256, (*lead, blocks), dtype=torch.uint8, generator=gen)
    if draw(st.booleans()):  # mostly finite: a NaN byte anywhere makes both sides refuse
        scale_bytes[(scale_bytes & 0x7F) == 0x7F] = draw(st.sampled_from([0x00, 0x01, 0x7E, 0x80]))
    if draw(st.booleans()):
        packed[..., : block_size // 2] = draw(st.sampled_from([0x00, 0x88, 0x80]))  # zero blocks, signed zeros
    scale_2 = draw(_SCALES)
    ratio = draw(st.one_of(st.floats(1e-6, 1e6), st.sampled_from([1.0, 2.0, 0.5, 1e30, 1e-30])))
    return packed, scale_bytes.view(torch.float8_e4m3fn), scale_2, scale_2 * ratio


@given(_members())
def test_requantize_matches_the_reference_on_generated_members(member):
    _assert_requantize_matches(*member)


def test_requantize_in_many_steps_matches_one_step(monkeypatch):
    packed, block_scale = _every_block(32, _FINITE_BYTES)
    whole, _ = requantize(packed, block_scale, torch.tensor(1e-3), torch.tensor(3e-3))
    monkeypatch.setattr(requant, "_CHUNK_BYTES", 48)  # three blocks a step
    stepped, _ = requantize(packed, block_scale, torch.tensor(1e-3), torch.tensor(3e-3))
    assert torch.equal(whole.packed, stepped.packed)
    assert torch.equal(whole.block_scale.view(torch.uint8), stepped.block_scale.view(torch.uint8))
