"""A Triton kernel for the abs-max of a whole CUDA float8 tensor, in one read. Pure.

torch has no float8 reduction, and its byte path masks each chunk into a scratch
buffer before reducing it: two passes, 442 GB/s on an H100 for 1 GiB. Here the bytes
are read four to a 32-bit word and reduced per byte lane; each program writes one
partial and a small torch ``amax`` over the partials finishes. The only extra memory
is the partials (4 KiB for 1 GiB).

Floating inputs stay on torch: Triton kernels for them (whole tensor and per row,
fused ``abs`` and max) ran at 0.68x to 0.72x of one ``torch.amax`` on an H100, below
torch's inf-norm kernel (0.96x to 1.01x, see ``reduce._float_amax``).

Triton is optional: without it this module still imports and ``available`` answers
False. Under ``TRITON_INTERPRET=1`` the kernel runs on CPU tensors in Triton's
interpreter, which is how the tests check it on machines without a GPU.
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

__all__ = ["available", "magnitude_max"]

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


def _interpreted() -> bool:
    """Whether Triton runs kernels in its CPU interpreter (read when triton was imported)."""
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on")


def available(tensor: torch.Tensor, axis: tuple[int, ...] | None) -> bool:
    """Whether the kernel computes the abs-max of ``tensor`` over ``axis`` (normalized axes).

    Covered, on CUDA (on CPU only under ``TRITON_INTERPRET=1``): whole-tensor reductions
    of contiguous float8 tensors whose bytes are whole aligned 32-bit words.
    """
    if triton is None or tensor.dtype not in _FLOAT8 or tensor.numel() == 0 or not tensor.is_contiguous():
        return False
    if not (tensor.is_cuda or (tensor.device.type == "cpu" and _interpreted())):
        return False
    whole = axis is None or len(axis) == tensor.dim()
    # read as 32-bit words; other lengths and offsets keep reduce.py's byte path
    return whole and tensor.numel() % 4 == 0 and tensor.data_ptr() % 4 == 0


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


def magnitude_max(tensor: torch.Tensor) -> torch.Tensor:
    """The largest magnitude byte of a whole float8 tensor that ``available`` accepts.

    Returns:
        A uint8 tensor of shape ``[1] * tensor.dim()``: the byte with the sign bit cleared
        (the fnuz NaN 0x80 kept), which viewed as ``tensor.dtype`` is the abs-max.
    """
    words = tensor.reshape(-1).view(torch.uint8).view(torch.int32)
    fnuz = tensor.dtype in _FNUZ
    return _span_max(_float8_kernel, words, torch.uint8, FNUZ=fnuz).reshape([1] * tensor.dim())
