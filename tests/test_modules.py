"""Examples for sharedquant.adapters.modules: group discovery on real module trees, and the seed's predicates."""

from __future__ import annotations

from collections import OrderedDict

import pytest
import torch
from torch import nn

from sharedquant.adapters import (
    SHARED_PATTERNS,
    SHARED_PATTERNS_ACROSS_EXPERTS,
    QuantLinear,
    SharedWeightGlobalAmaxState,
    TensorQuantizer,
    find_shared_input_groups,
    is_quantized,
    is_quantized_column_parallel_linear,
    is_quantized_linear,
    is_quantized_row_parallel_linear,
    max_calibrate,
    replace_quant_module,
    representative_weight_quantizer,
    weight_attr_names,
)
from sharedquant.adapters.models import tiny_llama, tiny_mixtral
from sharedquant.adapters.modules import walk_modules
from sharedquant.core import find_groups


def llama(num_layers: int = 1):
    return replace_quant_module(tiny_llama(num_layers=num_layers))


def named(model: nn.Module, groups) -> list[tuple[str, list[str]]]:
    """Groups as (parent FQN, member FQNs), for readable assertions."""
    names = {id(module): name for name, module in model.named_modules()}
    return [(names[id(parent)], [names[id(m)] for m in members]) for parent, members in groups]


# --- find_shared_input_groups ------------------------------------------------------------


@pytest.mark.parametrize("patterns", [None, [], ()])
def test_no_patterns_find_nothing(patterns):
    assert find_shared_input_groups(llama(), patterns) == []


def test_llama_groups_are_qkv_and_gate_up_per_layer_parented_at_their_block():
    model = llama(num_layers=2)
    groups = find_shared_input_groups(model, SHARED_PATTERNS)
    layer0 = model.model.layers[0]
    assert groups[0][0] is layer0.self_attn
    assert groups[0][1] == [layer0.self_attn.q_proj, layer0.self_attn.k_proj, layer0.self_attn.v_proj]
    assert named(model, groups) == [
        (f"model.layers.{i}.{block}", [f"model.layers.{i}.{block}.{role}" for role in roles])
        for i in range(2)
        for block, roles in (("self_attn", ("q_proj", "k_proj", "v_proj")), ("mlp", ("gate_proj", "up_proj")))
    ]


def test_groups_equal_core_find_groups_over_the_same_names():
    model = replace_quant_module(tiny_mixtral(num_layers=2, num_experts=3))
    names = [n for n, m in model.named_modules() if isinstance(m, QuantLinear)]
    containers = [n for n, m in model.named_modules() if isinstance(m, nn.ModuleList)]
    for patterns in (SHARED_PATTERNS, SHARED_PATTERNS_ACROSS_EXPERTS):
        expected = [(g.parent, list(g.members)) for g in find_groups(names, patterns, containers=containers)]
        assert named(model, find_shared_input_groups(model, patterns)) == expected


def test_singletons_are_not_groups():
    model = llama()
    grouped = {name for _, members in named(model, find_shared_input_groups(model, SHARED_PATTERNS)) for name in members}
    assert not grouped & {"model.layers.0.self_attn.o_proj", "model.layers.0.mlp.down_proj", "lm_head"}


def test_a_module_whose_target_quantizer_is_disabled_is_not_a_member():
    model = llama()
    attn = model.model.layers[0].self_attn
    attn.k_proj.weight_quantizer.disable()
    assert named(model, find_shared_input_groups(model, SHARED_PATTERNS))[0][1] == [
        "model.layers.0.self_attn.q_proj",
        "model.layers.0.self_attn.v_proj",
    ]
    attn.v_proj.weight_quantizer.disable()  # q_proj alone is no group
    assert [parent for parent, _ in named(model, find_shared_input_groups(model, SHARED_PATTERNS))] == ["model.layers.0.mlp"]


def test_membership_needs_no_amax():
    model = llama()
    assert all(q.amax is None for q in model.modules() if isinstance(q, TensorQuantizer))
    assert len(find_shared_input_groups(model, SHARED_PATTERNS)) == 2


class QwenMoeBlock(nn.Module):
    """A shared-expert MLP: gate/up fuse, the scalar shared_expert_gate and the router do not."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = nn.Linear(32, 4, bias=False)
        self.gate_proj = nn.Linear(32, 64, bias=False)
        self.up_proj = nn.Linear(32, 64, bias=False)
        self.down_proj = nn.Linear(64, 32, bias=False)
        self.shared_expert_gate = nn.Linear(32, 1, bias=False)


def test_shared_expert_gate_next_to_gate_up_is_not_grouped():
    model = replace_quant_module(nn.ModuleDict({"mlp": QwenMoeBlock()}))
    assert model.mlp.shared_expert_gate.weight_quantizer.is_enabled  # eligible, just not fusible
    assert named(model, find_shared_input_groups(model, SHARED_PATTERNS)) == [
        ("mlp", ["mlp.gate_proj", "mlp.up_proj"])
    ]


def test_per_expert_w1_w3_groups_are_parented_at_each_expert():
    model = replace_quant_module(tiny_mixtral(num_layers=1, num_experts=3))
    experts = model.model.layers[0].block_sparse_moe.experts
    moe_groups = [(p, ms) for p, ms in find_shared_input_groups(model, SHARED_PATTERNS) if p is not model.model.layers[0].self_attn]
    assert [p for p, _ in moe_groups] == list(experts)
    assert [ms for _, ms in moe_groups] == [[e.w1, e.w3] for e in experts]


def test_cross_expert_pattern_is_parented_above_the_module_list():
    model = replace_quant_module(tiny_mixtral(num_layers=1, num_experts=3))
    moe = model.model.layers[0].block_sparse_moe
    groups = find_shared_input_groups(model, SHARED_PATTERNS_ACROSS_EXPERTS)
    parent, members = groups[-1]
    assert parent is moe
    assert members == [m for e in moe.experts for m in (e.w1, e.w3)]


def test_attaching_above_a_module_list_keeps_its_length_and_iteration():
    model = replace_quant_module(tiny_mixtral(num_layers=1, num_experts=3))
    experts = model.model.layers[0].block_sparse_moe.experts
    before = list(experts)
    SharedWeightGlobalAmaxState.attach(model, SHARED_PATTERNS_ACROSS_EXPERTS)
    assert len(experts) == 3 and list(experts) == before
    assert "_shared_quant_states" in model.model.layers[0].block_sparse_moe._modules
    # A pattern grouping one role across layers climbs past model.layers too.
    SharedWeightGlobalAmaxState.attach(model, [r"model\.layers\.\d+\.self_attn\.(o_proj)"])
    assert len(model.model.layers) == 1 and list(model.model.layers) == [model.model.layers[0]]


class SequentialMLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.mlp = nn.Sequential(
            OrderedDict(gate_proj=nn.Linear(16, 16), up_proj=nn.Linear(16, 16), act=nn.ReLU())
        )

    def forward(self, x):
        return self.mlp(x)


def test_a_sequential_parent_is_climbed_past_so_its_forward_is_intact():
    model = replace_quant_module(SequentialMLP())
    assert named(model, find_shared_input_groups(model, SHARED_PATTERNS)) == [("", ["mlp.gate_proj", "mlp.up_proj"])]
    max_calibrate(model)
    assert list(model.mlp._modules) == ["gate_proj", "up_proj", "act"]
    assert model(torch.randn(2, 16)).shape == (2, 16)


def test_walk_modules_lists_the_modules_with_children_once_each_in_named_modules_order():
    model = replace_quant_module(tiny_mixtral(num_layers=2, num_experts=3))
    shared = model.model.layers[0].self_attn
    model.model.layers[1].alias = shared  # one module at two FQNs: listed at its first
    model.model.layers[1].add_module("empty", None)  # a child slot holding None
    expected = {name: module for name, module in model.named_modules() if module._modules}
    walked = walk_modules(model)
    assert list(walked) == list(expected)
    assert all(walked[name] is module for name, module in expected.items())
    assert "model.layers.1.alias" not in walked


def test_target_quantizer_kind_selects_the_quantizer():
    model = llama()
    assert find_shared_input_groups(model, SHARED_PATTERNS, target_quantizer_kind="input") == []
    for module in model.modules():
        if isinstance(module, QuantLinear):
            module.input_quantizer.enable()
    assert len(find_shared_input_groups(model, SHARED_PATTERNS, target_quantizer_kind="input")) == 2


def test_bad_arguments_are_refused_naming_the_function():
    with pytest.raises(TypeError, match="find_shared_input_groups: expected an nn.Module, got str"):
        find_shared_input_groups("model", SHARED_PATTERNS)
    with pytest.raises(ValueError, match=r"find_shared_input_groups: invalid regex '\(q'"):
        find_shared_input_groups(llama(), ["(q"])
    with pytest.raises(TypeError, match="find_shared_input_groups: patterns must be a sequence"):
        find_shared_input_groups(llama(), r"(.*)\.q_proj")


# --- predicates --------------------------------------------------------------------------


def test_is_quantized():
    assert is_quantized(llama())
    assert is_quantized(TensorQuantizer())
    assert not is_quantized(tiny_llama(num_layers=1))


def test_is_quantized_linear_and_parallel_flavours():
    layer = QuantLinear(16, 8)
    assert is_quantized_linear(layer)
    assert not is_quantized_linear(nn.Linear(16, 8))
    assert not is_quantized_column_parallel_linear(layer) and not is_quantized_row_parallel_linear(layer)
    layer._is_column_parallel = True
    assert is_quantized_column_parallel_linear(layer) and not is_quantized_row_parallel_linear(layer)
    row = QuantLinear(16, 8)
    row._is_row_parallel = True
    assert is_quantized_row_parallel_linear(row) and not is_quantized_column_parallel_linear(row)
    plain = nn.Linear(16, 8)
    plain._is_column_parallel = True
    assert not is_quantized_column_parallel_linear(plain)


def test_an_embedding_with_quantizers_is_not_a_quantized_linear():
    embedding = nn.Embedding(10, 16)
    embedding.input_quantizer = TensorQuantizer()
    embedding.weight_quantizer = TensorQuantizer()
    assert not is_quantized_linear(embedding)


class FusedExperts(nn.Module):
    """Per-weight quantizers: gate_up_proj with a singular one, down_proj with a per-expert list."""

    def __init__(self) -> None:
        super().__init__()
        self.gate_up_proj = nn.Parameter(torch.zeros(2, 32, 16))
        self.down_proj = nn.Parameter(torch.zeros(2, 16, 16))
        self.bias = nn.Parameter(torch.zeros(16))
        self.gate_up_proj_weight_quantizer = TensorQuantizer()
        self.down_proj_weight_quantizers = nn.ModuleList([TensorQuantizer(), TensorQuantizer()])


def test_representative_weight_quantizer_finds_singular_and_plural_layouts():
    layer = QuantLinear(16, 8)
    assert representative_weight_quantizer(layer) is layer.weight_quantizer
    experts = FusedExperts()
    assert representative_weight_quantizer(experts, "gate_up_proj") is experts.gate_up_proj_weight_quantizer
    assert representative_weight_quantizer(experts, "down_proj") is experts.down_proj_weight_quantizers[0]
    assert representative_weight_quantizer(experts, "bias") is None
    assert representative_weight_quantizer(nn.Linear(16, 8)) is None


def test_weight_attr_names_lists_the_quantized_weights_only():
    assert list(weight_attr_names(QuantLinear(16, 8))) == ["weight"]
    assert list(weight_attr_names(FusedExperts())) == ["gate_up_proj", "down_proj"]
    assert list(weight_attr_names(nn.Linear(16, 8))) == []
    assert list(weight_attr_names(llama())) == []  # not recursive
