"""Examples for sharedquant.adapters.blank_modules: bulk-made modules are the modules their class makes."""

from __future__ import annotations

import torch
from torch import nn

from sharedquant.adapters import SharedWeightGlobalAmaxState
from sharedquant.adapters.blank_modules import fields_only, maker
from sharedquant.adapters.state_index import _LIVE


def assert_same_fields(made: nn.Module, built: nn.Module) -> None:
    assert type(made) is type(built)
    assert made.__dict__.keys() == built.__dict__.keys()
    for name, value in built.__dict__.items():
        assert type(made.__dict__[name]) is type(value), name
        assert made.__dict__[name] == value, name


def test_a_made_module_list_is_a_fresh_module_list_with_its_own_containers():
    make = maker(nn.ModuleList)
    assert make is not nn.ModuleList  # torch's constructor only sets fields: it is copied
    first, second = make(), make()
    assert_same_fields(first, nn.ModuleList())
    first.append(nn.Linear(2, 2))
    first.register_forward_hook(lambda *args: None)
    assert len(second) == 0 and not second._forward_hooks
    assert len(first) == 1 and list(first.parameters())


def test_a_made_state_is_a_fresh_state_and_counts_as_live():
    make = maker(SharedWeightGlobalAmaxState)
    assert make is not SharedWeightGlobalAmaxState
    state = make()
    assert_same_fields(state, SharedWeightGlobalAmaxState())
    assert state in _LIVE
    assert state.global_amax is None and state.members == ()
    state.global_amax = torch.tensor(2.0)
    assert make().global_amax is None  # buffers are not shared between made states
    assert "_global_amax" not in state.state_dict()  # still non-persistent


def test_a_constructor_not_marked_is_called():
    class Plain(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.calls = 1

    assert maker(Plain) is Plain


def test_a_marked_constructor_whose_fields_are_not_plain_is_called():
    class WithTensor(nn.Module):
        @fields_only
        def __init__(self) -> None:
            super().__init__()
            self.register_buffer("scale", torch.zeros(()))

    make = maker(WithTensor)
    assert make is WithTensor
    first, second = make(), make()
    first.scale.fill_(3.0)
    assert second.scale.item() == 0.0


def test_a_subclass_with_its_own_constructor_is_called_even_if_its_parent_is_marked():
    class Custom(SharedWeightGlobalAmaxState):
        def __init__(self) -> None:
            super().__init__()
            self.extra = [1]

    made = maker(Custom)
    assert made is Custom
    assert made().extra == [1]
