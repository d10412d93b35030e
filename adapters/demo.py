"""``sharedquant demo``: the problem and the repair on two tiny models, in a few seconds.

It quantizes a Llama-shaped and a Mixtral-shaped model to NVFP4 the way an exporter
that does not share scales would (every linear layer with its own global amax), writes
each as a modelopt-style HF checkpoint in a temporary directory, shows the ``inspect``
table, reconciles, and shows the table again with each repaired member's
dequantization error next to the error an engine makes when it takes the group's max
``weight_scale_2`` and keeps the member's codes and block scales. Then the same for a
per-tensor FP8 checkpoint (``demo_fp8``), where the engine-side repair vLLM runs at every
load is shown beside the offline one. What it mutates: the
demo models' weights (scaled, to give siblings realistic differences) and files under
a temporary directory, removed at the end.
"""

from __future__ import annotations

import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import TextIO

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from sharedquant.core.nvfp4 import E2M1_MAX, E4M3_MAX, nvfp4_dequantize, nvfp4_quantize
from sharedquant.core.reconcile import dequantize_without_rescaling
from sharedquant.core.reduce import reduce_amax

from .checkpoint import inspect_checkpoint
from .demo_fp8 import codes_unlike_vllm, fp8_member_errors, quantize_unshared_fp8
from .models import tiny_llama, tiny_mixtral
from .report import format_table
from .rewrite import reconcile_checkpoint

__all__ = ["member_errors", "quantize_unshared", "run_demo", "skew_siblings_"]

# Sibling weights differ in real models (k_proj is often smaller than q_proj, an
# expert's w3 than its w1); the tiny models' random init makes them nearly equal.
_SKEW = {"self_attn.k_proj": (0.45, 0.8, 0.6, 1.0), "w3": (0.3, 1.0, 0.55, 0.8)}
# Layers the peer leaves unquantized: the output head and the MoE router.
_EXCLUDED = ("lm_head", "block_sparse_moe.gate")


@torch.no_grad()
def skew_siblings_(model: nn.Module) -> nn.Module:
    """Scale some ``k_proj`` and expert ``w3`` weights in place, so fused siblings get different scales."""
    seen = dict.fromkeys(_SKEW, 0)
    for name, module in model.named_modules():
        for suffix, factors in _SKEW.items():
            if name.endswith(suffix) and isinstance(module, nn.Linear):
                module.weight.mul_(factors[seen[suffix] % len(factors)])
                seen[suffix] += 1
    return model


def _is_quantized(name: str, module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) and not any(name.endswith(excluded) for excluded in _EXCLUDED)


@torch.no_grad()
def _input_amax(model: nn.Module, tokens: torch.Tensor) -> dict[str, torch.Tensor]:
    """Each quantized linear's input amax over one calibration batch (hooks removed afterwards)."""
    amax: dict[str, torch.Tensor] = {}
    handles = [
        module.register_forward_hook(lambda _m, args, _out, name=name: amax.__setitem__(name, reduce_amax(args[0])))
        for name, module in model.named_modules()
        if _is_quantized(name, module)
    ]
    try:
        model(tokens)
    finally:
        for handle in handles:
            handle.remove()
    return amax


@torch.no_grad()
def quantize_unshared(model: nn.Module, tokens: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """A modelopt-style NVFP4 state dict in which every linear layer has its OWN global amax.

    This is what an export that does not share scales across fused siblings writes:
    ``weight`` (packed), ``weight_scale``, ``weight_scale_2``, ``input_scale`` per
    quantized linear; every other parameter as it is.
    """
    vocab = model.model.embed_tokens.num_embeddings
    tokens = torch.randint(0, vocab, (2, 16), generator=torch.Generator().manual_seed(0)) if tokens is None else tokens
    inputs = _input_amax(model, tokens)
    state = {key: value.detach().clone() for key, value in model.state_dict().items()}
    for name, module in model.named_modules():
        if _is_quantized(name, module):
            weight = module.weight.detach()
            quantized = nvfp4_quantize(weight, reduce_amax(weight))
            state[f"{name}.weight"] = quantized.packed
            state[f"{name}.weight_scale"] = quantized.block_scale
            state[f"{name}.weight_scale_2"] = quantized.global_scale.clone()
            state[f"{name}.input_scale"] = (inputs[name].float() / (E2M1_MAX * E4M3_MAX)).reshape(())
    return state


def member_errors(
    original: Mapping[str, torch.Tensor], reconciled: Mapping[str, torch.Tensor], fqn: str
) -> tuple[float, float]:
    """Relative L2 error of a member against its original dequantized weights: (reconciled, engine max).

    Args:
        original: the unshared checkpoint's tensors.
        reconciled: the reconciled checkpoint's tensors.
        fqn: the member.
    """
    packed, block_scale = original[f"{fqn}.weight"], original[f"{fqn}.weight_scale"]
    reference = nvfp4_dequantize(packed, block_scale, original[f"{fqn}.weight_scale_2"])
    shared = reconciled[f"{fqn}.weight_scale_2"]
    repaired = nvfp4_dequantize(reconciled[f"{fqn}.weight"], reconciled[f"{fqn}.weight_scale"], shared)
    engine = dequantize_without_rescaling(packed, block_scale, shared)
    norm = reference.norm().item()
    return (repaired - reference).norm().item() / norm, (engine - reference).norm().item() / norm


def _show(name: str, directory: Path, stream: TextIO) -> None:
    original = load_file(directory / "unshared" / "model.safetensors")
    reconciled = load_file(directory / "reconciled" / "model.safetensors")
    before = inspect_checkpoint(directory / "unshared")
    changed = [fqn for report in before.reports for fqn in report.changed]
    extra, totals = {}, [0.0, 0.0]
    for fqn in changed:
        errors = member_errors(original, reconciled, fqn)
        extra[fqn] = {"err reconciled": f"{errors[0]:.2%}", "err engine max": f"{errors[1]:.2%}"}
        totals = [total + error for total, error in zip(totals, errors)]
    stream.write(f"\n== {name}: as exported, each layer with its own scale (sharedquant inspect) ==\n")
    stream.write(format_table(before) + "\n")
    stream.write(f"\n== {name}: after sharedquant reconcile, errors vs the exported weights ==\n")
    stream.write(format_table(inspect_checkpoint(directory / "reconciled"), extra) + "\n")
    if changed:
        mean = [total / len(changed) for total in totals]
        stream.write(
            f"mean relative error of the {len(changed)} repaired members: reconciled {mean[0]:.2%}, "
            f"engine max without rescaling {mean[1]:.2%}\n"
        )


def _show_fp8(directory: Path, floats: Mapping[str, torch.Tensor], stream: TextIO) -> None:
    exported = load_file(directory / "unshared" / "model.safetensors")
    reconciled = load_file(directory / "reconciled" / "model.safetensors")
    before = inspect_checkpoint(directory / "unshared")
    changed = [fqn for report in before.reports for fqn in report.changed]
    errors = {fqn: fp8_member_errors(floats[fqn], exported, reconciled, fqn) for fqn in changed}
    extra = {fqn: {f"err {name}": f"{value:.2%}" for name, value in row.items()} for fqn, row in errors.items()}
    stream.write("\n== tiny Llama, FP8 per-tensor: as exported, each layer with its own scale (sharedquant inspect) ==\n")
    stream.write(format_table(before) + "\n")
    stream.write("\n== tiny Llama, FP8: after sharedquant reconcile, errors vs the float weights ==\n")
    stream.write(format_table(inspect_checkpoint(directory / "reconciled"), extra) + "\n")
    if changed:
        mean = {name: sum(row[name] for row in errors.values()) / len(errors) for name in next(iter(errors.values()))}
        stream.write(
            f"mean relative error of the {len(changed)} repaired FP8 members: as exported {mean['exported']:.2%}, "
            f"reconciled offline {mean['reconciled']:.2%}, vLLM load-time repair (float16) {mean['vllm load']:.2%}, "
            f"engine max without requantizing {mean['engine max']:.2%}\n"
        )
        differ = sum(codes_unlike_vllm(exported, reconciled, fqn) for fqn in changed)
        total = sum(exported[f"{fqn}.weight"].numel() for fqn in changed)
        stream.write(
            f"{differ} of {total} requantized codes differ from vLLM's float16 repair: the offline repair makes the "
            "same step once, exactly, instead of at every load (and for engines that keep the codes with the max)\n"
        )


def _fp8_checkpoint(directory: Path) -> dict[str, torch.Tensor]:
    """Write an unshared FP8 tiny Llama under ``directory``; returns its float weights by module."""
    model = skew_siblings_(tiny_llama()).eval()
    floats = {name: m.weight.detach().clone() for name, m in model.named_modules() if isinstance(m, nn.Linear)}
    tokens = torch.randint(0, model.model.embed_tokens.num_embeddings, (2, 16), generator=torch.Generator().manual_seed(0))
    state = quantize_unshared_fp8(model, _input_amax(model, tokens), _is_quantized)
    (directory / "unshared").mkdir(parents=True)
    save_file(state, directory / "unshared" / "model.safetensors", metadata={"format": "pt"})
    return floats


def run_demo(stream: TextIO) -> int:
    """Build, quantize, inspect, reconcile and compare; returns 0."""
    stream.write(
        "sharedquant demo: fused siblings (q/k/v, gate/up, expert w1/w3) must share one NVFP4 global scale.\n"
        "Engines that meet a mismatched group take the max weight_scale_2 and keep the block scales,\n"
        "which inflates the smaller members; `sharedquant reconcile` requantizes them instead.\n"
    )
    with tempfile.TemporaryDirectory(prefix="sharedquant-demo-") as scratch:
        for name, build in (("tiny Llama", tiny_llama), ("tiny Mixtral", tiny_mixtral)):
            directory = Path(scratch) / name.split()[-1].lower()
            (directory / "unshared").mkdir(parents=True)
            state = quantize_unshared(skew_siblings_(build()).eval())
            save_file(state, directory / "unshared" / "model.safetensors", metadata={"format": "pt"})
            reconcile_checkpoint(directory / "unshared", directory / "reconciled")
            _show(name, directory, stream)
        floats = _fp8_checkpoint(Path(scratch) / "fp8")
        reconcile_checkpoint(Path(scratch) / "fp8" / "unshared", Path(scratch) / "fp8" / "reconciled")
        _show_fp8(Path(scratch) / "fp8", floats, stream)
    return 0
