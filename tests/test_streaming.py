"""reconcile's streaming side: copies by the kernel in the background, a byte progress bar, --quiet, --device."""

import io
import os
import shutil
import sys
import threading
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from sharedquant.adapters import checkpoint as ckpt
from sharedquant.adapters import copying
from sharedquant.adapters.checkpoint import inspect_checkpoint
from sharedquant.adapters.rewrite import reconcile_checkpoint, resolve_device
from sharedquant.adapters.cli import ByteBar, main
from sharedquant.core import reconcile

from _sharded import write_sharded  # pytest puts tests/ on sys.path (it has no __init__.py)


class Terminal(io.StringIO):
    def isatty(self):
        return True


@pytest.fixture(scope="module")
def sharded(tmp_path_factory):
    return write_sharded(tmp_path_factory.mktemp("streaming") / "ckpt")


def test_progress_counts_every_byte_copied_and_requantized_in_phase_order(sharded, tmp_path):
    calls = []
    result = reconcile_checkpoint(sharded, tmp_path / "out", device="cpu", progress=lambda *call: calls.append(call))
    copied = sum(file.stat().st_size for file in sharded.iterdir())
    state = load_file(sharded / "model-00001-of-00003.safetensors")
    member = sum(state[f"model.layers.0.self_attn.k_proj.{suffix}"].nbytes for suffix in ("weight", "weight_scale"))
    changed = sum(member * (1024 if "mlp" in fqn else 128) // 128 for fqn in result.requantized)
    assert len(result.requantized) == 12 and {call[2] for call in calls} == {copied + changed}
    assert [call[1] for call in calls] == sorted(call[1] for call in calls)
    assert calls[-1] == ("verify", copied + changed, copied + changed)
    assert {call[0] for call in calls} == {"copy", "requantize", "verify"}


def test_inspect_progress_goes_over_the_headers_then_the_scales(sharded):
    calls = []
    inspect_checkpoint(sharded, progress=lambda *call: calls.append(call))
    size = sum(file.stat().st_size for file in sharded.glob("*.safetensors"))
    assert [call for call in calls if call[0] == "headers"][-1] == ("headers", size, size)
    assert calls[-1] == ("scales", size, size) and len([call for call in calls if call[0] == "headers"]) == 3


def test_no_bar_off_a_terminal_and_none_with_quiet(sharded, tmp_path, capsys, monkeypatch):
    assert main(["reconcile", str(sharded), "--out", str(tmp_path / "plain")]) == 0
    assert capsys.readouterr().err == ""  # pytest's stderr is no terminal, as in CI
    terminal = Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    assert main(["reconcile", str(sharded), "--out", str(tmp_path / "shown")]) == 0
    assert "reconcile: verify" in terminal.getvalue() and "\r" in terminal.getvalue()
    quiet = Terminal()
    monkeypatch.setattr(sys, "stderr", quiet)
    assert main(["reconcile", str(sharded), "--out", str(tmp_path / "quiet"), "--quiet"]) == 0
    assert main(["inspect", str(sharded), "--quiet"]) == 1
    assert quiet.getvalue() == ""


def test_the_bar_restarts_when_a_phase_goes_over_the_bytes_again():
    stream = Terminal()
    bar = ByteBar(stream, "inspect", quiet=False, leave=True)
    bar("headers", 100, 100)
    bar("scales", 10, 100)
    assert bar.bar.n == 10 and bar.bar.total == 100 and "inspect: scales" in bar.bar.desc
    bar.close()


def test_output_shards_are_files_of_their_own_even_from_links(sharded, tmp_path):
    repo = tmp_path / "models--org--name"  # the Hugging Face cache's layout: snapshot files link into blobs
    blobs, linked = repo / "blobs", repo / "snapshots" / "0123abc"
    shutil.copytree(sharded, blobs)
    linked.mkdir(parents=True)
    for file in blobs.iterdir():
        (linked / file.name).symlink_to(Path("../..") / "blobs" / file.name)
    before = {file.name: file.read_bytes() for file in blobs.iterdir()}
    reconcile_checkpoint(linked, tmp_path / "out", device="cpu")
    for file in (tmp_path / "out").iterdir():
        assert not file.is_symlink() and file.stat().st_nlink == 1 and file.stat().st_ino != (blobs / file.name).stat().st_ino
    assert {file.name: file.read_bytes() for file in blobs.iterdir()} == before
    assert inspect_checkpoint(tmp_path / "out").consistent


def test_a_copy_that_fails_leaves_nothing_and_is_reported(sharded, tmp_path, monkeypatch):
    real = copying.copy_file

    def failing(source, target, meter, stop):
        if source.name.startswith("model-00002"):
            raise OSError(28, "No space left on device", str(target))
        real(source, target, meter, stop)

    monkeypatch.setattr(copying, "copy_file", failing)
    with pytest.raises(OSError, match="No space left"):
        reconcile_checkpoint(sharded, tmp_path / "out", device="cpu")
    assert list(tmp_path.iterdir()) == []


def test_copy_file_falls_back_where_sendfile_is_refused(tmp_path, monkeypatch):
    source = tmp_path / "a"
    source.write_bytes(os.urandom(3 << 20))

    def refused(*args):
        raise OSError(22, "Invalid argument")

    monkeypatch.setattr(os, "sendfile", refused)
    meter = copying.Meter(None, 3 << 20)
    copying.copy_file(source, tmp_path / "b", meter)
    assert (tmp_path / "b").read_bytes() == source.read_bytes() and meter.done == 3 << 20


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_device_cuda_without_a_gpu_is_refused(sharded, tmp_path, capsys):
    assert resolve_device("auto") == torch.device("cpu")
    status = main(["reconcile", str(sharded), "--out", str(tmp_path / "out"), "--device", "cuda"])
    err = capsys.readouterr().err
    assert status == 2 and "--device cuda" in err and "no CUDA device" in err and not (tmp_path / "out").exists()


def test_requantization_runs_on_the_device_asked_for(sharded, tmp_path, monkeypatch):
    devices, requantize = set(), reconcile.requantize

    def spy(packed, block_scale, scale_2, shared_scale_2):
        devices.add(packed.device.type)
        return requantize(packed, block_scale, scale_2, shared_scale_2)

    monkeypatch.setattr(reconcile, "requantize", spy)
    reconcile_checkpoint(sharded, tmp_path / "cpu", device="cpu")
    assert devices == {"cpu"}
    if torch.cuda.is_available():
        devices.clear()
        reconcile_checkpoint(sharded, tmp_path / "cuda", device="cuda")
        assert devices == {"cuda"}
        for file in (tmp_path / "cpu").iterdir():
            assert file.read_bytes() == (tmp_path / "cuda" / file.name).read_bytes()


def test_a_cancelled_copy_stops_between_chunks(tmp_path):
    source, stop = tmp_path / "a", threading.Event()
    source.write_bytes(b"x" * 1024)
    stop.set()
    with pytest.raises(InterruptedError, match="copy stopped"):
        copying.copy_file(source, tmp_path / "b", copying.Meter(None, 1024), stop)
