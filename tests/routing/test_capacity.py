"""compute_capacity: formula, rounding and bad input."""

import pytest

from moejax import routing


@pytest.mark.parametrize("s,e,k,cf,want", [
    (16, 4, 1, 1.0, 4),     # 1 * 1.0 * 16 / 4
    (16, 4, 2, 1.0, 8),     # K is in the formula
    (16, 4, 2, 1.25, 10),   # 2 * 1.25 * 16 / 4
    (10, 4, 1, 1.0, 3),     # ceil(2.5)
    (8, 16, 1, 1.0, 1),     # ceil(0.5)
    (4096, 16, 2, 1.0, 512),
])
def test_formula(s, e, k, cf, want):
  assert routing.compute_capacity(s, e, k=k, capacity_factor=cf) == want


def test_min_capacity_and_multiple():
  assert routing.compute_capacity(8, 16, min_capacity=4) == 4
  assert routing.compute_capacity(16, 4, k=1, multiple_of=8) == 8
  assert routing.compute_capacity(16, 4, k=2, capacity_factor=1.25,
                                  multiple_of=4) == 12


@pytest.mark.parametrize("kwargs,match", [
    (dict(group_size=0, num_experts=4), "group_size"),
    (dict(group_size=8, num_experts=0), "num_experts"),
    (dict(group_size=8, num_experts=4, k=0), "k must"),
    (dict(group_size=8, num_experts=4, k=5), "k must be <= num_experts"),
    (dict(group_size=8, num_experts=4, capacity_factor=0.0), "capacity_factor"),
    (dict(group_size=8, num_experts=4, capacity_factor=-1), "capacity_factor"),
    (dict(group_size=8, num_experts=4, min_capacity=0), "min_capacity"),
    (dict(group_size=8, num_experts=4, multiple_of=0), "multiple_of"),
])
def test_bad_input(kwargs, match):
  g, e = kwargs.pop("group_size"), kwargs.pop("num_experts")
  with pytest.raises(ValueError, match=match):
    routing.compute_capacity(g, e, **kwargs)


def test_groups_and_padding():
  assert routing.num_groups_and_padding(16, 8) == (2, 0)
  assert routing.num_groups_and_padding(17, 8) == (3, 7)
