"""The checkpoint-format base class: where a member's tensors live and which dtypes they must have.

Pure: names, header dtypes and shapes in, descriptions and checks out. Each concrete format
(``nvfp4.py``, ``pertensor.py``) subclasses ``Format`` and says how it is recognised
(``claims``), how its scales compare (``shared``) and how a member is requantized.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

__all__ = ["FLOATS", "Format", "join_key", "tensor_meta"]

FLOATS = frozenset({"F64", "F32", "F16", "BF16"})
"""safetensors dtype names a per-tensor scale may be stored in."""

# Role -> what the user reads in an error message.
_ROLE_WORDS = {
    "packed": "quantized weight",
    "block_scale": "block scale",
    "scale": "per-tensor weight scale",
    "fallback": "calibration amax",
    "input_scale": "per-tensor input scale",
}


def join_key(fqn: str, suffix: str) -> str:
    """``<fqn>.<suffix>``, or ``suffix`` alone at the root."""
    return f"{fqn}.{suffix}" if fqn else suffix


def tensor_meta(entry: Any) -> tuple[str, tuple[int, ...]] | None:
    """``(safetensors dtype name, shape)`` of a header entry; ``None`` when only the name is known."""
    dtype, shape = getattr(entry, "dtype", None), getattr(entry, "shape", None)
    return None if dtype is None or shape is None else (str(dtype), tuple(shape))


@dataclass(frozen=True, slots=True)
class Format:
    """Where one layout keeps a member's tensors, as suffixes after ``<m>.``; subclasses add behaviour.

    Attributes:
        name: short name shown to users.
        scale: the per-tensor weight scale every member of a fused group must share.
        fallback: a key that identifies a member and gives its scale (as its abs-max)
            when ``scale`` is absent; only calibration state has one (``_amax``).
        packed: the quantized weight (NVFP4 uint8 pairs, float8 or int8 values); ``None``:
            nothing to requantize.
        block_scale: the float8 per-block scales (NVFP4 only).
        input_scale: the per-tensor activation scale, unified with the weight scale.
        reciprocal: the stored scales are reciprocals of the dequantization scale: the
            shared value is the minimum.
        kind: the number format in words (``NVFP4``, ``FP8``, ``INT8``).
        per_tensor: one weight scale per tensor; ``False`` (per-channel scales) leaves
            nothing for fused siblings to share.
        family: the tool whose layout this is (``modelopt``, ``compressed-tensors``).
    """

    name: str
    scale: str
    fallback: str | None = None
    packed: str | None = None
    block_scale: str | None = None
    input_scale: str | None = None
    reciprocal: bool = False
    kind: str = "NVFP4"
    per_tensor: bool = True
    family: str = ""

    @property
    def identifying(self) -> tuple[str, ...]:
        """Suffixes whose presence makes ``<m>`` a member when only names are known."""
        return (self.scale,) if self.fallback is None else (self.scale, self.fallback)

    @property
    def requantizes(self) -> bool:
        """Whether a member whose scale changes has weights to requantize (else only its scale is set)."""
        return self.packed is not None

    @property
    def required(self) -> tuple[str, ...]:
        """Roles every member must carry (``input_scale`` is optional: dynamic activations have none)."""
        return tuple(role for role in ("packed", "block_scale", "scale") if getattr(self, role) is not None)

    def dtypes(self) -> dict[str, frozenset[str]]:
        """Role -> the safetensors dtypes it may be stored in."""
        return {"scale": FLOATS, "input_scale": FLOATS, "fallback": FLOATS}

    def claims(self, entries: Mapping[str, tuple[str, tuple[int, ...]] | None], family: str | None) -> bool:
        """Whether a module holding these suffixes (-> header dtype and shape, or ``None``) is of this format.

        By default: every required role is present, in a dtype its role allows where the
        header says. Formats that share key names with another narrow this (by dtype or
        ``family``); formats that must claim incomplete members, to refuse them by name, widen it.
        """
        allowed = self.dtypes()
        for role in self.required:
            suffix = getattr(self, role)
            if suffix not in entries:
                return False
            meta, dtypes = entries[suffix], allowed.get(role)
            if meta is not None and dtypes is not None and meta[0] not in dtypes:
                return False
        return True

    def shared(self, values: Sequence[float]) -> float:
        """The coarsest of ``values``: the largest, or the smallest for reciprocal scales."""
        return min(values) if self.reciprocal else max(values)

    def block_size(self, fqn: str, header: Mapping[str, Any]) -> int | None:
        """Elements per block scale of member ``fqn`` (``None``: the format has no block scales)."""
        return None

    def check_member(self, fqn: str, header: Mapping[str, Any]) -> None:
        """Refuse a member that lacks a tensor its format needs, or holds one in the wrong dtype or shape.

        Args:
            fqn: the member.
            header: key -> header entry (with ``dtype`` name and ``shape``); entries without
                them are checked for presence only.

        Raises:
            ValueError: naming the member's missing key, or the tensor and its dtype or shape.
        """
        for role in self.required:
            key = join_key(fqn, getattr(self, role))
            if key not in header and not (role == "scale" and self.fallback and join_key(fqn, self.fallback) in header):
                needs = ", ".join(getattr(self, r) for r in self.required)
                raise ValueError(f"{fqn!r} lacks {key!r}: a {self.name} member needs {needs}")
        allowed = self.dtypes()
        for role in (*self.required, "input_scale", "fallback"):
            suffix = getattr(self, role)
            meta = tensor_meta(header.get(join_key(fqn, suffix))) if suffix else None
            if meta is None:
                continue
            key, (dtype, shape) = join_key(fqn, suffix), meta
            if dtype not in allowed[role]:
                expected = " or ".join(sorted(allowed[role]))
                raise ValueError(f"{key!r} is {dtype}; a {self.name} {_ROLE_WORDS[role]} must be {expected}")
            if role in ("scale", "input_scale") and math.prod(shape) != 1:
                raise ValueError(f"{key!r} has shape {list(shape)}; a per-tensor scale holds one value")

    def weight_scale_2(self, scale: torch.Tensor) -> torch.Tensor:
        """A stored per-tensor scale as NVFP4 ``weight_scale_2`` (fp32, 0-dim)."""
        raise TypeError(f"{self.name}: a {self.kind} scale has no NVFP4 weight_scale_2")

    def requantize(
        self, tensors: Mapping[str, torch.Tensor], shared: torch.Tensor
    ) -> tuple[dict[str, torch.Tensor], bool]:
        """A member's tensors (role -> tensor) moved to the ``shared`` scale (stored dtype and shape).

        Returns:
            ``(role -> new tensor, exact)``: same shapes and dtypes; ``exact`` is whether the
            weights were quantized with exactly ``shared``.
        """
        raise TypeError(f"{self.name}: nothing to requantize; only the scale is set")
