"""Examples for sharedquant.core.triton_amax: the float8 Triton kernel agrees with the byte path.

The kernel tests run on CUDA where triton and a GPU are present, and on CPU tensors in
Triton's interpreter where only triton is (``test_kernels_under_the_triton_interpreter``
reruns this file in a subprocess with ``TRITON_INTERPRET=1``, which triton reads at
import). Without triton only the import check runs.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest
import torch

import sharedquant.core.reduce as reduce_module
from sharedquant.core import triton_amax
from sharedquant.core.reduce import reduce_amax

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
HAS_TRITON = triton_amax.triton is not None
DEVICE = torch.device("cpu" if INTERPRETED else "cuda")
kernels = pytest.mark.skipif(
    not HAS_TRITON or not (INTERPRETED or torch.cuda.is_available()),
    reason="needs triton and CUDA, or triton's interpreter",
)
FLOAT8 = [torch.float8_e4m3fn, torch.float8_e5m2, torch.float8_e4m3fnuz, torch.float8_e5m2fnuz]
# The interpreter runs a launch in about 10 ms: every byte alone is 2,048 launches, so under it
# the zeros, the sign bit, the NaN and inf codes and a stride through the rest, in every lane.
INTERPRETED_BYTES = sorted({0x00, 0x01, 0x7B, 0x7C, 0x7E, 0x7F, 0x80, 0x81, 0xFB, 0xFC, 0xFE, 0xFF, *range(2, 256, 23)})
NAN_BYTES = {  # a NaN code of each format (fnuz: the only one)
    torch.float8_e4m3fn: 0xFF,
    torch.float8_e5m2: 0x7E,
    torch.float8_e4m3fnuz: 0x80,
    torch.float8_e5m2fnuz: 0x80,
}


def assert_same(actual: torch.Tensor, expected: torch.Tensor) -> None:
    """Bit-for-bit agreement: dtype, shape, values, NaN where NaN, the sign of zero."""
    actual = actual.cpu()
    assert actual.dtype == expected.dtype and actual.shape == expected.shape
    torch.testing.assert_close(actual, expected, rtol=0, atol=0, equal_nan=True)
    assert torch.equal(actual.signbit(), expected.signbit())


def float8_bytes(values: list[int], dtype: torch.dtype) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.uint8).view(dtype).to(DEVICE)


def assert_float8_matches_byte_path(x: torch.Tensor) -> None:
    """The kernel's byte is the CPU byte path's, and reduce.py's float8 result follows from it."""
    got = triton_amax.magnitude_max(x).cpu()
    raw = x.cpu().view(torch.uint8)
    expected = reduce_module._magnitude(raw, x.dtype).amax().reshape([1] * x.dim())
    assert torch.equal(got, expected), f"{x.dtype}: byte {got.item():#x}, expected {expected.item():#x}"
    assert_same(got.view(x.dtype).to(torch.get_default_dtype()), reduce_module._float8_amax(x.cpu(), None))


@pytest.fixture(params=["default", "multi-step"])
def spans(request, monkeypatch):
    """Default launch sizes (small tensors: one step per program), or several steps per program."""
    if request.param == "multi-step":
        monkeypatch.setattr(triton_amax, "_MIN_PROGRAMS", 1)


# --- float8 ----------------------------------------------------------------------------------


@kernels
@pytest.mark.parametrize("dtype", FLOAT8)
def test_float8_every_byte_present_or_absent(dtype):
    every = torch.randperm(256, dtype=torch.int64).tolist()
    assert_float8_matches_byte_path(float8_bytes(every, dtype))
    for value in range(256) if not INTERPRETED else INTERPRETED_BYTES:
        # ``value`` alone among zeros, in each byte lane of a word
        assert_float8_matches_byte_path(float8_bytes([0] * (value % 4) + [value] + [0] * (7 - value % 4), dtype))
        # every byte but ``value`` (its slot holds 0x00, positive zero in all four formats)
        assert_float8_matches_byte_path(float8_bytes([0 if b == value else b for b in every], dtype))


@kernels
@pytest.mark.parametrize("dtype", FLOAT8)
@pytest.mark.parametrize("nan_at", [None, 5, 16384 * 2 + 3, -1])
def test_float8_across_programs(spans, dtype, nan_at):
    x = torch.randn(3 * 16384 + 12).to(dtype).view(torch.uint8)
    if nan_at is not None:
        x[nan_at] = NAN_BYTES[dtype]
    x = x.view(dtype).reshape(4, -1).to(DEVICE)
    assert triton_amax.available(x, None)
    assert_float8_matches_byte_path(x)


@kernels
def test_float8_outside_whole_words_keeps_the_byte_path():
    odd = torch.randn(7).to(torch.float8_e4m3fn).to(DEVICE)
    shifted = torch.randn(9).to(torch.float8_e4m3fn).to(DEVICE)[1:]
    assert not triton_amax.available(odd, None)
    assert not triton_amax.available(shifted, None)
    assert triton_amax.available(shifted.clone(), None)


# --- what reduce.py hands over ---------------------------------------------------------------


@kernels
def test_available_covers_only_whole_contiguous_float8():
    x = torch.randn(4, 8).to(torch.float8_e4m3fn).to(DEVICE)
    assert triton_amax.available(x, None) and triton_amax.available(x, (0, 1))
    assert not triton_amax.available(x, (1,))
    assert not triton_amax.available(x.t(), None)
    assert not triton_amax.available(x.float(), None)
    assert not triton_amax.available(x[:0], None)


@pytest.mark.skipif(not HAS_TRITON or INTERPRETED or not torch.cuda.is_available(), reason="needs triton and CUDA")
def test_reduce_amax_on_cuda_takes_the_kernels_where_they_apply(monkeypatch):
    calls = []
    original = triton_amax.magnitude_max
    monkeypatch.setattr(triton_amax, "magnitude_max", lambda tensor: calls.append(tensor.dtype) or original(tensor))
    x = torch.randn(2048, 1024) * 10
    cases = [
        (x.to(torch.float8_e4m3fn), None, True),
        (x.to(torch.float8_e5m2fnuz), None, True),
        (x, None, False),
        (x.bfloat16(), -1, False),
        (x.to(torch.float8_e5m2), 1, False),
        (x.to(torch.float8_e4m3fn)[:64, :300], None, False),  # launch-bound: torch's own reduction
    ]
    for tensor, axis, kernel in cases:
        calls.clear()
        assert_same(reduce_amax(tensor.cuda(), axis=axis), reduce_amax(tensor, axis=axis))
        assert calls == ([tensor.dtype] if kernel else []), (tensor.dtype, axis)


@pytest.mark.skipif(not HAS_TRITON or INTERPRETED or not torch.cuda.is_available(), reason="needs triton and CUDA")
def test_float8_offsets_past_2_31_elements_on_cuda():
    """A value past byte 2**31 is found: the kernel indexes in int64, not int32."""
    if torch.cuda.mem_get_info()[0] < 6 * 2**30:
        pytest.skip("needs 6 GiB free on the GPU")
    x = torch.zeros((1 << 31) + (1 << 20), dtype=torch.float8_e4m3fn, device="cuda")
    x[-1], x[0] = -7, 2
    assert reduce_amax(x).item() == 7
    del x
    torch.cuda.empty_cache()


# --- triton is optional ----------------------------------------------------------------------


def test_module_imports_and_declines_without_triton():
    script = (
        "import sys; sys.modules['triton'] = None\n"  # import triton now raises ImportError
        "import torch\n"
        "from sharedquant.core import triton_amax\n"
        "from sharedquant.core.reduce import reduce_amax\n"
        "assert triton_amax.triton is None\n"
        "assert not triton_amax.available(torch.ones(4), None)\n"
        "assert reduce_amax(torch.tensor([1.0, -3.0])).item() == 3.0\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]


@pytest.mark.skipif(not HAS_TRITON or INTERPRETED, reason="needs triton; already interpreted")
def test_kernels_under_the_triton_interpreter():
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__, "-k", "not interpreter"]
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stdout[-4000:]
    summary = done.stdout.strip().splitlines()[-1]
    assert int(re.search(r"(\d+) passed", summary).group(1)) >= 38, summary  # all but the CUDA-only ones
