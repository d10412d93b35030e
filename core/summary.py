"""The summary ``inspect`` leads with: fused groups counted per kind, ratio statistics, the worst groups. Pure.

A checkpoint with 40,000 expert pairs needs an answer that fits one screen: per kind of
group (``core.groups.group_kind``: q/k/v, gate/up per expert, w1/w3, the MLA pair, ...)
how many groups there are, how many are mismatched and the spread of their ratios.
Percentiles are nearest-rank (a value that occurs, never an interpolation), so they can
be checked exactly.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from .groups import group_kind
from .reconcile import GroupReport

__all__ = ["KindSummary", "nearest_rank", "summarize_kinds", "worst_reports"]


@dataclass(frozen=True, slots=True)
class KindSummary:
    """One kind of group in a checkpoint.

    Attributes:
        kind: ``group_kind`` of its groups, e.g. ``"gate_proj/up_proj (per expert)"``.
        groups: how many groups of this kind.
        mismatched: how many are not consistent (weight or input scales differ).
        ratio_median, ratio_p99, ratio_max: nearest-rank statistics of the weight-scale
            ratio (largest over smallest member scale) over all its groups.
        worst: its mismatched groups with the largest ratios, worst first (``worst_reports``).
    """

    kind: str
    groups: int
    mismatched: int
    ratio_median: float
    ratio_p99: float
    ratio_max: float
    worst: tuple[GroupReport, ...]

    @property
    def share(self) -> float:
        """The mismatched fraction of the groups."""
        return self.mismatched / self.groups


def nearest_rank(ordered: Sequence[float], fraction: float) -> float:
    """The nearest-rank percentile of ascending ``ordered``: its ``ceil(fraction * n)``-th value.

    Raises:
        ValueError: ``ordered`` is empty or ``fraction`` is not in (0, 1].
    """
    if not ordered or not 0 < fraction <= 1:
        raise ValueError(f"nearest_rank: need values and a fraction in (0, 1], got {len(ordered)} and {fraction}")
    return ordered[max(1, math.ceil(fraction * len(ordered))) - 1]


def worst_reports(reports: Sequence[GroupReport], count: int) -> tuple[GroupReport, ...]:
    """The ``count`` mismatched groups with the largest weight-scale ratio (then input ratio, then name)."""
    bad = [report for report in reports if not report.consistent]
    bad.sort(key=lambda report: (-report.ratio, -report.input_ratio, report.group.parent))
    return tuple(bad[:count])


def summarize_kinds(reports: Sequence[GroupReport], worst: int = 3) -> tuple[KindSummary, ...]:
    """A ``KindSummary`` per kind of group, kinds in first-seen order.

    Args:
        reports: the fused groups (``core.reconcile.report_groups``).
        worst: how many of each kind's worst groups to keep.
    """
    by_kind: dict[str, list[GroupReport]] = {}
    for report in reports:
        by_kind.setdefault(group_kind(report.group), []).append(report)
    summaries = []
    for kind, members in by_kind.items():
        ratios = sorted(report.ratio for report in members)
        summaries.append(
            KindSummary(
                kind=kind,
                groups=len(members),
                mismatched=sum(1 for report in members if not report.consistent),
                ratio_median=nearest_rank(ratios, 0.5),
                ratio_p99=nearest_rank(ratios, 0.99),
                ratio_max=ratios[-1],
                worst=worst_reports(members, worst),
            )
        )
    return tuple(summaries)
