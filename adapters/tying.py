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

from collections import deque
from collections.abc import Iterable, Mapping, Sequence
from itertools import repeat
from operator import contains, is_, setitem

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
    """Make ``quantizer._buffers[attr]`` be ``tensor`` itself and guard the name.

    The buffer stays persistent: a member's tied value is what its checkpoint
    entry holds (cloned on the way out, see ``clone_tied_entries``).
    """
    if attr in quantizer._buffers:
        quantizer._buffers[attr] = tensor
    else:
        quantizer.register_buffer(attr, tensor)
    quantizer.__dict__.setdefault(TIED_ATTRS, set()).add(attr)
    _clone_on_save_(quantizer)


def _clone_on_save_(quantizer: nn.Module) -> None:
    """Give a tied quantizer whose class does not clone its tied entries the clone as a state-dict hook (once)."""
    if not _clones_tied_entries(type(quantizer)) and not quantizer.__dict__.get(_HOOKED):
        quantizer.register_state_dict_post_hook(_clone_tied_hook)
        quantizer.__dict__[_HOOKED] = True


def _clones_tied_entries(kind: type) -> bool:
    """Whether quantizers of class ``kind`` clone their tied entries in their own ``state_dict``."""
    return getattr(kind, "clones_tied_entries", False)


def tie_all_(quantizers: Sequence[nn.Module], attr: str, tensors: Sequence[torch.Tensor], dicts=None, kinds=None) -> None:
    """``tie_`` each quantizer to its tensor; those already tied to it are left as they are.

    populate and restore tie every member of every group (12k on a 48-layer MoE), most
    of them already tied on a second populate. ``dicts``, when given, holds the
    quantizers' ``_buffers`` and ``__dict__`` (a ``StateBatch`` gathers them once), and
    ``kinds`` their classes as the caller read them in this call. The ties, and the
    state-dict clone hooks of classes that need one, are then checked in C-level passes
    over those dicts, each link to them a cache miss saved; when every class clones its
    own tied entries and every quantizer already has ``attr`` as a buffer, the ties are
    made in such passes too.
    """
    if dicts is not None:
        buffers, instance_dicts = dicts
        kinds = set(map(type, quantizers)) if kinds is None else kinds
        cloning = all(map(_clones_tied_entries, kinds))
        if (
            all(map(is_, map(dict.get, buffers, repeat(attr)), tensors))
            and all(map(contains, map(dict.get, instance_dicts, repeat(TIED_ATTRS), repeat(())), repeat(attr)))
            and (cloning or all(map(dict.get, instance_dicts, repeat(_HOOKED), repeat(False))))
        ):
            return  # every tie holds, saved cleanly (a second populate): what the loop below would find
        if cloning and all(map(contains, buffers, repeat(attr))):
            deque(map(setitem, buffers, repeat(attr), tensors), maxlen=0)
            markers = map(dict.setdefault, instance_dicts, repeat(TIED_ATTRS), map(set, repeat((), len(instance_dicts))))
            deque(map(set.add, markers, repeat(attr)), maxlen=0)
            return
    for quantizer, tensor in zip(quantizers, tensors):
        if is_tied(quantizer, attr, tensor):
            _clone_on_save_(quantizer)  # its class may have been swapped in place since it was tied
        else:
            tie_(quantizer, attr, tensor)


def untie_(quantizer: nn.Module, attr: str) -> None:
    """Give ``quantizer`` its own copy of ``attr`` and lift the guard."""
    tied = quantizer.__dict__.get(TIED_ATTRS)
    if not tied or attr not in tied:
        return
    tied.discard(attr)
    value = quantizer._buffers.get(attr)
    if value is not None:
        quantizer._buffers[attr] = value.detach().clone()


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
        module._buffers[attr] = old if new.device == old.device else old.to(device=new.device)
