"""The ``sharedquant`` command: ``inspect``, ``reconcile``, ``convert`` and ``demo``.

Exit status: 0 when every fused group is consistent (``inspect``) or the job is done,
1 when ``inspect`` finds a mismatched group (with ``--fail-above R``: a weight-scale
ratio above R), 2 on bad input (one line on stderr, nothing written), 3 on an internal
error (a defect: one line, ``--debug`` shows the traceback), 130 / 143 when interrupted
by SIGINT / SIGTERM (the staging directory removed). The work is done by
``adapters.checkpoint``; ``adapters.report`` renders what ``inspect`` prints; this file
parses arguments, turns signals into exceptions and draws a progress bar.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import signal
import sys
import threading
import traceback
from collections.abc import Sequence
from typing import TextIO

from safetensors import SafetensorError
from tqdm import tqdm

from sharedquant.core.formats import DEFAULT_PATTERNS
from sharedquant.core.groups import compile_patterns

from .checkpoint import inspect_checkpoint
from .convert import conversion_lines, convert_checkpoint
from .rewrite import Reconciliation, reconcile_checkpoint
from .report import exceeding, format_summary, format_table, inspection_json, summary_line

__all__ = ["format_table", "inspection_json", "main", "summary_line"]  # the walkthrough notebook imports these here

BAD_INPUT = 2
INTERNAL_ERROR = 3
_BAD_INPUT_ERRORS = (ValueError, OSError, SafetensorError)
_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Interrupted(BaseException):
    """SIGINT or SIGTERM, raised where the process was, so every ``finally`` on the way out runs."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def _raise_interrupted(signum: int, frame) -> None:
    for number in _SIGNALS:  # a second Ctrl-C must not cut the clean-up short
        signal.signal(number, signal.SIG_IGN)
    raise Interrupted(signum)


@contextlib.contextmanager
def _signals_raise():
    """SIGINT and SIGTERM raise ``Interrupted`` inside the block; the old handlers come back after it."""
    if threading.current_thread() is not threading.main_thread():  # only the main thread may set handlers
        yield
        return
    previous = {number: signal.signal(number, _raise_interrupted) for number in _SIGNALS}
    try:
        yield
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)


class ByteBar:
    """One tqdm bar over a run's bytes on stderr, its phase as the text; off when stderr is no terminal or quiet.

    Called as ``bar(phase, done, total)``, the ``progress`` of ``adapters.checkpoint``.
    """

    def __init__(self, stream: TextIO, label: str, *, quiet: bool, leave: bool, delay: float = 0.0) -> None:
        off = quiet or not bool(getattr(stream, "isatty", lambda: False)())
        options = {"unit": "B", "unit_scale": True, "unit_divisor": 1024, "dynamic_ncols": True, "delay": delay}
        self.label, self.bar = label, tqdm(total=0, file=stream, disable=off, leave=leave, **options)

    def __call__(self, phase: str, done: int, total: int) -> None:
        if self.bar.disable:
            return
        if total != self.bar.total or done < self.bar.n:  # a new phase that goes over the bytes again
            self.bar.reset(total=total)
        self.bar.set_description(f"{self.label}: {phase}", refresh=False)
        self.bar.update(done - self.bar.n)

    def close(self) -> None:
        self.bar.close()


def _inspect(args: argparse.Namespace) -> int:
    # delay: a one-shard local inspect ends before a bar would be worth drawing
    bar = ByteBar(sys.stderr, "inspect", quiet=args.quiet, leave=False, delay=0.5)
    try:
        inspection = inspect_checkpoint(args.path, args.patterns, require_match=args.require_match, progress=bar)
    finally:
        bar.close()
    if args.json:
        print(json.dumps(inspection_json(inspection, args.fail_above), indent=2))
    else:
        if args.all and inspection.reports:
            print(format_table(inspection, closing=False), end="\n\n")
        print(format_summary(inspection, args.fail_above))
    return 1 if exceeding(inspection, args.fail_above) else 0


def _scale(value: float | None) -> str:
    return "-" if value is None else f"{value:.5e}"


def _change_lines(result: Reconciliation, verb: str) -> list[str]:
    lines = []
    for report in result.inspection.reports:
        fmt = report.format
        for member in report.members:
            if member.fqn in report.changed:
                action = f"{verb[0]} {member.fqn}" if fmt.requantizes else f"{verb[1]} {member.fqn}.{fmt.scale}"
                lines.append(f"{action}: {_scale(member.scale)} -> {_scale(report.shared_scale)}")
            if member.fqn in report.input_changed:
                shared = _scale(report.shared_input_scale)
                lines.append(f"{verb[1]} {member.fqn}.{fmt.input_scale}: {_scale(member.input_scale)} -> {shared}")
    return lines


def _reconcile(args: argparse.Namespace) -> int:
    if not args.dry_run and args.out is None:
        raise ValueError("--out DIR is required (or pass --dry-run)")
    bar = ByteBar(sys.stderr, "reconcile", quiet=args.quiet, leave=True)
    options = {"force": args.force, "dry_run": args.dry_run, "device": args.device, "progress": bar}
    try:
        result = reconcile_checkpoint(args.path, args.out, args.patterns, require_match=args.require_match, **options)
    finally:
        bar.close()
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


def _convert(args: argparse.Namespace) -> int:
    bar = ByteBar(sys.stderr, "convert", quiet=args.quiet, leave=True)
    try:
        result = convert_checkpoint(args.path, args.out, args.to, force=args.force, progress=bar)
    finally:
        bar.close()
    print("\n".join(conversion_lines(result, every=args.all)))
    return 0


def _demo(args: argparse.Namespace) -> int:
    from .demo import run_demo  # builds models: imported only when asked for

    return run_demo(sys.stdout)


def _settle_patterns(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """``--patterns A B`` before PATH: the last value is PATH; patterns compiled; defaults filled in."""
    if args.command not in ("inspect", "reconcile"):
        return
    if args.path is None:
        if not args.patterns or len(args.patterns) < 2:
            parser.error(f"{args.command}: the following arguments are required: PATH")
        args.path = args.patterns.pop()
    args.require_match = args.patterns is not None  # a pattern the user gave must find something
    if args.patterns is None:
        args.patterns = list(DEFAULT_PATTERNS)
    try:
        compile_patterns(args.patterns, where="--patterns")
    except ValueError as err:
        parser.error(f"{args.command}: {err}")


def _ratio(value: str) -> float:
    try:
        ratio = float(value)
    except ValueError:
        ratio = math.nan
    if not (math.isfinite(ratio) and ratio >= 1):
        raise argparse.ArgumentTypeError(f"expected a ratio of scales, a finite number >= 1, got {value!r}")
    return ratio


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (sub-commands ``inspect``, ``reconcile``, ``convert``, ``demo``)."""
    parser = argparse.ArgumentParser(
        prog="sharedquant",
        description="Find and repair fused groups (q/k/v, gate/up, w1/w3) of NVFP4, FP8 and INT8 checkpoints "
        "whose members disagree on the per-tensor scale.",
        epilog="exit status: 0 done (inspect: every group consistent), 1 inspect found a mismatched group "
        "(or a ratio above --fail-above), 2 bad input, 3 internal error, 130/143 interrupted (SIGINT/SIGTERM)",
    )
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", help="show the traceback of an error")
    commands = parser.add_subparsers(dest="command", required=True, metavar="{inspect,reconcile,convert,demo}")
    patterns_help = (
        "a regex over module names, capture groups = group key; repeat the flag for several; replaces the "
        f"defaults ({', '.join(DEFAULT_PATTERNS)}); one that matches no module is an error"
    )
    patterns = {"action": "extend", "nargs": "+", "metavar": "REGEX", "default": None, "help": patterns_help}
    source_help = (
        "a .safetensors file, or a directory with model.safetensors or model.safetensors.index.json; "
        "or hf://ORG/REPO[@REVISION] or an http(s):// URL of any of these (read by range requests)"
    )
    quiet = {"action": "store_true", "help": "no progress bar (it is shown only when stderr is a terminal)"}
    inspect = commands.add_parser(
        "inspect", parents=[common], help="print every fused group's scales; exit 1 if any is mismatched"
    )
    inspect.add_argument("path", metavar="PATH", nargs="?", help=source_help)
    inspect.add_argument("--patterns", **patterns)
    inspect.add_argument("--json", action="store_true", help="print JSON (summary, kinds, engine rules, groups)")
    inspect.add_argument("--all", action="store_true", help="also print the full table, one row per member")
    fail_help = "exit 1 only if some group's weight-scale ratio exceeds RATIO (default: exit 1 on any mismatch)"
    inspect.add_argument("--fail-above", type=_ratio, metavar="RATIO", help=fail_help)
    inspect.add_argument("--quiet", **quiet)
    inspect.set_defaults(func=_inspect)
    reconcile = commands.add_parser(
        "reconcile", parents=[common], help="write a copy in which every fused group shares one scale"
    )
    reconcile_help = "the input checkpoint (never modified; a URL only with --dry-run)"
    reconcile.add_argument("path", metavar="PATH", nargs="?", help=reconcile_help)
    reconcile.add_argument("--out", metavar="DIR", help="output directory (written to a temporary one, then renamed)")
    reconcile.add_argument("--patterns", **patterns)
    reconcile.add_argument("--force", action="store_true", help="replace an existing --out")
    reconcile.add_argument("--dry-run", action="store_true", help="print what would change, write nothing")
    reconcile.add_argument(
        "--device", choices=("auto", "cpu", "cuda"), default="auto",
        help="where requantization runs (default auto: cuda when available)",
    )  # fmt: skip
    reconcile.add_argument("--quiet", **quiet)
    reconcile.set_defaults(func=_reconcile)
    convert_help = "write a copy in the other layout (NVFP4, FP8 per-tensor); the values do not change"
    convert = commands.add_parser("convert", parents=[common], help=convert_help)
    convert.add_argument("path", metavar="PATH", help="the input checkpoint (never modified)")
    convert.add_argument("--to", required=True, choices=["modelopt", "compressed-tensors"], help="the target layout")
    convert.add_argument("--out", required=True, metavar="DIR", help="output directory (written beside, then renamed)")
    convert.add_argument("--force", action="store_true", help="replace an existing --out")
    convert.add_argument("--all", action="store_true", help="list every scale whose reciprocal does not invert")
    convert.add_argument("--quiet", **quiet)
    convert.set_defaults(func=_convert)
    demo_help = "quantize two tiny models without sharing, inspect, reconcile, compare"
    demo = commands.add_parser("demo", parents=[common], help=demo_help)
    demo.set_defaults(func=_demo)
    return parser


def _error(args: argparse.Namespace, err: BaseException, what: str = "error") -> None:
    """One line on stderr; the traceback too with ``--debug``."""
    if args.debug:
        traceback.print_exception(err)
    message = " ".join(str(err).split()) or type(err).__name__
    print(f"sharedquant {args.command}: {what}: {message}", file=sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
        _settle_patterns(parser, args)
    except SystemExit as exit_:  # usage errors and --help: argparse's status, returned, not raised
        return exit_.code if isinstance(exit_.code, int) else BAD_INPUT
    try:
        with _signals_raise():
            return args.func(args)
    except BrokenPipeError:  # `| head` closed stdout: stop quietly, as other command-line tools do
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except (Interrupted, KeyboardInterrupt) as err:  # the staging directory is gone by now
        signum = getattr(err, "signum", signal.SIGINT)
        if args.debug:
            traceback.print_exception(err)
        print(f"sharedquant {args.command}: interrupted by {signal.Signals(signum).name}", file=sys.stderr)
        return 128 + signum
    except _BAD_INPUT_ERRORS as err:
        _error(args, err)
        return BAD_INPUT
    except Exception as err:  # a defect: still one line, but said to be ours
        _error(args, err, f"internal error ({type(err).__name__}; rerun with --debug for the traceback)")
        return INTERNAL_ERROR


if __name__ == "__main__":
    sys.exit(main())
