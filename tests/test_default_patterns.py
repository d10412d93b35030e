"""core.groups' checkpoint vocabulary: the default patterns, members in role order, the kind of a group."""

import pytest

from sharedquant.core import formats
from sharedquant.core.groups import (
    DEFAULT_PATTERNS,
    MLA_PATTERN,
    SHARED_PATTERNS,
    SHARED_PATTERNS_ACROSS_EXPERTS,
    Group,
    find_groups,
    group_kind,
    in_role_order,
    is_expert,
)


def test_the_checkpoint_defaults_are_one_list_that_formats_re_exports():
    assert formats.DEFAULT_PATTERNS is DEFAULT_PATTERNS and formats.MLA_PATTERN is MLA_PATTERN
    assert DEFAULT_PATTERNS[: len(SHARED_PATTERNS)] == SHARED_PATTERNS  # the peer's list stays as it is


@pytest.mark.parametrize(
    ("names", "members"),
    [
        # Qwen3.5 gated delta net: vLLM's in_proj_qkvz and in_proj_ba
        (["l.0.linear_attn.in_proj_qkv", "l.0.linear_attn.in_proj_z", "l.0.linear_attn.out_proj"],
         [("l.0.linear_attn.in_proj_qkv", "l.0.linear_attn.in_proj_z")]),
        (["l.0.linear_attn.in_proj_b", "l.0.linear_attn.in_proj_a"], [("l.0.linear_attn.in_proj_b", "l.0.linear_attn.in_proj_a")]),
        # diffusers self attention and joint attention (SD3, Flux): two groups in one module, to_out alone
        (["b.0.attn.to_q", "b.0.attn.to_k", "b.0.attn.to_v", "b.0.attn.to_out.0",
          "b.0.attn.add_q_proj", "b.0.attn.add_k_proj", "b.0.attn.add_v_proj", "b.0.attn.to_add_out"],
         [("b.0.attn.to_q", "b.0.attn.to_k", "b.0.attn.to_v"),
          ("b.0.attn.add_q_proj", "b.0.attn.add_k_proj", "b.0.attn.add_v_proj")]),
        # InternLM2's feed_forward w1/w3 (vLLM gate_up_proj), w2 alone
        (["l.0.feed_forward.w1", "l.0.feed_forward.w2", "l.0.feed_forward.w3"], [("l.0.feed_forward.w1", "l.0.feed_forward.w3")]),
    ],
)  # fmt: skip
def test_default_patterns_know_the_fused_vocabularies(names, members):
    assert [group.members for group in find_groups(names, DEFAULT_PATTERNS)] == members


def test_members_follow_the_alternation_not_the_sorted_keys():
    names = sorted(["a.v_proj", "a.k_proj", "a.q_proj", "e.up_proj", "e.gate_proj", "b.to_v", "b.to_k", "b.to_q"])
    groups = in_role_order(find_groups(names, DEFAULT_PATTERNS), DEFAULT_PATTERNS)
    assert [group.members for group in groups] == [
        ("a.q_proj", "a.k_proj", "a.v_proj"), ("b.to_q", "b.to_k", "b.to_v"), ("e.gate_proj", "e.up_proj"),
    ]  # fmt: skip
    assert [(g.key, g.parent) for g in groups] == [(g.key, g.parent) for g in find_groups(names, DEFAULT_PATTERNS)]


def test_role_order_keeps_experts_apart_and_unknown_roles_last():
    moe = "m.layers.0.block_sparse_moe"
    names = [f"{moe}.experts.{e}.{role}" for e in (0, 1, 2) for role in ("w3", "w1")]
    (group,) = in_role_order(find_groups(names, SHARED_PATTERNS_ACROSS_EXPERTS), SHARED_PATTERNS_ACROSS_EXPERTS)
    assert [m.removeprefix(moe + ".") for m in group.members] == [
        "experts.0.w1", "experts.0.w3", "experts.1.w1", "experts.1.w3", "experts.2.w1", "experts.2.w3",
    ]  # fmt: skip
    custom = [r"(?:(.*)\.)?(?:k|q)_(?:proj|lin)"]  # roles k, q in its first alternation; proj/lin last
    (group,) = in_role_order(find_groups(["a.q_proj", "a.k_proj", "a.q_lin"], custom), custom)
    assert group.members == ("a.q_proj", "a.k_proj", "a.q_lin")  # no role names these: first-seen order


@pytest.mark.parametrize(
    ("members", "kind"),
    [
        (("l.0.attn.q_proj", "l.0.attn.k_proj", "l.0.attn.v_proj"), "q_proj/k_proj/v_proj"),
        (("l.0.mlp.experts.7.gate_proj", "l.0.mlp.experts.7.up_proj"), "gate_proj/up_proj (per expert)"),
        (("l.0.mlp.shared_experts.gate_proj", "l.0.mlp.shared_experts.up_proj"), "gate_proj/up_proj"),
        (("moe.experts.0.w1", "moe.experts.0.w3", "moe.experts.1.w1", "moe.experts.1.w3"), "w1/w3 (across experts)"),
        (("l.0.self_attn.q_a_proj", "l.0.self_attn.kv_a_proj_with_mqa"), "q_a_proj/kv_a_proj_with_mqa"),
    ],
)
def test_a_group_kind_is_its_role_set_and_where_it_lies(members, kind):
    assert group_kind(Group(key=(0, ("x",)), parent="x", members=members)) == kind


@pytest.mark.parametrize(
    ("fqn", "expert"),
    [("l.0.mlp.experts.12", True), ("experts.0", True), ("moe.local_experts.3", True), ("l.0.mlp.shared_experts", False),
     ("l.0.mlp.experts", False), ("l.0.mlp.experts.12.gate_proj", False), ("my_experts.1", False)],
)  # fmt: skip
def test_is_expert_names_one_routed_expert(fqn, expert):
    assert is_expert(fqn) is expert
