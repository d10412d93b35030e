"""Examples for sharedquant.adapters.context: replace_function and export mode."""

from __future__ import annotations

import types

import pytest

from sharedquant.adapters import export_torch_mode, is_torch_export_mode, replace_function


def _package():
    return types.SimpleNamespace(scale=lambda x: x * 2)


def test_replace_function_swaps_inside_and_restores_after():
    package = _package()
    original = package.scale
    with replace_function(package, "scale", lambda x: x * 3):
        assert package.scale(1) == 3
        assert package._scale is original  # the default cache name is "_" + name
    assert package.scale is original
    assert not hasattr(package, "_scale")


def test_replace_function_custom_cache_name():
    package = _package()
    original = package.scale
    with replace_function(package, "scale", lambda x: 0, og_func_cache_name="orig_scale"):
        assert package.orig_scale is original
        assert package.scale(5) == 0
    assert package.scale is original
    assert not hasattr(package, "orig_scale")


def test_replace_function_restores_when_the_body_raises():
    package = _package()
    original = package.scale
    with pytest.raises(KeyError, match="boom"):
        with replace_function(package, "scale", lambda x: -x):
            raise KeyError("boom")
    assert package.scale is original
    assert not hasattr(package, "_scale")


def test_replace_function_nests_on_the_same_name():
    package = _package()
    original = package.scale
    outer, inner = (lambda x: 10), (lambda x: 20)
    with replace_function(package, "scale", outer):
        with replace_function(package, "scale", inner):
            assert package.scale(0) == 20
            assert package._scale is outer
        assert package.scale is outer
        assert package._scale is original  # the outer cache survives the inner exit
    assert package.scale is original
    assert not hasattr(package, "_scale")


def test_replace_function_puts_back_an_attribute_the_cache_name_shadowed():
    package = _package()
    package._scale = "private"
    with replace_function(package, "scale", lambda x: x):
        assert package._scale != "private"
    assert package._scale == "private"


def test_replace_function_unknown_name_changes_nothing():
    package = _package()
    with pytest.raises(AttributeError, match="missing"):
        with replace_function(package, "missing", lambda: None):
            pass
    assert sorted(vars(package)) == ["scale"]


def test_export_torch_mode_is_scoped_and_nests():
    assert not is_torch_export_mode()
    with export_torch_mode():
        assert is_torch_export_mode()
        with export_torch_mode():
            assert is_torch_export_mode()
        assert is_torch_export_mode()  # leaving the inner block keeps the outer one on
    assert not is_torch_export_mode()


def test_export_torch_mode_restored_when_the_body_raises():
    with pytest.raises(RuntimeError, match="inside"):
        with export_torch_mode():
            raise RuntimeError("inside")
    assert not is_torch_export_mode()
