"""Expert capacity and token grouping helpers."""

import math


def _check_positive_int(name, value, minimum=1):
  if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
    raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")


def compute_capacity(group_size, num_experts, *, k=1, capacity_factor=1.0,
                     min_capacity=1, multiple_of=1):
  """Slots per expert per group: ceil(k * capacity_factor * S / E).

  Then raised to `min_capacity` and rounded up to a multiple of `multiple_of`.
  K is part of the formula, so capacity_factor=1.0 gives exactly S*K slots in
  total (when E divides S*K). The result is a Python int (static).

  Args:
    group_size: S, tokens per group (>= 1).
    num_experts: E (>= 1).
    k: experts per token, 1 <= k <= E.
    capacity_factor: > 0.
    min_capacity: >= 1 lower bound on the result.
    multiple_of: >= 1; the result is rounded up to a multiple of it.
  Returns:
    int capacity C >= 1.
  """
  _check_positive_int("group_size", group_size)
  _check_positive_int("num_experts", num_experts)
  _check_positive_int("k", k)
  if k > num_experts:
    raise ValueError(f"k must be <= num_experts ({num_experts}), got {k}")
  if not (isinstance(capacity_factor, (int, float)) and capacity_factor > 0
          and math.isfinite(capacity_factor)):
    raise ValueError(
        f"capacity_factor must be a finite number > 0, got {capacity_factor!r}")
  _check_positive_int("min_capacity", min_capacity)
  _check_positive_int("multiple_of", multiple_of)
  # Round the product before ceil so that e.g. 1.25 * 8 * 2 / 4 is exactly 5.
  capacity = math.ceil(round(k * capacity_factor * group_size / num_experts, 9))
  capacity = max(capacity, min_capacity)
  return -(-capacity // multiple_of) * multiple_of


def num_groups_and_padding(num_tokens, group_size):
  """Returns (G, pad) such that num_tokens + pad == G * group_size, pad < group_size."""
  _check_positive_int("num_tokens", num_tokens)
  _check_positive_int("group_size", group_size)
  groups = -(-num_tokens // group_size)
  return groups, groups * group_size - num_tokens
