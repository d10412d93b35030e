"""adapters.checkpoint on real checkpoints: written by the peer (nvidia-modelopt), and mismatched variants of them."""

import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from sharedquant.adapters import checkpoint as ckpt
from sharedquant.adapters.checkpoint import CheckpointError, inspect_checkpoint, open_checkpoint
from sharedquant.adapters.rewrite import reconcile_checkpoint
from sharedquant.core import reconcile as core_reconcile
from sharedquant.core.nvfp4 import nvfp4_dequantize, nvfp4_fake_quant, nvfp4_quantize
from sharedquant.core.reconcile import dequantize_without_rescaling
from sharedquant.core.reduce import reduce_amax

ATTN, MLP = "model.layers.{}.self_attn", "model.layers.{}.mlp"
# Members of the variant requantized with their own (smaller) amax: the weights scaled by these factors.
SKEW = {f"{ATTN.format(0)}.k_proj": 0.5, f"{ATTN.format(1)}.k_proj": 0.7, f"{MLP.format(1)}.up_proj": 0.3}


@pytest.fixture(scope="session")
def peer(tmp_path_factory):
    """A tiny Llama exported to NVFP4 by the peer, and its float weights before export."""
    pytest.importorskip("modelopt.torch.quantization")
    transformers = pytest.importorskip("transformers")
    import modelopt.torch.quantization as mtq
    from modelopt.torch.export import export_hf_checkpoint

    config = transformers.LlamaConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=128, architectures=["LlamaForCausalLM"],
    )  # fmt: skip
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).eval()
    tokens = torch.randint(0, 128, (2, 16))
    mtq.quantize(model, mtq.NVFP4_DEFAULT_CFG, lambda m: m(tokens))
    weights = {name[: -len(".weight")]: p.detach().clone() for name, p in model.named_parameters()}
    directory = tmp_path_factory.mktemp("peer") / "export"
    with torch.no_grad():
        export_hf_checkpoint(model, export_dir=directory)
    return directory, weights


@pytest.fixture(scope="session")
def variant(peer, tmp_path_factory):
    """The peer's export with SKEW's members requantized from scaled weights with their own amax."""
    export, weights = peer
    directory = tmp_path_factory.mktemp("variant") / "mismatched"
    shutil.copytree(export, directory)
    state = load_file(export / "model.safetensors")
    originals = {}
    for fqn, factor in SKEW.items():
        originals[fqn] = weights[fqn] * factor
        quantized = nvfp4_quantize(originals[fqn], reduce_amax(originals[fqn]))
        state[f"{fqn}.weight"], state[f"{fqn}.weight_scale"] = quantized.packed, quantized.block_scale
        state[f"{fqn}.weight_scale_2"] = quantized.global_scale
    state[f"{ATTN.format(0)}.v_proj.input_scale"] = state[f"{ATTN.format(0)}.v_proj.input_scale"] * 1.5
    save_file(state, directory / "model.safetensors", metadata={"format": "pt", "producer": "test"})
    return directory, originals


def digest(directory: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(directory.iterdir()) if p.is_file()}


@pytest.fixture
def requested(monkeypatch):
    """Keys whose tensors the checkpoint adapter reads."""
    keys, read = [], ckpt.Checkpoint.read

    def spy(checkpoint, key):
        keys.append(key)
        return read(checkpoint, key)

    monkeypatch.setattr(ckpt.Checkpoint, "read", spy)
    return keys


def test_the_peer_export_is_consistent_and_inspect_reads_only_its_scales(peer, requested):
    export, _ = peer
    inspection = inspect_checkpoint(export)
    assert inspection.format.name == "modelopt" and inspection.consistent
    parents = [report.group.parent for report in inspection.reports]
    assert parents == [MLP.format(0), ATTN.format(0), MLP.format(1), ATTN.format(1)]
    assert {m.block_size for r in inspection.reports for m in r.members} == {16}
    assert requested and all(key.endswith((".weight_scale_2", ".input_scale")) for key in requested)


def test_reconciling_the_consistent_peer_export_copies_it_byte_for_byte(peer, tmp_path):
    export, _ = peer
    result = reconcile_checkpoint(export, tmp_path / "out")
    assert result.requantized == [] and result.inputs_unified == []
    assert digest(tmp_path / "out") == digest(export)
    assert {"config.json", "hf_quant_config.json", "model.safetensors"} <= set(digest(tmp_path / "out"))


def test_inspect_reports_the_mismatched_groups_and_their_ratios(variant):
    directory, _ = variant
    reports = {r.group.parent: r for r in inspect_checkpoint(directory).reports}
    state = load_file(directory / "model.safetensors")
    for fqn in SKEW:
        report = reports[fqn.rpartition(".")[0]]
        scales = [state[f"{m}.weight_scale_2"].item() for m in report.group.members]
        assert report.changed == (fqn,) and report.ratio == max(scales) / min(scales) > 1.3
    assert reports[ATTN.format(0)].input_changed == (f"{ATTN.format(0)}.q_proj", f"{ATTN.format(0)}.k_proj")
    assert reports[MLP.format(0)].consistent


def test_reconcile_repairs_members_better_than_fresh_quantization_and_engine_max(variant, tmp_path):
    directory, originals = variant
    before = digest(directory)
    result = reconcile_checkpoint(directory, tmp_path / "out")
    assert sorted(result.requantized) == sorted(SKEW) and result.inexact == []
    assert digest(directory) == before  # the input is never modified
    old, new = load_file(directory / "model.safetensors"), load_file(tmp_path / "out" / "model.safetensors")
    assert inspect_checkpoint(tmp_path / "out").consistent
    for fqn, weight in originals.items():
        exported = nvfp4_dequantize(old[f"{fqn}.weight"], old[f"{fqn}.weight_scale"], old[f"{fqn}.weight_scale_2"])
        shared = new[f"{fqn}.weight_scale_2"]
        repaired = nvfp4_dequantize(new[f"{fqn}.weight"], new[f"{fqn}.weight_scale"], shared)
        afresh = nvfp4_fake_quant(weight, shared * 2688.0)
        engine = dequantize_without_rescaling(old[f"{fqn}.weight"], old[f"{fqn}.weight_scale"], shared)
        error = (repaired - exported).norm()
        assert error <= (afresh - exported).norm()
        assert error * 5 < (engine - exported).norm()


def test_reconcile_copies_every_other_tensor_byte_for_byte_and_keeps_metadata(variant, tmp_path):
    directory, _ = variant
    reconcile_checkpoint(directory, tmp_path / "out")
    changed = {f"{fqn}.{s}" for fqn in SKEW for s in ("weight", "weight_scale", "weight_scale_2")}
    changed |= {f"{ATTN.format(0)}.{m}.input_scale" for m in ("q_proj", "k_proj")}
    source, written = directory / "model.safetensors", tmp_path / "out" / "model.safetensors"
    with safe_open(source, "pt") as old, safe_open(written, "pt") as new:
        assert new.metadata() == old.metadata() == {"format": "pt", "producer": "test"}
        assert list(new.keys()) == list(old.keys())
        differing = set()
        for key in old.keys():
            a, b = old.get_tensor(key), new.get_tensor(key)
            assert a.dtype == b.dtype and a.shape == b.shape
            if not torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8)):
                differing.add(key)
    assert differing == changed


def test_reconciling_twice_changes_nothing(variant, tmp_path):
    directory, _ = variant
    reconcile_checkpoint(directory, tmp_path / "once")
    again = reconcile_checkpoint(tmp_path / "once", tmp_path / "twice")
    assert again.requantized == [] and again.inputs_unified == []
    assert digest(tmp_path / "twice") == digest(tmp_path / "once")


def shard(state: dict, directory: Path, second: set[str]) -> Path:
    """Write ``state`` as two shards and an index; keys in ``second`` go to the second shard."""
    directory.mkdir()
    names = ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    parts = [{k: v for k, v in state.items() if k not in second}, {k: v for k, v in state.items() if k in second}]
    for name, part in zip(names, parts):
        save_file(part, directory / name, metadata={"format": "pt"})
    weight_map = {key: names[key in second] for key in sorted(state)}
    total = sum(t.numel() * t.element_size() for t in state.values())
    (directory / ckpt.INDEX).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))
    (directory / "tokenizer.json").write_text("{}")
    return directory


def test_a_sharded_checkpoint_with_a_group_split_across_shards(variant, tmp_path):
    directory, _ = variant
    state = load_file(directory / "model.safetensors")
    split = {k for k in state if ".layers.0.self_attn.k_proj." in k or k.endswith("k_proj.weight_scale")}
    sharded = shard(state, tmp_path / "sharded", split)
    reconcile_checkpoint(directory, tmp_path / "single")
    result = reconcile_checkpoint(sharded, tmp_path / "out")
    assert sorted(result.requantized) == sorted(SKEW)
    expected = load_file(tmp_path / "single" / "model.safetensors")
    got = {**load_file(tmp_path / "out" / "model-00001-of-00002.safetensors"),
           **load_file(tmp_path / "out" / "model-00002-of-00002.safetensors")}  # fmt: skip
    assert got.keys() == expected.keys()
    assert all(torch.equal(got[k].view(torch.uint8), expected[k].view(torch.uint8)) for k in got if got[k].dim())
    assert digest(tmp_path / "out")[ckpt.INDEX] == digest(sharded)[ckpt.INDEX]
    assert (tmp_path / "out" / "tokenizer.json").read_text() == "{}"


def quantizer_state(global_amax: bool) -> dict[str, torch.Tensor]:
    """Calibration state of one attention block: per-block weight amax, per-tensor input amax."""
    generator = torch.Generator().manual_seed(1)
    state = {}
    for name, scale in (("q_proj", 1.0), ("k_proj", 0.4), ("v_proj", 0.8)):
        amax = torch.rand(32, 1, generator=generator) * scale
        state[f"{ATTN.format(0)}.{name}.weight_quantizer._amax"] = amax
        state[f"{ATTN.format(0)}.{name}.input_quantizer._amax"] = torch.tensor(3.0)
        if global_amax:
            state[f"{ATTN.format(0)}.{name}.weight_quantizer._global_amax"] = amax.max().clone()
    return state


@pytest.mark.parametrize("has_global_amax", [True, False])
def test_quantizer_state_gets_the_group_max_as_global_amax(tmp_path, has_global_amax):
    state = quantizer_state(has_global_amax)
    second = {k for k in state if ".k_proj." in k}
    sharded = shard(state, tmp_path / "state", second)
    result = reconcile_checkpoint(sharded, tmp_path / "out")
    shared = max(v.max() for k, v in state.items() if k.endswith("weight_quantizer._amax"))
    members = [f"{ATTN.format(0)}.{name}" for name in ("k_proj", "q_proj", "v_proj")]
    # a member that holds the max gains a stored global amax only if it had none
    assert sorted(result.scales_set) == (members[::2] if has_global_amax else members)
    out = {}
    for name in ("model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"):
        out.update(load_file(tmp_path / "out" / name))
    for name in ("q_proj", "k_proj", "v_proj"):
        assert out[f"{ATTN.format(0)}.{name}.weight_quantizer._global_amax"] == shared
        amax = f"{ATTN.format(0)}.{name}.weight_quantizer._amax"
        assert torch.equal(out[amax], state[amax])
    index = json.loads((tmp_path / "out" / ckpt.INDEX).read_text())
    assert set(index["weight_map"]) == set(out)
    assert index["weight_map"][f"{ATTN.format(0)}.k_proj.weight_quantizer._global_amax"].startswith("model-00002")
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in out.values())
    assert inspect_checkpoint(tmp_path / "out").consistent


def to_compressed_tensors(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The same quantized model in compressed-tensors names: reciprocal global scales of shape [1]."""
    renamed = {}
    for key, value in state.items():
        if key.endswith(".weight_scale_2"):
            renamed[key.replace(".weight_scale_2", ".weight_global_scale")] = (1.0 / value).reshape(1)
        elif key.endswith(".input_scale"):
            renamed[key.replace(".input_scale", ".input_global_scale")] = (1.0 / value).reshape(1)
        elif key.endswith(".weight") and value.dtype == torch.uint8:
            renamed[key + "_packed"] = value
        else:
            renamed[key] = value
    return renamed


def test_compressed_tensors_groups_share_the_smallest_global_scale(variant, tmp_path):
    directory, originals = variant
    old = to_compressed_tensors(load_file(directory / "model.safetensors"))
    (tmp_path / "ct").mkdir()
    save_file(old, tmp_path / "ct" / "model.safetensors")
    result = reconcile_checkpoint(tmp_path / "ct", tmp_path / "out")
    assert result.inspection.format.name == "compressed-tensors" and sorted(result.requantized) == sorted(SKEW)
    new = load_file(tmp_path / "out" / "model.safetensors")
    for report in result.inspection.reports:
        shared = min(old[f"{m}.weight_global_scale"] for m in report.group.members)
        assert all(torch.equal(new[f"{m}.weight_global_scale"], shared) for m in report.group.members)
    for fqn in originals:
        gs_old, gs_new = old[f"{fqn}.weight_global_scale"], new[f"{fqn}.weight_global_scale"]
        exported = nvfp4_dequantize(old[f"{fqn}.weight_packed"], old[f"{fqn}.weight_scale"], 1 / gs_old)
        repaired = nvfp4_dequantize(new[f"{fqn}.weight_packed"], new[f"{fqn}.weight_scale"], 1 / gs_new)
        engine = dequantize_without_rescaling(old[f"{fqn}.weight_packed"], old[f"{fqn}.weight_scale"], 1 / gs_new)
        assert (repaired - exported).norm() * 5 < (engine - exported).norm()
    assert inspect_checkpoint(tmp_path / "out").consistent


def test_out_is_refused_when_it_exists_or_overlaps_the_input(variant, tmp_path):
    directory, _ = variant
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "keep.txt").write_text("mine")
    with pytest.raises(CheckpointError, match=r"already exists; pass --force"):
        reconcile_checkpoint(directory, tmp_path / "taken")
    assert (tmp_path / "taken" / "keep.txt").read_text() == "mine"
    for inside in (directory, directory / "sub"):
        with pytest.raises(CheckpointError, match=r"must lie outside the input"):
            reconcile_checkpoint(directory, inside, force=True)
    reconcile_checkpoint(directory, tmp_path / "taken", force=True)
    assert not (tmp_path / "taken" / "keep.txt").exists() and inspect_checkpoint(tmp_path / "taken").consistent
    assert sorted(p.name for p in tmp_path.iterdir()) == ["taken"]


def test_a_failure_midway_leaves_nothing_behind(variant, tmp_path, monkeypatch):
    directory, _ = variant
    calls = []

    def failing(*args):
        calls.append(args)
        if len(calls) == 2:
            raise ValueError("requantize: simulated failure")
        return failing.__wrapped__(*args)

    failing.__wrapped__ = core_reconcile.requantize  # the NVFP4 formats requantize through it
    monkeypatch.setattr(core_reconcile, "requantize", failing)
    with pytest.raises(ValueError, match="simulated failure"):
        reconcile_checkpoint(directory, tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


def test_a_single_file_input_is_written_under_its_own_name(variant, tmp_path):
    directory, _ = variant
    shutil.copy(directory / "model.safetensors", tmp_path / "weights.safetensors")
    result = reconcile_checkpoint(tmp_path / "weights.safetensors", tmp_path / "out")
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["weights.safetensors"]
    assert result.out == tmp_path / "out" and inspect_checkpoint(tmp_path / "out" / "weights.safetensors").consistent


def test_open_checkpoint_refuses_a_truncated_file_and_an_index_with_a_missing_shard(variant, tmp_path):
    directory, _ = variant
    data = (directory / "model.safetensors").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[:-100])
    with pytest.raises(CheckpointError, match=r"cut.safetensors: truncated: its header needs \d+ bytes"):
        open_checkpoint(tmp_path / "cut.safetensors")
    (tmp_path / "index").mkdir()
    (tmp_path / "index" / ckpt.INDEX).write_text(json.dumps({"weight_map": {"a": "gone.safetensors"}}))
    with pytest.raises(CheckpointError, match=r"names shard\(s\) that do not exist: gone.safetensors"):
        open_checkpoint(tmp_path / "index")


def test_linked_shards_are_copied_and_their_targets_left_alone(variant, tmp_path):
    directory, _ = variant
    blobs, snapshot = tmp_path / "blobs", tmp_path / "snapshot"  # the layout of the Hugging Face cache
    shutil.copytree(directory, blobs)
    snapshot.mkdir()
    for path in blobs.iterdir():
        (snapshot / path.name).symlink_to(path)
    before = digest(blobs)
    result = reconcile_checkpoint(snapshot, tmp_path / "out")
    assert result.requantized and digest(blobs) == before
    assert not any(path.is_symlink() for path in (tmp_path / "out").iterdir())
    assert inspect_checkpoint(tmp_path / "out").consistent
