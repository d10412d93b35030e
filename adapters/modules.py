"""Module-tree helpers: discovery of fused groups on a model, and the seed's predicates.

Discovery walks the tree once, collects the names of modules whose target quantizer
is enabled, and hands those names to ``sharedquant.core.find_groups``: the grouping
rule lives in the core and nowhere else. Nothing here mutates a module.

Quantizers are recognised by class: this package's ``TensorQuantizer`` or any class
named ``TensorQuantizer`` (nvidia-modelopt's), so models quantized by the peer work.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
from torch import nn

from sharedquant.core.groups import Group, compile_patterns, find_groups

from .quantizer import TensorQuantizer

__all__ = [
    "CONTAINERS",
    "discover_groups",
    "first_parallel_state",
    "find_shared_input_groups",
    "is_quantized",
    "is_quantized_column_parallel_linear",
    "is_quantized_linear",
    "is_quantized_row_parallel_linear",
    "is_quantizer",
    "quantizer_attr",
    "representative_weight_quantizer",
    "walk_modules",
    "weight_attr_names",
    "weight_device",
]


def quantizer_attr(kind: str) -> str:
    """Attribute holding a module's quantizer of ``kind`` (``"weight"`` -> ``"weight_quantizer"``)."""
    return f"{kind}_quantizer"


def is_quantizer(module) -> bool:
    """Whether ``module`` is a tensor quantizer (this package's or nvidia-modelopt's)."""
    return isinstance(module, TensorQuantizer) or any(cls.__name__ == "TensorQuantizer" for cls in type(module).__mro__)


def walk_modules(model: nn.Module) -> dict[str, nn.Module]:
    """FQN -> module for the modules that have children, in ``named_modules()`` order.

    Leaves are skipped: a leaf (a quantizer, a norm) owns no quantizer, holds no
    shared state and contains nothing, so discovery never needs it, and on MoE
    models most modules are leaves (three quantizers per linear). Each module is
    listed once, at its first FQN, as ``named_modules`` does.
    """
    found = {"": model}
    seen = {id(model)}

    # Recursion, as named_modules does: 54 ms against 89 ms for an explicit stack of
    # (name, module) tuples over 25k modules, and models nest a few dozen levels at most.
    def visit(prefix: str, module: nn.Module) -> None:
        for child_name, child in module._modules.items():
            if child is not None and child._modules and id(child) not in seen:
                seen.add(id(child))
                name = prefix + child_name
                found[name] = child
                visit(name + ".", child)

    visit("", model)
    return found


def first_parallel_state(members: Sequence[nn.Module]):
    """The first ``parallel_state`` a member carries, or ``None``.

    It is an instance attribute on ``QuantLinear`` and a class-level property on the
    peer's modules; ``getattr`` on a module without one would raise and catch an
    ``AttributeError`` in ``nn.Module.__getattr__``, per member.
    """
    for member in members:
        found = vars(member).get("parallel_state")
        if found is None and hasattr(type(member), "parallel_state"):
            found = getattr(member, "parallel_state", None)
        if found is not None:
            return found
    return None


def weight_device(members: Sequence[nn.Module]) -> torch.device:
    """Where the members' weights live (the device a collective must use), CPU if nowhere."""
    weights = (p for m in members for p in m.parameters(recurse=False) if not p.is_meta)
    return next((p.device for p in weights), torch.device("cpu"))


def _enabled_quantizer(module: nn.Module, attr: str) -> bool:
    # Membership is structural: an enabled quantizer, calibrated or not.
    quantizer = module._modules.get(attr)
    return quantizer is not None and hasattr(quantizer, "_disabled") and not quantizer._disabled


# Modules whose children are their contents: a state registered in one would change
# its length and iteration (ModuleList, ModuleDict) or be called by its forward (Sequential).
CONTAINERS = (nn.ModuleList, nn.ModuleDict, nn.Sequential)


def discover_groups(
    model: nn.Module,
    patterns: Sequence[str] | None,
    target_quantizer_kind: str = "weight",
    where: str = "find_shared_input_groups",
) -> tuple[tuple[Group, ...], dict[str, nn.Module]]:
    """The core's groups for ``model`` and the FQN -> module map they refer to.

    Container parents (``CONTAINERS``) are climbed past. ``where`` names the public
    function in error messages.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"{where}: expected an nn.Module, got {type(model).__name__}")
    compile_patterns(patterns or (), where)
    attr = quantizer_attr(target_quantizer_kind)
    modules = walk_modules(model)
    names: list[str] = []
    containers: list[str] = []
    for name, module in modules.items():
        if isinstance(module, CONTAINERS):
            containers.append(name)
        elif _enabled_quantizer(module, attr):
            names.append(name)
    return find_groups(names, patterns, containers=containers), modules


def find_shared_input_groups(
    model: nn.Module, patterns: Sequence[str] | None = None, target_quantizer_kind: str = "weight"
) -> list[tuple[nn.Module, list[nn.Module]]]:
    """Fused sibling groups of ``model``: regexes over module FQNs, capture groups as the key.

    Each pattern is ``re.fullmatch``-ed against the FQN of every module whose
    ``<target_quantizer_kind>_quantizer`` is enabled; a module belongs to its first
    matching pattern, and modules with the same (pattern, captures) form a group,
    parented at their deepest common ancestor. What you capture is the boundary:
    ``r"(.*)\\.(?:w1|w3)"`` groups per expert, ``r"(.*)\\.experts\\.\\d+\\.(?:w1|w3)"`` across
    experts. Roles fused together go in a non-capturing alternation.

    Args:
        model: the model.
        patterns: the regexes (e.g. ``SHARED_PATTERNS``); ``None`` or empty finds nothing.
        target_quantizer_kind: ``"weight"``, ``"input"`` or ``"output"``.

    Returns:
        ``[(parent, [members...]), ...]``, groups of two or more, in model order.

    Raises:
        TypeError: ``model`` is not a module or a pattern is not a string.
        ValueError: a pattern is not a valid regex.
    """
    groups, modules = discover_groups(model, patterns, target_quantizer_kind)
    return [(modules[group.parent], [modules[m] for m in group.members]) for group in groups]


def is_quantized(module: nn.Module) -> bool:
    """Whether ``module`` or any submodule is a tensor quantizer."""
    return any(is_quantizer(m) for m in module.modules())


def is_quantized_linear(module: nn.Module) -> bool:
    """A linear layer with quantizers: an input quantizer, a weight quantizer and a 2-D weight.

    Embeddings have 2-D weights but are no GEMM, so they never count.
    """
    if isinstance(module, nn.Embedding):
        return False
    weight = getattr(module, "weight", None)
    return (
        is_quantizer(getattr(module, "input_quantizer", None))
        and hasattr(module, "weight_quantizer")
        and weight is not None
        and weight.dim() == 2
    )


def is_quantized_column_parallel_linear(module: nn.Module) -> bool:
    """A quantized linear whose output features are split across tensor-parallel ranks."""
    return is_quantized_linear(module) and bool(getattr(module, "_is_column_parallel", False))


def is_quantized_row_parallel_linear(module: nn.Module) -> bool:
    """A quantized linear whose input features are split across tensor-parallel ranks."""
    return is_quantized_linear(module) and bool(getattr(module, "_is_row_parallel", False))


def representative_weight_quantizer(module: nn.Module, weight_name: str = "weight"):
    """The quantizer of ``weight_name`` on ``module``, or ``None``.

    Looks for ``<name>_weight_quantizer`` (``weight_quantizer`` for ``"weight"``), then for
    a fused-experts list ``<name>_weight_quantizers`` whose first element stands for all
    (experts share one format).
    """
    singular = "weight_quantizer" if weight_name == "weight" else f"{weight_name}_weight_quantizer"
    quantizer = getattr(module, singular, None)
    if is_quantizer(quantizer):
        return quantizer
    plural = getattr(module, singular + "s", None)
    if isinstance(plural, nn.ModuleList) and len(plural) and is_quantizer(plural[0]):
        return plural[0]
    return None


def weight_attr_names(module: nn.Module) -> Iterator[str]:
    """Names of ``module``'s own weight parameters that have a quantizer (not recursive).

    ``weight`` with ``weight_quantizer`` (a linear), then any other parameter ``P`` with
    ``P_weight_quantizer`` (per-weight quantizers, e.g. ``gate_up_proj``) or a
    ``P_weight_quantizers`` list (fused experts).
    """
    if getattr(module, "weight", None) is not None and representative_weight_quantizer(module, "weight") is not None:
        yield "weight"
    for name, param in module.named_parameters(recurse=False):
        if name != "weight" and representative_weight_quantizer(module, name) is not None:
            yield name
