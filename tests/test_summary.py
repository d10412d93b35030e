"""core.summary: groups per kind, nearest-rank ratio statistics, the worst groups."""

import pytest

from sharedquant.core.formats import MODELOPT
from sharedquant.core.groups import Group
from sharedquant.core.reconcile import MemberScales, report_groups
from sharedquant.core.summary import nearest_rank, summarize_kinds, worst_reports


@pytest.mark.parametrize(
    ("values", "fraction", "expected"),
    [([1, 2, 3, 4, 5], 0.5, 3), ([1, 2, 3, 4], 0.5, 2), ([1, 2, 3, 4], 0.99, 4), ([7], 0.01, 7), (list(range(1, 201)), 0.99, 198)],
)  # fmt: skip
def test_nearest_rank_is_the_ceil_rank_value(values, fraction, expected):
    assert nearest_rank(values, fraction) == expected


@pytest.mark.parametrize(("values", "fraction"), [([], 0.5), ([1.0], 0.0), ([1.0], 1.5)])
def test_nearest_rank_refuses_what_has_no_percentile(values, fraction):
    with pytest.raises(ValueError, match="nearest_rank"):
        nearest_rank(values, fraction)


def pair(parent, gate, up, roles=("gate_proj", "up_proj")):
    fqns = (f"{parent}.{roles[0]}", f"{parent}.{roles[1]}")
    return Group(key=(0, (parent,)), parent=parent, members=fqns), {fqns[0]: gate, fqns[1]: up}


def build(*pairs):
    groups, scales = [], {}
    for group, values in pairs:
        groups.append(group)
        scales |= {fqn: MemberScales(fqn, value) for fqn, value in values.items()}
    return report_groups(groups, scales, MODELOPT)


def test_kinds_are_counted_apart_with_their_ratio_statistics():
    reports = build(
        pair("l.0.mlp.experts.0", 1.0, 1.0),
        pair("l.0.mlp.experts.1", 1.0, 3.0),
        pair("l.0.mlp.experts.2", 2.0, 1.0),
        pair("l.0.mlp", 1.0, 1.0),
        pair("l.0.attn", 1.0, 5.0, roles=("to_q", "to_k")),
    )
    first, dense, attention = summarize_kinds(reports, worst=1)
    assert (first.kind, first.groups, first.mismatched, first.share) == ("gate_proj/up_proj (per expert)", 3, 2, 2 / 3)
    assert (first.ratio_median, first.ratio_p99, first.ratio_max) == (2.0, 3.0, 3.0)
    assert [report.group.parent for report in first.worst] == ["l.0.mlp.experts.1"]
    assert (dense.kind, dense.mismatched, dense.ratio_max, dense.worst) == ("gate_proj/up_proj", 0, 1.0, ())
    assert (attention.kind, attention.ratio_median) == ("to_q/to_k", 5.0)


def test_worst_groups_are_ordered_by_ratio_then_name():
    reports = build(pair("b", 1.0, 2.0), pair("a", 2.0, 1.0), pair("c", 1.0, 4.0), pair("d", 1.0, 1.0))
    assert [r.group.parent for r in worst_reports(reports, 5)] == ["c", "a", "b"]
    assert [r.group.parent for r in worst_reports(reports, 1)] == ["c"]
