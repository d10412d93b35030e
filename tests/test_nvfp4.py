"""Examples for sharedquant.core.nvfp4: the format's corner cases, exactly as engines decode it.

With ``global_amax = 6 * 448`` the per-tensor scale is exactly 1.0, and a block whose
amax is 6 gets block scale exactly 1.0, so each element is rounded as written: the
tables below are E2M1 codes (index into 0, 0.5, 1, 1.5, 2, 3, 4, 6; bit 3 = sign).
"""

from __future__ import annotations

import math
import re

import pytest
import torch

from sharedquant.core.nvfp4 import (
    E2M1_MAX,
    E4M3_MAX,
    NVFP4Tensor,
    nvfp4_dequantize,
    nvfp4_fake_quant,
    nvfp4_global_scale,
    nvfp4_quantize,
)

UNIT = E2M1_MAX * E4M3_MAX  # the global amax whose per-tensor scale is exactly 1.0
NEGATIVE_ZERO = 8


def codes(packed: torch.Tensor) -> torch.Tensor:
    """Unpack two codes per byte, the even element from the low nibble."""
    return torch.stack([packed & 0x0F, packed >> 4], dim=-1).reshape(*packed.shape[:-1], -1)


# --- element rounding ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "code"),
    [
        (0.25, 0),  # tie between 0 and 0.5: to even (0)
        (0.26, 1),
        (0.5, 1),
        (0.75, 2),  # tie between 0.5 and 1: to even (1)
        (1.25, 2),  # tie between 1 and 1.5: to even (1)
        (1.75, 4),  # tie between 1.5 and 2: to even (2)
        (2.5, 4),  # tie between 2 and 3: to even (2)
        (2.6, 5),
        (3.5, 6),  # tie between 3 and 4: to even (4)
        (5.0, 6),  # tie between 4 and 6: to even (4)
        (5.01, 7),
        (6.0, 7),
        (0.0, 0),
        (-0.0, 0),  # negative zero input encodes as +0
        (-0.1, NEGATIVE_ZERO),  # a negative value that rounds to zero keeps its sign
        (-0.25, NEGATIVE_ZERO),
        (-0.75, 8 | 2),
        (-5.0, 8 | 6),
        (-6.0, 8 | 7),
    ],
)
def test_elements_round_to_nearest_e2m1_ties_to_even(value, code):
    block = torch.full((1, 16), 0.0)
    block[0, 0] = 6.0  # block amax 6: block scale exactly 1
    block[0, 3] = value
    quantized = nvfp4_quantize(block, UNIT)
    assert quantized.global_scale.item() == 1.0
    assert quantized.block_scale.float().item() == 1.0
    assert codes(quantized.packed)[0, 3].item() == code
    assert codes(quantized.packed)[0, 0].item() == 7


def test_packing_puts_the_even_element_in_the_low_nibble():
    block = torch.tensor([[6.0, 0.5, 1.0, -1.5] + [0.0] * 12])
    packed = nvfp4_quantize(block, UNIT).packed
    assert packed.shape == (1, 8) and packed.dtype == torch.uint8
    assert packed[0, 0].item() == 7 | (1 << 4)
    assert packed[0, 1].item() == 2 | ((8 | 3) << 4)
    assert packed[0, 2:].tolist() == [0] * 6


def test_negative_zero_code_decodes_to_negative_zero():
    block = torch.tensor([[6.0, -0.1] + [0.0] * 14])
    fake = nvfp4_fake_quant(block, UNIT)
    assert fake[0, 1].item() == 0.0 and torch.signbit(fake[0, 1])
    assert not torch.signbit(fake[0, 2])


# --- scales -------------------------------------------------------------------------------


def test_global_scale_is_global_amax_over_6_times_448():
    for value in (1.0, 0.37, 2688.0, 1e-3):
        quantized = nvfp4_quantize(torch.randn(2, 16), value)
        assert quantized.global_scale.dtype == torch.float32 and quantized.global_scale.shape == ()
        assert quantized.global_scale.item() == (torch.tensor(value) / 2688.0).item()  # fp32 division
        assert torch.equal(quantized.global_scale, nvfp4_global_scale(torch.tensor(value)))


def test_block_scale_is_block_amax_over_6_s2_in_e4m3():
    x = torch.zeros(1, 64)
    x[0, 0], x[0, 16], x[0, 32], x[0, 48] = 6.0, -3.0, 12.0, 0.75  # scales 1, 0.5, 2, 0.125
    quantized = nvfp4_quantize(x, UNIT)
    assert quantized.block_scale.dtype == torch.float8_e4m3fn
    assert quantized.block_scale.float().tolist() == [[1.0, 0.5, 2.0, 0.125]]
    # Each block's largest element lands on the top code 6.
    assert codes(quantized.packed)[0, ::16].tolist() == [7, 15, 7, 7]


def test_zero_block_gets_scale_one_and_zero_codes():
    x = torch.zeros(2, 32)
    x[1, 16:] = torch.linspace(-6.0, 6.0, 16)
    quantized = nvfp4_quantize(x, UNIT)
    assert quantized.block_scale.float().tolist() == [[1.0, 1.0], [1.0, 1.0]]
    assert codes(quantized.packed)[0].tolist() == [0] * 32
    assert torch.equal(nvfp4_fake_quant(x, UNIT)[0], torch.zeros(32))


def test_saturation_at_6_when_the_e4m3_scale_rounds_down():
    # block amax 100: scale 100/6 = 16.67 rounds to 16 in e4m3, so 100/16 = 6.25 saturates at 6.
    x = torch.zeros(1, 16)
    x[0, 0], x[0, 1] = 100.0, -100.0
    quantized = nvfp4_quantize(x, UNIT)
    assert quantized.block_scale.float().item() == 16.0
    assert codes(quantized.packed)[0, :2].tolist() == [7, 15]
    assert nvfp4_fake_quant(x, UNIT)[0, :2].tolist() == [96.0, -96.0]


def test_tiny_global_amax_clamps_block_scale_to_448_and_saturates():
    x = torch.randn(2, 32)
    global_amax = 1e-30
    quantized = nvfp4_quantize(x, global_amax)
    assert quantized.block_scale.float().unique().tolist() == [448.0]
    magnitudes = codes(quantized.packed) & 7
    assert (magnitudes == 7).all()  # every element is far above the representable range
    fake = nvfp4_fake_quant(x, global_amax)
    assert torch.allclose(fake.abs(), torch.full_like(fake, global_amax), rtol=1e-6)
    assert torch.equal(torch.sign(fake), torch.sign(x))


def test_huge_global_amax_clamps_block_scale_to_2_pow_minus_9_and_flushes_to_zero():
    x = torch.randn(2, 32)
    quantized = nvfp4_quantize(x, 1e30)
    assert quantized.block_scale.float().unique().tolist() == [2.0**-9]
    assert quantized.block_scale.view(torch.uint8).unique().tolist() == [1]  # the smallest e4m3 subnormal
    expected = torch.where(x < 0, NEGATIVE_ZERO, 0).to(torch.uint8)
    assert torch.equal(codes(quantized.packed), expected)
    assert (nvfp4_fake_quant(x, 1e30) == 0).all()


def test_float_and_tensor_global_amax_agree():
    x = torch.randn(3, 32)
    by_float, by_tensor = nvfp4_quantize(x, 2.5), nvfp4_quantize(x, torch.tensor([2.5], dtype=torch.float64))
    assert torch.equal(by_float.packed, by_tensor.packed)
    assert torch.equal(by_float.block_scale.view(torch.uint8), by_tensor.block_scale.view(torch.uint8))
    assert torch.equal(by_float.global_scale, by_tensor.global_scale)


# --- shapes, dtypes, round trip -----------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(4, 32), (2, 3, 64), (16,)])
def test_dequantize_of_quantize_is_fake_quant(dtype, shape):
    x = (torch.randn(shape) * 3).to(dtype)
    global_amax = x.float().abs().max()
    quantized = nvfp4_quantize(x, global_amax)
    assert isinstance(quantized, NVFP4Tensor)
    assert quantized.packed.shape == (*shape[:-1], shape[-1] // 2)
    assert quantized.block_scale.shape == (*shape[:-1], shape[-1] // 16)
    fake = nvfp4_fake_quant(x, global_amax)
    assert fake.dtype == dtype and fake.shape == x.shape
    assert torch.equal(nvfp4_dequantize(*quantized, dtype=dtype), fake)
    assert torch.equal(nvfp4_dequantize(*quantized).to(dtype), fake)


def test_fake_quant_error_is_within_half_a_step_of_the_block():
    x = torch.randn(8, 64)
    fake = nvfp4_fake_quant(x, x.abs().max())
    quantized = nvfp4_quantize(x, x.abs().max())
    step = (quantized.block_scale.float() * quantized.global_scale).repeat_interleave(16, dim=-1)
    # The widest gap between E2M1 neighbours is 2 (4 -> 6), so the error is at most one step unit.
    assert ((fake - x).abs() <= step * 1.0 + 1e-7).all()


@pytest.mark.parametrize("dtype", [torch.float8_e4m3fn, torch.float8_e5m2])
def test_float8_input_quantizes_as_its_exact_fp32_values(dtype):
    x = (torch.randn(4, 32) * 8).to(dtype)
    quantized, widened = nvfp4_quantize(x, 40.0), nvfp4_quantize(x.float(), 40.0)
    assert torch.equal(quantized.packed, widened.packed)
    assert torch.equal(quantized.block_scale.view(torch.uint8), widened.block_scale.view(torch.uint8))
    fake = nvfp4_fake_quant(x, 40.0)
    assert fake.dtype == dtype
    assert torch.equal(fake.float(), nvfp4_fake_quant(x.float(), 40.0).to(dtype).float())


def test_a_smaller_block_size_is_honoured():
    x = torch.randn(2, 8)
    quantized = nvfp4_quantize(x, x.abs().max(), block_size=4)
    assert quantized.block_scale.shape == (2, 2)
    assert torch.equal(nvfp4_dequantize(*quantized), nvfp4_fake_quant(x, x.abs().max(), block_size=4))


def test_no_gradient_is_recorded():
    x = torch.randn(2, 16, requires_grad=True)
    assert not nvfp4_fake_quant(x, 2.0).requires_grad
    assert not any(t.requires_grad for t in nvfp4_quantize(x, 2.0))


# --- the fusion guarantee, and why it needs a shared scale ---------------------------------


def test_fusing_members_quantized_with_the_shared_amax_is_exact():
    q, k = torch.randn(8, 32), torch.randn(4, 32) * 1000
    shared = max(q.abs().max(), k.abs().max())
    fused = nvfp4_quantize(torch.cat([q, k]), shared)
    parts = [nvfp4_quantize(q, shared), nvfp4_quantize(k, shared)]
    assert torch.equal(fused.packed, torch.cat([p.packed for p in parts]))
    assert torch.equal(fused.block_scale.view(torch.uint8), torch.cat([p.block_scale.view(torch.uint8) for p in parts]))
    assert all(torch.equal(fused.global_scale, p.global_scale) for p in parts)


def test_members_quantized_with_their_own_amax_do_not_fuse():
    q, k = torch.randn(8, 32), torch.randn(4, 32) * 1000
    own = [nvfp4_quantize(q, q.abs().max()), nvfp4_quantize(k, k.abs().max())]
    fused = nvfp4_quantize(torch.cat([q, k]), max(q.abs().max(), k.abs().max()))
    # A fused tensor has one weight_scale_2; the members had two different ones.
    assert own[0].global_scale.item() != own[1].global_scale.item()
    assert own[0].global_scale.item() != fused.global_scale.item()
    # And q's block scales, relative to its own small scale, are not what the fused tensor stores.
    own_scales = torch.cat([p.block_scale.view(torch.uint8) for p in own])
    assert not torch.equal(own_scales, fused.block_scale.view(torch.uint8))
    # Decoding the members' bytes under the fused scale (what an engine that takes the max
    # without rescaling does) gives q values hundreds of times too large.
    wrong = nvfp4_dequantize(own[0].packed, own[0].block_scale, fused.global_scale)
    right = nvfp4_dequantize(*own[0])
    assert (wrong.abs().max() / right.abs().max()).item() > 100


# --- bad input ----------------------------------------------------------------------------


@pytest.mark.parametrize("fn", [nvfp4_quantize, nvfp4_fake_quant])
@pytest.mark.parametrize(
    ("x", "global_amax", "block_size", "error", "match"),
    [
        (
            torch.ones(2, 20),
            1.0,
            16,
            ValueError,
            "the last dimension (20) must be a positive multiple of block_size 16",
        ),
        (torch.ones(2, 0), 1.0, 16, ValueError, "the last dimension (0) must be a positive multiple"),
        (torch.tensor(1.0), 1.0, 16, ValueError, "the last dimension (none) must be a positive multiple"),
        (
            torch.ones(2, 16, dtype=torch.int32),
            1.0,
            16,
            ValueError,
            "expected a floating-point tensor, got dtype torch.int32",
        ),
        (torch.ones(2, 16), float("nan"), 16, ValueError, "global_amax must be finite and positive, got nan"),
        (torch.ones(2, 16), float("inf"), 16, ValueError, "global_amax must be finite and positive, got inf"),
        (torch.ones(2, 16), torch.tensor(0.0), 16, ValueError, "global_amax must be finite and positive, got 0.0"),
        (torch.ones(2, 16), -1.0, 16, ValueError, "global_amax must be finite and positive, got -1.0"),
        (torch.ones(2, 16), torch.ones(2), 16, ValueError, "global_amax must hold one value, got shape (2,)"),
        (torch.ones(2, 16), "1.0", 16, TypeError, "global_amax must be a tensor or a number, got str"),
        (torch.ones(2, 16), True, 16, TypeError, "global_amax must be a tensor or a number, got bool"),
        (torch.ones(2, 16), 1.0, 3, ValueError, "block_size must be a positive even int, got 3"),
        (torch.ones(2, 16), 1.0, 0, ValueError, "block_size must be a positive even int, got 0"),
        ([[1.0] * 16], 1.0, 16, TypeError, "expected a tensor, got list"),
    ],
)
def test_bad_input_says_which(fn, x, global_amax, block_size, error, match):
    with pytest.raises(error, match=re.escape(f"{fn.__name__}: {match}")):
        fn(x, global_amax, block_size)


def test_dequantize_refuses_mismatched_parts():
    quantized = nvfp4_quantize(torch.randn(2, 32), 1.0)
    with pytest.raises(ValueError, match=re.escape("nvfp4_dequantize: packed must be uint8, got torch.int8")):
        nvfp4_dequantize(quantized.packed.to(torch.int8), quantized.block_scale, quantized.global_scale)
    with pytest.raises(
        ValueError, match=re.escape("nvfp4_dequantize: block_scale shape (3, 2) does not tile packed shape (2, 16)")
    ):
        nvfp4_dequantize(quantized.packed, torch.ones(3, 2), quantized.global_scale)
    with pytest.raises(
        ValueError,
        match=re.escape(
            "nvfp4_dequantize: block_scale shape (2, 3) does not tile packed shape (2, 16) (32 values per row)"
        ),
    ):
        nvfp4_dequantize(quantized.packed, torch.ones(2, 3), quantized.global_scale)
    with pytest.raises(
        ValueError, match=re.escape("nvfp4_dequantize: global_scale must hold one value, got shape (2,)")
    ):
        nvfp4_dequantize(quantized.packed, quantized.block_scale, torch.ones(2))


def test_dequantize_refuses_non_tensors():
    quantized = nvfp4_quantize(torch.randn(2, 32), 1.0)
    with pytest.raises(TypeError, match="nvfp4_dequantize: global_scale must be a tensor, got float"):
        nvfp4_dequantize(quantized.packed, quantized.block_scale, 0.5)
    with pytest.raises(TypeError, match="nvfp4_dequantize: packed must be a tensor, got list"):
        nvfp4_dequantize([1, 2], quantized.block_scale, quantized.global_scale)


def test_dequantize_accepts_float_block_scales():
    quantized = nvfp4_quantize(torch.randn(2, 32), 1.0)
    as_float = nvfp4_dequantize(quantized.packed, quantized.block_scale.float(), quantized.global_scale)
    assert torch.equal(as_float, nvfp4_dequantize(*quantized))
    assert not math.isnan(as_float.sum().item())
