"""Shared fixtures for the example tests.

Every test starts from the same random stream (so a failure reproduces) and, where it
compiles, from an empty dynamo cache (so compile counts of one test never leak into
the next).
"""

from __future__ import annotations

import pytest
import torch
import torch._dynamo


@pytest.fixture(autouse=True)
def _seeded():
    """Reproducible random tensors in every test."""
    torch.manual_seed(0)


@pytest.fixture
def fresh_dynamo():
    """An empty dynamo cache and graph-break counters before and after the test."""
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    yield
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()


@pytest.fixture
def llama_names() -> list[str]:
    """FQNs of the weight-quantized linears of a two-layer Llama, in module order."""
    names = []
    for layer in range(2):
        prefix = f"model.layers.{layer}"
        names += [f"{prefix}.self_attn.{role}" for role in ("q_proj", "k_proj", "v_proj", "o_proj")]
        names += [f"{prefix}.mlp.{role}" for role in ("gate_proj", "up_proj", "down_proj")]
    return names


@pytest.fixture
def mixtral_names() -> list[str]:
    """FQNs of the weight-quantized linears of a one-layer, three-expert Mixtral."""
    prefix = "model.layers.0"
    names = [f"{prefix}.self_attn.{role}" for role in ("q_proj", "k_proj", "v_proj", "o_proj")]
    for expert in range(3):
        names += [f"{prefix}.block_sparse_moe.experts.{expert}.{role}" for role in ("w1", "w2", "w3")]
    return names
