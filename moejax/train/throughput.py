"""Model FLOP/s and MFU (model FLOPs utilisation) for the log line.

    training FLOPs of a step = 3 x forward FLOPs per token x tokens
    TFLOP/s = training FLOPs / step seconds / 1e12
    MFU     = TFLOP/s / (peak TFLOP/s per device x devices)

The forward FLOPs per token are the model's own count
(moejax.models.flops_per_token: matmuls only, active experts only); the
factor 3 is forward + backward. Recomputation under remat is not counted
(model FLOPs, not hardware FLOPs), as in the PaLM paper's MFU.

The peak is the dense bfloat16 rate of the device kind from PEAK_TFLOPS
(vendor data sheets, without sparsity), config.peak_tflops when set, or on
CPU a matmul rate measured at start (measure_matmul_tflops), which the log
marks "measured".
"""

import dataclasses
import time

import jax
import jax.numpy as jnp

# Dense bfloat16 TFLOP/s per device (chip), by a substring of
# jax.Device.device_kind, most specific first.
PEAK_TFLOPS = (
    ("H200", 989.0),
    ("H100", 989.0),
    ("A100", 312.0),
    ("L4", 121.0),
    ("V100", 125.0),
    ("TPU v6", 918.0),
    ("TPU v5p", 459.0),
    ("TPU v5", 197.0),   # v5e / v5 lite
    ("TPU v4", 275.0),
    ("TPU v3", 123.0),
)


@dataclasses.dataclass(frozen=True)
class Peak:
  """Peak TFLOP/s of one device and where the number came from
  ('table: <kind>', 'config', or 'measured')."""
  tflops_per_device: float
  source: str

  @property
  def measured(self):
    return self.source == "measured"


def measure_matmul_tflops(size=512, repeats=5):
  """The float32 matmul rate of one device, in TFLOP/s: the best of
  `repeats` timed [size, size] x [size, size] products (compiled first)."""
  x = jnp.ones((size, size), jnp.float32)
  f = jax.jit(lambda a: a @ a)
  f(x).block_until_ready()
  best = float("inf")
  for _ in range(repeats):
    start = time.perf_counter()
    f(x).block_until_ready()
    best = min(best, time.perf_counter() - start)
  return 2 * size ** 3 / max(best, 1e-9) / 1e12


def peak_tflops(configured=0.0, device=None):
  """The Peak of `device` (default jax.devices()[0]): `configured` when
  > 0, else the table's entry for its kind, else (CPU or an unknown kind) a
  measured matmul rate."""
  if configured and configured > 0:
    return Peak(float(configured), "config")
  device = device or jax.devices()[0]
  kind = getattr(device, "device_kind", "") or ""
  if device.platform != "cpu":
    for name, tflops in PEAK_TFLOPS:
      if name.lower() in kind.lower():
        return Peak(tflops, f"table: {kind}")
  return Peak(measure_matmul_tflops(), "measured")


def step_rates(flops_per_token, tokens, seconds, peak, num_devices):
  """(TFLOP/s, MFU) of `tokens` trained in `seconds`; (0, 0) for no time.

  Args:
    flops_per_token: forward FLOPs per token (models.flops_per_token).
    tokens: tokens trained in the interval.
    seconds: its wall time.
    peak: Peak (per device).
    num_devices: devices the step runs on.
  """
  if seconds <= 0:
    return 0.0, 0.0
  tflops = 3.0 * flops_per_token * tokens / seconds / 1e12
  return tflops, tflops / (peak.tflops_per_device * num_devices)
