"""NVFP4 checkpoint formats, recognised from state-dict keys. Pure: names and shapes in, descriptions out.

Three layouts carry a per-tensor NVFP4 scale for each quantized module ``<m>``:

* ``quantizer-state``: calibration state as modelopt-style quantizers save it,
  ``<m>.weight_quantizer._amax`` (per-tensor or per-block) and, once promoted,
  ``<m>.weight_quantizer._global_amax``. The scale *is* the global amax; nothing is packed.
* ``modelopt``: the HF NVFP4 export of nvidia-modelopt, ``<m>.weight`` (uint8, two codes
  per byte), ``<m>.weight_scale`` (float8_e4m3fn per block), ``<m>.weight_scale_2``
  (fp32, ``global_amax / 2688``) and ``<m>.input_scale``.
* ``compressed-tensors``: ``<m>.weight_packed``, ``<m>.weight_scale``,
  ``<m>.weight_global_scale`` (``1 / weight_scale_2``) and ``<m>.input_global_scale``
  (``1 / input_scale``). A reciprocal scale is coarser when it is *smaller*, so the
  group's shared value is its minimum.

Both packed layouts store the even element of each pair in the low nibble and dequantize
as ``code * weight_scale * weight_scale_2``, which is what ``core.nvfp4`` computes.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from .groups import DEFAULT_PATTERNS, MLA_PATTERN

__all__ = [
    "COMPRESSED_TENSORS",
    "DEFAULT_PATTERNS",
    "FORMATS",
    "MLA_PATTERN",
    "MODELOPT",
    "QUANTIZER_STATE",
    "Format",
    "block_size",
    "detect_format",
    "find_members",
]

# DEFAULT_PATTERNS and MLA_PATTERN live in core.groups (the one documented list); re-exported here.


@dataclass(frozen=True, slots=True)
class Format:
    """Where one layout keeps a member's scales, as suffixes after ``<m>.``.

    Attributes:
        name: short name shown to users.
        scale: the per-tensor scale every member of a fused group must share.
        fallback: a key that identifies a member and gives its scale (as its abs-max)
            when ``scale`` is absent; only calibration state has one (``_amax``).
        packed: the uint8 codes (``None``: nothing to requantize).
        block_scale: the float8 per-block scales.
        input_scale: the per-tensor activation scale, unified with the weight scale.
        reciprocal: the stored scales are ``1 / weight_scale_2``: the shared value is the minimum.
    """

    name: str
    scale: str
    fallback: str | None = None
    packed: str | None = None
    block_scale: str | None = None
    input_scale: str | None = None
    reciprocal: bool = False

    @property
    def identifying(self) -> tuple[str, ...]:
        """Suffixes whose presence makes ``<m>`` a member."""
        return (self.scale,) if self.fallback is None else (self.scale, self.fallback)


QUANTIZER_STATE = Format(
    name="quantizer-state",
    scale="weight_quantizer._global_amax",
    fallback="weight_quantizer._amax",
)
MODELOPT = Format(
    name="modelopt",
    scale="weight_scale_2",
    packed="weight",
    block_scale="weight_scale",
    input_scale="input_scale",
)
COMPRESSED_TENSORS = Format(
    name="compressed-tensors",
    scale="weight_global_scale",
    packed="weight_packed",
    block_scale="weight_scale",
    input_scale="input_global_scale",
    reciprocal=True,
)
FORMATS: tuple[Format, ...] = (QUANTIZER_STATE, MODELOPT, COMPRESSED_TENSORS)


def _member_of(key: str, suffixes: tuple[str, ...]) -> str | None:
    """The module a key belongs to when it ends in one of ``suffixes`` (``""``: the root)."""
    for suffix in suffixes:
        if key == suffix:
            return ""
        if key.endswith(suffix) and key[-len(suffix) - 1] == ".":
            return key[: -len(suffix) - 1]
    return None


def detect_format(keys: Iterable[str]) -> Format:
    """The one format whose scale keys appear among ``keys``.

    Raises:
        ValueError: no known format, or keys of two formats (the message names an
            example key of each).
    """
    found: dict[str, str] = {}
    candidates = [(fmt.name, fmt.identifying) for fmt in FORMATS]
    for key in keys:
        for name, suffixes in candidates:
            # endswith on a tuple is one C call: a quick filter before the exact check
            if key.endswith(suffixes) and name not in found and _member_of(key, suffixes) is not None:
                found[name] = key
    if not found:
        expected = ", ".join(f"'*.{fmt.scale}'" for fmt in FORMATS)
        raise ValueError(f"detect_format: no key of a known NVFP4 format; expected keys ending in {expected}")
    if len(found) > 1:
        listing = ", ".join(f"{name} (e.g. {key!r})" for name, key in found.items())
        raise ValueError(f"detect_format: keys of more than one NVFP4 format: {listing}")
    (name,) = found
    return next(fmt for fmt in FORMATS if fmt.name == name)


def find_members(keys: Iterable[str], fmt: Format) -> tuple[str, ...]:
    """FQNs of the modules that carry ``fmt``'s scale, in key order, each once."""
    members: dict[str, None] = {}
    suffixes = fmt.identifying
    for key in keys:
        if key.endswith(suffixes):
            fqn = _member_of(key, suffixes)
            if fqn is not None:
                members.setdefault(fqn, None)
    return tuple(members)


def block_size(fqn: str, packed_shape: Sequence[int], block_scale_shape: Sequence[int]) -> int:
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
