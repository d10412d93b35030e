"""Hypothesis strategies: module-name trees, buffer dicts, pattern sets, weights, states.

Trees look like real checkpoints (Llama, Mixtral, Qwen-MoE layouts under various
prefixes, roles in any order and any subset) plus random dotted noise drawn from the
same vocabulary, so the patterns meet both the names they were written for and
near-misses.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from hypothesis import strategies as st

from sharedquant.core.groups import SHARED_PATTERNS, SHARED_PATTERNS_ACROSS_EXPERTS, Group, find_groups
from sharedquant.core.state import UNSET, SharedAmax

ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
DENSE = ("gate_proj", "up_proj", "down_proj")
MIXTRAL = ("w1", "w2", "w3")
VOCABULARY = ATTENTION + DENSE + MIXTRAL + (
    "model", "layers", "self_attn", "mlp", "block_sparse_moe", "experts", "local_experts",
    "gate", "shared_expert", "shared_expert_gate", "0", "1", "12",
)  # fmt: skip
FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

# Regexes beyond the defaults: a narrower group, one group with no capture (root-owned
# when members are far apart), a role capture that splits by role, and an invalid-looking
# but valid alternation.
EXTRA_PATTERNS = (
    r"(.*)\.(?:q_proj|k_proj)",
    r".*\.(?:w1|w3)",
    r"(?:(.*)\.)?(.*_proj)",
    r"(?:(.*)\.)?(?:gate|up_proj|shared_expert_gate)",
)


@dataclass(frozen=True)
class Tree:
    """Module FQNs in arrival order, and the FQNs of the containers (ModuleLists) among their ancestors."""

    names: tuple[str, ...]
    containers: tuple[str, ...]


def _join(*parts: str) -> str:
    return ".".join(p for p in parts if p)


def _roles(pool: tuple[str, ...]) -> st.SearchStrategy[list[str]]:
    """All roles in any order (the common case), or any subset of them."""
    return st.one_of(st.permutations(pool), st.lists(st.sampled_from(pool), unique=True))


@st.composite
def _layer(draw, base: str) -> tuple[list[str], list[str]]:
    names = [_join(base, "self_attn", r) for r in draw(_roles(ATTENTION))]
    kind = draw(st.sampled_from(["dense", "mixtral", "qwen"]))
    containers: list[str] = []
    if kind == "dense":
        names += [_join(base, "mlp", r) for r in draw(_roles(DENSE))]
        return names, containers
    block = _join(base, "block_sparse_moe" if kind == "mixtral" else "mlp")
    experts = _join(block, draw(st.sampled_from(["experts", "local_experts"])))
    roles = MIXTRAL if kind == "mixtral" else DENSE
    containers.append(experts)
    names.append(_join(block, "gate"))
    for expert in range(draw(st.integers(1, 3))):
        names += [_join(experts, str(expert), r) for r in draw(_roles(roles))]
    if kind == "qwen":
        names += [_join(block, "shared_expert", r) for r in DENSE] + [_join(block, "shared_expert_gate")]
    return names, containers


@st.composite
def trees(draw, max_layers: int = 2, noise: int = 4) -> Tree:
    """A checkpoint-like module tree, names shuffled, with a few random dotted names mixed in."""
    prefix = draw(st.sampled_from(["", "model", "model.language_model"]))
    layers = _join(prefix, "layers")
    names: list[str] = []
    containers = [layers]
    for index in range(draw(st.integers(1, max_layers))):
        layer_names, layer_containers = draw(_layer(_join(layers, str(index))))
        names += layer_names
        containers += layer_containers
    names += draw(st.lists(st.lists(st.sampled_from(VOCABULARY), min_size=1, max_size=4).map(".".join), max_size=noise))
    return Tree(names=tuple(draw(st.permutations(names))), containers=tuple(containers))


def pattern_sets() -> st.SearchStrategy[tuple[str, ...]]:
    """The two default sets, and arbitrary ordered selections from every known pattern."""
    known = tuple(dict.fromkeys(SHARED_PATTERNS + SHARED_PATTERNS_ACROSS_EXPERTS + EXTRA_PATTERNS))
    return st.one_of(
        st.just(SHARED_PATTERNS),
        st.just(SHARED_PATTERNS_ACROSS_EXPERTS),
        st.lists(st.sampled_from(known), unique=True, min_size=1, max_size=4).map(tuple),
    )


@st.composite
def disjoint_groups(draw) -> tuple[Group, ...]:
    """Groups from a tree under one pattern set: disjoint by construction."""
    tree = draw(trees())
    return find_groups(tree.names, draw(pattern_sets()), containers=tree.containers)


def amax_values(dtype: torch.dtype) -> st.SearchStrategy[float]:
    top = 6e4 if dtype == torch.float16 else 1e6
    return st.floats(min_value=0.0, max_value=top, allow_nan=False, allow_infinity=False)


@st.composite
def amax_tensors(draw) -> torch.Tensor:
    """A calibrated amax: scalar, per-channel or per-block, in any float dtype."""
    dtype = draw(st.sampled_from(FLOAT_DTYPES + (torch.float64,)))
    shape = draw(st.sampled_from([(), (1,), (3, 1), (2, 4)]))
    count = 1
    for extent in shape:
        count *= extent
    values = draw(st.lists(amax_values(dtype), min_size=count, max_size=count))
    return torch.tensor(values, dtype=dtype).reshape(shape)


@st.composite
def amax_buffers(draw, names, quantizer: str = "weight_quantizer", missing: bool = True) -> dict[str, torch.Tensor]:
    """``<name>.<quantizer>._amax`` for each name; some missing or on the meta device when ``missing``."""
    buffers = {}
    for name in dict.fromkeys(names):
        presence = draw(st.sampled_from(["tensor"] * 8 + (["missing", "meta"] if missing else [])))
        if presence == "missing":
            continue
        key = f"{name}.{quantizer}._amax" if name else f"{quantizer}._amax"
        tensor = draw(amax_tensors())
        buffers[key] = torch.empty(tensor.shape, device="meta") if presence == "meta" else tensor
    return buffers


@st.composite
def states(draw, groups=None) -> SharedAmax:
    """A SharedAmax over some groups, each value set (finite, positive) or unset."""
    groups = draw(disjoint_groups()) if groups is None else groups
    values = draw(
        st.lists(st.one_of(st.just(UNSET), amax_values(torch.float32)), min_size=len(groups), max_size=len(groups))
    )
    return SharedAmax(groups=groups, global_amax=torch.tensor(values, dtype=torch.float32).reshape(len(groups)))


@st.composite
def weights(
    draw, rows: tuple[int, int] = (1, 6), blocks: tuple[int, int] = (1, 3), dtypes=FLOAT_DTYPES
) -> torch.Tensor:
    """A weight ``[rows, 16 * blocks]`` of random magnitude (10**-1.5 .. 10**1.5), some blocks zero."""
    dtype = draw(st.sampled_from(dtypes))
    shape = (draw(st.integers(*rows)), 16 * draw(st.integers(*blocks)))
    return draw(weights_of_shape(shape, dtype))


@st.composite
def weights_of_shape(draw, shape, dtype) -> torch.Tensor:
    generator = torch.Generator().manual_seed(draw(st.integers(0, 2**32 - 1)))
    scale = 10.0 ** draw(st.floats(-1.5, 1.5))
    weight = torch.randn(shape, generator=generator) * scale
    # A zero block, which NVFP4 gives scale 1.0; never the only block, since an all-zero
    # weight has no valid (positive) global amax.
    if shape[0] * shape[1] > 16 and draw(st.booleans()):
        row = draw(st.integers(0, shape[0] - 1))
        weight[row, :16] = 0.0
    return weight.to(dtype)


@st.composite
def fused_members(draw) -> tuple[tuple[str, ...], tuple[str, ...], list[torch.Tensor]]:
    """(patterns, member FQNs, member weights) for one fusable group; same columns and dtype, any rows."""
    kind = draw(st.sampled_from(["qkv", "gate_up", "experts"]))
    if kind == "qkv":
        names, patterns = [f"model.layers.0.self_attn.{r}" for r in ("q_proj", "k_proj", "v_proj")], SHARED_PATTERNS
    elif kind == "gate_up":
        names, patterns = ["model.layers.3.mlp.gate_proj", "model.layers.3.mlp.up_proj"], SHARED_PATTERNS
    else:
        experts = draw(st.integers(2, 3))
        names = [f"moe.experts.{e}.{r}" for e in range(experts) for r in ("w1", "w3")]
        patterns = SHARED_PATTERNS_ACROSS_EXPERTS
    dtype = draw(st.sampled_from(FLOAT_DTYPES))
    columns = 16 * draw(st.integers(1, 3))
    members = [draw(weights_of_shape((draw(st.integers(1, 5)), columns), dtype)) for _ in names]
    return patterns, tuple(names), members
