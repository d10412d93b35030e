"""The seed's extension contract: populate calls a subclass's own finalize, sync and hook methods.

``populate`` batches the work of ``SharedWeightGlobalAmaxState``'s own methods; a
subclass that overrides one of them must see it called per state, as the peer
(nvidia-modelopt) calls it. The recorded call sequences are compared with the peer's
on one model quantized by the peer.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn

from sharedquant.adapters import SharedWeightGlobalAmaxState, iter_shared_quant_states, replace_quant_module
from sharedquant.adapters.distributed import ParallelState
from sharedquant.adapters.models import tiny_llama

from _models import set_weight_amax  # pytest puts tests/ on sys.path (it has no __init__.py)

QKV = [r"(?:(.*)\.)?(?:q_proj|k_proj|v_proj)"]


def recording(base: type) -> type:
    """A subclass of ``base`` that records each contract call, then does what ``base`` does."""

    class Recording(base):
        name = "recording"
        calls: list[str] = []

        def install_hooks(self) -> None:
            type(self).calls.append("install_hooks")

        def remove_hooks(self) -> None:
            type(self).calls.append("remove_hooks")
            super().remove_hooks()

        def finalize(self) -> bool:
            done = super().finalize()
            type(self).calls.append(f"finalize -> {done}")
            return done

        def sync(self, parallel_state=None) -> None:
            type(self).calls.append(f"sync({type(parallel_state).__name__})")
            super().sync(parallel_state)

    return Recording


def llama(calibrate: bool = True) -> nn.Module:
    model = replace_quant_module(tiny_llama(num_layers=2))
    return set_weight_amax(model) if calibrate else model


def test_populate_calls_an_overridden_finalize_sync_and_remove_hooks_per_state():
    Recording = recording(SharedWeightGlobalAmaxState)
    model = llama()
    model.model.layers[1].self_attn.v_proj.parallel_state = ParallelState()
    assert Recording.attach(model, QKV) == 2
    assert Recording.calls == ["install_hooks"] * 2
    Recording.calls.clear()
    assert Recording.populate(model) == 2
    assert Recording.calls == [
        "finalize -> True", "sync(NoneType)", "remove_hooks",
        "finalize -> True", "sync(ParallelState)", "remove_hooks",
    ]  # fmt: skip
    for state in iter_shared_quant_states(model, Recording):
        for member in state.members:
            assert member.weight_quantizer._buffers["_global_amax"] is state.global_amax


def test_a_finalize_that_declines_is_neither_synced_nor_counted_and_keeps_its_hooks():
    Recording = recording(SharedWeightGlobalAmaxState)
    model = llama(calibrate=False)
    Recording.attach(model, QKV)
    Recording.calls.clear()
    assert Recording.populate(model) == 0
    assert Recording.calls == ["finalize -> False"] * 2


def test_an_overridden_finalize_sets_the_value_populate_ties():
    class Doubled(SharedWeightGlobalAmaxState):
        name = "doubled"

        def finalize(self) -> bool:
            self.global_amax = 2 * max(m.weight_quantizer.amax.max() for m in self.members)
            return True

    model = llama()
    Doubled.attach(model, QKV)
    assert Doubled.populate(model) == 2
    for state in iter_shared_quant_states(model, Doubled):
        expected = 2 * max(m.weight_quantizer.amax.max().item() for m in state.members)
        assert state.global_amax.item() == expected
        for member in state.members:
            assert member.weight_quantizer._buffers["_global_amax"] is state.global_amax


def test_an_overridden_tie_member_quantizer_is_the_one_populate_calls():
    class Untied(SharedWeightGlobalAmaxState):
        name = "untied"
        offered: list[nn.Module] = []

        def tie_member_quantizer(self, quantizer: nn.Module) -> bool:
            type(self).offered.append(quantizer)
            return False  # this state keeps its value to itself

    model = llama()
    Untied.attach(model, QKV)
    assert Untied.populate(model) == 2
    members = [m for s in iter_shared_quant_states(model, Untied) for m in s.members]
    assert {id(q) for q in Untied.offered} == {id(m.weight_quantizer) for m in members}
    assert all("_shared_quant_tied_attrs" not in m.weight_quantizer.__dict__ for m in members)


def test_the_own_methods_and_the_batched_path_agree():
    """A subclass that overrides nothing is batched; one that only wraps finalize runs per state: same values."""
    Recording = recording(SharedWeightGlobalAmaxState)
    batched, per_state = llama(), llama()
    SharedWeightGlobalAmaxState.attach(batched)
    Recording.attach(per_state)
    SharedWeightGlobalAmaxState.populate(batched)
    Recording.populate(per_state)
    values = [s.global_amax.item() for s in iter_shared_quant_states(batched)]
    assert values == [s.global_amax.item() for s in iter_shared_quant_states(per_state)]


def test_the_call_sequence_is_the_peers():
    pytest.importorskip("modelopt")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # modelopt warns about the installed transformers version
        import modelopt.torch.quantization as mtq
        from modelopt.torch.quantization.utils import SharedWeightGlobalAmaxState as PeerState

    config = copy.deepcopy(mtq.NVFP4_DEFAULT_CFG)
    for entry in config["quant_cfg"]:
        if entry.get("quantizer_name") == "*weight_quantizer":
            entry["cfg"]["block_sizes"]["type"] = "static"
    config["algorithm"] = {"method": "max", "shared_states": {"weight_global_amax": {"patterns": []}}}
    tokens = torch.randint(0, 128, (2, 8), generator=torch.Generator().manual_seed(0))
    base = mtq.quantize(tiny_llama(num_layers=2), config, forward_loop=lambda m: m(tokens))
    sequences = []
    for cls in (SharedWeightGlobalAmaxState, PeerState):
        Recording = recording(cls)
        model = copy.deepcopy(base)
        count = [Recording.attach(model, list(QKV))]
        count.append(Recording.populate(model))
        count.append(Recording.populate(model))  # hooks already removed: the peer calls remove_hooks again
        sequences.append((count, Recording.calls))
    assert sequences[0] == sequences[1]
