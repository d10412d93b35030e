"""Max calibration, on a module (``max_calibrate``) and as a pure function (``calibrate``).

Both record the same things: each weight quantizer's per-block amax (read from the
weight), each enabled activation quantizer's amax (observed during forwards), and
every NVFP4 weight's ``_global_amax``: the group max for fused groups, its own amax
otherwise. The values come from ``sharedquant.core``; the two entry points differ
only in where the results go.

* ``max_calibrate`` writes them into the model's buffers and ties the groups.
* ``calibrate`` takes the model's parameters and buffers as a dict (the
  ``torch.func.functional_call`` convention) and returns the new quantizer buffers,
  leaving the module and the dict as they were: it feeds ``functional_call`` fresh
  observation tensors and reads them back.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn
from torch.func import functional_call

from sharedquant.core.groups import join_fqn
from sharedquant.core.lifecycle import buffer_key
from sharedquant.core.transforms import global_amax_entries

from .modules import discover_groups, walk_modules
from .quantizer import TensorQuantizer
from .shared_state import SharedWeightGlobalAmaxState
from .tying import is_tied

__all__ = ["calibrate", "calibration_mode", "max_calibrate", "set_ungrouped_global_amax"]

_UNOBSERVED = float("-inf")  # the identity of max: an amax no batch has reached


@dataclass(frozen=True)
class _Slot:
    """One enabled quantizer: the module that owns it, under which name, for which weight."""

    fqn: str
    attr: str
    quantizer: TensorQuantizer
    module: nn.Module
    weight: str | None  # the parameter a weight quantizer quantizes; None for activations

    @property
    def amax_key(self) -> str:
        return buffer_key(self.fqn, self.attr, "_amax")


def _slots(modules: Iterable[tuple[str, nn.Module]]) -> list[_Slot]:
    """The enabled quantizers that are children of ``modules`` (``(fqn, module)`` pairs)."""
    slots = []
    for fqn, module in modules:
        for attr, child in module._modules.items():
            if not isinstance(child, TensorQuantizer) or not child.is_enabled:
                continue
            weight = None
            if attr.endswith("weight_quantizer"):
                weight = "weight" if attr == "weight_quantizer" else attr.removesuffix("_weight_quantizer")
            slots.append(_Slot(fqn, attr, child, module, weight))
    return slots


@contextmanager
def calibration_mode(quantizers: Iterable[TensorQuantizer]) -> Iterator[None]:
    """Make ``quantizers`` record their inputs' amax (and pass inputs through) inside the block."""
    quantizers = list(quantizers)
    for quantizer in quantizers:
        quantizer._calibrating = True
    try:
        yield
    finally:
        for quantizer in quantizers:
            quantizer._calibrating = False


def _global_amax_entries(groups, slots: list[_Slot], amax: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``_global_amax`` of every static NVFP4 weight quantizer in ``slots``: group max or its own."""
    names = [s.fqn for s in slots if s.attr == "weight_quantizer" and s.quantizer.is_nvfp4_static]
    return global_amax_entries(groups, amax, names=names, quantizer="weight_quantizer")


@torch.no_grad()
def max_calibrate(
    model: nn.Module,
    forward_loop: Callable[[nn.Module], None] | None = None,
    shared_states: Mapping[str, Mapping] | None = None,
) -> nn.Module:
    """Max-calibrate ``model`` in place and tie every fused group to one global amax.

    Per-block weight amax from the weights; then ``forward_loop(model)``, if given, for
    the enabled activation quantizers; then the shared states are attached, populated
    (finalize + sync) and tied; ungrouped NVFP4 weights get their own global amax.

    Args:
        model: a model with quantizers (see ``replace_quant_module``).
        forward_loop: runs calibration data through the model.
        shared_states: ``{"weight_global_amax": {"patterns": [...]}}``; omitted patterns
            mean ``SHARED_PATTERNS``, an empty list disables grouping.

    Returns:
        ``model``.

    Raises:
        ValueError: a bad ``shared_states`` config (before anything is touched).
    """
    patterns = SharedWeightGlobalAmaxState.resolve_patterns(shared_states)
    slots = _slots(walk_modules(model).items())
    SharedWeightGlobalAmaxState.attach(model, patterns)
    for slot in slots:
        if slot.weight is not None:
            slot.quantizer.amax = slot.quantizer.observed_amax(getattr(slot.module, slot.weight))
    if forward_loop is not None:
        _observe_activations(model, forward_loop, slots)
    SharedWeightGlobalAmaxState.populate(model)
    _set_ungrouped_global_amax(slots)
    return model


def _observe_activations(model: nn.Module, forward_loop: Callable[[nn.Module], None], slots: list[_Slot]) -> None:
    """Run ``forward_loop`` with every slot observing; activation amax restart from "unobserved".

    The start value (-inf) must never stay in a buffer, where a forward would refuse it
    as a scale: unreached quantizers end unset, and a loop that raises leaves every
    activation amax as it was before.
    """
    activations = [s for s in slots if s.weight is None]
    previous = [s.quantizer.amax for s in activations]
    for slot in activations:
        device = next((p.device for p in slot.module.parameters(recurse=False)), None)
        slot.quantizer.amax = torch.full((), _UNOBSERVED, device=device)
    try:
        with calibration_mode(s.quantizer for s in slots):
            forward_loop(model)
    except BaseException:
        for slot, amax in zip(activations, previous):
            slot.quantizer.amax = amax
        raise
    for slot in activations:
        if slot.quantizer.amax.item() == _UNOBSERVED:
            slot.quantizer.amax = None


@torch.no_grad()
def set_ungrouped_global_amax(model: nn.Module) -> int:
    """Give every calibrated NVFP4 weight quantizer outside a tied group its own ``_global_amax``.

    The last step of ``max_calibrate`` (the peer calls it NVFP4 promotion): grouped
    members already hold their group's value; every other one gets its own amax.

    Returns:
        How many quantizers were set.
    """
    return _set_ungrouped_global_amax(_slots(walk_modules(model).items()))


def _set_ungrouped_global_amax(slots: list[_Slot]) -> int:
    singles = [
        s
        for s in slots
        if s.attr == "weight_quantizer"
        and s.quantizer.is_nvfp4_static
        and s.quantizer.amax is not None
        and not s.quantizer.amax.is_meta  # no value to take (a model built on the meta device)
        and not is_tied(s.quantizer, "_global_amax")
    ]
    own = _global_amax_entries((), singles, {s.amax_key: s.quantizer.amax for s in singles})
    for slot in singles:
        slot.quantizer.global_amax = own[buffer_key(slot.fqn, slot.attr, "_global_amax")]
    return len(singles)


@torch.no_grad()
def calibrate(
    model: nn.Module,
    params_and_buffers: Mapping[str, torch.Tensor],
    batches: Iterable,
    shared_states: Mapping[str, Mapping] | None = None,
) -> dict[str, torch.Tensor]:
    """Max calibration as a pure function of a model's variables and some batches.

    Args:
        model: gives the structure (which quantizers exist); its own tensors are not read
            where ``params_and_buffers`` has an entry, and nothing of it is written.
        params_and_buffers: FQN -> tensor, as for ``torch.func.functional_call``.
        batches: calibration inputs; a tuple is unpacked as positional arguments.
        shared_states: as for ``max_calibrate``.

    Returns:
        The new quantizer buffers: ``<q>._amax`` of every weight quantizer and of every
        activation quantizer a batch reached, and ``<q>._global_amax`` of every NVFP4
        weight quantizer, equal to what ``max_calibrate`` leaves in the module.

    Raises:
        ValueError: a bad ``shared_states`` config.
    """
    patterns = SharedWeightGlobalAmaxState.resolve_patterns(shared_states)
    variables = dict(params_and_buffers)
    groups, modules = discover_groups(model, patterns, "weight")  # its walk also gives the quantizers
    slots = _slots(modules.items())
    new: dict[str, torch.Tensor] = {}
    for slot in slots:
        if slot.weight is not None:
            weight = variables.get(_param_key(slot))
            new[slot.amax_key] = slot.quantizer.observed_amax(getattr(slot.module, slot.weight) if weight is None else weight)
        else:
            device = next(iter(variables.values())).device if variables else None
            new[slot.amax_key] = torch.full((), _UNOBSERVED, device=device)
    with calibration_mode(s.quantizer for s in slots):
        for batch in batches:
            functional_call(model, {**variables, **new}, batch if isinstance(batch, tuple) else (batch,))
    for slot in slots:
        if slot.weight is None and new[slot.amax_key].item() == _UNOBSERVED:
            del new[slot.amax_key]
    new.update(_global_amax_entries(groups, slots, new))
    return new


def _param_key(slot: _Slot) -> str:
    return join_fqn(slot.fqn, slot.weight)
