"""The YAML validation helpers: every problem is recorded with its path, a usable default comes back."""

from __future__ import annotations

import math

import pytest
import yaml
from hypothesis import given
from hypothesis import strategies as st

from testbed.validation import Problems, UniqueKeyLoader, boolean, choice, integer, mapping, number


def test_every_problem_is_listed_with_its_path_and_defaults_come_back() -> None:
    p = Problems()
    got = mapping(p, "planner", {"margin": 0.1, "consecutve": 3, 7: "x"}, ("margin", "consecutive"))
    assert got == {"margin": 0.1}
    assert integer(p, "planner.window", "9", 5, 1, 64) == 5
    assert integer(p, "planner.window", 65, 5, 1, 64) == 5
    assert number(p, "planner.margin", -1, 0.1, 0.0, 10.0) == 0.1
    assert number(p, "rate", 0.0, 1.0, 0.0, strict=True) == 1.0
    assert number(p, "rate", math.nan, 1.0, 0.0) == 1.0
    assert choice(p, "splits", "per-devce", "common", ("per-device", "common")) == "common"
    assert boolean(p, "resplit", "yes", True) is True
    assert p.lines == [
        "planner.consecutve: unknown key (did you mean 'consecutive'?)",
        "planner.7: unknown key; known: margin, consecutive",
        "planner.window: expected an integer, got a string '9'",
        "planner.window: must be between 1 and 64, got 65",
        "planner.margin: must be >= 0 and <= 10, got -1",
        "rate: must be > 0, got 0.0",
        "rate: expected a finite number, got a number nan",
        "splits: expected one of per-device, common, got 'per-devce' (did you mean 'per-device'?)",
        "resplit: expected true or false, got a string 'yes'",
    ]


def test_absent_values_take_the_default_unless_required() -> None:
    p = Problems()
    assert integer(p, "a", None, 3, 0) == 3 and number(p, "b", None, 0.5, 0.0) == 0.5
    assert integer(p, "c", None, None, 0, nullable=False) is None
    assert p.lines == ["c: expected an integer, got null"]


def test_duplicate_yaml_keys_are_refused() -> None:
    assert yaml.load("a: 1\nb: {c: 2}\n", Loader=UniqueKeyLoader) == {"a": 1, "b": {"c": 2}}
    with pytest.raises(yaml.constructor.ConstructorError, match="duplicate key 'a'"):
        yaml.load("a: 1\na: 2\n", Loader=UniqueKeyLoader)


@given(st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=5), st.lists(st.integers())))
def test_a_checker_never_raises_and_returns_a_value_in_range_or_the_default(value) -> None:
    p = Problems()
    got = integer(p, "x", value, 5, 0, 10)
    assert got == 5 or (isinstance(got, int) and 0 <= got <= 10)
    f = number(p, "y", value, 1.0, 0.0, 2.0)
    assert f == 1.0 or (f is not None and 0.0 <= f <= 2.0)
