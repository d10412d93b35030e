"""Quantized modules to attach to: ``TensorQuantizer``, ``QuantLinear``, ``replace_quant_module``.

These make the library usable without any other quantization package. The
quantizer holds state only (``_amax``, ``_global_amax`` buffers and a few flags);
the format math comes from ``sharedquant.core.nvfp4`` and the reductions from
``sharedquant.core.reduce``. The format is NVFP4: weights with static blocks of 16
(per-block ``_amax`` stored as ``[blocks, 1]``, the peer's layout, plus a per-tensor
``_global_amax``), activations with dynamic blocks scaled by a per-tensor ``_amax``.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch import nn

from sharedquant.core.nvfp4 import nvfp4_fake_quant
from sharedquant.core.reduce import reduce_amax, reduce_block_amax

from .tying import TIED_ATTRS, clone_tied_entries, keep_fp32_

__all__ = ["NVFP4_DYNAMIC", "NVFP4_STATIC", "QuantLinear", "TensorQuantizer", "replace_quant_module"]

NVFP4_STATIC = {-1: 16, "type": "static", "scale_bits": (4, 3)}
NVFP4_DYNAMIC = {-1: 16, "type": "dynamic", "scale_bits": (4, 3)}
_AMAX_ATTRS = ("_amax", "_global_amax")
_LOAD_DEVICE = "_shared_quant_load_device"  # set by QuantLinear for its quantizers' next load


class TensorQuantizer(nn.Module):
    """An NVFP4 fake quantizer whose calibration state is two buffers.

    ``_amax`` and ``_global_amax`` are ``None`` until set, settable by assignment unless
    tied to a shared state, and kept in fp32 by ``.half()`` / ``.to(dtype)``.

    Args:
        block_sizes: ``{-1: 16, "type": "static" | "dynamic", "scale_bits": (4, 3)}``;
            static blocks keep a per-block ``_amax`` (weights), dynamic ones compute
            block scales on the fly from a per-tensor ``_amax`` (activations).
        enabled: start enabled (a disabled quantizer is the identity).
    """

    clones_tied_entries = True  # tying.tie_ needs no state-dict hook for this class

    def __init__(self, block_sizes: dict | None = None, *, enabled: bool = True) -> None:
        super().__init__()
        block_sizes = dict(NVFP4_STATIC if block_sizes is None else block_sizes)
        size, kind = block_sizes.get(-1), block_sizes.get("type", "static")
        if not isinstance(size, int) or size <= 0 or size % 2 or kind not in ("static", "dynamic"):
            raise ValueError(
                f"TensorQuantizer: block_sizes must look like {NVFP4_STATIC!r} (an even block on the "
                f"last dimension, type 'static' or 'dynamic'), got {block_sizes!r}"
            )
        self.block_sizes = block_sizes
        self.num_bits = (2, 1)
        self._disabled = not enabled
        self._calibrating = False
        self.register_buffer("_amax", None)
        self.register_buffer("_global_amax", None)

    def __setattr__(self, name: str, value) -> None:
        if name in self.__dict__.get(TIED_ATTRS, ()):
            raise RuntimeError(
                f"TensorQuantizer: {name} is tied to a shared quant state; update it in place "
                "(e.g. .copy_()) or through the owning state, not by reassignment on a member"
            )
        super().__setattr__(name, value)

    # The properties read _buffers directly: nn.Module.__getattr__ is a slow fallback,
    # and populate / restore touch every member.
    @property
    def amax(self) -> torch.Tensor | None:
        """The calibrated amax: per block (static) or per tensor (dynamic)."""
        return self._buffers.get("_amax")

    @amax.setter
    def amax(self, value) -> None:
        self._amax = None if value is None else torch.as_tensor(value).detach().float()

    @property
    def global_amax(self) -> torch.Tensor | None:
        """The per-tensor amax of an NVFP4 weight (shared across a fused group when tied)."""
        return self._buffers.get("_global_amax")

    @global_amax.setter
    def global_amax(self, value) -> None:
        self._global_amax = None if value is None else torch.as_tensor(value).detach().float()

    @property
    def block_size(self) -> int:
        return self.block_sizes[-1]

    @property
    def is_enabled(self) -> bool:
        return not self._disabled

    @property
    def is_static_block_quant(self) -> bool:
        return self.block_sizes.get("type", "static") == "static"

    @property
    def is_nvfp4_static(self) -> bool:
        return self.is_static_block_quant and self.block_sizes.get("scale_bits", (4, 3)) == (4, 3)

    def enable(self) -> None:
        self._disabled = False

    def disable(self) -> None:
        self._disabled = True

    def observed_amax(self, x: torch.Tensor) -> torch.Tensor:
        """What calibration records for ``x``: per-block amax (static) or per-tensor amax, fp32."""
        if self.is_static_block_quant:
            return reduce_block_amax(x, {-1: self.block_size}).reshape(-1, 1).float()
        return reduce_amax(x).float()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._disabled:
            return x
        if self._calibrating:
            observed = self.observed_amax(x)
            if self._amax is None:
                self._amax = observed
            else:
                self._amax.copy_(torch.maximum(self._amax, observed))
            return x
        if self._amax is None:
            return x
        global_amax = self._global_amax
        if global_amax is None:
            global_amax = reduce_amax(self._amax).float()
        global_amax = global_amax.to(x.device)
        # A zero scale comes from an all-zero calibrated tensor, which NVFP4 cannot scale
        # and whose fake quant is itself; torch.where keeps this traceable, no host sync.
        usable = global_amax > 0
        quantized = nvfp4_fake_quant(x, torch.where(usable, global_amax, torch.ones_like(global_amax)), self.block_size)
        return torch.where(usable, quantized, x)

    def _apply(self, fn, recurse=True):
        before = {attr: self._buffers.get(attr) for attr in _AMAX_ATTRS}
        module = super()._apply(fn, recurse=recurse)
        keep_fp32_(self, before, _AMAX_ATTRS)
        tied = self.__dict__.get(TIED_ATTRS)
        if tied:
            # A move that gave this member its own tensor ended the alias; the owning
            # state's own _apply (when it is part of the move) ties it again.
            tied.difference_update({attr for attr in tied if self._buffers.get(attr) is not before.get(attr)})
        return module

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        clone_tied_entries(self, destination, prefix)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
        # A fresh quantizer's buffers are None, which load_state_dict would report as
        # unexpected keys (strict) or drop; materialise them from the checkpoint first,
        # on this quantizer's device: its own buffers', else its layer's (a checkpoint
        # read to the CPU must not pull a CUDA model's quantizers onto the CPU).
        hint = self.__dict__.pop(_LOAD_DEVICE, None)
        device = next((b.device for b in self._buffers.values() if b is not None), hint)
        for attr in _AMAX_ATTRS:
            incoming = state_dict.get(prefix + attr)
            if incoming is not None and self._buffers.get(attr) is None:
                self._buffers[attr] = torch.empty_like(incoming, dtype=torch.float32, device=device or incoming.device)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs)

    def extra_repr(self) -> str:
        state = "disabled" if self._disabled else ("calibrating" if self._calibrating else "enabled")
        amax = "unset" if self._amax is None else tuple(self._amax.shape)
        return f"nvfp4 {self.block_sizes.get('type')} blocks of {self.block_size}, {state}, amax={amax}"


class QuantLinear(nn.Linear):
    """``nn.Linear`` with ``input_quantizer``, ``weight_quantizer`` and ``output_quantizer``.

    The weight quantizer is NVFP4 with static blocks; the input and output ones are
    NVFP4 dynamic and start disabled. ``parallel_state`` (``None`` by default) names
    the process groups that hold other pieces of this layer, for ``sync``.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, device=None, dtype=None) -> None:
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self.input_quantizer = TensorQuantizer(NVFP4_DYNAMIC, enabled=False)
        self.weight_quantizer = TensorQuantizer(NVFP4_STATIC, enabled=in_features % NVFP4_STATIC[-1] == 0)
        self.output_quantizer = TensorQuantizer(NVFP4_DYNAMIC, enabled=False)
        self.parallel_state = None

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> QuantLinear:
        """A ``QuantLinear`` that shares ``linear``'s parameters (no copy)."""
        quant = cls(linear.in_features, linear.out_features, bias=linear.bias is not None, device="meta")
        quant.weight = linear.weight
        quant.bias = linear.bias
        quant.train(linear.training)
        return quant

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # Runs before the quantizers load (torch loads a parent, then its children):
        # tell them where this layer lives, for buffers they must materialise.
        for quantizer in (self.input_quantizer, self.weight_quantizer, self.output_quantizer):
            if isinstance(quantizer, TensorQuantizer):
                quantizer.__dict__[_LOAD_DEVICE] = self.weight.device
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.output_quantizer(F.linear(self.input_quantizer(x), self.weight_quantizer(self.weight), self.bias))


def replace_quant_module(model: nn.Module) -> nn.Module:
    """Swap every ``nn.Linear`` in ``model`` for a ``QuantLinear``, in place.

    Parameters are shared, not copied. A linear whose input width is not a multiple of
    16 cannot take NVFP4 blocks: its weight quantizer starts disabled, with a warning.

    Returns:
        ``model`` (a bare ``nn.Linear`` is returned converted).

    Raises:
        TypeError: ``model`` is not an ``nn.Module``.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"replace_quant_module: expected an nn.Module, got {type(model).__name__}")
    if type(model) is nn.Linear:
        return _convert(model, "")
    swaps = [
        (parent, name, f"{parent_name}.{name}" if parent_name else name)
        for parent_name, parent in model.named_modules()
        for name, child in parent._modules.items()
        if type(child) is nn.Linear
    ]
    for parent, name, fqn in swaps:
        parent._modules[name] = _convert(parent._modules[name], fqn)
    return model


def _convert(linear: nn.Linear, name: str) -> QuantLinear:
    quant = QuantLinear.from_linear(linear)
    if not quant.weight_quantizer.is_enabled:
        warnings.warn(
            f"replace_quant_module: {name or 'model'} has {linear.in_features} input features, not a "
            f"multiple of {NVFP4_STATIC[-1]}; its weight quantizer starts disabled",
            stacklevel=3,
        )
    return quant
