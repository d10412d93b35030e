"""sharedquant.core: the pure-functional core.

Tensors, names and immutable state in; new ones out. No ``nn.Module``, no file, no
process group, no mutation: every function here is safe under ``torch.compile``,
``torch.func.vmap`` and ``functional_call``. The stateful edges live in
``sharedquant.adapters``.
"""

from .config import resolve_patterns, update_quant_cfg_with_kv_cache_quant, validate_shared_states
from .groups import SHARED_PATTERNS, SHARED_PATTERNS_ACROSS_EXPERTS, Group, find_groups
from .lifecycle import buffer_key, finalize, member_entries, restore, sync
from .nvfp4 import NVFP4Tensor, nvfp4_dequantize, nvfp4_fake_quant, nvfp4_global_scale, nvfp4_quantize
from .reduce import (
    convert_quantization_axis_to_reduce_axis,
    reduce_amax,
    reduce_block_amax,
    reduce_sum,
)
from .state import SharedAmax
from .transforms import find_quantized, global_amax_entries, unify_state_dict

__all__ = [
    "SHARED_PATTERNS",
    "SHARED_PATTERNS_ACROSS_EXPERTS",
    "Group",
    "NVFP4Tensor",
    "SharedAmax",
    "buffer_key",
    "convert_quantization_axis_to_reduce_axis",
    "finalize",
    "find_groups",
    "find_quantized",
    "global_amax_entries",
    "member_entries",
    "nvfp4_dequantize",
    "nvfp4_fake_quant",
    "nvfp4_global_scale",
    "nvfp4_quantize",
    "reduce_amax",
    "reduce_block_amax",
    "reduce_sum",
    "resolve_patterns",
    "restore",
    "sync",
    "unify_state_dict",
    "update_quant_cfg_with_kv_cache_quant",
    "validate_shared_states",
]
