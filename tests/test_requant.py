"""core.requant and the fast paths' edges: which members take the byte lookups, the peer, CUDA.

Bit-identity over every byte and generated inputs is in property_tests/test_requant_bits.py.
"""

from __future__ import annotations

import warnings

import pytest
import torch

from sharedquant.core.nvfp4 import nvfp4_quantize
from sharedquant.core.reconcile import _requantize_reference, global_amax_for, requantize
from sharedquant.core.requant import is_byte_layout, requant_tables, requantize_blocks

FP8 = torch.float8_e4m3fn


def _member(rows: int = 6, columns: int = 64, block_size: int = 16, seed: int = 0):
    x = torch.randn(rows, columns, generator=torch.Generator().manual_seed(seed)) * 0.02
    return nvfp4_quantize(x, x.abs().max(), block_size=block_size)


def test_byte_layout_needs_uint8_codes_fp8_scales_that_tile_and_whole_byte_blocks():
    packed, fp8 = torch.zeros(2, 8, dtype=torch.uint8), torch.zeros(2, 1, dtype=FP8)
    assert is_byte_layout(packed, fp8)
    assert not is_byte_layout(packed, torch.zeros(2, 1))  # float32 block scales
    assert not is_byte_layout(packed.view(torch.int8), fp8)
    assert not is_byte_layout(packed, torch.zeros(3, 1, dtype=FP8))  # rows differ
    assert not is_byte_layout(torch.zeros(2, 3, dtype=torch.uint8), torch.zeros(2, 2, dtype=FP8))  # 3-code blocks
    assert not is_byte_layout(torch.zeros(2, 5, dtype=torch.uint8), torch.zeros(2, 3, dtype=FP8))  # no tiling


def test_float32_block_scales_take_the_reference_path_and_keep_their_dtype():
    own = _member()
    block_scale = own.block_scale.float()
    repaired, _ = requantize(own.packed, block_scale, own.global_scale, own.global_scale * 3)
    packed, scales = _requantize_reference(own.packed, block_scale, own.global_scale, global_amax_for(own.global_scale * 3)[0])
    assert repaired.block_scale.dtype == torch.float32
    assert torch.equal(repaired.packed, packed) and torch.equal(repaired.block_scale, scales)


def test_blocks_that_split_a_byte_are_refused_as_the_reference_refuses_them():
    packed, block_scale = torch.zeros(2, 3, dtype=torch.uint8), torch.ones(2, 2).to(FP8)
    with pytest.raises(ValueError, match="block_size must be a positive even int"):
        requantize(packed, block_scale, torch.tensor(1.0), torch.tensor(2.0))


def test_tables_flag_nan_scale_bytes_and_products_that_overflow():
    ordinary = requant_tables(torch.tensor(1e-3), torch.tensor(1.0), torch.device("cpu"))
    refused = {int(key) >> 3 for key in torch.nonzero(~ordinary.finite)}
    assert refused == {0x7F, 0xFF} and int((~ordinary.finite).sum()) == 16
    # 448 * 5e35 is finite, and so are 1.5x of it; 2x (code 4) and beyond overflow fp32
    huge = requant_tables(torch.tensor(5e35), torch.tensor(1e38), torch.device("cpu"))
    assert huge.finite.view(256, 8)[0x7E].tolist() == [True] * 4 + [False] * 4
    assert ordinary.pairs.numel() == 2048 * 256 and ordinary.pairs.dtype == torch.uint8


def test_requantize_keeps_the_layout_of_stacked_and_non_contiguous_members():
    own = _member(rows=24)
    stacked = own.packed.reshape(3, 8, -1)
    scales = own.block_scale.reshape(3, 8, -1)
    shared = own.global_scale * 2.5
    whole, _ = requantize(stacked, scales, own.global_scale, shared)
    strided, _ = requantize(stacked.transpose(0, 1), scales.transpose(0, 1), own.global_scale, shared)
    assert whole.packed.shape == stacked.shape and whole.block_scale.dtype == FP8
    assert torch.equal(strided.packed, whole.packed.transpose(0, 1))
    assert torch.equal(strided.block_scale.view(torch.uint8), whole.block_scale.transpose(0, 1).view(torch.uint8))


@pytest.mark.peer
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_quantize_equals_the_peers_quantizer(dtype):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the peer warns about the transformers version on import
        nvfp4_tensor = pytest.importorskip("modelopt.torch.quantization.qtensor.nvfp4_tensor")
    x = (torch.randn(64, 256) * torch.logspace(-4, 2, 64).unsqueeze(1)).to(dtype)
    x[0, :16] = 0.0
    ours = nvfp4_quantize(x, x.abs().max().float())
    theirs, scale, _ = nvfp4_tensor.NVFP4QTensor.quantize(x, 16, weights_scaling_factor_2=ours.global_scale)
    assert torch.equal(ours.packed, theirs._quantized_data)
    assert torch.equal(ours.block_scale.view(torch.uint8), scale.view(torch.uint8))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_gives_the_cpu_bytes():
    x = torch.randn(128, 512) * torch.logspace(-3, 3, 128).unsqueeze(1)
    on_cpu = nvfp4_quantize(x, 500.0)
    on_gpu = nvfp4_quantize(x.cuda(), 500.0)
    assert torch.equal(on_gpu.packed.cpu(), on_cpu.packed)
    assert torch.equal(on_gpu.block_scale.cpu().view(torch.uint8), on_cpu.block_scale.view(torch.uint8))
    shared = on_cpu.global_scale * 3
    cpu_fixed, _ = requantize(on_cpu.packed, on_cpu.block_scale, on_cpu.global_scale, shared)
    gpu_fixed, _ = requantize(on_gpu.packed, on_gpu.block_scale, on_gpu.global_scale.cuda(), shared.cuda())
    assert torch.equal(gpu_fixed.packed.cpu(), cpu_fixed.packed)
    assert torch.equal(gpu_fixed.block_scale.cpu().view(torch.uint8), cpu_fixed.block_scale.view(torch.uint8))


def test_the_nvfp4_benchmark_rows_run_and_give_ratios(capsys):
    from benchmarks import nvfp4_speed

    assert nvfp4_speed.main(["--quick", "--no-peer"]) == 0
    lines = capsys.readouterr().out.splitlines()
    rows = [line for line in lines if line.startswith("| requantize 256x256")]
    assert len(rows) == 2 and all(row.rstrip(" |").endswith("x") for row in rows)
    assert any(line.startswith("| nvfp4_quantize bf16 256x256 |") and line.endswith("| - | - | - |") for line in lines)
