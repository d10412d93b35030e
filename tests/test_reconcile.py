"""core.reconcile: group reports and the requantization of a member to its group's scale."""

import math

import pytest
import torch

from sharedquant.core import reconcile
from sharedquant.core.formats import COMPRESSED_TENSORS, MODELOPT, QUANTIZER_STATE
from sharedquant.core.groups import Group
from sharedquant.core.nvfp4 import nvfp4_dequantize, nvfp4_fake_quant, nvfp4_global_scale, nvfp4_quantize
from sharedquant.core.reconcile import (
    MemberScales,
    dequantize_without_rescaling,
    global_amax_for,
    report_groups,
    requantize,
    weight_scale_2,
)
from sharedquant.core.reduce import reduce_amax

GROUP = Group(key=(0, ("attn",)), parent="attn", members=("attn.q", "attn.k", "attn.v"))


def scales(q, k, v, inputs=(None, None, None), blocks=(16, 16, 16)):
    values = zip(GROUP.members, (q, k, v), inputs, blocks)
    return {fqn: MemberScales(fqn, scale, input_scale, block) for fqn, scale, input_scale, block in values}


def test_report_shares_the_largest_scale_and_lists_the_members_to_requantize():
    (report,) = report_groups([GROUP], scales(2e-5, 1e-5, 2e-5, inputs=(3e-3, 3e-3, 4e-3)), MODELOPT)
    assert report.shared_scale == 2e-5 and report.ratio == 2.0
    assert report.changed == ("attn.k",)
    assert report.shared_input_scale == 4e-3 and report.input_changed == ("attn.q", "attn.k")
    assert not report.consistent


def test_a_reciprocal_format_shares_the_smallest_stored_value():
    (report,) = report_groups([GROUP], scales(500.0, 1000.0, 500.0, inputs=(10.0, 20.0, None)), COMPRESSED_TENSORS)
    assert report.shared_scale == 500.0 and report.changed == ("attn.k",)
    assert report.shared_input_scale == 10.0 and report.input_changed == ("attn.k",)
    assert report.ratio == 2.0 and report.input_ratio == 2.0


def test_a_group_with_equal_scales_is_consistent_and_changes_nothing():
    (report,) = report_groups([GROUP], scales(2e-5, 2e-5, 2e-5, inputs=(1.0, 1.0, 1.0)), MODELOPT)
    assert report.consistent and report.changed == () and report.input_changed == () and report.ratio == 1.0


@pytest.mark.parametrize("bad", [math.nan, math.inf, 0.0, -1e-5])
def test_report_refuses_a_non_finite_or_non_positive_scale(bad):
    with pytest.raises(ValueError, match=r"report_groups: 'attn.k' has a weight_scale_2 of"):
        report_groups([GROUP], scales(2e-5, bad, 2e-5), MODELOPT)
    with pytest.raises(ValueError, match=r"report_groups: 'attn.v' has a input_scale of"):
        report_groups([GROUP], scales(2e-5, 2e-5, 2e-5, inputs=(1.0, 1.0, bad)), MODELOPT)


def test_report_refuses_members_with_different_block_sizes():
    with pytest.raises(ValueError, match=r"different block sizes: attn.q=16, attn.k=32, attn.v=16"):
        report_groups([GROUP], scales(1.0, 1.0, 1.0, blocks=(16, 32, 16)), MODELOPT)


def test_weight_scale_2_in_each_format():
    stored = torch.tensor([512.0])
    assert weight_scale_2(stored, MODELOPT) == 512.0
    assert weight_scale_2(stored, COMPRESSED_TENSORS) == 1 / 512.0
    assert weight_scale_2(torch.tensor(2688.0), QUANTIZER_STATE) == 1.0
    assert weight_scale_2(stored, MODELOPT).shape == ()


def test_every_scale_the_peer_exports_has_an_exact_global_amax():
    # weight_scale_2 = amax / 2688 for fp32 amax spread over many binades
    amax = torch.logspace(-4, 3, 20_001, dtype=torch.float64).float()
    scale_2 = nvfp4_global_scale(amax)
    recovered = torch.stack([global_amax_for(s)[0] for s in scale_2[::97]])
    assert torch.equal(nvfp4_global_scale(recovered), scale_2[::97])
    assert all(global_amax_for(s)[1] for s in scale_2[::97])


def test_a_scale_no_amax_reproduces_is_reported_inexact_and_one_ulp_away():
    # fp32 values across one binade; about one in six is no fp32 amax divided by 2688
    candidates = (0x3C000000 + 1031 * torch.arange(8000, dtype=torch.int32)).view(torch.float32)
    inexact = [s for s in candidates if not global_amax_for(s)[1]]
    assert inexact, "some reciprocals fall outside the image of amax -> amax / 2688"
    target = inexact[0]
    got = nvfp4_global_scale(global_amax_for(target)[0])
    assert got != target
    assert got in (torch.nextafter(target, torch.tensor(1.0)), torch.nextafter(target, torch.tensor(0.0)))


def skewed_member(ratio, shape=(64, 128), seed=0):
    """A member quantized with its own amax, and the shared amax its group has (``ratio`` times larger)."""
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(shape, generator=generator) * 0.02
    weight[0, 0] = 0.2  # an outlier, as real weights have
    own = nvfp4_quantize(weight, reduce_amax(weight))
    shared_amax = reduce_amax(weight) * ratio
    return weight, own, nvfp4_global_scale(shared_amax)


@pytest.mark.parametrize("ratio", [1.3, 2.2, 3.7, 10.0])
def test_requantized_member_is_closer_than_quantizing_afresh_and_far_closer_than_engine_max(ratio):
    weight, own, shared = skewed_member(ratio)
    exported = nvfp4_dequantize(own.packed, own.block_scale, own.global_scale)
    repaired, exact = requantize(own.packed, own.block_scale, own.global_scale, shared)
    assert exact and repaired.global_scale == shared
    error = (nvfp4_dequantize(repaired.packed, repaired.block_scale, shared) - exported).norm()
    afresh = (nvfp4_fake_quant(weight, shared * 2688.0) - exported).norm()
    engine = (dequantize_without_rescaling(own.packed, own.block_scale, shared) - exported).norm()
    assert error <= afresh
    assert error * 5 < engine


def test_engine_max_without_rescaling_inflates_the_member_by_the_ratio():
    _, own, shared = skewed_member(2.5)
    exported = nvfp4_dequantize(own.packed, own.block_scale, own.global_scale)
    engine = dequantize_without_rescaling(own.packed, own.block_scale, shared)
    torch.testing.assert_close(engine, exported * (shared / own.global_scale))


def test_requantizing_to_the_same_scale_gives_the_same_values():
    _, own, _ = skewed_member(1.0)
    same, exact = requantize(own.packed, own.block_scale, own.global_scale, own.global_scale)
    assert exact and torch.equal(same.block_scale.view(torch.uint8), own.block_scale.view(torch.uint8))
    before = nvfp4_dequantize(own.packed, own.block_scale, own.global_scale)
    assert torch.equal(nvfp4_dequantize(same.packed, same.block_scale, same.global_scale), before)


def test_requantize_keeps_shapes_and_dtypes_of_stacked_experts():
    weight = torch.randn(4, 32, 64) * 0.01
    own = nvfp4_quantize(weight, reduce_amax(weight))
    repaired, _ = requantize(own.packed, own.block_scale, own.global_scale, own.global_scale * 3)
    assert repaired.packed.shape == own.packed.shape and repaired.packed.dtype == torch.uint8
    assert repaired.block_scale.shape == own.block_scale.shape and repaired.block_scale.dtype == torch.float8_e4m3fn


def test_chunked_requantization_matches_one_pass(monkeypatch):
    _, own, shared = skewed_member(1.7, shape=(96, 64))
    whole, _ = requantize(own.packed, own.block_scale, own.global_scale, shared)
    monkeypatch.setattr(reconcile, "_CHUNK_ELEMENTS", 5 * 64)  # 5 rows per chunk, a ragged last chunk
    chunked, _ = requantize(own.packed, own.block_scale, own.global_scale, shared)
    assert torch.equal(whole.packed, chunked.packed)
    assert torch.equal(whole.block_scale.view(torch.uint8), chunked.block_scale.view(torch.uint8))


def test_requantize_refuses_a_nan_block_scale():
    _, own, shared = skewed_member(2.0)
    block_scale = own.block_scale.clone()
    block_scale.view(torch.uint8)[3, 1] = 0x7F  # e4m3fn NaN
    with pytest.raises(ValueError, match=r"requantize: .* not finite"):
        requantize(own.packed, block_scale, own.global_scale, shared)


def test_requantize_refuses_empty_codes():
    with pytest.raises(ValueError, match=r"requantize: expected non-empty codes"):
        requantize(torch.empty(0, 8, dtype=torch.uint8), torch.empty(0, 1), torch.tensor(1.0), torch.tensor(2.0))


def test_derived_scales_are_stored_only_when_their_group_is_mismatched():
    def derived(q, k, v):
        return {fqn: MemberScales(fqn, value, derived=True) for fqn, value in zip(GROUP.members, (q, k, v))}

    (mismatched,) = report_groups([GROUP], derived(3.0, 1.0, 3.0), QUANTIZER_STATE)
    assert mismatched.changed == GROUP.members and mismatched.shared_scale == 3.0
    (agreeing,) = report_groups([GROUP], derived(3.0, 3.0, 3.0), QUANTIZER_STATE)
    assert agreeing.consistent and agreeing.changed == ()


def test_a_non_finite_derived_scale_is_named_by_the_key_it_came_from():
    members = {fqn: MemberScales(fqn, 1.0, derived=True) for fqn in GROUP.members}
    members["attn.v"] = MemberScales("attn.v", math.nan, derived=True)
    with pytest.raises(ValueError, match=r"'attn.v' has a weight_quantizer._amax of nan"):
        report_groups([GROUP], members, QUANTIZER_STATE)
