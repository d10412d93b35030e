"""Reductions: absolute maximum, sum, per-block amax. Pure functions of tensors.

Everything here records no gradient and never writes to its input. ``reduce_amax``
and ``reduce_sum`` keep the seed's semantics (``axis=None`` gives a 0-dim result
whatever ``keepdims`` says; ``squeeze_scalar`` squeezes a one-element result of an
axis reduction) and close three gaps of the peer:

* floating inputs are reduced without an ``abs()`` copy: torch's inf-norm kernel on
  CUDA (the abs fused into its one read); on the CPU, where that kernel is scalar,
  ``aminmax`` over a whole tensor (one vectorized read) and a max pass plus a min
  pass over some dimensions (``aminmax`` over a dimension is scalar there); a fused
  ``abs().amax()`` under ``torch.compile`` and ``torch.func``;
* float8 inputs are reduced over their bytes (a Triton kernel on CUDA behind
  ``has_triton()``, else torch ops in bounded chunks), without ever materialising a
  wider copy (the peer upcasts the whole tensor to fp32 first);
* signed integer inputs give the true magnitude in int64 (``abs(int8(-128))``
  overflows to -128 in the input's own dtype).
"""

from __future__ import annotations

import importlib.util
import math
from bisect import bisect_right
from collections.abc import Mapping, Sequence
from itertools import accumulate

import torch

__all__ = [
    "convert_quantization_axis_to_reduce_axis",
    "has_triton",
    "reduce_amax",
    "reduce_amax_many",
    "reduce_block_amax",
    "reduce_sum",
    "round_up_to_fp32",
]

_FLOAT8 = tuple(
    getattr(torch, name)
    for name in ("float8_e4m3fn", "float8_e4m3fnuz", "float8_e5m2", "float8_e5m2fnuz")
    if hasattr(torch, name)
)
# Every float8 format is sign-magnitude in one byte, so clearing bit 7 leaves the
# magnitude, and magnitudes order like unsigned integers (NaN codes sort above inf).
_MAGNITUDE_BITS = 0x7F
# The fnuz formats have no negative zero: their one NaN is 0x80, which clearing bit 7
# would turn into 0. Kept as is, it sorts above every magnitude and stays NaN.
_FNUZ = tuple(getattr(torch, name) for name in ("float8_e4m3fnuz", "float8_e5m2fnuz") if hasattr(torch, name))
_FNUZ_NAN = 0x80
# Bytes masked per step: bounds the scratch memory of a float8 reduction.
_FLOAT8_CHUNK = 1 << 24
# Below this many elements a reduction is launch-bound, and torch launches for less than
# Triton's Python launcher costs; the kernel pays off where bandwidth decides.
_TRITON_MIN_ELEMENTS = 1 << 20
# On CPU, torch.cat copies input by input through a TensorIterator (about a microsecond
# each) unless its output has fewer elements than at::internal::GRAIN_SIZE (32768), where
# it takes a serial copy loop several times faster. Thousands of small amaxes are
# concatenated in chunks below that size.
_SERIAL_CAT_ELEMENTS = 32767


def is_traced(tensor: torch.Tensor) -> bool:
    """Whether ``tensor`` flows through torch.compile or a torch.func transform.

    Under tracing we emit the plain composite (``abs().amax()``), which inductor fuses
    into one read and which every functorch transform has a rule for, and we skip
    checks that would need the tensor's values.
    """
    return torch.compiler.is_compiling() or torch._C._functorch.is_functorch_wrapped_tensor(tensor)


def _normalize_axis(fn: str, tensor: torch.Tensor, axis) -> tuple[int, ...] | None:
    if axis is None:
        return None
    if isinstance(axis, int):
        axes = (axis,)
    elif isinstance(axis, (tuple, list)):
        axes = tuple(axis)
    else:
        raise TypeError(f"{fn}: axis must hold ints, got {axis!r}")
    rank = tensor.dim()
    extent = max(rank, 1)  # a 0-dim tensor has the one dimension torch lets you name as 0 or -1
    out = []
    for a in axes:
        if not isinstance(a, int) or isinstance(a, bool):
            raise TypeError(f"{fn}: axis must hold ints, got {axis!r}")
        if not -extent <= a < extent:
            raise ValueError(f"{fn}: axis {a} is out of range for a tensor of rank {rank}")
        if rank:  # a 0-dim tensor accepts axis 0 / -1, as torch does, and has nothing to reduce
            out.append(a % rank)
    if len(set(out)) != len(out):
        raise ValueError(f"{fn}: axis {axis!r} names a dimension twice")
    return tuple(out)


def _check_tensor(fn: str, tensor) -> None:
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"{fn}: expected a torch.Tensor, got {type(tensor).__name__}")
    if tensor.is_complex():
        raise TypeError(f"{fn}: complex tensors are not supported, got {tensor.dtype}")


def _magnitude(raw: torch.Tensor, dtype: torch.dtype, out: torch.Tensor | None = None) -> torch.Tensor:
    """Bytes that order like ``abs`` of the float8 values in ``raw`` (NaN above everything)."""
    masked = torch.bitwise_and(raw, _MAGNITUDE_BITS, out=out)
    if dtype in _FNUZ:
        masked = torch.where(raw == _FNUZ_NAN, raw, masked)
    return masked


def has_triton() -> bool:
    """Whether triton is installed (found without importing it: its import takes a second)."""
    return importlib.util.find_spec("triton") is not None


def _triton_kernels(tensor: torch.Tensor, axis: tuple[int, ...] | None):
    """``core.triton_amax`` if its kernel takes this reduction, else ``None``: the one gate on triton.

    It takes CUDA, untraced tensors of at least ``_TRITON_MIN_ELEMENTS`` in a layout it covers.
    """
    if not tensor.is_cuda or is_traced(tensor) or tensor.numel() < _TRITON_MIN_ELEMENTS or not has_triton():
        return None
    from . import triton_amax  # imports triton on the first CUDA reduction only

    return triton_amax if triton_amax.available(tensor, axis) else None


def _float8_amax(tensor: torch.Tensor, axis: tuple[int, ...] | None) -> torch.Tensor:
    """abs-max of a float8 tensor, computed on its bytes; result in the default dtype."""
    magnitude = tensor.view(torch.uint8)
    dtype = tensor.dtype
    if is_traced(tensor):
        reduced = _magnitude(magnitude, dtype).amax(dim=axis, keepdim=True)
    elif (kernels := _triton_kernels(tensor, axis)) is not None:
        reduced = kernels.magnitude_max(tensor)
    elif axis is None or len(axis) == tensor.dim():
        flat = magnitude.reshape(-1)
        scratch = torch.empty(min(flat.numel(), _FLOAT8_CHUNK), dtype=torch.uint8, device=flat.device)
        partial = [
            _magnitude(chunk, dtype, out=scratch[: chunk.numel()]).amax() for chunk in flat.split(_FLOAT8_CHUNK)
        ]
        reduced = torch.stack(partial).amax().reshape([1] * tensor.dim())
    else:
        # Chunk along the leading dimension; combine partial maxima when dim 0 is
        # itself reduced, concatenate them when it is kept.
        row_bytes = max(1, magnitude[0].numel())
        rows = max(1, _FLOAT8_CHUNK // row_bytes)
        parts = [_magnitude(chunk, dtype).amax(dim=axis, keepdim=True) for chunk in magnitude.split(rows)]
        reduced = torch.stack(parts).amax(0) if 0 in axis else torch.cat(parts)
    return reduced.view(tensor.dtype).to(torch.get_default_dtype())


_INT64_MIN = -(2**63)


def _integer_amax(tensor: torch.Tensor, axis: tuple[int, ...] | None) -> torch.Tensor:
    dims = axis if axis is not None else tuple(range(tensor.dim()))
    if tensor.dtype in (torch.uint16, torch.uint32):  # torch has no max kernel for them; int64 holds them
        tensor = tensor.to(torch.int64)
    elif tensor.dtype == torch.uint64:
        raise TypeError("reduce_amax: uint64 is not supported (torch has no max kernel for it, int64 cannot hold it)")
    high = tensor.amax(dim=dims, keepdim=True)
    # dtype.is_signed, not Tensor.is_signed(): dynamo cannot trace the method (graph break)
    if tensor.dtype == torch.bool or not tensor.dtype.is_signed:
        return high
    low = tensor.amin(dim=dims, keepdim=True)
    # int64's minimum has no int64 magnitude (abs wraps to -2**63, which max() then drops)
    if tensor.dtype == torch.int64 and not is_traced(tensor) and bool((low == _INT64_MIN).any()):
        raise ValueError("reduce_amax: int64 input holds -2**63, whose magnitude 2**63 int64 cannot hold; "
                         "convert it to float64 first")  # fmt: skip
    return torch.maximum(high.to(torch.int64).abs(), low.to(torch.int64).abs())


def _float_amax(tensor: torch.Tensor, axis: tuple[int, ...] | None) -> torch.Tensor:
    dims = axis if axis is not None else tuple(range(tensor.dim()))
    if is_traced(tensor):
        return tensor.abs().amax(dim=dims, keepdim=True)
    if tensor.is_cuda:
        # torch's inf-norm kernel is the abs-max with the abs fused into its one read
        # (NaN propagates): 0.96x to 1.01x of a plain amax on an H100. On the CPU it
        # is not vectorized: 13x slower than amax over 256 MiB of fp32.
        return torch.linalg.vector_norm(tensor, math.inf, dim=dims, keepdim=True)
    if len(dims) == tensor.dim():
        # one vectorized read, NaN propagating; no |x| copy as large as the input
        low, high = torch.aminmax(tensor)
        return torch.maximum(high.abs(), low.abs()).reshape([1] * tensor.dim())
    # CPU aminmax over a dimension is not vectorized (10x slower than amax), so the
    # partial reductions are two vectorized passes, still without an |x| copy.
    return torch.maximum(tensor.amax(dim=dims, keepdim=True).abs(), tensor.amin(dim=dims, keepdim=True).abs())


def _abs_max(tensor: torch.Tensor, axis: tuple[int, ...] | None) -> torch.Tensor:
    """abs-max with the reduced dimensions kept (length 1)."""
    if tensor.dtype in _FLOAT8:
        return _float8_amax(tensor, axis)
    if not tensor.is_floating_point():
        return _integer_amax(tensor, axis)
    return _float_amax(tensor, axis)


def reduce_amax(input, axis=None, keepdims=True, squeeze_scalar=True):
    """Absolute maximum of ``input`` over ``axis``, reading it once.

    Args:
        input: the tensor. Floating (float8 included), integer or bool.
        axis: ``None`` reduces every dimension and returns a 0-dim tensor; an int or a
            sequence of ints reduces those dimensions.
        keepdims: keep reduced dimensions with length 1 (only with an ``axis``).
        squeeze_scalar: squeeze a one-element result of an ``axis`` reduction to 0-dim.

    Returns:
        The abs-max, in the input's dtype (float8: the default float dtype; signed
        integers: int64). NaN propagates.

    Raises:
        TypeError: ``input`` is not a real tensor.
        ValueError: ``axis`` is out of range or names a dimension twice, or a reduced
            dimension is empty.
    """
    _check_tensor("reduce_amax", input)
    axes = _normalize_axis("reduce_amax", input, axis)
    reduced_sizes = input.shape if axes is None else [input.shape[a] for a in axes]
    if 0 in reduced_sizes:
        raise ValueError(f"reduce_amax: input is empty along the reduced axes (shape {tuple(input.shape)})")
    # detached, not under no_grad: no gradient either way, and the grad-mode switch was
    # a third of this function's host time (38 -> 24 us per call), which a GPU
    # reduction of under a millisecond waits on before its launch
    output = _abs_max(input.detach(), axes)
    if axes is None:
        return output.reshape(())
    if not keepdims and axes:
        output = output.squeeze(axes)
    if squeeze_scalar and output.numel() == 1:
        output = output.reshape(())
    return output


@torch.no_grad()
def reduce_sum(input, axis=None, keepdims=True):
    """Sum of ``input`` over ``axis`` (``None``: every dimension, 0-dim result).

    Args:
        input: the tensor.
        axis: ``None``, an int or a sequence of ints.
        keepdims: keep reduced dimensions with length 1 (only with an ``axis``).

    Returns:
        The sum, in torch's sum dtype for the input (float8: the default float dtype).

    Raises:
        TypeError: ``input`` is not a tensor.
        ValueError: ``axis`` is out of range.
    """
    _check_tensor("reduce_sum", input)
    axes = _normalize_axis("reduce_sum", input, axis)
    # torch has no float8 sum kernel; accumulate in the dtype reduce_amax reports float8 in
    dtype = torch.get_default_dtype() if input.dtype in _FLOAT8 else None
    if axes is None:
        return torch.sum(input, dtype=dtype)
    return torch.sum(input, dim=axes, keepdim=keepdims, dtype=dtype)


def convert_quantization_axis_to_reduce_axis(input, axis):
    """Turn a quantization axis (the dimensions that keep their own scale) into the axes to reduce.

    Args:
        input: the tensor being quantized.
        axis: ``None`` (per-tensor), an int, or a list/tuple of ints; negative values count
            from the end.

    Returns:
        ``None`` for per-tensor quantization (reduce everything), else the list of
        dimensions not named by ``axis``, in increasing order.
    """
    if axis is None:
        return None
    kept = axis if isinstance(axis, (list, tuple)) else [axis]
    rank = input.dim()
    return [d for d in range(rank) if d not in kept and d - rank not in kept]


@torch.no_grad()
def reduce_block_amax(input: torch.Tensor, block_sizes: Mapping[int, int]) -> torch.Tensor:
    """Per-block abs-max, all block dimensions reduced in one read.

    Args:
        input: the tensor.
        block_sizes: ``{dim: block}``, e.g. ``{-1: 16}`` for NVFP4 or ``{-1: 128, -2: 128}``
            for 2-D blocks. Every named dimension must be a multiple of its block.

    Returns:
        A tensor with each blocked dimension divided by its block size (``[R, C]`` with
        ``{-1: 16}`` gives ``[R, C // 16]``), in the dtype ``reduce_amax`` gives.

    Raises:
        TypeError: ``block_sizes`` is not a mapping of int to int.
        ValueError: a dimension is out of range, named twice, empty, or not a multiple
            of its block size.
    """
    _check_tensor("reduce_block_amax", input)
    if not isinstance(block_sizes, Mapping) or not block_sizes:
        raise TypeError(f"reduce_block_amax: block_sizes must be a non-empty {{dim: size}} dict, got {block_sizes!r}")
    rank = input.dim()
    blocks: dict[int, int] = {}
    for dim, size in block_sizes.items():
        if not isinstance(dim, int) or not isinstance(size, int) or isinstance(size, bool):
            raise TypeError(f"reduce_block_amax: block_sizes must map int dims to int sizes, got {dim!r}: {size!r}")
        if not -rank <= dim < rank:
            raise ValueError(f"reduce_block_amax: dim {dim} is out of range for a tensor of rank {rank}")
        pos = dim % rank
        if pos in blocks:
            raise ValueError(f"reduce_block_amax: dim {dim} is named twice in {dict(block_sizes)!r}")
        if size <= 0 or input.shape[pos] == 0 or input.shape[pos] % size:
            raise ValueError(
                f"reduce_block_amax: dimension {dim} of size {input.shape[pos]} is not a positive "
                f"multiple of its block size {size}"
            )
        blocks[pos] = size
    shape: list[int] = []
    reduced: list[int] = []
    for pos, extent in enumerate(input.shape):
        if pos in blocks:
            shape += [extent // blocks[pos], blocks[pos]]
            reduced.append(len(shape) - 1)
        else:
            shape.append(extent)
    return _abs_max(input.reshape(shape), tuple(reduced)).squeeze(tuple(reduced))


def round_up_to_fp32(values: torch.Tensor) -> torch.Tensor:
    """Cast to fp32 rounding toward +inf, so a narrowed amax never falls below the original.

    An fp64 amax of ``1 + 2**-30`` becomes the next fp32 above 1.0, not 1.0.
    """
    if values.dtype == torch.float32:
        return values
    narrowed = values.to(torch.float32)
    if values.dtype != torch.float64:
        return narrowed  # float16 / bfloat16 / integers up to 2**24 are exact in fp32
    below = narrowed.to(torch.float64) < values
    return torch.where(below, torch.nextafter(narrowed, torch.full_like(narrowed, float("inf"))), narrowed)


def reduce_amax_many(tensors: Sequence[torch.Tensor], segment_ids: torch.Tensor, num_segments: int) -> torch.Tensor:
    """abs-max over many tensors at once, pooled into ``num_segments`` segments.

    Tensor ``i`` contributes to segment ``segment_ids[i]``. The work is one
    concatenation and one scatter, whatever the number of tensors: the cost of
    finalizing 10k groups is a few kernels, not 10k.

    Args:
        tensors: non-empty tensors (any shapes, one device).
        segment_ids: int64, one entry per tensor.
        num_segments: the length of the result.

    Returns:
        A 1-D tensor of ``num_segments`` maxima in the widest input float dtype (at
        least fp32); ``-inf`` where no tensor contributed. NaN propagates.
    """
    return _reduce_amax_many(tensors, [t.numel() for t in tensors], segment_ids, num_segments)


def _reduce_amax_many(
    tensors: Sequence[torch.Tensor], lengths: list[int], segment_ids: torch.Tensor, num_segments: int
) -> torch.Tensor:
    """``reduce_amax_many`` for a caller that already holds every tensor's ``numel()`` (``lengths``)."""
    if not tensors:
        return torch.full((num_segments,), float("-inf"), device=segment_ids.device)
    flat = _concat_flat(tensors, lengths)
    if not flat.is_floating_point():
        flat = flat.to(torch.float64)  # exact for integers up to 2**53; narrowing to fp32 rounds up
    elif flat.dtype in (torch.float16, torch.bfloat16):
        flat = flat.to(torch.float32)
    # a Python list of ints converts three times faster with its dtype given
    counts = torch.tensor(lengths, dtype=torch.int64, device=flat.device)
    element_ids = torch.repeat_interleave(segment_ids.to(flat.device), counts, output_size=flat.numel())
    out = torch.full((num_segments,), float("-inf"), dtype=flat.dtype, device=flat.device)
    return out.scatter_reduce_(0, element_ids, flat.abs(), "amax")


def _concat_flat(tensors: Sequence[torch.Tensor], lengths: list[int]) -> torch.Tensor:
    """All elements in one 1-D tensor; float8 widened to the default dtype (no float8 arithmetic)."""
    # One cat of the tensors as they are costs well under a microsecond each; a
    # reshape(-1) or a widening per tensor costs a microsecond each. Use the fast paths
    # when the shapes allow them (same trailing dims, or all 0-dim for a stack) and the
    # dtypes do (torch refuses to promote float8, so a cat that succeeds has one float8
    # dtype or none).
    if not torch.compiler.is_compiling():
        for concat in (lambda: _chunked_cat(tensors, lengths), lambda: torch.stack(tensors)):
            try:
                flat = concat().reshape(-1)
            except RuntimeError:  # 0-dim tensors, different trailing dims, float8 mixed with another dtype
                continue
            return flat.to(torch.get_default_dtype()) if flat.dtype in _FLOAT8 else flat
    widened = [t.to(torch.get_default_dtype()) if t.dtype in _FLOAT8 else t for t in tensors]
    return torch.cat([t.reshape(-1) for t in widened])


def _chunked_cat(tensors: Sequence[torch.Tensor], lengths: list[int]) -> torch.Tensor:
    """``torch.cat(tensors)``; on CPU in chunks of fewer than ``_SERIAL_CAT_ELEMENTS`` elements."""
    if tensors[0].device.type != "cpu":
        return torch.cat(tensors)
    ends = list(accumulate(lengths))
    chunks, start = [], 0
    while start < len(tensors):
        below = (ends[start - 1] if start else 0) + _SERIAL_CAT_ELEMENTS
        stop = max(bisect_right(ends, below, lo=start), start + 1)
        chunks.append(torch.cat(tensors[start:stop]))
        start = stop
    if len({chunk.dtype for chunk in chunks}) > 1:
        # Chunks promoted to different dtypes would convert some elements twice; one cat converts once.
        return torch.cat(tensors)
    return torch.cat(chunks) if len(chunks) > 1 else chunks[0]
