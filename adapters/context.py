"""Context managers that patch process-wide state for the duration of a block.

Both restore what they changed on the way out, also when the block raises.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

__all__ = ["export_torch_mode", "is_torch_export_mode", "replace_function"]

_export_mode = False
_MISSING = object()


@contextmanager
def replace_function(package, name: str, new_func: Callable, og_func_cache_name: str | None = None) -> Iterator[None]:
    """Replace ``package.<name>`` by ``new_func`` inside the block.

    The original stays reachable as ``package.<og_func_cache_name>`` (default
    ``"_" + name``) inside the block; both attributes are put back afterwards, also
    when the block raises.

    Raises:
        AttributeError: ``package`` has no attribute ``name``.
    """
    cache_name = og_func_cache_name or "_" + name
    original = getattr(package, name)
    # The cache name may already be taken (an outer replace of the same function, or a
    # private attribute of the package): put back what was there, not just delete it.
    shadowed = getattr(package, cache_name, _MISSING)
    setattr(package, name, new_func)
    setattr(package, cache_name, original)
    try:
        yield
    finally:
        setattr(package, name, original)
        if shadowed is _MISSING:
            delattr(package, cache_name)
        else:
            setattr(package, cache_name, shadowed)


@contextmanager
def export_torch_mode() -> Iterator[None]:
    """Enable export mode inside the block (nestable; restored on exit)."""
    global _export_mode
    previous = _export_mode
    _export_mode = True
    try:
        yield
    finally:
        _export_mode = previous


def is_torch_export_mode() -> bool:
    """Whether the caller runs inside ``export_torch_mode``."""
    return _export_mode
