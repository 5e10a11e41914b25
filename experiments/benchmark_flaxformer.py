r"""flaxformer's MoeLayer beside moejax's engines and the dense FFN, one process.

The peer comparison of BENCHMARKS.md: flaxformer's MoeLayer (its scatter
router, TokensChooseScatterRouter, and its masked one-hot router,
TokensChooseMaskedRouter) on the reference layer config of
experiments/benchmark.py, timed interleaved with moejax's engines and the
FLOP-matched dense FFN by that harness's `measure` (same warm-up, rounds,
medians and ratios).

flaxformer is not a moejax dependency (it is frozen, and it imports aqt and
therefore TensorFlow at module level). Point --flaxformer_path at a checkout
(the directory that holds the `flaxformer` package):

  git clone https://github.com/google/flaxformer /tmp/flaxformer
  python -m experiments.benchmark_flaxformer --flaxformer_path=/tmp/flaxformer \
      --output=/tmp/peer.json

aqt (quantisation) is only used by flaxformer's dense layers when
`use_aqt=True`, which this benchmark never sets; when aqt is not installed
the script registers an empty placeholder module for it so the import
succeeds, and any attempt to use it would fail loudly.

Same semantics on both sides: k=2, float32, relu experts without bias or
dropout, no jitter, groups of --group_size tokens. flaxformer's capacity
formula leaves k out (C = cf * S / E), so its capacity factor is
k * --capacity_factor (2.0 here) for the same number of expert slots as
moejax's 1.0. Batch-prioritised routing is off on both sides.

flaxformer also needs the number of groups to be a multiple of the number of
experts, so on the reference config (T=16384, E=16, max group 4096) it
routes groups of 1024 tokens, not 4096 (C = 128 slots per expert and group
instead of 512, a quarter of the one-hot dispatch FLOPs). moejax's einsum
engine is therefore also timed at flaxformer's group size
('einsum@S=<size>'), the like-for-like comparison of the masked paths. Both layers
add their load-balancing and z-losses (weights as in benchmark.AUX_WEIGHTS).
"""

import json
import os
import sys
import types

from absl import app
from absl import flags
import jax
import jax.numpy as jnp

from experiments import benchmark as bench

_FLAXFORMER_PATH = flags.DEFINE_string(
    "flaxformer_path", None, "Directory holding the flaxformer package.",
    required=True)
_PEER_ENGINES = flags.DEFINE_list(
    "peer_engines", ["scatter", "masked"],
    "flaxformer routers to time: scatter and/or masked.")

FLAGS = flags.FLAGS


class _Unavailable(type):
  """Metaclass of the aqt placeholder: any attribute is the placeholder."""

  def __getattr__(cls, name):
    if name.startswith("__"):
      raise AttributeError(name)
    return cls

  def __call__(cls, *args, **kwargs):
    raise RuntimeError("aqt is not installed; flaxformer's quantised layers "
                       "(use_aqt=True) are not available in this benchmark")


def _register_aqt_placeholder():
  """Lets `from aqt.jax_legacy.jax import ...` succeed without aqt."""
  try:
    import aqt.jax_legacy.jax.flax_layers  # pylint: disable=g-import-not-at-top,unused-import
    return
  except Exception:  # pylint: disable=broad-except
    pass
  placeholder = _Unavailable("aqt_unavailable", (), {})
  for name in ("aqt", "aqt.jax_legacy", "aqt.jax_legacy.jax"):
    sys.modules[name] = types.ModuleType(name)
  for sub in ("flax_layers", "quant_config", "quantization"):
    mod = types.ModuleType(f"aqt.jax_legacy.jax.{sub}")
    mod.__getattr__ = lambda name: placeholder
    sys.modules[mod.__name__] = mod
    setattr(sys.modules["aqt.jax_legacy.jax"], sub, mod)


def _import_flaxformer(path):
  if not os.path.isdir(os.path.join(path, "flaxformer")):
    raise app.UsageError(f"--flaxformer_path={path!r} holds no flaxformer "
                         "package directory")
  sys.path.insert(0, path)
  _register_aqt_placeholder()
  from flaxformer.architectures.moe import moe_layers  # pylint: disable=g-import-not-at-top
  from flaxformer.architectures.moe import routing  # pylint: disable=g-import-not-at-top
  from flaxformer.components import dense  # pylint: disable=g-import-not-at-top
  return moe_layers, routing, dense


def flaxformer_benches(cfg, router_kind, modes, modules, seed=0):
  """fwd / fwd_bwd of flaxformer's MoeLayer on x [T/S, S, M]."""
  moe_layers, routing, dense = modules
  router_cls = {"scatter": routing.TokensChooseScatterRouter,
                "masked": routing.TokensChooseMaskedRouter}[router_kind]
  router = router_cls(
      router_weights=routing.RouterWeights(name="router_weights"),
      jitter_noise=0.0, num_selected_experts=cfg.k,
      batch_prioritized_routing=False, ignore_padding_tokens=False,
      dtype=jnp.float32)
  expert = dense.MlpBlock(
      use_bias=False, intermediate_dim=cfg.hidden_dim,
      activations=(cfg.activation,), intermediate_dropout_rate=0.0,
      final_dropout_rate=0.0, dtype=jnp.dtype(cfg.dtype))
  capacity_factor = cfg.capacity_factor * cfg.k  # its formula leaves k out
  layer = moe_layers.MoeLayer(
      num_experts=cfg.num_experts, num_expert_partitions=1,
      num_model_partitions=1, max_group_size=cfg.group_size,
      strict_group_size=False, router=router,
      train_capacity_factor=capacity_factor,
      eval_capacity_factor=capacity_factor, expert=expert,
      dropout_rate=0.0, dtype=jnp.dtype(cfg.dtype), min_expert_capacity=1)
  x, ct = bench._inputs(cfg, (cfg.groups, cfg.group_size), seed + 1)  # pylint: disable=protected-access
  rngs = {"params": jax.random.key(seed), "dropout": jax.random.key(1),
          "jitter": jax.random.key(2)}
  params = layer.init(rngs, x, enable_dropout=False)["params"]

  def forward(params, x):
    y, state = layer.apply({"params": params}, x, enable_dropout=True,
                           rngs={"dropout": jax.random.key(1),
                                 "jitter": jax.random.key(2)},
                           mutable=["intermediates"])
    sown = state["intermediates"]  # each metric a tuple of [1, 1] arrays
    aux = (bench.AUX_WEIGHTS["load_balance"] *
           sum(v.sum() for v in sown["auxiliary_loss"]) +
           bench.AUX_WEIGHTS["z_loss"] *
           sum(v.sum() for v in sown["router_z_loss"]))
    return y, aux

  def loss(params, x, ct):
    y, aux = forward(params, x)
    return bench.readout(y, ct) + aux

  name = f"flaxformer_{router_kind}"
  out = []
  for mode in modes:
    fn = (jax.jit(forward) if mode == "fwd" else
          jax.jit(jax.value_and_grad(loss, argnums=(0, 1))))
    args = (params, x) if mode == "fwd" else (params, x, ct)
    out.append(bench.Bench(name, mode, fn, args, cfg.active_flops(mode)))
  return out


def moejax_benches(cfg, modes):
  """The dense FFN and moejax's MoELayer with each --engines engine (CLI
  names of moejax.layers.build.ENGINES, built by bench.moe_layer), at cfg."""
  benches = bench.dense_benches(cfg, modes)
  for engine in bench._ENGINES.value:  # pylint: disable=protected-access
    if engine == "dense":  # the baseline, always measured
      continue
    if bench.is_engine(engine, bench.engines_lib.PallasEngine) and (
        not bench.pallas_available()):
      continue
    benches += bench.moe_benches(cfg, engine, modes)
  return benches


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {argv[1:]}")
  if not FLAGS["output"].present:
    # benchmark.py's default file holds the main benchmark's results.
    FLAGS.output = "benchmark_flaxformer.json"
  bench.check_engine_flags()
  modules = _import_flaxformer(_FLAXFORMER_PATH.value)
  cfg = bench.reference_config()
  modes = list(bench._MODES.value)  # pylint: disable=protected-access
  benches = moejax_benches(cfg, modes)
  moe_layers = modules[0]
  peer_groups = moe_layers._num_groups(cfg.tokens, cfg.group_size,  # pylint: disable=protected-access
                                       cfg.num_experts, 1, False)
  peer_cfg = bench.dataclasses.replace(
      cfg, group_size=cfg.tokens // peer_groups)
  if peer_cfg.group_size != cfg.group_size:
    for b in bench.moe_benches(peer_cfg, "einsum", modes):
      b.name = f"einsum@S={peer_cfg.group_size}"
      benches.append(b)
  for kind in _PEER_ENGINES.value:
    if kind not in ("scatter", "masked"):
      raise app.UsageError(f"--peer_engines: {kind!r} is not one of "
                           "['scatter', 'masked']")
    benches += flaxformer_benches(cfg, kind, modes, modules)
  print(f"flaxformer routes {peer_groups} groups of {peer_cfg.group_size} "
        f"tokens (capacity {peer_cfg.capacity})")
  env = bench.environment()
  env["load_start"] = bench._load()  # pylint: disable=protected-access
  env["matmul_peak"] = bench.matmul_peak_gflops(cfg.dtype)
  timing = bench.measure(benches, bench._REPEATS.value, bench._WARMUP.value)  # pylint: disable=protected-access
  records = bench.summarize(benches, timing, cfg, "peer", "reference")
  env["load_end"] = bench._load()  # pylint: disable=protected-access
  bench.print_table(f"[peer] {cfg.describe()}  load {env['load_start']} -> "
                    f"{env['load_end']}", records)
  if FLAGS.output:
    with open(FLAGS.output, "w") as f:
      json.dump({"environment": env, "records": records}, f, indent=1,
                default=str)
    print(f"\nwrote {FLAGS.output}")


if __name__ == "__main__":
  app.run(main)
