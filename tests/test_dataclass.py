"""portpool's ``dataclass`` behaves as the standard library's, side by side on the same
class bodies: construction, defaults, errors, repr, equality, hashing, frozenness and the
dataclasses functions (fields, replace, asdict), pickling and copying."""

from __future__ import annotations

import copy
import dataclasses
import inspect
import pickle
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from portpool import _dataclass
from portpool._gc import GcReport
from portpool.layout import Service
from portpool.pool import Lease


def make(decorator: Callable[..., Any], frozen: bool) -> dict[str, type]:
    """The same class bodies under ``decorator``: plain fields, defaults, factories,
    fields left out of repr and comparison, a __post_init__, a class's own __repr__."""

    @decorator(frozen=frozen)
    class Point:
        x: int
        y: int = 0
        tags: list[str] = dataclasses.field(default_factory=list)
        note: str = dataclasses.field(default="", compare=False, repr=False)

    @decorator(frozen=frozen)
    class Checked:
        name: str
        size: int = 1

        def __post_init__(self) -> None:
            if self.size < 1:
                raise ValueError(f"size {self.size} of {self.name}")

    @decorator(frozen=frozen)
    class Own:
        value: float

        def __repr__(self) -> str:
            return f"<own {self.value}>"

    @decorator(frozen=frozen)
    class Empty:
        pass

    return {"Point": Point, "Checked": Checked, "Own": Own, "Empty": Empty}


def outcome(action: Callable[[], Any]) -> tuple[str, Any]:
    try:
        return ("value", action())
    except Exception as e:  # the kind of error is what must match, not its words
        return ("error", type(e))


def both(frozen: bool) -> tuple[dict[str, type], dict[str, type]]:
    return make(dataclasses.dataclass, frozen), make(_dataclass.dataclass, frozen)


CALLS: list[tuple[str, tuple[Any, ...], dict[str, Any]]] = [
    ("Point", (1,), {}),
    ("Point", (1, 2), {}),
    ("Point", (1, 2, ["a"], "n"), {}),
    ("Point", (), {"x": 3, "note": "n"}),
    ("Point", (1,), {"y": 5, "tags": ["b"]}),
    ("Point", (), {}),  # missing x
    ("Point", (1, 2, [], "n", 5), {}),  # too many
    ("Point", (1,), {"x": 2}),  # twice
    ("Point", (1,), {"z": 2}),  # unknown
    ("Checked", ("web",), {}),
    ("Checked", ("web", 0), {}),  # refused by __post_init__
    ("Own", (1.5,), {}),
    ("Own", (float("nan"),), {}),
    ("Empty", (), {}),
    ("Empty", (1,), {}),
]


@pytest.mark.parametrize("frozen", [False, True])
@pytest.mark.parametrize(("cls", "args", "kwargs"), CALLS)
def test_construction_and_repr_match(
    frozen: bool, cls: str, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> None:
    std, ours = both(frozen)
    expected = outcome(lambda: std[cls](*args, **kwargs))
    got = outcome(lambda: ours[cls](*args, **kwargs))
    assert got[0] == expected[0]
    if expected[0] == "error":
        assert got[1] is expected[1]
        return
    assert repr(got[1]) == repr(expected[1])
    assert dataclasses.asdict(got[1]) == dataclasses.asdict(expected[1])
    assert [f.name for f in dataclasses.fields(got[1])] == [
        f.name for f in dataclasses.fields(expected[1])
    ]
    assert type(got[1]).__match_args__ == type(expected[1]).__match_args__


def pairs(classes: dict[str, type]) -> list[tuple[Any, Any]]:
    nan = float("nan")
    point, own = classes["Point"], classes["Own"]
    shared = ["t"]
    return [
        (point(1, 2), point(1, 2)),
        (point(1, 2), point(1, 3)),
        (point(1, 2, note="a"), point(1, 2, note="b")),  # note is not compared
        (point(1, 2, ["a"]), point(1, 2, ["b"])),
        (point(1, 2, shared), point(1, 2, shared)),
        (own(nan), own(nan)),  # different nan objects: unequal
        (classes["Empty"](), classes["Empty"]()),
        (point(1), (1, 0, [], "")),  # another type: NotImplemented, so unequal
    ]


@pytest.mark.parametrize("frozen", [False, True])
def test_equality_and_hashing_match(frozen: bool) -> None:
    std, ours = both(frozen)
    nan = float("nan")
    for (a, b), (c, d) in zip(pairs(std), pairs(ours), strict=True):
        assert (c == d, c != d) == (a == b, a != b)
    for name in std:
        assert (std[name].__hash__ is None) == (ours[name].__hash__ is None), name
    if frozen:
        # the same object twice: equal though nan != nan, and equal objects hash alike
        one = ours["Own"](nan)
        assert one == one and hash(one) == hash(copy.copy(one))
        assert hash(ours["Point"](1, 2, (), "a")) == hash(ours["Point"](1, 2, (), "b"))
        assert hash(ours["Point"](1, 2, ())) == hash(std["Point"](1, 2, ()))


@pytest.mark.parametrize("frozen", [False, True])
def test_frozen_assignment_and_deletion_match(frozen: bool) -> None:
    std, ours = both(frozen)
    for classes in (std, ours):
        a = classes["Point"](1)
        assert outcome(lambda a=a: setattr(a, "x", 5)) == (
            ("error", dataclasses.FrozenInstanceError) if frozen else ("value", None)
        )
        assert outcome(lambda a=a: delattr(a, "y"))[0] == ("error" if frozen else "value")
        assert outcome(lambda a=a: setattr(a, "other", 1))[0] == ("error" if frozen else "value")


@pytest.mark.parametrize("frozen", [False, True])
def test_replace_pickle_and_copy(frozen: bool) -> None:
    point = make(_dataclass.dataclass, frozen)["Point"]
    a = point(1, 2, ["x"], "n")
    b = dataclasses.replace(a, y=7)
    assert (b.x, b.y, b.tags, b.note) == (1, 7, ["x"], "n")
    assert a.y == 2
    for again in (copy.copy(a), copy.deepcopy(a)):
        assert again == a and repr(again) == repr(a)
    with pytest.raises(TypeError):
        dataclasses.replace(a, z=1)
    with pytest.raises(ValueError, match="size 0"):
        dataclasses.replace(make(_dataclass.dataclass, frozen)["Checked"]("a"), size=0)


def test_project_types_pickle() -> None:
    service = Service(name="web", base=6000, size=3)
    report = GcReport(instances=["x 1"])
    for value in (service, report):
        again = pickle.loads(pickle.dumps(value))
        assert again == value and repr(again) == repr(value)


def test_each_instance_gets_its_own_default_factory_value() -> None:
    point = make(_dataclass.dataclass, False)["Point"]
    a, b = point(1), point(2)
    a.tags.append("only a")
    assert b.tags == []


def test_refuses_what_the_standard_decorator_refuses() -> None:
    with pytest.raises(ValueError, match="mutable default"):

        @_dataclass.dataclass
        class Bad:
            items: list[int] = []  # noqa: RUF012

    with pytest.raises(TypeError, match="non-default argument"):

        @_dataclass.dataclass
        class Order:
            a: int = 0
            b: int  # type: ignore[misc]

    with pytest.raises(TypeError, match="__setattr__"):

        @_dataclass.dataclass(frozen=True)
        class Guarded:
            a: int

            def __setattr__(self, name: str, value: object) -> None:
                raise AttributeError(name)


def test_the_project_types_are_dataclasses_with_their_own_methods_kept() -> None:
    service = Service(name="web", base=6000, size=3)
    assert dataclasses.is_dataclass(service)
    moved = dataclasses.replace(service, base=6100)
    assert (moved.base, moved.name) == (6100, "web")
    assert service != moved and service == dataclasses.replace(moved, base=6000)
    assert hash(service) == hash(dataclasses.replace(moved, base=6000))
    with pytest.raises(dataclasses.FrozenInstanceError):
        service.base = 1  # type: ignore[misc]
    # Lease keeps the __repr__ it writes itself, and is unhashable as a mutable dataclass.
    assert Lease.__repr__.__qualname__ == "Lease.__repr__"
    assert Lease.__hash__ is None


def test_the_package_builds_its_dataclasses_with_its_own_decorator() -> None:
    """A class made by the standard decorator costs its ~1 ms of compiling at every
    start of the command again (the reason for portpool's decorator)."""
    package = Path(_dataclass.__file__).parent
    direct = [
        str(path.relative_to(package))
        for path in sorted(package.rglob("*.py"))
        if path.name != "_dataclass.py"
        and re.search(
            r"^\s*(from dataclasses import .*\bdataclass\b|@dataclasses\.dataclass)",
            path.read_text(),
            re.MULTILINE,
        )
    ]
    assert direct == []


def test_subclasses_inherit_frozenness_as_with_the_standard_decorator() -> None:
    """A subclass must be frozen exactly when its dataclass bases are, whichever of the two
    decorators made either; ``__dataclass_params__`` says what the class really is (a
    user's ``@dataclasses.dataclass(frozen=True)`` subclass of Service was refused)."""
    decorators: list[Callable[..., Any]] = [dataclasses.dataclass, _dataclass.dataclass]
    for base_decorator in decorators:
        for base_frozen in (False, True):

            @base_decorator(frozen=base_frozen)
            class Base:
                a: int

            for decorator in decorators:
                for frozen in (False, True):

                    def subclass(decorator: Any = decorator, frozen: bool = frozen) -> Any:
                        @decorator(frozen=frozen)
                        class Sub(Base):
                            b: int = 0

                        return Sub(1)

                    if frozen != base_frozen:
                        with pytest.raises(TypeError, match="cannot inherit"):
                            subclass()
                        continue
                    made = subclass()
                    assert repr(made).endswith("Sub(a=1, b=0)")
                    params = type(made).__dataclass_params__
                    assert (params.init, params.repr, params.eq, params.frozen) == (
                        True,
                        True,
                        True,
                        frozen,
                    )
                    if frozen:
                        with pytest.raises(dataclasses.FrozenInstanceError):
                            made.a = 2
                    else:
                        made.a = 2
    mine: Any = dataclasses.dataclass(frozen=True)(type("Mine", (Service,), {}))
    assert mine(name="web", base=6000, size=3) == mine(name="web", base=6000, size=3)


@pytest.mark.parametrize("frozen", [False, True])
def test_equality_compares_as_this_pythons_standard_decorator(frozen: bool) -> None:
    """Python 3.13 compares field by field (one nan in two instances: unequal), earlier
    versions as tuples (an element compares by identity first: equal)."""
    std, ours = both(frozen)
    nan = float("nan")
    before_313 = sys.version_info < (3, 13)
    assert (std["Own"](nan) == std["Own"](nan)) is before_313
    assert (ours["Own"](nan) == ours["Own"](nan)) is before_313
    same = ours["Own"](nan)
    assert same == same  # the very instance: equal on every version


def test_a_bad_call_is_told_in_the_standard_words() -> None:
    """Every missing argument is named, and how many positional ones the class takes."""

    def classes(decorator: Callable[..., Any]) -> tuple[Any, ...]:
        @decorator(frozen=True)
        class Three:
            a: int
            b: int
            c: int
            d: int = 0

        return Three, make(decorator, False)["Empty"]

    def error(action: Callable[[], Any]) -> str:
        with pytest.raises(TypeError) as caught:
            action()
        return str(caught.value)

    (std, std_empty), (ours, ours_empty) = (
        classes(dataclasses.dataclass),
        classes(_dataclass.dataclass),
    )
    calls: list[Callable[[Any, Any], Any]] = [
        lambda three, empty: three(),
        lambda three, empty: three(1),
        lambda three, empty: three(1, 2),
        lambda three, empty: three(1, c=3),
        lambda three, empty: three(1, 2, 3, 4, 5),
        lambda three, empty: empty(1),
        lambda three, empty: empty(1, 2),
    ]
    for call in calls:
        ours_said = error(lambda call=call: call(ours, ours_empty))
        assert ours_said == error(lambda call=call: call(std, std_empty))


@pytest.mark.parametrize("frozen", [False, True])
def test_a_repr_that_reaches_its_own_instance_says_dots(frozen: bool) -> None:
    """An instance inside its own fields is shown as ``...``, as the standard repr does
    (portpool's recursed until RecursionError)."""
    std, ours = both(frozen)
    shown = []
    for classes in (std, ours):
        point = classes["Point"](1)
        point.tags.append(point)
        shown.append(repr(point).split("Point", 1)[1])
    assert shown[1] == shown[0] == "(x=1, y=0, tags=[...])"


@pytest.mark.parametrize("frozen", [False, True])
def test_help_and_inspect_see_the_fields_as_parameters(frozen: bool) -> None:
    """``inspect.signature`` (help(), IDEs, documentation tools) lists the fields as the
    standard compiled __init__ does, not ``(*args, **kwargs)``; so does the docstring of
    a class without one; a subclass with its own __init__ shows that one."""
    std, ours = both(frozen)
    for name in std:
        assert str(inspect.signature(ours[name])) == str(inspect.signature(std[name])), name
        assert ours[name].__doc__ == std[name].__doc__, name
    assert str(inspect.signature(ours["Point"])).startswith("(x: 'int', y: 'int' = 0, tags:")

    class Plain(ours["Point"]):  # type: ignore[misc]
        pass

    class Own(ours["Point"]):  # type: ignore[misc]
        def __init__(self, z: int) -> None:
            super().__init__(z)

    assert str(inspect.signature(Plain)) == str(inspect.signature(std["Point"]))
    assert str(inspect.signature(Own)) == "(z: 'int') -> 'None'"
    assert str(inspect.signature(Service)).startswith("(name: 'str', base: 'int', size: 'int'")


def test_a_mutable_init_assigns_through_the_class_setattr() -> None:
    """The standard __init__ of a mutable dataclass assigns ``self.x = x``, so a subclass's
    own __setattr__ (a user's GcReport that logs or validates) sees every field; a frozen
    one sets them past its guard."""
    seen: dict[str, list[str]] = {}
    for label, base in (
        ("std", make(dataclasses.dataclass, False)),
        ("ours", make(_dataclass.dataclass, False)),
    ):
        names = seen.setdefault(label, [])

        class Watched(base["Point"]):  # type: ignore[misc, valid-type]
            def __setattr__(self, name: str, value: object, names: list[str] = names) -> None:
                names.append(name)
                super().__setattr__(name, value)

        Watched(1)

    class Report(GcReport):
        def __setattr__(self, name: str, value: object) -> None:
            seen.setdefault("report", []).append(name)
            super().__setattr__(name, value)

    Report()
    assert seen["ours"] == seen["std"] == ["x", "y", "tags", "note"]
    assert seen["report"] == [f.name for f in dataclasses.fields(GcReport)]


def test_the_methods_belong_to_the_class_module() -> None:
    """The standard methods are compiled in the class's module, so they pickle by
    reference (a process pool handed ``Service.__repr__``) and documentation tools file
    them under the class; portpool's named its own helper module."""
    for name in ("__init__", "__repr__", "__eq__", "__hash__", "__setattr__", "__delattr__"):
        method = getattr(Service, name)
        assert method.__module__ == Service.__module__, name
        assert pickle.loads(pickle.dumps(method)) is method, name


def test_keyword_only_fields_are_refused_not_made_positional() -> None:
    with pytest.raises(TypeError, match="keyword-only"):

        @_dataclass.dataclass
        class Named:
            a: int
            b: int = dataclasses.field(default=0, kw_only=True)
