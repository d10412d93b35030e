"""The README's Python examples run as written (a newcomer pastes them)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
RUNNABLE = [b for b in BLOCKS if "torch.distributed" not in b]  # the distributed one needs ranks


def test_readme_has_the_examples_it_promises():
    assert len(RUNNABLE) >= 4
    assert any("nvfp4_quantize(torch.cat" in b for b in RUNNABLE), "the fusion-guarantee snippet is missing"


@pytest.mark.parametrize("block", RUNNABLE, ids=lambda b: b.splitlines()[1][:40] if len(b.splitlines()) > 1 else "block")
def test_readme_example_runs(block, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    exec(compile(block, str(README), "exec"), {"__name__": "readme"})
    if "nvfp4_quantize(torch.cat" in block:
        assert capsys.readouterr().out.strip() == "False"  # un-shared scales do not fuse
