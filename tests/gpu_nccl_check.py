"""Standalone NCCL check of sync_shared_amax on one CUDA rank (not collected by pytest).

Run on a machine with a GPU:  ``python tests/gpu_nccl_check.py``

It starts a one-rank NCCL process group on 127.0.0.1, builds a state on the GPU
with set and unset groups, syncs it over an expert-parallel and a tensor-parallel
group (two ``new_group`` of the one rank, so both collectives really run on NCCL),
and checks that the result stays on the device, equals the input (the max over one
rank), keeps unset groups unset, leaves the input untouched, and used exactly one
functional all-reduce per process group. Prints what ran and exits non-zero on
any mismatch.
"""

from __future__ import annotations

import sys
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).parent))
from _dist_workers import CollectiveCounter  # noqa: E402

from sharedquant.adapters.distributed import ParallelState, sync_shared_amax  # noqa: E402
from sharedquant.core import SHARED_PATTERNS_ACROSS_EXPERTS, finalize, find_groups  # noqa: E402


def main() -> int:
    if not torch.cuda.is_available() or not dist.is_nccl_available():
        print("gpu_nccl_check: needs CUDA and NCCL; nothing ran")
        return 2
    device = torch.device("cuda", 0)
    torch.cuda.set_device(device)
    store = dist.TCPStore("127.0.0.1", 0, 1, True, timeout=timedelta(seconds=30))
    dist.init_process_group("nccl", store=store, rank=0, world_size=1, timeout=timedelta(seconds=30), device_id=device)
    try:
        return _check(device)
    finally:
        dist.destroy_process_group()


def _check(device: torch.device) -> int:
    names = [f"model.layers.{i}.self_attn.{p}" for i in range(3) for p in ("q_proj", "k_proj", "v_proj")]
    names += [f"model.layers.0.block_sparse_moe.experts.{e}.{w}" for e in range(4) for w in ("w1", "w3")]
    buffers = {
        f"{name}.weight_quantizer._amax": torch.rand(8, 1, device=device) * (i + 1)
        for i, name in enumerate(names)
        if ".layers.2." not in name  # layer 2 stays unset
    }
    state = finalize(find_groups(names, SHARED_PATTERNS_ACROSS_EXPERTS), buffers)
    before = state.global_amax.clone()
    ep, tp = dist.new_group([0]), dist.new_group([0])
    with CollectiveCounter() as counter:
        out = sync_shared_amax(state, ParallelState(ep, tp))
    torch.cuda.synchronize()
    expected_counts = {f"all_reduce@{ep.group_name}": 1, f"all_reduce@{tp.group_name}": 1}
    checks = {
        "on the device": out.global_amax.device == device,
        "values = the one rank's": torch.equal(out.global_amax, before),
        "unset stays unset": torch.equal(out.is_set(), state.is_set()) and not bool(state.is_set().all()),
        "input untouched": torch.equal(state.global_amax, before),
        "one all-reduce per process group": counter.counts == expected_counts,
    }
    print(f"gpu_nccl_check on {torch.cuda.get_device_name(device)}, torch {torch.__version__}, nccl {torch.cuda.nccl.version()}")
    print(f"  groups: {[group.parent for group in state.groups]}")
    print(f"  global_amax after sync: {out.global_amax.tolist()}")
    print(f"  collectives: {counter.counts}")
    for what, ok in checks.items():
        print(f"  {'ok  ' if ok else 'FAIL'} {what}")
    return 0 if all(checks.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
