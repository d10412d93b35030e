"""convert for FP8 per-tensor checkpoints: modelopt's FP8 HF export <-> compressed-tensors' ``float-quantized``.

The real fixtures (tests/fixtures/modelopt_fp8 by nvidia-modelopt, llmcompressor_fp8 by
llm-compressor) cover the round trips byte for byte; the tests marked ``peer`` load the
converted checkpoint in compressed-tensors / transformers. Edited copies of the fixtures
cover what is refused.
"""

import hashlib
import json
import re
import shutil
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from sharedquant.adapters.cli import main
from sharedquant.adapters.convert import convert_checkpoint

FIXTURES = Path(__file__).parent / "fixtures"
MODELOPT_FP8, CT_FP8 = FIXTURES / "modelopt_fp8", FIXTURES / "llmcompressor_fp8"
CT_INT8 = FIXTURES / "llmcompressor_int8"
Q = "model.layers.0.self_attn.q_proj"


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def members(state: dict[str, torch.Tensor]) -> list[str]:
    return sorted(key[: -len(".weight")] for key, value in state.items() if value.dtype == torch.float8_e4m3fn)


def edited_copy(source: Path, directory: Path, edit=None, config=None) -> Path:
    """A copy of a fixture with its tensors passed through ``edit`` and its configs through ``config``."""
    shutil.copytree(source, directory)
    if edit is not None:
        state = edit(load_file(source / "model.safetensors"))
        save_file(state, directory / "model.safetensors", metadata={"format": "pt"})
    if config is not None:
        for name in ("config.json", "hf_quant_config.json"):
            if (directory / name).exists():
                data = json.loads((directory / name).read_text())
                config(name, data)
                (directory / name).write_text(json.dumps(data, indent=2))
    return directory


@pytest.mark.parametrize(
    "source, to, back", [(MODELOPT_FP8, "compressed-tensors", "modelopt"), (CT_FP8, "modelopt", "compressed-tensors")]
)
def test_the_real_exports_round_trip_byte_for_byte(tmp_path, source, to, back):
    there = convert_checkpoint(source, tmp_path / "there", to)
    again = convert_checkpoint(tmp_path / "there", tmp_path / "back", back)
    assert len(there.members) == len(again.members) == 14 and there.source.kind == "FP8"
    assert there.renamed == 0 and not there.inexact and again.restored == 0  # nothing is a reciprocal
    assert sha(tmp_path / "back" / "model.safetensors") == sha(source / "model.safetensors")
    assert sha(tmp_path / "there" / "model.safetensors") != sha(source / "model.safetensors")  # the shapes changed
    if back == "modelopt":
        hf_quant = json.loads((tmp_path / "back" / "hf_quant_config.json").read_text())["quantization"]
        assert hf_quant == json.loads((source / "hf_quant_config.json").read_text())["quantization"]
    old, new = (json.loads((d / "config.json").read_text())["quantization_config"] for d in (source, tmp_path / "back"))
    assert new["ignore"] == old["ignore"] and new["quant_method"] == old["quant_method"]


@pytest.mark.parametrize("source, to, shape", [(MODELOPT_FP8, "compressed-tensors", (1,)), (CT_FP8, "modelopt", ())])
def test_values_never_change_only_the_scale_shapes(tmp_path, source, to, shape):
    convert_checkpoint(source, tmp_path / "out", to)
    old, new = load_file(source / "model.safetensors"), load_file(tmp_path / "out" / "model.safetensors")
    assert sorted(old) == sorted(new)
    for key, value in old.items():
        assert new[key].dtype == value.dtype
        if key.endswith(("weight_scale", "input_scale")):
            assert new[key].shape == shape
            assert new[key].reshape(-1).view(torch.int32).equal(value.reshape(-1).view(torch.int32))
        else:
            assert new[key].shape == value.shape and new[key].view(torch.uint8).equal(value.view(torch.uint8))


def test_the_configs_are_the_targets(tmp_path):
    convert_checkpoint(CT_FP8, tmp_path / "mo", "modelopt")
    hf_quant = json.loads((tmp_path / "mo" / "hf_quant_config.json").read_text())
    expected = {"quant_algo": "FP8", "kv_cache_quant_algo": None, "exclude_modules": ["lm_head"]}
    assert hf_quant["quantization"] == expected
    section = json.loads((tmp_path / "mo" / "config.json").read_text())["quantization_config"]
    assert (section["quant_method"], section["quant_algo"]) == ("modelopt", "FP8")
    convert_checkpoint(MODELOPT_FP8, tmp_path / "ct", "compressed-tensors")
    assert not (tmp_path / "ct" / "hf_quant_config.json").exists()  # an engine finding one would read modelopt's layout
    section = json.loads((tmp_path / "ct" / "config.json").read_text())["quantization_config"]
    assert (section["format"], section["quant_method"]) == ("float-quantized", "compressed-tensors")
    assert section["ignore"] == ["lm_head", "model.embed_tokens"]
    (group,) = section["config_groups"].values()
    for role in ("weights", "input_activations"):
        args = group[role]
        assert (args["num_bits"], args["type"], args["strategy"], args["dynamic"]) == (8, "float", "tensor", False)


def test_a_scale_in_the_other_tools_shape_is_recorded_and_restored(tmp_path):
    """A modelopt-configured checkpoint with (1,) scales: the round trip still gives its bytes back."""
    def flat(state):
        return {key: value.reshape(-1) if value.dim() == 0 else value for key, value in state.items()}

    source = edited_copy(MODELOPT_FP8, tmp_path / "a", flat)
    there = convert_checkpoint(source, tmp_path / "b", "compressed-tensors")
    back = convert_checkpoint(tmp_path / "b", tmp_path / "c", "modelopt")
    assert not there.inexact and back.restored == 28  # a weight and an input scale per member, none listed as off
    assert sha(tmp_path / "c" / "model.safetensors") == sha(source / "model.safetensors")


def test_a_zero_scale_of_an_all_zero_weight_converts(tmp_path):
    def zero(state):
        state[f"{Q}.weight"] = torch.zeros_like(state[f"{Q}.weight"])
        state[f"{Q}.weight_scale"] = torch.zeros_like(state[f"{Q}.weight_scale"])
        return state

    source = edited_copy(CT_FP8, tmp_path / "a", zero)
    convert_checkpoint(source, tmp_path / "b", "modelopt")
    assert load_file(tmp_path / "b" / "model.safetensors")[f"{Q}.weight_scale"].shape == ()


def _per_channel(state):
    for fqn in members(state):
        rows = state[f"{fqn}.weight"].shape[0]
        state[f"{fqn}.weight_scale"] = state[f"{fqn}.weight_scale"].reshape(1, 1).expand(rows, 1).contiguous()
    return state


def _block(state):
    for fqn in members(state):
        rows, columns = state[f"{fqn}.weight"].shape
        scale = state.pop(f"{fqn}.weight_scale").reshape(1, 1)
        state[f"{fqn}.weight_scale_inv"] = scale.expand(rows // 32, columns // 32).contiguous()
    return state


def _drop(*suffixes):
    return lambda state: {key: value for key, value in state.items() if key not in {f"{Q}.{s}" for s in suffixes}}


def _nan(state):
    state[f"{Q}.weight_scale"] = torch.full_like(state[f"{Q}.weight_scale"], float("nan"))
    return state


def _kv_scales(state):
    state["model.layers.0.self_attn.k_proj.k_scale"] = torch.tensor(1.0)
    return state


def _algo(value):
    return lambda name, data: data["quantization"].update(quant_algo=value) if name == "hf_quant_config.json" else None


def _ct_args(**args):
    def edit(name, data):
        if name == "config.json":
            data["quantization_config"]["config_groups"]["group_0"]["weights"].update(args)

    return edit


def _dynamic_inputs(name, data):
    if name == "config.json":
        data["quantization_config"]["config_groups"]["group_0"]["input_activations"]["dynamic"] = True


@pytest.mark.parametrize(
    "source, to, edit, config, match",
    [
        (CT_INT8, "modelopt", None, None, r"holds compressed-tensors-int8 \(INT8\); modelopt exports INT8 only with"),
        (CT_FP8, "modelopt", _per_channel, None, r"holds fp8-per-channel \(FP8\); only FP8 with one weight scale"),
        (CT_FP8, "modelopt", _block, None, r"holds fp8-block \(FP8\); only FP8 with one weight scale per tensor"),
        (CT_FP8, "compressed-tensors", None, None, r"already in the compressed-tensors layout; nothing to convert"),
        (CT_FP8, "modelopt", _drop("input_scale"), None, rf"'{Q}' has no input_scale; weight-only FP8 does not"),
        (MODELOPT_FP8, "compressed-tensors", _drop("weight_scale"), None, rf"'{Q}.input_scale' is a quantization"),
        (MODELOPT_FP8, "compressed-tensors", _drop("weight_scale", "input_scale"), None, rf"'{Q}' lacks '{Q}.weight_"),
        (MODELOPT_FP8, "compressed-tensors", _nan, None, rf"'{Q}.weight_scale' should hold one positive finite"),
        (MODELOPT_FP8, "compressed-tensors", _kv_scales, None, r"k_scale' is a quantization scale outside any FP8"),
        (MODELOPT_FP8, "compressed-tensors", None, _algo("NVFP4"), r"quant_algo is 'NVFP4', but the tensors are FP8"),
        (CT_FP8, "modelopt", None, _ct_args(strategy="channel"), r"strategy 'channel'; only per-tensor FP8 converts"),
        (CT_FP8, "modelopt", None, _ct_args(num_bits=4), r"group_0.weights is not FP8 \(8-bit float\)"),
        (CT_FP8, "modelopt", None, _dynamic_inputs, r"input_activations is dynamic; modelopt's FP8 has static"),
    ],
)
def test_what_does_not_convert_exits_2_by_name_and_writes_nothing(tmp_path, capsys, source, to, edit, config, match):
    source = edited_copy(source, tmp_path / "a", edit, config)
    before = {path.name: sha(path) for path in source.iterdir()}
    assert main(["convert", str(source), "--to", to, "--out", str(tmp_path / "b")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("sharedquant convert: error: ") and re.search(match, err), err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a"]
    assert {path.name: sha(path) for path in source.iterdir()} == before


def test_the_cli_says_fp8(tmp_path, capsys):
    assert main(["convert", str(MODELOPT_FP8), "--to", "compressed-tensors", "--out", str(tmp_path / "b")]) == 0
    out = capsys.readouterr().out
    assert "converted 14 FP8 members from modelopt-fp8 to compressed-tensors-fp8 (0 tensors renamed)" in out
    assert "note:" not in out


# --- in the target's own library (peer) -----------------------------------------------------


@pytest.fixture(scope="module")
def peer():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the tools warn about versions on import
        transformers = pytest.importorskip("transformers")
        pytest.importorskip("compressed_tensors")
        from compressed_tensors.compressors.naive_quantized.base import FloatQuantizationCompressor
        from compressed_tensors.quantization import QuantizationConfig
    return transformers, FloatQuantizationCompressor, QuantizationConfig


def ct_decompress(peer, directory: Path) -> dict[str, torch.Tensor]:
    """Every FP8 member of a compressed-tensors checkpoint through its own compressor, with the config's scheme."""
    _, compressor, config_class = peer
    state = load_file(directory / "model.safetensors")
    config = config_class.model_validate(json.loads((directory / "config.json").read_text())["quantization_config"])
    (scheme,) = config.config_groups.values()
    local = {fqn: {suffix: state[f"{fqn}.{suffix}"] for suffix in ("weight", "weight_scale")} for fqn in members(state)}
    return {fqn: compressor.decompress(tensors, scheme)["weight"] for fqn, tensors in local.items()}


def modelopt_dequantize(state: dict[str, torch.Tensor], fqn: str) -> torch.Tensor:
    """modelopt's FP8 dequantization of a member: the float8 values times the per-tensor scale."""
    return state[f"{fqn}.weight"].float() * state[f"{fqn}.weight_scale"].float()


@pytest.mark.peer
def test_the_modelopt_export_loads_in_compressed_tensors_to_the_same_weights(peer, tmp_path):
    transformers = peer[0]
    convert_checkpoint(MODELOPT_FP8, tmp_path / "ct", "compressed-tensors")
    source = load_file(MODELOPT_FP8 / "model.safetensors")
    decompressed = ct_decompress(peer, tmp_path / "ct")
    assert sorted(decompressed) == members(source) and len(decompressed) == 14
    for fqn, weight in decompressed.items():
        assert torch.equal(weight.float(), modelopt_dequantize(source, fqn)), fqn
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model, info = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "ct", output_loading_info=True)
        config = transformers.CompressedTensorsConfig(dequantize=True)
        dense = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "ct", quantization_config=config)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    loaded = model.state_dict()
    for key in (f"{Q}.weight", f"{Q}.weight_scale", f"{Q}.input_scale"):
        assert loaded[key].dtype == source[key].dtype
        assert loaded[key].reshape(-1).float().equal(source[key].reshape(-1).float())
    weights = dense.state_dict()
    for fqn in decompressed:
        assert torch.equal(weights[f"{fqn}.weight"].float(), modelopt_dequantize(source, fqn)), fqn


@pytest.mark.peer
def test_the_llm_compressor_export_dequantizes_as_modelopt_to_the_same_weights(peer, tmp_path):
    convert_checkpoint(CT_FP8, tmp_path / "mo", "modelopt")
    converted = load_file(tmp_path / "mo" / "model.safetensors")
    decompressed = ct_decompress(peer, CT_FP8)
    assert sorted(decompressed) == members(converted) and len(decompressed) == 14
    for fqn, weight in decompressed.items():
        assert converted[f"{fqn}.weight_scale"].shape == () and converted[f"{fqn}.input_scale"].shape == ()
        assert torch.equal(modelopt_dequantize(converted, fqn), weight.float()), fqn


@pytest.mark.peer
def test_the_round_trip_gives_llm_compressors_config_back(peer, tmp_path):
    config_class = peer[2]
    convert_checkpoint(CT_FP8, tmp_path / "mo", "modelopt")
    convert_checkpoint(tmp_path / "mo", tmp_path / "ct", "compressed-tensors")
    ours, theirs = (
        config_class.model_validate(json.loads((d / "config.json").read_text())["quantization_config"])
        for d in (tmp_path / "ct", CT_FP8)
    )
    assert ours.config_groups == theirs.config_groups and ours.ignore == theirs.ignore == ["lm_head"]
    assert (ours.format, ours.quantization_status, ours.kv_cache_scheme) == (
        theirs.format, theirs.quantization_status, theirs.kv_cache_scheme,
    )  # fmt: skip
