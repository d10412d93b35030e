"""The core against the peer (nvidia-modelopt), run where the peer is installed.

The peer is only executed, never copied: we build plain ``nn.Module`` trees, let the peer
convert and calibrate them, and check that the core, given only names and the peer's
state dict, finds the same groups and the same ``_global_amax`` values, and that our
NVFP4 bytes equal the peer's HF export. Models are tiny: the peer is slow to import.
"""

from __future__ import annotations

import copy
import random
import warnings

import pytest
import torch
from torch import nn

from sharedquant.core.config import update_quant_cfg_with_kv_cache_quant, validate_shared_states
from sharedquant.core.groups import SHARED_PATTERNS, SHARED_PATTERNS_ACROSS_EXPERTS, find_groups
from sharedquant.core.nvfp4 import nvfp4_quantize
from sharedquant.core.reduce import convert_quantization_axis_to_reduce_axis, reduce_amax
from sharedquant.core.transforms import unify_state_dict

pytestmark = pytest.mark.peer

with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # the peer warns about the transformers version on import
    mtq = pytest.importorskip("modelopt.torch.quantization")
    from modelopt.torch.quantization import utils as peer_utils
    from modelopt.torch.quantization.config import MaxCalibConfig

GLOBAL = ".weight_quantizer._global_amax"
PATTERN_SETS = {"default": SHARED_PATTERNS, "across": SHARED_PATTERNS_ACROSS_EXPERTS, "off": ()}


# --- generated module trees ---------------------------------------------------------------


def _node(**children: nn.Module) -> nn.Module:
    node = nn.Module()
    for name, child in children.items():
        setattr(node, name, child)
    return node


class _Trees:
    """Plain module trees with real checkpoint names and weights of random magnitude."""

    def __init__(self, seed: int) -> None:
        self.rng = random.Random(seed)
        torch.manual_seed(seed)

    def linear(self) -> nn.Linear:
        layer = nn.Linear(32, 16, bias=False)
        with torch.no_grad():
            layer.weight.mul_(10.0 ** self.rng.uniform(-1.5, 1.5))  # members differ by up to 1000x
        return layer

    def linears(self, *roles: str) -> nn.Module:
        return _node(**{role: self.linear() for role in roles})

    def attention(self) -> nn.Module:
        return self.linears("q_proj", "k_proj", "v_proj", "o_proj")

    def dense(self) -> nn.Module:
        return _node(self_attn=self.attention(), mlp=self.linears("gate_proj", "up_proj", "down_proj"))

    def mixtral(self, experts: int, container: str = "experts") -> nn.Module:
        expert_list = nn.ModuleList(self.linears("w1", "w2", "w3") for _ in range(experts))
        return _node(self_attn=self.attention(), block_sparse_moe=_node(gate=self.linear(), **{container: expert_list}))

    def qwen_moe(self, experts: int) -> nn.Module:
        mlp = _node(
            gate=self.linear(),
            experts=nn.ModuleList(self.linears("gate_proj", "up_proj", "down_proj") for _ in range(experts)),
            shared_expert=self.linears("gate_proj", "up_proj", "down_proj"),
            shared_expert_gate=self.linear(),
        )
        return _node(self_attn=self.attention(), mlp=mlp)


def build_tree(kind: str) -> tuple[nn.Module, list[dict]]:
    """A model of ``kind`` and any extra peer config entries it needs."""
    trees = _Trees(seed=len(kind))
    if kind == "llama":
        return _node(model=_node(layers=nn.ModuleList([trees.dense(), trees.dense()])), lm_head=trees.linear()), []
    if kind == "mixtral":
        return _node(model=_node(layers=nn.ModuleList([trees.mixtral(3)])), lm_head=trees.linear()), []
    if kind == "qwen_moe":
        inner = _node(layers=nn.ModuleList([trees.qwen_moe(2)]))
        return _node(model=_node(language_model=inner), lm_head=trees.linear()), []
    # mixed: local_experts, a dense layer with v_proj left unquantized, and q/k at the root.
    root = _node(
        q_proj=trees.linear(),
        k_proj=trees.linear(),
        blocks=nn.ModuleList([trees.mixtral(2, container="local_experts"), trees.dense()]),
    )
    return root, [{"quantizer_name": "*blocks.1.self_attn.v_proj*", "enable": False}]


TREES = ["llama", "mixtral", "qwen_moe", "mixed"]


def static_nvfp4_cfg(patterns: tuple[str, ...] | None, extra: list[dict]) -> dict:
    """The peer's NVFP4 default with static (calibrated, per-block) weight scales."""
    cfg = copy.deepcopy(mtq.NVFP4_DEFAULT_CFG)
    for entry in cfg["quant_cfg"]:
        if entry.get("quantizer_name") == "*weight_quantizer":
            entry["cfg"]["block_sizes"]["type"] = "static"
    cfg["quant_cfg"] += extra
    if patterns is not None:
        cfg["algorithm"] = {"method": "max", "shared_states": {"weight_global_amax": {"patterns": list(patterns)}}}
    return cfg


def calibrate_linears(model: nn.Module) -> None:
    for module in model.modules():
        if isinstance(module, nn.Linear):
            module(torch.randn(4, module.in_features))


@pytest.fixture(scope="module")
def peer_models():
    """(tree, pattern set) -> the tree converted and max-calibrated by the peer; built once each."""
    cache: dict[tuple[str, str], nn.Module] = {}

    def get(kind: str, patterns: str = "default") -> nn.Module:
        if (kind, patterns) not in cache:
            model, extra = build_tree(kind)
            configured = None if patterns == "default" else PATTERN_SETS[patterns]
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                mtq.quantize(model, static_nvfp4_cfg(configured, extra), calibrate_linears)
            cache[(kind, patterns)] = model
        return cache[(kind, patterns)]

    return get


def quantized_names(model: nn.Module) -> list[str]:
    return [
        name
        for name, module in model.named_modules()
        if getattr(module, "weight_quantizer", None) is not None and module.weight_quantizer.is_enabled
    ]


# --- grouping and unified values ----------------------------------------------------------


@pytest.mark.parametrize("patterns", ["default", "across"])
@pytest.mark.parametrize("kind", TREES)
def test_find_groups_equals_peer_groups(peer_models, kind, patterns):
    model = peer_models(kind)
    names = {id(module): name for name, module in model.named_modules()}
    containers = [name for name, module in model.named_modules() if isinstance(module, nn.ModuleList)]
    peer = [
        (names[id(parent)], tuple(names[id(m)] for m in members))
        for parent, members in peer_utils.find_shared_input_groups(model, PATTERN_SETS[patterns])
    ]
    ours = [
        (g.parent, g.members)
        for g in find_groups(quantized_names(model), PATTERN_SETS[patterns], containers=containers)
    ]
    assert ours == peer
    assert len(ours) >= 2


@pytest.mark.parametrize("patterns", ["default", "across", "off"])
@pytest.mark.parametrize("kind", TREES)
def test_unify_state_dict_equals_peer_global_amax(peer_models, kind, patterns):
    state_dict = peer_models(kind, patterns).state_dict()
    peer = {key: value for key, value in state_dict.items() if key.endswith(GLOBAL)}
    stripped = {key: value for key, value in state_dict.items() if not key.endswith("._global_amax")}
    ours = unify_state_dict(stripped, PATTERN_SETS[patterns])
    assert {key for key in ours if key.endswith(GLOBAL)} == set(peer)
    for key, value in peer.items():
        assert ours[key].dtype == value.dtype and ours[key].shape == value.shape, key
        assert torch.equal(ours[key], value), (key, ours[key].item(), value.item())
    # Non-trivial: with grouping on, some member's global amax is a sibling's, not its own.
    own = {key: reduce_amax(state_dict[key.replace("_global_amax", "_amax")]) for key in peer}
    shared = [key for key in peer if not torch.equal(peer[key], own[key])]
    assert bool(shared) == (patterns != "off")


# --- small functions, one call each -------------------------------------------------------


def test_default_pattern_sets_are_the_peers():
    assert SHARED_PATTERNS == tuple(peer_utils.SHARED_PATTERNS)
    assert SHARED_PATTERNS_ACROSS_EXPERTS == tuple(peer_utils.SHARED_PATTERNS_ACROSS_EXPERTS)


@pytest.mark.parametrize("axis", [None, 0, -1, 1, (0, 2), [1, -1]])
@pytest.mark.parametrize("keepdims", [True, False])
@pytest.mark.parametrize("squeeze_scalar", [True, False])
def test_reduce_amax_equals_peer(axis, keepdims, squeeze_scalar):
    for x in (torch.randn(2, 3, 4), torch.randn(1, 1, 4), torch.tensor([[[1.0, float("nan")]]])):
        ours = reduce_amax(x, axis=axis, keepdims=keepdims, squeeze_scalar=squeeze_scalar)
        peer = peer_utils.reduce_amax(x, axis=axis, keepdims=keepdims, squeeze_scalar=squeeze_scalar)
        assert ours.shape == peer.shape and ours.dtype == peer.dtype
        assert torch.equal(ours.nan_to_num(-1.0), peer.nan_to_num(-1.0))


def test_reduce_amax_float8_equals_peer():
    for dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
        x = (torch.randn(4, 32) * 30).to(dtype)
        for axis in (None, 0, -1):
            assert torch.equal(reduce_amax(x, axis=axis), peer_utils.reduce_amax(x, axis=axis))


@pytest.mark.parametrize("axis", [None, 0, -1, 2, [0, -1], (1,)])
def test_convert_axis_equals_peer(axis):
    x = torch.empty(2, 3, 4)
    assert convert_quantization_axis_to_reduce_axis(x, axis) == peer_utils.convert_quantization_axis_to_reduce_axis(
        x, axis
    )


@pytest.mark.parametrize(
    "quant_cfg",
    [
        {"quant_cfg": [{"quantizer_name": "*weight_quantizer", "cfg": {"num_bits": 8}}], "algorithm": "awq_lite"},
        {"quant_cfg": [], "algorithm": None},
        {"quant_cfg": None},
    ],
)
def test_kv_cache_update_equals_peer(quant_cfg):
    kv = [{"quantizer_name": "*[kv]_bmm_quantizer", "cfg": {"num_bits": (4, 3)}}]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peer = peer_utils.update_quant_cfg_with_kv_cache_quant(quant_cfg, kv)
    assert update_quant_cfg_with_kv_cache_quant(quant_cfg, kv) == peer


@pytest.mark.parametrize(
    "shared_states",
    [
        None,
        {},
        {"weight_global_amax": {}},
        {"weight_global_amax": {"patterns": []}},
        {"weight_global_amax": {"patterns": list(SHARED_PATTERNS_ACROSS_EXPERTS)}},
        {"input_amax": {}},
        {"weight_global_amax": {"regex": []}},
        {"weight_global_amax": {"patterns": ["(q"]}},
        {"weight_global_amax": {"patterns": None}},
        {"weight_global_amax": ["q_proj"]},
    ],
)
def test_shared_states_validation_refuses_what_the_peer_refuses(shared_states):
    try:
        MaxCalibConfig(shared_states=shared_states)
        peer_refuses = False
    except ValueError:
        peer_refuses = True
    try:
        validate_shared_states(shared_states)
        we_refuse = False
    except (TypeError, ValueError):
        we_refuse = True
    assert we_refuse == peer_refuses


# --- NVFP4 bytes against the peer's HF export ---------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_nvfp4_quantize_is_bit_identical_to_peer_hf_export(tmp_path, dtype):
    transformers = pytest.importorskip("transformers")
    from modelopt.torch.export import export_hf_checkpoint
    from safetensors.torch import load_file

    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        architectures=["LlamaForCausalLM"],
    )
    model = transformers.LlamaForCausalLM(config).to(dtype)
    with torch.no_grad():  # spread member magnitudes so the group max differs from each member's own
        for index, name in enumerate(("q_proj", "k_proj", "v_proj")):
            getattr(model.model.layers[0].self_attn, name).weight.mul_(4.0**index)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        mtq.quantize(model, mtq.NVFP4_DEFAULT_CFG, lambda m: m(torch.randint(0, 128, (2, 8))))
    kept = {
        name: (module.weight.detach().clone(), module.weight_quantizer._amax.detach().clone())
        for name, module in model.named_modules()
        if getattr(module, "weight_quantizer", None) is not None and module.weight_quantizer.is_enabled
    }
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        export_hf_checkpoint(model, export_dir=str(tmp_path))
    exported = {}
    for path in tmp_path.glob("*.safetensors"):
        exported.update(load_file(str(path)))
    unified = unify_state_dict({f"{name}.weight_quantizer._amax": amax for name, (_, amax) in kept.items()})
    assert len(kept) == 7
    for name, (weight, _) in kept.items():
        quantized = nvfp4_quantize(weight, unified[f"{name}{GLOBAL}"])
        assert torch.equal(quantized.packed, exported[f"{name}.weight"]), name
        assert torch.equal(
            quantized.block_scale.view(torch.uint8), exported[f"{name}.weight_scale"].view(torch.uint8)
        ), name
        assert torch.equal(quantized.global_scale, exported[f"{name}.weight_scale_2"]), name
    # The fused q/k/v share one weight_scale_2 that differs from what q alone would give.
    attn = "model.layers.0.self_attn"
    scales = {exported[f"{attn}.{r}.weight_scale_2"].item() for r in ("q_proj", "k_proj", "v_proj")}
    assert len(scales) == 1
    alone = nvfp4_quantize(*kept[f"{attn}.q_proj"])
    assert not torch.equal(alone.global_scale, exported[f"{attn}.q_proj.weight_scale_2"])
    assert exported[f"{attn}.q_proj.weight_scale"].dtype == torch.float8_e4m3fn
