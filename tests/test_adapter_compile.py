"""The adapter's calibration forward under torch.compile(fullgraph=True): no graph break, eager's amax.

Quantizers observing amax update their buffers in place (``copy_``), which dynamo
traces and AOTAutograd's functionalization writes back; the ``aot_eager`` backend
runs both of those stages (where an untraceable observer or a lost buffer mutation
would show) without inductor's code generation, to keep CI time down.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch._dynamo

from sharedquant.adapters import QuantLinear, TensorQuantizer, calibration_mode, max_calibrate, replace_quant_module
from sharedquant.adapters.models import tiny_llama

pytestmark = pytest.mark.slow


def prepared_llama() -> torch.nn.Module:
    """Weight amax calibrated, input quantizers enabled with max_calibrate's unobserved (-inf) amax."""
    model = replace_quant_module(tiny_llama(num_layers=1))
    for module in model.modules():
        if isinstance(module, QuantLinear):
            module.input_quantizer.enable()
    max_calibrate(model)
    for module in model.modules():
        if isinstance(module, QuantLinear):
            module.input_quantizer.amax = torch.full((), float("-inf"))
    return model


def observers(model: torch.nn.Module) -> dict[str, TensorQuantizer]:
    return {n: q for n, q in model.named_modules() if isinstance(q, TensorQuantizer) and q.is_enabled}


@torch.no_grad()
def test_calibration_forward_compiles_fullgraph_once_and_records_eager_amax(fresh_dynamo):
    compiled_model = prepared_llama()
    eager_model = copy.deepcopy(compiled_model)
    generator = torch.Generator().manual_seed(3)
    batches = [torch.randint(0, 128, (2, 8), generator=generator) for _ in range(2)]

    with calibration_mode(observers(eager_model).values()):
        eager_out = [eager_model(x) for x in batches]

    compiled = torch.compile(compiled_model, fullgraph=True, backend="aot_eager")
    with calibration_mode(observers(compiled_model).values()):
        compiled_out = [compiled(x) for x in batches]  # fullgraph: any graph break raises here

    assert torch._dynamo.utils.counters["graph_break"] == {}
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1  # the second batch reused it
    assert all(torch.equal(a, b) for a, b in zip(eager_out, compiled_out))
    eager_q, compiled_q = observers(eager_model), observers(compiled_model)
    assert eager_q.keys() == compiled_q.keys()
    inputs = [n for n in eager_q if n.endswith("input_quantizer")]
    assert len(inputs) == 8  # q/k/v/o, gate/up/down, lm_head
    for name in eager_q:
        assert torch.isfinite(compiled_q[name].amax).all(), name  # every observer saw data
        assert torch.equal(compiled_q[name].amax, eager_q[name].amax), name
