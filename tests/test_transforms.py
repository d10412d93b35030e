"""Examples for sharedquant.core.transforms: unify_state_dict and its parts, no module anywhere."""

from __future__ import annotations

import re
from collections import OrderedDict

import pytest
import safetensors.torch
import torch

from sharedquant.core.groups import SHARED_PATTERNS, SHARED_PATTERNS_ACROSS_EXPERTS, find_groups
from sharedquant.core.transforms import find_quantized, global_amax_entries, unify_state_dict


def amax(fqn: str) -> str:
    return f"{fqn}.weight_quantizer._amax"


def global_amax(fqn: str) -> str:
    return f"{fqn}.weight_quantizer._global_amax"


@pytest.fixture
def calibrated(llama_names) -> dict[str, torch.Tensor]:
    """A calibrated state dict: weights, per-block weight amax (static NVFP4 layout), input amax."""
    state_dict = {}
    for index, name in enumerate(llama_names):
        state_dict[f"{name}.weight"] = torch.randn(8, 32)
        state_dict[amax(name)] = torch.rand(16, 1) * (index + 1)
        state_dict[f"{name}.input_quantizer._amax"] = torch.tensor(10.0 + index)
    return state_dict


def test_unify_gives_group_members_the_group_max_and_singles_their_own(calibrated, llama_names):
    unified = unify_state_dict(calibrated)
    for layer in range(2):
        attn = [f"model.layers.{layer}.self_attn.{r}" for r in ("q_proj", "k_proj", "v_proj")]
        mlp = [f"model.layers.{layer}.mlp.{r}" for r in ("gate_proj", "up_proj")]
        for group in (attn, mlp):
            expected = max(calibrated[amax(m)].max().item() for m in group)
            assert [unified[global_amax(m)].item() for m in group] == [expected] * len(group)
        for single in (f"model.layers.{layer}.self_attn.o_proj", f"model.layers.{layer}.mlp.down_proj"):
            assert unified[global_amax(single)].item() == calibrated[amax(single)].max().item()
    added = set(unified) - set(calibrated)
    assert added == {global_amax(name) for name in llama_names}
    assert all(unified[key].shape == () and unified[key].dtype == torch.float32 for key in added)


def test_unify_passes_every_other_entry_through_as_is(calibrated):
    unified = unify_state_dict(calibrated)
    for key, tensor in calibrated.items():
        assert unified[key] is tensor


@pytest.mark.parametrize("moved", [None, "model.layers.0.self_attn.q_proj.weight_quantizer._amax"])
def test_unify_keeps_the_order_and_items_of_an_ordered_dict_even_reordered(calibrated, llama_names, moved):
    state_dict = OrderedDict(calibrated)  # what nn.Module.state_dict() returns
    if moved is not None:
        state_dict.move_to_end(moved, last=False)  # its order now differs from the dict underneath
    unified = unify_state_dict(state_dict)
    assert type(unified) is dict
    assert list(unified)[: len(state_dict)] == list(state_dict)
    assert set(list(unified)[len(state_dict) :]) == {global_amax(name) for name in llama_names}
    assert all(unified[key] is tensor for key, tensor in state_dict.items())


def test_unify_leaves_its_input_untouched(calibrated):
    keys = list(calibrated)
    snapshot = {k: (v.clone(), v.data_ptr()) for k, v in calibrated.items()}
    unify_state_dict(calibrated)
    assert list(calibrated) == keys
    for key, (value, pointer) in snapshot.items():
        assert torch.equal(calibrated[key], value) and calibrated[key].data_ptr() == pointer


def test_unify_is_idempotent_and_replaces_stale_global_amax(calibrated):
    once = unify_state_dict(calibrated)
    twice = unify_state_dict(once)
    assert list(twice) == list(once)
    assert all(torch.equal(twice[k], once[k]) for k in once)
    stale = {**calibrated, global_amax("model.layers.0.self_attn.q_proj"): torch.tensor(1e6)}
    assert torch.equal(
        unify_state_dict(stale)[global_amax("model.layers.0.self_attn.q_proj")],
        once[global_amax("model.layers.0.self_attn.q_proj")],
    )


def test_unify_rounds_fp64_amax_up():
    state_dict = {
        amax("a.q_proj"): torch.tensor(1.0 + 2**-30, dtype=torch.float64),
        amax("a.o_proj"): torch.tensor(1.0 + 2**-30, dtype=torch.float64),
    }
    unified = unify_state_dict(state_dict)
    assert unified[global_amax("a.q_proj")].item() > 1.0 and unified[global_amax("a.o_proj")].item() > 1.0


def test_unify_without_patterns_gives_everyone_their_own(calibrated, llama_names):
    for patterns in (None, []):
        unified = unify_state_dict(calibrated, patterns)
        for name in llama_names:
            assert unified[global_amax(name)].item() == calibrated[amax(name)].max().item()


def test_unify_across_experts_shares_one_value_per_layer(mixtral_names):
    state_dict = {amax(name): torch.tensor(float(i + 1)) for i, name in enumerate(mixtral_names)}
    per_expert = unify_state_dict(state_dict, SHARED_PATTERNS)
    across = unify_state_dict(state_dict, SHARED_PATTERNS_ACROSS_EXPERTS)
    w1_w3 = [n for n in mixtral_names if n.endswith(("w1", "w3"))]
    assert {across[global_amax(n)].item() for n in w1_w3} == {max(state_dict[amax(n)].item() for n in w1_w3)}
    assert len({per_expert[global_amax(n)].item() for n in w1_w3}) == 3  # one value per expert


def test_unify_follows_the_quantizer():
    state_dict = {
        "a.q_proj.input_quantizer._amax": torch.tensor(2.0),
        "a.k_proj.input_quantizer._amax": torch.tensor(3.0),
    }
    unified = unify_state_dict(state_dict, quantizer="input_quantizer")
    assert unified["a.q_proj.input_quantizer._global_amax"].item() == 3.0
    assert set(unify_state_dict(state_dict)) == set(state_dict)  # no weight_quantizer amax: nothing to add


def test_unified_state_dict_is_safetensors_clean(calibrated, tmp_path):
    unified = unify_state_dict(calibrated)
    path = tmp_path / "model.safetensors"
    safetensors.torch.save_file(unified, str(path))
    loaded = safetensors.torch.load_file(str(path))
    assert all(torch.equal(loaded[k], unified[k]) for k in unified)


def test_unify_refuses_bad_input(calibrated):
    with pytest.raises(TypeError, match="unify_state_dict: expected a mapping of names to tensors, got list"):
        unify_state_dict(list(calibrated.items()))
    with pytest.raises(ValueError, match=re.escape("find_groups: invalid regex '[q'")):
        unify_state_dict(calibrated, ["[q"])
    poisoned = {**calibrated, amax("model.layers.1.mlp.up_proj"): torch.tensor([0.5, float("nan")])}
    with pytest.raises(
        ValueError, match=re.escape("finalize: 'model.layers.1.mlp.up_proj.weight_quantizer._amax' is not finite")
    ):
        unify_state_dict(poisoned)


def test_find_quantized_lists_modules_with_the_quantizer_amax_in_key_order():
    keys = [
        "weight_quantizer._amax",
        "b.weight",
        "b.weight_quantizer._amax",
        "b.input_quantizer._amax",
        "a.weight_quantizer._global_amax",
        "a.weight_quantizer._amax",
        "c.my_weight_quantizer._amax",
    ]
    assert find_quantized(keys) == ("", "b", "a")
    assert find_quantized(keys, "input_quantizer") == ("b",)


def test_global_amax_entries_give_each_name_outside_the_groups_its_own_amax():
    # a repeated name gets one entry; a name without an amax gets none
    names = ["x.q_proj", "x.k_proj", "x.o_proj", "lm_head", "x.o_proj", "y.no_amax"]
    buffers = {amax(name): torch.tensor([[1.0 + i], [-4.0 * i]]) for i, name in enumerate(names[:4])}
    groups = find_groups(names, SHARED_PATTERNS)
    entries = global_amax_entries(groups, buffers, names=names)
    # the groups' members in group order, then the other names in their order
    expected = {"x.q_proj": 4.0, "x.k_proj": 4.0, "x.o_proj": 8.0, "lm_head": 12.0}
    assert list(entries) == [global_amax(name) for name in expected]
    assert [value.item() for value in entries.values()] == list(expected.values())
    grouped_only = global_amax_entries(groups, buffers)
    assert list(grouped_only) == [global_amax("x.q_proj"), global_amax("x.k_proj")]
    assert all(torch.equal(grouped_only[key], entries[key]) for key in grouped_only)


def test_global_amax_entries_cover_exactly_the_members_given(calibrated):
    groups = find_groups(find_quantized(calibrated), SHARED_PATTERNS)
    entries = global_amax_entries(groups, calibrated)
    assert set(entries) == {global_amax(m) for g in groups for m in g.members}
    unified = unify_state_dict(calibrated)
    assert all(torch.equal(entries[k], unified[k]) for k in entries)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float8_e4m3fn])
def test_unify_state_dict_refuses_a_negative_amax_naming_its_key(dtype):
    state = {
        "layers.0.q_proj.weight_quantizer._amax": torch.tensor([1.0, 2.0]),
        "layers.0.k_proj.weight_quantizer._amax": torch.tensor([0.5, -3.0]).to(dtype),
    }
    with pytest.raises(ValueError, match=r"'layers.0.k_proj.weight_quantizer._amax' holds a negative amax \(-3.0\)"):
        unify_state_dict(state)
    state["layers.0.k_proj.weight_quantizer._amax"] = torch.tensor([0.5, 3.0]).to(dtype)
    assert unify_state_dict(state)["layers.0.k_proj.weight_quantizer._global_amax"] == 3.0
