"""Timing primitives: best-of-N wall time with the garbage collector paused.

The collector is paused during a timed call, as ``timeit`` does: a gen-2 collection
over a model of 80k modules costs more than most steps measured here, and would
land on whichever side happens to allocate last. Both sides get the same treatment.
"""

from __future__ import annotations

import gc
import time
from collections.abc import Callable

import torch


def best_of(fn: Callable[[], object], repeats: int = 3, setup: Callable[[], object] | None = None, sync: bool = False) -> float:
    """Minimum seconds of ``fn()`` over ``repeats`` runs, ``setup()`` (untimed) before each."""
    best = float("inf")
    for _ in range(repeats):
        if setup is not None:
            setup()
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
