"""Triton kernels for the abs-max of CUDA tensors, in one read of the input. Pure.

``core/reduce.py`` hands a reduction to this module when the tensor is on CUDA, is not
traced and ``available`` says a kernel covers it: a whole-tensor abs-max of a contiguous
float32 / float16 / bfloat16 tensor or of a contiguous float8 tensor (read as 32-bit
words, reduced per byte lane), or a per-row abs-max over the last dimension of a
contiguous float32 / float16 / bfloat16 tensor. Each program reduces a contiguous span
to one partial (fused ``abs`` and max, NaN kept); a small torch ``amax`` over the
partials finishes. The only extra memory is the partials.

Triton is optional: without it this module still imports and ``available`` answers
False. Under ``TRITON_INTERPRET=1`` the same kernels run on CPU tensors in Triton's
interpreter, which is how the tests check them on machines without a GPU.
"""

from __future__ import annotations

import contextlib
import os

import torch

from .reduce import _FLOAT8, _FNUZ, _FNUZ_NAN, _MAGNITUDE_BITS

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs; reduce.py keeps its torch path
    triton = None

__all__ = ["abs_max", "available", "magnitude_max"]

_FLOATS = (torch.float32, torch.float16, torch.bfloat16)
# Bytes every program reads per loop step: with 8 warps each thread issues four 16-byte
# loads per step, enough loads in flight to keep HBM busy.
_STEP_BYTES = 16384
_NUM_WARPS = 8
# A whole-tensor reduction spreads over at least this many programs when the tensor is
# big enough (H100 has 132 SMs; several programs per SM hide the tail of each wave) ...
_MIN_PROGRAMS = 1024
# ... and a program reads at most this many steps (256 KiB), so a 1 GiB tensor gives
# 4096 partials: a few KiB of extra memory and a finishing amax of a few microseconds.
_MAX_STEPS = 16

if triton is not None:
    # float8 bytes are read four to a 32-bit word and reduced per byte lane: unpacking each
    # byte costs about four times the instructions, close to what keeps up with HBM.
    # Clearing bit 7 of a lane leaves a magnitude that orders like abs(value), NaN codes
    # above inf; the fnuz NaN 0x80 would become 0, so its presence is tracked on the side.
    _LANE0 = tl.constexpr(_MAGNITUDE_BITS)
    _LANE1 = tl.constexpr(_MAGNITUDE_BITS << 8)
    _LANE2 = tl.constexpr(_MAGNITUDE_BITS << 16)
    _LANE3 = tl.constexpr(_MAGNITUDE_BITS << 24)
    _NAN_BYTE = tl.constexpr(_FNUZ_NAN)
    _NAN_WORD = tl.constexpr(_FNUZ_NAN * 0x01010101)
    _ONES = tl.constexpr(0x01010101)

    @triton.jit
    def _max_nan(a, b):
        # maxnum (the default) would drop a NaN
        return tl.maximum(a, b, propagate_nan=tl.PropagateNan.ALL)

    @triton.jit
    def _span_kernel(x_ptr, out_ptr, numel, span, BLOCK: tl.constexpr):
        pid = tl.program_id(0)
        start = pid.to(tl.int64) * span  # numel may exceed 2**31
        block = x_ptr + start + tl.arange(0, BLOCK)
        acc = tl.zeros([BLOCK], dtype=tl.float32)  # every magnitude is >= 0
        remaining = numel - start
        if remaining >= span:
            # full spans load without a mask, so loads stay 16-byte vectors whatever numel is
            for i in range(0, span, BLOCK):
                acc = _max_nan(acc, tl.abs(tl.load(block + i).to(tl.float32)))
        else:
            tail = remaining.to(tl.int32)  # below span; an int32 loop like the branch above
            for i in range(0, tail, BLOCK):
                inside = i + tl.arange(0, BLOCK) < tail
                acc = _max_nan(acc, tl.abs(tl.load(block + i, mask=inside, other=0).to(tl.float32)))
        tl.store(out_ptr + pid, tl.reduce(acc, 0, _max_nan).to(out_ptr.dtype.element_ty))

    @triton.jit
    def _fold_words(x, acc0, acc1, acc2, acc3, nan, FNUZ: tl.constexpr):
        word = x.to(tl.uint32, bitcast=True)
        acc0 = tl.maximum(acc0, word & _LANE0)
        acc1 = tl.maximum(acc1, word & _LANE1)
        acc2 = tl.maximum(acc2, word & _LANE2)
        acc3 = tl.maximum(acc3, word & _LANE3)
        if FNUZ:
            # a 0x80 byte becomes a zero byte; (z - 0x01..) & ~z & 0x80.. is nonzero iff z has one
            z = word ^ _NAN_WORD
            nan = nan | ((z - _ONES) & ~z & _NAN_WORD)
        return acc0, acc1, acc2, acc3, nan

    @triton.jit
    def _float8_kernel(x_ptr, out_ptr, numel, span, BLOCK: tl.constexpr, FNUZ: tl.constexpr):
        pid = tl.program_id(0)
        start = pid.to(tl.int64) * span
        block = x_ptr + start + tl.arange(0, BLOCK)
        acc0 = tl.zeros([BLOCK], dtype=tl.uint32)
        acc1 = tl.zeros([BLOCK], dtype=tl.uint32)
        acc2 = tl.zeros([BLOCK], dtype=tl.uint32)
        acc3 = tl.zeros([BLOCK], dtype=tl.uint32)
        nan = tl.zeros([BLOCK], dtype=tl.uint32)
        remaining = numel - start
        if remaining >= span:
            for i in range(0, span, BLOCK):
                acc0, acc1, acc2, acc3, nan = _fold_words(tl.load(block + i), acc0, acc1, acc2, acc3, nan, FNUZ)
        else:
            tail = remaining.to(tl.int32)
            for i in range(0, tail, BLOCK):
                words = tl.load(block + i, mask=i + tl.arange(0, BLOCK) < tail, other=0)  # 0: magnitude 0, no NaN
                acc0, acc1, acc2, acc3, nan = _fold_words(words, acc0, acc1, acc2, acc3, nan, FNUZ)
        high = tl.maximum(tl.max(acc3, 0) >> 24, tl.max(acc2, 0) >> 16)
        high = tl.maximum(high, tl.maximum(tl.max(acc1, 0) >> 8, tl.max(acc0, 0)))
        if FNUZ:
            high = tl.where(tl.max(nan, 0) != 0, _NAN_BYTE, high)
        tl.store(out_ptr + pid, high.to(tl.uint8))

    @triton.jit
    def _rows_kernel(x_ptr, out_ptr, rows, cols, full_cols, ROWS: tl.constexpr, BLOCK: tl.constexpr):
        pid = tl.program_id(0)
        row = pid * ROWS + tl.arange(0, ROWS)
        # rows past the end re-read the last row (harmless for a max) instead of masking every load
        clamped = tl.minimum(row, rows - 1)
        block = x_ptr + clamped.to(tl.int64)[:, None] * cols + tl.arange(0, BLOCK)[None, :]
        acc = tl.zeros([ROWS, BLOCK], dtype=tl.float32)
        for c in range(0, full_cols, BLOCK):
            acc = _max_nan(acc, tl.abs(tl.load(block + c).to(tl.float32)))
        if full_cols < cols:
            inside = (full_cols + tl.arange(0, BLOCK) < cols)[None, :]
            acc = _max_nan(acc, tl.abs(tl.load(block + full_cols, mask=inside, other=0).to(tl.float32)))
        result = tl.reduce(acc, 1, _max_nan).to(out_ptr.dtype.element_ty)
        tl.store(out_ptr + clamped, result, mask=row < rows)


def _interpreted() -> bool:
    """Whether Triton runs kernels in its CPU interpreter (read when triton was imported)."""
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on")


def available(tensor: torch.Tensor, axis: tuple[int, ...] | None) -> bool:
    """Whether a kernel here computes the abs-max of ``tensor`` over ``axis`` (normalized axes).

    Covered, on CUDA (on CPU only under ``TRITON_INTERPRET=1``): whole-tensor reductions
    of contiguous float32 / float16 / bfloat16 tensors and of contiguous float8 tensors
    whose bytes are whole aligned 32-bit words, and the last dimension of contiguous
    float32 / float16 / bfloat16 tensors of rank 2 or more.
    """
    if triton is None or tensor.numel() == 0 or not tensor.is_contiguous():
        return False
    if not (tensor.is_cuda or (tensor.device.type == "cpu" and _interpreted())):
        return False
    whole = axis is None or len(axis) == tensor.dim()
    if tensor.dtype in _FLOAT8:
        # read as 32-bit words; other lengths and offsets keep reduce.py's byte path
        return whole and tensor.numel() % 4 == 0 and tensor.data_ptr() % 4 == 0
    if tensor.dtype not in _FLOATS:
        return False
    return whole or (tensor.dim() >= 2 and tuple(axis) == (tensor.dim() - 1,))


def _on_device(tensor: torch.Tensor):
    """Triton launches on the current CUDA device, which need not be the tensor's."""
    return torch.cuda.device(tensor.device) if tensor.is_cuda else contextlib.nullcontext()


def _span_max(kernel, flat: torch.Tensor, out_dtype: torch.dtype, **constexprs) -> torch.Tensor:
    """Run a span kernel over a contiguous 1-D tensor; its partials' max as a 0-dim tensor."""
    numel = flat.numel()
    block = _STEP_BYTES // flat.element_size()
    steps = min(_MAX_STEPS, max(1, numel // (block * _MIN_PROGRAMS)))
    span = block * steps
    programs = triton.cdiv(numel, span)
    partials = torch.empty(programs, dtype=out_dtype, device=flat.device)
    with _on_device(flat):
        kernel[(programs,)](flat, partials, numel, span, BLOCK=block, num_warps=_NUM_WARPS, **constexprs)
    return partials.amax() if programs > 1 else partials[0]


def _row_max(tensor: torch.Tensor) -> torch.Tensor:
    """Max of ``abs`` over the last dimension of a contiguous tensor, keepdim, in its dtype."""
    cols = tensor.shape[-1]
    rows = tensor.numel() // cols
    step = _STEP_BYTES // tensor.element_size()
    block = min(triton.next_power_of_2(cols), step)
    per_program = step // block  # short rows share a program, so each step still reads ``step`` elements
    out = torch.empty(rows, dtype=tensor.dtype, device=tensor.device)
    with _on_device(tensor):
        _rows_kernel[(triton.cdiv(rows, per_program),)](
            tensor, out, rows, cols, cols - cols % block, ROWS=per_program, BLOCK=block, num_warps=_NUM_WARPS
        )
    return out.reshape(*tensor.shape[:-1], 1)


def abs_max(tensor: torch.Tensor, axis: tuple[int, ...] | None) -> torch.Tensor:
    """abs-max of a float32 / float16 / bfloat16 tensor that ``available`` accepts.

    Returns:
        The abs-max with the reduced dimensions kept (length 1), in the input's dtype.
        NaN propagates.
    """
    if axis is None or len(axis) == tensor.dim():
        return _span_max(_span_kernel, tensor.reshape(-1), tensor.dtype).reshape([1] * tensor.dim())
    return _row_max(tensor)


def magnitude_max(tensor: torch.Tensor) -> torch.Tensor:
    """The largest magnitude byte of a whole float8 tensor that ``available`` accepts.

    Returns:
        A uint8 tensor of shape ``[1] * tensor.dim()``: the byte with the sign bit cleared
        (the fnuz NaN 0x80 kept), which viewed as ``tensor.dtype`` is the abs-max.
    """
    words = tensor.reshape(-1).view(torch.uint8).view(torch.int32)
    fnuz = tensor.dtype in _FNUZ
    return _span_max(_float8_kernel, words, torch.uint8, FNUZ=fnuz).reshape([1] * tensor.dim())
