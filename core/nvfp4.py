"""NVFP4 as pure functions: quantize, dequantize, fake-quantize.

The format, as the peer's HF export and the inference engines define it:

* per-tensor scale ``S2 = global_amax / (6 * 448)`` (exported as ``weight_scale_2``);
* per-block scale ``s = block_amax / (6 * S2)``; an all-zero block gets ``1.0``; clamped
  to ``[2**-9, 448]`` and stored as ``float8_e4m3fn`` (exported as ``weight_scale``);
* each element ``x / (s * S2)`` rounded to the nearest E2M1 magnitude
  ``{0, 0.5, 1, 1.5, 2, 3, 4, 6}``, ties to even, saturating at 6, sign in bit 3 (a
  negative value that rounds to zero keeps its sign: code 8; ``-0.0`` encodes as +0);
* two codes per byte, the even element in the low nibble (exported as ``weight``);
* dequantized value ``code * s * S2``.

The operation order matches the peer's export bit for bit. Everything traces under
``torch.compile(fullgraph=True)`` and ``torch.func.vmap``; value checks on
``global_amax`` run eagerly only.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from .reduce import _FLOAT8, is_traced, reduce_block_amax

__all__ = [
    "E2M1_MAX",
    "E4M3_MAX",
    "NVFP4Tensor",
    "nvfp4_dequantize",
    "nvfp4_fake_quant",
    "nvfp4_global_scale",
    "nvfp4_quantize",
]

E2M1_MAX = 6.0
E4M3_MAX = 448.0
_SCALE_MIN = 2.0**-9
_E2M1_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
# At a midpoint between neighbouring E2M1 magnitudes the even code wins: 0.25 -> 0,
# 1.25 -> 1, 2.5 -> 2 and 5 -> 4 round down; 0.75 -> 1, 1.75 -> 2 and 3.5 -> 4 round up.
# Elements quantized per step: a step's few fp32 temporaries stay in a core's L2 cache,
# and a huge tensor's scratch memory stays bounded. Blocks never span steps.
_CHUNK_ELEMENTS = 1 << 17


class NVFP4Tensor(NamedTuple):
    """A quantized tensor: what a checkpoint stores as ``weight``, ``weight_scale``, ``weight_scale_2``."""

    packed: torch.Tensor  # uint8 [..., C // 2]
    block_scale: torch.Tensor  # float8_e4m3fn [..., C // block_size]
    global_scale: torch.Tensor  # fp32, 0-dim


def _check_input(fn: str, x: torch.Tensor, block_size: int) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{fn}: expected a tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise ValueError(f"{fn}: expected a floating-point tensor, got dtype {x.dtype}")
    if not isinstance(block_size, int) or isinstance(block_size, bool) or block_size <= 0 or block_size % 2:
        raise ValueError(f"{fn}: block_size must be a positive even int, got {block_size!r}")
    if x.dim() == 0 or x.shape[-1] == 0 or x.shape[-1] % block_size:
        raise ValueError(
            f"{fn}: the last dimension ({x.shape[-1] if x.dim() else 'none'}) must be a positive "
            f"multiple of block_size {block_size}"
        )


def _global_amax_tensor(fn: str, global_amax, device: torch.device) -> torch.Tensor:
    if not isinstance(global_amax, torch.Tensor):
        if isinstance(global_amax, bool) or not isinstance(global_amax, (int, float)):
            raise TypeError(f"{fn}: global_amax must be a tensor or a number, got {type(global_amax).__name__}")
        global_amax = torch.tensor(float(global_amax), device=device)
    if global_amax.numel() != 1:
        raise ValueError(f"{fn}: global_amax must hold one value, got shape {tuple(global_amax.shape)}")
    if not is_traced(global_amax):
        value = global_amax.item()
        if not value > 0 or value == float("inf"):
            raise ValueError(f"{fn}: global_amax must be finite and positive, got {value}")
    return global_amax.reshape(()).to(device=device, dtype=torch.float32)


def nvfp4_global_scale(global_amax: torch.Tensor) -> torch.Tensor:
    """``weight_scale_2`` for a ``global_amax``: ``global_amax / (6 * 448)`` in fp32."""
    return global_amax.float() / (E2M1_MAX * E4M3_MAX)


def _scaled_blocks(x: torch.Tensor, global_scale: torch.Tensor, block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``x / (block_scale * global_scale)`` as ``[..., C // block_size, block_size]``, and the fp8 block scales."""
    if x.dtype in _FLOAT8:  # torch has no float8 arithmetic; every float8 value is exact in fp32
        x = x.float()
    block_amax = reduce_block_amax(x, {-1: block_size}).float()
    block_scale = block_amax / (E2M1_MAX * global_scale)
    block_scale = torch.where(block_scale == 0, torch.ones_like(block_scale), block_scale)
    block_scale = block_scale.clamp(min=_SCALE_MIN, max=E4M3_MAX).to(torch.float8_e4m3fn)
    blocks = x.reshape(*x.shape[:-1], -1, block_size)
    return blocks / (block_scale.to(torch.float32) * global_scale).unsqueeze(-1), block_scale


def _e2m1_codes(scaled: torch.Tensor) -> torch.Tensor:
    """The 4-bit codes of ``scaled`` as whole numbers in its own float dtype.

    The grid steps by 0.5 below 2, by 1 below 4 and by 2 above: in each range the code
    is ``round(m / step) + offset`` with torch's round-half-even, which is ties-to-even
    on the code. Rounding is monotone, so the smallest of the three candidates is the
    one of the range ``m`` lies in. Only float arithmetic: on the CPU torch's compares
    and ``where`` (bool tensors) cost several times an add.
    """
    magnitude = scaled.abs()
    code = torch.round(magnitude * 2)
    code = torch.minimum(code, torch.round(magnitude).add_(2))
    code = torch.clamp_max(torch.minimum(code, torch.round(magnitude * 0.5).add_(4)), 7)
    # A negative value that rounds to zero keeps its sign (code 8); -0.0 does not.
    code = code.sub_(torch.clamp_max(torch.sign(scaled), 0), alpha=8)
    return code.nan_to_num_(nan=7.0)  # NaN saturates, as a search over the midpoints put it last


def _encode(x: torch.Tensor, global_scale: torch.Tensor, block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Unpacked 4-bit codes (uint8, same shape as ``x``) and fp8 block scales."""
    scaled, block_scale = _scaled_blocks(x, global_scale, block_size)
    return _e2m1_codes(scaled).to(torch.uint8).reshape(x.shape), block_scale


def _encode_packed(x: torch.Tensor, global_scale: torch.Tensor, block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Packed codes ``[..., C // 2]`` and fp8 block scales: the pair is summed before the one cast to bytes."""
    scaled, block_scale = _scaled_blocks(x, global_scale, block_size)
    code = _e2m1_codes(scaled)
    packed = torch.add(code[..., 0::2], code[..., 1::2], alpha=16).to(torch.uint8)
    return packed.reshape(*x.shape[:-1], x.shape[-1] // 2), block_scale


def _decode(code: torch.Tensor, block_scale: torch.Tensor, global_scale: torch.Tensor, block_size: int) -> torch.Tensor:
    table = torch.tensor(_E2M1_VALUES + tuple(-v for v in _E2M1_VALUES), dtype=torch.float32, device=code.device)
    values = table[code.long()].reshape(*code.shape[:-1], -1, block_size)
    return (values * (block_scale.to(torch.float32) * global_scale).unsqueeze(-1)).reshape(code.shape)


@torch.no_grad()
def nvfp4_quantize(x: torch.Tensor, global_amax, block_size: int = 16) -> NVFP4Tensor:
    """Quantize ``x`` to NVFP4 with the per-tensor scale set by ``global_amax``.

    Args:
        x: floating tensor, last dimension a multiple of ``block_size``.
        global_amax: the (shared) per-tensor amax, a positive finite number or 1-element tensor.
        block_size: elements per block scale (16 for NVFP4).

    Returns:
        ``NVFP4Tensor(packed, block_scale, global_scale)``.

    Raises:
        TypeError: ``x`` or ``global_amax`` is not a tensor / number.
        ValueError: an integer ``x``, a last dimension that is not a multiple of the
            block size, or a ``global_amax`` that is not finite and positive.
    """
    _check_input("nvfp4_quantize", x, block_size)
    global_scale = nvfp4_global_scale(_global_amax_tensor("nvfp4_quantize", global_amax, x.device))
    step = max(1, _CHUNK_ELEMENTS // block_size)
    if is_traced(x) or x.numel() <= step * block_size:
        return NVFP4Tensor(*_encode_packed(x, global_scale, block_size), global_scale)
    blocks = x.reshape(-1, block_size)
    packed = torch.empty(blocks.shape[0], block_size // 2, dtype=torch.uint8, device=x.device)
    block_scale = torch.empty(blocks.shape[0], 1, dtype=torch.float8_e4m3fn, device=x.device)
    for start in range(0, blocks.shape[0], step):
        part = slice(start, start + step)
        packed[part], scales = _encode_packed(blocks[part], global_scale, block_size)
        block_scale.view(torch.uint8)[part] = scales.view(torch.uint8)
    shape = x.shape[:-1]
    return NVFP4Tensor(
        packed.reshape(*shape, x.shape[-1] // 2), block_scale.reshape(*shape, x.shape[-1] // block_size), global_scale
    )


@torch.no_grad()
def nvfp4_dequantize(
    packed: torch.Tensor,
    block_scale: torch.Tensor,
    global_scale: torch.Tensor,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Values of a quantized tensor: ``code * block_scale * global_scale``.

    Args:
        packed: uint8 ``[..., C // 2]``.
        block_scale: ``float8_e4m3fn`` ``[..., C // block]`` (any float dtype is accepted).
        global_scale: the per-tensor scale (``weight_scale_2``), one element.
        dtype: the result dtype.

    Returns:
        ``[..., C]`` in ``dtype``.

    Raises:
        TypeError: an argument is not a tensor.
        ValueError: mismatched shapes or a non-uint8 ``packed``.
    """
    for name, value in (("packed", packed), ("block_scale", block_scale), ("global_scale", global_scale)):
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"nvfp4_dequantize: {name} must be a tensor, got {type(value).__name__}")
    if packed.dtype != torch.uint8:
        raise ValueError(f"nvfp4_dequantize: packed must be uint8, got {packed.dtype}")
    columns = 2 * packed.shape[-1] if packed.dim() else 0
    if (
        packed.dim() == 0
        or block_scale.shape[:-1] != packed.shape[:-1]
        or block_scale.shape[-1] == 0
        or columns % block_scale.shape[-1]
    ):
        raise ValueError(
            f"nvfp4_dequantize: block_scale shape {tuple(block_scale.shape)} does not tile packed "
            f"shape {tuple(packed.shape)} ({columns} values per row)"
        )
    if global_scale.numel() != 1:
        raise ValueError(f"nvfp4_dequantize: global_scale must hold one value, got shape {tuple(global_scale.shape)}")
    code = torch.stack([packed & 0x0F, packed >> 4], dim=-1).reshape(*packed.shape[:-1], columns)
    block_size = columns // block_scale.shape[-1]
    return _decode(code, block_scale, global_scale.reshape(()).float(), block_size).to(dtype)


@torch.no_grad()
def nvfp4_fake_quant(x: torch.Tensor, global_amax, block_size: int = 16) -> torch.Tensor:
    """``nvfp4_dequantize(nvfp4_quantize(x, global_amax))`` in ``x``'s dtype, without packing."""
    _check_input("nvfp4_fake_quant", x, block_size)
    global_scale = nvfp4_global_scale(_global_amax_tensor("nvfp4_fake_quant", global_amax, x.device))
    code, block_scale = _encode(x, global_scale, block_size)
    return _decode(code, block_scale, global_scale, block_size).to(x.dtype)
