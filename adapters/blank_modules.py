"""New modules in bulk: attach makes two per group (a state and its list), 12k on a 48-layer MoE.

``nn.Module.__init__`` costs about 8 us: seventeen attributes set one by one through
``super().__setattr__`` and ten new ``OrderedDict``s. A constructor that only sets
fields (no arguments, no side effects) gives every instance the same fields, so a
copy of one instance's fields is the same as running it: 7 us against 16 us for a
state (its constructor chain and ``register_buffer``), 6 us against 8 us for a list.

A constructor says it only sets fields with ``@fields_only``; torch's ``Module`` and
``ModuleList`` constructors do, called without arguments. Side effects that must
happen for every instance, however it is made, belong in ``__new__``, which runs for
``cls()``, for ``copy``, for unpickling and here.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from typing import TypeVar

from torch import nn

__all__ = ["fields_only", "maker"]

M = TypeVar("M", bound=nn.Module)
F = TypeVar("F", bound=Callable)

_FIELDS_ONLY: set[Callable] = {nn.Module.__init__, nn.ModuleList.__init__}
_ATOMS = (type(None), bool, int, float, str)
_MAKERS: dict[type, Callable[[], nn.Module]] = {}


def fields_only(init: F) -> F:
    """Mark ``init`` (an ``__init__`` taking only ``self``) as one that only sets fields."""
    _FIELDS_ONLY.add(init)
    return init


def maker(cls: type[M]) -> Callable[[], M]:
    """A function returning new instances of ``cls`` equal to ``cls()``.

    It copies the fields of one ``cls()`` when the ``__init__`` that ``cls`` uses is
    marked ``fields_only`` and those fields are atoms or containers of atoms (which a
    shallow copy reproduces); otherwise it is ``cls`` itself.
    """
    made = _MAKERS.get(cls)
    if made is None:
        made = _MAKERS[cls] = _field_copier(cls) or cls
    return made


def _field_copier(cls: type[M]) -> Callable[[], M] | None:
    init = next(vars(klass)["__init__"] for klass in cls.__mro__ if "__init__" in vars(klass))
    if init not in _FIELDS_ONLY:
        return None
    fields = cls().__dict__
    if not all(map(_plain, fields.values())):
        return None
    atoms = {name: value for name, value in fields.items() if type(value) in (*_ATOMS, tuple)}
    # an empty container is made by its type (about twice as fast as copying one)
    empty = [(name, type(value)) for name, value in fields.items() if name not in atoms and not value]
    filled = [(name, value) for name, value in fields.items() if name not in atoms and value]
    new = cls.__new__

    def make() -> M:
        module = new(cls)
        module.__dict__.update(atoms)
        module.__dict__.update([(name, kind()) for name, kind in empty])
        module.__dict__.update([(name, value.copy()) for name, value in filled])
        return module

    return make


def _plain(value) -> bool:
    """An atom, a tuple of atoms, or a dict/set/list of atoms: a shallow copy is a fresh one."""
    kind = type(value)
    if kind in _ATOMS:
        return True
    if kind in (tuple, set, list):
        return all(type(item) in _ATOMS for item in value)
    if kind in (dict, OrderedDict):
        return all(type(item) in _ATOMS for pair in value.items() for item in pair)
    return False
