"""FP8 per-tensor: the rounding, the requantization, and reconcile on the real tools' checkpoints."""

import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from sharedquant.adapters.checkpoint import inspect_checkpoint
from sharedquant.adapters.rewrite import reconcile_checkpoint
from sharedquant.adapters.cli import main
from sharedquant.core.fp8 import fp8_requantize, int8_requantize, round_to_e4m3

FIXTURES = Path(__file__).resolve().parent / "fixtures"
FP8_FIXTURES = ["modelopt_fp8", "llmcompressor_fp8"]


def e4m3_oracle(values: torch.Tensor) -> torch.Tensor:
    """Nearest finite e4m3fn value by brute force over all 256 codes, ties to the even code, saturating."""
    codes = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn)
    grid = codes.to(torch.float64)
    finite = torch.isfinite(grid)
    codes, grid = codes[finite], grid[finite]
    distance = (values.to(torch.float64).reshape(-1, 1) - grid.reshape(1, -1)).abs()
    best = distance.min(dim=1, keepdim=True).values
    candidates = distance == best
    odd = (codes.view(torch.uint8) & 1).bool().reshape(1, -1)
    prefer = candidates & ~odd  # of two nearest, the even mantissa
    pick = torch.where(prefer.any(dim=1), prefer.float().argmax(dim=1), candidates.float().argmax(dim=1))
    nearest = codes[pick].reshape(values.shape).to(torch.float64)
    return torch.copysign(nearest, values.to(torch.float64)).to(torch.float8_e4m3fn)  # -0 stays -0, as a cast keeps it


def test_rounding_matches_a_brute_force_oracle_including_ties_subnormals_and_saturation():
    grid = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).to(torch.float64)
    grid = grid[torch.isfinite(grid)].unique()
    midpoints = (grid[1:] + grid[:-1]) / 2  # every tie, subnormal ones included
    values = torch.cat([midpoints, grid, torch.randn(4000, dtype=torch.float64) * 50, torch.tensor([449.0, 1e6, -5e3])])
    assert torch.equal(round_to_e4m3(values).view(torch.uint8), e4m3_oracle(values).view(torch.uint8))


def test_requantization_is_exact_from_float64_not_from_float16():
    weight = (torch.randn(64, 64) * 100).clamp(-448, 448).to(torch.float8_e4m3fn)
    scale, shared = torch.tensor(1.2345678e-4), torch.tensor(3.3333331e-4)
    expected = e4m3_oracle(weight.double() * scale.double() / shared.double())
    assert torch.equal(fp8_requantize(weight, scale, shared).view(torch.uint8), expected.view(torch.uint8))
    # with tiny scales float16 dequantization underflows (vLLM's load-time path); the exact one does not
    tiny, tiny_shared = torch.tensor(1e-8), torch.tensor(2e-8)
    expected = e4m3_oracle(weight.double() * tiny.double() / tiny_shared.double())
    assert (expected.float() != 0).sum() > 0.9 * weight.numel()
    assert torch.equal(fp8_requantize(weight, tiny, tiny_shared).view(torch.uint8), expected.view(torch.uint8))
    # requantizing with its own scale gives the codes back
    assert torch.equal(fp8_requantize(weight, scale, scale).view(torch.uint8), weight.view(torch.uint8))


def test_int8_requantization_rounds_ties_to_even_and_clamps():
    weight = torch.tensor([3, 5, -3, 127, -128], dtype=torch.int8)
    out = int8_requantize(weight, torch.tensor(1.0), torch.tensor(2.0))
    assert out.tolist() == [2, 2, -2, 64, -64] and out.dtype == torch.int8


@pytest.mark.parametrize("name", FP8_FIXTURES)
def test_reconcile_shares_the_max_and_rewrites_only_the_changed_members(name, tmp_path):
    source = FIXTURES / name
    before = inspect_checkpoint(source)
    assert not before.consistent
    result = reconcile_checkpoint(source, tmp_path / "out")
    old, new = load_file(source / "model.safetensors"), load_file(tmp_path / "out" / "model.safetensors")
    changed_keys = set()
    for report in before.reports:
        shared = max(member.scale for member in report.members)
        assert report.shared_scale == shared
        for fqn in report.changed:
            changed_keys |= {f"{fqn}.weight", f"{fqn}.weight_scale"}
            expected = e4m3_oracle(old[f"{fqn}.weight"].double() * old[f"{fqn}.weight_scale"].double() / shared)
            assert torch.equal(new[f"{fqn}.weight"].view(torch.uint8), expected.view(torch.uint8))
            assert new[f"{fqn}.weight_scale"].item() == shared
    assert set(result.requantized) == {fqn for report in before.reports for fqn in report.changed}
    for key in old:  # same dtype and shape everywhere ((1,) scales of compressed-tensors too)
        assert (new[key].dtype, new[key].shape) == (old[key].dtype, old[key].shape), key
        if key not in changed_keys:
            assert torch.equal(new[key].view(-1).view(torch.uint8), old[key].view(-1).view(torch.uint8)), key
    with safe_open(str(source / "model.safetensors"), "pt") as a, safe_open(str(tmp_path / "out" / "model.safetensors"), "pt") as b:
        assert a.metadata() == b.metadata()
    assert inspect_checkpoint(tmp_path / "out").consistent


@pytest.mark.parametrize("name", FP8_FIXTURES)
def test_reconcile_is_idempotent(name, tmp_path):
    reconcile_checkpoint(FIXTURES / name, tmp_path / "once")
    result = reconcile_checkpoint(tmp_path / "once", tmp_path / "twice")
    assert result.requantized == [] and result.inputs_unified == []
    once, twice = (tmp_path / d / "model.safetensors" for d in ("once", "twice"))
    assert once.read_bytes() == twice.read_bytes()


def test_input_scales_are_unified_to_the_max(tmp_path):
    directory = tmp_path / "skewed"
    shutil.copytree(FIXTURES / "modelopt_fp8", directory)
    state = load_file(directory / "model.safetensors")
    key = "model.layers.0.self_attn.v_proj.input_scale"
    state[key] = state[key] * 2
    save_file(state, directory / "model.safetensors", metadata={"format": "pt"})
    result = reconcile_checkpoint(directory, tmp_path / "out")
    out = load_file(tmp_path / "out" / "model.safetensors")
    attn = "model.layers.0.self_attn"
    assert {out[f"{attn}.{p}.input_scale"].item() for p in ("q_proj", "k_proj", "v_proj")} == {state[key].item()}
    assert set(result.inputs_unified) == {f"{attn}.q_proj", f"{attn}.k_proj"}


def test_the_already_consistent_tool_output_is_left_as_it_is(tmp_path, capsys):
    source = FIXTURES / "llmcompressor_nvfp4"  # llm-compressor links fused NVFP4 global scales itself
    assert main(["inspect", str(source)]) == 0
    assert main(["reconcile", str(source), "--out", str(tmp_path / "out")]) == 0
    assert "0 of 4 fused groups reconciled" in capsys.readouterr().out
    assert (tmp_path / "out" / "model.safetensors").read_bytes() == (source / "model.safetensors").read_bytes()


def test_the_cli_names_the_fp8_format_and_its_keys(capsys):
    assert main(["inspect", "--all", str(FIXTURES / "llmcompressor_fp8")]) == 1
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split()[:4] == ["group", "member", "weight_scale", "input_scale"]
    assert lines[-1].endswith("format compressed-tensors-fp8")


def test_int8_per_tensor_from_llm_compressor_is_reconciled_with_ties_to_even(tmp_path):
    source = FIXTURES / "llmcompressor_int8"  # int-quantized, symmetric, one scale per tensor
    before = inspect_checkpoint(source)
    assert before.format.name == "compressed-tensors-int8" and not before.consistent
    reconcile_checkpoint(source, tmp_path / "out")
    old, new = load_file(source / "model.safetensors"), load_file(tmp_path / "out" / "model.safetensors")
    for report in before.reports:
        for fqn in report.changed:
            exact = old[f"{fqn}.weight"].double() * old[f"{fqn}.weight_scale"].double() / report.shared_scale
            floor = exact.floor()
            tie_up = (exact - floor == 0.5) & (floor % 2 == 1)  # ties go to the even neighbour
            expected = torch.where((exact - floor > 0.5) | tie_up, floor + 1, floor).clamp(-128, 127)
            assert torch.equal(new[f"{fqn}.weight"], expected.to(torch.int8)) and new[f"{fqn}.weight"].dtype == torch.int8
    assert inspect_checkpoint(tmp_path / "out").consistent
