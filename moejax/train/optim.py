"""The optimizer: AdamW with linear warmup + cosine decay and global-norm
clipping, as one optax.GradientTransformation."""

import jax
import optax


def make_schedule(*, learning_rate, total_steps, warmup_steps,
                  end_learning_rate_fraction=0.1):
  """Linear warmup 0 -> learning_rate over warmup_steps, then cosine decay to
  learning_rate * end_learning_rate_fraction at total_steps.

  Returns an optax schedule: step (int) -> learning rate (float32).
  """
  if not learning_rate > 0:
    raise ValueError(f"learning_rate must be > 0, got {learning_rate!r}")
  if total_steps < 1:
    raise ValueError(f"total_steps must be >= 1, got {total_steps!r}")
  # optax's cosine part needs at least one step after the warmup.
  if not 0 <= warmup_steps < total_steps:
    raise ValueError(f"warmup_steps must be in [0, total_steps={total_steps})"
                     f", got {warmup_steps!r}")
  if not 0 <= end_learning_rate_fraction <= 1:
    raise ValueError(f"end_learning_rate_fraction must be in [0, 1], got "
                     f"{end_learning_rate_fraction!r}")
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=learning_rate, warmup_steps=warmup_steps,
      decay_steps=total_steps,
      end_value=learning_rate * end_learning_rate_fraction)


def decay_mask(params):
  """Weight decay on matrices (ndim >= 2) only; not on norms, biases, scalars."""
  return jax.tree.map(lambda p: p.ndim >= 2, params)


def make_optimizer(schedule, *, weight_decay=0.1, b1=0.9, b2=0.95, eps=1e-8,
                   grad_clip_norm=1.0):
  """clip_by_global_norm(grad_clip_norm) -> AdamW(schedule).

  grad_clip_norm <= 0 or None turns clipping off. Weight decay is decoupled
  (AdamW) and skips parameters with ndim < 2 (decay_mask).
  """
  parts = []
  if grad_clip_norm:
    parts.append(optax.clip_by_global_norm(grad_clip_norm))
  parts.append(optax.adamw(schedule, b1=b1, b2=b2, eps=eps,
                           weight_decay=weight_decay, mask=decay_mask))
  return optax.chain(*parts)
