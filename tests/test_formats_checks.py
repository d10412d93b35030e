"""Completeness and dtypes (issue #27), per format: a member lacking a tensor its format needs, or holding
one in the wrong dtype, is refused by name (exit 2), in inspect and reconcile alike, and nothing is written."""

import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from sharedquant.adapters.checkpoint import inspect_checkpoint
from sharedquant.adapters.rewrite import reconcile_checkpoint
from sharedquant.adapters.cli import format_table, main
from sharedquant.adapters.demo import quantize_unshared, skew_siblings_
from sharedquant.adapters.models import tiny_llama

FIXTURES = Path(__file__).resolve().parent / "fixtures"
ATTN, MLP = "model.layers.0.self_attn", "model.layers.0.mlp"


@pytest.fixture(scope="module")
def nvfp4(tmp_path_factory):
    """A modelopt-style NVFP4 tiny Llama with its own scale per layer."""
    directory = tmp_path_factory.mktemp("nvfp4") / "ckpt"
    directory.mkdir()
    save_file(quantize_unshared(skew_siblings_(tiny_llama(num_layers=1))), directory / "model.safetensors")
    return directory


def edited(source: Path, target: Path, edit) -> Path:
    """A copy of ``source`` whose tensors went through ``edit(state) -> None``."""
    shutil.copytree(source, target)
    state = load_file(target / "model.safetensors")
    edit(state)
    save_file(state, target / "model.safetensors", metadata={"format": "pt"})
    return target


def refused(capsys, tmp_path, checkpoint, *needles):
    """inspect and reconcile both exit 2 with one line naming every needle, and write nothing."""
    before = sorted(p.name for p in tmp_path.iterdir())
    for argv in (["inspect", checkpoint], ["reconcile", checkpoint, "--out", tmp_path / "out"]):
        assert main([str(arg) for arg in argv]) == 2
        out, err = capsys.readouterr()
        assert out == "" and len(err.strip().splitlines()) == 1 and "Traceback" not in err
        for needle in needles:
            assert needle in err, (needle, err)
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def drop(key):
    return lambda state: state.pop(key)


def cast(key, dtype):
    return lambda state: state.__setitem__(key, state[key].to(dtype) if dtype != torch.uint8 else state[key].view(dtype))


@pytest.mark.parametrize(
    ("source", "edit", "needles"),
    [
        ("nvfp4", drop(f"{ATTN}.k_proj.weight_scale_2"), [f"{ATTN}.k_proj.weight_scale_2", "lacks"]),
        ("nvfp4", drop(f"{ATTN}.k_proj.weight_scale"), [f"{ATTN}.k_proj.weight_scale'", "lacks"]),
        ("llmcompressor_nvfp4", drop(f"{ATTN}.k_proj.weight_global_scale"), [f"{ATTN}.k_proj.weight_global_scale"]),
        ("llmcompressor_nvfp4", drop(f"{MLP}.up_proj.weight_packed"), [f"{MLP}.up_proj.weight_packed", "lacks"]),
        ("modelopt_fp8", drop(f"{ATTN}.v_proj.weight_scale"), [f"{ATTN}.v_proj.weight_scale", "lacks"]),
        ("llmcompressor_fp8", drop(f"{MLP}.gate_proj.weight"), [f"{MLP}.gate_proj.weight'", "lacks"]),
    ],
)
def test_a_member_lacking_a_tensor_its_format_needs_is_named(source, edit, needles, nvfp4, tmp_path, capsys):
    origin = nvfp4 if source == "nvfp4" else FIXTURES / source
    refused(capsys, tmp_path, edited(origin, tmp_path / "ckpt", edit), *needles)


@pytest.mark.parametrize(
    ("source", "edit", "needles"),
    [
        ("nvfp4", cast(f"{ATTN}.k_proj.weight_scale", torch.float8_e5m2), ["k_proj.weight_scale'", "F8_E5M2", "F8_E4M3"]),
        ("nvfp4", cast(f"{ATTN}.k_proj.weight_scale", torch.uint8), ["k_proj.weight_scale'", "is U8"]),
        # q_proj holds the largest scale, so it is never rewritten: it is checked all the same
        ("nvfp4", cast(f"{ATTN}.q_proj.weight", torch.float32), ["q_proj.weight'", "is F32", "must be U8"]),
        ("modelopt_fp8", cast(f"{ATTN}.q_proj.weight", torch.bfloat16), ["q_proj.weight'", "is BF16"]),
        ("llmcompressor_fp8", cast(f"{MLP}.up_proj.weight_scale", torch.int32), ["up_proj.weight_scale'", "I32"]),
        ("modelopt_fp8", cast(f"{ATTN}.k_proj.input_scale", torch.int64), ["k_proj.input_scale'", "I64"]),
        ("llmcompressor_nvfp4", cast(f"{ATTN}.q_proj.weight_scale", torch.float16), ["q_proj.weight_scale'", "F16"]),
    ],
)
def test_a_tensor_in_the_wrong_dtype_is_named(source, edit, needles, nvfp4, tmp_path, capsys):
    origin = nvfp4 if source == "nvfp4" else FIXTURES / source
    refused(capsys, tmp_path, edited(origin, tmp_path / "ckpt", edit), *needles)


def test_a_group_whose_members_are_in_different_formats_is_refused_naming_them(tmp_path, capsys):
    fp8 = load_file(FIXTURES / "modelopt_fp8" / "model.safetensors")
    nvfp4 = quantize_unshared(skew_siblings_(tiny_llama(num_layers=1)))

    def graft(state):  # k_proj becomes NVFP4 among FP8 siblings
        for key in [k for k in state if k.startswith(f"{ATTN}.k_proj.")]:
            del state[key]
        state.update({k: v for k, v in nvfp4.items() if k.startswith(f"{ATTN}.k_proj.")})

    checkpoint = edited(FIXTURES / "modelopt_fp8", tmp_path / "ckpt", graft)
    assert f"{ATTN}.q_proj.weight" in fp8
    refused(capsys, tmp_path, checkpoint, "different formats", "k_proj=modelopt", "q_proj=modelopt-fp8")


def test_fp8_attention_and_nvfp4_mlp_are_reconciled_per_group(tmp_path):
    nvfp4 = quantize_unshared(skew_siblings_(tiny_llama(num_layers=2)))

    def graft(state):  # every MLP becomes NVFP4 (own scales), the attention stays FP8
        for key in [k for k in state if ".mlp." in k]:
            del state[key]
        state.update({k: v for k, v in nvfp4.items() if ".mlp." in k})

    checkpoint = edited(FIXTURES / "modelopt_fp8", tmp_path / "mixed", graft)
    inspection = inspect_checkpoint(checkpoint)
    assert inspection.format is None
    assert {r.group.parent: r.format.name for r in inspection.reports} == {
        "model.layers.0.self_attn": "modelopt-fp8", "model.layers.1.self_attn": "modelopt-fp8",
        "model.layers.0.mlp": "modelopt", "model.layers.1.mlp": "modelopt",
    }  # fmt: skip
    table = format_table(inspection).splitlines()
    assert table[0].split()[-1] == "format" and table[-1].endswith("formats modelopt, modelopt-fp8")
    assert [line.split()[-1] for line in table if line.startswith("model.layers.0")] == ["modelopt", "modelopt-fp8"]
    result = reconcile_checkpoint(checkpoint, tmp_path / "out")
    assert {fqn.split(".")[-1] for fqn in result.requantized} >= {"k_proj", "gate_proj"}
    after = inspect_checkpoint(tmp_path / "out")
    assert after.consistent and len(after.reports) == 4


def test_per_tensor_scales_in_float16_are_read_and_written_in_their_own_dtype(tmp_path):
    def halve(state):
        for key in [k for k in state if k.endswith(("weight_scale", "input_scale"))]:
            state[key] = state[key].to(torch.float16)

    checkpoint = edited(FIXTURES / "modelopt_fp8", tmp_path / "ckpt", halve)
    reconcile_checkpoint(checkpoint, tmp_path / "out")
    out = load_file(tmp_path / "out" / "model.safetensors")
    assert out[f"{ATTN}.k_proj.weight_scale"].dtype == torch.float16
    assert out[f"{ATTN}.k_proj.weight_scale"] == out[f"{ATTN}.q_proj.weight_scale"]
    assert inspect_checkpoint(tmp_path / "out").consistent


def test_per_channel_fp8_is_recognised_and_left_alone_saying_so(tmp_path, capsys):
    def per_channel(state):
        for key in [k for k in state if k.endswith(".weight_scale")]:
            rows = state[key.removesuffix("_scale")].shape[0]
            state[key] = state[key].reshape(1, 1).expand(rows, 1).contiguous()

    checkpoint = edited(FIXTURES / "llmcompressor_fp8", tmp_path / "ckpt", per_channel)
    assert main(["inspect", str(checkpoint)]) == 0
    out = capsys.readouterr().out
    assert "no fused groups found" in out and "note: 4 fused group(s) with per-channel FP8 weight scales" in out
