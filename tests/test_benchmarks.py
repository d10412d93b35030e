"""The benchmark runs end to end on a tiny size and writes its report (no timing is asserted)."""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks import run


@pytest.mark.slow
def test_quick_benchmark_writes_every_row(tmp_path, capsys):
    out = tmp_path / "RESULTS.md"
    # without the peer: quantizing its models was most of this test's time; the rows are the same code
    assert run.main(["--quick", "--no-peer", "--out", str(out)]) == 0
    text = out.read_text()
    for step in ("discovery", "attach", "populate", "populate again", "ungrouped global amax", "state_dict", "restore",
                 "core finalize", "core unify_state_dict"):
        assert re.search(rf"^\| {re.escape(step)} \| \d", text, re.M), f"missing lifecycle row {step!r}"
    for case in ("float32 axis=None", "float32 per-row", "float32 per-column", "bfloat16 axis=None", "bfloat16 per-row",
                 "bfloat16 per-column", "float8_e4m3fn axis=None"):
        assert f"| {case} |" in text, f"missing reduce_amax row {case!r}"
    for case in ("nvfp4_quantize bf16 256x256", "requantize 256x256, shared scale 2.5x"):
        assert f"| {case} | " in text, f"missing NVFP4 row {case!r}"
    assert (tmp_path / "RESULTS.png").stat().st_size > 0
    assert "torch " in text and "machine:" in text
    assert "## Earlier runs, host comparisons and notes" in text  # HISTORY.md, kept by hand, follows the tables


def test_gpu_mode_refuses_without_cuda(tmp_path, capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is present: --gpu would run")
    assert run.main(["--gpu", "--out", str(tmp_path / "R.md")]) == 2
    assert "no CUDA device" in capsys.readouterr().err
    assert not (tmp_path / "R.md").exists()


def test_float8_child_reports_time_and_memory_of_one_side():
    from benchmarks import reductions

    measured = reductions._float8_child("ours", 1 << 20, 1, "cpu")
    assert measured["seconds"] > 0
    assert 0 <= measured["extra_mib"] < 64  # read as bytes: no wide copy of the input


def test_make_bench_recipe_starts_the_benchmark(tmp_path):
    """The command ``make bench`` runs gets as far as its argument checks (``--gpu`` on a CPU machine)."""
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is present: --gpu would run the full benchmark")
    root = Path(__file__).resolve().parents[1]
    recipe = re.search(r"^bench:.*\n\t(.+)$", (root / "Makefile").read_text(), re.M).group(1)
    command = shlex.split(recipe.replace("$(BIN)/python", shlex.quote(sys.executable)))
    done = subprocess.run([*command, "--gpu", "--out", str(tmp_path / "R.md")], cwd=root, capture_output=True, text=True)
    assert done.returncode == 2, done.stderr
    assert "no CUDA device" in done.stderr
