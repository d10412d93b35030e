"""core.formats: recognising NVFP4 checkpoint layouts from their keys."""

import pytest

from sharedquant.core.formats import (
    COMPRESSED_TENSORS,
    DEFAULT_PATTERNS,
    MODELOPT,
    QUANTIZER_STATE,
    block_size,
    detect_format,
    find_members,
)
from sharedquant.core.groups import find_groups, join_fqn

ATTN = "model.layers.0.self_attn"

MODELOPT_KEYS = [
    "lm_head.weight",
    f"{ATTN}.k_proj.input_scale",
    f"{ATTN}.k_proj.weight",
    f"{ATTN}.k_proj.weight_scale",
    f"{ATTN}.k_proj.weight_scale_2",
    f"{ATTN}.q_proj.weight",
    f"{ATTN}.q_proj.weight_scale",
    f"{ATTN}.q_proj.weight_scale_2",
    "model.norm.weight",
]
CT_KEYS = [
    f"{ATTN}.q_proj.weight_packed",
    f"{ATTN}.q_proj.weight_scale",
    f"{ATTN}.q_proj.weight_global_scale",
    f"{ATTN}.q_proj.input_global_scale",
    "model.norm.weight",
]
STATE_KEYS = [
    f"{ATTN}.q_proj.weight_quantizer._amax",
    f"{ATTN}.q_proj.input_quantizer._amax",
    f"{ATTN}.k_proj.weight_quantizer._amax",
    f"{ATTN}.k_proj.weight_quantizer._global_amax",
    f"{ATTN}.v_proj.weight_quantizer._global_amax",
]


@pytest.mark.parametrize(
    ("keys", "expected"),
    [(MODELOPT_KEYS, MODELOPT), (CT_KEYS, COMPRESSED_TENSORS), (STATE_KEYS, QUANTIZER_STATE)],
)
def test_detect_format_recognises_each_layout(keys, expected):
    assert detect_format(keys) is expected


def test_only_compressed_tensors_scales_are_reciprocal():
    assert COMPRESSED_TENSORS.reciprocal and not MODELOPT.reciprocal and not QUANTIZER_STATE.reciprocal


def test_detect_format_refuses_keys_of_no_known_format():
    with pytest.raises(ValueError, match=r"detect_format: no key of a known quantized format.*weight_scale_2"):
        detect_format(["model.layers.0.self_attn.q_proj.weight", "model.norm.weight"])


def test_detect_format_refuses_a_mix_of_formats():
    with pytest.raises(ValueError, match=r"more than one format: .*compressed-tensors.*modelopt|more than one format: .*modelopt.*compressed-tensors"):
        detect_format(MODELOPT_KEYS + CT_KEYS)


def test_find_members_lists_each_quantized_module_once_in_key_order():
    assert find_members(MODELOPT_KEYS, MODELOPT) == (f"{ATTN}.k_proj", f"{ATTN}.q_proj")
    assert find_members(CT_KEYS, COMPRESSED_TENSORS) == (f"{ATTN}.q_proj",)


def test_calibration_state_members_come_from_amax_or_global_amax():
    # the input quantizer's _amax is not a weight scale: it must not make a member
    assert find_members(STATE_KEYS, QUANTIZER_STATE) == (f"{ATTN}.q_proj", f"{ATTN}.k_proj", f"{ATTN}.v_proj")


def test_a_key_at_the_root_names_the_root_module():
    assert find_members(["weight_scale_2", "weight"], MODELOPT) == ("",)
    assert join_fqn("", "weight_scale") == "weight_scale"
    assert join_fqn("a.b", "weight_scale") == "a.b.weight_scale"


def test_a_similar_suffix_is_not_a_scale_key():
    assert find_members(["x.my_weight_scale_2", "x.weight_scale_2_copy"], MODELOPT) == ()


def test_block_size_comes_from_the_shapes():
    assert block_size("m", (64, 32), (64, 4)) == 16
    assert block_size("m", (8, 64, 32), (8, 64, 2)) == 32


@pytest.mark.parametrize(
    ("packed", "scales"),
    [((64, 32), (32, 4)), ((64, 32), (64, 5)), ((64, 32), (64,)), ((64, 0), (64, 4)), ((), ())],
)
def test_block_size_refuses_shapes_that_do_not_tile(packed, scales):
    with pytest.raises(ValueError, match=r"block_size: 'm' has packed codes of shape"):
        block_size("m", packed, scales)


def test_default_patterns_fuse_the_mla_down_projections():
    names = [
        "model.layers.0.self_attn.q_a_proj",
        "model.layers.0.self_attn.kv_a_proj_with_mqa",
        "model.layers.0.self_attn.q_b_proj",
        "model.layers.0.self_attn.kv_b_proj",
        "model.layers.0.mlp.experts.3.gate_proj",
        "model.layers.0.mlp.experts.3.up_proj",
    ]
    groups = find_groups(names, DEFAULT_PATTERNS)
    assert [group.members for group in groups] == [
        ("model.layers.0.self_attn.q_a_proj", "model.layers.0.self_attn.kv_a_proj_with_mqa"),
        ("model.layers.0.mlp.experts.3.gate_proj", "model.layers.0.mlp.experts.3.up_proj"),
    ]
