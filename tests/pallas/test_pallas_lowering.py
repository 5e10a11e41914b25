"""The real (not interpreted) kernels lower for GPU and TPU, checked on CPU.

JAX lowers a program for another platform without its device
(`.lower(lowering_platforms=...)`): the Pallas Triton lowering emits Triton
IR and the Mosaic lowering checks block shapes and emits the TPU dialect,
both in Python. So these catch, without a GPU or TPU, what interpret mode
cannot: unsupported primitives, non-power-of-two Triton values, illegal Mosaic
block shapes, a kernel picked up by the wrong GPU backend. Compiling and
running stays for the @gpu / @tpu tests (test_pallas_device.py).
"""

import jax
import jax.numpy as jnp
import pytest

from moejax import pallas
from moejax import routing
from moejax.layers import engines
from moejax.ops import ffn as ffn_lib

S_ = jax.ShapeDtypeStruct
TARGETS = {"cuda": ("triton", "__gpu$xla.gpu.triton"),
           "tpu": ("mosaic", "tpu_custom_call")}


def _lower(fn, args, platform):
  try:
    return jax.jit(fn).trace(*args).lower(
        lowering_platforms=(platform,)).as_text()
  except ValueError as e:  # a jaxlib without this platform's Pallas lowering
    if "Cannot lower pallas_call on platform" in str(e):
      pytest.skip(str(e))
    raise


def _engine_program(backend):
  # (G=1, S=256, M=256, H=384, E=4, K=2, tile=128): H is no power of two.
  def run(x, w_in, w_gate, w_out, logits):
    plan = routing.token_choice(logits, k=2, capacity=None)

    def loss(x, w_in, w_gate, w_out):
      w = ffn_lib.ExpertWeights(w_in, w_out, w_gate)
      # The engine object, as MoELayer(engine=...) runs it.
      y = engines.PallasEngine(backend=backend, tile=128)(plan, x, w,
                                                          "swiglu")
      return jnp.sum(y.astype(jnp.float32) ** 2)
    return jax.grad(loss, argnums=(0, 1, 2, 3))(x, w_in, w_gate, w_out)
  bf16 = jnp.bfloat16
  args = (S_((1, 256, 256), bf16), S_((4, 256, 384), bf16),
          S_((4, 256, 384), bf16), S_((4, 384, 256), bf16),
          S_((1, 256, 4), jnp.float32))
  return run, args


@pytest.mark.parametrize("platform", ["cuda", "tpu"])
def test_engine_forward_and_backward_lower(platform):
  backend, target = TARGETS[platform]
  text = _lower(*_engine_program(backend), platform)
  # permute, 3 GMMs, unpermute forward; their backward passes: 3 d_lhs GMMs,
  # 3 tgmms, the unpermute gather and the permute combine.
  assert text.count(target) >= 13, text.count(target)
  if platform == "cuda":
    assert "mosaic_gpu" not in text   # Triton, not the Mosaic GPU default


@pytest.mark.parametrize("platform", ["cuda", "tpu"])
def test_float32_gmm_and_ragged_dot_lower(platform):
  backend, target = TARGETS[platform]

  def run(lhs, rhs, sizes):
    out = pallas.ragged_dot(lhs, rhs, sizes, tile=128, backend=backend)
    return jax.grad(lambda a, b: jnp.sum(pallas.ragged_dot(
        a, b, sizes, tile=128, backend=backend)))(lhs, rhs), out
  args = (S_((300, 192), jnp.float32), S_((3, 192, 320), jnp.float32),
          S_((3,), jnp.int32))
  assert target in _lower(run, args, platform)
