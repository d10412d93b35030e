"""Examples for sharedquant.adapters.shared_state: the seed's API surface and the attach / populate lifecycle."""

from __future__ import annotations

import ast
import inspect
import re
from abc import ABC

import pytest
import torch
from torch import nn

import sharedquant.adapters as adapters
from sharedquant.adapters import (
    SHARED_PATTERNS,
    SHARED_PATTERNS_ACROSS_EXPERTS,
    QuantLinear,
    SharedQuantState,
    SharedWeightGlobalAmaxState,
    TensorQuantizer,
    iter_shared_quant_states,
    max_calibrate,
    replace_quant_module,
)
from sharedquant.adapters.distributed import ParallelState
from sharedquant.adapters.models import tiny_llama, tiny_mixtral
from sharedquant.core import finalize, find_groups

from _models import set_weight_amax  # pytest puts tests/ on sys.path (it has no __init__.py)

# Signature lines of the seed (utils_api_reference.txt), methods prefixed with their class
# and the peer's module path in the one class-valued default cut to the class name.
SEED_SIGNATURES = """
SharedQuantState.__init__()
classmethod SharedQuantState.attach(model, patterns=None)
SharedQuantState.finalize()
SharedQuantState.install_hooks()
classmethod SharedQuantState.metadata(model)
classmethod SharedQuantState.populate(model)
SharedQuantState.remove_hooks()
classmethod SharedQuantState.resolve_patterns(shared_states=None)
classmethod SharedQuantState.restore(model, patterns=None)
SharedQuantState.restore_from_members()
SharedQuantState.set_members(parent, members)
abstract SharedQuantState.sync(parallel_state=None)
SharedQuantState.tie_member_quantizer(quantizer)
SharedQuantState.tie_member_quantizers()
SharedWeightGlobalAmaxState.__init__()
SharedWeightGlobalAmaxState.finalize()
SharedWeightGlobalAmaxState.sync(parallel_state=None)
SharedWeightGlobalAmaxState.tie_member_quantizer(quantizer)
convert_quantization_axis_to_reduce_axis(input, axis)
export_torch_mode()
find_shared_input_groups(model, patterns=None, target_quantizer_kind='weight')
is_quantized(module)
is_quantized_column_parallel_linear(module)
is_quantized_linear(module)
is_quantized_row_parallel_linear(module)
iter_shared_quant_states(model, state_cls=<class 'SharedQuantState'>)
reduce_amax(input, axis=None, keepdims=True, squeeze_scalar=True)
reduce_sum(input, axis=None, keepdims=True)
replace_function(package, name, new_func, og_func_cache_name=None)
representative_weight_quantizer(module, weight_name='weight')
update_quant_cfg_with_kv_cache_quant(quant_cfg, kv_cache_quant_cfg)
weight_attr_names(module)
"""
_SIGNATURE = re.compile(r"^(classmethod |abstract )?([\w.]+)\((.*)\)$")


def _seed_entries():
    for line in SEED_SIGNATURES.strip().splitlines():
        kind, qualname, params = _SIGNATURE.match(line).groups()
        yield pytest.param((kind or "").strip(), qualname, params, id=qualname)


def _parse_params(params: str) -> list[tuple[str, object]]:
    parsed = []
    for part in filter(None, (p.strip() for p in params.split(","))):
        name, _, default = part.partition("=")
        if not default:
            parsed.append((name, inspect.Parameter.empty))
        elif default.startswith("<class"):
            parsed.append((name, getattr(adapters, default.split("'")[1])))
        else:
            parsed.append((name, ast.literal_eval(default)))
    return parsed


@pytest.mark.parametrize(("kind", "qualname", "params"), list(_seed_entries()))
def test_seed_name_exists_with_the_seeds_parameters_in_order(kind, qualname, params):
    owner_name, _, attr = qualname.rpartition(".")
    owner = getattr(adapters, owner_name) if owner_name else adapters
    obj = getattr(owner, attr)
    assert qualname.split(".")[0] in adapters.__all__
    signature = inspect.signature(obj)
    actual = list(signature.parameters.values())
    if owner_name and kind != "classmethod":
        assert actual[0].name == "self"
        actual = actual[1:]
    assert [(p.name, p.default) for p in actual] == _parse_params(params)
    if kind == "classmethod":
        assert isinstance(inspect.getattr_static(owner, attr), classmethod)
    if kind == "abstract":
        assert attr in owner.__abstractmethods__


def test_seed_class_attributes_and_properties():
    assert issubclass(SharedQuantState, nn.Module) and issubclass(SharedQuantState, ABC)
    with pytest.raises(TypeError, match="abstract"):
        SharedQuantState()
    assert SharedQuantState.managed_attrs == () and SharedQuantState.default_patterns == ()
    assert SharedQuantState.target_quantizer_kind == "weight"
    assert "name" in SharedQuantState.__annotations__
    assert SharedWeightGlobalAmaxState.name == "weight_global_amax"
    assert SharedWeightGlobalAmaxState.managed_attrs == ("_global_amax",)
    assert SharedWeightGlobalAmaxState.target_quantizer_kind == "weight"
    assert SharedWeightGlobalAmaxState.default_patterns == (
        r"(?:(.*)\.)?(?:q_proj|k_proj|v_proj)",
        r"(?:(.*)\.)?(?:gate_proj|up_proj)",
        r"(?:(.*)\.)?(?:w1|w3)",
    )
    assert adapters.SHARED_PATTERNS == SharedWeightGlobalAmaxState.default_patterns
    assert adapters.SHARED_PATTERNS_ACROSS_EXPERTS[-1] == r"(?:(.*)\.)?(?:experts|local_experts)\.\d+\.(?:w1|w3)"
    assert isinstance(SharedQuantState.members, property)
    assert isinstance(SharedWeightGlobalAmaxState.global_amax, property)
    assert SharedWeightGlobalAmaxState().global_amax is None


# --- helpers -----------------------------------------------------------------------------


def llama(num_layers: int = 1) -> nn.Module:
    return replace_quant_module(tiny_llama(num_layers=num_layers))


def states(model: nn.Module, cls=SharedQuantState) -> list[SharedQuantState]:
    return list(iter_shared_quant_states(model, cls))


def fqns(model: nn.Module, state: SharedQuantState) -> tuple[str, tuple[str, ...]]:
    names = {id(m): n for n, m in model.named_modules()}
    return names[id(state.__dict__["_parent"])], tuple(names[id(m)] for m in state.members)


def assert_tied(state: SharedWeightGlobalAmaxState) -> None:
    assert state.global_amax is not None
    for member in state.members:
        assert member.weight_quantizer._buffers["_global_amax"] is state.global_amax


class Counting(SharedWeightGlobalAmaxState):
    """Counts install_hooks calls and installs a real forward hook at the parent."""

    installs = 0

    def install_hooks(self) -> None:
        type(self).installs += 1
        handle = self.__dict__["_parent"].register_forward_hook(lambda *args: None)
        self.__dict__["_hook_handles"].append(handle)


# --- attach ------------------------------------------------------------------------------


def test_attach_creates_one_state_per_group_at_its_parent():
    model = llama(num_layers=2)
    assert SharedWeightGlobalAmaxState.attach(model) == 4
    attn = model.model.layers[1].self_attn
    state_list = attn._shared_quant_states
    assert isinstance(state_list, nn.ModuleList) and len(state_list) == 1
    state = state_list[0]
    assert state.members == (attn.q_proj, attn.k_proj, attn.v_proj)
    assert state.global_amax is None  # structural: nothing calibrated yet
    assert [fqns(model, s) for s in states(model)] == [
        (g.parent, g.members)
        for g in find_groups(
            [n for n, m in model.named_modules() if isinstance(m, QuantLinear)],
            SHARED_PATTERNS,
            containers=["model.layers"],
        )
    ]


def test_attach_is_idempotent():
    model = llama()
    assert SharedWeightGlobalAmaxState.attach(model) == 2
    first = states(model)
    assert SharedWeightGlobalAmaxState.attach(model) == 0
    assert SharedWeightGlobalAmaxState.attach(model, SHARED_PATTERNS) == 0
    assert all(a is b for a, b in zip(first, states(model))) and len(states(model)) == 2
    assert len(model.model.layers[0].self_attn._shared_quant_states) == 1


def test_attach_and_restore_without_patterns_use_default_patterns_but_an_empty_list_attaches_nothing():
    model = llama()
    assert SharedWeightGlobalAmaxState.attach(model, []) == 0
    assert states(model) == []
    assert SharedWeightGlobalAmaxState.attach(model) == 2
    fresh = llama()
    SharedWeightGlobalAmaxState.restore(fresh)
    assert len(states(fresh)) == 2


def test_install_hooks_once_per_created_state_and_populate_removes_them_once_finalized():
    Counting.installs = 0
    model = llama()
    attn = model.model.layers[0].self_attn
    assert Counting.attach(model) == 2
    assert Counting.installs == 2
    Counting.attach(model)
    assert Counting.installs == 2  # nothing new was created
    assert len(attn._forward_hooks) == 1
    assert Counting.populate(model) == 0  # nothing calibrated: hooks stay
    assert len(attn._forward_hooks) == 1
    set_weight_amax(model)
    assert Counting.populate(model) == 2
    assert len(attn._forward_hooks) == 0 and len(model.model.layers[0].mlp._forward_hooks) == 0
    assert all(s.__dict__["_hook_handles"] == [] for s in states(model))
    fresh = llama()
    Counting.restore(fresh)  # restore creates its states through attach: hooks once each
    assert Counting.installs == 4
    Counting.restore(fresh)
    assert Counting.installs == 4


def test_a_module_claimed_by_two_states_of_the_same_kind_is_refused_and_nothing_is_attached():
    model = replace_quant_module(tiny_mixtral(num_layers=1, num_experts=2))
    SharedWeightGlobalAmaxState.attach(model)
    before = states(model)
    with pytest.raises(ValueError, match=r"attach: '.*experts\.0\.w1' already belongs to a SharedWeightGlobalAmaxState"):
        SharedWeightGlobalAmaxState.attach(model, SHARED_PATTERNS_ACROSS_EXPERTS)
    assert states(model) == before
    assert "_shared_quant_states" not in model.model.layers[0].block_sparse_moe._modules


def test_another_state_class_tying_the_same_buffer_cannot_claim_a_member():
    class Other(SharedWeightGlobalAmaxState):
        name = "other"

    model = llama()
    SharedWeightGlobalAmaxState.attach(model)
    with pytest.raises(ValueError, match="already belongs to a SharedWeightGlobalAmaxState group.*new Other group"):
        Other.attach(model)
    assert len(states(model)) == 2


def test_a_state_of_another_kind_may_share_members():
    class InputAmax(SharedWeightGlobalAmaxState):
        name = "input_amax"
        managed_attrs = ("_amax",)
        target_quantizer_kind = "input"

    model = llama()
    for module in model.modules():
        if isinstance(module, QuantLinear):
            module.input_quantizer.enable()
    assert SharedWeightGlobalAmaxState.attach(model) == 2
    assert InputAmax.attach(model) == 2
    assert len(model.model.layers[0].self_attn._shared_quant_states) == 2


def test_attach_refuses_a_model_that_is_itself_a_container():
    model = replace_quant_module(nn.ModuleList([nn.Linear(16, 16), nn.Linear(16, 16)]))
    with pytest.raises(ValueError, match="no parent that can own a state: the model itself is a ModuleList"):
        SharedWeightGlobalAmaxState.attach(model, [r"(?:0|1)"])
    assert len(model) == 2


def test_attach_refuses_bad_input_naming_itself():
    with pytest.raises(TypeError, match=r"SharedWeightGlobalAmaxState\.attach: expected an nn.Module, got list"):
        SharedWeightGlobalAmaxState.attach([])
    with pytest.raises(ValueError, match=r"SharedWeightGlobalAmaxState\.attach: invalid regex '\['"):
        SharedWeightGlobalAmaxState.attach(llama(), ["["])


def test_many_groups_under_one_parent_attach():
    wide = nn.Module()
    for i in range(2000):
        wide.add_module(f"g{i}_a", nn.Linear(16, 16, bias=False))
        wide.add_module(f"g{i}_b", nn.Linear(16, 16, bias=False))
    replace_quant_module(wide)
    assert SharedWeightGlobalAmaxState.attach(wide, [r"(g\d+)_(?:a|b)"]) == 2000
    assert len(wide._shared_quant_states) == 2000
    assert wide._shared_quant_states[1999].members == (wide.g1999_a, wide.g1999_b)
    set_weight_amax(wide)
    assert SharedWeightGlobalAmaxState.populate(wide) == 2000
    assert_tied(wide._shared_quant_states[1234])


# --- populate ----------------------------------------------------------------------------


def test_populate_sets_every_group_to_the_core_finalize_value_and_ties_members():
    model = llama(num_layers=2)
    SharedWeightGlobalAmaxState.attach(model)
    set_weight_amax(model)
    assert SharedWeightGlobalAmaxState.populate(model) == 4
    buffers = dict(model.named_buffers())
    for state in states(model):
        parent, members = fqns(model, state)
        (group,) = find_groups(members, [r"(.*)\.\w+"])
        expected = finalize((group,), buffers).global_amax[0]
        assert torch.equal(state.global_amax, expected) and state.global_amax.dtype == torch.float32
        assert_tied(state)


def test_populate_skips_meta_amax_and_leaves_the_state_unset():
    model = llama()
    SharedWeightGlobalAmaxState.attach(model)
    for module in model.modules():
        if isinstance(module, QuantLinear):
            module.weight_quantizer.amax = torch.empty(module.out_features, 1, device="meta")
    assert SharedWeightGlobalAmaxState.populate(model) == 0
    assert all(s.global_amax is None for s in states(model))
    assert all("_global_amax" not in q.__dict__.get("_shared_quant_tied_attrs", ()) for q in model.modules())


def test_populate_takes_the_max_over_the_members_that_have_a_real_amax():
    model = llama()
    SharedWeightGlobalAmaxState.attach(model)
    attn = model.model.layers[0].self_attn
    attn.q_proj.weight_quantizer.amax = torch.empty(64, 1, device="meta")
    attn.k_proj.weight_quantizer.amax = torch.full((32, 1), 0.5)
    assert SharedWeightGlobalAmaxState.populate(model) == 1
    assert attn._shared_quant_states[0].global_amax.item() == 0.5


def test_re_populate_updates_in_place_and_keeps_every_member_tied():
    model = llama()
    max_calibrate(model)
    state = model.model.layers[0].self_attn._shared_quant_states[0]
    shared = state.global_amax
    with torch.no_grad():
        model.model.layers[0].self_attn.v_proj.weight.mul_(3.0)  # the group max moves
    max_calibrate(model)
    assert state.global_amax is shared  # same tensor, new value: members never go stale
    assert_tied(state)
    v_amax = model.model.layers[0].self_attn.v_proj.weight.detach().abs().max()
    assert shared.item() == v_amax.item()
    assert SharedWeightGlobalAmaxState.populate(model) == 2
    assert state.global_amax is shared
    assert_tied(state)


def test_setting_global_amax_replaces_the_value_for_every_member():
    model = llama()
    max_calibrate(model)
    state = model.model.layers[0].self_attn._shared_quant_states[0]
    state.global_amax = torch.tensor(1.0 + 2.0**-40, dtype=torch.float64)
    assert_tied(state)
    assert state.global_amax.dtype == torch.float32 and state.global_amax.item() > 1.0  # rounded up, never down


def test_unsetting_global_amax_unties_the_members_with_their_own_copy():
    model = llama()
    max_calibrate(model)
    state = model.model.layers[0].self_attn._shared_quant_states[0]
    old = state.global_amax.item()
    state.global_amax = None
    for member in state.members:
        quantizer = member.weight_quantizer
        assert quantizer.global_amax.item() == old
        quantizer.global_amax = 2.0  # no longer guarded
    assert state.global_amax is None
    q, k = state.members[0].weight_quantizer, state.members[1].weight_quantizer
    assert q.global_amax is not k.global_amax


# --- single-state API ---------------------------------------------------------------------


def unattached_state(amax=None, global_amax=None) -> SharedWeightGlobalAmaxState:
    """A state over two fresh QuantLinears, set up with set_members (no attach)."""
    members = [QuantLinear(16, 8), QuantLinear(16, 8)]
    for position, member in enumerate(members):
        if amax is not None:
            member.weight_quantizer.amax = torch.full((8, 1), amax[position])
        if global_amax is not None:
            member.weight_quantizer.global_amax = global_amax[position]
    state = SharedWeightGlobalAmaxState()
    state.set_members(nn.Module(), members)
    assert state.members == tuple(members)
    return state


def test_set_members_finalize_and_tie_without_attach():
    assert unattached_state().finalize() is False  # nothing calibrated
    state = unattached_state(amax=(2.0, 3.0))
    assert state.finalize() is True
    assert state.global_amax.item() == 3.0
    assert_tied(state)


def test_tie_member_quantizer_only_ties_quantizers_that_hold_a_global_amax():
    state = SharedWeightGlobalAmaxState()
    quantizer = TensorQuantizer()
    assert state.tie_member_quantizer(quantizer) is False  # the state is unset
    state.global_amax = 2.0
    assert state.tie_member_quantizer(quantizer) is True
    assert quantizer._buffers["_global_amax"] is state.global_amax
    plain = nn.Module()
    assert state.tie_member_quantizer(plain) is False
    assert "_global_amax" not in plain._buffers


def test_restore_from_members_rebuilds_and_ties_or_refuses_disagreement():
    state = unattached_state(global_amax=(4.0, 4.0))
    assert state.restore_from_members() is True
    assert state.global_amax.item() == 4.0
    assert_tied(state)
    other = unattached_state(global_amax=(1.0, 2.0))
    with pytest.raises(ValueError, match="members disagree on _global_amax"):
        other.restore_from_members()
    assert other.global_amax is None
    assert "_shared_quant_tied_attrs" not in other.members[0].weight_quantizer.__dict__


def test_sync_without_process_groups_changes_nothing():
    model = llama()
    max_calibrate(model)
    state = model.model.layers[0].self_attn._shared_quant_states[0]
    before = state.global_amax.clone()
    state.sync(None)
    state.sync(ParallelState(expert_model_parallel_group=None, tensor_parallel_group=None))
    assert torch.equal(state.global_amax, before)
    assert_tied(state)


def test_metadata_resolve_patterns_and_iteration():
    model = llama()
    assert SharedWeightGlobalAmaxState.metadata(model) == {}
    SharedWeightGlobalAmaxState.attach(model)
    assert SharedWeightGlobalAmaxState.metadata(model) == {"weight_global_amax": True}
    assert len(states(model, SharedWeightGlobalAmaxState)) == 2 == len(states(model))
    assert states(model, Counting) == []
    assert SharedWeightGlobalAmaxState.resolve_patterns() == list(SHARED_PATTERNS)
    assert SharedWeightGlobalAmaxState.resolve_patterns({"weight_global_amax": {"patterns": []}}) == []
    assert SharedWeightGlobalAmaxState.resolve_patterns({"weight_global_amax": {}}) == list(SHARED_PATTERNS)
    with pytest.raises(ValueError, match="unknown state"):
        SharedWeightGlobalAmaxState.resolve_patterns({"weight_global_amx": {"patterns": []}})
