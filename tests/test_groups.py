"""Examples for sharedquant.core.groups: which names export fuses, and who owns the group."""

from __future__ import annotations

import dataclasses
import re

import pytest

from sharedquant.core.groups import (
    SHARED_PATTERNS,
    SHARED_PATTERNS_ACROSS_EXPERTS,
    Group,
    compile_patterns,
    find_groups,
    parent_fqn,
)


def as_tuples(groups):
    return [(g.key, g.parent, g.members) for g in groups]


def test_default_patterns_are_the_seed_strings():
    assert SHARED_PATTERNS == (
        r"(?:(.*)\.)?(?:q_proj|k_proj|v_proj)",
        r"(?:(.*)\.)?(?:gate_proj|up_proj)",
        r"(?:(.*)\.)?(?:w1|w3)",
    )
    assert SHARED_PATTERNS_ACROSS_EXPERTS[:2] == SHARED_PATTERNS[:2]
    assert SHARED_PATTERNS_ACROSS_EXPERTS[2] == r"(?:(.*)\.)?(?:experts|local_experts)\.\d+\.(?:w1|w3)"


def test_llama_groups_qkv_and_gate_up_per_layer(llama_names):
    groups = find_groups(llama_names, SHARED_PATTERNS)
    assert as_tuples(groups) == [
        (
            (0, ("model.layers.0.self_attn",)),
            "model.layers.0.self_attn",
            ("model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.k_proj", "model.layers.0.self_attn.v_proj"),
        ),
        (
            (1, ("model.layers.0.mlp",)),
            "model.layers.0.mlp",
            ("model.layers.0.mlp.gate_proj", "model.layers.0.mlp.up_proj"),
        ),
        (
            (0, ("model.layers.1.self_attn",)),
            "model.layers.1.self_attn",
            ("model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.k_proj", "model.layers.1.self_attn.v_proj"),
        ),
        (
            (1, ("model.layers.1.mlp",)),
            "model.layers.1.mlp",
            ("model.layers.1.mlp.gate_proj", "model.layers.1.mlp.up_proj"),
        ),
    ]
    grouped = {m for g in groups for m in g.members}
    assert not any(name.endswith(("o_proj", "down_proj")) for name in grouped)


def test_mixtral_default_patterns_group_w1_w3_per_expert(mixtral_names):
    groups = find_groups(
        mixtral_names, SHARED_PATTERNS, containers=["model.layers", "model.layers.0.block_sparse_moe.experts"]
    )
    experts = [g for g in groups if g.key[0] == 2]
    prefix = "model.layers.0.block_sparse_moe.experts"
    assert as_tuples(experts) == [
        ((2, (f"{prefix}.{e}",)), f"{prefix}.{e}", (f"{prefix}.{e}.w1", f"{prefix}.{e}.w3")) for e in range(3)
    ]


def test_mixtral_across_experts_is_one_group_per_layer_owned_above_the_expert_list(mixtral_names):
    prefix = "model.layers.0.block_sparse_moe"
    containers = ["model.layers", f"{prefix}.experts"]
    attention, moe = find_groups(mixtral_names, SHARED_PATTERNS_ACROSS_EXPERTS, containers=containers)
    assert attention.parent == "model.layers.0.self_attn"
    assert moe.key == (2, (prefix,))
    assert moe.members == tuple(f"{prefix}.experts.{e}.{role}" for e in range(3) for role in ("w1", "w3"))
    # The expert list cannot own state: the group climbs past it to the MoE block.
    assert moe.parent == prefix
    # Without the container hint the deepest common ancestor is the list itself.
    _, unclimbed = find_groups(mixtral_names, SHARED_PATTERNS_ACROSS_EXPERTS)
    assert unclimbed.parent == f"{prefix}.experts"


def test_local_experts_are_grouped_across_experts_too():
    names = [f"m.local_experts.{e}.{role}" for e in range(2) for role in ("w1", "w2", "w3")]
    (group,) = find_groups(names, SHARED_PATTERNS_ACROSS_EXPERTS, containers=["m.local_experts"])
    assert group.members == (
        "m.local_experts.0.w1",
        "m.local_experts.0.w3",
        "m.local_experts.1.w1",
        "m.local_experts.1.w3",
    )
    assert group.parent == "m"


def test_experts_with_gate_up_names_group_per_expert_under_either_pattern_set():
    names = [f"mlp.experts.{e}.{role}" for e in range(2) for role in ("gate_proj", "up_proj", "down_proj")]
    for patterns in (SHARED_PATTERNS, SHARED_PATTERNS_ACROSS_EXPERTS):
        groups = find_groups(names, patterns)
        assert [g.members for g in groups] == [
            ("mlp.experts.0.gate_proj", "mlp.experts.0.up_proj"),
            ("mlp.experts.1.gate_proj", "mlp.experts.1.up_proj"),
        ]


def test_shared_expert_gate_next_to_gate_up_is_not_grouped():
    names = ["mlp.gate", "mlp.shared_expert.gate_proj", "mlp.shared_expert.up_proj", "mlp.shared_expert_gate"]
    (group,) = find_groups(names, SHARED_PATTERNS)
    assert group.members == ("mlp.shared_expert.gate_proj", "mlp.shared_expert.up_proj")
    assert group.parent == "mlp.shared_expert"


def test_names_match_in_full_not_as_substrings():
    names = ["attn.q_proj_extra", "attn.k_proj", "attn.xv_proj", "attn.v_proj.lora"]
    assert find_groups(names, SHARED_PATTERNS) == ()


def test_first_matching_pattern_wins_and_groups_of_one_are_dropped():
    names = ["a.q_proj", "a.k_proj", "a.v_proj"]
    patterns = [r"(.*)\.q_proj", r"(.*)\.(?:q_proj|k_proj|v_proj)"]
    (group,) = find_groups(names, patterns)
    # q_proj matched pattern 0 first and is alone there, so it is dropped; k/v form pattern 1's group.
    assert group.key == (1, ("a",)) and group.members == ("a.k_proj", "a.v_proj")


def test_same_capture_under_two_patterns_gives_two_groups():
    names = ["blk.q_proj", "blk.k_proj", "blk.gate_proj", "blk.up_proj"]
    groups = find_groups(names, SHARED_PATTERNS)
    assert [g.key for g in groups] == [(0, ("blk",)), (1, ("blk",))]
    assert {g.parent for g in groups} == {"blk"}


def test_top_level_members_belong_to_the_root():
    (group,) = find_groups(["q_proj", "k_proj", "v_proj"], SHARED_PATTERNS)
    assert group.key == (0, (None,))
    assert group.parent == ""


def test_parent_is_the_deepest_common_ancestor_for_uncaptured_patterns():
    names = ["enc.block.0.attn.q", "enc.block.1.attn.q", "enc.block.1.ffn.q"]
    (group,) = find_groups(names, [r".*\.q"])
    assert group.key == (0, ())
    assert group.parent == "enc.block"
    assert find_groups(names, [r".*\.q"], containers=["enc.block"])[0].parent == "enc"


def test_containers_are_climbed_past_up_to_the_root():
    names = ["stack.0.0.q_proj", "stack.1.0.q_proj"]
    (group,) = find_groups(names, [r"(?:.*\.)?q_proj"], containers=["stack", "stack.0", "stack.1"])
    assert group.parent == ""


def test_duplicates_are_ignored_and_order_is_first_seen():
    names = ["x.v_proj", "y.k_proj", "x.q_proj", "x.v_proj", "y.q_proj"]
    groups = find_groups(names, SHARED_PATTERNS)
    assert [g.members for g in groups] == [("x.v_proj", "x.q_proj"), ("y.k_proj", "y.q_proj")]


def test_names_may_be_any_iterable():
    assert find_groups((n for n in ["a.w1", "a.w3"]), SHARED_PATTERNS)[0].members == ("a.w1", "a.w3")


@pytest.mark.parametrize("patterns", [None, [], ()])
def test_no_patterns_find_nothing(patterns, llama_names):
    assert find_groups(llama_names, patterns) == ()


def test_invalid_regex_is_a_value_error_naming_the_pattern():
    with pytest.raises(ValueError, match=re.escape("find_groups: invalid regex '(unclosed'")):
        find_groups(["a"], [r"(?:(.*)\.)?q_proj", "(unclosed"])


def test_patterns_must_be_a_sequence_of_strings():
    with pytest.raises(TypeError, match="find_groups: patterns must be a sequence of regex strings, got the string"):
        find_groups(["a.q_proj"], r"(.*)\.q_proj")
    with pytest.raises(TypeError, match="find_groups: a pattern must be a string, got 3"):
        find_groups(["a.q_proj"], [3])
    with pytest.raises(TypeError, match="where: patterns must be a sequence of regex strings, got 7"):
        compile_patterns(7, where="where")


def test_compile_patterns_returns_compiled_regexes_in_order():
    compiled = compile_patterns(SHARED_PATTERNS)
    assert [c.pattern for c in compiled] == list(SHARED_PATTERNS)


def test_group_is_frozen_and_hashable():
    group = Group(key=(0, ("a",)), parent="a", members=("a.q_proj", "a.k_proj"))
    assert hash(group) == hash(Group(key=(0, ("a",)), parent="a", members=("a.q_proj", "a.k_proj")))
    with pytest.raises(dataclasses.FrozenInstanceError):
        group.parent = "b"


@pytest.mark.parametrize(("fqn", "parent"), [("a.b.c", "a.b"), ("a", ""), ("", "")])
def test_parent_fqn(fqn, parent):
    assert parent_fqn(fqn) == parent
