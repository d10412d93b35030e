"""Batched steps dispatch a fixed number of tensor ops, whatever the number of members.

On a GPU each non-view op is about one kernel launch: a step that dispatched a few
ops per member would cost 12k launches on a 48-layer, 128-expert MoE. The count is
taken with a dispatch mode, so it is checked here on the CPU.
"""

from __future__ import annotations

import pytest
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from sharedquant.adapters import SharedWeightGlobalAmaxState, replace_quant_module, set_ungrouped_global_amax
from sharedquant.adapters.models import tiny_mixtral
from sharedquant.core import SHARED_PATTERNS, finalize, find_groups, restore

from _models import set_weight_amax  # pytest puts tests/ on sys.path (it has no __init__.py)

State = SharedWeightGlobalAmaxState


class _Ops(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.names: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not func.is_view:
            self.names.append(str(func))
        return func(*args, **(kwargs or {}))


def ops(fn) -> list[str]:
    with _Ops() as counter:
        fn()
    return sorted(counter.names)


def calibrated(num_experts: int) -> nn.Module:
    # 16x16 weights: every amax together stays under the 32k elements where the CPU
    # concatenation splits (one op per 32k elements, by design, see reduce.py)
    model = tiny_mixtral(num_experts=num_experts, num_layers=2, hidden_size=16, intermediate_size=16)
    return set_weight_amax(replace_quant_module(model))


def shared_values(model: nn.Module) -> list[float]:
    return [state.global_amax.item() for state in model.modules() if isinstance(state, State)]


def untied_copy(model: nn.Module) -> nn.Module:
    """What a checkpoint load leaves: the members' values, no states."""
    fresh = calibrated(len(model.model.layers[0].block_sparse_moe.experts))
    fresh.load_state_dict(model.state_dict())
    return fresh


@pytest.mark.parametrize("step", ["populate", "populate again", "ungrouped global amax", "restore"])
def test_adapter_steps_dispatch_the_same_ops_for_4_and_32_experts(step):
    found = {}
    for experts in (4, 32):
        model = calibrated(experts)
        State.attach(model)
        if step == "populate":
            found[experts] = ops(lambda: State.populate(model))
            continue
        State.populate(model)
        if step == "populate again":
            found[experts] = ops(lambda: State.populate(model))
        elif step == "ungrouped global amax":
            found[experts] = ops(lambda: set_ungrouped_global_amax(model))
        else:
            loaded = untied_copy(model)
            found[experts] = ops(lambda: State.restore(loaded))
            assert shared_values(loaded) == shared_values(model)
    assert found[4] == found[32], f"{step}: the op list grows with the members"


@pytest.mark.parametrize("step", ["finalize", "restore"])
def test_core_steps_dispatch_the_same_ops_for_4_and_32_experts(step):
    found = {}
    for experts in (4, 32):
        model = calibrated(experts)
        State.attach(model)
        State.populate(model)
        state_dict = model.state_dict()
        groups = find_groups(list(dict(model.named_modules())), SHARED_PATTERNS)
        fn = (lambda: finalize(groups, state_dict)) if step == "finalize" else (lambda: restore(groups, state_dict))
        found[experts] = ops(fn)
    assert found[4] == found[32], f"core {step}: the op list grows with the members"
