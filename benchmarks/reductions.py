"""reduce_amax throughput beside one plain ``torch.amax`` read and beside the peer's reduce_amax.

Throughput is input bytes over time. ``torch.amax`` reads the input once and is the
bar: an abs-max cannot read less. The float8 rows also report the extra memory the
reduction allocates (peak RSS growth in a fresh child process on CPU, peak
allocator growth on CUDA): the peer upcasts the whole input to fp32 first.
"""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import dataclass

import torch

from sharedquant.core import reduce_amax

from .models import peer_available
from .timing import best_of, best_of_each


@dataclass(frozen=True)
class Row:
    case: str
    bytes: int
    ours: float
    amax: float | None  # one plain torch.amax read; None where torch has no kernel (float8)
    peer: float | None
    ours_extra_mib: float | None = None
    peer_extra_mib: float | None = None


def _peer_reduce():
    from modelopt.torch.quantization.utils import reduce_amax as peer_reduce_amax

    return peer_reduce_amax


def _cases(elements: int, device: str):
    rows = int(elements**0.5)
    for dtype in (torch.float32, torch.bfloat16):
        flat = torch.randn(elements, device=device).to(dtype)
        name = str(dtype).removeprefix("torch.")
        yield f"{name} axis=None", flat, None
        yield f"{name} per-row", flat.view(rows, -1), -1
        yield f"{name} per-column", flat.view(rows, -1), 0  # a per-channel activation amax


def run(
    elements: int = 1 << 26,
    fp8_elements: int = 1 << 28,
    repeats: int = 5,
    device: str = "cpu",
    with_peer: bool = True,
    isolate: bool = True,
) -> list[Row]:
    """Float rows over ``elements`` values, float8 rows over ``fp8_elements``.

    ``isolate`` runs each float8 side in a fresh process, which its memory figure
    needs; without it both run here and the memory columns stay empty.
    """
    sync = device != "cpu"
    # A GPU call takes under a millisecond, host jitter is a large share of it: more
    # rounds, back to back (no collection between them, see timing.best_of). A CPU
    # round takes tens of milliseconds, against seconds for a lifecycle round: three
    # times the rounds cost little and leave the best less to chance.
    rounds = repeats * 5 if sync else repeats * 3
    peer = _peer_reduce() if with_peer and peer_available() else None
    out = []
    for case, tensor, axis in _cases(elements, device):
        dims = None if axis is None else (axis,)
        sides = [
            (lambda: tensor.amax(dim=dims) if dims else tensor.amax(), None),
            (lambda: reduce_amax(tensor, axis=axis), None),
            (lambda: peer(tensor, axis=axis), None),
        ]
        counts = [rounds, rounds, rounds if peer else 0]
        for (fn, _), count in zip(sides, counts):
            if count:
                fn()  # untimed: warms the allocator and the thread pool
        amax, ours, theirs = best_of_each(sides, counts, sync=sync, collect=not sync)
        out.append(Row(case, tensor.numel() * tensor.element_size(), ours, amax, theirs))
    out.append(_float8_row(fp8_elements, rounds, device, peer is not None, isolate))
    return out


def _float8_row(elements: int, repeats: int, device: str, with_peer: bool, isolate: bool) -> Row:
    measure = _float8_child if isolate else _float8_here
    measured = {side: measure(side, elements, repeats, device) for side in ("ours", "peer") if side == "ours" or with_peer}
    return Row(
        "float8_e4m3fn axis=None",
        elements,
        measured["ours"]["seconds"],
        None,
        measured.get("peer", {}).get("seconds"),
        measured["ours"]["extra_mib"],
        measured.get("peer", {}).get("extra_mib"),
    )


def _float8_here(side: str, elements: int, repeats: int, device: str) -> dict:
    from .float8_child import random_float8

    reduce = reduce_amax if side == "ours" else _peer_reduce()
    tensor = random_float8(elements, device)
    sync = device != "cpu"
    return {"seconds": best_of(lambda: reduce(tensor), repeats, sync=sync, collect=not sync), "extra_mib": None}


def _float8_child(side: str, elements: int, repeats: int, device: str) -> dict:
    """Time and peak extra memory of one side's float8 reduction, in a fresh process."""
    out = subprocess.run(
        [sys.executable, "-m", "benchmarks.float8_child", side, str(elements), str(repeats), device],
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])
