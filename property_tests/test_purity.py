"""Purity: every core call leaves its inputs as they were (values, storage, version counter),
and what it returns owns its memory."""

from __future__ import annotations

import copy
from collections.abc import Mapping

import torch
from hypothesis import given
from hypothesis import strategies as st

from sharedquant.core.config import update_quant_cfg_with_kv_cache_quant
from sharedquant.core.groups import find_groups
from sharedquant.core.lifecycle import finalize, member_entries, restore, sync
from sharedquant.core.nvfp4 import nvfp4_dequantize, nvfp4_fake_quant, nvfp4_quantize
from sharedquant.core.reduce import reduce_amax, reduce_amax_many, reduce_block_amax, reduce_sum
from sharedquant.core.state import SharedAmax
from sharedquant.core.transforms import global_amax_entries, unify_state_dict

from strategies import amax_buffers, pattern_sets, states, trees, weights


def fingerprint(obj):
    """What a pure call must not change: each tensor's bytes, storage pointer, version counter; container layout."""
    if isinstance(obj, torch.Tensor):
        if obj.is_meta:
            return ("meta", obj.dtype, tuple(obj.shape), obj._version)
        raw = obj.detach().reshape(-1).contiguous().view(torch.uint8).numpy().tobytes()
        return ("tensor", obj.dtype, tuple(obj.shape), obj.data_ptr(), obj._version, raw)
    if isinstance(obj, SharedAmax):
        return ("state", obj.groups, fingerprint(obj.global_amax))
    if isinstance(obj, Mapping):
        return ("mapping", [(key, fingerprint(value)) for key, value in obj.items()])
    if isinstance(obj, (list, tuple)):
        return (type(obj).__name__, [fingerprint(item) for item in obj])
    return ("value", copy.deepcopy(obj))


def storages(obj) -> set[int]:
    """Storage pointers of every materialised tensor in ``obj``."""
    if isinstance(obj, torch.Tensor):
        return set() if obj.is_meta else {obj.untyped_storage().data_ptr()}
    if isinstance(obj, SharedAmax):
        return storages(obj.global_amax)
    if isinstance(obj, Mapping):
        return set().union(*(storages(v) for v in obj.values())) if obj else set()
    if isinstance(obj, (list, tuple)):
        return set().union(*(storages(v) for v in obj)) if obj else set()
    return set()


def call_purely(fn, *args, **kwargs):
    """Call ``fn`` and assert it changed none of its arguments; return its result."""
    before = fingerprint((args, kwargs))
    result = fn(*args, **kwargs)
    assert fingerprint((args, kwargs)) == before, f"{fn.__name__} changed its input"
    return result


@given(
    weights(dtypes=(torch.float32, torch.bfloat16, torch.float16, torch.float8_e4m3fn, torch.int8)),
    st.sampled_from([None, 0, -1, (0, 1)]),
)
def test_reductions_leave_their_input_untouched(weight, axis):
    for fn in (reduce_amax, reduce_sum):
        call_purely(fn, weight, axis=axis)
    call_purely(reduce_block_amax, weight, {-1: 16})
    call_purely(reduce_amax_many, [weight, weight[:1]], torch.tensor([1, 0]), 2)


@given(trees(), pattern_sets())
def test_find_groups_leaves_names_and_patterns_untouched(tree, patterns):
    call_purely(find_groups, list(tree.names), list(patterns), containers=list(tree.containers))


@given(st.data())
def test_finalize_leaves_buffers_untouched_and_returns_fresh_memory(data):
    tree = data.draw(trees())
    groups = find_groups(tree.names, data.draw(pattern_sets()))
    buffers = data.draw(amax_buffers(tree.names))
    state = call_purely(finalize, groups, buffers)
    assert not storages(state) & storages(buffers)


@given(states())
def test_sync_leaves_the_state_untouched(state):
    synced = call_purely(sync, state, lambda packed: packed.clone())
    assert not storages(synced) & storages(state)


@given(states())
def test_member_entries_and_restore_leave_their_inputs_untouched(state):
    entries = call_purely(member_entries, state)
    assert not storages(entries) & storages(state)
    restored = call_purely(restore, state.groups, entries)
    assert not storages(restored) & storages(entries)


@given(st.data())
def test_unify_state_dict_leaves_the_state_dict_untouched(data):
    tree = data.draw(trees())
    state_dict = data.draw(amax_buffers(tree.names))
    state_dict["lm_head.weight"] = torch.ones(2, 16)
    unified = call_purely(unify_state_dict, state_dict, data.draw(pattern_sets()))
    added = {key: value for key, value in unified.items() if key not in state_dict}
    assert not storages(added) & storages(state_dict)
    names = [key.removesuffix(".weight_quantizer._amax") for key in state_dict if key.endswith("._amax")]
    call_purely(global_amax_entries, (), state_dict, names=names)


@given(weights(), st.floats(1e-3, 1e3))
def test_nvfp4_leaves_weight_and_global_amax_untouched(weight, scale):
    global_amax = weight.float().abs().max() * scale + 1e-6
    quantized = call_purely(nvfp4_quantize, weight, global_amax)
    call_purely(nvfp4_fake_quant, weight, global_amax)
    call_purely(nvfp4_dequantize, *quantized, dtype=weight.dtype)


def test_kv_cache_config_update_leaves_both_configs_untouched():
    quant_cfg = {"quant_cfg": [{"quantizer_name": "*", "cfg": {"num_bits": 8}}], "algorithm": {"method": "max"}}
    kv = [{"quantizer_name": "*kv*", "cfg": {"num_bits": (4, 3)}}]
    call_purely(update_quant_cfg_with_kv_cache_quant, quant_cfg, kv)
