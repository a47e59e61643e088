"""``dataclass``: the standard library's dataclasses, with methods shared instead of compiled.

Python 3.11 builds a dataclass by writing each method's source and compiling it (one
``exec`` per ``__init__``, ``__repr__``, ``__eq__``, and two more when frozen): about
1 ms per class, 22 ms of the ~75 ms of imports that ``portpool run`` spends before its
command starts (18 classes; ``python -m benchmarks --only bench_cli``). Here the
standard decorator still makes the class a dataclass (``dataclasses.fields``,
``replace``, ``asdict``, ``__match_args__`` work unchanged) but is asked for none of
those methods; the same methods, written once below, read the class's fields instead.
The difference a caller sees: an instance takes about 1.3 us longer to create, and an
acquire + release of a port creates three (about 5% of that call).

Supported: ``frozen``, fields with ``default``, ``default_factory``, ``repr=False``,
``compare=False``, ``hash``, ``init=False``, and ``__post_init__``; methods the class
defines itself are kept, as the standard decorator keeps them. Not supported (refused):
keyword-only fields; ``InitVar`` pseudo-fields are not passed to ``__post_init__``.
"""

from __future__ import annotations

import dataclasses
import inspect
import itertools
import reprlib
import sys
from collections.abc import Callable
from dataclasses import MISSING, Field, FrozenInstanceError, field
from operator import attrgetter
from typing import Any, TypeVar, dataclass_transform, overload

__all__ = ["dataclass", "field"]

_C = TypeVar("_C", bound=type)


@overload
def dataclass(cls: _C, /) -> _C: ...


@overload
def dataclass(*, frozen: bool = False) -> Callable[[_C], _C]: ...


@dataclass_transform(field_specifiers=(field,))
def dataclass(cls: _C | None = None, /, *, frozen: bool = False) -> _C | Callable[[_C], _C]:
    """Make ``cls`` a dataclass, as ``dataclasses.dataclass(cls, frozen=frozen)`` does.

    Use as ``@dataclass`` or ``@dataclass(frozen=True)``. Raises what the standard
    decorator raises for a class it refuses (``ValueError`` for a mutable default,
    ``TypeError`` for a field without a default after one with a default).
    """

    def wrap(cls: _C) -> _C:
        return _process(cls, frozen)

    return wrap if cls is None else wrap(cls)


def _process(cls: _C, frozen: bool) -> _C:
    own = cls.__dict__
    documented = bool(own.get("__doc__"))
    guarded = [name for name in ("__setattr__", "__delattr__") if name in own]
    # The standard decorator checks the fields and records them; it adds no method, but
    # for a subclass of a dataclass the two frozen ones: told ``frozen`` there, it checks
    # that the bases are frozen just as this class (no class of portpool inherits one).
    inherits = any(dataclasses.is_dataclass(base) for base in cls.__mro__[1:])
    dataclasses.dataclass(cls, init=False, repr=False, eq=False, frozen=frozen and inherits)
    # What the class is, for that check in its subclasses and for whoever reads it.
    params = own["__dataclass_params__"]
    params.init = params.repr = params.eq = True
    params.frozen = frozen
    fields = dataclasses.fields(cls)
    if any(f.kw_only is True for f in fields):
        # The shared __init__ takes every field by position too: refused, not ignored.
        raise TypeError(f"{cls.__qualname__}: keyword-only fields are not supported here")
    methods: dict[str, Any] = {
        "__init__": _make_init(cls, fields, frozen),
        "__repr__": _make_repr(tuple(f.name for f in fields if f.repr)),
        "__eq__": _make_eq(tuple(f.name for f in fields if f.compare)),
    }
    for name, method in methods.items():
        if name not in own:  # the class's own method wins, as with the standard decorator
            _set_method(cls, name, method)
            if name == "__init__":
                cls.__signature__ = _Signature(method, fields)  # type: ignore[attr-defined]
    if frozen:
        names = frozenset(f.name for f in fields)
        for name, method in (
            ("__setattr__", _make_frozen_setattr(cls, names)),
            ("__delattr__", _make_frozen_delattr(cls, names)),
        ):
            if name in guarded:
                raise TypeError(f"Cannot overwrite attribute {name} in class {cls.__name__}")
            _set_method(cls, name, method)
    # The standard decorator's rule for __hash__ with eq=True: a class that defines
    # __hash__ keeps it; otherwise frozen hashes its compared fields, and mutable is
    # unhashable (a class body's own __eq__ alone leaves __hash__ = None there).
    explicit = own.get("__hash__", MISSING)
    if explicit is MISSING or (explicit is None and "__eq__" in own):
        if frozen:
            hashed = tuple(f.name for f in fields if (f.compare if f.hash is None else f.hash))
            _set_method(cls, "__hash__", _make_hash(hashed))
        else:
            cls.__hash__ = None  # type: ignore[assignment]
    if not documented:  # as the standard decorator names a class without a docstring
        cls.__doc__ = cls.__name__ + str(inspect.signature(cls)).replace(" -> None", "")
    return cls


class _Factory:
    """A default_factory's place in a signature, shown as the standard one shows it."""

    def __repr__(self) -> str:
        return "<factory>"


class _Signature:
    """What ``inspect.signature`` (help, IDEs) reads for the class: the init fields as the
    standard compiled ``__init__`` lists them, built when asked."""

    def __init__(self, init: Callable[..., None], fields: tuple[Field[Any], ...]) -> None:
        self.init, self.fields = init, fields

    def __get__(self, obj: object, owner: type[object]) -> inspect.Signature | None:
        if obj is not None or owner.__init__ is not self.init:
            return None  # an instance, or a subclass's own __init__: inspect reads that
        factory = _Factory()
        parameters = [
            inspect.Parameter(
                f.name,
                inspect.Parameter.POSITIONAL_OR_KEYWORD,
                default=(
                    f.default
                    if f.default is not MISSING
                    else factory
                    if f.default_factory is not MISSING
                    else inspect.Parameter.empty
                ),
                annotation=f.type,
            )
            for f in self.fields
            if f.init
        ]
        return inspect.Signature(parameters, return_annotation=None)


def _set_method(cls: type, name: str, method: Any) -> None:
    method.__name__, method.__qualname__ = name, f"{cls.__qualname__}.{name}"
    method.__module__ = cls.__module__  # where the standard decorator compiles its methods
    setattr(cls, name, method)


def _make_init(
    cls: type, fields: tuple[dataclasses.Field[Any], ...], frozen: bool
) -> Callable[..., None]:
    names = tuple(f.name for f in fields if f.init)
    known = frozenset(names)
    defaults = {f.name: f.default for f in fields if f.default is not MISSING}
    factories = {f.name: f.default_factory for f in fields if f.default_factory is not MISSING}
    later = tuple(f.name for f in fields if not f.init)
    optional = defaults.keys() | factories.keys()
    for before, after in itertools.pairwise(names):
        # What the standard decorator checks when it writes __init__'s signature.
        if before in optional and after not in optional:
            raise TypeError(f"non-default argument {after!r} follows default argument")
    post_init = hasattr(cls, "__post_init__")
    # As the standard method: past the frozen guard, else ``self.x = x`` (a subclass's
    # own __setattr__ sees the fields).
    setter: Callable[[Any, str, Any], None] = object.__setattr__ if frozen else setattr
    title = f"{cls.__qualname__}.__init__()"
    # The standard method's words for a bad call, which count ``self``.
    required = tuple(n for n in names if n not in optional)
    low, high = len(required) + 1, len(names) + 1
    takes = (
        f"from {low} to {high} positional arguments"
        if low < high
        else f"{high} positional argument{'s' if high > 1 else ''}"
    )

    def init(self: Any, *args: Any, **kwargs: Any) -> None:
        if kwargs and not known.issuperset(kwargs):
            unknown = next(k for k in kwargs if k not in known)
            raise TypeError(f"{title} got an unexpected keyword argument {unknown!r}")
        if len(args) > len(names):
            raise TypeError(f"{title} takes {takes} but {len(args) + 1} were given")
        for name, value in zip(names, args, strict=False):
            if name in kwargs:
                raise TypeError(f"{title} got multiple values for argument {name!r}")
            setter(self, name, value)
        for name in names[len(args) :]:
            if name in kwargs:
                setter(self, name, kwargs[name])
            elif name in defaults:
                setter(self, name, defaults[name])
            elif name in factories:
                setter(self, name, factories[name]())
            else:
                missing = [n for n in required[len(args) :] if n not in kwargs]
                raise TypeError(f"{title} {_missing(missing)}")
        for name in later:
            if name in factories:
                setter(self, name, factories[name]())
            elif name in defaults:
                setter(self, name, defaults[name])
        if post_init:
            self.__post_init__()

    return init


def _missing(names: list[str]) -> str:
    """``missing 2 required positional arguments: 'a' and 'b'``, as Python says it."""
    quoted = [repr(name) for name in names]
    if len(quoted) > 2:
        listed = ", ".join(quoted[:-1]) + ", and " + quoted[-1]
    else:
        listed = " and ".join(quoted)
    plural = "s" if len(names) > 1 else ""
    return f"missing {len(names)} required positional argument{plural}: {listed}"


def _make_repr(names: tuple[str, ...]) -> Callable[[Any], str]:
    # As the standard method: an instance met again inside its own fields shows "...".
    @reprlib.recursive_repr()
    def show(self: Any) -> str:
        shown = ", ".join(f"{name}={getattr(self, name)!r}" for name in names)
        return f"{type(self).__qualname__}({shown})"

    return show


def _make_eq(names: tuple[str, ...]) -> Callable[[Any, object], Any]:
    if sys.version_info >= (3, 13):
        return _make_eq_by_field(names)
    values = _values(names)

    def equal(self: Any, other: object) -> Any:
        # As the standard method before 3.13: a tuple each, so an element compares by
        # identity first.
        if other.__class__ is not self.__class__:
            return NotImplemented
        return values(self) == values(other)

    return equal


def _make_eq_by_field(names: tuple[str, ...]) -> Callable[[Any, object], Any]:
    getters = tuple(attrgetter(name) for name in names)

    def equal(self: Any, other: object) -> Any:
        # As the standard method from 3.13 on: the instance itself is equal, another one
        # compares field by field, ``a == a2 and b == b2`` (one nan in both: unequal).
        if self is other:
            return True
        if other.__class__ is not self.__class__:
            return NotImplemented
        result: Any = True
        for get in getters:
            result = get(self) == get(other)
            if not result:
                break
        return result

    return equal


def _make_hash(names: tuple[str, ...]) -> Callable[[Any], int]:
    values = _values(names)

    def hashed(self: Any) -> int:
        return hash(values(self))

    return hashed


def _values(names: tuple[str, ...]) -> Callable[[Any], tuple[Any, ...]]:
    """The named attributes' values as a tuple (attrgetter alone gives a bare value for one
    name and refuses none)."""
    if len(names) > 1:
        return attrgetter(*names)
    if names:
        one = attrgetter(names[0])
        return lambda obj: (one(obj),)
    return lambda obj: ()


def _make_frozen_setattr(
    owner: type[Any], names: frozenset[str]
) -> Callable[[Any, str, Any], None]:
    def assign(self: Any, name: str, value: Any) -> None:
        if type(self) is owner or name in names:
            raise FrozenInstanceError(f"cannot assign to field {name!r}")
        super(owner, self).__setattr__(name, value)

    return assign


def _make_frozen_delattr(owner: type[Any], names: frozenset[str]) -> Callable[[Any, str], None]:
    def delete(self: Any, name: str) -> None:
        if type(self) is owner or name in names:
            raise FrozenInstanceError(f"cannot delete field {name!r}")
        super(owner, self).__delattr__(name)

    return delete
