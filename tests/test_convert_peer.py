"""convert on the real exports of both tools, checked through each target library's own loader.

A modelopt checkpoint is nvidia-modelopt's HF export; a compressed-tensors one is made by
compressed-tensors' own path (apply_quantization_config, its qparam helpers, ModelCompressor).
Both tools are only run, never copied.
"""

import hashlib
import json
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from sharedquant.adapters.convert import convert_checkpoint

pytestmark = pytest.mark.peer

with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # both tools warn about versions on import
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("modelopt.torch.quantization")
    pytest.importorskip("compressed_tensors")
    from compressed_tensors.compressors.nvfp4.base import NVFP4PackedCompressor
    from compressed_tensors.quantization import QuantizationConfig
    from modelopt.torch.quantization.qtensor import NVFP4QTensor

BF16_ULP = 2.0**-7  # compressed-tensors decompresses NVFP4 to bfloat16


def tiny_llama() -> "transformers.LlamaForCausalLM":
    config = transformers.LlamaConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=128, architectures=["LlamaForCausalLM"],
    )  # fmt: skip
    torch.manual_seed(1)
    return transformers.LlamaForCausalLM(config).eval()


@pytest.fixture(scope="session")
def modelopt_export(tmp_path_factory) -> Path:
    """A tiny Llama exported to NVFP4 by nvidia-modelopt."""
    import modelopt.torch.quantization as mtq
    from modelopt.torch.export import export_hf_checkpoint

    model = tiny_llama()
    tokens = torch.randint(0, 128, (2, 16))
    mtq.quantize(model, mtq.NVFP4_DEFAULT_CFG, lambda m: m(tokens))
    directory = tmp_path_factory.mktemp("modelopt") / "export"
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        export_hf_checkpoint(model, export_dir=directory)
    return directory


@pytest.fixture(scope="session")
def ct_export(tmp_path_factory) -> Path:
    """A tiny Llama compressed to NVFP4 by compressed-tensors: its scheme, its qparam helpers, its compressor."""
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization import QuantizationScheme, apply_quantization_config
    from compressed_tensors.quantization.quant_scheme import NVFP4
    from compressed_tensors.quantization.utils import calculate_qparams, generate_gparam

    model = tiny_llama()
    scheme = QuantizationScheme(targets=["Linear"], **NVFP4)
    apply_quantization_config(model, QuantizationConfig(config_groups={"group_0": scheme}, ignore=["lm_head"]))
    with torch.no_grad():
        for module in model.modules():
            if not hasattr(module, "weight_global_scale"):
                continue
            weight = module.weight.detach()
            global_scale = generate_gparam(weight.min(), weight.max())
            blocks = weight.reshape(weight.shape[0], -1, 16)
            args = module.quantization_scheme.weights
            scale, _ = calculate_qparams(blocks.amin(-1), blocks.amax(-1), args, global_scale=global_scale)
            module.weight_global_scale.copy_(global_scale)
            module.weight_scale.copy_(scale.to(module.weight_scale.dtype))
            amax = torch.rand(()) * 4 + 1  # a calibrated activation range
            module.input_global_scale.copy_(generate_gparam(-amax, amax))
    compressor = ModelCompressor.from_pretrained_model(model)
    compressor.compress_model(model)
    directory = tmp_path_factory.mktemp("ct") / "export"
    directory.mkdir()
    state = {key: value.detach().contiguous() for key, value in model.state_dict().items()}
    save_file(state, directory / "model.safetensors", metadata={"format": "pt"})
    model.config.save_pretrained(directory)
    compressor.update_config(str(directory))
    return directory


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def members(state: dict[str, torch.Tensor], suffix: str) -> list[str]:
    return sorted(key[: -len(suffix)] for key in state if key.endswith(suffix))


def modelopt_dequantize(state: dict[str, torch.Tensor], fqn: str) -> torch.Tensor:
    """modelopt's own NVFP4 dequantization of one member of a modelopt checkpoint, in fp32."""
    packed = state[f"{fqn}.weight"]
    shape = torch.Size([packed.shape[0], packed.shape[1] * 2])
    qtensor = NVFP4QTensor(shape, torch.float32, packed)
    return qtensor.dequantize(
        scale=state[f"{fqn}.weight_scale"], double_scale=state[f"{fqn}.weight_scale_2"], block_sizes={-1: 16}
    )


def ct_decompress(directory: Path) -> dict[str, torch.Tensor]:
    """Every member of a compressed-tensors checkpoint through its NVFP4 compressor, with the scheme from its config."""
    state = load_file(directory / "model.safetensors")
    section = json.loads((directory / "config.json").read_text())["quantization_config"]
    config = QuantizationConfig.model_validate(section)
    (scheme,) = config.config_groups.values()
    out = {}
    for fqn in members(state, ".weight_packed"):
        local = {key[len(fqn) + 1 :]: value for key, value in state.items() if key.startswith(fqn + ".")}
        out[fqn] = NVFP4PackedCompressor.decompress(local, scheme)["weight"]
    return out


def assert_same_weights(decompressed: torch.Tensor, reference: torch.Tensor) -> None:
    """compressed-tensors' bf16 output against an fp32 reference: within bf16 rounding, mostly equal."""
    assert decompressed.shape == reference.shape
    error = (decompressed.float() - reference).abs()
    assert (error <= reference.abs() * BF16_ULP / 2 * 1.01).all()
    assert (decompressed == reference.to(torch.bfloat16)).float().mean() > 0.99


def test_modelopt_export_round_trips_byte_for_byte(modelopt_export, tmp_path):
    there = convert_checkpoint(modelopt_export, tmp_path / "ct", "compressed-tensors")
    back = convert_checkpoint(tmp_path / "ct", tmp_path / "back", "modelopt")
    assert there.inexact and back.restored == len(there.inexact)  # the export has reciprocals that do not invert
    assert sha(tmp_path / "back" / "model.safetensors") == sha(modelopt_export / "model.safetensors")
    for name in ("generation_config.json",):
        assert sha(tmp_path / "back" / name) == sha(modelopt_export / name)
    original = json.loads((modelopt_export / "hf_quant_config.json").read_text())["quantization"]
    assert json.loads((tmp_path / "back" / "hf_quant_config.json").read_text())["quantization"] == original
    old, new = (json.loads((d / "config.json").read_text()) for d in (modelopt_export, tmp_path / "back"))
    assert {k: v for k, v in new.items() if k != "quantization_config"} == {
        k: v for k, v in old.items() if k != "quantization_config"
    }
    assert new["quantization_config"]["ignore"] == old["quantization_config"]["ignore"]


def test_modelopt_export_loads_in_compressed_tensors_to_the_same_weights(modelopt_export, tmp_path):
    convert_checkpoint(modelopt_export, tmp_path / "ct", "compressed-tensors")
    source = load_file(modelopt_export / "model.safetensors")
    decompressed = ct_decompress(tmp_path / "ct")
    assert sorted(decompressed) == members(source, ".weight_scale_2") and len(decompressed) == 14
    for fqn, weight in decompressed.items():
        assert_same_weights(weight, modelopt_dequantize(source, fqn))
    # the whole model through transformers' compressed-tensors loader
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        config = transformers.CompressedTensorsConfig(dequantize=True)
        model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "ct", quantization_config=config)
    loaded = model.state_dict()
    for fqn, weight in decompressed.items():
        assert torch.equal(loaded[f"{fqn}.weight"].to(weight.dtype), weight)
    assert torch.equal(loaded["lm_head.weight"], source["lm_head.weight"])


def test_compressed_tensors_export_round_trips_byte_for_byte(ct_export, tmp_path):
    there = convert_checkpoint(ct_export, tmp_path / "mo", "modelopt")
    back = convert_checkpoint(tmp_path / "mo", tmp_path / "back", "compressed-tensors")
    assert there.inexact and back.restored == len(there.inexact)  # the export has reciprocals that do not invert
    assert sha(tmp_path / "back" / "model.safetensors") == sha(ct_export / "model.safetensors")
    ours, theirs = (
        QuantizationConfig.model_validate(json.loads((d / "config.json").read_text())["quantization_config"])
        for d in (tmp_path / "back", ct_export)
    )
    assert ours.config_groups == theirs.config_groups and ours.ignore == theirs.ignore == ["lm_head"]
    assert (ours.format, ours.quantization_status, ours.kv_cache_scheme) == (
        theirs.format, theirs.quantization_status, theirs.kv_cache_scheme,
    )  # fmt: skip


def test_compressed_tensors_export_dequantizes_in_modelopt_to_the_same_weights(ct_export, tmp_path):
    convert_checkpoint(ct_export, tmp_path / "mo", "modelopt")
    converted = load_file(tmp_path / "mo" / "model.safetensors")
    hf_quant = json.loads((tmp_path / "mo" / "hf_quant_config.json").read_text())["quantization"]
    expected = {"quant_algo": "NVFP4", "kv_cache_quant_algo": None, "group_size": 16, "exclude_modules": ["lm_head"]}
    assert hf_quant == expected
    decompressed = ct_decompress(ct_export)
    assert sorted(decompressed) == members(converted, ".weight_scale_2") and len(decompressed) == 14
    for fqn, weight in decompressed.items():
        assert converted[f"{fqn}.weight_scale_2"].shape == () and converted[f"{fqn}.input_scale"].shape == ()
        assert_same_weights(weight, modelopt_dequantize(converted, fqn))
