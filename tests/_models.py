"""Model set-up shared by the example tests (not collected: no ``test_`` prefix)."""

from __future__ import annotations

from torch import nn

from sharedquant.adapters import QuantLinear


def set_weight_amax(model: nn.Module) -> nn.Module:
    """Give every enabled weight quantizer its calibrated per-block amax, nothing shared yet.

    What ``max_calibrate`` records from the weights before it attaches any state.
    """
    for module in model.modules():
        if isinstance(module, QuantLinear) and module.weight_quantizer.is_enabled:
            module.weight_quantizer.amax = module.weight_quantizer.observed_amax(module.weight.detach())
    return model
