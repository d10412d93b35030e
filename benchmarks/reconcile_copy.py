"""``sharedquant reconcile`` of an every-group-mismatched checkpoint against ``cp -r`` of it, at several sizes.

For each size: a Llama-8B-shaped NVFP4 checkpoint (``checkpoint_scale.build`` with every
k_proj and up_proj given a smaller scale, so every fused group is mismatched and about
70% of the packed bytes are requantized) in 4 shards, its page cache warm (``cp -r`` once
before timing); then, each in a fresh process, ``reconcile`` (peak RSS from ``VmHWM``) and
``reconcile`` with the copies finished before any requantization (what the background
copy thread saves), against the median of three ``cp -r``. Ratios are reconcile / cp.

Not a test: ``python -m benchmarks.reconcile_copy [--gib 0.5 2]``. Everything lies under
``--dir`` (default: a new directory in /tmp) and is deleted afterwards.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

from .checkpoint_scale import build, child_peak_rss

LAYER_GIB = 0.1145  # packed codes + block scales of one Llama-8B layer in NVFP4
# The benchmark's own switch, not the library's: copy every shard before requantizing any.
SERIAL = """
from sharedquant.adapters import copying
start = copying.Copier.__init__
def serial(self, *args):
    start(self, *args)
    for name in list(self._copies):
        self.wait(name)
copying.Copier.__init__ = serial
"""


def reconcile_code(source: Path, out: Path, serial: bool) -> str:
    call = f"from sharedquant.adapters.rewrite import reconcile_checkpoint\nreconcile_checkpoint({str(source)!r}, {str(out)!r})\n"
    return (SERIAL if serial else "") + call


def cp_seconds(source: Path, target: Path) -> float:
    start = time.perf_counter()
    subprocess.run(["cp", "-r", str(source), str(target)], check=True)
    seconds = time.perf_counter() - start
    shutil.rmtree(target)
    return seconds


def row(root: Path, gib: float, serial: bool) -> str:
    source = root / f"ckpt-{gib}"
    layers = max(1, round(gib / LAYER_GIB))
    total = build(source, layers, 4, every=True)
    largest = max(path.stat().st_size for path in source.glob("*.safetensors"))
    cp_seconds(source, root / "warm")  # warms the page cache for every timing below
    copies = sorted(cp_seconds(source, root / "cp") for _ in range(3))
    cp = statistics.median(copies)
    _, idle = child_peak_rss("import sharedquant.adapters.checkpoint")
    seconds, peak = child_peak_rss(reconcile_code(source, root / "out", serial=False))
    shutil.rmtree(root / "out")
    if serial:
        serial_seconds, _ = child_peak_rss(reconcile_code(source, root / "out", serial=True))
        shutil.rmtree(root / "out")
    shutil.rmtree(source)
    mib = 2**20
    return (
        f"| {total / 2**30:.2f} GiB ({layers} layers) | {cp:.2f} s | {seconds:.1f} s | {seconds / cp:.1f}x "
        + (f"| {serial_seconds:.1f} s ({serial_seconds / seconds:.2f}x) " if serial else "| - ")
        + f"| {(peak - idle) / mib:.0f} MiB = {(peak - idle) / largest:.2f} shards |"
    )


HEADER = [
    "| checkpoint | cp -r (warm, median of 3) | reconcile | ratio | copies first, then requantize "
    "| reconcile peak RSS over import |",
    "|---|---|---|---|---|---|",
]


def table(gibs: list[float], serial_gibs: list[float], directory: Path | None = None) -> list[str]:
    """The markdown table for these sizes; everything built lies in a temporary directory, deleted after."""
    root = Path(tempfile.mkdtemp(prefix="sharedquant-reconcile-", dir=directory))
    lines = list(HEADER)
    try:
        for gib in gibs:
            lines.append(row(root, gib, gib in serial_gibs))
            print(lines[-1], flush=True)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gib", type=float, nargs="+", default=[0.5, 2.0])
    parser.add_argument("--serial-gib", type=float, nargs="*", default=None, help="sizes that also time the "
                        "copies-first variant (default: the smallest)")  # fmt: skip
    parser.add_argument("--dir", type=Path, default=None)
    args = parser.parse_args()
    table(args.gib, args.serial_gib if args.serial_gib is not None else [min(args.gib)], args.dir)


if __name__ == "__main__":
    main()
