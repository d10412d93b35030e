"""Timing primitives: best-of-N wall time with the garbage collector paused, and op counts.

The collector is paused during a timed call, as ``timeit`` does: a gen-2 collection
over a model of 80k modules costs more than most steps measured here, and would
land on whichever side happens to allocate last. Both sides get the same treatment.
"""

from __future__ import annotations

import gc
import time
from collections.abc import Callable, Sequence

import torch
from torch.utils._python_dispatch import TorchDispatchMode


def best_of(
    fn: Callable[[], object],
    repeats: int = 3,
    setup: Callable[[], object] | None = None,
    sync: bool = False,
    collect: bool = True,
) -> float:
    """Minimum seconds of ``fn()`` over ``repeats`` runs, ``setup()`` (untimed) before each.

    ``collect=False`` skips the collection before each run: for kernels timed back to
    back, whose GPU clocks drop during a collection's idle tens of milliseconds.
    """
    best = float("inf")
    for _ in range(repeats):
        if setup is not None:
            setup()
        if collect:
            gc.collect()
        gc.disable()
        try:
            if sync:
                torch.cuda.synchronize()
            start = time.perf_counter()
            fn()
            if sync:
                torch.cuda.synchronize()
            best = min(best, time.perf_counter() - start)
        finally:
            gc.enable()
    return best


def best_of_each(
    sides: Sequence[tuple[Callable[[], object], Callable[[], object] | None]],
    rounds: Sequence[int],
    sync: bool = False,
    collect: bool = True,
) -> list[float | None]:
    """``best_of`` for each ``(fn, setup)`` side, the sides taking turns round by round.

    Side ``i`` runs ``rounds[i]`` rounds (0 for none): load that comes and goes on a
    shared machine lands on every side alike.
    """
    best: list[float | None] = [None] * len(sides)
    for round_ in range(max(rounds, default=0)):
        for i, (fn, setup) in enumerate(sides):
            if round_ < rounds[i]:
                seconds = best_of(fn, 1, setup=setup, sync=sync, collect=collect)
                best[i] = seconds if best[i] is None else min(best[i], seconds)
    return best


class _OpCounter(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not func.is_view:  # views and detach move no data; everything else may launch a kernel
            self.count += 1
        return func(*args, **(kwargs or {}))


def tensor_ops(fn: Callable[[], object], setup: Callable[[], object] | None = None) -> int:
    """How many tensor ops ``fn()`` dispatches, views excluded: on a GPU, about its kernel launches.

    A step whose count stays the same as the model grows launches a fixed number of
    kernels; one that grows with the members launches a few per member.
    """
    if setup is not None:
        setup()
    with _OpCounter() as counter:
        fn()
    return counter.count
