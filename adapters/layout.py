"""Which files a sharded checkpoint directory is made of: its index, read and confined to the directory.

Reads only. An index is a file naming other files, so a hostile or careless one could
point a run at any file on the machine: every shard it names must be a plain relative
name of a file under the directory, links followed.
"""

from __future__ import annotations

import json
from pathlib import Path, PurePosixPath

__all__ = ["INDEX", "SINGLE", "CheckpointError", "check_shard_name", "read_index"]

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"


class CheckpointError(ValueError):
    """A checkpoint on disk that cannot be read or written as asked; the message names the path."""


def read_index(directory: Path) -> tuple[dict, list[str]]:
    """The parsed index of ``directory`` and its shard names in first-use order.

    Raises:
        CheckpointError: the index is not valid JSON of the safetensors shape, names a
            shard outside the directory (see ``check_shard_name``) or a missing one.
    """
    try:
        index = json.loads((directory / INDEX).read_text())
        shards = list(dict.fromkeys(index["weight_map"].values()))
        if not all(isinstance(name, str) for name in [*shards, *index["weight_map"]]):
            raise ValueError("weight_map must map tensor names to shard file names")
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
        raise CheckpointError(f"{directory / INDEX}: not a valid safetensors index: {err!r}") from err
    for shard in shards:
        check_shard_name(directory, shard)
    missing = [shard for shard in shards if not (directory / shard).is_file()]
    if missing:
        raise CheckpointError(f"{directory / INDEX}: names shard(s) that do not exist: {', '.join(missing)}")
    return index, shards


def check_shard_name(root: Path, shard: str) -> None:
    """Refuse a ``weight_map`` shard that is not a plain relative name of a file under ``root``.

    Lexically: relative, normalised (no ``.``, ``..`` or empty parts, no backslash).
    Resolved, symlinks followed: under ``root``, or, for a Hugging Face cache snapshot
    (``<repo>/snapshots/<rev>``), under the repository's ``blobs/``, where the cache
    keeps the files its snapshots link to. Reading stays inside; writes go to copies.
    """
    plain = PurePosixPath(shard)
    normalised = bool(plain.parts) and str(plain) == shard and ".." not in plain.parts
    if not normalised or plain.is_absolute() or "\\" in shard or "\0" in shard:
        raise CheckpointError(f"{root / INDEX}: shard {shard!r} is not a plain relative file name in {root}")
    allowed = [root.resolve()]
    if allowed[0].parent.name == "snapshots":
        allowed.append(allowed[0].parent.parent / "blobs")
    target = (root / shard).resolve()
    if not any(target.is_relative_to(base) for base in allowed):
        raise CheckpointError(f"{root / INDEX}: shard {shard!r} resolves to {target}, outside {root}")
