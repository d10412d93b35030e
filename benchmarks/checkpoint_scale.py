"""How ``sharedquant inspect`` and ``reconcile`` scale on a multi-GB sharded NVFP4 checkpoint.

Builds a synthetic Llama-8B-shaped checkpoint in the peer's HF layout (packed uint8
weights, float8 block scales, fp32 ``weight_scale_2`` / ``input_scale``) split into
shards with an index, with some fused siblings given a smaller scale, then measures:

* inspect: bytes of the tensors it asks safetensors for, and bytes the kernel read
  from disk with the shards evicted from the page cache first (``/proc/self/io``
  ``read_bytes``), both against the checkpoint's size; its wall time against reading
  exactly those scale tensors with ``safetensors.safe_open`` (cold and warm cache);
* reconcile: wall time and peak RSS of a fresh process (``ru_maxrss``) against the
  largest shard and against the RSS of a process that only imports sharedquant.

Not a test: ``python benchmarks/checkpoint_scale.py [--layers 26] [--shards 4]``.
Everything is written under ``--dir`` (default: a new directory in /tmp) and deleted
afterwards unless ``--keep``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from sharedquant.adapters import checkpoint as ckpt
from sharedquant.adapters.checkpoint import inspect_checkpoint

HIDDEN, INTERMEDIATE, KV = 4096, 14336, 1024
SHAPES = {
    "self_attn.q_proj": (HIDDEN, HIDDEN), "self_attn.k_proj": (KV, HIDDEN), "self_attn.v_proj": (KV, HIDDEN),
    "self_attn.o_proj": (HIDDEN, HIDDEN), "mlp.gate_proj": (INTERMEDIATE, HIDDEN),
    "mlp.up_proj": (INTERMEDIATE, HIDDEN), "mlp.down_proj": (HIDDEN, INTERMEDIATE),
}  # fmt: skip


def random_rows(rows: int, row: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """``rows`` copies of random rows: tiling 256 random rows keeps building 3 GB fast."""
    tile = row[torch.randint(0, row.shape[0], (256,), generator=generator)]
    return tile.repeat(-(-rows // 256), 1)[:rows].contiguous()


def layer(index: int, generator: torch.Generator, every: bool = False) -> dict[str, torch.Tensor]:
    """One decoder layer in the peer's NVFP4 layout; every 4th layer's k_proj and every 8th up_proj mismatched.

    With ``every``, each layer's k_proj and up_proj: every fused group mismatched, as a tool that
    does not fuse scales leaves them, and most members (all but the largest of each group) to requantize.
    """
    state = {}
    for name, (rows, columns) in SHAPES.items():
        prefix = f"model.layers.{index}.{name}"
        codes = torch.randint(0, 256, (512, columns // 2), dtype=torch.uint8, generator=generator)
        state[f"{prefix}.weight"] = random_rows(rows, codes, generator)
        scales = (torch.rand(512, columns // 16, generator=generator) * 400 + 8).to(torch.float8_e4m3fn)
        state[f"{prefix}.weight_scale"] = random_rows(rows, scales, generator)
        smaller = (name.endswith("k_proj") and (every or index % 4 == 0)) or (
            name.endswith("up_proj") and (every or index % 8 == 0)
        )
        state[f"{prefix}.weight_scale_2"] = torch.tensor(1e-4 / (1.7 if smaller else 1.0))
        state[f"{prefix}.input_scale"] = torch.tensor(2e-3)
    for norm in ("input_layernorm", "post_attention_layernorm"):
        state[f"model.layers.{index}.{norm}.weight"] = torch.ones(HIDDEN, dtype=torch.bfloat16)
    return state


def build(directory: Path, layers: int, shards: int, every: bool = False) -> int:
    """Write the checkpoint (``every``: see ``layer``); returns its size in bytes."""
    directory.mkdir(parents=True)
    generator = torch.Generator().manual_seed(0)
    per_shard = -(-layers // shards)
    weight_map = {}
    for shard in range(shards):
        name = f"model-{shard + 1:05d}-of-{shards:05d}.safetensors"
        state = {}
        for index in range(shard * per_shard, min(layers, (shard + 1) * per_shard)):
            state.update(layer(index, generator, every))
        if shard == shards - 1:
            state["model.norm.weight"] = torch.ones(HIDDEN, dtype=torch.bfloat16)
        save_file(state, directory / name, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(state, name))
        del state
    total = sum(p.stat().st_size for p in directory.iterdir())
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (directory / ckpt.INDEX).write_text(json.dumps(index, indent=2))
    (directory / "config.json").write_text('{"architectures": ["LlamaForCausalLM"]}')
    return total


def evict(directory: Path) -> None:
    """Drop the shards from the page cache, so the next read comes from disk."""
    for path in directory.glob("*.safetensors"):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def disk_read_bytes() -> int:
    for line in Path("/proc/self/io").read_text().splitlines():
        if line.startswith("read_bytes:"):
            return int(line.split()[1])
    return 0


def timed_inspect(directory: Path) -> tuple[float, int, int]:
    """(seconds, bytes of tensors requested, bytes read from disk) for one inspect."""
    requested = []
    real = ckpt.Checkpoint.read

    def counting(checkpoint, key):
        tensor = real(checkpoint, key)
        requested.append(tensor.numel() * tensor.element_size())
        return tensor

    ckpt.Checkpoint.read = counting
    try:
        before, start = disk_read_bytes(), time.perf_counter()
        inspection = inspect_checkpoint(directory)
        seconds = time.perf_counter() - start
    finally:
        ckpt.Checkpoint.read = real
    assert not inspection.consistent  # the benchmark's mismatches were found
    return seconds, sum(requested), disk_read_bytes() - before


def timed_baseline(directory: Path) -> float:
    """Seconds to read exactly the scale tensors with safetensors, nothing else."""
    index = json.loads((directory / ckpt.INDEX).read_text())
    by_shard: dict[str, list[str]] = {}
    for key, shard in index["weight_map"].items():
        if key.endswith((".weight_scale_2", ".input_scale")):
            by_shard.setdefault(shard, []).append(key)
    start = time.perf_counter()
    for shard, keys in by_shard.items():
        with safe_open(directory / shard, "pt") as handle:
            for key in keys:
                handle.get_tensor(key)
    return time.perf_counter() - start


def child_peak_rss(code: str) -> tuple[float, int]:
    """(seconds, peak RSS in bytes) of ``python -c code`` in a fresh process, as it reports itself."""
    # VmHWM, not ru_maxrss: Linux carries ru_maxrss over from the parent across fork + exec
    report = "\nimport re; print('peak', re.search(r'VmHWM:\\s+(\\d+)', open('/proc/self/status').read())[1])"
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", code + report], check=True, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    peak = next(line for line in done.stdout.splitlines() if line.startswith("peak "))
    return seconds, int(peak.split()[1]) * 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=26, help="decoder layers (26 = about 3.5 GB)")
    parser.add_argument("--shards", type=int, default=4)
    parser.add_argument("--dir", type=Path, default=None)
    parser.add_argument("--keep", action="store_true")
    args = parser.parse_args()
    root = args.dir or Path(tempfile.mkdtemp(prefix="sharedquant-scale-"))
    source, out = root / "checkpoint", root / "reconciled"
    try:
        start = time.perf_counter()
        total = build(source, args.layers, args.shards)
        largest = max(p.stat().st_size for p in source.glob("*.safetensors"))
        print(f"checkpoint: {total / 2**30:.2f} GiB in {args.shards} shards (largest {largest / 2**30:.2f} GiB), "
              f"built in {time.perf_counter() - start:.1f} s")  # fmt: skip
        evict(source)
        cold_base = timed_baseline(source)
        evict(source)
        cold, requested, from_disk = timed_inspect(source)
        pairs = sorted((timed_inspect(source)[0], timed_baseline(source)) for _ in range(21))  # interleaved: same load
        warm, warm_base = pairs[len(pairs) // 2][0], sorted(base for _, base in pairs)[len(pairs) // 2]
        print(f"inspect: requested {requested} B of tensors = {requested / total:.2e} of the checkpoint; "
              f"read {from_disk / 2**20:.1f} MiB from disk (cold) = {from_disk / total:.2%}")  # fmt: skip
        print(f"inspect: cold {cold * 1e3:.1f} ms vs safetensors reading the same scales {cold_base * 1e3:.1f} ms "
              f"({cold / cold_base:.2f}x); warm (median of 21) {warm * 1e3:.1f} ms vs {warm_base * 1e3:.1f} ms "
              f"({warm / warm_base:.2f}x)")  # fmt: skip
        _, idle = child_peak_rss("import sharedquant.adapters.checkpoint")
        code = "from sharedquant.adapters.rewrite import reconcile_checkpoint as r\n"
        code += f"r({str(source)!r}, {str(out)!r})"
        seconds, peak = child_peak_rss(code)
        start = time.perf_counter()
        shutil.copytree(source, root / "copy")
        copy = time.perf_counter() - start
        shutil.rmtree(root / "copy")
        mib = 2**20
        print(f"reconcile: {seconds:.1f} s (a plain copy of the directory: {copy:.1f} s); "
              f"peak RSS {peak / mib:.0f} MiB (import alone {idle / mib:.0f} MiB, so {(peak - idle) / mib:.0f} MiB "
              f"for the work) vs largest shard {largest / mib:.0f} MiB "
              f"= {(peak - idle) / largest:.2f} shards")  # fmt: skip
        assert inspect_checkpoint(out).consistent
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
