"""The module adapter on models quantized by the peer (nvidia-modelopt), compared with the peer's own state.

Each comparison runs our ``SharedWeightGlobalAmaxState`` and the peer's on identical deep
copies of one peer-quantized model: same groups (parents, members), same values.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from safetensors.torch import save_file

pytest.importorskip("modelopt")

with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # modelopt warns about the installed transformers version
    import modelopt.torch.quantization as mtq
    from modelopt.torch.quantization.conversion import replace_quant_module as peer_replace
    from modelopt.torch.quantization.utils import SharedWeightGlobalAmaxState as PeerState
    from modelopt.torch.quantization.utils import iter_shared_quant_states as peer_states

from sharedquant.adapters import (
    SHARED_PATTERNS,
    SHARED_PATTERNS_ACROSS_EXPERTS,
    SharedWeightGlobalAmaxState,
    iter_shared_quant_states,
)
from sharedquant.adapters.models import tiny_llama, tiny_mixtral
from sharedquant.adapters.tying import TIED_ATTRS

pytestmark = pytest.mark.peer


def static_nvfp4_config() -> dict:
    """NVFP4 with static weight blocks (global_amax-carrying quantizers) and no peer grouping."""
    config = copy.deepcopy(mtq.NVFP4_DEFAULT_CFG)
    for entry in config["quant_cfg"]:
        if entry.get("quantizer_name") == "*weight_quantizer":
            entry["cfg"]["block_sizes"]["type"] = "static"
    config["algorithm"] = {"method": "max", "shared_states": {"weight_global_amax": {"patterns": []}}}
    return config


def peer_quantized(model: torch.nn.Module) -> torch.nn.Module:
    tokens = torch.randint(0, 128, (2, 8), generator=torch.Generator().manual_seed(0))
    return mtq.quantize(model, static_nvfp4_config(), forward_loop=lambda m: m(tokens))


@pytest.fixture(scope="module")
def peer_llama():
    return peer_quantized(tiny_llama(num_layers=2))


@pytest.fixture(scope="module")
def peer_mixtral():
    return peer_quantized(tiny_mixtral(num_layers=1, num_experts=3))


def described(model, states) -> list[tuple[str, tuple[str, ...], float | None]]:
    names = {id(m): n for n, m in model.named_modules()}
    out = []
    for state in states:
        value = None if state.global_amax is None else state.global_amax.item()
        out.append((names[id(state.__dict__["_parent"])], tuple(names[id(m)] for m in state.members), value))
    return out


def ours_and_theirs(base, patterns=SHARED_PATTERNS):
    ours, theirs = copy.deepcopy(base), copy.deepcopy(base)
    assert SharedWeightGlobalAmaxState.attach(ours, patterns) == PeerState.attach(theirs, list(patterns))
    assert SharedWeightGlobalAmaxState.populate(ours) == PeerState.populate(theirs)
    return ours, theirs


def assert_tied(model) -> None:
    for state in iter_shared_quant_states(model, SharedWeightGlobalAmaxState):
        for member in state.members:
            assert member.weight_quantizer._buffers["_global_amax"] is state.global_amax
            assert "_global_amax" in member.weight_quantizer.__dict__[TIED_ATTRS]


@pytest.mark.parametrize("which", ["peer_llama", "peer_mixtral"])
def test_groups_and_values_equal_the_peers_own_state(which, request):
    base = request.getfixturevalue(which)
    assert list(peer_states(base)) == []  # the peer grouped nothing: patterns []
    ours, theirs = ours_and_theirs(base)
    mine = described(ours, iter_shared_quant_states(ours, SharedWeightGlobalAmaxState))
    assert mine == described(theirs, peer_states(theirs))
    assert len(mine) == (4 if which == "peer_llama" else 1 + 3)
    assert all(value is not None for _, _, value in mine)
    assert_tied(ours)


def test_cross_expert_groups_equal_the_peers(peer_mixtral):
    ours, theirs = ours_and_theirs(peer_mixtral, SHARED_PATTERNS_ACROSS_EXPERTS)
    mine = described(ours, iter_shared_quant_states(ours, SharedWeightGlobalAmaxState))
    assert mine == described(theirs, peer_states(theirs))
    assert mine[-1][0] == "model.layers.0.block_sparse_moe" and len(mine[-1][1]) == 6
    assert len(ours.model.layers[0].block_sparse_moe.experts) == 3


def test_the_peers_setattr_guard_honours_our_tie(peer_llama):
    ours, _ = ours_and_theirs(peer_llama)
    attn = ours.model.layers[0].self_attn
    quantizer = attn.k_proj.weight_quantizer
    assert type(quantizer).__module__.startswith("modelopt")
    with pytest.raises(RuntimeError, match="_global_amax is tied shared quant state"):
        quantizer._global_amax = torch.tensor(1.0)
    quantizer.global_amax = 2.5  # the peer's property setter writes in place: every member sees it
    assert [getattr(attn, r).weight_quantizer.global_amax.item() for r in ("q_proj", "k_proj", "v_proj")] == [2.5] * 3
    assert_tied(ours)


def test_state_dict_is_independent_and_restore_rebuilds_ties_like_the_peer(peer_llama, tmp_path):
    ours, _ = ours_and_theirs(peer_llama)
    state_dict = ours.state_dict()
    keys = [f"model.layers.0.self_attn.{r}.weight_quantizer._global_amax" for r in ("q_proj", "k_proj", "v_proj")]
    assert len({state_dict[k].untyped_storage().data_ptr() for k in keys}) == 3
    save_file({k: v.contiguous() for k, v in state_dict.items()}, str(tmp_path / "peer.safetensors"))
    restored, peer_restored = copy.deepcopy(peer_llama), copy.deepcopy(peer_llama)
    restored.load_state_dict(state_dict)
    peer_restored.load_state_dict(state_dict)
    SharedWeightGlobalAmaxState.restore(restored)
    PeerState.restore(peer_restored, list(SHARED_PATTERNS))
    assert_tied(restored)
    expected = described(ours, iter_shared_quant_states(ours, SharedWeightGlobalAmaxState))
    assert described(restored, iter_shared_quant_states(restored, SharedWeightGlobalAmaxState)) == expected
    assert described(peer_restored, peer_states(peer_restored)) == expected


def test_restore_refuses_a_disagreeing_peer_checkpoint(peer_llama):
    # peer_llama's members hold their own values, which differ within each group.
    model = copy.deepcopy(peer_llama)
    with pytest.raises(ValueError, match=r"restore: group 'model.layers.0.self_attn' .* members disagree"):
        SharedWeightGlobalAmaxState.restore(model)
    assert list(iter_shared_quant_states(model)) == []
    assert not any(m.__dict__.get(TIED_ATTRS) for m in model.modules())


def test_half_keeps_ties_and_fp32_on_peer_quantizers(peer_llama):
    ours, _ = ours_and_theirs(peer_llama)
    values = [s.global_amax.item() for s in iter_shared_quant_states(ours)]
    ours.half()
    assert_tied(ours)
    states = list(iter_shared_quant_states(ours))
    assert all(s.global_amax.dtype == torch.float32 for s in states)
    assert [s.global_amax.item() for s in states] == values


def test_re_populate_keeps_peer_members_tied_to_the_new_value(peer_llama):
    ours, _ = ours_and_theirs(peer_llama)
    attn = ours.model.layers[0].self_attn
    attn.v_proj.weight_quantizer._amax.mul_(4.0)  # e.g. after re-calibrating v_proj
    SharedWeightGlobalAmaxState.populate(ours)
    assert_tied(ours)
    assert attn.q_proj.weight_quantizer.global_amax.item() == attn.v_proj.weight_quantizer._amax.max().item()


def test_dynamic_peer_quantizers_are_grouped_but_not_tied_as_by_the_peer():
    base = tiny_llama(num_layers=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peer_replace(base)
    for module in base.modules():
        if hasattr(module, "weight_quantizer"):
            module.weight_quantizer.amax = module.weight.detach().abs().amax()
    assert not hasattr(base.model.layers[0].self_attn.q_proj.weight_quantizer, "global_amax")
    ours, theirs = ours_and_theirs(base)
    mine = described(ours, iter_shared_quant_states(ours, SharedWeightGlobalAmaxState))
    assert mine == described(theirs, peer_states(theirs)) and len(mine) == 2
    assert not any(m.__dict__.get(TIED_ATTRS) for m in ours.modules())
    assert all(m.weight_quantizer._buffers.get("_global_amax") is None for m in ours.modules() if hasattr(m, "weight_quantizer"))
