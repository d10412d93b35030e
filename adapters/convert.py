"""Convert an NVFP4 checkpoint between the modelopt and compressed-tensors layouts, shard by shard.

The mapping is the core's (``core.convert``); this file only reads and writes files. What it
guarantees:

* the same shards, in the same order, with the same tensors at the same offsets: each shard's
  data is copied as it is and only the per-tensor scales are overwritten (their reciprocals
  have the same size), its header rewritten with the new names and scale shapes;
* the index follows the renames; ``config.json``'s ``quantization_config`` and
  ``hf_quant_config.json`` are rewritten for the target; every other file is copied;
* output goes to a staging directory beside ``--out`` (``checkpoint.staged_output``) and is
  renamed into place only when complete; the input is never opened for writing.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import torch

from sharedquant.core.convert import (
    LAYOUTS,
    ORIGINALS_KEY,
    QuantSettings,
    compressed_tensors_config,
    convert_scale,
    find_renames,
    modelopt_configs,
    read_originals,
    read_quant_settings,
    translate_ignore,
    write_originals,
)
from sharedquant.core.formats import MODELOPT, Format, block_size, detect_format, find_members
from sharedquant.core.groups import join_fqn

from .checkpoint import INDEX, Checkpoint, CheckpointError, open_checkpoint, staged_output

__all__ = ["Conversion", "conversion_lines", "convert_checkpoint"]

CONFIG, HF_QUANT_CONFIG = "config.json", "hf_quant_config.json"


@dataclass
class Conversion:
    """What ``convert`` did.

    Attributes:
        source, target: the layouts.
        members: the NVFP4 modules converted.
        renamed: how many tensors changed name.
        inexact: ``(source key, relative error)`` of each scale whose reciprocal does not
            invert in its dtype; its source bytes are recorded in the shard metadata, so
            converting back restores them.
        restored: scales set back to the bytes a previous conversion recorded.
        configs: the config files written (empty: the input had none).
    """

    source: Format
    target: Format
    out: Path
    members: tuple[str, ...] = ()
    renamed: int = 0
    inexact: list[tuple[str, float]] = field(default_factory=list)
    restored: int = 0
    configs: list[str] = field(default_factory=list)


class _Job(NamedTuple):
    """What every shard's conversion needs: the new names, and the keys of the scales to invert."""

    renames: dict[str, str]
    scales: frozenset[str]


def _layouts(checkpoint: Checkpoint, to: str) -> tuple[Format, Format]:
    if to not in LAYOUTS:
        raise CheckpointError(f"convert: unknown layout {to!r}; expected one of {', '.join(LAYOUTS)}")
    source, target = detect_format(checkpoint.tensors, checkpoint.family), LAYOUTS[to]
    if source.name == target.name:
        raise CheckpointError(f"{checkpoint.path}: already in the {to} layout; nothing to convert")
    if source.name not in LAYOUTS:
        raise CheckpointError(f"{checkpoint.path}: holds {source.name}, not packed NVFP4 weights; nothing to convert")
    return source, target


def _check_members(checkpoint: Checkpoint, source: Format, members: tuple[str, ...]) -> int | None:
    """The one block size of every member; refuses codes not uint8, block scales not float8, no input scale."""
    sizes = set()
    for fqn in members:
        packed = checkpoint.tensors[join_fqn(fqn, source.packed)]
        blocks = checkpoint.tensors[join_fqn(fqn, source.block_scale)]
        if (packed.dtype, blocks.dtype) != ("U8", "F8_E4M3"):
            got = f"{source.packed} {packed.dtype}, {source.block_scale} {blocks.dtype}"
            expected = "expected U8 codes, F8_E4M3 blocks"
            raise CheckpointError(f"{checkpoint.path}: {fqn!r} is not NVFP4 ({expected}; got {got})")
        if join_fqn(fqn, source.input_scale) not in checkpoint.tensors:  # both configs describe W4A4 NVFP4
            lacks = f"{fqn!r} has no {source.input_scale}"
            raise CheckpointError(f"{checkpoint.path}: {lacks}; weight-only NVFP4 does not convert")
        sizes.add(block_size(fqn, packed.shape, blocks.shape))
    if len(sizes) > 1:
        raise CheckpointError(f"{checkpoint.path}: members have different block sizes {sorted(sizes)}")
    return sizes.pop() if sizes else None


def _read_json(path: Path) -> dict | None:
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise CheckpointError(f"{path}: not valid JSON: {err}") from err
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a JSON object")
    return data


def _shard_header(checkpoint: Checkpoint, shard: str, job: _Job, result: Conversion) -> tuple[bytes, int, list]:
    """The renamed header of ``shard``, where its data starts, and ``(data offset, tensor)`` of each new scale."""
    with open(checkpoint.root / shard, "rb") as handle:  # open_checkpoint has validated this header
        length = int.from_bytes(handle.read(8), "little")
        entries = json.loads(handle.read(length))  # keeps the file's order, metadata's too
    metadata = entries.pop("__metadata__", None)
    originals = read_originals(metadata, str(checkpoint.root / shard))
    header, patches, records = {}, [], {}
    for key, entry in entries.items():
        new_key = job.renames.get(key, key)
        if key in job.scales:
            converted = convert_scale(key, checkpoint.read(key), result.source, result.target, originals.get(key))
            entry = {**entry, "shape": list(converted.tensor.shape)}
            patches.append((entry["data_offsets"][0], converted.tensor))
            result.restored += converted.restored
            if converted.record is not None:
                records[new_key] = converted.record
            if converted.relative_error:
                result.inexact.append((key, converted.relative_error))
        header[new_key] = entry
    metadata = write_originals(metadata, records)
    header = {**({"__metadata__": metadata} if metadata is not None else {}), **header}
    # safetensors writes compact JSON, UTF-8 unescaped, padded with spaces to 8 bytes
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
    return text + b" " * (-len(text) % 8), 8 + length, patches


def _convert_shard(checkpoint: Checkpoint, shard: str, staging: Path, job: _Job, result: Conversion) -> None:
    """Write ``shard`` renamed: its data copied as it is, its scales overwritten in place, its header rewritten."""
    header, data_start, patches = _shard_header(checkpoint, shard, job, result)
    source, target = checkpoint.root / shard, staging / shard
    with open(source, "rb") as src, open(target, "wb") as dst:
        dst.write(len(header).to_bytes(8, "little") + header)
        src.seek(data_start)
        shutil.copyfileobj(src, dst, 16 << 20)
        for offset, tensor in patches:
            dst.seek(8 + len(header) + offset)
            dst.write(tensor.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    shutil.copymode(source, target)


def _index_text(checkpoint: Checkpoint, renames: dict[str, str]) -> str:
    """The index with the new names, in the style the input's was written (sorted keys, trailing newline)."""
    text = (checkpoint.root / INDEX).read_text()
    index = checkpoint.index
    styles = [(sort, end) for sort in (True, False) for end in ("\n", "")]
    sort, end = next((s for s in styles if json.dumps(index, indent=2, sort_keys=s[0]) + s[1] == text), (True, "\n"))
    weight_map = {renames.get(key, key): shard for key, shard in index["weight_map"].items()}
    if list(index["weight_map"]) == sorted(index["weight_map"]):
        weight_map = dict(sorted(weight_map.items()))
    return json.dumps({**index, "weight_map": weight_map}, indent=2, sort_keys=sort) + end


def _config_texts(checkpoint: Checkpoint, result: Conversion, block: int | None) -> dict[str, str]:
    """``config.json`` and ``hf_quant_config.json`` for the target, by name; none without a quantization config."""
    config = _read_json(checkpoint.root / CONFIG)
    hf_quant_config = _read_json(checkpoint.root / HF_QUANT_CONFIG)
    settings = read_quant_settings(result.source, config, hf_quant_config)
    if settings is None:
        return {}
    if block is not None and settings.group_size != block:
        says = f"the config says group_size {settings.group_size}"
        raise CheckpointError(f"{checkpoint.path}: {says}, the tensors {block}")
    member_set = set(result.members)
    modules = [key[: -len(".weight")] for key in checkpoint.tensors if key.endswith(".weight")]
    modules = [name for name in modules if name not in member_set]
    ignore = translate_ignore(settings.ignore, result.source, result.target, modules)
    settings = QuantSettings(settings.group_size, ignore)
    texts = {}
    if result.target.name == MODELOPT.name:
        producer = {"name": "sharedquant", "version": importlib.metadata.version("sharedquant")}
        hf_quant_config, section = modelopt_configs(settings, producer)
        texts[HF_QUANT_CONFIG] = json.dumps(hf_quant_config, indent=4)
    else:  # compressed-tensors has no hf_quant_config.json; an engine finding one would read the modelopt layout
        section = compressed_tensors_config(settings)
    if config is not None:
        texts[CONFIG] = json.dumps({**config, "quantization_config": section}, indent=2, sort_keys=True) + "\n"
    return texts


def _copy_others(checkpoint: Checkpoint, staging: Path, written: set[str]) -> None:
    """Every other file of the input directory, links followed (a link into a cache must become a file)."""
    for entry in sorted(checkpoint.root.iterdir()):
        if entry.name in written:
            continue
        if entry.is_dir():
            shutil.copytree(entry, staging / entry.name)
        else:
            shutil.copy2(entry, staging / entry.name)


def convert_checkpoint(
    path: str | os.PathLike,
    out: str | os.PathLike,
    to: str,
    *,
    force: bool = False,
    progress: Callable[[int, int, str], None] | None = None,
) -> Conversion:
    """Write a copy of an NVFP4 checkpoint in the other layout; the values do not change.

    Args:
        path: the input checkpoint (file or directory); never modified.
        out: the output directory.
        to: ``"modelopt"`` or ``"compressed-tensors"``.
        force: replace an existing ``out``.
        progress: called as ``progress(done, total, what)`` after each shard.

    Returns:
        A ``Conversion``: the members, the scales whose reciprocal does not invert.

    Raises:
        CheckpointError, ValueError: bad input (unknown layout, already in the target layout,
            not NVFP4, a config that disagrees); nothing is written.
    """
    checkpoint = open_checkpoint(path)
    source, target = _layouts(checkpoint, to)
    renames = find_renames(checkpoint.tensors, source, target)
    members = find_members(checkpoint.tensors, source)
    block = _check_members(checkpoint, source, members)
    scales = {join_fqn(fqn, role) for fqn in members for role in (source.scale, source.input_scale)}
    job = _Job(renames, frozenset(scales & checkpoint.tensors.keys()))
    result = Conversion(source, target, Path(out), members, len(renames) - sum(k == v for k, v in renames.items()))
    texts = {}
    if checkpoint.path.is_dir():  # read and check every config before anything is written
        texts = _config_texts(checkpoint, result, block)
        result.configs = sorted(texts)
        if checkpoint.index is not None:
            texts[INDEX] = _index_text(checkpoint, renames)
    with staged_output(checkpoint, Path(out), force) as staging:
        if checkpoint.path.is_dir():
            _copy_others(checkpoint, staging, {*checkpoint.shards, *texts, HF_QUANT_CONFIG})
        for name, text in texts.items():
            (staging / name).write_text(text)
        for done, shard in enumerate(checkpoint.shards):
            _convert_shard(checkpoint, shard, staging, job, result)
            checkpoint.release()  # one shard's pages at a time
            if progress is not None:
                progress(done + 1, len(checkpoint.shards), f"converted {shard}")
    return result


def conversion_lines(result: Conversion, every: bool = False) -> list[str]:
    """What ``convert`` prints: the summary, the configs, and the scales whose reciprocal does not invert.

    Args:
        result: what ``convert_checkpoint`` returned.
        every: list every such scale, not only the ten with the largest error.
    """
    lines = [
        f"converted {len(result.members)} NVFP4 members from {result.source.name} to {result.target.name} "
        f"({result.renamed} tensors renamed); written to {result.out}"
    ]
    configs = f"configs written: {', '.join(result.configs)}" if result.configs else None
    lines.append(configs or "no quantization config found: tensors only")
    if result.restored:
        lines.append(f"{result.restored} scale(s) restored to the bytes an earlier conversion recorded")
    if result.inexact:
        worst = sorted(result.inexact, key=lambda item: -item[1])
        shown = worst if every else worst[:10]
        lines.append(
            f"note: {len(worst)} scale(s) have a reciprocal that does not invert in their dtype; the written value is "
            f"the correctly rounded reciprocal and converting back restores the source bytes from the shard metadata "
            f"({ORIGINALS_KEY!r}); a plain inverse would be off by (relative error):"
        )
        lines += [f"  {key}: {error:.3e}" for key, error in shown]
        if len(shown) < len(worst):
            lines.append(f"  ... and {len(worst) - len(shown)} more (--all lists every one)")
    return lines
