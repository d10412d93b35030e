"""The core's tensor work under torch.compile(fullgraph=True) and torch.func.vmap.

Each compiled case checks three things a user relies on: no graph break, the eager
result bit for bit, and no recompilation when called again with new values of the
same shapes. ``aot_eager`` keeps CI fast; one case runs the real inductor backend.
"""

from __future__ import annotations

import pytest
import torch
import torch._dynamo
from torch._dynamo.backends.registry import lookup_backend

from sharedquant.core.groups import SHARED_PATTERNS, find_groups
from sharedquant.core.lifecycle import finalize, restore, sync
from sharedquant.core.nvfp4 import nvfp4_dequantize, nvfp4_fake_quant, nvfp4_quantize
from sharedquant.core.reduce import reduce_amax, reduce_block_amax, reduce_sum
from sharedquant.core.transforms import find_quantized, global_amax_entries

pytestmark = pytest.mark.usefixtures("fresh_dynamo")

NAMES = [f"model.layers.0.self_attn.{r}" for r in ("q_proj", "k_proj", "v_proj", "o_proj")] + [
    f"model.layers.0.mlp.{r}" for r in ("gate_proj", "up_proj", "down_proj")
]
GROUPS = find_groups(NAMES, SHARED_PATTERNS)


class CountingBackend:
    """A dynamo backend that counts the graphs it is handed, then defers to ``inner``."""

    def __init__(self, inner: str = "aot_eager") -> None:
        self.inner = lookup_backend(inner)
        self.compiles = 0

    def __call__(self, graph_module, example_inputs):
        self.compiles += 1
        return self.inner(graph_module, example_inputs)


def bits(value):
    """A comparable view of a result: tensors as raw bytes (so NaN and -0.0 compare), containers recursively."""
    if isinstance(value, torch.Tensor):
        return (value.dtype, tuple(value.shape), value.detach().reshape(-1).contiguous().view(torch.uint8).tolist())
    if isinstance(value, dict):
        return {key: bits(item) for key, item in value.items()}
    if isinstance(value, (tuple, list)):
        return type(value).__name__, [bits(item) for item in value]
    if hasattr(value, "global_amax"):  # SharedAmax
        return value.groups, bits(value.global_amax)
    return value


def assert_compiles_cleanly(fn, first_args, second_args, backend: str = "aot_eager"):
    """fullgraph compile: zero graph breaks, eager-equal results, one compile for two same-shape calls."""
    explanation = torch._dynamo.explain(fn)(*first_args)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1
    torch._dynamo.reset()
    counter = CountingBackend(backend)
    compiled = torch.compile(fn, fullgraph=True, backend=counter, dynamic=False)
    for args in (first_args, second_args):
        assert bits(compiled(*args)) == bits(fn(*args))
    assert counter.compiles == 1, f"recompiled: {counter.compiles} graphs for two calls with the same shapes"
    assert not torch._dynamo.utils.counters["graph_break"]


def amax_buffers(scale: float) -> dict[str, torch.Tensor]:
    """Per-block weight amax (static NVFP4 layout) for every name, plus an activation amax."""
    buffers = {f"{n}.weight_quantizer._amax": torch.rand(8, 1) * scale * (i + 1) for i, n in enumerate(NAMES)}
    buffers.update({f"{n}.input_quantizer._amax": torch.tensor(3.0) for n in NAMES})
    return buffers


# --- reductions ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fn", "make"),
    [
        (reduce_amax, lambda: torch.randn(8, 32)),
        (lambda t: reduce_amax(t, axis=-1, keepdims=False), lambda: torch.randn(4, 8, 32)),
        (lambda t: reduce_amax(t, axis=(0, 2)), lambda: torch.randn(4, 8, 32).to(torch.bfloat16)),
        (reduce_amax, lambda: torch.randint(-128, 128, (64,), dtype=torch.int8)),
        (reduce_amax, lambda: (torch.randn(8, 32) * 50).to(torch.float8_e4m3fn)),
        (lambda t: reduce_amax(t, axis=0), lambda: (torch.randn(8, 32) * 50).to(torch.float8_e5m2)),
        (
            lambda t: reduce_amax(t, axis=1),
            lambda: torch.tensor([[1.0, float("nan")], [2.0, -3.0]]).to(torch.float8_e4m3fnuz),
        ),
        (reduce_sum, lambda: torch.randn(8, 32)),
        (lambda t: reduce_sum(t, axis=1, keepdims=False), lambda: torch.randn(8, 32)),
    ],
    ids=[
        "amax",
        "amax-axis",
        "amax-bf16-axes",
        "amax-int8",
        "amax-e4m3",
        "amax-e5m2-axis",
        "amax-fnuz-nan",
        "sum",
        "sum-axis",
    ],
)
def test_reductions_compile_cleanly(fn, make):
    assert_compiles_cleanly(fn, (make(),), (make(),))


@pytest.mark.parametrize("block_sizes", [{-1: 16}, {-1: 8, -2: 4}])
def test_block_amax_compiles_cleanly(block_sizes):
    fn = lambda t: reduce_block_amax(t, block_sizes)  # noqa: E731 - closes over a static dict
    assert_compiles_cleanly(fn, (torch.randn(8, 32),), (torch.randn(8, 32),))


# --- lifecycle and the tensor half of unify_state_dict ------------------------------------


def test_finalize_compiles_cleanly():
    fn = lambda buffers: finalize(GROUPS, buffers)  # noqa: E731 - groups are static
    assert_compiles_cleanly(fn, (amax_buffers(1.0),), (amax_buffers(100.0),))


def test_global_amax_entries_compile_cleanly():
    assert find_quantized(amax_buffers(1.0)) == tuple(NAMES)
    fn = lambda buffers: global_amax_entries(GROUPS, buffers, names=NAMES)  # noqa: E731
    assert_compiles_cleanly(fn, (amax_buffers(1.0),), (amax_buffers(0.01),))


def test_restore_compiles_cleanly():
    def entries(value):
        return {f"{m}.weight_quantizer._global_amax": torch.tensor(value) for g in GROUPS for m in g.members}

    fn = lambda buffers: restore(GROUPS, buffers)  # noqa: E731
    assert_compiles_cleanly(fn, (entries(2.0),), (entries(5.0),))


def test_sync_compiles_cleanly():
    fn = lambda buffers: sync(finalize(GROUPS, buffers), lambda packed: packed * 1)  # noqa: E731 - a one-rank reducer
    assert_compiles_cleanly(fn, (amax_buffers(1.0),), (amax_buffers(3.0),))


# --- NVFP4 --------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("fn", [nvfp4_quantize, nvfp4_fake_quant], ids=["quantize", "fake_quant"])
def test_nvfp4_compiles_cleanly(fn, dtype):
    def args():
        x = torch.randn(8, 64).to(dtype)
        return x, x.float().abs().max()

    assert_compiles_cleanly(fn, args(), args())


def test_nvfp4_dequantize_compiles_cleanly():
    def args():
        x = torch.randn(8, 64)
        return tuple(nvfp4_quantize(x, x.abs().max()))

    assert_compiles_cleanly(nvfp4_dequantize, args(), args())


def test_nvfp4_quantize_under_inductor_is_bit_exact():
    # Inductor fuses and reorders the float math: the codes and scales must not move a bit.
    def args():
        x = torch.randn(16, 64) * torch.logspace(-3, 3, 16).unsqueeze(1)
        return x, x.abs().max()

    assert_compiles_cleanly(nvfp4_quantize, args(), args(), backend="inductor")


# --- torch.func.vmap over a stack of experts ----------------------------------------------


def expert_stack() -> torch.Tensor:
    """Four experts' weights with magnitudes 1000x apart."""
    return torch.randn(4, 16, 64) * torch.tensor([1.0, 10.0, 0.01, 1000.0]).view(4, 1, 1)


def test_vmap_block_amax_equals_a_loop_over_experts():
    weights = expert_stack()
    mapped = torch.func.vmap(lambda w: reduce_block_amax(w, {-1: 16}))(weights)
    looped = torch.stack([reduce_block_amax(w, {-1: 16}) for w in weights])
    assert torch.equal(mapped, looped)


def test_vmap_amax_equals_a_loop_over_experts():
    weights = expert_stack()
    assert torch.equal(torch.func.vmap(reduce_amax)(weights), torch.stack([reduce_amax(w) for w in weights]))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_vmap_fake_quant_equals_a_loop_over_experts(dtype):
    weights = expert_stack().to(dtype)
    own = torch.stack([reduce_amax(w).float() for w in weights])
    mapped = torch.func.vmap(nvfp4_fake_quant)(weights, own)
    looped = torch.stack([nvfp4_fake_quant(w, a) for w, a in zip(weights, own)])
    assert torch.equal(mapped, looped)
    shared = own.max()
    mapped = torch.func.vmap(nvfp4_fake_quant, in_dims=(0, None))(weights, shared)
    assert torch.equal(mapped, torch.stack([nvfp4_fake_quant(w, shared) for w in weights]))


def test_vmap_quantize_equals_a_loop_over_experts():
    weights = expert_stack()
    own = torch.stack([reduce_amax(w) for w in weights])
    mapped = torch.func.vmap(nvfp4_quantize)(weights, own)
    looped = [nvfp4_quantize(w, a) for w, a in zip(weights, own)]
    assert torch.equal(mapped.packed, torch.stack([q.packed for q in looped]))
    assert torch.equal(
        mapped.block_scale.view(torch.uint8), torch.stack([q.block_scale.view(torch.uint8) for q in looped])
    )
    assert torch.equal(mapped.global_scale, torch.stack([q.global_scale for q in looped]))
