"""The shared-state lifecycle as pure functions over buffer dicts (FQN -> tensor).

Like an optax transformation, each step takes state (and buffers) and returns new
state; nothing passed in is written, neither values nor storage.

* ``finalize``: each group's ``global_amax`` = max over its members' ``_amax``, fp32;
* ``sync``: every group through ONE all-reduce (MAX) call supplied by the caller;
* ``restore``: rebuild the state from members' loaded ``_global_amax``, refusing groups
  whose members disagree;
* ``member_entries``: the inverse of tying, the per-member entries a state dict holds.

All groups are handled together: a handful of kernels, not a few per group. Checks
that need tensor values (finiteness, agreement) run eagerly and are skipped under
``torch.compile`` / ``torch.func``, where non-finite values propagate instead.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Callable, Mapping, Sequence
from itertools import chain, compress, repeat
from operator import attrgetter

import torch

from .groups import Group, join_fqn
from .reduce import _concat_flat, _reduce_amax_many, is_traced, reduce_amax_many, round_up_to_fp32
from .state import UNSET, SharedAmax

__all__ = ["buffer_key", "finalize", "global_amax_entries", "group_amax", "member_entries", "restore", "sync"]

AMAX = "_amax"
GLOBAL_AMAX = "_global_amax"

_DEVICE = attrgetter("device")
_IS_CPU = attrgetter("is_cpu")  # a bool per tensor; reading .device builds a torch.device each


def buffer_key(fqn: str, quantizer: str, attr: str) -> str:
    """State-dict key of ``attr`` on the ``quantizer`` of module ``fqn`` (``""`` is the root)."""
    return join_fqn(fqn, f"{quantizer}.{attr}")


def _describe(group: Group) -> str:
    return f"group {group.parent or '<root>'!r} {group.key!r}"


def _members(groups: Sequence[Group]) -> list[str]:
    """Every member FQN, group after group."""
    return [member for group in groups for member in group.members]


def _segments(groups: Sequence[Group]) -> list[int]:
    """The position of each member's group, member after member."""
    sizes = [len(group.members) for group in groups]
    return list(chain.from_iterable(map(repeat, range(len(groups)), sizes)))


def _member_keys(members: Sequence[str], quantizer: str, attr: str) -> list[str]:
    """``buffer_key`` of every member, as one comprehension (a call per member costs more than the key)."""
    root = buffer_key("", quantizer, attr)
    suffix = f".{root}"
    return [member + suffix if member else root for member in members]


def _check_groups(fn: str, groups) -> tuple[tuple[Group, ...], list[str]]:
    """The groups as a tuple, and their members; refuses non-groups and members claimed twice."""
    groups = tuple(groups)
    if all(issubclass(kind, Group) for kind in set(map(type, groups))):
        members = _members(groups)
        if len(set(members)) == len(members):
            return groups, members
    # A member listed twice (even within one group, which is allowed) or a non-group:
    # the per-group walk decides, and names the first offender.
    owner: dict[str, Group] = {}
    for group in groups:
        if not isinstance(group, Group):
            raise TypeError(f"{fn}: expected Group values, got {type(group).__name__}")
        for member in group.members:
            other = owner.setdefault(member, group)
            if other is not group:
                raise ValueError(
                    f"{fn}: {member!r} is claimed by {_describe(other)} and by {_describe(group)}; "
                    "a fused tensor cannot have two scales (the pattern sets overlap)"
                )
    return groups, _members(groups)


def _gather(fn: str, keys: list[str], segments: list[int], buffers):
    """Present, materialised buffers of ``keys``: ``(tensors, numels, segment ids, their keys, device)``.

    ``segments[i]`` is the segment (the group) that ``keys[i]`` pools into.
    """
    if not isinstance(buffers, Mapping):
        raise TypeError(f"{fn}: buffers must map names to tensors, got {type(buffers).__name__}")
    if not torch.compiler.is_compiling():  # dynamo traces the per-member walk, once
        gathered = _gather_batched(keys, segments, buffers)
        if gathered is not None:
            return gathered
    return _gather_each(fn, keys, segments, buffers)


def _gather_batched(keys: list[str], segments: list[int], buffers):
    """``_gather`` with each check made once over the gathered list; ``None`` when one fails.

    A failed check (a non-tensor, an empty or meta tensor, mixed devices) hands over
    to ``_gather_each``, which skips, moves or names members one by one.
    """
    tensors = list(map(buffers.get, keys))
    kinds = set(map(type, tensors))
    if type(None) in kinds:  # members without the buffer are skipped
        kinds.discard(type(None))
        present = [tensor is not None for tensor in tensors]
        tensors, keys, segments = (list(compress(items, present)) for items in (tensors, keys, segments))
    if not all(issubclass(kind, torch.Tensor) for kind in kinds):
        return None
    device = _one_device(tensors)
    if device is None or device.type == "meta":
        return None
    lengths = list(map(torch.Tensor.numel, tensors))
    if 0 in lengths:
        return None
    # a Python list of ints converts three times faster with its dtype given
    return tensors, lengths, torch.tensor(segments, dtype=torch.int64, device=device), keys, device


def _one_device(tensors: Sequence[torch.Tensor]) -> torch.device | None:
    """The device every tensor is on; ``None`` for several devices or no tensors."""
    if tensors and all(map(_IS_CPU, tensors)):
        return tensors[0].device
    devices = set(map(_DEVICE, tensors))
    return devices.pop() if len(devices) == 1 else None


def _gather_each(fn: str, keys: list[str], segments: list[int], buffers):
    """``_gather`` member by member: the reference, the traced path, and the one that names offenders."""
    tensors, lengths, segment_ids, names = [], [], [], []
    for key, segment in zip(keys, segments):
        tensor = buffers.get(key)
        if tensor is None:
            continue
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"{fn}: {key!r} must be a tensor, got {type(tensor).__name__}")
        if tensor.is_meta:
            continue
        if tensor.numel() == 0:
            raise ValueError(f"{fn}: {key!r} is empty")
        tensors.append(tensor)
        lengths.append(tensor.numel())
        segment_ids.append(segment)
        names.append(key)
    device = tensors[0].device if tensors else torch.device("cpu")
    tensors = [t if t.device == device else t.to(device) for t in tensors]
    return tensors, lengths, torch.tensor(segment_ids, dtype=torch.int64, device=device), names, device


def _raise_non_finite(tensors, describe: Callable[[int], str]) -> None:
    for index, tensor in enumerate(tensors):
        value = reduce_amax_many([tensor], torch.zeros(1, dtype=torch.int64, device=tensor.device), 1)
        if not torch.isfinite(value).all():
            raise ValueError(
                f"finalize: {describe(index)!r} is not finite ({value.item()}); refusing to let it set the group's scale"
            )


def group_amax(
    tensors: Sequence[torch.Tensor],
    group_ids: Sequence[int] | torch.Tensor,
    num_groups: int,
    *,
    describe: Callable[[int], str] = lambda index: f"member #{index}",
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """The batched kernel of ``finalize``, over member amaxes already gathered.

    For callers that hold the tensors rather than names (the module adapter): one
    concatenation and one scatter for all groups, fp32 rounded up, ``-inf`` where a
    group got nothing.

    Args:
        tensors: each member's amax (non-empty, materialised).
        group_ids: the group of each tensor.
        num_groups: the number of groups.
        describe: names tensor ``i`` in error messages (called only on error).
        device: where the result lives when ``tensors`` is empty (default CPU).

    Returns:
        fp32 ``[num_groups]``.

    Raises:
        ValueError: an empty tensor, or (eagerly) a NaN or infinite one, named by ``describe``.
    """
    lengths = list(map(torch.Tensor.numel, tensors))
    if 0 in lengths:
        raise ValueError(f"finalize: {describe(lengths.index(0))!r} is empty")
    device = tensors[0].device if tensors else torch.device(device or "cpu")
    if not isinstance(group_ids, torch.Tensor):
        group_ids = torch.tensor(group_ids, dtype=torch.int64, device=device)
    try:  # the concatenation refuses several devices: no pass over the tensors to check first
        return _pooled_amax(tensors, lengths, group_ids.to(device), num_groups, describe, device)
    except RuntimeError:
        if _one_device(tensors) == device:
            raise
    tensors = [t if t.device == device else t.to(device) for t in tensors]
    return _pooled_amax(tensors, lengths, group_ids.to(device), num_groups, describe, device)


def _pooled_amax(tensors, lengths: list[int], group_ids: torch.Tensor, num_groups: int, describe, device):
    """``group_amax`` over tensors already checked (non-empty, on ``device``), ``lengths`` their numels."""
    values = round_up_to_fp32(_reduce_amax_many(tensors, lengths, group_ids, num_groups).to(device))
    if tensors and not is_traced(values) and (torch.isnan(values) | torch.isposinf(values)).any():
        _raise_non_finite(tensors, describe)
    return values


def finalize(
    groups: Sequence[Group],
    buffers: Mapping[str, torch.Tensor],
    *,
    quantizer: str = "weight_quantizer",
) -> SharedAmax:
    """Each group's ``global_amax``: the max over its members' ``_amax``, as fp32.

    Narrowing rounds up, so the result is never below any member's own amax. Members
    whose ``_amax`` is missing, ``None`` or on the meta device are skipped; a group
    with none stays unset (``-inf``).

    Args:
        groups: the groups (from ``find_groups``).
        buffers: FQN -> tensor; reads ``<member>.<quantizer>._amax``.
        quantizer: the quantizer attribute the groups apply to.

    Returns:
        A new ``SharedAmax``.

    Raises:
        ValueError: a name is claimed by two groups, a member amax is empty, or (eagerly)
            a member amax is NaN or infinite; the message names the member.
    """
    groups, members = _check_groups("finalize", groups)
    keys = _member_keys(members, quantizer, AMAX)
    return SharedAmax(groups, _segment_amax(keys, _segments(groups), len(groups), buffers))


def _segment_amax(keys: list[str], segments: list[int], count: int, buffers) -> torch.Tensor:
    """fp32 ``[count]``: entry ``s`` is the max over the buffers of the keys whose segment is ``s``."""
    tensors, lengths, segment_ids, names, device = _gather("finalize", keys, segments, buffers)
    return _pooled_amax(tensors, lengths, segment_ids, count, names.__getitem__, device)


@torch.compiler.assume_constant_result  # a function of static metadata: dynamo cannot trace crc32
def _fingerprint(keys: tuple) -> list[float]:
    """Six floats (exact in fp32) that a MAX all-reduce leaves unchanged iff every rank has the same groups."""
    digest = zlib.crc32(repr(keys).encode())
    high, low, count = float(digest >> 16), float(digest & 0xFFFF), float(len(keys))
    return [high, -high, low, -low, count, -count]


def sync(state: SharedAmax, all_reduce: Callable[[torch.Tensor], torch.Tensor]) -> SharedAmax:
    """Every group's value through ONE call of ``all_reduce`` (a MAX across ranks).

    The values are packed with a fingerprint of the group keys, so ranks that hold
    different groups are detected instead of silently mixing scales.

    Args:
        state: the local state; unset groups (``-inf``) take part without changing the max.
        all_reduce: a function from a 1-D fp32 tensor to its elementwise MAX over the
            ranks, returning a new tensor (e.g. a functional collective).

    Returns:
        A new state with the reduced values; the input state is untouched.

    Raises:
        RuntimeError: (eagerly) the ranks disagree on the groups.
    """
    values = state.global_amax
    # fp16 / bf16 cannot hold the fingerprint (up to 65535) exactly; MAX commutes with widening
    packed_dtype = torch.promote_types(values.dtype, torch.float32)
    fingerprint = _fingerprint(state.keys)
    packed = torch.cat([values.to(packed_dtype), torch.tensor(fingerprint, dtype=packed_dtype, device=values.device)])
    reduced = all_reduce(packed)
    if not is_traced(reduced):
        if reduced.shape != packed.shape:
            raise RuntimeError(f"sync: all_reduce returned shape {tuple(reduced.shape)}, expected {tuple(packed.shape)}")
        if reduced[-6:].tolist() != fingerprint:
            raise RuntimeError(
                "sync: ranks hold different shared-quant groups (their keys or counts differ); "
                "every rank must attach the same patterns to the same module tree"
            )
    return state.replace(global_amax=reduced[: values.numel()].to(values.dtype))


def restore(
    groups: Sequence[Group],
    buffers: Mapping[str, torch.Tensor],
    *,
    quantizer: str = "weight_quantizer",
    attr: str = GLOBAL_AMAX,
) -> SharedAmax:
    """Rebuild the state from the members' loaded ``_global_amax`` buffers.

    Args:
        groups: the groups.
        buffers: FQN -> tensor; reads ``<member>.<quantizer>.<attr>`` (one element each).
        quantizer: the quantizer attribute the groups apply to.
        attr: the per-group scalar to restore (``_global_amax``).

    Returns:
        A new ``SharedAmax``; a group whose members hold no value stays unset.

    Raises:
        ValueError: a value has more than one element, or (eagerly) the members of a
            group disagree or a value is not finite; the message names the group, its
            members and their values.
    """
    groups, members = _check_groups("restore", groups)
    keys = _member_keys(members, quantizer, attr)
    tensors, lengths, group_ids, names, device = _gather("restore", keys, _segments(groups), buffers)
    for tensor, length, name in zip(tensors, lengths, names):
        if length != 1:
            raise ValueError(f"restore: {name!r} must hold one value, got shape {tuple(tensor.shape)}")
    if not tensors:
        return SharedAmax(groups=groups, global_amax=torch.full((len(groups),), UNSET, device=device))
    # Agreement is checked in fp64, where every stored value is exact: two fp64 values
    # that round to one fp32 still disagree.
    # one concatenation, then one widening: a widening per member is a kernel per member on a GPU
    flat = _concat_flat(tensors, lengths).to(torch.float64)
    high = torch.full((len(groups),), UNSET, dtype=torch.float64, device=device).scatter_reduce(0, group_ids, flat, "amax")
    if not is_traced(flat):
        low = torch.full((len(groups),), -UNSET, dtype=torch.float64, device=device)
        low = low.scatter_reduce(0, group_ids, flat, "amin")
        bad = ~torch.isfinite(flat) | (flat != high[group_ids]) | (flat != low[group_ids])
        if bad.any():
            _raise_disagreement(groups, group_ids, flat, names, quantizer, attr)
    return SharedAmax(groups=groups, global_amax=round_up_to_fp32(high))


def _raise_disagreement(groups, group_ids, flat, names, quantizer, attr) -> None:
    suffix = f".{quantizer}.{attr}"
    by_group: dict[int, list[tuple[str, float]]] = {}
    for position, value, name in zip(group_ids.tolist(), flat.tolist(), names):
        by_group.setdefault(position, []).append((name.removesuffix(suffix), value))
    for position, entries in by_group.items():
        values = {value for _, value in entries}
        if len(values) > 1 or not all(math.isfinite(value) for value in values):
            listing = ", ".join(f"{member}={value!r}" for member, value in entries)
            raise ValueError(
                f"restore: {_describe(groups[position])} members disagree on {attr} "
                f"or hold a non-finite one: {listing}"
            )


def member_entries(state: SharedAmax, *, quantizer: str = "weight_quantizer") -> dict[str, torch.Tensor]:
    """The per-member ``_global_amax`` entries of a state dict, one independent tensor each.

    safetensors refuses tensors that share storage, so every entry owns its memory.
    Unset groups contribute nothing.

    Args:
        state: the state.
        quantizer: the quantizer attribute the groups apply to.

    Returns:
        ``{"<member>.<quantizer>._global_amax": 0-dim fp32 tensor}``.
    """
    members = _members(state.groups)
    if not members:
        return {}
    positions = torch.tensor(_segments(state.groups), dtype=torch.int64, device=state.global_amax.device)
    return _entries(members, state.global_amax[positions], quantizer)


def global_amax_entries(
    groups: Sequence[Group],
    buffers: Mapping[str, torch.Tensor],
    *,
    names: Sequence[str] = (),
    quantizer: str = "weight_quantizer",
) -> dict[str, torch.Tensor]:
    """``_global_amax`` entries: each member of ``groups`` gets its group's max, each other module in ``names`` its own.

    ``member_entries(finalize(groups, buffers))`` when ``names`` adds nothing. A module
    outside every fused group still needs a global amax: the max of its own ``_amax``,
    fp32 rounded up. It is pooled alone, in the same gather and scatter as the groups.
    Traceable by ``torch.compile(fullgraph=True)`` once the groups and names are known.

    Args:
        groups: the groups (from ``find_groups``).
        buffers: FQN -> tensor; reads ``<module>.<quantizer>._amax``.
        names: module FQNs that get an entry even outside the groups (``find_quantized``).
        quantizer: the quantizer attribute the groups apply to.

    Returns:
        ``{"<module>.<quantizer>._global_amax": 0-dim fp32 tensor}``: groups' members in
        group order, then the other names in their order; none for a module or group
        with no amax.

    Raises:
        TypeError: as ``finalize``: a group that is not a ``Group``, a buffer that is not a tensor.
        ValueError: as ``finalize``: a module claimed by two groups, an empty amax, or
            (eagerly) a NaN or infinite one, named.
    """
    groups, members = _check_groups("finalize", groups)
    grouped = set(members)
    singles = [name for name in dict.fromkeys(names) if name not in grouped]
    modules, count = members + singles, len(groups) + len(singles)
    segments = _segments(groups) + list(range(len(groups), count))
    values = _segment_amax(_member_keys(modules, quantizer, AMAX), segments, count, buffers)
    positions = torch.tensor(segments, dtype=torch.int64, device=values.device)
    return _entries(modules, values[positions], quantizer)


def _entries(modules: list[str], values: torch.Tensor, quantizer: str) -> dict[str, torch.Tensor]:
    """``{"<module>.<quantizer>._global_amax": value}`` in module order, each its own storage; unset ones left out."""
    keys = _member_keys(modules, quantizer, GLOBAL_AMAX)
    if is_traced(values):
        return {key: values[i] for i, key in enumerate(keys)}
    is_set = values > UNSET
    if not is_set.all():
        values, keys = values[is_set], list(compress(keys, is_set.tolist()))
    # one call that gives every entry its own storage, instead of a clone per entry
    return dict(zip(keys, torch.unbind_copy(values)))
