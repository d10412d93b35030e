"""Examples for sharedquant.core.config: the KV-cache config merge and the shared_states knob."""

from __future__ import annotations

import re

import pytest

from sharedquant.core.config import (
    SHARED_STATE_NAMES,
    resolve_patterns,
    update_quant_cfg_with_kv_cache_quant,
    validate_shared_states,
)
from sharedquant.core.groups import SHARED_PATTERNS, find_groups

KV = [{"quantizer_name": "*[kv]_bmm_quantizer", "cfg": {"num_bits": (4, 3)}}]
DISABLE_ALL = {"quantizer_name": "*", "enable": False}


# --- update_quant_cfg_with_kv_cache_quant -------------------------------------------------


def test_kv_entries_are_appended_to_a_deep_copy():
    quant_cfg = {
        "quant_cfg": [{"quantizer_name": "*weight_quantizer", "cfg": {"num_bits": 8}}],
        "algorithm": "smoothquant",
    }
    updated = update_quant_cfg_with_kv_cache_quant(quant_cfg, KV)
    assert updated["quant_cfg"] == quant_cfg["quant_cfg"] + KV
    assert updated["algorithm"] == "smoothquant"
    # Nothing of the result aliases the arguments.
    updated["quant_cfg"][0]["cfg"]["num_bits"] = 4
    updated["quant_cfg"][-1]["cfg"]["num_bits"] = (5, 2)
    assert quant_cfg["quant_cfg"][0]["cfg"]["num_bits"] == 8
    assert KV[0]["cfg"]["num_bits"] == (4, 3)
    assert len(quant_cfg["quant_cfg"]) == 1


@pytest.mark.parametrize("inner", [[], None, "missing"])
def test_empty_inner_list_starts_from_disabling_everything(inner):
    quant_cfg = {"algorithm": "max"} if inner == "missing" else {"quant_cfg": inner, "algorithm": "max"}
    updated = update_quant_cfg_with_kv_cache_quant(quant_cfg, KV)
    assert updated["quant_cfg"] == [DISABLE_ALL] + KV


@pytest.mark.parametrize("algorithm", [None, "", "missing"])
def test_algorithm_defaults_to_max(algorithm):
    quant_cfg = {"quant_cfg": [DISABLE_ALL]} if algorithm == "missing" else {"quant_cfg": [], "algorithm": algorithm}
    assert update_quant_cfg_with_kv_cache_quant(quant_cfg, KV)["algorithm"] == "max"


def test_a_given_algorithm_config_is_kept():
    algorithm = {"method": "max", "shared_states": {"weight_global_amax": {"patterns": []}}}
    updated = update_quant_cfg_with_kv_cache_quant({"quant_cfg": [], "algorithm": algorithm}, KV)
    assert updated["algorithm"] == algorithm and updated["algorithm"] is not algorithm


def test_kv_cfg_may_be_any_iterable_of_entries():
    updated = update_quant_cfg_with_kv_cache_quant({"quant_cfg": [DISABLE_ALL]}, tuple(KV))
    assert updated["quant_cfg"] == [DISABLE_ALL] + KV


@pytest.mark.parametrize(
    ("quant_cfg", "kv", "match"),
    [
        (
            {"quant_cfg": {"*weight_quantizer": {"num_bits": 8}}, "algorithm": "max"},
            KV,
            r"quant_cfg\['quant_cfg'\] must be a list of quantizer entries, got dict",
        ),
        (
            {"quant_cfg": []},
            {"*[kv]_bmm_quantizer": {"num_bits": (4, 3)}},
            "kv_cache_quant_cfg must be a list of quantizer entries .*, got dict",
        ),
        ({"quant_cfg": []}, None, "kv_cache_quant_cfg must be a list of quantizer entries .*, got NoneType"),
        ([DISABLE_ALL], KV, "quant_cfg must be a mapping with 'quant_cfg' and 'algorithm', got list"),
    ],
)
def test_legacy_dict_configs_are_refused_not_flattened_into_their_keys(quant_cfg, kv, match):
    with pytest.raises(TypeError, match=f"update_quant_cfg_with_kv_cache_quant: {match}"):
        update_quant_cfg_with_kv_cache_quant(quant_cfg, kv)


# --- resolve_patterns ---------------------------------------------------------------------


@pytest.mark.parametrize("shared_states", [None, {}, {"weight_global_amax": {}}])
def test_omitted_patterns_mean_the_defaults(shared_states):
    patterns = resolve_patterns(shared_states, "weight_global_amax", SHARED_PATTERNS)
    assert patterns == list(SHARED_PATTERNS)


def test_configured_patterns_replace_the_defaults():
    custom = [r"(.*)\.(?:wq|wk|wv)"]
    assert (
        resolve_patterns({"weight_global_amax": {"patterns": custom}}, "weight_global_amax", SHARED_PATTERNS) == custom
    )


def test_an_empty_pattern_list_disables_grouping(llama_names):
    patterns = resolve_patterns({"weight_global_amax": {"patterns": []}}, "weight_global_amax", SHARED_PATTERNS)
    assert patterns == []
    assert find_groups(llama_names, patterns) == ()


def test_resolve_validates_first():
    with pytest.raises(ValueError, match="unknown state"):
        resolve_patterns({"input_global_amax": {}}, "weight_global_amax", SHARED_PATTERNS)


# --- validate_shared_states ---------------------------------------------------------------


def test_known_configs_pass():
    assert SHARED_STATE_NAMES == ("weight_global_amax",)
    validate_shared_states(None)
    validate_shared_states({})
    validate_shared_states({"weight_global_amax": {"patterns": list(SHARED_PATTERNS)}})


@pytest.mark.parametrize(
    ("shared_states", "error", "match"),
    [
        (
            {"weight_global_amax": {}, "input_amax": {}},
            ValueError,
            re.escape("shared_states: unknown state(s) ['input_amax']; expected keys from ['weight_global_amax']"),
        ),
        (
            {"weight_global_amax": {"patterns": [], "pattern": []}},
            ValueError,
            re.escape("shared_states['weight_global_amax']: unknown field(s) ['pattern']; expected ['patterns']"),
        ),
        (
            {"weight_global_amax": {"patterns": [r"(.*)\.q_proj", "q_proj)"]}},
            ValueError,
            re.escape("shared_states['weight_global_amax']['patterns']: invalid regex 'q_proj)'"),
        ),
        (
            {"weight_global_amax": {"patterns": r"(.*)\.q_proj"}},
            TypeError,
            re.escape(
                "shared_states['weight_global_amax']['patterns']: "
                "patterns must be a sequence of regex strings, got the string"
            ),
        ),
        (
            {"weight_global_amax": {"patterns": None}},
            TypeError,
            re.escape(
                "shared_states['weight_global_amax']['patterns']: "
                "patterns must be a sequence of regex strings, got None"
            ),
        ),
        (
            {"weight_global_amax": ["q_proj"]},
            TypeError,
            re.escape("shared_states['weight_global_amax'] must be a mapping like {'patterns': [...]}, got ['q_proj']"),
        ),
        ([("weight_global_amax", {})], TypeError, "shared_states must be a mapping of state name to config, got list"),
    ],
)
def test_bad_configs_are_refused_naming_the_offender(shared_states, error, match):
    with pytest.raises(error, match=match):
        validate_shared_states(shared_states)
