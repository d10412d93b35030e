"""Buffer tying: the one place that aliases, unties and guards quantizer buffers.

A member quantizer is *tied* when ``quantizer._buffers[attr]`` IS its group's tensor
(one storage, not a copy): an in-place update (``copy_``) is seen by every member,
and reassigning the name on a member is refused, because it would silently split the
group. The tied names are recorded in ``quantizer.__dict__["_shared_quant_tied_attrs"]``,
the marker nvidia-modelopt's ``TensorQuantizer.__setattr__`` also honours, so its
quantizers are guarded too.

Everything that mutates a tie goes through ``tie_`` / ``untie_`` here, like every
mutation in ``torch.func.functional_call`` goes through one swap primitive.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import torch
from torch import nn

__all__ = ["TIED_ATTRS", "is_tied", "keep_fp32_", "tie_", "tie_all_", "tied_attrs", "untie_"]

TIED_ATTRS = "_shared_quant_tied_attrs"
_HOOKED = "_shared_quant_state_dict_hooked"


def tied_attrs(quantizer: nn.Module) -> frozenset[str]:
    """The names tied on ``quantizer`` (empty when none)."""
    return frozenset(quantizer.__dict__.get(TIED_ATTRS, ()))


def is_tied(quantizer: nn.Module, attr: str, tensor: torch.Tensor | None = None) -> bool:
    """Whether ``attr`` is tied on ``quantizer`` (to ``tensor``, when given)."""
    if attr not in quantizer.__dict__.get(TIED_ATTRS, ()):
        return False
    return tensor is None or quantizer._buffers.get(attr) is tensor


def tie_(quantizer: nn.Module, attr: str, tensor: torch.Tensor) -> None:
    """Make ``quantizer._buffers[attr]`` be ``tensor`` itself and guard the name (idempotent).

    The buffer stays persistent: a member's tied value is what its checkpoint
    entry holds (cloned on the way out, see ``clone_tied_entries``).
    """
    if quantizer._buffers.get(attr) is not tensor:
        _set_buffer_(quantizer, attr, tensor)
    quantizer.__dict__.setdefault(TIED_ATTRS, set()).add(attr)
    # checked on every tie, not only the first: a class can be swapped in place (the peer's promotion does)
    _clone_on_save_(quantizer)


def _set_buffer_(module: nn.Module, attr: str, tensor: torch.Tensor) -> None:
    """Register ``tensor`` as ``attr``, keeping the buffer's persistence (a new one is persistent).

    Through ``register_buffer``, not setattr: a tied name is guarded against setattr.
    """
    module.register_buffer(attr, tensor, persistent=attr not in module._non_persistent_buffers_set)


def _clone_on_save_(quantizer: nn.Module) -> None:
    """Give a tied quantizer whose class does not clone its tied entries the clone as a state-dict hook (once)."""
    if not getattr(type(quantizer), "clones_tied_entries", False) and not quantizer.__dict__.get(_HOOKED):
        quantizer.register_state_dict_post_hook(_clone_tied_hook)
        quantizer.__dict__[_HOOKED] = True


def tie_all_(quantizers: Sequence[nn.Module], attr: str, tensors: Sequence[torch.Tensor]) -> None:
    """``tie_`` each quantizer to its tensor."""
    for quantizer, tensor in zip(quantizers, tensors):
        tie_(quantizer, attr, tensor)


def untie_(quantizer: nn.Module, attr: str) -> None:
    """Give ``quantizer`` its own copy of ``attr`` and lift the guard."""
    tied = quantizer.__dict__.get(TIED_ATTRS)
    if not tied or attr not in tied:
        return
    tied.discard(attr)
    value = quantizer._buffers.get(attr)
    if value is not None:
        _set_buffer_(quantizer, attr, value.detach().clone())


def clone_tied_entries(quantizer: nn.Module, state_dict: dict, prefix: str) -> None:
    """Replace the tied entries a state dict got from ``quantizer`` by independent copies.

    safetensors refuses tensors that share storage, so tied values are cloned on the
    way out; ``restore`` ties them again on the way in.
    """
    for attr in quantizer.__dict__.get(TIED_ATTRS, ()):
        key = prefix + attr
        value = state_dict.get(key)
        if value is not None:
            state_dict[key] = value.detach().clone()


def _clone_tied_hook(module: nn.Module, state_dict: dict, prefix: str, local_metadata) -> None:
    clone_tied_entries(module, state_dict, prefix)


def keep_fp32_(module: nn.Module, before: Mapping[str, torch.Tensor | None], attrs: Iterable[str]) -> None:
    """After an ``_apply``, put back the fp32 values of ``attrs``, only moved to the new device.

    ``model.half()`` casts every floating buffer; an amax narrowed to fp16 loses the
    bits that make a shared scale exact. ``before`` holds the buffers as they were.
    When neither device nor dtype should change, the original tensor object is kept,
    so a tie survives ``.half()`` untouched.
    """
    for attr in attrs:
        old, new = before.get(attr), module._buffers.get(attr)
        if old is None or new is None or new.dtype == old.dtype:
            continue
        _set_buffer_(module, attr, old if new.device == old.device else old.to(device=new.device))
