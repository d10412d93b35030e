"""The module adapter and the pure core, driven side by side, agree after every step.

A hypothesis state machine builds a small generated model (q/k/v, gate/up, per-expert
w1/w3 and singletons under ``layers`` / ``experts`` ModuleLists), then attaches,
calibrates (random per-block weight amax, members up to 10^6 apart), populates, casts,
deep-copies, takes state dicts and restores them into fresh models. After each step:
the adapter's groups are ``core.find_groups`` over the same names, its values are
``core.finalize`` over the amax it was populated from (and ``core.unify_state_dict``
over its own state dict), a fresh model restored from that state dict holds the same,
and every member aliases its group's tensor.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule
from torch import nn

from sharedquant.adapters import (
    SHARED_PATTERNS,
    SHARED_PATTERNS_ACROSS_EXPERTS,
    QuantLinear,
    SharedWeightGlobalAmaxState,
    iter_shared_quant_states,
    replace_quant_module,
)
from sharedquant.adapters.tying import TIED_ATTRS
from sharedquant.core import buffer_key, finalize, find_groups, unify_state_dict

QUANTIZER = "weight_quantizer"
ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP = ("gate_proj", "up_proj", "down_proj")
EXPERT = ("w1", "w2", "w3")
SCALES = (1e-3, 1.0, 1e3)  # members up to 10^6 apart


@dataclass(frozen=True)
class Linear:
    fqn: str
    in_features: int
    out_features: int
    enabled: bool


# --- strategies (this file's own: generated module trees) ---------------------------------


def _roles(pool: tuple[str, ...]) -> st.SearchStrategy[list[str]]:
    # Registration order stays the pool's, as in real models.
    return st.sets(st.sampled_from(pool), min_size=1).map(lambda chosen: [r for r in pool if r in chosen])


@st.composite
def _layer_fqns(draw, prefix: str) -> list[str]:
    blocks = draw(st.sets(st.sampled_from(("self_attn", "mlp", "block_sparse_moe")), min_size=1))
    fqns = []
    if "self_attn" in blocks:
        fqns += [f"{prefix}.self_attn.{r}" for r in draw(_roles(ATTENTION))]
    if "mlp" in blocks:
        fqns += [f"{prefix}.mlp.{r}" for r in draw(_roles(MLP))]
    if "block_sparse_moe" in blocks:
        for expert in range(draw(st.integers(1, 3))):
            fqns += [f"{prefix}.block_sparse_moe.experts.{expert}.{r}" for r in draw(_roles(EXPERT))]
    return fqns


@st.composite
def model_specs(draw) -> tuple[Linear, ...]:
    """Linears of a generated model, in registration order; widths multiples of 16."""
    fqns = [f for layer in range(draw(st.integers(1, 2))) for f in draw(_layer_fqns(f"model.layers.{layer}"))]
    if draw(st.booleans()):
        fqns.append("lm_head")
    width = st.sampled_from((16, 32))
    enabled = st.sampled_from((True, True, True, True, False))
    return tuple(Linear(f, draw(width), draw(width), draw(enabled)) for f in fqns)


def build(spec: tuple[Linear, ...], seed: int) -> nn.Module:
    """A fresh model of ``spec``: nn.Linear everywhere, then ``replace_quant_module`` (nothing calibrated)."""
    torch.manual_seed(seed)
    root = nn.Module()
    for linear in spec:
        parent, parts = root, linear.fqn.split(".")
        for position, part in enumerate(parts[:-1]):
            child = parent._modules.get(part)
            if child is None:
                child = nn.ModuleList() if parts[position + 1].isdigit() else nn.Module()
                parent.add_module(part, child)
            parent = child
        parent.add_module(parts[-1], nn.Linear(linear.in_features, linear.out_features, bias=False))
    replace_quant_module(root)
    modules = dict(root.named_modules())
    for linear in spec:
        if not linear.enabled:
            modules[linear.fqn].weight_quantizer.disable()
    return root


# --- the machine -------------------------------------------------------------------------


class AdapterMachine(RuleBasedStateMachine):
    """Model state: the amax each member holds, whether groups are attached, their expected values."""

    def __init__(self) -> None:
        super().__init__()
        self.model: nn.Module | None = None

    @initialize(
        spec=model_specs(),
        patterns=st.sampled_from((SHARED_PATTERNS, SHARED_PATTERNS_ACROSS_EXPERTS)),
        warm=st.booleans(),
        seed=st.integers(0, 2**16),
    )
    def start(self, spec, patterns, warm, seed):
        self.spec, self.patterns = spec, patterns
        self.model = build(spec, seed=0)
        names = [n for n, m in self.model.named_modules() if isinstance(m, QuantLinear) and m.weight_quantizer.is_enabled]
        containers = [n for n, m in self.model.named_modules() if isinstance(m, nn.ModuleList)]
        self.groups = find_groups(names, patterns, containers=containers)
        self.enabled = names
        self.amax: dict[str, torch.Tensor] = {}  # "<fqn>.weight_quantizer._amax" -> what the member holds
        self.attached = False
        self.values: list[float | None] = [None] * len(self.groups)  # what each state should hold
        self.saved = None
        if warm:  # half the runs start calibrated and tied, so later steps act on real values
            self.attach()
            for position, fqn in enumerate(self.enabled):
                self.set_amax(fqn, SCALES[(seed + position) % len(SCALES)], seed + position)
            self.populate()

    def set_amax(self, fqn: str, scale: float, seed: int) -> None:
        layer = self.model.get_submodule(fqn)
        blocks = layer.out_features * layer.in_features // 16
        amax = (torch.rand(blocks, 1, generator=torch.Generator().manual_seed(seed)) + 0.01) * scale
        layer.weight_quantizer.amax = amax
        self.amax[buffer_key(fqn, QUANTIZER, "_amax")] = amax.float()

    # -- rules ----------------------------------------------------------------------------
    @rule()
    def attach(self):
        created = SharedWeightGlobalAmaxState.attach(self.model, self.patterns)
        assert created == (0 if self.attached else len(self.groups))
        self.attached = True

    @precondition(lambda self: self.model is not None and self.enabled)
    @rule(data=st.data(), then_populate=st.booleans())
    def calibrate(self, data, then_populate):
        targets = data.draw(st.sets(st.sampled_from(self.enabled), min_size=1), label="targets")
        for fqn in sorted(targets):
            scale = data.draw(st.sampled_from(SCALES), label=f"scale {fqn}")
            self.set_amax(fqn, scale, data.draw(st.integers(0, 2**16), label=f"seed {fqn}"))
        if then_populate:  # re-calibration as max_calibrate does it: new amax, then populate
            self.populate()

    @rule()
    def populate(self):
        count = SharedWeightGlobalAmaxState.populate(self.model)
        if not self.attached:
            assert count == 0
            return
        self.values = self.core_values()
        assert count == sum(v is not None for v in self.values)

    @rule(dtype=st.sampled_from((torch.float16, torch.bfloat16, torch.float64, torch.float32)))
    def cast(self, dtype):
        self.model.to(dtype)
        assert all(m.weight.dtype == dtype for m in self.model.modules() if isinstance(m, QuantLinear))

    @rule()
    def deepcopy(self):
        self.model = copy.deepcopy(self.model)

    @rule()
    def state_dict(self):
        state_dict = self.model.state_dict()
        assert not any("_shared_quant_states" in key for key in state_dict)
        global_keys = [k for k in state_dict if k.endswith("._global_amax")]
        assert len({state_dict[k].untyped_storage().data_ptr() for k in global_keys}) == len(global_keys)  # own storage each
        if self.attached and self.values == self.core_values():
            unified = unify_state_dict(state_dict, self.patterns)
            for group, value in zip(self.groups, self.values):
                for member in group.members:
                    key = buffer_key(member, QUANTIZER, "_global_amax")
                    if value is not None:
                        assert torch.equal(state_dict[key], unified[key])
        self.saved = (state_dict, dict(self.amax), self.attached, list(self.values))

    @rule(seed=st.integers(1, 100), saved=st.booleans())
    def restore_into_fresh_model(self, seed, saved):
        if not saved or self.saved is None:
            self.state_dict()  # a round trip of the model as it is now
        state_dict, amax, attached, values = self.saved
        fresh = build(self.spec, seed=seed)
        fresh.load_state_dict(state_dict, strict=True)
        SharedWeightGlobalAmaxState.restore(fresh, self.patterns)
        self.model, self.amax, self.attached = fresh, dict(amax), True
        # Restore attaches every group; a group saved without a value stays unset.
        self.values = values if attached else [None] * len(self.groups)

    # -- invariants -----------------------------------------------------------------------
    def core_values(self) -> list[float | None]:
        values = finalize(self.groups, self.amax, quantizer=QUANTIZER).global_amax
        return [v if v > float("-inf") else None for v in values.tolist()]

    @invariant()
    def states_are_the_cores_groups_with_the_cores_values(self):
        if self.model is None:
            return
        names = {id(m): n for n, m in self.model.named_modules()}
        states = list(iter_shared_quant_states(self.model))
        if not self.attached:
            assert states == []
            return
        assert [(names[id(s.__dict__["_parent"])], tuple(names[id(m)] for m in s.members)) for s in states] == [
            (g.parent, g.members) for g in self.groups
        ]
        for state, value in zip(states, self.values):
            if value is None:
                assert state.global_amax is None
            else:
                assert state.global_amax.dtype == torch.float32 and state.global_amax.item() == value

    @invariant()
    def every_member_aliases_its_groups_tensor_and_nothing_else_is_tied(self):
        if self.model is None:
            return
        tied = set()
        for state in iter_shared_quant_states(self.model):
            if state.global_amax is None:
                continue
            for member in state.members:
                assert member.weight_quantizer._buffers["_global_amax"] is state.global_amax
                tied.add(id(member.weight_quantizer))
        for module in self.model.modules():
            if module.__dict__.get(TIED_ATTRS):
                assert id(module) in tied

    @invariant()
    def a_fresh_model_restored_from_the_state_dict_agrees(self):
        if self.model is None or not self.attached:
            return
        fresh = build(self.spec, seed=1)
        fresh.load_state_dict(self.model.state_dict(), strict=True)
        SharedWeightGlobalAmaxState.restore(fresh, self.patterns)
        states = list(iter_shared_quant_states(fresh))
        assert len(states) == len(self.groups)
        for state, value in zip(states, self.values):
            assert (state.global_amax is None) == (value is None)
            if value is not None:
                assert state.global_amax.item() == value
                assert all(m.weight_quantizer._buffers["_global_amax"] is state.global_amax for m in state.members)

    @invariant()
    def amax_buffers_hold_what_was_calibrated_in_fp32(self):
        if self.model is None:
            return
        buffers = {k: v for k, v in self.model.named_buffers() if k.endswith("weight_quantizer._amax")}
        assert buffers.keys() == self.amax.keys()
        assert all(v.dtype == torch.float32 and torch.equal(v, self.amax[k]) for k, v in buffers.items())


AdapterMachine.TestCase.settings = settings(
    max_examples=30,
    stateful_step_count=12,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
TestAdapterMachine = AdapterMachine.TestCase
