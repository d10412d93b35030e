"""Whatever is done to a model's tree after attach, populate sees exactly the states in it.

Random sequences of tree edits (attach at the root or a layer, delete, insert a layer
holding states with a raw ``_modules`` write, replace, drop a state list, deep copies
kept alive, garbage collection) must never make ``iter_shared_quant_states`` differ
from ``nn.Module.modules()``, in order, and populate must count exactly the states in
the model. Member edits (a quantizer replaced, a state's members set, a layer
recalibrated) must leave populate tying what each state names now.
"""

from __future__ import annotations

import copy
import gc

from hypothesis import given
from hypothesis import strategies as st
from torch import nn

from sharedquant.adapters import (
    QuantLinear,
    SharedQuantState,
    SharedWeightGlobalAmaxState,
    TensorQuantizer,
    iter_shared_quant_states,
    replace_quant_module,
)
from sharedquant.adapters.models import tiny_mixtral

State = SharedWeightGlobalAmaxState
ATTN = [r"(.*)\.self_attn\.(?:q|k|v)_proj"]
EXPERTS = [r"(.*)\.block_sparse_moe\.experts\.(\d+)\.(?:w1|w3)"]


def calibrated(seed: int) -> nn.Module:
    model = replace_quant_module(tiny_mixtral(seed=seed, num_layers=3, num_experts=2, hidden_size=16, intermediate_size=16))
    for module in model.modules():
        if isinstance(module, QuantLinear):
            module.weight_quantizer.amax = module.weight_quantizer.observed_amax(module.weight.detach())
    return model


def every_state(model: nn.Module) -> list[SharedQuantState]:
    return [m for m in model.modules() if isinstance(m, SharedQuantState)]


layer = st.integers(0, 5)
edits = st.one_of(
    st.tuples(st.just("attach"), st.sampled_from([None, ATTN, EXPERTS])),
    st.tuples(st.just("attach layer"), layer),
    st.tuples(st.just("delete layer"), layer),
    st.tuples(st.just("insert donor layer"), layer),
    st.tuples(st.just("replace layer"), layer),
    st.tuples(st.just("drop state list"), layer),
    st.tuples(st.just("deep copy"), st.booleans()),
    st.tuples(st.just("collect"), st.none()),
)


def apply(edit, model: nn.Module, kept: list) -> nn.Module:
    """Apply one edit; returns the model to go on with (a deep copy may replace it)."""
    kind, arg = edit
    layers = model.model.layers
    pick = (arg % len(layers)) if isinstance(arg, int) and len(layers) else None
    if kind == "attach":
        State.attach(model, patterns=arg)
    elif kind == "attach layer" and pick is not None:
        State.attach(layers[pick], patterns=EXPERTS)
    elif kind == "delete layer" and pick is not None:
        del layers[pick]
    elif kind == "insert donor layer":
        donor = calibrated(seed=len(kept) + 1)
        State.attach(donor)
        layers.insert(pick if pick is not None else 0, donor.model.layers[0])
    elif kind == "replace layer" and pick is not None:
        layers[pick] = calibrated(seed=7).model.layers[0]
    elif kind == "drop state list" and pick is not None:
        layers[pick].self_attn._modules.pop("_shared_quant_states", None)
    elif kind == "deep copy":
        twin = copy.deepcopy(model)
        kept.append(model if arg else twin)
        return twin if arg else model
    elif kind == "collect":
        gc.collect()
    return model


@given(st.lists(edits, min_size=1, max_size=6))
def test_iteration_and_populate_see_exactly_the_states_in_the_model(sequence):
    model = calibrated(seed=0)
    State.attach(model)
    kept: list[nn.Module] = []
    for edit in sequence:
        model = apply(edit, model, kept)
        assert list(iter_shared_quant_states(model)) == every_state(model), edit
        assert State.populate(model) == len(every_state(model)), edit
        for state in every_state(model):
            assert all(m.weight_quantizer._buffers["_global_amax"] is state.global_amax for m in state.members)


member_edits = st.tuples(st.sampled_from(["replace quantizer", "set members", "recalibrate"]), layer, st.sampled_from(["q_proj", "k_proj", "v_proj"]))


def apply_member_edit(edit, model: nn.Module) -> None:
    kind, index, role = edit
    layers = model.model.layers
    attn = layers[index % len(layers)].self_attn
    member = getattr(attn, role)
    if kind == "replace quantizer":
        fresh = TensorQuantizer()
        fresh.amax = member.weight_quantizer.observed_amax(member.weight.detach()) * 4
        member.weight_quantizer = fresh
    elif kind == "set members":
        for state in attn._shared_quant_states:
            state.set_members(attn, [m for m in (attn.q_proj, attn.k_proj, attn.v_proj) if m is not member])
    else:
        member.weight_quantizer.amax = member.weight_quantizer.amax * 3  # a new tensor, as calibration leaves


@given(st.lists(member_edits, min_size=1, max_size=6))
def test_populate_ties_the_quantizers_each_state_names_now(sequence):
    model = calibrated(seed=0)
    State.attach(model)
    State.populate(model)
    for edit in sequence:
        apply_member_edit(edit, model)
        State.populate(model)
        for state in every_state(model):
            amaxes = [m.weight_quantizer._buffers["_amax"].max() for m in state.members]
            assert state.global_amax == max(amaxes), edit
            assert all(m.weight_quantizer._buffers["_global_amax"] is state.global_amax for m in state.members), edit
