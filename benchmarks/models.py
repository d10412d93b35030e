"""The benchmark's models: the same MoE tree quantized by sharedquant and by the peer.

Shapes are tiny (hidden 16) so that the cost measured is the lifecycle's own, per
member and per module, not matrix work: that is where the peer's time goes on real
models too (about 45 us per member per step, linear in members).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import nn

from sharedquant.adapters import QuantLinear, replace_quant_module
from sharedquant.adapters.models import TinyCausalLM, TinyConfig
from sharedquant.core import reduce_block_amax


@dataclass(frozen=True)
class Size:
    """A model size: ``layers`` decoder layers with ``experts`` experts each."""

    layers: int
    experts: int

    @property
    def members(self) -> int:
        """Grouped members: q/k/v per layer plus w1/w3 per expert."""
        return self.layers * (3 + 2 * self.experts)

    @property
    def groups(self) -> int:
        return self.layers * (1 + self.experts)

    def config(self) -> TinyConfig:
        return TinyConfig(
            hidden_size=16, intermediate_size=16, num_layers=self.layers, num_heads=1, num_kv_heads=1, num_experts=self.experts
        )


def _weight_amax(weight: torch.Tensor) -> torch.Tensor:
    return reduce_block_amax(weight, {-1: 16}).reshape(-1, 1).float()


def ours(size: Size, seed: int = 0) -> nn.Module:
    """A calibrated-weights sharedquant model (per-block ``_amax`` set, nothing shared yet)."""
    torch.manual_seed(seed)
    model = replace_quant_module(TinyCausalLM(size.config()))
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, QuantLinear):
                module.weight_quantizer.amax = _weight_amax(module.weight)
    return model


def peer_available() -> bool:
    try:
        import modelopt.torch.quantization  # noqa: F401
    except Exception:  # the peer is optional: any import failure means "not here"
        return False
    return True


def peer(size: Size, seed: int = 0) -> nn.Module:
    """The same model converted by nvidia-modelopt, static NVFP4 weights, same ``_amax`` values."""
    import modelopt.torch.quantization as mtq
    from modelopt.torch.quantization.conversion import replace_quant_module as peer_replace
    from modelopt.torch.quantization.conversion import set_quantizer_by_cfg

    config = copy.deepcopy(mtq.NVFP4_DEFAULT_CFG)
    for entry in config["quant_cfg"]:
        cfg = entry.get("cfg") if isinstance(entry, dict) else None
        if isinstance(cfg, dict) and "weight_quantizer" in str(entry.get("quantizer_name")):
            cfg["block_sizes"]["type"] = "static"
    torch.manual_seed(seed)
    model = TinyCausalLM(size.config())
    peer_replace(model)
    set_quantizer_by_cfg(model, config["quant_cfg"])
    with torch.no_grad():
        for module in model.modules():
            quantizer = getattr(module, "weight_quantizer", None)
            if quantizer is not None and quantizer.is_enabled:
                quantizer.amax = _weight_amax(module.weight)
    return model


def strip_shared_states(model: nn.Module) -> None:
    """Remove every shared state and tie marker: a calibrated model as a checkpoint load leaves it."""
    for module in list(model.modules()):
        module._modules.pop("_shared_quant_states", None)
        tied = module.__dict__.pop("_shared_quant_tied_attrs", None)
        for attr in tied or ():
            value = module._buffers.get(attr)
            if value is not None:
                module._buffers[attr] = value.clone()
