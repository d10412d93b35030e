"""core.engines: each engine rule's consequence for a mismatched fused group, from the scales alone."""

import dataclasses

import pytest

from sharedquant.core.engines import ENGINE_RULES, KEEPS, EngineRule, applicable_rules, find_rule_impacts
from sharedquant.core.formats import COMPRESSED_TENSORS, MODELOPT, QUANTIZER_STATE
from sharedquant.core.groups import Group
from sharedquant.core.reconcile import MemberScales, report_groups

RULES = {rule.name: rule for rule in ENGINE_RULES}


def reports(groups, fmt):
    """Reports for ``{parent: {role: scale}}``, members in the given order."""
    built, scales = [], {}
    for index, (parent, members) in enumerate(groups.items()):
        fqns = tuple(f"{parent}.{role}" for role in members)
        built.append(Group(key=(index, (parent,)), parent=parent, members=fqns))
        scales |= {f"{parent}.{role}": MemberScales(f"{parent}.{role}", scale) for role, scale in members.items()}
    return report_groups(built, scales, fmt)


def impact(name, groups, fmt=MODELOPT):
    (found,) = find_rule_impacts(reports(groups, fmt), fmt, [RULES[name]])
    return found.members, found.affected, found.worst_error, found.worst_member


EXPERT = "layers.0.mlp.experts.3"


def test_the_table_names_each_rule_once_with_a_known_pick_and_a_source():
    assert len(RULES) == len(ENGINE_RULES)
    assert all(rule.keeps in KEEPS and rule.source and rule.formats for rule in ENGINE_RULES)


def test_rules_are_chosen_by_format():
    assert [r.name for r in applicable_rules(MODELOPT)] == [
        "vllm-moe", "trtllm-cutlass-moe", "trtllm-gen-moe", "sglang-moe", "vllm-dense-modelopt",
    ]  # fmt: skip
    assert [r.name for r in applicable_rules(COMPRESSED_TENSORS)] == ["vllm-moe", "vllm-dense-ct"]
    assert applicable_rules(QUANTIZER_STATE) == ()
    assert find_rule_impacts(reports({"a": {"q_proj": 1.0, "k_proj": 2.0}}, QUANTIZER_STATE), QUANTIZER_STATE) == ()


def test_vllm_moe_keeps_the_gate_scale_whatever_the_members_order():
    # up decoded with a scale a quarter of its own: off by 75%; the gate is exact
    assert impact("vllm-moe", {EXPERT: {"up_proj": 8.0, "gate_proj": 2.0}}) == (2, 1, 0.75, f"{EXPERT}.up_proj")
    assert impact("vllm-moe", {EXPERT: {"w1": 2.0, "w3": 0.5}}) == (2, 1, 3.0, f"{EXPERT}.w3")


def test_the_largest_and_the_smallest_put_the_other_members_off():
    groups = {"attn": {"q_proj": 1.0, "k_proj": 4.0, "v_proj": 2.0}}
    assert impact("vllm-dense-modelopt", groups) == (3, 2, 3.0, "attn.q_proj")
    assert impact("trtllm-cutlass-moe", {EXPERT: {"gate_proj": 1.0, "up_proj": 1.5}}) == (2, 1, 0.5, f"{EXPERT}.gate_proj")


def test_compressed_tensors_rules_read_the_reciprocal():
    # stored weight_global_scale 100, 400, 200: weight_scale_2 1/100, 1/400, 1/200. vLLM's dense CT path keeps
    # the largest reciprocal (the smallest weight_scale_2, k's): q is decoded with a quarter of its scale
    groups = {"attn": {"q_proj": 100.0, "k_proj": 400.0, "v_proj": 200.0}}
    assert impact("vllm-dense-ct", groups, COMPRESSED_TENSORS) == (3, 2, 0.75, "attn.q_proj")
    # gate 100 (weight_scale_2 1/100), up 25 (1/25): up decoded with 1/100, a quarter of its own
    assert impact("vllm-moe", {EXPERT: {"gate_proj": 100.0, "up_proj": 25.0}}, COMPRESSED_TENSORS)[2] == 0.75


def test_per_half_engines_put_nobody_off():
    assert impact("sglang-moe", {EXPERT: {"gate_proj": 1.0, "up_proj": 9.0}}) == (2, 0, 0.0, None)


def test_moe_rules_cover_experts_and_dense_rules_the_rest():
    groups = {EXPERT: {"gate_proj": 1.0, "up_proj": 2.0}, "layers.0.mlp.shared_experts": {"gate_proj": 1.0, "up_proj": 2.0}}
    assert impact("vllm-moe", groups)[:2] == (2, 1)
    assert impact("vllm-dense-modelopt", groups) == (2, 1, 1.0, "layers.0.mlp.shared_experts.gate_proj")


def test_a_rule_covers_only_the_exact_role_sets_it_fuses():
    # a q/k pair without v, and diffusers attention, are no vLLM qkv_proj
    groups = {"attn": {"q_proj": 1.0, "k_proj": 2.0}, "blocks.0.attn": {"to_q": 1.0, "to_k": 2.0, "to_v": 1.0}}
    assert impact("vllm-dense-modelopt", groups) == (0, 0, 0.0, None)


def test_a_cross_expert_group_is_judged_one_expert_at_a_time():
    parent = "layers.0.block_sparse_moe"
    members = {"experts.0.w1": 1.0, "experts.0.w3": 1.0, "experts.1.w1": 1.0, "experts.1.w3": 3.0}
    group = Group(key=(0, (parent,)), parent=parent, members=tuple(f"{parent}.{m}" for m in members))
    scales = {f"{parent}.{m}": MemberScales(f"{parent}.{m}", s) for m, s in members.items()}
    (found,) = find_rule_impacts(report_groups([group], scales, MODELOPT), MODELOPT, [RULES["vllm-moe"]])
    # across experts the group's ratio is 3, but the engine fuses each expert's own pair
    assert (found.members, found.affected, found.worst_member) == (4, 1, f"{parent}.experts.1.w3")
    assert found.worst_error == pytest.approx(2 / 3, rel=1e-15)


def test_an_unknown_pick_is_refused_naming_the_rule():
    rule = dataclasses.replace(RULES["vllm-moe"], name="custom", keeps="median")
    with pytest.raises(ValueError, match="rule 'custom' keeps 'median'"):
        find_rule_impacts(reports({EXPERT: {"gate_proj": 1.0, "up_proj": 2.0}}, MODELOPT), MODELOPT, [rule])


def test_a_new_rule_is_one_table_entry():
    rule = EngineRule("next", "a future engine", ("modelopt",), (("to_q", "to_k", "to_v"),), False, "largest", "its PR")
    groups = {"blocks.0.attn": {"to_q": 1.0, "to_k": 2.0, "to_v": 1.0}}
    (found,) = find_rule_impacts(reports(groups, MODELOPT), MODELOPT, [rule])
    assert (found.members, found.affected, found.worst_error) == (3, 2, 1.0)
