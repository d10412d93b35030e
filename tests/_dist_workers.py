"""Worker processes for tests/test_distributed.py: one rank of a real gloo job each.

The test forks workers from a forkserver that imported this module (torch
included) once, and calls ``run_rank``; by hand: ``python tests/_dist_workers.py
SCENARIO RANK WORLD RUNDIR SYNC_TIMEOUT_S``. Every check of a scenario runs in the
same process group. Each surviving rank writes ``RUNDIR/rank<R>.json`` (temp name, then
rename) and exits; the parent asserts on those files and kills whatever outlives
its hard timeout. Rendezvous needs no guessed port: rank 0 opens the store on a
port the OS picks and publishes it in ``RUNDIR/port``.
"""

from __future__ import annotations

import json
import os
import sys
import time
import traceback
from datetime import timedelta

import torch
import torch.distributed as dist
from torch.utils._python_dispatch import TorchDispatchMode

from sharedquant.adapters import (
    SharedWeightGlobalAmaxState,
    iter_shared_quant_states,
    max_calibrate,
    replace_quant_module,
)
from sharedquant.adapters.distributed import SYNC_ERROR, ParallelState, group_all_reduce, sync_shared_amax
from sharedquant.adapters.models import tiny_mixtral
from sharedquant.core import SHARED_PATTERNS_ACROSS_EXPERTS, finalize, find_groups

# Generous for the healthy path (ranks compete for 2 cores); the failure checks rely
# on the short per-group sync timeout instead.
RENDEZVOUS_TIMEOUT = timedelta(seconds=120)
ABSENT_TIMEOUT = timedelta(seconds=3)
NUM_LAYERS, NUM_EXPERTS = 3, 4
NOT_COLLECTIVES = {"wait_tensor", "_wrap_tensor_autograd"}
HEALTHY = {"core"}


class CollectiveCounter(TorchDispatchMode):
    """Counts every collective dispatched while active, keyed by process-group name.

    Functional collectives carry their group's name as a string argument; the
    in-place c10d ops (``dist.all_reduce``) are counted under ``"c10d:<op>"``, so a
    regression to them is seen too.
    """

    def __init__(self) -> None:
        super().__init__()
        self.counts: dict[str, int] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace == "_c10d_functional" and func._opname not in NOT_COLLECTIVES:
            self._count(f"{func._opname}@{args[-1]}")
        elif func.namespace == "c10d":
            self._count(f"c10d:{func._opname}")
        return func(*args, **(kwargs or {}))

    def _count(self, key: str) -> None:
        self.counts[key] = self.counts.get(key, 0) + 1


class Wrapped:
    """A group in the shape of modelopt's ``DistributedProcessGroup``."""

    def __init__(self, group, initialized: bool = True) -> None:
        self.group, self._initialized = group, initialized

    def is_initialized(self) -> bool:
        return self._initialized and dist.is_initialized()


class DiesWhenAsked(Wrapped):
    """A rank that crashes between its expert- and tensor-parallel collectives."""

    def is_initialized(self) -> bool:
        os._exit(3)


def rendezvous(rank: int, world: int, rundir: str, timeout: timedelta) -> None:
    port_file = os.path.join(rundir, "port")
    if rank == 0:
        store = dist.TCPStore("127.0.0.1", 0, world, True, timeout=timeout, wait_for_workers=False)
        _write_atomic(port_file, str(store.port))
    else:
        deadline = time.monotonic() + timeout.total_seconds()
        while not os.path.exists(port_file):
            if time.monotonic() > deadline:
                raise TimeoutError(f"rank {rank}: rank 0 never published its store port")
            time.sleep(0.02)
        with open(port_file) as handle:
            store = dist.TCPStore("127.0.0.1", int(handle.read()), world, False, timeout=timeout)
    dist.init_process_group("gloo", store=store, rank=rank, world_size=world, timeout=timeout)


def _write_atomic(path: str, text: str) -> None:
    with open(path + ".tmp", "w") as handle:
        handle.write(text)
    os.replace(path + ".tmp", path)


def grid_groups(world: int, timeout: timedelta):
    """EP groups along rows, TP groups along columns of a ``rows x 2`` grid of ranks.

    Every rank creates every group, in the same order, as ``new_group`` requires.
    """
    rank, columns = dist.get_rank(), min(world, 2)
    rows = world // columns
    ep = tp = None
    for row in range(rows):
        group = dist.new_group([row * columns + c for c in range(columns)], timeout=timeout)
        ep = group if rank // columns == row else ep
    for column in range(columns) if rows > 1 else ():
        group = dist.new_group([r * columns + column for r in range(rows)], timeout=timeout)
        tp = group if rank % columns == column else tp
    return ep, tp


def model_names() -> list[str]:
    """Attention in every layer, MoE experts in layers 0-1, a dense MLP in layer 2, and
    a layer 3 nobody calibrates."""
    names = []
    for layer in range(NUM_LAYERS + 1):
        prefix = f"model.layers.{layer}"
        names += [f"{prefix}.self_attn.{p}" for p in ("q_proj", "k_proj", "v_proj")]
        if layer < 2:
            names += [f"{prefix}.block_sparse_moe.experts.{e}.{w}" for e in range(NUM_EXPERTS) for w in ("w1", "w3")]
        else:
            names += [f"{prefix}.mlp.{p}" for p in ("gate_proj", "up_proj")]
    return names


def local_buffers(rank: int, world: int) -> dict[str, torch.Tensor]:
    """What this rank calibrated: its own experts, and attention/MLP only where it
    holds them, so most groups are unset on some rank."""
    generator = torch.Generator().manual_seed(1000 + rank)
    buffers = {}
    for name in model_names():
        layer = int(name.split(".")[2])
        if layer == NUM_LAYERS:
            continue
        if ".experts." in name:
            held = int(name.split(".")[5]) % world == rank
        else:
            held = (layer + ("mlp" in name)) % world == rank
        if held:
            buffers[f"{name}.weight_quantizer._amax"] = torch.rand(4, 1, generator=generator) * (rank + 1)
    return buffers


def local_state(rank: int, world: int):
    groups = find_groups(model_names(), SHARED_PATTERNS_ACROSS_EXPERTS)
    return finalize(groups, local_buffers(rank, world))


def counted_sync(state, parallel_state):
    with CollectiveCounter() as counter:
        out = sync_shared_amax(state, parallel_state)
    return out, counter.counts


def check_grid(rank: int, world: int, sync_timeout: timedelta) -> dict:
    """The core sync, then the module adapter, over one EP x TP grid of groups."""
    ep, tp = grid_groups(world, sync_timeout)
    return check_core(rank, world, ep, tp) | {"adapter": check_adapter(rank, world, ep, tp)}


def check_core(rank: int, world: int, ep, tp) -> dict:
    state = local_state(rank, world)
    before, pointer = state.global_amax.clone(), state.global_amax.data_ptr()
    out, counts = counted_sync(state, ParallelState(ep, tp))
    wrapped_out, wrapped_counts = counted_sync(state, ParallelState(Wrapped(ep), Wrapped(tp)))
    world_out, world_counts = counted_sync(state, ParallelState(Wrapped(None), None))
    _, twice_counts = counted_sync(state, ParallelState(ep, ep))
    skipped = []
    for parallel_state in (
        None,
        ParallelState(),
        ParallelState(Wrapped(ep, initialized=False), Wrapped(-1)),
        ParallelState(dist.GroupMember.NON_GROUP_MEMBER, None),
    ):
        result, skip_counts = counted_sync(state, parallel_state)
        skipped.append({"same_object": result is state, "counts": skip_counts})
    result = {"compiled_after": _compiled_max(state, ep)} if world == 2 else {}
    return result | {
        "groups": [g.parent + ":" + str(g.key) for g in state.groups],
        "before": before.tolist(),
        "after": out.global_amax.tolist(),
        "counts": counts,
        "ep_name": ep.group_name,
        "tp_name": tp.group_name if tp is not None else None,
        "world_name": dist.group.WORLD.group_name,
        "input_untouched": bool(torch.equal(state.global_amax, before)) and state.global_amax.data_ptr() == pointer,
        "output_is_new": out.global_amax.data_ptr() != pointer,
        "wrapped_after": wrapped_out.global_amax.tolist(),
        "wrapped_counts": wrapped_counts,
        "world_after": world_out.global_amax.tolist(),
        "world_counts": world_counts,
        "twice_counts": twice_counts,
        "skipped": skipped,
        "mismatch": _mismatched_groups(rank, world),
    }


def tiny_moe_model(rank: int, world: int, on_meta: bool):
    """This rank's replica: its own weights (seeded by rank, like a TP slice) and only
    its local experts, the others zeroed or moved to meta."""
    torch.manual_seed(100 + rank)
    model = replace_quant_module(tiny_mixtral(num_experts=NUM_EXPERTS))
    columns = min(world, 2)
    for name, module in model.named_modules():
        if name.endswith("block_sparse_moe"):
            for index, expert in enumerate(module.experts):
                if index % columns != rank % columns:
                    expert.to("meta") if on_meta else torch.nn.init.zeros_(expert.w1.weight)
    return model


def member_report(model) -> list[dict]:
    """Per state: each member's own weight amax (None where not calibrated here), its
    final ``_global_amax`` and whether it is the state's tensor."""
    report = []
    for state in iter_shared_quant_states(model, SharedWeightGlobalAmaxState):
        members = []
        for member in state.members:
            quantizer = member.weight_quantizer
            calibrated = quantizer._buffers.get("_amax") is not None and not member.weight.is_meta
            final = quantizer._buffers.get("_global_amax")
            members.append({
                "own": member.weight.abs().max().item() if calibrated else None,
                "final": None if final is None else final.item(),
                "tied": final is not None and final is state.global_amax,
            })
        report.append({"key": str(state.group.key), "members": members})
    return report


def check_adapter(rank: int, world: int, ep, tp) -> dict:
    patterns = {"weight_global_amax": {"patterns": list(SHARED_PATTERNS_ACROSS_EXPERTS)}}
    # max_calibrate, one ParallelState object for the whole model.
    model = tiny_moe_model(rank, world, on_meta=False)
    shared = ParallelState(ep, tp)
    for module in model.modules():
        if hasattr(module, "weight_quantizer"):
            module.parallel_state = shared
    with CollectiveCounter() as calibrate_counter:
        max_calibrate(model, shared_states=patterns)
    # attach + calibrate only the local experts and, on rank 0 only, layer 1's attention;
    # one ParallelState per module with modelopt-shaped wrappers, as modelopt builds them.
    partial = tiny_moe_model(rank, world, on_meta=True)
    SharedWeightGlobalAmaxState.attach(partial, SHARED_PATTERNS_ACROSS_EXPERTS)
    for name, module in partial.named_modules():
        if hasattr(module, "weight_quantizer"):
            module.parallel_state = ParallelState(Wrapped(ep), None if tp is None else Wrapped(tp))
            if not module.weight.is_meta and (rank == 0 or "layers.1.self_attn" not in name):
                module.weight_quantizer.amax = module.weight_quantizer.observed_amax(module.weight)
    with CollectiveCounter() as populate_counter:
        populated = SharedWeightGlobalAmaxState.populate(partial)
    return {
        "calibrated": member_report(model),
        "calibrate_counts": calibrate_counter.counts,
        "partial": member_report(partial),
        "populate_counts": populate_counter.counts,
        "populated": populated,
        "instance_sync": _instance_sync(rank, partial, ep, tp),
    }


def _instance_sync(rank: int, model, ep, tp) -> dict:
    """``state.sync(parallel_state)`` on one state that only rank 0 holds a value for."""
    state = next(iter_shared_quant_states(model, SharedWeightGlobalAmaxState))
    if rank != 0:
        state.global_amax = None
    with CollectiveCounter() as counter:
        state.sync(ParallelState(ep, tp))
    value = state.global_amax
    return {"value": None if value is None else value.item(), "counts": counter.counts}


def _compiled_max(state, group) -> list[float]:
    """The all-reduce traced whole (no graph break) by torch.compile, run on gloo."""
    compiled = torch.compile(group_all_reduce(group), backend="aot_eager", fullgraph=True)
    return compiled(state.global_amax).tolist()


def _mismatched_groups(rank: int, world: int) -> dict:
    """Rank 0 names one group differently (same count): every rank must refuse."""
    names = model_names()
    if rank == 0:
        names = [n.replace("model.layers.2.", "model.layers.9.") for n in names]
    state = finalize(find_groups(names, SHARED_PATTERNS_ACROSS_EXPERTS), {})
    return _error_of(lambda: sync_shared_amax(state, ParallelState(Wrapped(None), None)))


def _error_of(fn) -> dict:
    try:
        fn()
    except Exception as err:
        cause = err.__cause__
        return {
            "type": type(err).__name__,
            "message": str(err),
            "cause": None if cause is None else f"{type(cause).__name__}: {cause}",
        }
    return {"type": None}


def check_dies(rank: int, world: int, sync_timeout: timedelta) -> dict:
    dist.barrier()  # a slow peer must not trip the short timeout while groups are made
    ep = dist.new_group(list(range(world)), timeout=sync_timeout)
    tp = dist.new_group(list(range(world)), timeout=sync_timeout)
    state = local_state(rank, world)
    tp_entry = DiesWhenAsked(tp) if rank == world - 1 else tp
    return {"error": _error_of(lambda: sync_shared_amax(state, ParallelState(ep, tp_entry)))}


def check_stalls(rank: int, world: int, sync_timeout: timedelta) -> dict:
    dist.barrier()  # a slow peer must not trip the short timeout while groups are made
    ep = dist.new_group(list(range(world)), timeout=sync_timeout)
    if rank == world - 1:
        # Alive and connected but never enters the sync; leaves once the others reported.
        deadline = time.monotonic() + 8 * sync_timeout.total_seconds()
        while time.monotonic() < deadline and not os.path.exists(os.path.join(RUNDIR, "rank0.json")):
            time.sleep(0.05)
        return {"stalled": True}
    return {"error": _error_of(lambda: sync_shared_amax(local_state(rank, world), ParallelState(ep, None)))}


CHECKS = {"core": check_grid, "dies": check_dies, "stalls": check_stalls}
RUNDIR = ""


def main(argv: list[str]) -> None:
    global RUNDIR
    scenario, rank, world, RUNDIR, sync_s = argv[0], int(argv[1]), int(argv[2]), argv[3], float(argv[4])
    result: dict = {"rank": rank, "sync_error_text": SYNC_ERROR}
    try:
        if scenario == "absent":
            # This rank's peer is never started: the rendezvous must give up on its own.
            result["error"] = _error_of(lambda: rendezvous(rank, world, RUNDIR, ABSENT_TIMEOUT))
        else:
            rendezvous(rank, world, RUNDIR, RENDEZVOUS_TIMEOUT)
            result.update(CHECKS[scenario](rank, world, timedelta(seconds=sync_s)))
    except Exception:
        result["crash"] = traceback.format_exc()
    _write_atomic(os.path.join(RUNDIR, f"rank{rank}.json"), json.dumps(result))
    if scenario in HEALTHY and "crash" not in result:
        # Nobody leaves while a peer may still be reading from it.
        try:
            dist.barrier()
        except Exception:
            pass
    # gloo teardown after a failed collective, or with a peer gone, can block; the
    # result is on disk, so leave without it.
    sys.stdout.flush()
    os._exit(0)


def run_rank(scenario: str, rank: int, world: int, rundir: str, sync_timeout_s: float, env: dict) -> None:
    """Entry point of a worker forked by the test: log to ``RUNDIR/log<R>.txt``, then run."""
    log = os.open(os.path.join(rundir, f"log{rank}.txt"), os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    os.dup2(log, 1)
    os.dup2(log, 2)
    os.environ.update(env)
    main([scenario, str(rank), str(world), rundir, str(sync_timeout_s)])


if __name__ == "__main__":
    main(sys.argv[1:])
