"""What ``sharedquant inspect`` prints: the one-screen summary, the per-group table, the JSON.

Text only: the numbers come from the core (``core.summary``, ``core.engines``) over what
``adapters.checkpoint.inspect_checkpoint`` read. Nothing here touches a file.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

from sharedquant.core.engines import RuleImpact, find_rule_impacts
from sharedquant.core.groups import group_kind
from sharedquant.core.reconcile import GroupReport
from sharedquant.core.summary import KindSummary, summarize_kinds, worst_reports

from .checkpoint import Inspection

__all__ = [
    "exceeding",
    "format_ratio",
    "format_summary",
    "format_table",
    "inspection_json",
    "summary_line",
]

WORST = 5  # worst groups listed in the summary
SHARED_MARK = "*"


def _scale(value: float | None) -> str:
    return "-" if value is None else f"{value:.5e}"


def _short(fqn: str, parent: str) -> str:
    return fqn[len(parent) + 1 :] if parent and fqn.startswith(parent + ".") else fqn


def format_ratio(ratio: float) -> str:
    """A ratio of scales for people: ``"1x"``, ``"1+6.0e-08x"`` (never a "1.0000x" that is not 1), ``"2.213x"``."""
    if not math.isfinite(ratio):
        return "overflow"  # only fp64 scales at both ends of their range get here
    if ratio == 1:
        return "1x"
    if ratio < 1.001:
        return f"1+{ratio - 1:.1e}x"
    return f"{ratio:.4g}x" if ratio < 1e5 else f"{ratio:.3e}x"


def _percent(error: float) -> str:
    if error == 0:
        return "0%"
    return f"{100 * error:.1e}%" if error < 1e-5 else f"{100 * error:.3g}%"


def _status(report: GroupReport) -> str:
    return "ok" if report.consistent else ("MISMATCH" if report.changed else "input mismatch")


def _columns(rows: list[list[str]]) -> list[str]:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return ["  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in rows]


def format_table(
    inspection: Inspection, extra: Mapping[str, Mapping[str, str]] | None = None, *, closing: bool = True
) -> str:
    """The full table (``inspect --all``): a row per member, members in their pattern's role order.

    The group's ratios and status sit on its first row; where the weight scales differ,
    ``*`` marks the members already holding the shared one (``reconcile`` leaves them as they are).

    Args:
        inspection: what ``inspect_checkpoint`` returned.
        extra: optional member FQN -> {column title: text}, shown after the status.
        closing: end with ``summary_line`` (``inspect --all`` follows the table with the summary instead).
    """
    fmt = inspection.format  # None: groups in different formats, so the columns say what they hold
    if not inspection.reports:
        return "\n".join([summary_line(inspection), *_notes(inspection)])
    titles = list(dict.fromkeys(title for columns in (extra or {}).values() for title in columns))
    has_inputs = any(report.format.input_scale for report in inspection.reports)
    scale_title, input_title = (fmt.scale, fmt.input_scale) if fmt is not None else ("weight scale", "input scale")
    inputs = ([input_title], ["input ratio"]) if has_inputs else ([], [])
    rows = [["group", "member", scale_title, *inputs[0], "ratio", *inputs[1], "status"]]
    rows[0] += ["format"] if fmt is None else []
    for report in inspection.reports:
        for position, member in enumerate(report.members):
            first = position == 0
            mark = SHARED_MARK if report.changed and member.scale == report.shared_scale else ""
            row = [report.group.parent if first else "", _short(member.fqn, report.group.parent) + mark]
            row += [_scale(member.scale)] + ([_scale(member.input_scale)] if has_inputs else [])
            row += [format_ratio(report.ratio) if first else ""]
            row += [format_ratio(report.input_ratio) if first else ""] if has_inputs else []
            row += [_status(report) if first else ""]
            row += [report.format.name if first else ""] if fmt is None else []
            rows.append(row + [(extra or {}).get(member.fqn, {}).get(title, "") for title in titles])
    rows[0] += titles
    shared = fmt.scale if fmt is not None else "per-tensor scale"
    legend = f"{SHARED_MARK} holds the shared {shared}; reconcile gives it to the other members of its group"
    closing_lines = [summary_line(inspection), *_notes(inspection)] if closing else []
    return "\n".join(_columns(rows) + [legend] + closing_lines)


def _notes(inspection: Inspection) -> list[str]:
    return [f"note: {note}" for note in inspection.notes]


def _format_names(inspection: Inspection) -> str:
    if inspection.format is not None:
        return inspection.format.name
    return ", ".join(fmt.name for fmt in inspection.formats)


def _rule_impacts(inspection: Inspection) -> tuple[RuleImpact, ...]:
    """Each format's rules over its own groups (a checkpoint may mix formats per group)."""
    by_format: dict = {}
    for report in inspection.reports:
        by_format.setdefault(report.format, []).append(report)
    return tuple(impact for fmt, reports in by_format.items() for impact in find_rule_impacts(reports, fmt))


def summary_line(inspection: Inspection) -> str:
    """One line: how many groups, how many mismatched, the worst ratio."""
    reports = inspection.reports
    if not reports:
        return f"no fused groups found ({_format_names(inspection)} format)"
    bad = [report for report in reports if not report.consistent]
    line = f"{len(reports)} fused groups, {len(reports) - len(bad)} consistent, {len(bad)} mismatched"
    if bad:
        worst = max(bad, key=lambda report: max(report.ratio, report.input_ratio))
        ratio = format_ratio(max(worst.ratio, worst.input_ratio))
        line += f" (worst {ratio} in {worst.group.parent or '<root>'})"
    return f"{line}; {'format' if inspection.format is not None else 'formats'} {_format_names(inspection)}"


def exceeding(inspection: Inspection, fail_above: float | None) -> tuple[GroupReport, ...]:
    """The groups that make ``inspect`` exit 1: a weight-scale ratio above ``fail_above`` (any mismatch if ``None``)."""
    if fail_above is None:
        return tuple(report for report in inspection.reports if not report.consistent)
    return tuple(report for report in inspection.reports if report.ratio > fail_above)


def _kind_lines(kinds: tuple[KindSummary, ...]) -> list[str]:
    rows = [["kind", "groups", "mismatched", "ratio median", "p99", "max"]]
    for kind in kinds:
        rows.append([
            kind.kind, str(kind.groups), f"{kind.mismatched} ({kind.share:.1%})",
            format_ratio(kind.ratio_median), format_ratio(kind.ratio_p99), format_ratio(kind.ratio_max),
        ])  # fmt: skip
    return _columns(rows)


def _rule_lines(impacts: tuple[RuleImpact, ...], fmt_name: str) -> list[str]:
    if not impacts:
        return [f"engine rules: none covers the {fmt_name} format"]
    rows = [["engine rule", "what it keeps", "members off", "worst error", "worst member"]]
    for impact in impacts:
        rows.append([
            impact.rule.name, impact.rule.engine, f"{impact.affected} of {impact.members}",
            _percent(impact.worst_error), impact.worst_member or "-",
        ])  # fmt: skip
    head = "engine consequences, from the scales alone (table: sharedquant.core.engines.ENGINE_RULES):"
    return [head, *_columns(rows)]


def format_summary(inspection: Inspection, fail_above: float | None = None) -> str:
    """The screen ``inspect`` leads with: per kind, the worst groups, each engine rule's consequence, the verdict."""
    fmt, reports = inspection.format, inspection.reports
    if not reports:
        return "\n".join([summary_line(inspection), *_notes(inspection)])
    scale = f"per-tensor scale {fmt.scale}" if fmt is not None else "per-tensor scales by group"
    lines = [f"{inspection.path}: {_format_names(inspection)} format, {scale}", ""]
    lines += _kind_lines(summarize_kinds(reports))
    worst = worst_reports(reports, WORST)
    if worst:
        lines += ["", "worst groups:"]
        ratios = [(f"  {format_ratio(r.ratio)}",) + ((f"input {format_ratio(r.input_ratio)}",) if r.format.input_scale
                  else ()) for r in worst]  # fmt: skip
        lines += _columns([[*pair, r.group.parent or "<root>", group_kind(r.group)] for pair, r in zip(ratios, worst)])
    lines += ["", *_rule_lines(_rule_impacts(inspection), _format_names(inspection)), ""]
    if fail_above is not None:
        over = exceeding(inspection, fail_above)
        lines.append(f"--fail-above {fail_above:g}: {len(over)} group(s) with a weight-scale ratio above it")
    return "\n".join([*lines, summary_line(inspection), *_notes(inspection)])


def _group_json(report: GroupReport) -> dict:
    return {
        "parent": report.group.parent,
        "kind": group_kind(report.group),
        "format": report.format.name,
        "members": [
            {
                "name": m.fqn,
                "scale": m.scale,
                "input_scale": m.input_scale,
                "block_size": m.block_size,
                "shared": m.scale == report.shared_scale,
            }
            for m in report.members
        ],
        "shared_scale": report.shared_scale,
        "shared_input_scale": report.shared_input_scale,
        "ratio": report.ratio,
        "input_ratio": report.input_ratio,
        "consistent": report.consistent,
    }


def _kind_json(kind: KindSummary) -> dict:
    return {
        "kind": kind.kind,
        "groups": kind.groups,
        "mismatched": kind.mismatched,
        "mismatched_share": kind.share,
        "ratio_median": kind.ratio_median,
        "ratio_p99": kind.ratio_p99,
        "ratio_max": kind.ratio_max,
        "worst": [{"parent": r.group.parent, "ratio": r.ratio, "input_ratio": r.input_ratio} for r in kind.worst],
    }


def _rule_json(impact: RuleImpact) -> dict:
    rule = impact.rule
    return {
        "name": rule.name,
        "engine": rule.engine,
        "keeps": rule.keeps,
        "experts": rule.experts,
        "roles": [list(roles) for roles in rule.roles],
        "source": rule.source,
        "members": impact.members,
        "affected": impact.affected,
        "worst_error": impact.worst_error,
        "worst_member": impact.worst_member,
    }


def inspection_json(inspection: Inspection, fail_above: float | None = None) -> dict:
    """The same content as the summary and the table, for scripts."""
    fmt, reports = inspection.format, inspection.reports
    groups = [_group_json(report) for report in reports]
    mismatched = sum(1 for group in groups if not group["consistent"])
    return {
        "path": str(inspection.path),
        "format": _format_names(inspection),
        "scale_key": fmt.scale if fmt is not None else None,
        "input_scale_key": fmt.input_scale if fmt is not None else None,
        "notes": list(inspection.notes),
        "summary": {
            "groups": len(groups),
            "consistent": len(groups) - mismatched,
            "mismatched": mismatched,
            "worst_ratio": max((max(g["ratio"], g["input_ratio"]) for g in groups), default=1.0),
        },
        "kinds": [_kind_json(kind) for kind in summarize_kinds(reports)],
        "worst_groups": [
            {"parent": r.group.parent, "kind": group_kind(r.group), "ratio": r.ratio, "input_ratio": r.input_ratio}
            for r in worst_reports(reports, WORST)
        ],
        "rules": [_rule_json(impact) for impact in _rule_impacts(inspection)],
        "fail_above": fail_above,
        "exceeding": len(exceeding(inspection, fail_above)),
        "groups": groups,
    }
