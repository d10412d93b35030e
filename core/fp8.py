"""FP8 (e4m3) and INT8 per-tensor requantization. Pure: tensors in, new tensors out.

A member moved to its group's larger shared scale ``S`` is requantized from its exact
dequantized values: ``weight * scale`` in float64 is exact (4 significant bits times at
most 24), and the one division by ``S`` in float64 cannot land on a rounding midpoint of
e4m3 or int8 that the exact quotient misses (the operands have under 30 significant
bits), so rounding it once more gives the correctly rounded result. float16, which
vLLM's load-time repair dequantizes through, would round the values first.

Rounding is to nearest, ties to even, and out-of-range values saturate to +-448, as
``values.clamp(-448, 448).to(torch.float8_e4m3fn)`` does. The clamp is explicit because
what the bare cast does past 448 is not something to rely on (torch 2.13 on CPU saturates,
even infinity; e4m3fn has no infinity, and other kernels give NaN). torch converts
float64 to float8 through float32, which can double-round, so the e4m3 grid is rounded
here in float64 and the cast only stores values already on it.
"""

from __future__ import annotations

import torch

__all__ = ["E4M3_MAX", "fp8_quantize", "fp8_requantize", "int8_requantize", "round_to_e4m3"]

E4M3_MAX = 448.0
_E4M3_MIN_EXPONENT = -6  # below 2**-6 e4m3fn is subnormal: a fixed step of 2**-9
_E4M3_MANTISSA_BITS = 3
# Elements requantized at once: float64 scratch of a huge member stays bounded.
_CHUNK_ELEMENTS = 1 << 20


def round_to_e4m3(values: torch.Tensor) -> torch.Tensor:
    """``values`` rounded to float8_e4m3fn: to nearest, ties to even, saturating at +-448.

    Args:
        values: finite values (any float dtype; computed in float64).

    Returns:
        A float8_e4m3fn tensor of the same shape.
    """
    values = values.to(torch.float64).clamp(-E4M3_MAX, E4M3_MAX)
    _, exponent = torch.frexp(values)  # |v| = m * 2**exponent, 0.5 <= m < 1
    exponent = torch.clamp(exponent - 1, min=_E4M3_MIN_EXPONENT)
    step = torch.ldexp(torch.ones_like(values), (exponent - _E4M3_MANTISSA_BITS).to(torch.float64))
    return (torch.round(values / step) * step).to(torch.float8_e4m3fn)  # exact: every value is on the grid


def fp8_quantize(values: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """float8_e4m3fn codes of ``values / scale`` (float64 division, then ``round_to_e4m3``)."""
    return round_to_e4m3(values.to(torch.float64) / scale.reshape(()).to(torch.float64))


def _requantize(weight: torch.Tensor, scale: torch.Tensor, shared: torch.Tensor, store) -> torch.Tensor:
    scale64 = scale.reshape(()).to(torch.float64)
    shared64 = shared.reshape(()).to(torch.float64)
    if not (torch.isfinite(shared64) and shared64 > 0):
        raise ValueError(f"requantize: the shared scale {shared64.item()!r} is not a finite positive number")
    flat, out = weight.reshape(-1), torch.empty(weight.numel(), dtype=weight.dtype)
    for start in range(0, flat.numel(), _CHUNK_ELEMENTS):
        chunk = slice(start, start + _CHUNK_ELEMENTS)
        values = flat[chunk].to(torch.float64) * scale64
        if not torch.isfinite(values).all():
            raise ValueError("requantize: the member's dequantized weights are not finite (a NaN weight?)")
        out[chunk] = store(values / shared64)
    return out.reshape(weight.shape)


def fp8_requantize(weight: torch.Tensor, scale: torch.Tensor, shared: torch.Tensor) -> torch.Tensor:
    """float8_e4m3fn ``weight`` with per-tensor ``scale``, quantized again with ``shared``.

    Args:
        weight: float8_e4m3fn values; dequantized as ``weight * scale``.
        scale: the member's own scale (one value, any float dtype).
        shared: the group's scale (one value).

    Returns:
        float8_e4m3fn values of ``weight``'s shape.

    Raises:
        ValueError: ``shared`` is not finite and positive, or a value is not finite.
    """
    return _requantize(weight, scale, shared, round_to_e4m3)


def int8_requantize(weight: torch.Tensor, scale: torch.Tensor, shared: torch.Tensor) -> torch.Tensor:
    """Symmetric int8 ``weight`` with per-tensor ``scale``, quantized again with ``shared``
    (ties to even, clamped to [-128, 127])."""
    return _requantize(weight, scale, shared, lambda q: torch.round(q).clamp(-128, 127).to(torch.int8))
