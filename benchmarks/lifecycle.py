"""Lifecycle steps, sharedquant beside the peer, on the same model tree and values.

Each step is timed on both sides in alternation, round by round (ours, the peer,
ours, the peer, ...), and each side keeps its best round: load that comes and goes
on a shared machine lands on both sides alike, so the ratio holds. Steps with side
effects get an untimed setup that puts the model back where the step starts.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
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
from .timing import best_of_each, tensor_ops


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


# (timed call, untimed setup). Steps run in the order listed; a setup of None continues
# from where the step before left the model, as a user's next call would.
Side = tuple[Callable[[], object], Callable[[], object] | None]


def _ours(model: torch.nn.Module) -> dict[str, Side]:
    state = SharedWeightGlobalAmaxState

    def fresh() -> None:
        models.strip_shared_states(model)

    def attached() -> None:
        fresh()
        state.attach(model)

    def populated() -> None:
        attached()
        state.populate(model)

    def core_ready() -> None:
        if not cache:
            populated()
            set_ungrouped_global_amax(model)
            cache["state_dict"] = model.state_dict()
            cache["groups"] = discover_groups(model, SHARED_PATTERNS)[0]

    cache: dict[str, object] = {}
    return {
        "discovery": (lambda: find_shared_input_groups(model, SHARED_PATTERNS), None),
        "attach": (lambda: state.attach(model), fresh),
        "populate": (lambda: state.populate(model), attached),
        "populate again": (lambda: state.populate(model), None),
        "ungrouped global amax": (lambda: set_ungrouped_global_amax(model), populated),
        "state_dict": (model.state_dict, None),
        "restore": (lambda: state.restore(model), fresh),
        "core finalize": (lambda: finalize(cache["groups"], cache["state_dict"]), core_ready),
        "core unify_state_dict": (lambda: unify_state_dict(cache["state_dict"]), core_ready),
    }


def _peer(model: torch.nn.Module) -> dict[str, Side]:
    from modelopt.torch.quantization.utils import SharedWeightGlobalAmaxState as PeerState
    from modelopt.torch.quantization.utils import find_shared_input_groups as peer_find
    from modelopt.torch.quantization.utils import promote_nvfp4_static_quantizers

    patterns = list(SHARED_PATTERNS)

    def fresh() -> None:
        models.strip_shared_states(model)

    def attached() -> None:
        fresh()
        PeerState.attach(model, patterns=patterns)

    def populated() -> None:
        attached()
        PeerState.populate(model)

    return {
        "discovery": (lambda: peer_find(model, patterns), None),
        "attach": (lambda: PeerState.attach(model, patterns=patterns), fresh),
        "populate": (lambda: PeerState.populate(model), attached),
        "populate again": (lambda: PeerState.populate(model), None),
        "ungrouped global amax": (lambda: promote_nvfp4_static_quantizers(model), populated),
        "state_dict": (model.state_dict, None),
        "restore": (lambda: PeerState.restore(model, patterns=patterns), fresh),
    }


_NOTES = {
    "ungrouped global amax": "peer: promote_nvfp4_static_quantizers (includes its tying)",
    "core finalize": "pure, over a state dict; peer column: its populate",
    "core unify_state_dict": "pure, over a state dict; peer column: populate + promotion",
}
# The peer's promotion swaps quantizer classes in place: only its first call is the real one.
_PEER_ONCE = {"ungrouped global amax"}
# The peer has no pure core: its column for those rows is what it runs to get the same values.
_PEER_EQUIVALENT = {"core finalize": ("populate",), "core unify_state_dict": ("populate", "ungrouped global amax")}


def run(sizes: list[models.Size], repeats: int = 3, device: str = "cpu", with_peer: bool = True) -> list[Row]:
    """Every step at every size; the peer's column when it is installed and asked for."""
    rows: list[Row] = []
    sync = device != "cpu"
    for size in sizes:
        ours = _ours(models.ours(size).to(device))
        peer = _peer(models.peer(size).to(device)) if with_peer and models.peer_available() else {}
        peer_seconds: dict[str, float | None] = {}
        for step, side in ours.items():
            peer_rounds = 0 if step not in peer else 1 if step in _PEER_ONCE else repeats
            # a step the peer lacks gets no rounds: the stand-in side there never runs
            mine, theirs = best_of_each([side, peer.get(step, side)], [repeats, peer_rounds], sync)
            if step in _PEER_EQUIVALENT and peer:
                theirs = sum(peer_seconds[s] for s in _PEER_EQUIVALENT[step])
            peer_seconds[step] = theirs
            rows.append(Row(step, size.members, mine, theirs, _NOTES.get(step, ""), tensor_ops(*side)))
            print(f"  {step:>22} {size.members:>7,} members: {mine * 1e3:9.2f} ms", file=sys.stderr, flush=True)
        if device != "cpu":
            torch.cuda.empty_cache()
    return rows
