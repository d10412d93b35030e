"""``make bench``: sharedquant beside the peer, every step, one run, ratios.

    python -m benchmarks.run                   # CPU rows, sizes 1e3 / 1e4 (the 48x128 model) / 5e4 members
    python -m benchmarks.run --quick           # a tiny size: checks that everything runs
    python -m benchmarks.run --gpu             # the rows on CUDA at 1e3 / 1e4 members (needs a GPU)

Prints a table and writes ``benchmarks/RESULTS.md`` (``RESULTS_GPU.md`` with ``--gpu``:
machine, versions, table) and a log-log plot of cost against members. Timings are
best-of-N wall times with the garbage collector paused; compare ratios, not absolute
times, on a shared machine.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import sys
from pathlib import Path

import torch

from . import lifecycle, nvfp4_speed, reconcile_copy, reductions
from .models import Size, peer_available

HERE = Path(__file__).resolve().parent
FULL_SIZES = [Size(4, 128), Size(48, 128), Size(48, 512)]  # 1,036 / 12,432 / 49,296 members
QUICK_SIZES = [Size(1, 2)]  # checks that every row runs: one tiny size is enough
# On a GPU the target is the 12k-member model; the 5e4 size (linearity) is shown
# by the CPU run, and with the peer beside it would not fit a device lease of 15 minutes.
GPU_SIZES = FULL_SIZES[:2]


def _machine(device: str) -> list[str]:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    lines = [
        f"- date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M UTC}",
        f"- machine: {cpu}, {os.cpu_count()} cores, torch threads {torch.get_num_threads()}",
        f"- python {platform.python_version()}, torch {torch.__version__}",
    ]
    if device != "cpu":
        lines.append(f"- device: {torch.cuda.get_device_name()}")
    if peer_available():
        from importlib.metadata import version

        lines.append(f"- peer: nvidia-modelopt {version('nvidia-modelopt')}")
    else:
        lines.append("- peer: not installed (peer columns empty)")
    return lines


def _ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1e3:.2f}"


def _lifecycle_table(rows: list[lifecycle.Row]) -> list[str]:
    out = [
        "| step | members | sharedquant ms | peer ms | speedup | sharedquant tensor ops | note |",
        "|---|---:|---:|---:|---:|---:|---|",
    ]
    for row in rows:
        speedup = "-" if row.speedup is None else f"{row.speedup:.1f}x"
        out.append(
            f"| {row.step} | {row.members:,} | {_ms(row.ours)} | {_ms(row.peer)} | {speedup} | {row.ops:,} | {row.note} |"
        )
    return out


def _reduction_table(rows: list[reductions.Row]) -> list[str]:
    out = [
        "| case | MiB | sharedquant GB/s | torch.amax GB/s | peer GB/s | ours / amax | ours / peer | extra MiB ours / peer |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        rate = lambda s: "-" if s is None else f"{row.bytes / s / 1e9:.2f}"  # noqa: E731
        vs_amax = "-" if row.amax is None else f"{row.amax / row.ours:.2f}x"
        vs_peer = "-" if row.peer is None else f"{row.peer / row.ours:.1f}x"
        extra = "-" if row.ours_extra_mib is None else f"{row.ours_extra_mib:.0f} / {'-' if row.peer_extra_mib is None else f'{row.peer_extra_mib:.0f}'}"
        out.append(
            f"| {row.case} | {row.bytes / 2**20:.0f} | {rate(row.ours)} | {rate(row.amax)} | {rate(row.peer)} | {vs_amax} | {vs_peer} | {extra} |"
        )
    return out


def _plot(rows: list[lifecycle.Row], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [s for s in dict.fromkeys(r.step for r in rows) if not s.startswith("core")]
    fig, ax = plt.subplots(figsize=(8, 5))
    for index, step in enumerate(steps):
        points = [r for r in rows if r.step == step]
        color = f"C{index % 10}"
        ax.plot([r.members for r in points], [r.ours for r in points], "o-", color=color, label=f"{step} (sharedquant)")
        if all(r.peer is not None for r in points):
            ax.plot([r.members for r in points], [r.peer for r in points], "x--", color=color, label=f"{step} (peer)")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("grouped members")
    ax.set_ylabel("seconds")
    ax.set_title("Lifecycle cost against model size (solid: sharedquant, dashed: peer)")
    ax.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _history() -> list[str]:
    """The hand-kept notes on earlier runs, hosts and options not taken (``HISTORY.md``), as RESULTS.md's tail."""
    path = HERE / "HISTORY.md"
    return path.read_text().splitlines() if path.exists() else []


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes: check that every row runs")
    parser.add_argument("--gpu", action="store_true", help="run the rows on CUDA")
    parser.add_argument("--no-peer", action="store_true", help="leave the peer's columns empty")
    parser.add_argument("--checkpoint-gib", type=float, nargs="*", default=[0.5, 2.0], metavar="GIB",
                        help="checkpoint sizes for reconcile beside cp -r (CPU only; default 0.5 2; none: skip)")
    parser.add_argument("--out", type=Path, help="where to write the results (default: RESULTS.md, --gpu: RESULTS_GPU.md)")
    args = parser.parse_args(argv)
    if args.out is None:
        args.out = HERE / ("RESULTS_GPU.md" if args.gpu else "RESULTS.md")
    device = "cuda" if args.gpu else "cpu"
    if args.gpu and not torch.cuda.is_available():
        print("benchmarks: --gpu asked for but torch sees no CUDA device", file=sys.stderr)
        return 2
    sizes = QUICK_SIZES if args.quick else GPU_SIZES if args.gpu else FULL_SIZES
    repeats = 1 if args.quick else 3
    elements, fp8_elements = ((1 << 16), (1 << 18)) if args.quick else ((1 << 26), (1 << 28))
    if args.gpu and not args.quick:
        elements, fp8_elements = 1 << 28, 1 << 30  # 1 GiB of fp32 / of float8

    with_peer = not args.no_peer
    steps = lifecycle.run(sizes, repeats=repeats, device=device, with_peer=with_peer)
    reduce_rows = reductions.run(
        elements, fp8_elements, repeats=repeats if args.quick else max(repeats, 3), device=device,
        with_peer=with_peer, isolate=not args.quick,
    )
    nvfp4_size = 256 if args.quick else 4096
    nvfp4_repeats = repeats if args.quick else max(repeats, 3)
    nvfp4_rows = nvfp4_speed.run(nvfp4_size, nvfp4_size, repeats=nvfp4_repeats, device=device, with_peer=with_peer)
    checkpoint_gibs = [] if args.quick or args.gpu else args.checkpoint_gib
    reconcile_rows = reconcile_copy.table(checkpoint_gibs, checkpoint_gibs[:1]) if checkpoint_gibs else []
    args.out.parent.mkdir(parents=True, exist_ok=True)
    plot = args.out.with_suffix(".png")
    _plot(steps, plot)
    text = [
        f"# Benchmark results ({device.upper()}{', quick' if args.quick else ''})",
        "",
        *_machine(device),
        "",
        "Written by `make bench` (`python -m benchmarks.run`). Each row is timed on both sides in the same",
        "process, the sides (and, for fp32/bf16 reduce_amax, one plain `torch.amax`) taking turns round by",
        "round; the float8 row runs each side in a fresh process, for its memory figure. Each reduce_amax",
        "side runs once untimed first (allocator and thread pool warm-up). Best of N wall",
        "times, garbage collector paused during the timed call. Compare ratios.",
        "",
        "## Shared-state lifecycle",
        "",
        *_lifecycle_table(steps),
        "",
        f"![cost against members]({plot.name})",
        "",
        "## reduce_amax",
        "",
        *_reduction_table(reduce_rows),
        "",
        "## NVFP4 quantize and requantize",
        "",
        *nvfp4_speed.table(nvfp4_rows),
        "",
        *(["## reconcile beside cp -r", "", reconcile_copy.__doc__.split("\n\n")[1].replace("\n", " "), "",
           *reconcile_rows, ""] if reconcile_rows else []),
        *_history(),
    ]
    args.out.write_text("\n".join(text))
    print("\n".join(text))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
