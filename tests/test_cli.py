"""The ``sharedquant`` command line: tables, JSON, exit statuses, bad input, progress."""

import io
import json
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from sharedquant.adapters.cli import Progress, main
from sharedquant.adapters.demo import quantize_unshared, skew_siblings_
from sharedquant.adapters.models import tiny_llama

K_PROJ = "model.layers.0.self_attn.k_proj"


@pytest.fixture(scope="module")
def unshared(tmp_path_factory):
    """A one-layer Llama quantized without sharing: its k_proj group is mismatched (ratio ~2.2)."""
    directory = tmp_path_factory.mktemp("cli") / "unshared"
    directory.mkdir()
    save_file(quantize_unshared(skew_siblings_(tiny_llama(num_layers=1))), directory / "model.safetensors")
    (directory / "config.json").write_text('{"architectures": ["LlamaForCausalLM"]}')
    return directory


def run(capsys, *argv):
    status = main([str(arg) for arg in argv])
    out, err = capsys.readouterr()
    return status, out, err


def test_inspect_prints_a_table_and_exits_1_when_a_group_is_mismatched(unshared, capsys):
    status, out, err = run(capsys, "inspect", unshared, "--all")
    assert status == 1 and err == ""
    lines = out.splitlines()
    assert lines[0].split() == ["group", "member", "weight_scale_2", "input_scale", "ratio", "input", "ratio", "status"]
    attention = next(line for line in lines if line.startswith("model.layers.0.self_attn"))
    assert "MISMATCH" in attention and float(attention.split()[-3].rstrip("x")) > 2
    assert lines[-1].startswith("2 fused groups, 0 consistent, 2 mismatched (worst ")


def test_inspect_json_carries_the_same_content(unshared, capsys):
    status, out, _ = run(capsys, "inspect", unshared, "--json")
    report = json.loads(out)
    assert status == 1 and report["format"] == "modelopt" and report["scale_key"] == "weight_scale_2"
    attention = next(g for g in report["groups"] if g["parent"] == "model.layers.0.self_attn")
    scales = {m["name"]: m["scale"] for m in attention["members"]}
    state = load_file(unshared / "model.safetensors")
    assert scales == {name: state[f"{name}.weight_scale_2"].item() for name in scales}
    assert attention["ratio"] == max(scales.values()) / min(scales.values()) and not attention["consistent"]
    assert report["summary"] == {"groups": 2, "consistent": 0, "mismatched": 2, "worst_ratio": attention["ratio"]}


def test_reconcile_then_inspect_exits_0(unshared, tmp_path, capsys):
    status, out, err = run(capsys, "reconcile", unshared, "--out", tmp_path / "fixed")
    assert status == 0 and err == ""  # no progress bar for a short run off a terminal
    assert f"requantized {K_PROJ}: " in out and out.splitlines()[-1].endswith(f"written to {tmp_path / 'fixed'}")
    assert (tmp_path / "fixed" / "config.json").read_text() == (unshared / "config.json").read_text()
    status, out, _ = run(capsys, "inspect", tmp_path / "fixed")
    assert status == 0 and out.splitlines()[-1].startswith("2 fused groups, 2 consistent, 0 mismatched")


def test_dry_run_prints_the_changes_and_writes_nothing(unshared, tmp_path, capsys):
    status, out, _ = run(capsys, "reconcile", unshared, "--out", tmp_path / "fixed", "--dry-run")
    assert status == 0 and f"would requantize {K_PROJ}: " in out and "dry run, nothing written" in out
    assert list(tmp_path.iterdir()) == []
    assert run(capsys, "reconcile", unshared, "--dry-run")[0] == 0


def test_patterns_replace_the_defaults(unshared, capsys):
    status, out, _ = run(capsys, "inspect", unshared, "--json", "--patterns", r"(?:(.*)\.)?(?:gate_proj|up_proj)")
    assert [g["parent"] for g in json.loads(out)["groups"]] == ["model.layers.0.mlp"]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["inspect", "{ckpt}", "--patterns", "(unclosed"], "invalid regex '(unclosed'"),
        (["reconcile", "{ckpt}"], "--out DIR is required"),
        (["frobnicate"], "invalid choice"),
    ],
)
def test_usage_errors_exit_2(unshared, capsys, argv, message):
    status, _, err = run(capsys, *[arg.format(ckpt=unshared) for arg in argv])
    assert status == 2 and message in err


def mutate(unshared, target, change):
    target.mkdir()
    state = load_file(unshared / "model.safetensors")
    change(state)
    save_file(state, target / "model.safetensors")
    return target


def bad_missing(unshared, tmp):
    return tmp / "nowhere", "no such file or directory"


def bad_unreadable(unshared, tmp):
    (tmp / "ckpt" / "model.safetensors").mkdir(parents=True)  # a directory where the file should be
    return tmp / "ckpt", "cannot read safetensors header"


def bad_empty_directory(unshared, tmp):
    (tmp / "ckpt").mkdir()
    return tmp / "ckpt", "holds neither model.safetensors nor model.safetensors.index.json"


def bad_truncated(unshared, tmp):
    (tmp / "ckpt").mkdir()
    (tmp / "ckpt" / "model.safetensors").write_bytes((unshared / "model.safetensors").read_bytes()[:-1000])
    return tmp / "ckpt", "truncated: its header needs"


def bad_corrupt(unshared, tmp):
    (tmp / "ckpt").mkdir()
    data = bytearray((unshared / "model.safetensors").read_bytes())
    data[8:40] = b"\xff" * 32  # the JSON header
    (tmp / "ckpt" / "model.safetensors").write_bytes(bytes(data))
    return tmp / "ckpt", "cannot read safetensors header"


def bad_missing_shard(unshared, tmp):
    (tmp / "ckpt").mkdir()
    shutil.copy(unshared / "model.safetensors", tmp / "ckpt" / "model-00001-of-00002.safetensors")
    weight_map = {"model.norm.weight": "model-00001-of-00002.safetensors",
                  "lm_head.weight": "model-00002-of-00002.safetensors"}  # fmt: skip
    (tmp / "ckpt" / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    return tmp / "ckpt", "names shard(s) that do not exist: model-00002-of-00002.safetensors"


def bad_index_values(unshared, tmp):
    (tmp / "ckpt").mkdir()
    (tmp / "ckpt" / "model.safetensors.index.json").write_text('{"weight_map": {"model.norm.weight": 3}}')
    return tmp / "ckpt", "not a valid safetensors index"


def bad_unknown_format(unshared, tmp):
    (tmp / "ckpt").mkdir()
    save_file({"model.norm.weight": torch.ones(4)}, tmp / "ckpt" / "model.safetensors")
    return tmp / "ckpt", "no key of a known quantized format"


def bad_block_sizes(unshared, tmp):
    def change(state):  # q_proj with blocks of 32: half as many block scales per row
        key = "model.layers.0.self_attn.q_proj.weight_scale"
        state[key] = state[key][:, ::2].contiguous()

    return mutate(unshared, tmp / "ckpt", change), "have different block sizes"


def bad_nan_scale(unshared, tmp):
    def change(state):
        state[f"{K_PROJ}.weight_scale_2"] = torch.tensor(float("nan"))

    return mutate(unshared, tmp / "ckpt", change), "has a weight_scale_2 of nan"


def bad_inf_input_scale(unshared, tmp):
    def change(state):
        state[f"{K_PROJ}.input_scale"] = torch.tensor(float("inf"))

    return mutate(unshared, tmp / "ckpt", change), "has a input_scale of inf"


BAD = [bad_missing, bad_unreadable, bad_empty_directory, bad_truncated, bad_corrupt, bad_missing_shard,
       bad_index_values, bad_unknown_format, bad_block_sizes, bad_nan_scale, bad_inf_input_scale]  # fmt: skip


@pytest.mark.parametrize("make", BAD, ids=[make.__name__ for make in BAD])
def test_bad_input_gets_one_line_and_exit_2_and_nothing_is_written(unshared, tmp_path, capsys, make):
    (tmp_path / "in").mkdir()
    path, message = make(unshared, tmp_path / "in")
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    for command in (["inspect", path], ["reconcile", path, "--out", tmp_path / "out"]):
        status, out, err = run(capsys, *command)
        assert status == 2 and out == ""
        assert err.count("\n") == 1 and err.startswith(f"sharedquant {command[0]}: error: ") and message in err
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their mode")
def test_an_unreadable_file_exits_2(unshared, tmp_path, capsys):
    shutil.copytree(unshared, tmp_path / "ckpt")
    (tmp_path / "ckpt" / "model.safetensors").chmod(0)
    status, _, err = run(capsys, "inspect", tmp_path / "ckpt")
    assert status == 2 and "Permission denied" in err


def test_an_existing_out_is_refused_without_force(unshared, tmp_path, capsys):
    (tmp_path / "out").mkdir()
    status, _, err = run(capsys, "reconcile", unshared, "--out", tmp_path / "out")
    assert status == 2 and "already exists; pass --force" in err and list((tmp_path / "out").iterdir()) == []
    assert run(capsys, "reconcile", unshared, "--out", tmp_path / "out", "--force")[0] == 0
    assert (tmp_path / "out" / "model.safetensors").is_file()


class Terminal(io.StringIO):
    def isatty(self):
        return True


def test_progress_redraws_in_place_on_a_terminal():
    stream = Terminal()
    bar = Progress(stream, "reconcile")
    bar(1, 4, "model.layers.0.self_attn.k_proj")
    bar(4, 4, "model.layers.3.mlp.up_proj")
    bar.close()
    text = stream.getvalue()
    assert text.count("\r") == 2 and "[" + "#" * 30 + "] 4/4" in text and text.endswith("\n")


def test_progress_off_a_terminal_is_silent_for_short_runs_and_prints_lines_for_long_ones():
    quiet = io.StringIO()
    bar = Progress(quiet, "reconcile")
    bar(1, 2, "a")
    bar(2, 2, "b")
    bar.close()
    assert quiet.getvalue() == ""
    long = io.StringIO()
    bar = Progress(long, "reconcile", quiet_for=0.0, every=0.0)
    bar(1, 2, "a")
    bar(2, 2, "b")
    assert long.getvalue().splitlines()[-1].startswith("reconcile: 2/2 (") and "\r" not in long.getvalue()

