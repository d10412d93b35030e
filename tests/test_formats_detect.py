"""core.formats: each module's format, from the real tools' headers and configs, never from tensor data."""

import json
from pathlib import Path

import pytest

from sharedquant.adapters import checkpoint as ckpt
from sharedquant.adapters.checkpoint import inspect_checkpoint, open_checkpoint
from sharedquant.core.formats import (
    COMPRESSED_TENSORS,
    COMPRESSED_TENSORS_FP8,
    COMPRESSED_TENSORS_INT8,
    DEFAULT_PATTERNS,
    FP8_BLOCK,
    FP8_PER_CHANNEL,
    MODELOPT,
    MODELOPT_FP8,
    QUANTIZER_STATE,
    detect_format,
    family_from_config,
    find_formats,
)
from sharedquant.core.groups import find_groups

FIXTURES = Path(__file__).resolve().parent / "fixtures"
Q = "model.layers.0.self_attn.q_proj"


class Meta:
    """A header entry: what detection may look at (no data)."""

    def __init__(self, dtype, shape):
        self.dtype, self.shape = dtype, tuple(shape)


def header(modules):
    """{fqn: {suffix: (dtype, shape)}} -> {key: Meta}."""
    return {f"{fqn}.{suffix}": Meta(*meta) for fqn, entries in modules.items() for suffix, meta in entries.items()}


def fp8(scale_shape=()):
    return {"weight": ("F8_E4M3", (64, 64)), "weight_scale": ("F32", scale_shape), "input_scale": ("F32", scale_shape)}


NVFP4 = {"weight": ("U8", (64, 32)), "weight_scale": ("F8_E4M3", (64, 4)), "weight_scale_2": ("F32", ())}


@pytest.mark.parametrize(
    ("name", "expected", "family"),
    [
        ("modelopt_fp8", MODELOPT_FP8, "modelopt"),
        ("llmcompressor_fp8", COMPRESSED_TENSORS_FP8, "compressed-tensors"),
        ("llmcompressor_nvfp4", COMPRESSED_TENSORS, "compressed-tensors"),
    ],
)
def test_the_real_tools_checkpoints_are_recognised_with_their_configs(name, expected, family):
    checkpoint = open_checkpoint(FIXTURES / name)
    assert checkpoint.family == family
    formats = find_formats(checkpoint.tensors, checkpoint.family)
    assert set(formats.values()) == {expected}
    assert len(formats) == 14  # 2 layers x 7 linears; lm_head and embeddings are not quantized
    assert inspect_checkpoint(FIXTURES / name).format is expected


def test_without_a_config_fp8_is_told_apart_by_its_scale_shape():
    assert detect_format(header({Q: fp8(())})) is MODELOPT_FP8
    assert detect_format(header({Q: fp8((1,))})) is COMPRESSED_TENSORS_FP8
    assert detect_format(header({Q: fp8(())}), family="compressed-tensors") is COMPRESSED_TENSORS_FP8


def test_the_config_names_the_tool():
    assert family_from_config({"quantization_config": {"quant_method": "compressed-tensors"}}) == "compressed-tensors"
    assert family_from_config({"quantization_config": {"quant_method": "modelopt"}}) == "modelopt"
    assert family_from_config({"architectures": ["LlamaForCausalLM"]}, {"producer": {"name": "modelopt"}}) == "modelopt"
    assert family_from_config({"architectures": ["LlamaForCausalLM"]}) is None
    assert family_from_config({"quantization_config": "fp8"}) is None  # not the shape either tool writes
    config = json.loads((FIXTURES / "modelopt_fp8" / "config.json").read_text())
    assert family_from_config(config) == "modelopt"


def test_nvfp4_and_fp8_share_key_names_and_are_told_apart_by_dtypes():
    # modelopt's NVFP4 weight_scale is FP8's weight_scale too; the uint8 weight and float8 block scales decide
    lost = {k: v for k, v in NVFP4.items() if k != "weight_scale_2"}
    assert find_formats(header({Q: NVFP4}))[Q] is MODELOPT
    assert find_formats(header({Q: lost}))[Q] is MODELOPT  # a member that lost its scale is still NVFP4
    assert find_formats(header({Q: fp8()}))[Q] is MODELOPT_FP8


def test_per_channel_and_block_fp8_and_int8_are_recognised():
    channel = {"weight": ("F8_E4M3", (64, 64)), "weight_scale": ("F32", (64, 1))}
    block = {"weight": ("F8_E4M3", (256, 256)), "weight_scale_inv": ("F32", (2, 2))}
    int8 = {"weight": ("I8", (64, 64)), "weight_scale": ("F32", (1,))}
    found = find_formats(header({"a.q_proj": channel, "b.q_proj": block, "c.q_proj": int8}))
    assert found == {"a.q_proj": FP8_PER_CHANNEL, "b.q_proj": FP8_BLOCK, "c.q_proj": COMPRESSED_TENSORS_INT8}
    assert not FP8_PER_CHANNEL.per_tensor and not FP8_BLOCK.per_tensor and COMPRESSED_TENSORS_INT8.per_tensor


def test_a_checkpoint_mixing_formats_per_module_is_read_per_module():
    attn, mlp = "model.layers.0.self_attn", "model.layers.0.mlp"
    modules = {f"{attn}.q_proj": fp8(), f"{attn}.k_proj": fp8(), f"{mlp}.gate_proj": NVFP4, f"{mlp}.up_proj": NVFP4}
    found = find_formats(header(modules))
    assert [found[f"{attn}.q_proj"], found[f"{mlp}.up_proj"]] == [MODELOPT_FP8, MODELOPT]
    with pytest.raises(ValueError, match=r"modules of more than one format: modelopt-fp8 .*modelopt \(e\.g\."):
        detect_format(header(modules))


def test_unquantized_and_mx_modules_are_not_members():
    mx = {"weight_packed": ("U8", (64, 32)), "weight_scale": ("U8", (64, 2))}
    plain = {"weight": ("BF16", (64, 64))}
    assert find_formats(header({"a.q_proj": mx, "a.k_proj": plain, "model.norm": plain})) == {}


def test_names_alone_still_detect_every_nvfp4_layout():
    assert detect_format([f"{Q}.weight_scale_2", f"{Q}.weight"]) is MODELOPT
    assert detect_format([f"{Q}.weight_global_scale"]) is COMPRESSED_TENSORS
    assert detect_format([f"{Q}.weight_quantizer._amax"]) is QUANTIZER_STATE


@pytest.mark.parametrize("experts", ["block_sparse_moe.experts", "mlp.experts"])
def test_default_patterns_group_each_experts_gate_up_and_w1_w3(experts):
    names = [f"model.layers.0.{experts}.{e}.{proj}" for e in (0, 1) for proj in ("gate_proj", "up_proj", "down_proj")]
    names += [f"model.layers.1.{experts}.{e}.{proj}" for e in (0, 1) for proj in ("w1", "w2", "w3")]
    groups = find_groups(names, DEFAULT_PATTERNS)
    assert sorted(group.members for group in groups) == sorted(
        [tuple(f"model.layers.0.{experts}.{e}.{p}" for p in ("gate_proj", "up_proj")) for e in (0, 1)]
        + [tuple(f"model.layers.1.{experts}.{e}.{p}" for p in ("w1", "w3")) for e in (0, 1)]
    )


def test_int_pack_quantized_is_not_mistaken_for_nvfp4_or_fp8():
    packed = {"weight_packed": ("I32", (64, 8)), "weight_scale": ("F32", (1,)), "weight_shape": ("I64", (2,))}
    assert find_formats(header({Q: packed})) == {}


@pytest.mark.parametrize("name", ["modelopt_fp8", "llmcompressor_fp8", "llmcompressor_int8", "llmcompressor_nvfp4"])
def test_inspect_reads_the_per_tensor_scales_and_no_weight(name, monkeypatch):
    read, real = [], ckpt.Checkpoint.read

    def spy(checkpoint, key):
        read.append(key)
        return real(checkpoint, key)

    monkeypatch.setattr(ckpt.Checkpoint, "read", spy)
    inspection = inspect_checkpoint(FIXTURES / name)
    fmt = inspection.format
    assert read and all(key.endswith((f".{fmt.scale}", f".{fmt.input_scale}")) for key in read)
    assert not any(key.endswith(f".{fmt.packed}") for key in read)


def test_a_format_without_its_own_claims_takes_a_module_with_every_required_role_in_allowed_dtypes():
    from sharedquant.core.formats.base import Format

    fmt = Format(name="plain", scale="weight_scale", packed="weight")
    assert fmt.claims({"weight": None, "weight_scale": ("F32", ())}, None)
    assert not fmt.claims({"weight": None}, None)  # the per-tensor scale is required
    assert not fmt.claims({"weight": None, "weight_scale": ("I32", ())}, None)  # a scale is a float
