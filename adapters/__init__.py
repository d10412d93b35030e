"""sharedquant.adapters: the stateful edges over the pure core.

The seed's ``quantization.utils`` API on real ``nn.Module``s (in-place buffer tying,
hooks, setattr guards), quantized modules to attach to, calibration, and the other
edges: checkpoint files and the ``sharedquant`` command.
"""

from sharedquant.core.config import update_quant_cfg_with_kv_cache_quant
from sharedquant.core.groups import SHARED_PATTERNS, SHARED_PATTERNS_ACROSS_EXPERTS
from sharedquant.core.reduce import convert_quantization_axis_to_reduce_axis, reduce_amax, reduce_sum

from .calibrate import calibrate, calibration_mode, max_calibrate, set_ungrouped_global_amax
from .context import export_torch_mode, is_torch_export_mode, replace_function
from .modules import (
    find_shared_input_groups,
    is_quantized,
    is_quantized_column_parallel_linear,
    is_quantized_linear,
    is_quantized_row_parallel_linear,
    representative_weight_quantizer,
    weight_attr_names,
)
from .quantizer import QuantLinear, TensorQuantizer, replace_quant_module
from .shared_state import SharedQuantState, SharedWeightGlobalAmaxState, iter_shared_quant_states

__all__ = [
    "SHARED_PATTERNS",
    "SHARED_PATTERNS_ACROSS_EXPERTS",
    "QuantLinear",
    "SharedQuantState",
    "SharedWeightGlobalAmaxState",
    "TensorQuantizer",
    "calibrate",
    "calibration_mode",
    "convert_quantization_axis_to_reduce_axis",
    "export_torch_mode",
    "find_shared_input_groups",
    "is_quantized",
    "is_quantized_column_parallel_linear",
    "is_quantized_linear",
    "is_quantized_row_parallel_linear",
    "is_torch_export_mode",
    "iter_shared_quant_states",
    "max_calibrate",
    "reduce_amax",
    "reduce_sum",
    "replace_function",
    "replace_quant_module",
    "set_ungrouped_global_amax",
    "representative_weight_quantizer",
    "update_quant_cfg_with_kv_cache_quant",
    "weight_attr_names",
]
