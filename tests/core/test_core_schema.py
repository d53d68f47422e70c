"""The option schema on a toy section: one declaration gives coercion, checks, keys and flags."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Optional

import pytest

from lresnet.core.errors import InputError
from lresnet.core.schema import Section, at_least, between, build, greater, merge, option, to_plain, walk


def colours():
    return ("red", "green")


@dataclass(frozen=True)
class Inner(Section):
    PANEL = "Inner"

    size: int = option(3, help="A size.", check=greater(0))
    ratio: float = option(0.5, help="A ratio.", check=between(0, 1))
    colour: str = option("red", help="A colour.", choices=colours)
    tags: tuple[str, ...] = option((), help="Tags.", choices=colours)
    limit: Optional[float] = option(None, help="An optional limit.", check=at_least(0))

    def check(self) -> None:
        if self.size > 10 and self.colour == "red":
            raise InputError("size", f"got {self.size}, expected <= 10 for red")


@dataclass(frozen=True)
class Outer(Section):
    name: str = option("x", help="A name.", flag="--the-name", panel="Inner")
    inner: Inner = field(default_factory=Inner)


def test_values_are_coerced_and_checked_when_made():
    inner = Inner(size="7", ratio=0, tags=["green", "red"], limit="2.5")
    assert (inner.size, inner.ratio, inner.tags, inner.limit) == (7, 0.0, ("green", "red"), 2.5)
    assert isinstance(inner.ratio, float)
    assert Inner(tags="red, green").tags == ("red", "green")
    for kwargs, fragment in [({"size": 0}, "size: got 0, expected > 0"),
                             ({"ratio": float("nan")}, "ratio: got nan, expected a finite number"),
                             ({"colour": "blue"}, "colour: got 'blue', expected one of ['red', 'green']"),
                             ({"tags": ["red", "blue"]}, "tags: got 'blue'"),
                             ({"size": "many"}, "size: got 'many', expected an integer"),
                             ({"size": 11}, "size: got 11, expected <= 10 for red")]:
        with pytest.raises(InputError) as err:
            Inner(**kwargs)
        assert fragment in str(err.value)


def test_build_names_the_dotted_key_and_refuses_unknown_keys():
    assert build(Outer, {"inner": {"size": 4}}).inner.size == 4
    with pytest.raises(InputError) as err:
        build(Outer, {"inner": {"ratio": 2}})
    assert err.value.path == "inner.ratio"
    with pytest.raises(InputError) as err:
        build(Outer, {"inner": {"sise": 4}})
    assert err.value.path == "inner.sise" and "unknown option" in str(err.value)


def test_walk_gives_every_option_with_its_flag_and_panel():
    options = {o.key: o for o in walk(Outer)}
    assert list(options) == ["name", "inner.size", "inner.ratio", "inner.colour", "inner.tags", "inner.limit"]
    assert options["name"].flag == "--the-name" and options["inner.size"].flag == "--size"
    assert {o.panel for o in options.values()} == {"Inner"}


def test_a_field_not_declared_as_an_option_is_a_bug():
    @dataclass(frozen=True)
    class Bad(Section):
        plain: int = 3

    with pytest.raises(TypeError, match="not declared"):
        list(walk(Bad))


def test_merge_and_plain_data():
    assert merge({"a": 1, "inner": {"size": 2}}, {"inner": {"ratio": 0.1, "size": None}, "b": None}) == \
        {"a": 1, "inner": {"size": 2, "ratio": 0.1}}
    assert to_plain(Outer()) == {"name": "x", "inner": {"size": 3, "ratio": 0.5, "colour": "red", "tags": [],
                                                       "limit": None}}
    assert dataclasses.replace(Outer(), name="y").name == "y"
