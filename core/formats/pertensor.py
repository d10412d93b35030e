"""FP8 and INT8 checkpoint formats with one weight scale per tensor (or per channel). Pure.

* ``modelopt-fp8``: nvidia-modelopt's HF export of ``FP8_DEFAULT_CFG``: ``<m>.weight``
  (float8_e4m3fn), ``<m>.weight_scale`` and ``<m>.input_scale`` (fp32, shape ``()``).
* ``compressed-tensors-fp8``: llm-compressor's ``float-quantized`` save: the same names,
  scales of shape ``(1,)``.
* ``compressed-tensors-int8``: ``int-quantized``, symmetric: ``<m>.weight`` int8.
* ``fp8-per-channel`` / ``int8-per-channel``: a weight scale per output row (or block), and
  ``fp8-block``: DeepSeek-style ``<m>.weight_scale_inv`` per 128x128 block. Each row or
  block keeps its own scale when siblings are fused, so there is nothing to share: such
  members are recognised and left alone.

A float8_e4m3fn weight makes its module a member even without a scale, so a member that
lost its ``weight_scale`` is refused by name instead of silently leaving its group.

The weight dequantizes as ``weight * weight_scale``: a larger scale is coarser, so the group
shares its maximum. Which tool wrote a per-tensor file is read from the config when there is
one (``quantization_config.quant_method``), else from the scale's shape.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from ..fp8 import fp8_requantize, int8_requantize
from .base import FLOATS, Format

__all__ = ["FP8Format", "INT8Format", "PerChannel"]


_BLOCK_SCALE = "weight_scale_inv"


def _scale_numel(entries, key: str = "weight_scale") -> int | None:
    meta = entries.get(key)
    return None if meta is None else int(torch.Size(meta[1]).numel())


def _weight_dtype(entries) -> str | None:
    meta = entries.get("weight")
    return None if meta is None else meta[0]


def _family_of(entries, family: str | None) -> str:
    """The tool by config, else by scale shape: modelopt stores ``()``, compressed-tensors ``(1,)``."""
    if family:
        return family
    meta = entries.get("weight_scale")
    return "compressed-tensors" if meta is not None and len(meta[1]) == 1 else "modelopt"


class FP8Format(Format):
    """float8_e4m3fn weights with one fp32 (or other float) weight scale per tensor."""

    __slots__ = ()

    def dtypes(self) -> dict[str, frozenset[str]]:
        return {**Format.dtypes(self), "packed": frozenset({"F8_E4M3"})}

    def claims(self, entries, family) -> bool:
        fp8_weight = _weight_dtype(entries) == "F8_E4M3"
        if _BLOCK_SCALE in entries or not (self.scale in entries or fp8_weight):
            return False
        if "weight_scale_2" in entries or "weight_packed" in entries or _weight_dtype(entries) in ("U8", "I8"):
            return False
        if not fp8_weight and entries.get(self.scale) is not None and entries[self.scale][0] not in FLOATS:
            return False  # no float8 weight to vouch for it and a scale no per-tensor FP8 layout has
        return _scale_numel(entries) in (None, 1) and _family_of(entries, family) == self.family

    def requantize(
        self, tensors: Mapping[str, torch.Tensor], shared: torch.Tensor
    ) -> tuple[dict[str, torch.Tensor], bool]:
        return {"packed": self.requantize_codes(tensors["packed"], tensors["scale"], shared), "scale": shared}, True

    @staticmethod
    def requantize_codes(weight: torch.Tensor, scale: torch.Tensor, shared: torch.Tensor) -> torch.Tensor:
        """The weight's codes quantized again with ``shared`` (exactly; see ``core.fp8``)."""
        return fp8_requantize(weight, scale, shared)


class INT8Format(FP8Format):
    """compressed-tensors ``int-quantized``, symmetric: int8 weights, one float weight scale per tensor."""

    __slots__ = ()

    def dtypes(self) -> dict[str, frozenset[str]]:
        return {**Format.dtypes(self), "packed": frozenset({"I8"})}

    def claims(self, entries, family) -> bool:
        return _weight_dtype(entries) == "I8" and self.scale in entries and _scale_numel(entries) in (None, 1)

    def check_member(self, fqn: str, header) -> None:
        Format.check_member(self, fqn, header)
        zero_point = f"{fqn}.weight_zero_point" if fqn else "weight_zero_point"
        if zero_point in header:
            raise ValueError(f"{zero_point!r}: asymmetric INT8 (with a zero point) is not supported")

    @staticmethod
    def requantize_codes(weight: torch.Tensor, scale: torch.Tensor, shared: torch.Tensor) -> torch.Tensor:
        return int8_requantize(weight, scale, shared)


class PerChannel(Format):
    """FP8 or INT8 weights with a scale per output row (or block): nothing for siblings to share."""

    __slots__ = ()

    def dtypes(self) -> dict[str, frozenset[str]]:
        packed = "F8_E4M3" if self.kind == "FP8" else "I8"
        return {**Format.dtypes(self), "packed": frozenset({packed})}

    def claims(self, entries, family) -> bool:
        packed = "F8_E4M3" if self.kind == "FP8" else "I8"
        numel = _scale_numel(entries, self.scale)
        scale = entries.get(self.scale)
        is_float = scale is not None and scale[0] in FLOATS
        return _weight_dtype(entries) == packed and numel is not None and numel > 1 and is_float

    def check_member(self, fqn: str, header) -> None:
        """Nothing is shared or rewritten, so nothing beyond recognition is required."""
