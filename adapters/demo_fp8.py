"""The FP8 part of ``sharedquant demo``: per-tensor FP8 as the tools ship it, and three ways to use it.

nvidia-modelopt's and llm-compressor's FP8 exports give each of q/k/v and gate/up its own
``weight_scale``. vLLM repairs this at every load (``requantize_with_max_scale``): it
dequantizes each member in float16 (``weight.to(float16) * weight_scale``), divides by the
group's max scale in float32, clamps to +-448 and casts to float8. ``sharedquant reconcile``
does the same requantization once, offline, from exact values. What it mutates: nothing
but a dict it builds; the files are written by ``demo.run_demo``.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from sharedquant.core.fp8 import E4M3_MAX, fp8_quantize
from sharedquant.core.reduce import reduce_amax

__all__ = ["codes_unlike_vllm", "fp8_member_errors", "quantize_unshared_fp8", "vllm_requantize_with_max_scale"]


@torch.no_grad()
def quantize_unshared_fp8(
    model: nn.Module, input_amax: Mapping[str, torch.Tensor], is_quantized
) -> dict[str, torch.Tensor]:
    """A modelopt-style FP8 state dict in which every linear layer has its OWN weight scale (``amax / 448``).

    Args:
        model: the float model.
        input_amax: quantized linear's name -> the amax of its input over calibration.
        is_quantized: ``(name, module) -> bool``, the layers to quantize.
    """
    state = {key: value.detach().clone() for key, value in model.state_dict().items()}
    for name, module in model.named_modules():
        if is_quantized(name, module):
            scale = (reduce_amax(module.weight).float() / E4M3_MAX).reshape(())
            state[f"{name}.weight"] = fp8_quantize(module.weight.detach(), scale)
            state[f"{name}.weight_scale"] = scale
            state[f"{name}.input_scale"] = (input_amax[name].float() / E4M3_MAX).reshape(())
    return state


def vllm_requantize_with_max_scale(weight: torch.Tensor, scale: torch.Tensor, max_scale: torch.Tensor) -> torch.Tensor:
    """vLLM's load-time repair of one member: dequantize in float16, quantize with the group's max in float32."""
    dequantized = weight.to(torch.float16) * scale.reshape(()).to(torch.float32)  # stays float16: a 0-dim operand
    return (dequantized.float() / max_scale.reshape(()).float()).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)


def fp8_member_errors(
    float_weight: torch.Tensor, exported: Mapping[str, torch.Tensor], reconciled: Mapping[str, torch.Tensor], fqn: str
) -> dict[str, float]:
    """Relative L2 error of one member's dequantized weight against its float weight, four ways.

    Returns:
        ``exported`` (its own scale), ``reconciled`` (offline, exact), ``vllm load`` (vLLM's
        float16 repair at load) and ``engine max`` (the max scale with the codes kept).
    """
    weight, own = exported[f"{fqn}.weight"], exported[f"{fqn}.weight_scale"]
    shared = reconciled[f"{fqn}.weight_scale"]
    candidates = {
        "exported": weight.double() * own.double(),
        "reconciled": reconciled[f"{fqn}.weight"].double() * shared.double(),
        "vllm load": vllm_requantize_with_max_scale(weight, own, shared).double() * shared.double(),
        "engine max": weight.double() * shared.double(),
    }
    reference = float_weight.double()
    return {name: ((values - reference).norm() / reference.norm()).item() for name, values in candidates.items()}


def codes_unlike_vllm(exported: Mapping[str, torch.Tensor], reconciled: Mapping[str, torch.Tensor], fqn: str) -> int:
    """How many of a member's reconciled float8 codes differ from those vLLM's float16 repair computes."""
    weight, own, shared = exported[f"{fqn}.weight"], exported[f"{fqn}.weight_scale"], reconciled[f"{fqn}.weight_scale"]
    vllm = vllm_requantize_with_max_scale(weight, own, shared)
    return int((vllm.view(torch.uint8) != reconciled[f"{fqn}.weight"].view(torch.uint8)).sum())
