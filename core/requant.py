"""Requantizing NVFP4 codes to another per-tensor scale, over bytes. Pure functions of tensors.

Within a member, a block's new scale byte and each of its new codes depend only on its
old scale byte, its largest code magnitude and the two per-tensor scales. So the new
values for every (scale byte, largest magnitude, code) are computed once per member by
the reference itself (``nvfp4_dequantize`` then ``nvfp4_quantize``, on a tensor of
two-element blocks, one per combination) and every block of the member is then
rewritten by table lookups: bit-identical to the reference by construction, in a few
byte-wide passes instead of some twenty float passes. Only torch ops: the same code
runs on a CUDA member, with the tables built on its device.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from .nvfp4 import nvfp4_dequantize, nvfp4_quantize

__all__ = ["RequantTables", "is_byte_layout", "requant_tables", "requantize_blocks"]

_KEYS = 256 * 8  # (old block-scale byte, largest code magnitude), as byte * 8 + magnitude
# Packed bytes rewritten per step: the int32 lookup index (4 bytes a byte) stays in L2,
# and a huge member's scratch memory stays bounded.
_CHUNK_BYTES = 1 << 18


class RequantTables(NamedTuple):
    """One member's lookups, indexed by ``key = old scale byte * 8 + largest code magnitude``."""

    scale: torch.Tensor  # uint8 [2048]: the new block-scale byte
    pairs: torch.Tensor  # uint8 [2048 * 256]: the new packed byte at key * 256 + old byte
    finite: torch.Tensor  # bool [2048]: whether such a block dequantizes to finite values


def is_byte_layout(packed: torch.Tensor, block_scale: torch.Tensor) -> bool:
    """Whether the lookups apply: uint8 codes, float8_e4m3fn scales that tile them, blocks of whole bytes."""
    if packed.dtype != torch.uint8 or block_scale.dtype != torch.float8_e4m3fn or packed.device != block_scale.device:
        return False
    if packed.dim() == 0 or packed.shape[:-1] != block_scale.shape[:-1] or block_scale.shape[-1] == 0:
        return False
    columns = 2 * packed.shape[-1]
    return columns % block_scale.shape[-1] == 0 and (columns // block_scale.shape[-1]) % 2 == 0


def requant_tables(scale_2: torch.Tensor, global_amax: torch.Tensor, device: torch.device) -> RequantTables:
    """The lookups that take codes quantized with ``scale_2`` to codes quantized with ``global_amax``.

    Raises:
        ValueError: ``scale_2`` does not hold one value, or ``global_amax`` is not finite
            and positive (as the reference raises them).
    """
    # One two-element block per (scale byte, largest magnitude, code): the code beside the
    # block's largest magnitude. Where |code| > largest the row is never looked up; where
    # |code| <= largest the block's amax, hence its new scale, is that of any real block
    # with this key.
    byte = torch.arange(256, device=device, dtype=torch.uint8)
    largest, code = byte[:8].view(1, 8, 1), byte[:16].view(1, 1, 16)
    packed = (code | (largest << 4)).expand(256, 8, 16).reshape(-1, 1)
    scale_byte = byte.view(256, 1, 1).expand(256, 8, 16).reshape(-1, 1).view(torch.float8_e4m3fn)
    values = nvfp4_dequantize(packed, scale_byte, scale_2)
    finite = torch.isfinite(values[:, 1]).view(_KEYS, 16)[:, 0]
    quantized = nvfp4_quantize(values, global_amax, block_size=2)
    new_scale = quantized.block_scale.view(torch.uint8).view(_KEYS, 16)[:, 0].contiguous()
    new_code = quantized.packed.view(_KEYS, 16) & 0x0F
    # [key, high nibble, low nibble]; whole-row copies, as torch broadcasts bytes slowly on the CPU
    pairs = new_code.repeat(1, 16) | (new_code.repeat_interleave(16, dim=1) << 4)
    return RequantTables(new_scale, pairs.reshape(-1), finite)


def requantize_blocks(
    packed: torch.Tensor, block_scale: torch.Tensor, tables: RequantTables
) -> tuple[torch.Tensor, torch.Tensor]:
    """Codes and block scales rewritten through ``tables``, same shapes and dtypes.

    Args:
        packed: uint8 ``[..., C // 2]`` (see ``is_byte_layout``).
        block_scale: float8_e4m3fn ``[..., C // block]``.
        tables: from ``requant_tables`` for this member's scales.

    Raises:
        ValueError: a block dequantizes to a non-finite value (a NaN block scale, or a
            per-tensor scale that overflows); nothing is returned then.
    """
    blocks = packed.reshape(block_scale.numel(), -1)
    scale_bytes = block_scale.reshape(-1).view(torch.uint8)
    out_packed, out_scale = torch.empty_like(blocks), torch.empty_like(scale_bytes)
    step = max(1, _CHUNK_BYTES // blocks.shape[1])
    finite = torch.ones((), dtype=torch.bool, device=packed.device)
    for start in range(0, blocks.shape[0], step):
        part = slice(start, start + step)
        old = blocks[part]
        largest = torch.maximum((old & 0x07).amax(-1), (old & 0x70).amax(-1) >> 4)
        key = scale_bytes[part].to(torch.int32) * 8 + largest  # int32: no wide int64 index
        finite &= tables.finite.index_select(0, key).all()  # checked once at the end: no sync per step
        out_scale[part] = tables.scale.index_select(0, key)
        index = old.to(torch.int32).add_((key * 256).unsqueeze(-1))  # widen first: mixed-dtype adds are slow
        out_packed[part] = tables.pairs.index_select(0, index.reshape(-1)).view(old.shape)
    if not bool(finite):
        raise ValueError("requantize: the member's dequantized weights are not finite (a NaN block scale?)")
    return out_packed.reshape(packed.shape), out_scale.view(torch.float8_e4m3fn).reshape(block_scale.shape)
