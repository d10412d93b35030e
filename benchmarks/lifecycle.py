"""Lifecycle steps, sharedquant beside the peer, on the same model tree and values.

Each row times one step on both sides in the same process, so the ratio holds
whatever else the machine is doing. Steps with side effects get an untimed setup
that puts the model back where the step starts.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from sharedquant.adapters import (
    SHARED_PATTERNS,
    SharedWeightGlobalAmaxState,
    find_shared_input_groups,
    set_ungrouped_global_amax,
)
from sharedquant.adapters.modules import discover_groups
from sharedquant.core import finalize, unify_state_dict

from . import models
from .timing import best_of, tensor_ops


@dataclass(frozen=True)
class Row:
    """One measured step: seconds for sharedquant and for the peer (``None`` when not run)."""

    step: str
    members: int
    ours: float
    peer: float | None = None
    note: str = ""
    ops: int | None = None  # sharedquant's tensor ops (views excluded), see timing.tensor_ops

    @property
    def speedup(self) -> float | None:
        return None if self.peer is None else self.peer / self.ours


def _ours(size: models.Size, repeats: int, device: str) -> Iterator[Row]:
    model = models.ours(size).to(device)
    state = SharedWeightGlobalAmaxState
    sync = device != "cpu"

    def fresh() -> None:
        models.strip_shared_states(model)

    def attached() -> None:
        fresh()
        state.attach(model)

    def populated() -> None:
        attached()
        state.populate(model)

    def timed(step: str, fn, setup=None, synced: bool = False) -> Row:
        seconds = best_of(fn, repeats, setup=setup, sync=synced)
        return Row(step, size.members, seconds, ops=tensor_ops(fn, setup))

    yield timed("discovery", lambda: find_shared_input_groups(model, SHARED_PATTERNS))
    yield timed("attach", lambda: state.attach(model), fresh)
    yield timed("populate", lambda: state.populate(model), attached, sync)
    yield timed("populate again", lambda: state.populate(model), None, sync)
    yield timed("ungrouped global amax", lambda: set_ungrouped_global_amax(model), populated, sync)
    state_dict = model.state_dict()
    yield timed("state_dict", model.state_dict)
    yield timed("restore", lambda: state.restore(model), fresh, sync)
    groups, _ = discover_groups(model, SHARED_PATTERNS)
    yield timed("core finalize", lambda: finalize(groups, state_dict), None, sync)
    yield timed("core unify_state_dict", lambda: unify_state_dict(state_dict), None, sync)


def _peer(size: models.Size, repeats: int, device: str) -> dict[str, float]:
    from modelopt.torch.quantization.utils import SharedWeightGlobalAmaxState as PeerState
    from modelopt.torch.quantization.utils import find_shared_input_groups as peer_find
    from modelopt.torch.quantization.utils import promote_nvfp4_static_quantizers

    model = models.peer(size).to(device)
    patterns = list(SHARED_PATTERNS)
    sync = device != "cpu"

    def fresh() -> None:
        models.strip_shared_states(model)

    def attached() -> None:
        fresh()
        PeerState.attach(model, patterns=patterns)

    def populated() -> None:
        attached()
        PeerState.populate(model)

    times = {
        "discovery": best_of(lambda: peer_find(model, patterns), repeats),
        "attach": best_of(lambda: PeerState.attach(model, patterns=patterns), repeats, setup=fresh),
        "populate": best_of(lambda: PeerState.populate(model), repeats, setup=attached, sync=sync),
        "populate again": best_of(lambda: PeerState.populate(model), repeats, sync=sync),
        # The peer's promotion swaps quantizer classes in place: its first call is the real one.
        "ungrouped global amax": best_of(lambda: promote_nvfp4_static_quantizers(model), 1, setup=populated, sync=sync),
        "state_dict": best_of(model.state_dict, repeats),
        "restore": best_of(lambda: PeerState.restore(model, patterns=patterns), repeats, setup=fresh, sync=sync),
    }
    # What the peer needs for the whole of core finalize / unify_state_dict: populate + promotion.
    times["core finalize"] = times["populate"]
    times["core unify_state_dict"] = times["populate"] + times["ungrouped global amax"]
    return times


_NOTES = {
    "ungrouped global amax": "peer: promote_nvfp4_static_quantizers (includes its tying)",
    "core finalize": "pure, over a state dict; peer column: its populate",
    "core unify_state_dict": "pure, over a state dict; peer column: populate + promotion",
}


def run(sizes: list[models.Size], repeats: int = 3, device: str = "cpu", with_peer: bool = True) -> list[Row]:
    """Every step at every size; the peer's column when it is installed and asked for."""
    rows: list[Row] = []
    for size in sizes:
        peer_times = _peer(size, repeats, device) if with_peer and models.peer_available() else {}
        for row in _ours(size, repeats, device):
            rows.append(Row(row.step, row.members, row.ours, peer_times.get(row.step), _NOTES.get(row.step, ""), row.ops))
            print(f"  {row.step:>22} {row.members:>7,} members: {row.ours * 1e3:9.2f} ms", file=sys.stderr, flush=True)
        if device != "cpu":
            torch.cuda.empty_cache()
    return rows
