"""NVFP4 bytes per second: ``nvfp4_quantize`` beside the peer's quantizer, ``requantize`` beside its reference and a copy.

    python -m benchmarks.nvfp4_speed            # these rows alone, 4096 x 4096
    python -m benchmarks.nvfp4_speed --quick    # 256 x 256: checks that every row runs
    python -m benchmarks.nvfp4_speed --threads 1  # both sides on one core (a busy shared machine)

Rows of one member (bf16 weights for the quantizers; packed codes and fp8 block scales
for requantization, with the shared scale 2.5x the member's own). The sides of a row
take turns round by round in one process; ``clone`` copies the same codes and block
scales, the least a rewrite of them can cost. Best of N wall times; compare ratios.
"""

from __future__ import annotations

import argparse
import warnings
from dataclasses import dataclass

import torch

from sharedquant.core.nvfp4 import nvfp4_quantize
from sharedquant.core.reconcile import _requantize_reference, global_amax_for, requantize

from .models import peer_available
from .timing import best_of_each


@dataclass(frozen=True)
class Row:
    case: str
    elements: int
    packed_bytes: int
    ours: float
    other_name: str
    other: float | None


def _peer_quantize():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the peer warns about the transformers version on import
        from modelopt.torch.quantization.qtensor.nvfp4_tensor import NVFP4QTensor
    return NVFP4QTensor.quantize


def run(rows: int, columns: int, repeats: int = 3, device: str = "cpu", with_peer: bool = True) -> list[Row]:
    """Time every row; the peer's column is ``None`` where it is not installed or not asked for."""
    sync = device != "cpu"
    weight = (torch.randn(rows, columns, device=device) * 0.02).to(torch.bfloat16)
    global_amax = weight.abs().amax().float()
    member = nvfp4_quantize(weight, global_amax)
    elements, packed_bytes = weight.numel(), member.packed.numel() + member.block_scale.numel()
    out = []

    quantize = (lambda: nvfp4_quantize(weight, global_amax), None)
    peer = None
    if with_peer and peer_available():
        peer_quantize = _peer_quantize()
        peer = (lambda: peer_quantize(weight, 16, weights_scaling_factor_2=member.global_scale), None)
    ours, theirs = best_of_each([quantize, peer or quantize], [repeats, repeats if peer else 0], sync=sync)
    out.append(Row(f"nvfp4_quantize bf16 {rows}x{columns}", elements, packed_bytes, ours, "peer NVFP4QTensor.quantize", theirs))

    shared = member.global_scale * 2.5
    fast = (lambda: requantize(member.packed, member.block_scale, member.global_scale, shared), None)
    amax = global_amax_for(shared)[0]
    reference = (lambda: _requantize_reference(member.packed, member.block_scale, member.global_scale, amax), None)
    copy = (lambda: (member.packed.clone(), member.block_scale.clone()), None)
    ours, slow, copied = best_of_each([fast, reference, copy], [repeats] * 3, sync=sync)
    case = f"requantize {rows}x{columns}, shared scale 2.5x"
    out.append(Row(case, elements, packed_bytes, ours, "dequantize-then-quantize reference", slow))
    out.append(Row(case, elements, packed_bytes, ours, "torch.clone of the same bytes", copied))
    return out


def table(rows: list[Row]) -> list[str]:
    """Markdown: ours in ms, ns per element and GB/s of packed weights, the other side, and their ratio."""
    out = [
        "| case | ours ms | ours ns/element | ours GB/s packed | beside | its ms | its GB/s | ours faster by |",
        "|---|---:|---:|---:|---|---:|---:|---:|",
    ]
    for row in rows:
        rate = lambda s: "-" if s is None else f"{row.packed_bytes / s / 1e9:.2f}"  # noqa: E731
        other = "-" if row.other is None else f"{row.other * 1e3:.2f}"
        ratio = "-" if row.other is None else f"{row.other / row.ours:.2f}x"
        out.append(
            f"| {row.case} | {row.ours * 1e3:.2f} | {row.ours * 1e9 / row.elements:.2f} | {rate(row.ours)} "
            f"| {row.other_name} | {other} | {rate(row.other)} | {ratio} |"
        )
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.nvfp4_speed", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="256 x 256: check that every row runs")
    parser.add_argument("--gpu", action="store_true", help="run the rows on CUDA")
    parser.add_argument("--no-peer", action="store_true", help="leave the peer's column empty")
    parser.add_argument("--threads", type=int, help="torch intra-op threads for both sides (default: torch's)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    size = 256 if args.quick else 4096
    rows = run(size, size, repeats=1 if args.quick else 5, device="cuda" if args.gpu else "cpu", with_peer=not args.no_peer)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    print("\n".join(table(rows)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
