"""The NVFP4 checkpoint formats: modelopt's HF export, compressed-tensors' ``nvfp4-pack-quantized``,
and modelopt-style calibration state. Pure.

* ``modelopt``: ``<m>.weight`` (uint8, two codes per byte), ``<m>.weight_scale`` (float8_e4m3fn
  per block), ``<m>.weight_scale_2`` (``global_amax / 2688``) and ``<m>.input_scale``.
* ``compressed-tensors``: ``<m>.weight_packed``, ``<m>.weight_scale``, ``<m>.weight_global_scale``
  (``1 / weight_scale_2``) and ``<m>.input_global_scale`` (``1 / input_scale``): a reciprocal
  scale is coarser when it is *smaller*, so the group's shared value is its minimum.
* ``quantizer-state``: ``<m>.weight_quantizer._amax`` (per-tensor or per-block) and, once
  promoted, ``<m>.weight_quantizer._global_amax``. The scale *is* the global amax.

Both packed layouts store the even element of each pair in the low nibble and dequantize as
``code * weight_scale * weight_scale_2``, which is what ``core.nvfp4`` computes.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from .. import reconcile  # module, not name: reconcile imports formats' types, so bind at call time
from ..nvfp4 import nvfp4_global_scale
from .base import Format, join_key, tensor_meta

__all__ = ["CompressedTensorsNVFP4", "ModeloptNVFP4", "NVFP4Format", "QuantizerState", "block_size"]


def block_size(fqn: str, packed_shape, block_scale_shape) -> int:
    """Elements per block scale of member ``fqn``, from the shapes of its packed codes and block scales.

    Raises:
        ValueError: the shapes do not tile (different leading dimensions, or a row of
            codes that is not a whole number of blocks).
    """
    packed_shape, block_scale_shape = tuple(packed_shape), tuple(block_scale_shape)
    columns = 2 * packed_shape[-1] if packed_shape else 0
    blocks = block_scale_shape[-1] if block_scale_shape else 0
    if (
        len(packed_shape) != len(block_scale_shape)
        or packed_shape[:-1] != block_scale_shape[:-1]
        or not columns
        or not blocks
        or columns % blocks
    ):
        raise ValueError(
            f"block_size: {fqn!r} has packed codes of shape {list(packed_shape)} and block scales of "
            f"shape {list(block_scale_shape)}; expected the same leading dimensions and "
            f"{columns} values per row split into whole blocks"
        )
    return columns // blocks


class NVFP4Format(Format):
    """Packed NVFP4 codes, float8 block scales and one per-tensor scale per member."""

    __slots__ = ()

    def dtypes(self) -> dict[str, frozenset[str]]:
        return {**Format.dtypes(self), "packed": frozenset({"U8"}), "block_scale": frozenset({"F8_E4M3"})}

    def block_size(self, fqn: str, header: Mapping[str, Any]) -> int | None:
        packed = tensor_meta(header.get(join_key(fqn, self.packed)))
        blocks = tensor_meta(header.get(join_key(fqn, self.block_scale)))
        return None if packed is None or blocks is None else block_size(fqn, packed[1], blocks[1])

    def weight_scale_2(self, scale: torch.Tensor) -> torch.Tensor:
        value = scale.reshape(()).to(torch.float32)
        return torch.reciprocal(value) if self.reciprocal else value

    def requantize(
        self, tensors: Mapping[str, torch.Tensor], shared: torch.Tensor
    ) -> tuple[dict[str, torch.Tensor], bool]:
        quantized, exact = reconcile.requantize(
            tensors["packed"], tensors["block_scale"], self.weight_scale_2(tensors["scale"]), self.weight_scale_2(shared)
        )
        return {"packed": quantized.packed, "block_scale": quantized.block_scale, "scale": shared}, exact


class ModeloptNVFP4(NVFP4Format):
    """modelopt's NVFP4 export: ``weight_scale_2`` names it; a uint8 ``weight`` beside float8 block
    scales names it too, so a member that lost its ``weight_scale_2`` is refused, not dropped."""

    __slots__ = ()

    def claims(self, entries, family) -> bool:
        if self.scale in entries:
            return True
        blocks = entries.get(self.block_scale)
        return blocks is not None and blocks[0] == "F8_E4M3" and self.packed in entries


class CompressedTensorsNVFP4(NVFP4Format):
    """compressed-tensors' ``nvfp4-pack-quantized``: ``weight_global_scale``, or a uint8
    ``weight_packed`` beside float8 block scales."""

    __slots__ = ()

    def claims(self, entries, family) -> bool:
        if self.scale in entries or self.input_scale in entries:
            return True
        packed, blocks = entries.get(self.packed), entries.get(self.block_scale)
        # int4/int8 pack-quantized packs into int32; MXFP4 keeps uint8 exponents: neither is NVFP4
        return self.packed in entries and (packed is None or packed[0] == "U8") and (blocks is None or blocks[0] == "F8_E4M3")


class QuantizerState(Format):
    """Calibration state: the per-tensor scale is the global amax itself; nothing is packed."""

    __slots__ = ()

    def claims(self, entries, family) -> bool:
        return self.scale in entries or self.fallback in entries

    def weight_scale_2(self, scale: torch.Tensor) -> torch.Tensor:
        return nvfp4_global_scale(scale.reshape(()).to(torch.float32))
