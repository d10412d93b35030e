"""Examples for sharedquant.core.lifecycle: finalize, sync, restore, member_entries over buffer dicts."""

from __future__ import annotations

import re
import threading

import pytest
import safetensors.torch
import torch

from sharedquant.core.groups import SHARED_PATTERNS, Group, find_groups
from sharedquant.core.lifecycle import buffer_key, finalize, member_entries, restore, sync
from sharedquant.core.state import UNSET, SharedAmax

NAMES = ["blk.q_proj", "blk.k_proj", "blk.v_proj", "blk.o_proj", "mlp.gate_proj", "mlp.up_proj"]
GROUPS = find_groups(NAMES, SHARED_PATTERNS)  # (blk q/k/v), (mlp gate/up)
ATTN, MLP = (g.key for g in GROUPS)


def amax(fqn: str) -> str:
    return buffer_key(fqn, "weight_quantizer", "_amax")


def global_amax(fqn: str) -> str:
    return buffer_key(fqn, "weight_quantizer", "_global_amax")


def run_ranks(states, *, timeout=10.0):
    """``sync`` every rank's state at once through a fake MAX all-reduce that waits for all ranks.

    Returns the per-rank results (or the exception each rank raised) and each rank's call count.
    """
    world = len(states)
    barrier = threading.Barrier(world, timeout=timeout)
    inbox: list[torch.Tensor | None] = [None] * world
    calls = [0] * world
    results: list[object] = [None] * world

    def worker(rank):
        def all_reduce(packed):
            calls[rank] += 1
            inbox[rank] = packed.clone()
            barrier.wait()
            reduced = torch.stack(inbox).amax(0)
            barrier.wait()
            return reduced

        try:
            results[rank] = sync(states[rank], all_reduce)
        except Exception as error:  # noqa: BLE001 - handed back for the test to inspect
            results[rank] = error

    threads = [threading.Thread(target=worker, args=(rank,)) for rank in range(world)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout)
    return results, calls


# --- buffer_key ---------------------------------------------------------------------------


def test_buffer_key_names_the_quantizer_buffer():
    assert buffer_key("a.b", "weight_quantizer", "_amax") == "a.b.weight_quantizer._amax"
    assert buffer_key("", "weight_quantizer", "_amax") == "weight_quantizer._amax"


# --- finalize -----------------------------------------------------------------------------


def test_finalize_takes_the_max_over_members_as_fp32_zero_dim_values():
    buffers = {
        amax("blk.q_proj"): torch.tensor([[0.5], [1.5]]),
        amax("blk.k_proj"): torch.tensor([[2.25], [0.1]]),
        amax("blk.v_proj"): torch.tensor(-3.0, dtype=torch.bfloat16),  # sign ignored, like reduce_amax
        amax("blk.o_proj"): torch.tensor(100.0),  # not in a group
        amax("mlp.gate_proj"): torch.tensor(0.75, dtype=torch.float16),
        amax("mlp.up_proj"): torch.tensor([0.5, 0.25]),
    }
    state = finalize(GROUPS, buffers)
    assert isinstance(state, SharedAmax) and state.groups == GROUPS
    assert state.global_amax.dtype == torch.float32 and state.global_amax.shape == (2,)
    assert state[ATTN].shape == () and state[ATTN].item() == 3.0
    assert state[MLP].item() == 0.75


def test_finalize_rounds_an_fp64_member_up_never_below_it():
    value = 1.0 + 2**-30
    state = finalize(
        GROUPS, {amax("blk.q_proj"): torch.tensor(value, dtype=torch.float64), amax("blk.k_proj"): torch.tensor(1.0)}
    )
    assert state[ATTN].item() > 1.0
    assert state[ATTN].item() == 1.0 + 2**-23
    assert state[ATTN].item() >= value


def test_finalize_skips_missing_none_and_meta_members():
    buffers = {
        amax("blk.q_proj"): torch.empty(4, device="meta"),
        amax("blk.k_proj"): None,
        amax("blk.v_proj"): torch.tensor(0.5),
        amax("mlp.gate_proj"): torch.empty(2, device="meta"),
    }
    state = finalize(GROUPS, buffers)
    assert state[ATTN].item() == 0.5
    assert state[MLP].item() == UNSET
    assert state.is_set().tolist() == [True, False]


def test_finalize_of_nothing_is_all_unset_and_of_no_groups_is_empty():
    assert finalize(GROUPS, {}).global_amax.tolist() == [UNSET, UNSET]
    empty = finalize((), {})
    assert empty.groups == () and empty.global_amax.shape == (0,)


def test_finalize_reads_the_named_quantizer():
    buffers = {
        "blk.q_proj.input_quantizer._amax": torch.tensor(4.0),
        "blk.k_proj.input_quantizer._amax": torch.tensor(2.0),
    }
    assert finalize(GROUPS, buffers, quantizer="input_quantizer")[ATTN].item() == 4.0
    assert finalize(GROUPS, buffers)[ATTN].item() == UNSET


def test_finalize_root_members_use_the_bare_quantizer_key():
    (group,) = find_groups(["", "child"], [r".*"])  # a quantized root module grouped with its child
    assert group.members == ("", "child")
    state = finalize([group], {"weight_quantizer._amax": torch.tensor(3.0), amax("child"): torch.tensor(1.0)})
    assert state.global_amax.tolist() == [3.0]


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_finalize_refuses_a_non_finite_member_naming_it(bad):
    buffers = {
        amax("blk.q_proj"): torch.tensor([1.0]),
        amax("blk.k_proj"): torch.tensor([0.5, bad]),
        amax("mlp.up_proj"): torch.tensor(1.0),
    }
    with pytest.raises(ValueError, match=re.escape("finalize: 'blk.k_proj.weight_quantizer._amax' is not finite")):
        finalize(GROUPS, buffers)


def test_finalize_refuses_a_name_claimed_by_two_groups():
    overlapping = GROUPS + (Group(key=(7, ()), parent="", members=("blk.k_proj", "mlp.up_proj")),)
    with pytest.raises(
        ValueError, match=r"finalize: 'blk\.k_proj' is claimed by group 'blk' .* and by group '<root>' \(7, \(\)\)"
    ):
        finalize(overlapping, {})


def test_finalize_refuses_empty_and_non_tensor_amax_and_non_groups():
    with pytest.raises(ValueError, match=re.escape("finalize: 'blk.q_proj.weight_quantizer._amax' is empty")):
        finalize(GROUPS, {amax("blk.q_proj"): torch.empty(0)})
    with pytest.raises(
        TypeError, match=re.escape("finalize: 'blk.q_proj.weight_quantizer._amax' must be a tensor, got float")
    ):
        finalize(GROUPS, {amax("blk.q_proj"): 1.0})
    with pytest.raises(TypeError, match="finalize: expected Group values, got tuple"):
        finalize([("blk", ("blk.q_proj", "blk.k_proj"))], {})


# --- sync ---------------------------------------------------------------------------------


def test_sync_makes_one_all_reduce_call_with_everything_packed():
    state = SharedAmax(GROUPS, torch.tensor([2.0, UNSET]))
    seen = []

    def all_reduce(packed):
        seen.append(packed.clone())
        return packed * 1

    synced = sync(state, all_reduce)
    assert len(seen) == 1
    (packed,) = seen
    assert packed.dim() == 1 and packed.dtype == torch.float32
    assert packed[:2].tolist() == [2.0, UNSET]  # the values, then a fingerprint of the groups
    assert synced is not state and synced.groups == GROUPS
    assert synced.global_amax.tolist() == [2.0, UNSET]


def test_sync_over_fake_ranks_is_the_max_and_sets_groups_unset_locally():
    states = [
        SharedAmax(GROUPS, torch.tensor([2.0, UNSET])),
        SharedAmax(GROUPS, torch.tensor([3.5, UNSET])),
        SharedAmax(GROUPS, torch.tensor([1.0, 0.25])),
    ]
    results, calls = run_ranks(states)
    assert calls == [1, 1, 1]
    for result in results:
        assert isinstance(result, SharedAmax), result
        assert result.global_amax.tolist() == [3.5, 0.25]
    assert states[0].global_amax.tolist() == [2.0, UNSET]  # inputs untouched


def test_sync_refuses_ranks_that_hold_different_groups():
    other = (GROUPS[0], Group(key=(1, ("other",)), parent="other", members=("other.gate_proj", "other.up_proj")))
    results, _ = run_ranks([SharedAmax(GROUPS, torch.tensor([1.0, 2.0])), SharedAmax(other, torch.tensor([1.0, 2.0]))])
    for result in results:
        assert isinstance(result, RuntimeError)
        assert re.search(r"sync: ranks hold different shared-quant groups", str(result))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_sync_keeps_a_state_cast_to_another_dtype(dtype):
    # tree_map may cast the state; the group fingerprint must still survive the packing.
    state = SharedAmax(GROUPS, torch.tensor([2.0, UNSET], dtype=dtype))
    synced = sync(state, lambda packed: packed.clone())
    assert synced.global_amax.dtype == dtype
    assert synced.global_amax.tolist() == [2.0, UNSET]
    results, _ = run_ranks([state, SharedAmax(GROUPS, torch.tensor([UNSET, 0.5], dtype=dtype))])
    assert [r.global_amax.tolist() for r in results] == [[2.0, 0.5], [2.0, 0.5]]


def test_sync_refuses_a_reducer_that_changes_the_shape():
    with pytest.raises(RuntimeError, match=r"sync: all_reduce returned shape \(3,\), expected \(8,\)"):
        sync(SharedAmax(GROUPS, torch.tensor([1.0, 2.0])), lambda packed: packed[:3])


def test_sync_of_no_groups_still_checks_agreement():
    assert sync(SharedAmax((), torch.empty(0)), lambda packed: packed.clone()).global_amax.shape == (0,)


# --- restore ------------------------------------------------------------------------------


def test_restore_rebuilds_the_state_from_member_values():
    buffers = {
        global_amax("blk.q_proj"): torch.tensor(2.0),
        global_amax("blk.k_proj"): torch.tensor([2.0]),
        global_amax("blk.v_proj"): torch.tensor(2.0, dtype=torch.float64),
    }
    state = restore(GROUPS, buffers)
    assert state.global_amax.dtype == torch.float32
    assert state.global_amax.tolist() == [2.0, UNSET]


def test_restore_refuses_disagreeing_members_naming_group_members_and_values():
    buffers = {global_amax("blk.q_proj"): torch.tensor(2.0), global_amax("blk.k_proj"): torch.tensor(2.5)}
    expected = (
        "restore: group 'blk' (0, ('blk',)) members disagree on _global_amax or hold a non-finite one: "
        "blk.q_proj=2.0, blk.k_proj=2.5"
    )
    with pytest.raises(ValueError, match=re.escape(expected)):
        restore(GROUPS, buffers)


def test_restore_refuses_non_finite_values_and_multi_element_values():
    with pytest.raises(
        ValueError, match=re.escape("restore: group 'mlp' (1, ('mlp',)) members disagree") + ".*mlp.gate_proj=nan"
    ):
        restore(
            GROUPS,
            {global_amax("mlp.gate_proj"): torch.tensor(float("nan")), global_amax("mlp.up_proj"): torch.tensor(1.0)},
        )
    with pytest.raises(
        ValueError,
        match=re.escape("restore: 'blk.q_proj.weight_quantizer._global_amax' must hold one value, got shape (2,)"),
    ):
        restore(GROUPS, {global_amax("blk.q_proj"): torch.tensor([1.0, 1.0])})


def test_restore_reads_another_scalar_attribute():
    buffers = {amax("mlp.gate_proj"): torch.tensor(3.0), amax("mlp.up_proj"): torch.tensor(3.0)}
    assert restore(GROUPS, buffers, attr="_amax").global_amax.tolist() == [UNSET, 3.0]


def test_restore_round_trips_member_entries():
    state = SharedAmax(GROUPS, torch.tensor([0.125, 7.0]))
    back = restore(GROUPS, member_entries(state))
    assert back.groups == state.groups and torch.equal(back.global_amax, state.global_amax)


# --- member_entries -----------------------------------------------------------------------


def test_member_entries_are_independent_tensors_safetensors_accepts(tmp_path):
    state = SharedAmax(GROUPS, torch.tensor([1.5, 0.5]))
    entries = member_entries(state)
    assert list(entries) == [global_amax(m) for g in GROUPS for m in g.members]
    assert all(t.shape == () and t.dtype == torch.float32 for t in entries.values())
    assert [t.item() for t in entries.values()] == [1.5, 1.5, 1.5, 0.5, 0.5]
    pointers = {t.untyped_storage().data_ptr() for t in entries.values()}
    assert len(pointers) == len(entries)
    assert state.global_amax.untyped_storage().data_ptr() not in pointers
    path = tmp_path / "entries.safetensors"
    safetensors.torch.save_file(entries, str(path))
    loaded = safetensors.torch.load_file(str(path))
    assert {k: v.item() for k, v in loaded.items()} == {k: v.item() for k, v in entries.items()}


def test_member_entries_skip_unset_groups_and_follow_the_quantizer():
    entries = member_entries(SharedAmax(GROUPS, torch.tensor([UNSET, 2.0])), quantizer="input_quantizer")
    assert list(entries) == ["mlp.gate_proj.input_quantizer._global_amax", "mlp.up_proj.input_quantizer._global_amax"]
    assert member_entries(SharedAmax((), torch.empty(0))) == {}


def test_restore_compares_fp64_members_exactly_and_rounds_the_agreed_value_up():
    # 1 and 1 + 2**-40 are one fp32 value but two different scales: they disagree.
    apart = {
        global_amax("blk.q_proj"): torch.tensor(1.0, dtype=torch.float64),
        global_amax("blk.k_proj"): torch.tensor(1.0 + 2**-40, dtype=torch.float64),
    }
    with pytest.raises(ValueError, match="members disagree"):
        restore(GROUPS, apart)
    agreed = {k: torch.tensor(1.0 + 2**-40, dtype=torch.float64) for k in apart}
    assert restore(GROUPS, agreed).global_amax[0].item() > 1.0  # never below the stored value


def test_finalize_of_integer_amax_above_fp32_precision_never_rounds_down():
    big = 2**24 + 1  # not an fp32 value
    state = finalize(GROUPS, {amax("blk.q_proj"): torch.tensor([big], dtype=torch.int64)})
    assert state.global_amax[0].item() >= big


@pytest.mark.parametrize("fn", [finalize, restore])
def test_buffers_must_be_a_mapping(fn):
    with pytest.raises(TypeError, match=f"{fn.__name__}: buffers must map names to tensors, got list"):
        fn(GROUPS, [torch.tensor(1.0)])
