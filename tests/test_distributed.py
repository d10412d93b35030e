"""sync_shared_amax on real torch.distributed process groups (gloo on 127.0.0.1).

Every job is a set of real processes (tests/_dist_workers.py, forked from a server
that imported torch once); all jobs start together, since most of their time is
spent waiting on each other or on a timeout, and each test waits for its own under
a hard deadline after which every process is killed: the suite cannot hang.
Workers report through JSON files; assertions are made here.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import socket
import sys
import time
from pathlib import Path

import pytest
import torch

from sharedquant.adapters.distributed import SYNC_ERROR, ParallelState, resolve_group, sync_shared_amax
from sharedquant.core import finalize, find_groups

sys.path.insert(0, str(Path(__file__).parent))
import _dist_workers  # noqa: E402

# Workers fork from a server that imported torch and the workers' module once:
# eleven fresh interpreters would each spend seconds importing torch on 2 cores.
FORKSERVER = multiprocessing.get_context("forkserver")
FORKSERVER.set_forkserver_preload(["_dist_workers"])
HARD_DEADLINE_S = 240  # far above a healthy run on a loaded machine; only a hang reaches it
FAILURE_SYNC_TIMEOUT_S = 3
HEALTHY_SYNC_TIMEOUT_S = 60
UNSET = float("-inf")


def _loopback_env() -> dict[str, str]:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    loopback = [name for _, name in socket.if_nameindex() if name.startswith("lo")]
    if loopback:
        env["GLOO_SOCKET_IFNAME"] = loopback[0]  # keep gloo's pairs on 127.0.0.1
    return env


class Job:
    """The ranks of one scenario, started now, collected (or killed) later."""

    def __init__(self, rundir: Path, scenario: str, world: int, ranks, sync_timeout_s: float) -> None:
        self.rundir, self.scenario = rundir, scenario
        rundir.mkdir(parents=True)
        env = _loopback_env()
        self.procs = {}
        for rank in ranks:
            args = (scenario, rank, world, str(rundir), sync_timeout_s, env)
            self.procs[rank] = FORKSERVER.Process(target=_dist_workers.run_rank, args=args, daemon=True)
            self.procs[rank].start()
        self.deadline = time.monotonic() + HARD_DEADLINE_S
        self._results = None

    def kill(self) -> None:
        for proc in self.procs.values():
            if proc.is_alive():
                proc.kill()
            proc.join()

    def logs(self) -> str:
        logs = {r: self.rundir / f"log{r}.txt" for r in self.procs}
        return "\n".join(f"--- rank {r}:\n{p.read_text()[-3000:] if p.exists() else ''}" for r, p in logs.items())

    def results(self) -> dict[int, dict | None]:
        """Each rank's report (``None`` for a rank that left none); fails on a hang."""
        if self._results is None:
            for proc in self.procs.values():
                proc.join(timeout=max(self.deadline - time.monotonic(), 0.1))
                if proc.is_alive():
                    self.kill()
                    pytest.fail(f"{self.scenario}: ranks still running after {HARD_DEADLINE_S}s\n{self.logs()}")
            self._results = {rank: self._read(rank) for rank in self.procs}
        for rank, result in self._results.items():
            if result is not None and "crash" in result:
                pytest.fail(f"{self.scenario}: rank {rank} crashed:\n{result['crash']}\n{self.logs()}")
        return self._results

    def _read(self, rank: int) -> dict | None:
        path = self.rundir / f"rank{rank}.json"
        return json.loads(path.read_text()) if path.exists() else None

    def exitcode(self, rank: int) -> int | None:
        return self.procs[rank].exitcode


@pytest.fixture(scope="module")
def jobs(tmp_path_factory):
    root = tmp_path_factory.mktemp("dist")
    specs = {
        "core4": ("core", 4, range(4), HEALTHY_SYNC_TIMEOUT_S),
        "core2": ("core", 2, range(2), HEALTHY_SYNC_TIMEOUT_S),
        "dies": ("dies", 2, range(2), FAILURE_SYNC_TIMEOUT_S),
        "stalls": ("stalls", 2, range(2), FAILURE_SYNC_TIMEOUT_S),
        "absent": ("absent", 2, [0], FAILURE_SYNC_TIMEOUT_S),  # rank 1 is never started
    }
    started = {}
    try:
        for name, (scenario, world, ranks, timeout_s) in specs.items():
            started[name] = Job(root / name, scenario, world, ranks, timeout_s)
        yield started
    finally:
        for job in started.values():
            job.kill()


def _all_present(job: Job) -> list[dict]:
    results = job.results()
    missing = [rank for rank, result in results.items() if result is None]
    assert not missing, f"ranks {missing} reported nothing\n{job.logs()}"
    return [results[rank] for rank in sorted(results)]


def _max_over_ranks(results: list[dict], field: str = "before") -> list[float]:
    return [max(values) for values in zip(*(result[field] for result in results))]


@pytest.mark.slow
@pytest.mark.parametrize("name", ["core4", "core2"])
def test_every_rank_ends_with_the_max_over_all_ranks(jobs, name):
    results = _all_present(jobs[name])
    expected = _max_over_ranks(results)
    assert len({tuple(result["groups"]) for result in results}) == 1
    for result in results:
        assert result["after"] == expected, f"rank {result['rank']}"
    # The scenario holds groups that are unset on some ranks and set on others, and
    # one group no rank calibrated.
    came_out_set = [i for r in results for i, (b, a) in enumerate(zip(r["before"], r["after"])) if b == UNSET < a]
    assert came_out_set
    assert UNSET in expected
    assert any(before != expected for before in (r["before"] for r in results))


@pytest.mark.slow
@pytest.mark.parametrize("name", ["core4", "core2"])
def test_one_functional_all_reduce_per_process_group(jobs, name):
    results = _all_present(jobs[name])
    for result in results:
        expected = {f"all_reduce@{result['ep_name']}": 1}
        if result["tp_name"] is not None:
            expected[f"all_reduce@{result['tp_name']}"] = 1
        assert result["counts"] == expected, f"rank {result['rank']}"
        assert len(result["before"]) > len(expected)  # many groups, still one call per process group
    if name == "core4":  # a 2x2 grid: two distinct EP groups and two distinct TP groups
        ep_names, tp_names = {r["ep_name"] for r in results}, {r["tp_name"] for r in results}
        assert len(ep_names) == len(tp_names) == 2 and not ep_names & tp_names


@pytest.mark.slow
@pytest.mark.parametrize("name", ["core4", "core2"])
def test_sync_leaves_its_input_untouched(jobs, name):
    for result in _all_present(jobs[name]):
        assert result["input_untouched"] and result["output_is_new"], f"rank {result['rank']}"


@pytest.mark.slow
def test_modelopt_shaped_group_wrappers_sync_like_bare_groups(jobs):
    for result in _all_present(jobs["core4"]):
        assert result["wrapped_after"] == result["after"]
        assert result["wrapped_counts"] == result["counts"]


@pytest.mark.slow
def test_a_wrapper_around_none_means_the_world_group(jobs):
    results = _all_present(jobs["core4"])
    expected = _max_over_ranks(results)
    for result in results:
        assert result["world_after"] == expected
        assert result["world_counts"] == {f"all_reduce@{result['world_name']}": 1}


@pytest.mark.slow
def test_the_same_group_for_expert_and_tensor_parallel_is_reduced_once(jobs):
    for result in _all_present(jobs["core4"]):
        assert result["twice_counts"] == {f"all_reduce@{result['ep_name']}": 1}


@pytest.mark.slow
def test_nothing_initialised_returns_the_state_itself_without_a_collective(jobs):
    # None, ParallelState(), uninitialised wrappers (modelopt's -1) and a group this rank is not in.
    for result in _all_present(jobs["core4"]):
        assert result["skipped"] == [{"same_object": True, "counts": {}}] * 4


@pytest.mark.slow
def test_the_all_reduce_compiles_whole_and_matches_eager(jobs):
    results = _all_present(jobs["core2"])
    for result in results:
        assert result["compiled_after"] == result["after"] == _max_over_ranks(results)


@pytest.mark.slow
def test_ranks_holding_different_groups_all_refuse(jobs):
    for result in _all_present(jobs["core4"]):
        assert result["mismatch"]["type"] == "RuntimeError"
        assert "ranks hold different shared-quant groups" in result["mismatch"]["message"]


@pytest.mark.slow
def test_a_rank_dying_mid_sync_fails_the_others_with_the_sync_error(jobs):
    job = jobs["dies"]
    results = job.results()
    assert results[1] is None and job.exitcode(1) == 3, job.logs()  # died between its EP and TP collectives
    error = results[0]["error"]
    assert (error["type"], error["message"]) == ("RuntimeError", SYNC_ERROR)
    assert error["cause"], "the gloo failure must be chained as the cause"


@pytest.mark.slow
def test_a_rank_that_never_enters_the_sync_times_the_others_out(jobs):
    results = jobs["stalls"].results()
    assert results[1] == {"rank": 1, "sync_error_text": SYNC_ERROR, "stalled": True}
    error = results[0]["error"]
    assert (error["type"], error["message"]) == ("RuntimeError", SYNC_ERROR)
    assert "timed out" in error["cause"].lower()


@pytest.mark.slow
def test_a_rank_that_never_joins_fails_the_rendezvous_within_its_timeout(jobs):
    error = jobs["absent"].results()[0]["error"]
    assert error["type"] is not None, "a lone rank must not get through init_process_group"
    assert "timeout" in error["message"].lower() or "timed out" in error["message"].lower()


# In-process checks: no process group is initialised here.


def _state():
    groups = find_groups(["a.q_proj", "a.k_proj"], [r"(?:(.*)\.)?(?:q_proj|k_proj)"])
    return finalize(groups, {"a.q_proj.weight_quantizer._amax": torch.tensor([2.0])})


class _Uninitialised:
    group = None

    def is_initialized(self) -> bool:
        return False


def test_without_an_initialised_process_group_the_state_comes_back_as_is():
    state = _state()
    assert sync_shared_amax(state, None) is state
    assert sync_shared_amax(state, ParallelState(_Uninitialised(), _Uninitialised())) is state


def test_bad_inputs_are_refused_with_the_function_named():
    with pytest.raises(TypeError, match="sync_shared_amax: expected a SharedAmax state, got dict"):
        sync_shared_amax({}, ParallelState())
    with pytest.raises(TypeError, match="sync_shared_amax: parallel_state must be None or have"):
        sync_shared_amax(_state(), 3)
    with pytest.raises(TypeError, match=r"parallel_state.tensor_parallel_group: expected None, .* got str"):
        sync_shared_amax(_state(), ParallelState(None, "tp"))
    with pytest.raises(TypeError, match="resolve_group: expected None"):
        resolve_group(object())


@pytest.mark.peer
def test_modelopt_parallel_state_is_accepted():
    distributed = pytest.importorskip("modelopt.torch.utils.distributed")
    state = _state()
    assert sync_shared_amax(state, distributed.ParallelState()) is state


# The module adapter across ranks: tiny_mixtral(num_experts=4), each rank holding its
# own weights and only its local experts, grouped across experts.


def _expected_by_state(results: list[dict], run: str) -> list[float | None]:
    """Per state: the max over every rank of its members' own weight amax (None: nobody calibrated)."""
    per_rank = [result["adapter"][run] for result in results]
    assert len({tuple(state["key"] for state in report) for report in per_rank}) == 1
    expected = []
    for states in zip(*per_rank):
        own = [m["own"] for state in states for m in state["members"] if m["own"] is not None]
        expected.append(max(own) if own else None)
    return expected


@pytest.mark.slow
@pytest.mark.parametrize("name", ["core4", "core2"])
@pytest.mark.parametrize("run", ["calibrated", "partial"])
def test_every_member_on_every_rank_holds_the_global_max(jobs, name, run):
    # calibrated: max_calibrate with non-local experts zeroed; partial: attach, then only
    # local experts (others on meta) and, on rank 0 only, layer 1's attention get an amax.
    results = _all_present(jobs[name])
    expected = _expected_by_state(results, run)
    assert None not in expected
    for result in results:
        for position, state in enumerate(result["adapter"][run]):
            for member in state["members"]:
                assert member["final"] == expected[position], f"rank {result['rank']} state {state['key']}"
                assert member["tied"], f"rank {result['rank']} state {state['key']}"


@pytest.mark.slow
@pytest.mark.parametrize("name", ["core4", "core2"])
def test_states_uncalibrated_on_a_rank_come_out_set_there(jobs, name):
    results = _all_present(jobs[name])
    for result in results[1:]:
        layer_1_attention = next(s for s in result["adapter"]["partial"] if "layers.1.self_attn" in s["key"])
        assert all(m["own"] is None and m["final"] is not None for m in layer_1_attention["members"])


@pytest.mark.slow
@pytest.mark.parametrize("name", ["core4", "core2"])
def test_populate_costs_one_collective_per_process_group(jobs, name):
    # partial gives every module its own ParallelState of wrappers, as modelopt does.
    for result in _all_present(jobs[name]):
        expected = {f"all_reduce@{result['ep_name']}": 1}
        if result["tp_name"] is not None:
            expected[f"all_reduce@{result['tp_name']}"] = 1
        assert result["adapter"]["calibrate_counts"] == expected
        assert result["adapter"]["populate_counts"] == expected
        assert result["adapter"]["populated"] == len(result["adapter"]["partial"])


@pytest.mark.slow
@pytest.mark.parametrize("name", ["core4", "core2"])
def test_state_sync_takes_part_while_unset_and_comes_out_set(jobs, name):
    results = _all_present(jobs[name])
    held = results[0]["adapter"]["instance_sync"]["value"]
    assert held is not None
    for result in results:
        assert result["adapter"]["instance_sync"]["value"] == held, f"rank {result['rank']}"
        assert result["adapter"]["instance_sync"]["counts"] == result["counts"]
