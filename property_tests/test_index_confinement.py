"""Reconcile never writes outside ``--out``, whatever the index names: every shard layout either works
(plain and nested names, links that stay inside) or is refused, and the tree beside ``--out`` is unchanged."""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

from sharedquant.adapters.checkpoint import INDEX, CheckpointError, inspect_checkpoint
from sharedquant.adapters.rewrite import reconcile_checkpoint
from sharedquant.adapters.demo import quantize_unshared, skew_siblings_
from sharedquant.adapters.models import tiny_llama

STATE = quantize_unshared(skew_siblings_(tiny_llama(num_layers=1)))
# How a shard is named in the index, and where its file really is. Legal kinds must work.
LEGAL = ("plain", "nested", "link_inside")
ILLEGAL = ("dot_slash", "dot_dot_inside", "escaping", "absolute", "link_outside", "linked_directory_outside")


def place(base: Path, root: Path, kind: str, i: int) -> tuple[str, Path]:
    """The index name for shard ``i`` of kind ``kind``, and the path its bytes must be written to."""
    outside = base / "outside" / f"s{i}.safetensors"
    if kind == "plain":
        return f"s{i}.safetensors", root / f"s{i}.safetensors"
    if kind == "nested":
        return f"d{i}/e/s{i}.safetensors", root / f"d{i}/e/s{i}.safetensors"
    if kind == "dot_slash":
        return f"./s{i}.safetensors", root / f"s{i}.safetensors"
    if kind == "dot_dot_inside":
        (root / f"d{i}").mkdir(parents=True, exist_ok=True)
        return f"d{i}/../s{i}.safetensors", root / f"s{i}.safetensors"
    if kind == "escaping":
        return f"../outside/s{i}.safetensors", outside
    if kind == "absolute":
        return str(outside), outside
    if kind in ("link_inside", "link_outside"):
        real = root / "real" / f"s{i}.safetensors" if kind == "link_inside" else outside
        (root / f"s{i}.safetensors").symlink_to(real)
        return f"s{i}.safetensors", real
    (root / f"ln{i}").symlink_to(base / "outside", target_is_directory=True)  # linked_directory_outside
    return f"ln{i}/s{i}.safetensors", outside


def snapshot(base: Path) -> dict[str, str]:
    """Every file, link and directory under ``base`` except ``out`` and its staging directories."""
    seen = {}
    for folder, directories, files in os.walk(base):
        directories[:] = [d for d in directories if not (folder == str(base) and d.startswith(("out", ".out.")))]
        for name in directories + files:
            path = Path(folder) / name
            if path.is_symlink():
                seen[str(path)] = "link " + os.readlink(path)
            elif path.is_file():
                seen[str(path)] = hashlib.sha256(path.read_bytes()).hexdigest()
            else:
                seen[str(path)] = "dir"
    return seen


@settings(max_examples=25)
@given(st.lists(st.sampled_from(LEGAL + ILLEGAL), min_size=2, max_size=2), st.booleans())
def test_reconcile_writes_only_under_out_and_takes_exactly_the_legal_layouts(kinds, single_shard_for_k):
    with tempfile.TemporaryDirectory() as scratch:
        base = Path(scratch)
        root, out = base / "ckpt", base / "out"
        (base / "outside").mkdir()
        root.mkdir()
        parts = [{}, {}]
        for position, (key, value) in enumerate(sorted(STATE.items())):
            parts[(".k_proj." in key) if single_shard_for_k else position % 2][key] = value
        weight_map = {}
        for i, (kind, part) in enumerate(zip(kinds, parts)):
            name, real = place(base, root, kind, i)
            real.parent.mkdir(parents=True, exist_ok=True)
            save_file(part, real)
            weight_map.update(dict.fromkeys(part, name))
        (root / INDEX).write_text(json.dumps({"weight_map": weight_map}))
        before = snapshot(base)
        try:
            reconcile_checkpoint(root, out)
        except CheckpointError:
            assert any(kind in ILLEGAL for kind in kinds)
            assert not out.exists()
        else:
            assert all(kind in LEGAL for kind in kinds)
            assert inspect_checkpoint(out).consistent
            assert not any(path.is_symlink() for path in out.rglob("*"))
        assert snapshot(base) == before
        assert [p.name for p in base.iterdir() if p.name.startswith(".out.")] == []
