"""The ``sharedquant`` command: ``inspect``, ``reconcile`` and ``demo``.

Exit status: 0 when every fused group is consistent (``inspect``) or the job is done,
1 when ``inspect`` finds a mismatched group, 2 on bad input (one line on stderr,
nothing written). The work is done by ``adapters.checkpoint``; this file parses
arguments and renders tables, JSON and a progress bar.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Mapping, Sequence
from typing import TextIO

from safetensors import SafetensorError

from sharedquant.core.formats import DEFAULT_PATTERNS
from sharedquant.core.groups import compile_patterns

from .checkpoint import Inspection, Reconciliation, inspect_checkpoint, reconcile_checkpoint

__all__ = ["format_table", "inspection_json", "main"]

BAD_INPUT = 2
# Bad input only: anything else is a defect and keeps its traceback.
_BAD_INPUT_ERRORS = (ValueError, OSError, SafetensorError)


def _scale(value: float | None) -> str:
    return "-" if value is None else f"{value:.5e}"


def _short(fqn: str, parent: str) -> str:
    return fqn[len(parent) + 1 :] if parent and fqn.startswith(parent + ".") else fqn


def format_table(inspection: Inspection, extra: Mapping[str, Mapping[str, str]] | None = None) -> str:
    """The ``inspect`` table: one row per member, the group's ratio and status on its first row.

    Args:
        inspection: what ``inspect_checkpoint`` returned.
        extra: optional member FQN -> {column title: text}, shown after the status.
    """
    fmt = inspection.format
    titles = list(dict.fromkeys(title for columns in (extra or {}).values() for title in columns))
    header = ["group", "member", fmt.scale] + ([fmt.input_scale] if fmt.input_scale else []) + ["ratio", "status"]
    rows = [header + titles]
    for report in inspection.reports:
        status = "ok" if report.consistent else ("MISMATCH" if report.changed else "input mismatch")
        for position, member in enumerate(report.members):
            first = position == 0
            row = [report.group.parent if first else "", _short(member.fqn, report.group.parent), _scale(member.scale)]
            row += [_scale(member.input_scale)] if fmt.input_scale else []
            row += [f"{report.ratio:.4f}x" if first else "", status if first else ""]
            rows.append(row + [(extra or {}).get(member.fqn, {}).get(title, "") for title in titles])
    widths = [max(len(row[i]) for row in rows) for i in range(len(header) + len(titles))]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in rows]
    return "\n".join(lines + [summary_line(inspection)])


def summary_line(inspection: Inspection) -> str:
    """One line: how many groups, how many mismatched, the worst ratio."""
    reports = inspection.reports
    if not reports:
        return f"no fused groups found ({inspection.format.name} format)"
    bad = [report for report in reports if not report.consistent]
    line = f"{len(reports)} fused groups, {len(reports) - len(bad)} consistent, {len(bad)} mismatched"
    if bad:
        worst = max(bad, key=lambda report: max(report.ratio, report.input_ratio))
        line += f" (worst {max(worst.ratio, worst.input_ratio):.3f}x in {worst.group.parent or '<root>'})"
    return f"{line}; format {inspection.format.name}"


def inspection_json(inspection: Inspection) -> dict:
    """The same content as the table, for scripts."""
    fmt = inspection.format
    groups = [
        {
            "parent": report.group.parent,
            "members": [
                {"name": m.fqn, "scale": m.scale, "input_scale": m.input_scale, "block_size": m.block_size}
                for m in report.members
            ],
            "shared_scale": report.shared_scale,
            "shared_input_scale": report.shared_input_scale,
            "ratio": report.ratio,
            "input_ratio": report.input_ratio,
            "consistent": report.consistent,
        }
        for report in inspection.reports
    ]
    mismatched = [group for group in groups if not group["consistent"]]
    return {
        "path": str(inspection.path),
        "format": fmt.name,
        "scale_key": fmt.scale,
        "input_scale_key": fmt.input_scale,
        "groups": groups,
        "summary": {
            "groups": len(groups),
            "consistent": len(groups) - len(mismatched),
            "mismatched": len(mismatched),
            "worst_ratio": max((max(g["ratio"], g["input_ratio"]) for g in groups), default=1.0),
        },
    }


class Progress:
    """A progress bar: redrawn in place on a terminal; elsewhere a line every few seconds once a run is long."""

    def __init__(self, stream: TextIO, label: str, *, quiet_for: float = 5.0, every: float = 10.0) -> None:
        self.stream, self.label, self.quiet_for, self.every = stream, label, quiet_for, every
        self.tty = bool(getattr(stream, "isatty", lambda: False)())
        self.start = self.last = time.monotonic()
        self.drawn = False

    def __call__(self, done: int, total: int, what: str) -> None:
        now = time.monotonic()
        if self.tty:
            filled = 30 * done // max(total, 1)
            self.stream.write(f"\r{self.label} [{'#' * filled}{'.' * (30 - filled)}] {done}/{total} {what[-60:]:<60}")
            self.drawn = True
        elif now - self.start >= self.quiet_for and (now - self.last >= self.every or done == total):
            self.stream.write(f"{self.label}: {done}/{total} ({now - self.start:.0f} s) {what}\n")
            self.last = now
        self.stream.flush()

    def close(self) -> None:
        if self.drawn:
            self.stream.write("\n")
            self.stream.flush()


def _inspect(args: argparse.Namespace) -> int:
    inspection = inspect_checkpoint(args.path, args.patterns)
    if args.json:
        print(json.dumps(inspection_json(inspection), indent=2))
    else:
        print(format_table(inspection))
    return 0 if inspection.consistent else 1


def _change_lines(result: Reconciliation, verb: str) -> list[str]:
    fmt, lines = result.inspection.format, []
    for report in result.inspection.reports:
        for member in report.members:
            if member.fqn in report.changed:
                action = f"{verb[0]} {member.fqn}" if fmt.packed else f"{verb[1]} {member.fqn}.{fmt.scale}"
                lines.append(f"{action}: {_scale(member.scale)} -> {_scale(report.shared_scale)}")
            if member.fqn in report.input_changed:
                shared = _scale(report.shared_input_scale)
                lines.append(f"{verb[1]} {member.fqn}.{fmt.input_scale}: {_scale(member.input_scale)} -> {shared}")
    return lines


def _reconcile(args: argparse.Namespace) -> int:
    if not args.dry_run and args.out is None:
        raise ValueError("--out DIR is required (or pass --dry-run)")
    progress = Progress(sys.stderr, "reconcile")
    try:
        result = reconcile_checkpoint(
            args.path, args.out, args.patterns, force=args.force, dry_run=args.dry_run, progress=progress
        )
    finally:
        progress.close()
    verb = ("would requantize", "would set") if args.dry_run else ("requantized", "set")
    for line in _change_lines(result, verb):
        print(line)
    changed = len(result.requantized) + len(result.scales_set)
    groups = sum(1 for report in result.inspection.reports if not report.consistent)
    where = "dry run, nothing written" if args.dry_run else f"written to {result.out}"
    print(
        f"{groups} of {len(result.inspection.reports)} fused groups reconciled: {changed} member scales changed, "
        f"{len(result.inputs_unified)} input scales unified; {where}"
    )
    if result.inexact:
        print(
            f"note: {len(result.inexact)} member(s) were requantized with a scale one fp32 ulp from the shared "
            "one, which no fp32 global amax reproduces exactly; the shared value is stored unchanged"
        )
    return 0


def _demo(args: argparse.Namespace) -> int:
    from .demo import run_demo  # builds models: imported only when asked for

    return run_demo(sys.stdout, format_table)


def _patterns(value: str) -> str:
    try:
        compile_patterns([value], where="--patterns")
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from err
    return value


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (sub-commands ``inspect``, ``reconcile``, ``demo``)."""
    parser = argparse.ArgumentParser(
        prog="sharedquant",
        description="Find and repair fused NVFP4 groups (q/k/v, gate/up, w1/w3) whose members disagree "
        "on the global scale.",
        epilog="exit status: 0 done (inspect: every group consistent), 1 inspect found a mismatched group, 2 bad input",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="{inspect,reconcile,demo}")
    patterns_help = "regexes over module names, capture groups = group key (replaces the defaults: %(default)s)"
    inspect = commands.add_parser("inspect", help="print every fused group's scales; exit 1 if any is mismatched")
    patterns = {"nargs": "+", "metavar": "REGEX", "type": _patterns, "default": list(DEFAULT_PATTERNS)}
    source_help = "a .safetensors file, or a directory with model.safetensors or model.safetensors.index.json"
    inspect.add_argument("path", metavar="PATH", help=source_help)
    inspect.add_argument("--patterns", **patterns, help=patterns_help)
    inspect.add_argument("--json", action="store_true", help="print JSON instead of a table")
    inspect.set_defaults(func=_inspect)
    reconcile = commands.add_parser("reconcile", help="write a copy in which every fused group shares one scale")
    reconcile.add_argument("path", metavar="PATH", help="the input checkpoint (never modified)")
    reconcile.add_argument("--out", metavar="DIR", help="output directory (written to a temporary one, then renamed)")
    reconcile.add_argument("--patterns", **patterns, help=patterns_help)
    reconcile.add_argument("--force", action="store_true", help="replace an existing --out")
    reconcile.add_argument("--dry-run", action="store_true", help="print what would change, write nothing")
    reconcile.set_defaults(func=_reconcile)
    demo = commands.add_parser("demo", help="quantize two tiny models without sharing, inspect, reconcile, compare")
    demo.set_defaults(func=_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:  # usage errors and --help: argparse's status, returned, not raised
        return exit_.code if isinstance(exit_.code, int) else BAD_INPUT
    try:
        return args.func(args)
    except BrokenPipeError:  # `| head` closed stdout: stop quietly, as other command-line tools do
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except _BAD_INPUT_ERRORS as err:
        message = " ".join(str(err).split()) or type(err).__name__
        print(f"sharedquant {args.command}: error: {message}", file=sys.stderr)
        return BAD_INPUT


if __name__ == "__main__":
    sys.exit(main())
