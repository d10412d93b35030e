"""Examples for sharedquant.core.cpu_amax: the compiled CPU abs-max equals torch's two passes exactly."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest
import torch

from sharedquant.core import cpu_amax, reduce_amax

FLOATS = [torch.float32, torch.bfloat16, torch.float16]


def awkward(dtype: torch.dtype) -> torch.Tensor:
    """[5, 6, 7]: NaN in one row, -inf in another, -0.0, rows whose negative side is larger."""
    x = torch.randn(5, 6, 7, generator=torch.Generator().manual_seed(1))
    x[0, 0, 3], x[1, 2, 0], x[2, 5, 6] = float("nan"), float("-inf"), -0.0
    x[3, 1] = -50.0
    x[3, 4] = 0.0
    x[4, 5, 6] = -75.0  # the last element: in the tail of a whole-tensor split
    return x.to(dtype)


def two_passes(x: torch.Tensor, axis) -> torch.Tensor:
    dims = axis if axis is not None else tuple(range(x.dim()))
    return torch.maximum(x.amax(dim=dims, keepdim=True).abs(), x.amin(dim=dims, keepdim=True).abs())


def run_fresh(script: str, cache: os.PathLike) -> None:
    """Run ``script`` in a new process whose inductor cache is empty: the kernel is built there, not loaded."""
    env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=str(cache))
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]


@pytest.fixture
def kernel_calls(monkeypatch):
    """Small tensors take the kernel (rows of 16 for whole ones); records each reduction it did."""
    monkeypatch.setattr(cpu_amax, "MIN_ELEMENTS", 1)
    monkeypatch.setattr(cpu_amax, "_WHOLE_ROW", 16)
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
@pytest.mark.parametrize("axis", [None, -1, (1, 2), (0, 1, 2)])
def test_reduce_amax_through_the_kernel_equals_two_passes(kernel_calls, dtype, axis):
    x = awkward(dtype)
    actual = reduce_amax(x, axis=axis, keepdims=True, squeeze_scalar=False)
    normalized = None if axis is None else tuple(a % 3 for a in ((axis,) if isinstance(axis, int) else axis))
    assert kernel_calls == [normalized]
    expected = two_passes(x, normalized)
    if axis is None:
        expected = expected.reshape(())
    assert actual.dtype == dtype and actual.shape == expected.shape
    torch.testing.assert_close(actual, expected, rtol=0, atol=0, equal_nan=True)
    numbers = actual[~actual.isnan()]
    assert not torch.signbit(numbers).any()  # |-0.0| is +0.0


def test_nan_in_the_tail_of_a_whole_tensor_propagates(kernel_calls):
    x = torch.arange(40, dtype=torch.float32)  # rows of 16: 32 in the kernel, 8 in the tail
    x[-1] = float("nan")
    assert reduce_amax(x).isnan()
    x[-1], x[3] = 1.0, float("nan")
    assert reduce_amax(x).isnan()


def test_a_tensor_shorter_than_one_row_is_reduced_whole(kernel_calls):
    x = torch.tensor([3.0, -9.0, 4.0])
    assert reduce_amax(x).item() == 9.0


def test_every_mode_dtype_and_shape_fits_in_dynamos_compile_limit(kernel_calls):
    # Past its limit of 8 compiles dynamo would run the kernel eagerly (two passes again):
    # grad modes, inference tensors, square and one-row shapes must not each compile.
    from torch._dynamo.eval_frame import _debug_get_cache_entry_list

    shapes = [(64, 64), (100, 17), (1, 170), (3, 3), (5, 6, 7)]
    for dtype in FLOATS:
        for shape in shapes:
            x = torch.randn(shape, generator=torch.Generator().manual_seed(2)).to(dtype)
            with torch.inference_mode():
                frozen = x.clone()
            for mode in (torch.enable_grad, torch.no_grad, torch.inference_mode):
                for tensor in (x, frozen):
                    with mode():
                        for axis in (None, -1):
                            got = reduce_amax(tensor, axis=axis, squeeze_scalar=False)
                            want = tensor.abs().amax(dim=axis, keepdim=True) if axis else tensor.abs().amax()
                            assert torch.equal(got, want), (dtype, shape, mode, axis)
                            assert not got.is_inference() or torch.is_inference_mode_enabled()
    assert len(kernel_calls) == len(FLOATS) * len(shapes) * 3 * 2 * 2
    assert len(_debug_get_cache_entry_list(cpu_amax._rows_abs_max)) <= 6  # a normal and an inference input per dtype


def test_a_reduction_over_extent_one_is_left_to_torch():
    column = torch.empty(cpu_amax.MIN_ELEMENTS, 1)
    assert not cpu_amax.available(column, (1,))
    assert cpu_amax.available(column, None) and cpu_amax.available(column, (0, 1))


def test_kernel_takes_large_contiguous_trailing_reductions_only():
    big = torch.empty(cpu_amax.MIN_ELEMENTS // 256, 256)
    assert cpu_amax.available(big, None)
    assert cpu_amax.available(big, (1,)) and cpu_amax.available(big, (0, 1))
    assert not cpu_amax.available(big, (0,))  # a leading dimension: torch's passes
    assert not cpu_amax.available(big.t(), (1,))  # not contiguous
    assert not cpu_amax.available(big.double(), None)  # a dtype it is not built for
    assert not cpu_amax.available(torch.nn.Parameter(big), None)  # a subclass
    assert not cpu_amax.available(big[:-1], None)  # one row below the size it pays off at


def test_parameters_and_inference_tensors_reduce_through_the_kernel(kernel_calls):
    weight = torch.nn.Parameter(awkward(torch.float32).nan_to_num())
    result = reduce_amax(weight, axis=-1)
    assert not result.requires_grad
    torch.testing.assert_close(result, two_passes(weight.detach(), (2,)), rtol=0, atol=0)
    with torch.inference_mode():
        frozen = weight.detach().clone()
        torch.testing.assert_close(reduce_amax(frozen, axis=-1), two_passes(frozen, (2,)), rtol=0, atol=0)
    assert kernel_calls == [(2,), (2,)]


def test_without_a_compiler_it_warns_once_and_keeps_torchs_passes(tmp_path):
    script = (
        "import warnings, torch\n"
        "torch._inductor.config.cpp.cxx = ('/nonexistent/c++',)\n"
        "from sharedquant.core import cpu_amax, reduce_amax\n"
        "cpu_amax.MIN_ELEMENTS = 1\n"
        "x = torch.randn(64, 32)\n"
        "x[5, 3] = -40.0\n"
        "with warnings.catch_warnings(record=True) as caught:\n"
        "    warnings.simplefilter('always')\n"
        "    first, second = reduce_amax(x, axis=-1), reduce_amax(x, axis=-1)\n"
        "assert torch.equal(first, x.abs().amax(-1, keepdim=True)) and torch.equal(second, first)\n"
        "messages = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]\n"
        "assert len(messages) == 1 and 'could not be built' in messages[0], messages\n"
        "assert not cpu_amax.available(x, (1,))\n"
    )
    run_fresh(script, tmp_path)


@pytest.mark.skipif(shutil.which(os.environ.get("CXX", "g++")) is None, reason="needs the C++ compiler inductor builds with")
def test_the_kernel_splits_its_rows_over_torchs_threads_whatever_size_compiled_it(tmp_path):
    # One compiled kernel serves every size (and inductor caches it on disk across
    # processes). Compiled first for a small input, it used to be a serial loop: one
    # core of two on 256 MiB afterwards (17.2 ms against 9.1 ms for the parallel loop here).
    script = (
        "import torch\n"
        "from torch._inductor.utils import run_and_get_code\n"
        "from sharedquant.core import cpu_amax\n"
        "torch.set_num_threads(2)\n"
        "x = torch.randn(3, 5)\n"
        "result, sources = run_and_get_code(cpu_amax._run, x)\n"
        "assert torch.equal(result, x.abs().amax(1))\n"
        "kernels = [line for source in sources for line in source.splitlines() if 'extern \"C\"' in line]\n"
        "assert len(kernels) == 1, kernels\n"
        "assert any('#pragma omp parallel' in source for source in sources), sources\n"
    )
    run_fresh(script, tmp_path)
