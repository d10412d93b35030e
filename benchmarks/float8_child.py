"""One float8 reduction in a fresh process: prints its best time and peak extra memory as JSON.

A fresh process makes the peak-RSS measurement mean something: the input is the
largest thing allocated before the reduction, so growth of the peak after it is
what the reduction itself allocated.
"""

from __future__ import annotations

import json
import resource
import sys

import torch

from sharedquant.core import reduce_amax

from .timing import best_of


def _peak_rss_mib() -> float:
    # VmHWM, not ru_maxrss: on Linux a child's ru_maxrss starts from its parent's peak
    # across exec, which would hide everything below the benchmark process's own size.
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def random_float8(elements: int, device: str) -> torch.Tensor:
    """Finite random e4m3fn values, filled in chunks so no transient copy inflates the peak."""
    tensor = torch.empty(elements, dtype=torch.uint8, device=device)
    for chunk in tensor.split(1 << 24):
        # magnitudes 0x00..0x7E (0x7F is NaN), random sign bit
        chunk.copy_(torch.randint(0, 0x7F, chunk.shape, dtype=torch.uint8, device=device))
        chunk.bitwise_or_(torch.randint(0, 2, chunk.shape, dtype=torch.uint8, device=device) << 7)
    return tensor.view(torch.float8_e4m3fn)


def main(side: str, elements: int, repeats: int, device: str) -> None:
    if side == "ours":
        reduce = reduce_amax
    else:
        from modelopt.torch.quantization.utils import reduce_amax as reduce
    tensor = random_float8(elements, device)
    expected = tensor[: 1 << 20].float().abs().max()  # both sides must compute the same thing
    sync = device != "cpu"
    if sync:
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.max_memory_allocated() / 2**20
    else:
        before = _peak_rss_mib()
    result = reduce(tensor)
    extra = (torch.cuda.max_memory_allocated() / 2**20 if sync else _peak_rss_mib()) - before
    if result.float() < expected:
        raise SystemExit(f"{side}: wrong float8 amax {result} < {expected}")
    seconds = best_of(lambda: reduce(tensor), repeats, sync=sync, collect=not sync)
    print(json.dumps({"seconds": seconds, "extra_mib": max(extra, 0.0)}))


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4])
