"""The ``sharedquant`` command under hostile input and interruption.

Every case starts from a real checkpoint (the tiny Llama quantized without sharing, as
in test_cli.py), breaks it one way, and asserts: the exit status, one line on stderr
without a traceback, nothing written, and every byte under the test's directory as it
was. Signals go to a real subprocess, caught mid-run by waiting for its staging
directory to appear. None of this needs the peer.
"""

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from sharedquant.adapters import checkpoint as ckpt
from sharedquant.adapters import rewrite
from sharedquant.adapters import staging
from sharedquant.adapters.cli import main
from sharedquant.adapters.demo import quantize_unshared, skew_siblings_
from sharedquant.adapters.models import tiny_llama

ATTN = "model.layers.0.self_attn"
SHARDS = ("model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors")


@pytest.fixture(scope="module")
def state():
    """A one-layer Llama quantized without sharing: both of its groups are mismatched."""
    return quantize_unshared(skew_siblings_(tiny_llama(num_layers=1)))


def tree(root: Path) -> dict[str, str]:
    """Every entry under ``root``: file contents hashed, links by target, directories by name."""
    entries = {}
    for path in sorted(root.rglob("*")):
        name = str(path.relative_to(root))
        if path.is_symlink():
            entries[name] = f"link -> {os.readlink(path)}"
        elif path.is_dir():
            entries[name] = "dir"
        else:
            entries[name] = hashlib.sha256(path.read_bytes()).hexdigest()
    return entries


def sharded(state: dict, directory: Path, names=SHARDS) -> Path:
    """``state`` as two shards named ``names`` (relative to ``directory``) and an index."""
    directory.mkdir(parents=True, exist_ok=True)
    second = {key for key in state if ".k_proj." in key}
    for name, part in zip(names, ({k: v for k, v in state.items() if k not in second}, {k: state[k] for k in second})):
        (directory / name).parent.mkdir(parents=True, exist_ok=True)
        save_file(part, directory / name)
    weight_map = {key: names[key in second] for key in sorted(state)}
    (directory / ckpt.INDEX).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return directory


def run(capsys, *argv):
    status = main([str(arg) for arg in argv])
    out, err = capsys.readouterr()
    return status, out, err


# --- malformed checkpoints: each returns (path to give the command, text the error must contain)


def outside_relative(state, tmp):
    sharded(state, tmp / "ckpt", (SHARDS[0], "../elsewhere/model-00002.safetensors"))
    return tmp / "ckpt", "'../elsewhere/model-00002.safetensors' is not a plain relative file name"


def outside_absolute(state, tmp):
    target = str(tmp / "elsewhere" / "model-00002.safetensors")
    sharded(state, tmp / "ckpt", (SHARDS[0], target))
    return tmp / "ckpt", f"{target!r} is not a plain relative file name"


def nested_escape(state, tmp):
    (tmp / "ckpt" / "sub").mkdir(parents=True)
    sharded(state, tmp / "ckpt", (SHARDS[0], "sub/../../elsewhere/x.safetensors"))
    return tmp / "ckpt", "'sub/../../elsewhere/x.safetensors' is not a plain relative file name"


def dot_slash(state, tmp):
    sharded(state, tmp / "ckpt", (SHARDS[0], "./" + SHARDS[1]))
    return tmp / "ckpt", f"'./{SHARDS[1]}' is not a plain relative file name"


def symlink_outside(state, tmp):
    sharded(state, tmp / "elsewhere")
    sharded(state, tmp / "ckpt")
    (tmp / "ckpt" / SHARDS[1]).unlink()
    (tmp / "ckpt" / SHARDS[1]).symlink_to(tmp / "elsewhere" / SHARDS[1])
    return tmp / "ckpt", f"shard '{SHARDS[1]}' resolves to {tmp / 'elsewhere' / SHARDS[1]}, outside"


def symlinked_subdirectory_outside(state, tmp):
    sharded(state, tmp / "elsewhere" / "sub", (SHARDS[0], SHARDS[1]))
    (tmp / "ckpt").mkdir()
    (tmp / "ckpt" / "sub").symlink_to(tmp / "elsewhere" / "sub")
    sharded(state, tmp / "ckpt", (SHARDS[0], "sub/" + SHARDS[1]))
    return tmp / "ckpt", "outside"


def single_file_and_index(state, tmp):
    sharded(state, tmp / "ckpt")
    save_file(state, tmp / "ckpt" / ckpt.SINGLE)
    return tmp / "ckpt", f"holds both {ckpt.SINGLE} and {ckpt.INDEX}"


def mixed_scale_dtypes(state, tmp):
    # q_proj's fp32 scale is the group's largest and has no exact fp16 form; k and v store fp16
    changed = dict(state)
    for role in ("k_proj", "v_proj"):
        changed[f"{ATTN}.{role}.weight_scale_2"] = state[f"{ATTN}.{role}.weight_scale_2"].half()
    q = f"{ATTN}.q_proj.weight_scale_2"
    changed[q] = torch.tensor(1.0001 * max(state[f"{ATTN}.{r}.weight_scale_2"].item() for r in ("q_proj", "k_proj")))
    (tmp / "ckpt").mkdir()
    save_file(changed, tmp / "ckpt" / ckpt.SINGLE)
    return tmp / "ckpt", f"'{ATTN}.k_proj.weight_scale_2' is stored as F16, which cannot hold"


def leftover_staging(state, tmp):
    (tmp / ".out.abc.partial").mkdir()
    save_file(state, tmp / ".out.abc.partial" / ckpt.SINGLE)
    (tmp / ".out.abc.partial" / staging.MARKER).write_text('{"pid": 1, "host": "elsewhere"}')
    return tmp / ".out.abc.partial", "an unfinished reconcile staging directory"


def core_message(state, tmp):
    changed = {**state, f"{ATTN}.k_proj.weight_scale_2": torch.tensor(-1.0)}
    (tmp / "ckpt").mkdir()
    save_file(changed, tmp / "ckpt" / ckpt.SINGLE)
    return tmp / "ckpt", f"ckpt: '{ATTN}.k_proj' has a weight_scale_2 of -1.0"


def nan_block_scale(state, tmp):
    blocks = state[f"{ATTN}.k_proj.weight_scale"].clone()
    blocks.view(torch.uint8)[0, 0] = 0x7F  # float8_e4m3fn's NaN
    (tmp / "ckpt").mkdir()
    save_file({**state, f"{ATTN}.k_proj.weight_scale": blocks}, tmp / "ckpt" / ckpt.SINGLE)
    return tmp / "ckpt", f"ckpt: '{ATTN}.k_proj': the member's dequantized weights are not finite"


# inspect reads no block scale, and reports a group of mixed dtypes as mismatched, rightly
RECONCILE_ONLY = (mixed_scale_dtypes, nan_block_scale)  # inspect reports such a group as mismatched, rightly
BAD = [outside_relative, outside_absolute, nested_escape, dot_slash, symlink_outside, symlinked_subdirectory_outside,
       single_file_and_index, mixed_scale_dtypes, leftover_staging, core_message, nan_block_scale]  # fmt: skip


@pytest.mark.parametrize("make", BAD, ids=[make.__name__ for make in BAD])
def test_malformed_input_exits_2_in_one_line_and_writes_nothing(state, tmp_path, capsys, make):
    path, message = make(state, tmp_path)
    before = tree(tmp_path)
    commands = [["inspect", path], ["reconcile", path, "--out", tmp_path / "out"]]
    for command in commands[make in RECONCILE_ONLY :]:
        status, out, err = run(capsys, *command)
        assert (status, out) == (2, "") and message in err, err
        assert err.count("\n") == 1 and "Traceback" not in err and "report_groups" not in err
        assert err.startswith(f"sharedquant {command[0]}: error: {path}")
    assert tree(tmp_path) == before


def test_debug_shows_the_traceback(state, tmp_path, capsys):
    path, _ = single_file_and_index(state, tmp_path)
    status, _, err = run(capsys, "inspect", path, "--debug")
    assert status == 2 and "Traceback" in err and err.splitlines()[-1].startswith("sharedquant inspect: error: ")


def test_a_defect_is_one_line_and_exit_3(state, tmp_path, capsys, monkeypatch):
    (tmp_path / "ckpt").mkdir()
    save_file(state, tmp_path / "ckpt" / ckpt.SINGLE)

    def broken(*args, **kwargs):
        raise RuntimeError("simulated defect")

    monkeypatch.setattr("sharedquant.core.reconcile.requantize", broken)
    before = tree(tmp_path)
    status, _, err = run(capsys, "reconcile", tmp_path / "ckpt", "--out", tmp_path / "out")
    assert status == 3 and err.count("\n") == 1 and "internal error (RuntimeError" in err and "simulated" in err
    assert tree(tmp_path) == before


# --- layouts that are legal and must keep working


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64], ids=str)
def test_per_tensor_scales_in_their_own_dtype_are_read_exactly_and_written_back_so(state, tmp_path, capsys, dtype):
    scales = {k: v.to(dtype) for k, v in state.items() if k.endswith(("weight_scale_2", "input_scale"))}
    (tmp_path / "ckpt").mkdir()
    save_file({**state, **scales}, tmp_path / "ckpt" / ckpt.SINGLE)
    status, out, err = run(capsys, "reconcile", tmp_path / "ckpt", "--out", tmp_path / "out")
    assert (status, err) == (0, "") and "requantized" in out
    written = load_file(tmp_path / "out" / ckpt.SINGLE)
    for role in ("q_proj", "k_proj", "v_proj"):
        key = f"{ATTN}.{role}.weight_scale_2"
        assert written[key].dtype == dtype
        assert written[key] == max(scales[f"{ATTN}.{r}.weight_scale_2"] for r in ("q_proj", "k_proj", "v_proj"))
    assert run(capsys, "inspect", tmp_path / "out")[0] == 0


def test_nested_shard_names_inside_the_directory_are_read_and_written(state, tmp_path, capsys):
    path = sharded(state, tmp_path / "ckpt", ("a/" + SHARDS[0], "b/c/" + SHARDS[1]))
    assert run(capsys, "reconcile", path, "--out", tmp_path / "out")[0] == 0
    assert (tmp_path / "out" / "b" / "c" / SHARDS[1]).is_file() and run(capsys, "inspect", tmp_path / "out")[0] == 0


def test_a_hugging_face_cache_snapshot_links_into_blobs_and_those_stay_untouched(state, tmp_path, capsys):
    repo = tmp_path / "models--org--tiny"
    sharded(state, repo / "blobs")
    (repo / "snapshots" / "abc123").mkdir(parents=True)
    for path in (repo / "blobs").iterdir():
        (repo / "snapshots" / "abc123" / path.name).symlink_to(Path("../../blobs") / path.name)
    before = tree(repo)
    assert run(capsys, "reconcile", repo / "snapshots" / "abc123", "--out", tmp_path / "out")[0] == 0
    assert tree(repo) == before and not any(p.is_symlink() for p in (tmp_path / "out").iterdir())


def test_patterns_before_path_and_repeated(state, tmp_path, capsys):
    (tmp_path / "ckpt").mkdir()
    save_file(state, tmp_path / "ckpt" / ckpt.SINGLE)
    mlp, attention = r"(?:(.*)\.)?(?:gate_proj|up_proj)", r"(?:(.*)\.)?(?:q_proj|k_proj|v_proj)"
    status, out, _ = run(capsys, "inspect", "--json", "--patterns", mlp, tmp_path / "ckpt")
    assert status == 1 and [g["parent"] for g in json.loads(out)["groups"]] == ["model.layers.0.mlp"]
    status, out, _ = run(capsys, "inspect", "--patterns", mlp, "--patterns", attention, tmp_path / "ckpt", "--json")
    assert len(json.loads(out)["groups"]) == 2
    status, _, err = run(capsys, "inspect", tmp_path / "ckpt", "--patterns", mlp, r"(.*)\.typo_proj")
    assert status == 2 and r"--patterns '(.*)\\.typo_proj' matches no quantized module" in err
    status, _, err = run(capsys, "inspect", "--patterns", mlp)
    assert status == 2 and "the following arguments are required: PATH" in err


# --- killed runs' leftovers


def test_a_killed_runs_staging_directory_is_removed_by_the_next_run_and_a_live_ones_kept(state, tmp_path, capsys):
    (tmp_path / "ckpt").mkdir()
    save_file(state, tmp_path / "ckpt" / ckpt.SINGLE)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    leftovers = {}
    for name, pid in (("dead", int(dead.stdout)), ("alive", os.getppid())):
        leftovers[name] = tmp_path / f".out.{name}.partial"
        leftovers[name].mkdir()
        (leftovers[name] / ckpt.SINGLE).write_bytes(b"x" * 1000)
        (leftovers[name] / staging.MARKER).write_text(json.dumps({"pid": pid, "host": staging.socket.gethostname()}))
    assert run(capsys, "reconcile", tmp_path / "ckpt", "--out", tmp_path / "out")[0] == 0
    assert not leftovers["dead"].exists() and leftovers["alive"].is_dir()
    assert not (tmp_path / "out" / staging.MARKER).exists()


# --- signals to a real process, caught mid-run


@pytest.fixture(scope="module")
def big(state, tmp_path_factory):
    """The real fixture grown to ~40 MB: one more attention layer of 1024x2048 and a 32 MB tensor.

    Its codes and block scales are random bytes (quantizing real weights this size takes
    half a minute); k and v get other scales than q, so reconcile requantizes them.
    """
    generator = torch.Generator().manual_seed(0)
    grown = dict(state)
    for layer in (1,):
        for factor, role in enumerate(("q_proj", "k_proj", "v_proj"), start=2):
            fqn = f"model.layers.{layer}.self_attn.{role}"
            grown[f"{fqn}.weight"] = torch.randint(0, 256, (1024, 1024), dtype=torch.uint8, generator=generator)
            block = torch.rand(1024, 128, generator=generator) * 400 + 1
            grown[f"{fqn}.weight_scale"] = block.to(torch.float8_e4m3fn)
            grown[f"{fqn}.weight_scale_2"] = torch.tensor(1e-4 * (5 - factor))
    grown["model.filler"] = torch.rand(8 << 20, generator=generator)
    directory = tmp_path_factory.mktemp("big") / "ckpt"
    directory.mkdir()
    save_file(grown, directory / ckpt.SINGLE)
    return directory


def start(source: Path, out: Path) -> subprocess.Popen:
    command = [sys.executable, "-m", "sharedquant.adapters.cli", "reconcile", str(source), "--out", str(out)]
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.fixture(scope="module")
def interrupted(big, tmp_path_factory):
    """Three reconciles of ``big`` started at once (the start-up is most of their cost), each hit by
    its signal as soon as its staging directory appears. Returns, per signal: the directory its
    ``--out`` lay in, the input's tree before, the staging directory seen, status, stdout, stderr."""
    before = tree(big)
    runs = {}
    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGKILL):
        parent = tmp_path_factory.mktemp(signal.Signals(signum).name)
        runs[signum] = {"parent": parent, "process": start(big, parent / "out"), "partial": None}
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline and any(job["partial"] is None for job in runs.values()):
        for signum, job in runs.items():
            if job["partial"] is None and job["process"].poll() is None:
                found = [p for p in job["parent"].glob(".out.*.partial") if (p / staging.MARKER).is_file()]
                if found:
                    job["partial"] = found[0]
                    job["process"].send_signal(signum)
            elif job["partial"] is None:
                job["partial"] = False  # ended before it was caught: the test says so
        time.sleep(0.002)
    for job in runs.values():
        if job["partial"] is None:
            job["process"].kill()
        job["out"], job["err"] = job["process"].communicate(timeout=120)
        job["status"], job["before"] = job["process"].returncode, before
    return runs


@pytest.mark.parametrize(("signum", "status"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)], ids=["INT", "TERM"])
def test_sigint_and_sigterm_end_in_one_line_and_leave_nothing(big, interrupted, signum, status):
    job = interrupted[signum]
    assert job["partial"], f"reconcile ended before its staging directory was seen: {job['err']}"
    assert job["status"] == status, job["err"]
    assert job["err"] == f"sharedquant reconcile: interrupted by {signal.Signals(signum).name}\n" and job["out"] == ""
    assert list(job["parent"].iterdir()) == [] and tree(big) == job["before"]


def test_after_sigkill_the_leftover_is_refused_as_input_and_removed_by_the_next_run(big, interrupted, capsys):
    job = interrupted[signal.SIGKILL]
    partial, parent = job["partial"], job["parent"]
    assert partial and job["status"] == -signal.SIGKILL, job
    assert partial.is_dir() and (partial / staging.MARKER).is_file()
    assert run(capsys, "inspect", partial)[:2] == (2, "")
    status, _, err = run(capsys, "reconcile", big, "--out", parent / "out")
    assert status == 0, err
    assert [p.name for p in parent.iterdir()] == ["out"] and run(capsys, "inspect", parent / "out")[0] == 0


# --- atomicity: --out is at every moment absent, the old one, or the complete new one


def observe(out: Path) -> dict[str, str] | None:
    """One consistent look at ``out``: read through a descriptor of one directory, kept only if
    ``out`` still names that directory afterwards (a renamed-away old one may be being deleted)."""
    try:
        fd = os.open(out, os.O_RDONLY | os.O_DIRECTORY)
    except FileNotFoundError:
        return {}
    try:
        seen = {}
        for name in os.listdir(fd):
            with open(os.open(name, os.O_RDONLY, dir_fd=fd), "rb") as handle:
                seen[name] = hashlib.sha256(handle.read()).hexdigest()
        return seen if os.stat(out).st_ino == os.fstat(fd).st_ino else None
    except (FileNotFoundError, IsADirectoryError):
        return None
    finally:
        os.close(fd)


def watch_force_reconcile(source: Path, out: Path, monkeypatch) -> tuple[dict, dict, list[dict]]:
    """Reconcile ``source`` over an existing ``out`` with --force while a thread looks at ``out``.

    Each byte patch is slowed down, so that the states between the copy and the finished
    output last long enough for the watcher to see them, however fast the requantization.
    """
    shutil.copytree(source, out)  # the "old output": any complete directory that differs from both
    (out / "stale.txt").write_text("the previous run's output")
    patch = rewrite._Writer.patch

    def slow_patch(self, key, tensor):
        time.sleep(0.01)
        patch(self, key, tensor)

    monkeypatch.setattr(rewrite._Writer, "patch", slow_patch)
    old, seen, done, looking = tree(out), [], threading.Event(), threading.Event()

    def watcher():
        while not done.is_set():
            if (look := observe(out)) is not None:
                seen.append(look)
                looking.set()

    thread = threading.Thread(target=watcher)
    thread.start()
    looking.wait(10)  # a fast reconcile could otherwise finish before the watcher's first look
    try:
        rewrite.reconcile_checkpoint(source, out, force=True)
    finally:
        done.set()
        thread.join()
    return old, tree(out), seen


def test_force_replaces_out_atomically(big, tmp_path, monkeypatch):
    old, new, seen = watch_force_reconcile(big, tmp_path / "out", monkeypatch)
    assert old != new and seen
    assert all(look in ({}, old, new) for look in seen)


def test_the_atomicity_check_catches_a_writer_that_writes_straight_into_out(big, tmp_path, monkeypatch):
    import contextlib

    @contextlib.contextmanager
    def in_place(out, mode_from):  # the writer this guards against: remove the old out, write into it
        shutil.rmtree(out)
        out.mkdir()
        yield out

    monkeypatch.setattr(ckpt, "staging_directory", in_place)
    monkeypatch.setattr(ckpt, "move_into_place", lambda staging, out: None)
    old, new, seen = watch_force_reconcile(big, tmp_path / "out", monkeypatch)
    assert any(look not in ({}, old, new) for look in seen)
