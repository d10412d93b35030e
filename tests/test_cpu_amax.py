"""Examples for sharedquant.core.cpu_amax: the compiled CPU abs-max equals torch's two passes exactly."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from sharedquant.core import cpu_amax, reduce_amax

FLOATS = [torch.float32, torch.bfloat16, torch.float16]
pytestmark = pytest.mark.skipif(cpu_amax._library() is None, reason="the C loop could not be built here")


def awkward(dtype: torch.dtype) -> torch.Tensor:
    """[5, 6, 7]: NaN in one row, -inf in another, -0.0, rows whose negative side is larger."""
    x = torch.randn(5, 6, 7, generator=torch.Generator().manual_seed(1))
    x[0, 0, 3], x[1, 2, 0], x[2, 5, 6] = float("nan"), float("-inf"), -0.0
    x[3, 1] = -50.0
    x[3, 4] = 0.0
    x[4, 5, 6] = -75.0  # the last element
    return x.to(dtype)


def two_passes(x: torch.Tensor, axis) -> torch.Tensor:
    dims = axis if axis is not None else tuple(range(x.dim()))
    return torch.maximum(x.amax(dim=dims, keepdim=True).abs(), x.amin(dim=dims, keepdim=True).abs())


def assert_same(actual: torch.Tensor, expected: torch.Tensor) -> None:
    assert actual.dtype == expected.dtype and actual.shape == expected.shape
    torch.testing.assert_close(actual, expected, rtol=0, atol=0, equal_nan=True)
    assert not torch.signbit(actual[~actual.isnan()]).any()  # |-0.0| is +0.0


@pytest.fixture
def kernel_calls(monkeypatch):
    """Small tensors take the kernel; records each reduction it did."""
    monkeypatch.setattr(cpu_amax, "MIN_ELEMENTS", 1)
    calls = []
    original = cpu_amax.abs_max

    def spy(tensor, axis):
        result = original(tensor, axis)
        if result is not None:  # None: it could not build, and torch's passes ran instead
            calls.append(axis)
        return result

    monkeypatch.setattr(cpu_amax, "abs_max", spy)
    return calls


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("axis", [None, -1, (1, 2), (0, 1, 2), 0, (0, 1)])
def test_reduce_amax_through_the_kernel_equals_two_passes(kernel_calls, dtype, axis):
    x = awkward(dtype)
    actual = reduce_amax(x, axis=axis, keepdims=True, squeeze_scalar=False)
    normalized = None if axis is None else tuple(a % 3 for a in ((axis,) if isinstance(axis, int) else axis))
    assert kernel_calls == [normalized]
    expected = two_passes(x, normalized)
    assert_same(actual, expected.reshape(()) if axis is None else expected)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_every_16_bit_pattern_orders_as_its_magnitude(dtype):
    # The loop compares bits, never floats: all 65,536 patterns, paired every way up.
    bits = torch.arange(-(1 << 15), 1 << 15, dtype=torch.int32).to(torch.int16)
    values = bits.view(dtype)
    shuffled = values[torch.randperm(values.numel(), generator=torch.Generator().manual_seed(3))]
    pairs = torch.stack([values, shuffled], dim=1)
    assert_same(cpu_amax.abs_max(pairs, (1,)), two_passes(pairs, (1,)))
    assert cpu_amax.abs_max(values, None).isnan()


FLOAT8 = [getattr(torch, f) for f in ("float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz", "float8_e5m2fnuz") if hasattr(torch, f)]


@pytest.mark.parametrize("dtype", FLOAT8)
def test_every_float8_pattern_orders_as_its_magnitude(dtype):
    values = torch.arange(256, dtype=torch.int32).to(torch.uint8).view(dtype)
    pairs = torch.stack([values, values[torch.randperm(256, generator=torch.Generator().manual_seed(6))]], dim=1)
    wide = pairs.float()  # the reference in fp32, where torch has the arithmetic
    actual = cpu_amax.abs_max(pairs, (1,))
    assert actual.dtype == dtype
    assert_same(actual.float(), two_passes(wide, (1,)))
    columns = pairs.t().contiguous().view(2, 16, 16)
    assert_same(cpu_amax.abs_max(columns, (0,)).float(), two_passes(columns.float(), (0,)))


def test_float8_reduce_amax_reads_its_bytes_through_the_kernel(kernel_calls):
    x = (torch.randn(64, 100, generator=torch.Generator().manual_seed(7)) * 40).to(torch.float8_e4m3fn)
    x[17, 3] = -448.0
    assert reduce_amax(x).item() == 448.0
    assert reduce_amax(x, axis=-1).shape == (64, 1) and reduce_amax(x, axis=0).shape == (1, 100)
    assert kernel_calls == [None, (1,), (0,)]


def test_float32_patterns_order_as_their_magnitudes():
    generator = torch.Generator().manual_seed(4)
    bits = torch.randint(-(1 << 31), 1 << 31, (1 << 16, 3), generator=generator, dtype=torch.int64).to(torch.int32)
    special = torch.tensor([0.0, -0.0, 1e-45, -1e-45, 1.2e-38, float("inf"), -float("inf"), 3.4e38, -3.4e38, 1.0])
    pairs = torch.cat([bits.view(torch.float32), torch.stack([special, special.flip(0), -special], 1)])
    assert_same(cpu_amax.abs_max(pairs, (1,)), two_passes(pairs, (1,)))


@pytest.mark.parametrize("where", [0, 70_000, 199_999])
def test_a_row_split_over_the_threads_finds_its_max_and_nan_in_any_chunk(where):
    # one row longer than a chunk (64 Ki elements): its chunks are spread over the threads
    x = torch.rand(200_000)
    x[where] = -7.0
    assert cpu_amax.abs_max(x, None).item() == 7.0
    x[where] = float("nan")
    assert cpu_amax.abs_max(x, None).isnan()
    rows = torch.rand(3, 200_000)  # more rows than threads or fewer, by the machine
    rows[1, where] = -7.0
    assert cpu_amax.abs_max(rows, (1,)).flatten().tolist()[1] == 7.0


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("shape", [(300, 1000), (3, 5, 7000), (2, 20_000), (9, 3)])
def test_over_leading_dimensions_each_column_gets_its_max_and_nan(dtype, shape):
    # narrow ones fold rows per thread, wide ones (4 Ki columns a thread) split the columns
    x = torch.randn(shape, generator=torch.Generator().manual_seed(5)).to(dtype)
    flat = x.view(-1)
    flat[7], flat[-1], flat[len(flat) // 2] = float("nan"), -1e4, -0.0
    axis = tuple(range(x.dim() - 1))
    assert_same(cpu_amax.abs_max(x, axis), two_passes(x, axis))


def test_a_tensor_shorter_than_the_unrolled_loop_is_reduced_whole(kernel_calls):
    x = torch.tensor([3.0, -9.0, 4.0])
    assert reduce_amax(x).item() == 9.0
    assert kernel_calls == [None]


def test_a_reduction_over_extent_one_is_left_to_torch():
    column = torch.empty(cpu_amax.MIN_ELEMENTS, 1)
    assert not cpu_amax.available(column, (1,)) and not cpu_amax.available(column.t(), (0,))
    assert cpu_amax.available(column, None) and cpu_amax.available(column, (0, 1))


def test_kernel_takes_contiguous_leading_or_trailing_reductions_only():
    big = torch.empty(cpu_amax.MIN_ELEMENTS // 256, 256)
    assert cpu_amax.available(big, None)
    assert cpu_amax.available(big, (1,)) and cpu_amax.available(big, (0, 1))
    assert cpu_amax.available(big, (0,))  # a leading dimension
    assert not cpu_amax.available(torch.empty(4, cpu_amax.MIN_ELEMENTS, 3), (1,))  # a middle one: torch's passes
    assert not cpu_amax.available(big.t(), (1,))  # not contiguous
    assert not cpu_amax.available(big.double(), None)  # a dtype it is not built for
    assert not cpu_amax.available(torch.nn.Parameter(big), None)  # a subclass
    assert not cpu_amax.available(big[:-1], None)  # one row below the size it pays off at


def test_parameters_and_inference_tensors_reduce_through_the_kernel(kernel_calls):
    weight = torch.nn.Parameter(awkward(torch.float32).nan_to_num())
    result = reduce_amax(weight, axis=-1)
    assert not result.requires_grad and not result.is_inference()
    torch.testing.assert_close(result, two_passes(weight.detach(), (2,)), rtol=0, atol=0)
    with torch.inference_mode():
        frozen = weight.detach().clone()
        torch.testing.assert_close(reduce_amax(frozen, axis=-1), two_passes(frozen, (2,)), rtol=0, atol=0)
    assert kernel_calls == [(2,), (2,)]


def test_the_loop_runs_on_torchs_threads():
    # It links the OpenMP runtime torch has loaded, so torch.set_num_threads is its setting too.
    before = torch.get_num_threads()
    try:
        for count in {1, 2, before}:
            torch.set_num_threads(count)
            assert cpu_amax.threads() == count
    finally:
        torch.set_num_threads(before)


def test_without_a_compiler_it_warns_once_and_keeps_torchs_passes():
    script = (
        "import warnings, torch\n"
        "from sharedquant.core import cpu_amax, reduce_amax\n"
        "x = torch.randn(64, 128)\n"
        "x[5, 3] = -40.0\n"
        "with warnings.catch_warnings(record=True) as caught:\n"
        "    warnings.simplefilter('always')\n"
        "    first, second = reduce_amax(x, axis=-1), reduce_amax(x, axis=-1)\n"
        "assert torch.equal(first, x.abs().amax(-1, keepdim=True)) and torch.equal(second, first)\n"
        "messages = [(str(w.message), w.filename) for w in caught if issubclass(w.category, RuntimeWarning)]\n"
        "assert len(messages) == 1 and 'could not be built' in messages[0][0], messages\n"
        "assert messages[0][1] == '<string>', messages  # points at the caller's reduce_amax\n"
        "assert not cpu_amax.available(x, (1,))\n"
    )
    env = dict(os.environ, CC="/nonexistent/cc")
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
