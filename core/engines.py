"""What inference engines do with a fused group whose members disagree on the weight scale. Pure.

An engine that fuses siblings (q/k/v -> qkv, an expert's gate/up -> w13) into one GEMM
with ONE per-tensor scale must pick one of the members' scales and, so far, keeps
every member's codes and block scales as they are. A member decoded with a
``weight_scale_2`` ``r`` times its own has every weight off by the factor ``r``: a
relative error of ``|r - 1|``. That needs the scales alone, never a packed weight.

``ENGINE_RULES`` is the one table of what each engine picks. Update it as engines
change; each rule names the code it was read from. Rules are stated in terms of the
effective ``weight_scale_2`` (the dequantization multiplier): compressed-tensors stores
its reciprocal, ``weight_global_scale``, so "the largest ``weight_global_scale``" is
"the smallest ``weight_scale_2``".
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import NamedTuple

from .formats import Format
from .groups import is_expert, parent_fqn
from .reconcile import GroupReport, MemberScales

__all__ = ["ENGINE_RULES", "EngineRule", "RuleImpact", "applicable_rules", "find_rule_impacts"]

KEEPS = ("first", "largest", "smallest", "own")


@dataclass(frozen=True, slots=True)
class EngineRule:
    """How one engine path picks the scale of a fused tensor.

    Attributes:
        name: short name shown in the output.
        engine: the engine path, in words.
        formats: checkpoint format names (``Format.name``) the rule covers.
        roles: the sibling role sets it fuses, each in stacking order (gate before up).
        experts: ``True``: siblings inside one routed expert (``...experts.<i>``);
            ``False``: every other module's siblings.
        keeps: ``"first"`` (the first role's scale), ``"largest"`` or ``"smallest"``
            ``weight_scale_2``, or ``"own"`` (one scale per member: nobody is off).
        source: where the behaviour was read.
    """

    name: str
    engine: str
    formats: tuple[str, ...]
    roles: tuple[tuple[str, ...], ...]
    experts: bool
    keeps: str
    source: str


@dataclass(frozen=True, slots=True)
class RuleImpact:
    """A rule applied to a checkpoint: how many members it covers and puts off, and the worst one.

    Attributes:
        rule: the rule.
        members: members of the sibling sets the rule covers.
        affected: those decoded with a scale other than their own.
        worst_error: the largest ``|r - 1|`` over the members (0.0 when none is affected).
        worst_member: the member with that error, ``None`` when none is affected.
    """

    rule: EngineRule
    members: int
    affected: int
    worst_error: float
    worst_member: str | None


_MOE_PAIRS = (("gate_proj", "up_proj"), ("w1", "w3"))
# vLLM's packed_modules_mapping (vllm/model_executor/models/*.py): qkv_proj, gate_up_proj
# (InternLM2's from w1/w3), DeepSeek's fused_qkv_a_proj, Qwen3.5's in_proj_qkvz and in_proj_ba.
_VLLM_DENSE = (
    ("q_proj", "k_proj", "v_proj"),
    ("gate_proj", "up_proj"),
    ("w1", "w3"),
    ("q_a_proj", "kv_a_proj_with_mqa"),
    ("in_proj_qkv", "in_proj_z"),
    ("in_proj_b", "in_proj_a"),
)
_VLLM = "vllm/model_executor/layers/quantization/"

ENGINE_RULES: tuple[EngineRule, ...] = (
    EngineRule(
        "vllm-moe", "vLLM fused MoE: the gate's (w1's) scale for w13", ("modelopt", "compressed-tensors"),
        _MOE_PAIRS, experts=True, keeps="first",
        source=f"{_VLLM}modelopt.py ModelOptNvFp4FusedMoE (w13_weight_scale_2[:, 0]); "
        f"{_VLLM}compressed_tensors/compressed_tensors_moe/compressed_tensors_moe_w4a4_nvfp4.py "
        "(w13_weight_global_scale[:, 0]); vLLM issues 54974, 54150; PR 55073 open",
    ),
    EngineRule(
        "trtllm-cutlass-moe", "TensorRT-LLM Cutlass MoE: the largest, no rescaling", ("modelopt",),
        _MOE_PAIRS, experts=True, keeps="largest",
        source="tensorrt_llm/_torch/modules/fused_moe/quantization.py _resolve_gate_up_weight_scale_2 "
        "(TensorRT-LLM PR 18772 keeps max() for single-alpha backends; PR 14199, to requantize, open)",
    ),
    EngineRule(
        "trtllm-gen-moe", "TensorRT-LLM trtllm-gen MoE: one scale per half", ("modelopt",),
        _MOE_PAIRS, experts=True, keeps="own",
        source="TensorRT-LLM PR 18772 (supports_split_gate_up_weight_scale_2 on trtllm-gen)",
    ),
    EngineRule(
        "sglang-moe", "SGLang MoE: one scale per half (not Marlin)", ("modelopt",),
        _MOE_PAIRS, experts=True, keeps="own",
        source="SGLang PR 27588, python/sglang/srt/layers/quantization/modelopt_quant.py (g1_alphas_up); "
        "its Marlin path still shares one scale",
    ),
    EngineRule(
        "vllm-dense-modelopt", "vLLM dense linear: the largest weight_scale_2", ("modelopt",),
        _VLLM_DENSE, experts=False, keeps="largest",
        source=f"{_VLLM}modelopt.py ModelOptNvFp4LinearMethod (weight_scale_2.max())",
    ),
    EngineRule(
        "vllm-dense-ct", "vLLM dense linear: the smallest weight_scale_2", ("compressed-tensors",),
        _VLLM_DENSE, experts=False, keeps="smallest",
        source=f"{_VLLM}compressed_tensors/schemes/compressed_tensors_w4a4_nvfp4.py "
        "(1 / weight_global_scale.max(): the largest reciprocal is the smallest weight_scale_2)",
    ),
)


def applicable_rules(fmt: Format, rules: Iterable[EngineRule] = ENGINE_RULES) -> tuple[EngineRule, ...]:
    """The rules that cover checkpoints of format ``fmt``."""
    return tuple(rule for rule in rules if fmt.name in rule.formats)


class _Siblings(NamedTuple):
    """Members of one group under one module: what an engine fuses into one tensor."""

    expert: bool
    lasts: frozenset[str]
    members: tuple[MemberScales, ...]


def _siblings(reports: Sequence[GroupReport]) -> list[_Siblings]:
    """Every group's members by parent module (one set per expert in a cross-expert group)."""
    found = []
    for report in reports:
        by_parent: dict[str, list[MemberScales]] = {}
        for member in report.members:
            by_parent.setdefault(parent_fqn(member.fqn), []).append(member)
        for parent, members in by_parent.items():
            lasts = frozenset(member.fqn.rpartition(".")[2] for member in members)
            if len(lasts) < len(members):  # a role twice under one module is no fused tensor: match no rule
                lasts = frozenset()
            found.append(_Siblings(is_expert(parent), lasts, tuple(members)))
    return found


def _kept(
    rule: EngineRule, roles: tuple[str, ...], members: Sequence[MemberScales], fmt: Format
) -> MemberScales | None:
    """The member whose scale the engine keeps (``None``: each keeps its own)."""
    if rule.keeps == "own":
        return None
    if rule.keeps == "first":
        return next(m for m in members if m.fqn.rpartition(".")[2] == roles[0])
    # a reciprocal format stores 1 / weight_scale_2: its largest weight_scale_2 is its smallest value
    largest = (rule.keeps == "largest") != fmt.reciprocal
    return (max if largest else min)(members, key=lambda m: m.scale)


def find_rule_impacts(
    reports: Sequence[GroupReport], fmt: Format, rules: Iterable[EngineRule] = ENGINE_RULES
) -> tuple[RuleImpact, ...]:
    """Each applicable rule's consequence for a checkpoint, from the members' scales alone.

    Args:
        reports: the fused groups (``core.reconcile.report_groups``).
        fmt: the checkpoint's format; rules that do not cover it are left out.
        rules: the rule table (``ENGINE_RULES``).

    Returns:
        One ``RuleImpact`` per applicable rule, in table order.

    Raises:
        ValueError: a rule's ``keeps`` is not one of ``KEEPS``.
    """
    impacts, units = [], _siblings(reports)
    for rule in applicable_rules(fmt, rules):
        if rule.keeps not in KEEPS:
            raise ValueError(f"find_rule_impacts: rule {rule.name!r} keeps {rule.keeps!r}; expected one of {KEEPS}")
        stacks = {frozenset(roles): roles for roles in rule.roles}  # role set -> its stacking order
        covered = affected = 0
        worst_error, worst_member = 0.0, None
        for siblings in units:
            roles = stacks.get(siblings.lasts) if siblings.expert == rule.experts else None
            if roles is None:
                continue
            covered += len(siblings.members)
            kept = _kept(rule, roles, siblings.members, fmt)
            for member in siblings.members:
                if kept is None or member.scale == kept.scale:
                    continue
                # r = kept weight_scale_2 / own weight_scale_2, from the stored values
                r = member.scale / kept.scale if fmt.reciprocal else kept.scale / member.scale
                affected += 1
                if abs(r - 1) > worst_error:
                    worst_error, worst_member = abs(r - 1), member.fqn
        impacts.append(RuleImpact(rule, covered, affected, worst_error, worst_member))
    return tuple(impacts)
