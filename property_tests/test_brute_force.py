"""Reference equivalence: the batched lifecycle equals the obvious Python loop over floats."""

from __future__ import annotations

import struct
import threading

import torch
from hypothesis import given
from hypothesis import strategies as st

from sharedquant.core.groups import find_groups
from sharedquant.core.lifecycle import finalize, sync
from sharedquant.core.state import UNSET, SharedAmax

from strategies import amax_buffers, disjoint_groups, pattern_sets, states, trees


def fp32_at_or_above(value: float) -> float:
    """The smallest fp32 that is >= ``value`` (for value >= 0), by bit arithmetic."""
    nearest = struct.unpack("<f", struct.pack("<f", value))[0]
    if nearest >= value:
        return nearest
    (bits,) = struct.unpack("<I", struct.pack("<f", nearest))
    return struct.unpack("<f", struct.pack("<I", bits + 1))[0]


def brute_force_global_amax(groups, buffers, quantizer="weight_quantizer") -> list[float]:
    result = []
    for group in groups:
        values = []
        for member in group.members:
            tensor = buffers.get(f"{member}.{quantizer}._amax" if member else f"{quantizer}._amax")
            if tensor is not None and not tensor.is_meta:
                values += [abs(float(v)) for v in tensor.reshape(-1).tolist()]
        result.append(fp32_at_or_above(max(values)) if values else UNSET)
    return result


def sync_ranks(states_by_rank):
    """Run ``sync`` on every rank at once; the fake all-reduce waits for all ranks and returns the MAX."""
    world = len(states_by_rank)
    barrier = threading.Barrier(world, timeout=30)
    inbox = [None] * world
    results = [None] * world
    calls = [0] * world

    def run(rank):
        def all_reduce(packed):
            calls[rank] += 1
            inbox[rank] = packed
            barrier.wait()
            reduced = torch.stack(inbox).amax(0)
            barrier.wait()
            return reduced

        results[rank] = sync(states_by_rank[rank], all_reduce)

    threads = [threading.Thread(target=run, args=(rank,)) for rank in range(world)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert calls == [1] * world
    return results


@given(st.data())
def test_finalize_equals_a_python_max_rounded_up_to_fp32(data):
    tree = data.draw(trees())
    groups = find_groups(tree.names, data.draw(pattern_sets()), containers=tree.containers)
    buffers = data.draw(amax_buffers(tree.names))
    state = finalize(groups, buffers)
    assert state.global_amax.dtype == torch.float32
    assert state.global_amax.tolist() == brute_force_global_amax(groups, buffers)


@given(st.data(), st.integers(2, 4))
def test_sync_over_ranks_equals_the_max_over_ranks(data, world):
    groups = data.draw(disjoint_groups())
    per_rank = [data.draw(states(groups)) for _ in range(world)]
    expected = [max(rank.global_amax[i].item() for rank in per_rank) for i in range(len(groups))]
    for local, result in zip(per_rank, sync_ranks(per_rank)):
        assert isinstance(result, SharedAmax) and result.groups == groups
        assert result.global_amax.tolist() == expected
        # A group unset here comes out set, with the others' max, whenever another rank had a value.
        for i in range(len(groups)):
            others = [rank.global_amax[i].item() for rank in per_rank if rank is not local]
            if local.global_amax[i].item() == UNSET and max(others) > UNSET:
                assert result.global_amax[i].item() == max(others) > UNSET
