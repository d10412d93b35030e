"""core.convert and adapters.convert: NVFP4 between the modelopt and compressed-tensors layouts.

Synthetic checkpoints (made with core.nvfp4) cover the mapping, the reciprocal records and bad
input; the real exports of both tools (marked ``peer``) cover the round trips byte for byte
and loading in the target's own library.
"""

import hashlib
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from sharedquant.adapters import convert as conv
from sharedquant.adapters.checkpoint import CheckpointError
from sharedquant.adapters.cli import main
from sharedquant.adapters.convert import convert_checkpoint
from sharedquant.core.convert import (
    ORIGINALS_KEY,
    QuantSettings,
    compressed_tensors_config,
    convert_scale,
    find_renames,
    translate_ignore,
)
from sharedquant.core.formats import COMPRESSED_TENSORS, MODELOPT
from sharedquant.core.nvfp4 import nvfp4_quantize

MEMBERS = [f"model.layers.0.self_attn.{role}" for role in ("q_proj", "k_proj", "v_proj")]


def non_invertible(start: float) -> float:
    """The first fp32 at or above ``start`` whose fp32 reciprocal does not invert (numpy's own division)."""
    x = np.float32(start)
    while np.float32(1) / (np.float32(1) / x) == x:
        x = np.nextafter(x, np.float32(np.inf))
    return float(x)


def invertible(start: float) -> float:
    x = np.float32(start)
    while np.float32(1) / (np.float32(1) / x) != x:
        x = np.nextafter(x, np.float32(np.inf))
    return float(x)


SCALES = {MEMBERS[0]: non_invertible(1.9e-3), MEMBERS[1]: invertible(1.1e-3), MEMBERS[2]: 2.0**-9}


def modelopt_state() -> dict[str, torch.Tensor]:
    """Three NVFP4 members (the first with a weight_scale_2 whose reciprocal does not invert) and a float head."""
    state = {"lm_head.weight": torch.randn(8, 32), "model.norm.weight": torch.rand(32)}
    for fqn, scale in SCALES.items():
        quantized = nvfp4_quantize(torch.randn(16, 32), torch.tensor(scale * 2688.0))
        state[f"{fqn}.weight"], state[f"{fqn}.weight_scale"] = quantized.packed, quantized.block_scale
        state[f"{fqn}.weight_scale_2"] = torch.tensor(scale, dtype=torch.float32)
        state[f"{fqn}.input_scale"] = torch.tensor(invertible(0.02), dtype=torch.float32)
    return state


def write_checkpoint(directory: Path, state: dict[str, torch.Tensor], hf_quant: dict | None = None, shards=1) -> Path:
    """A model directory (sharded with an index when ``shards`` > 1) with a config and hf_quant_config.json."""
    directory.mkdir(parents=True)
    keys = sorted(state)
    if shards == 1:
        save_file(state, directory / "model.safetensors", metadata={"format": "pt"})
    else:
        weight_map = {}
        for index in range(shards):
            name = f"model-{index + 1:05d}-of-{shards:05d}.safetensors"
            part = {key: state[key] for key in keys[index::shards]}
            save_file(part, directory / name, metadata={"format": "pt"})
            weight_map.update(dict.fromkeys(part, name))
        total = sum(t.numel() * t.element_size() for t in state.values())
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    quantization = {"quant_algo": "NVFP4", "kv_cache_quant_algo": None, "group_size": 16}
    quantization["exclude_modules"] = ["lm_head"]
    hf_quant = hf_quant or {"producer": {"name": "modelopt", "version": "0"}, "quantization": quantization}
    (directory / "hf_quant_config.json").write_text(json.dumps(hf_quant, indent=4))
    (directory / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 32}, indent=2))
    (directory / "tokenizer.json").write_text("{}")
    return directory


def digest(directory: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(directory.iterdir()) if p.is_file()}


def shards_of(directory: Path) -> dict[str, str]:
    return {name: value for name, value in digest(directory).items() if "safetensors" in name}


def load_all(directory: Path) -> dict[str, torch.Tensor]:
    state = {}
    for path in sorted(directory.glob("*.safetensors")):
        state.update(load_file(path))
    return state


# --- the pure mapping -----------------------------------------------------------------------


def test_renames_cover_every_member_tensor_and_nothing_else():
    renames = find_renames(modelopt_state(), MODELOPT, COMPRESSED_TENSORS)
    fqn = MEMBERS[0]
    assert renames[f"{fqn}.weight"] == f"{fqn}.weight_packed"
    assert renames[f"{fqn}.weight_scale_2"] == f"{fqn}.weight_global_scale"
    assert renames[f"{fqn}.input_scale"] == f"{fqn}.input_global_scale"
    assert renames[f"{fqn}.weight_scale"] == f"{fqn}.weight_scale"
    assert "lm_head.weight" not in renames and len(renames) == 4 * len(MEMBERS)


@pytest.mark.parametrize("suffix", ["weight_scale", "input_scale", "k_scale"])
def test_renames_refuse_scales_outside_nvfp4_members(suffix):
    """An FP8 layer or a kv-cache scale would keep a name the target misreads, in either direction."""
    state = modelopt_state()
    renames = find_renames(state, MODELOPT, COMPRESSED_TENSORS)
    stray = f"model.layers.0.mlp.down_proj.{suffix}"
    directions = [(state, MODELOPT, COMPRESSED_TENSORS), (renames.values(), COMPRESSED_TENSORS, MODELOPT)]
    for keys, source, target in directions:
        with pytest.raises(ValueError, match=rf"'{stray}' is a quantization scale outside any NVFP4 member"):
            find_renames([*keys, stray], source, target)


def test_a_scale_becomes_its_correctly_rounded_reciprocal_in_the_target_shape():
    value = torch.tensor(SCALES[MEMBERS[1]])
    converted = convert_scale("k", value, MODELOPT, COMPRESSED_TENSORS)
    assert converted.tensor.shape == (1,) and converted.record is None and converted.relative_error == 0
    assert converted.tensor.item() == float(np.float32(1) / np.float32(value.item()))
    back = convert_scale("k", converted.tensor, COMPRESSED_TENSORS, MODELOPT)
    assert back.tensor.shape == () and torch.equal(back.tensor, value)


def test_a_reciprocal_that_does_not_invert_is_recorded_and_restored_exactly():
    value = torch.tensor(SCALES[MEMBERS[0]])
    converted = convert_scale("k", value, MODELOPT, COMPRESSED_TENSORS)
    plain_back = float(np.float32(1) / np.float32(converted.tensor.item()))
    assert plain_back != value.item()
    assert converted.relative_error == pytest.approx(abs(plain_back - value.item()) / value.item(), rel=1e-12)
    assert 0 < converted.relative_error < 2e-7
    back = convert_scale("k", converted.tensor, COMPRESSED_TENSORS, MODELOPT, converted.record)
    assert back.restored and torch.equal(back.tensor, value) and back.tensor.shape == ()
    # a record whose reciprocal is no longer the stored value (the scale changed since) is ignored
    changed = converted.tensor * 2
    again = convert_scale("k", changed, COMPRESSED_TENSORS, MODELOPT, converted.record)
    assert not again.restored and again.tensor.item() == float(np.float32(1) / np.float32(changed.item()))


@pytest.mark.parametrize("bad", [0.0, -1.0, float("inf"), float("nan")])
def test_a_scale_that_is_not_positive_and_finite_is_refused(bad):
    with pytest.raises(ValueError, match=r"'m.weight_scale_2' should hold one positive finite float"):
        convert_scale("m.weight_scale_2", torch.tensor(bad), MODELOPT, COMPRESSED_TENSORS)


def test_ignore_lists_translate_between_wildcards_and_regexes():
    modules = ["lm_head", "model.layers.0.mlp.gate", "model.layers.1.mlp.gate", "model.norm"]
    to_ct = translate_ignore(["lm_head", "*.mlp.gate"], MODELOPT, COMPRESSED_TENSORS, modules)
    assert to_ct[0] == "lm_head" and to_ct[1].startswith("re:")
    assert [m for m in modules if re.match(to_ct[1][3:], m)] == modules[1:3]
    back = translate_ignore(["lm_head", r"re:.*mlp\.gate$"], COMPRESSED_TENSORS, MODELOPT, modules)
    assert back == ("lm_head", *modules[1:3])


# --- the command on synthetic checkpoints ---------------------------------------------------------


@pytest.mark.parametrize("shards", [1, 2])
def test_modelopt_to_compressed_tensors_and_back_is_byte_identical(tmp_path, shards):
    source = write_checkpoint(tmp_path / "a", modelopt_state(), shards=shards)
    there = convert_checkpoint(source, tmp_path / "b", "compressed-tensors")
    back = convert_checkpoint(tmp_path / "b", tmp_path / "a2", "modelopt")
    assert shards_of(tmp_path / "a2") == shards_of(source)
    assert digest(tmp_path / "a2")["tokenizer.json"] == digest(source)["tokenizer.json"]
    assert [key for key, _ in there.inexact] == [f"{MEMBERS[0]}.weight_scale_2"] and back.restored == 1
    b = load_all(tmp_path / "b")
    a = load_all(source)
    assert torch.equal(b["lm_head.weight"], a["lm_head.weight"])
    for fqn in MEMBERS:
        assert torch.equal(b[f"{fqn}.weight_packed"], a[f"{fqn}.weight"])
        assert torch.equal(b[f"{fqn}.weight_scale"].view(torch.uint8), a[f"{fqn}.weight_scale"].view(torch.uint8))
        assert b[f"{fqn}.weight_global_scale"].shape == (1,) and b[f"{fqn}.input_global_scale"].shape == (1,)
        expected = np.float32(1) / np.float32(a[f"{fqn}.weight_scale_2"].item())
        assert b[f"{fqn}.weight_global_scale"].item() == float(expected)
    assert not any(key.endswith(("weight_scale_2", "input_scale")) for key in b)
    if shards == 2:
        index = json.loads((tmp_path / "b" / "model.safetensors.index.json").read_text())
        assert set(index["weight_map"]) == set(b)
        assert index["weight_map"][f"{MEMBERS[0]}.weight_packed"] == json.loads(
            (source / "model.safetensors.index.json").read_text()
        )["weight_map"][f"{MEMBERS[0]}.weight"]


def test_the_record_lives_in_the_shard_metadata_and_leaves_on_the_way_back(tmp_path):
    source = write_checkpoint(tmp_path / "a", modelopt_state())
    convert_checkpoint(source, tmp_path / "b", "compressed-tensors")
    with safe_open(str(tmp_path / "b" / "model.safetensors"), "pt") as handle:
        metadata = handle.metadata()
    assert metadata["format"] == "pt"
    assert list(json.loads(metadata[ORIGINALS_KEY])) == [f"{MEMBERS[0]}.weight_global_scale"]
    convert_checkpoint(tmp_path / "b", tmp_path / "a2", "modelopt")
    with safe_open(str(tmp_path / "a2" / "model.safetensors"), "pt") as handle:
        assert handle.metadata() == {"format": "pt"}


def test_configs_are_rewritten_for_each_target(tmp_path):
    source = write_checkpoint(tmp_path / "a", modelopt_state())
    result = convert_checkpoint(source, tmp_path / "b", "compressed-tensors")
    assert result.configs == ["config.json"] and not (tmp_path / "b" / "hf_quant_config.json").exists()
    config = json.loads((tmp_path / "b" / "config.json").read_text())
    assert config["hidden_size"] == 32
    assert config["quantization_config"] == compressed_tensors_config(QuantSettings(16, ("lm_head",)))
    assert config["quantization_config"]["format"] == "nvfp4-pack-quantized"
    convert_checkpoint(tmp_path / "b", tmp_path / "a2", "modelopt")
    hf_quant = json.loads((tmp_path / "a2" / "hf_quant_config.json").read_text())
    assert hf_quant["quantization"] == json.loads((source / "hf_quant_config.json").read_text())["quantization"]
    config = json.loads((tmp_path / "a2" / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "modelopt"
    assert config["quantization_config"]["ignore"] == ["lm_head"]


def test_the_cli_lists_the_scales_whose_reciprocal_does_not_invert(tmp_path, capsys):
    source = write_checkpoint(tmp_path / "a", modelopt_state())
    assert main(["convert", str(source), "--to", "compressed-tensors", "--out", str(tmp_path / "b")]) == 0
    out = capsys.readouterr().out
    assert "converted 3 NVFP4 members from modelopt to compressed-tensors" in out
    assert "note: 1 scale(s)" in out and f"  {MEMBERS[0]}.weight_scale_2: " in out


def no_leftovers(parent: Path) -> bool:
    return not [p for p in parent.iterdir() if p.name.endswith((".partial", ".old"))]


@pytest.mark.parametrize(
    "case, match",
    [
        ("unknown", r"no key of a known quantized format"),
        ("same", r"already in the modelopt layout; nothing to convert"),
        ("fp8", r"quant_algo is 'FP8'; only NVFP4 converts"),
        ("kv", r"a quantized kv cache \(FP8\) does not convert"),
        ("group", r"the config says group_size 32, the tensors 16"),
        ("codes", r"is not NVFP4 \(expected U8 codes"),
        ("weight-only", r"has no input_scale; weight-only NVFP4 does not convert"),
    ],
)
def test_bad_input_exits_2_with_one_line_and_writes_nothing(tmp_path, capsys, case, match):
    state, to = modelopt_state(), "compressed-tensors"
    quantization = {"quant_algo": "NVFP4", "kv_cache_quant_algo": None, "group_size": 16, "exclude_modules": []}
    if case == "unknown":
        state = {"lm_head.weight": torch.randn(4, 4)}
    elif case == "same":
        to = "modelopt"
    elif case == "fp8":
        quantization["quant_algo"] = "FP8"
    elif case == "kv":
        quantization["kv_cache_quant_algo"] = "FP8"
    elif case == "group":
        quantization["group_size"] = 32
    elif case == "codes":
        state[f"{MEMBERS[0]}.weight"] = state[f"{MEMBERS[0]}.weight"].to(torch.int8)
    elif case == "weight-only":
        del state[f"{MEMBERS[1]}.input_scale"]
    source = write_checkpoint(tmp_path / "a", state, {"quantization": quantization})
    before = digest(source)
    assert main(["convert", str(source), "--to", to, "--out", str(tmp_path / "b")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("sharedquant convert: error: ")
    assert re.search(match, err), err
    assert not (tmp_path / "b").exists() and no_leftovers(tmp_path) and digest(source) == before


def test_out_inside_the_input_or_existing_is_refused(tmp_path):
    source = write_checkpoint(tmp_path / "a", modelopt_state())
    with pytest.raises(CheckpointError, match=r"--out must lie outside the input"):
        convert_checkpoint(source, source / "out", "compressed-tensors")
    (tmp_path / "taken").mkdir()
    with pytest.raises(CheckpointError, match=r"already exists; pass --force"):
        convert_checkpoint(source, tmp_path / "taken", "compressed-tensors")
    assert main(["convert", str(source), "--to", "fp8", "--out", str(tmp_path / "x")]) == 2


def test_a_failure_midway_leaves_no_output_and_no_staging(tmp_path, monkeypatch):
    source = write_checkpoint(tmp_path / "a", modelopt_state(), shards=2)
    before = digest(source)
    real, calls = conv._convert_shard, []

    def failing(*args):
        calls.append(args[1])
        if len(calls) == 2:
            raise OSError("disk full")
        return real(*args)

    monkeypatch.setattr(conv, "_convert_shard", failing)
    with pytest.raises(OSError, match="disk full"):
        convert_checkpoint(source, tmp_path / "b", "compressed-tensors")
    assert len(calls) == 2 and not (tmp_path / "b").exists() and no_leftovers(tmp_path)
    assert digest(source) == before


def test_the_input_is_never_opened_for_writing(tmp_path, monkeypatch):
    source = write_checkpoint(tmp_path / "a", modelopt_state(), shards=2)
    opened = []

    def spy(path, mode="r", *args, **kwargs):
        opened.append((Path(path), mode))
        return open(path, mode, *args, **kwargs)

    monkeypatch.setattr(conv, "open", spy, raising=False)
    convert_checkpoint(source, tmp_path / "b", "compressed-tensors")
    reads = [path for path, mode in opened if mode == "rb"]
    writes = [path for path, mode in opened if mode != "rb"]
    assert sorted(p.name for p in reads) == sorted([p.name for p in source.glob("*.safetensors")] * 2)
    assert writes and all(tmp_path / "a" not in path.parents for path in writes)


def test_a_corrupt_record_in_the_metadata_is_refused(tmp_path, capsys):
    source = tmp_path / "a"
    source.mkdir()
    save_file(modelopt_state(), source / "model.safetensors", metadata={ORIGINALS_KEY: "[1, 2]"})
    assert main(["convert", str(source), "--to", "compressed-tensors", "--out", str(tmp_path / "b")]) == 2
    assert f"metadata '{ORIGINALS_KEY}' is not valid" in capsys.readouterr().err
    assert not (tmp_path / "b").exists() and no_leftovers(tmp_path)
