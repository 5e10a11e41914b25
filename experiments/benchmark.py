r"""Benchmarks of the MoE engines against the FLOP-matched dense FFN.

Measures, in one process and interleaved (every round times every function
once, in a rotating order), after compilation and warm-up:

* the forward and forward+backward time of an MoE layer with each engine
  (einsum, indices, dropless, and pallas where it runs), router included:
  moejax.layers.MoELayer itself, from router logits through the routing plan,
  dispatch, experts, combine and the aux losses, differentiated with respect
  to its parameters and its input;
* the same for the FLOP-matched dense FFN: T*k tokens through one FFN of
  width H (so its matmul FLOPs equal the MoE layer's active expert FLOPs);
* the median and minimum over the rounds, the engine/dense ratio of the
  medians and the median of the per-round ratios, process CPU time, achieved
  GFLOP/s counting only active expert FLOPs (and TFLOP/s plus the fraction of
  a plain dense matmul's throughput measured in the same run), and peak
  memory from the compiled executable's memory analysis;
* sweeps over tokens T, experts E at fixed active FLOPs, the einsum group
  size, k, the dropless tile, a split of the layer into its parts, and the
  training step of the MoE DecoderLM against its FLOP-matched dense twin.

Results go to a JSON file and a printed table; `--sweeps` picks what runs.
On GPU/TPU the same code runs in bfloat16 (`--dtype=auto`).

Examples:
  python -m experiments.benchmark                       # reference config
  python -m experiments.benchmark --sweeps=reference,T,E,group,k,tile,parts,train \
      --output=/tmp/bench.json
  python -m experiments.benchmark --sweeps=reference --tokens=2048 \
      --model_dim=64 --hidden_dim=128 --repeats=3       # a quick look

See BENCHMARKS.md for the targets and the recorded results.
"""

import dataclasses
import inspect
import json
import os
import platform
import resource
import statistics
import sys
import time
from typing import Any, Callable, Optional

from absl import app
from absl import flags
from flax import nnx
import jax
import jax.numpy as jnp
import optax

from moejax import layers as L
from moejax import models
from moejax import routing
from moejax.layers import build as build_lib
from moejax.layers import dispatch as dispatch_lib
from moejax.layers import engines as engines_lib
from moejax.layers import moe as moe_lib
from moejax.layers import transformer as tfm
from moejax.ops import ffn as ops_ffn
from moejax.ops import gather as gather_lib
from moejax.ops import gmm as gmm_lib

SWEEPS = ("reference", "T", "E", "group", "k", "tile", "parts", "train")

_SWEEPS = flags.DEFINE_list("sweeps", ["reference"],
                            f"What to run, any of {list(SWEEPS)}.")
_TOKENS = flags.DEFINE_integer("tokens", 16384, "T: tokens per layer call.")
_MODEL_DIM = flags.DEFINE_integer("model_dim", 512, "M.")
_HIDDEN_DIM = flags.DEFINE_integer("hidden_dim", 1024, "H: expert width.")
_NUM_EXPERTS = flags.DEFINE_integer("num_experts", 16, "E.")
_K = flags.DEFINE_integer("k", 2, "Experts per token.")
_CF = flags.DEFINE_float("capacity_factor", 1.0,
                         "Capacity factor (K is in the capacity formula).")
_GROUP_SIZE = flags.DEFINE_integer("group_size", 4096, "S: tokens per group.")
_DTYPE = flags.DEFINE_enum("dtype", "auto", ["auto", "float32", "bfloat16"],
                           "Compute dtype; auto: float32 on CPU, bfloat16 on "
                           "GPU/TPU.")
_ACTIVATION = flags.DEFINE_enum("activation", "relu",
                                ["relu", "gelu", "swiglu", "geglu"],
                                "Expert and dense FFN activation.")
_ENGINES = flags.DEFINE_list(
    "engines", ["einsum", "indices", "dropless", "pallas"],
    "Engines of the reference and k sweeps: names of "
    "moejax.layers.build.ENGINES (einsum, indices, dropless, pallas) or "
    "dotted paths to engine classes ('pallas' only where a Pallas backend "
    "exists, i.e. GPU/TPU; skipped elsewhere; 'dense', the baseline, is "
    "always measured).")
_SWEEP_ENGINES = flags.DEFINE_list(
    "sweep_engines", ["indices", "dropless", "pallas"],
    "Engines of the T and E sweeps.")
_MODES = flags.DEFINE_list("modes", ["fwd", "fwd_bwd"],
                           "Reference-config modes: fwd and/or fwd_bwd.")
_SWEEP_MODES = flags.DEFINE_list("sweep_modes", ["fwd_bwd"],
                                 "Modes of the sweeps.")
_TILE = flags.DEFINE_integer("dropless_tile", 0,
                             "Dropless grouped-matmul tile (engines that take "
                             "a tile); 0: the engine's default.")
_REPEATS = flags.DEFINE_integer("repeats", 5, "Timed rounds per point.")
_WARMUP = flags.DEFINE_integer("warmup", 1, "Untimed calls after compiling.")
_SWEEP_TOKENS = flags.DEFINE_list("sweep_tokens",
                                  ["4096", "8192", "16384", "32768", "65536"],
                                  "T values of the T sweep.")
_SWEEP_EXPERTS = flags.DEFINE_list("sweep_experts",
                                   ["8", "16", "32", "64", "128", "256"],
                                   "E values of the E sweep.")
_E_MODE = flags.DEFINE_enum(
    "sweep_experts_mode", "fine_grained", ["fine_grained", "fixed_k"],
    "E sweep at fixed active FLOPs. fine_grained (DeepSeekMoE): with "
    "m = E / num_experts, H = hidden_dim / m and k = k * m, so k*H (active "
    "FLOPs) and E*H (expert parameters) stay fixed. fixed_k: k and H fixed, "
    "parameters grow with E.")
_SWEEP_GROUPS = flags.DEFINE_list("sweep_group_sizes",
                                  ["512", "1024", "2048", "4096", "8192"],
                                  "Group sizes of the einsum group sweep.")
_SWEEP_K = flags.DEFINE_list("sweep_k", ["1", "2", "8"], "k values.")
_SWEEP_TILES = flags.DEFINE_list("sweep_tiles", ["128", "256", "512", "1024"],
                                 "Dropless tiles of the tile sweep.")
_EINSUM_MAX_GB = flags.DEFINE_float(
    "einsum_max_mask_gb", 1.0,
    "Skip the einsum engine where its [G, S, E, C] mask would exceed this "
    "many GiB.")
_TRAIN_VOCAB = flags.DEFINE_integer("train_vocab", 256, "Train: vocabulary.")
_TRAIN_MODEL_DIM = flags.DEFINE_integer("train_model_dim", 256, "Train: M.")
_TRAIN_LAYERS = flags.DEFINE_integer("train_layers", 4, "Train: layers.")
_TRAIN_HEADS = flags.DEFINE_integer("train_heads", 4, "Train: heads.")
_TRAIN_MLP_DIM = flags.DEFINE_integer(
    "train_mlp_dim", 1024, "Train: dense FFN width and expert width H.")
_TRAIN_SEQ_LEN = flags.DEFINE_integer("train_seq_len", 256, "Train: L.")
_TRAIN_BATCH = flags.DEFINE_integer("train_batch", 32, "Train: B.")
_TRAIN_MOE_EVERY = flags.DEFINE_integer("train_moe_every", 2,
                                        "Train: MoE every N layers.")
_TRAIN_EXPERTS = flags.DEFINE_integer("train_experts", 16, "Train: E.")
_TRAIN_K = flags.DEFINE_integer("train_k", 2, "Train: k.")
_TRAIN_ENGINES = flags.DEFINE_list("train_engines", ["indices", "dropless"],
                                   "Train: MoE engines.")
_TRAIN_CF = flags.DEFINE_float("train_capacity_factor", 1.0,
                               "Train: capacity factor.")
_TRAIN_GROUP = flags.DEFINE_integer("train_group_size", 0,
                                    "Train: MoE group size; 0 = one sequence.")
_TRAIN_ACTIVATION = flags.DEFINE_enum("train_activation", "swiglu",
                                      ["relu", "gelu", "swiglu", "geglu"],
                                      "Train: FFN activation.")
_OUTPUT = flags.DEFINE_string("output", "benchmark_results.json",
                              "JSON output path ('' = none).")
_SEED = flags.DEFINE_integer("seed", 0, "PRNG seed.")

# Aux-loss weights of the benchmarked layer (as a training step would use).
AUX_WEIGHTS = {"load_balance": 1e-2, "z_loss": 1e-3}

# Issue targets (CPU, float32, fwd+bwd, reference config).
FLAXFORMER_SCATTER_RATIO = 1.14   # flaxformer MoeLayer, scatter router
FLAXFORMER_MASKED_RATIO = 2.03    # flaxformer MoeLayer, masked router


# --- configuration ----------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class LayerConfig:
  """One MoE layer benchmark point."""
  tokens: int
  model_dim: int
  hidden_dim: int
  num_experts: int
  k: int
  capacity_factor: float
  group_size: int
  dtype: str
  activation: str
  tile: int = 0            # dropless tile; 0 = the engine's default

  @property
  def groups(self):
    return -(-self.tokens // self.group_size)

  @property
  def capacity(self):
    return routing.compute_capacity(self.group_size, self.num_experts,
                                    k=self.k,
                                    capacity_factor=self.capacity_factor)

  def einsum_mask_bytes(self):
    return self.groups * self.group_size * self.num_experts * (
        self.capacity) * 4

  def matmuls(self):
    return 3 if self.activation in ("swiglu", "geglu") else 2

  def active_flops(self, mode):
    """Active expert matmul FLOPs (= the dense twin's): fwd, or 3x fwd."""
    fwd = 2 * self.tokens * self.k * self.model_dim * self.hidden_dim * (
        self.matmuls())
    return fwd if mode == "fwd" else 3 * fwd

  def describe(self):
    return (f"T={self.tokens} M={self.model_dim} H={self.hidden_dim} "
            f"E={self.num_experts} k={self.k} cf={self.capacity_factor} "
            f"S={self.group_size} C={self.capacity} {self.dtype} "
            f"{self.activation}" + (f" tile={self.tile}" if self.tile else ""))


def resolve_dtype(name):
  if name == "auto":
    return "float32" if jax.default_backend() == "cpu" else "bfloat16"
  return name


def reference_config(**overrides):
  cfg = LayerConfig(
      tokens=_TOKENS.value, model_dim=_MODEL_DIM.value,
      hidden_dim=_HIDDEN_DIM.value, num_experts=_NUM_EXPERTS.value,
      k=_K.value, capacity_factor=_CF.value,
      group_size=min(_GROUP_SIZE.value, _TOKENS.value),
      dtype=resolve_dtype(_DTYPE.value), activation=_ACTIVATION.value,
      tile=_TILE.value)
  return dataclasses.replace(cfg, **overrides)


# --- the functions under test -------------------------------------------------


@dataclasses.dataclass
class Bench:
  """A jitted function and its arguments, plus what to report about it."""
  name: str            # 'dense', an engine name, or a part name
  mode: str            # 'fwd' or 'fwd_bwd'
  fn: Callable
  args: tuple
  flops: float         # active expert FLOPs per call
  compiled: Any = None
  compile_s: float = 0.0
  memory: Optional[dict] = None


def pallas_available():
  """Whether a Pallas gmm backend (not the XLA fallback) runs here."""
  if jax.default_backend() not in ("gpu", "cuda", "rocm", "tpu"):
    return False
  try:
    from moejax import pallas  # pylint: disable=g-import-not-at-top
    return pallas.resolve_backend("auto").kind != "xla"
  except Exception:  # pylint: disable=broad-except
    return False


def engine_class(engine):
  """The engine class of a CLI engine name: a key of the one registry
  (moejax.layers.build.ENGINES: einsum, indices, dropless, pallas) or a
  dotted path 'pkg.module.Class'."""
  return build_lib.resolve(engine, build_lib.ENGINES, "engine")


def make_engine(cfg, engine):
  """The engine object for CLI name `engine` at `cfg` (cfg.tile, when set,
  goes to engines that take a tile: the dropless ones; 'pallas' runs the
  Pallas kernels with backend='auto')."""
  cls = engine_class(engine)
  opts = {}
  if cfg.tile and "tile" in inspect.signature(cls).parameters:
    opts["tile"] = cfg.tile
  return cls(**opts)


def is_engine(engine, base):
  """Whether CLI engine name `engine` names a subclass of `base`."""
  cls = engine_class(engine)
  return isinstance(cls, type) and issubclass(cls, base)


def einsum_too_big(cfg, engine):
  """Whether `engine` is the einsum engine and its [G, S, E, C] mask at
  `cfg` would exceed --einsum_max_mask_gb."""
  return is_engine(engine, engines_lib.EinsumEngine) and (
      cfg.einsum_mask_bytes() > _EINSUM_MAX_GB.value * 2 ** 30)


def check_engine_flags():
  """Raises app.UsageError for an engine flag value that names no engine."""
  for flag in (_ENGINES, _SWEEP_ENGINES, _TRAIN_ENGINES):
    for engine in flag.value:
      if engine == "dense":
        continue
      try:
        engine_class(engine)
      except ValueError as e:
        raise app.UsageError(f"--{flag.name}: {e}") from None


def moe_layer(cfg, engine, seed=0):
  """An MoELayer for `cfg`: top-k token choice, Experts, and the engine of
  CLI name `engine` (see make_engine)."""
  rngs = nnx.Rngs(seed)
  dtype = jnp.dtype(cfg.dtype)
  return L.MoELayer(
      router=L.TokenChoiceRouter(cfg.model_dim, cfg.num_experts, k=cfg.k,
                                 rngs=rngs),
      experts=L.Experts(cfg.num_experts, cfg.model_dim, cfg.hidden_dim,
                        activation=cfg.activation, dtype=dtype,
                        param_dtype=jnp.float32, rngs=rngs),
      engine=make_engine(cfg, engine), capacity_factor=cfg.capacity_factor,
      group_size=cfg.group_size)


def readout(y, ct):
  """The scalar the fwd_bwd benchmarks differentiate: sum(y^2 * ct).

  Non-linear on purpose: its cotangent 2*y*ct needs the layer's output, so,
  as inside a network, the backward cannot start before the forward ends
  (with a linear read-out XLA may schedule the backward early and hold more
  buffers at once, and may drop the dense FFN's last matmul altogether).
  """
  y = y.astype(jnp.float32)
  return jnp.sum(jnp.square(y) * ct.astype(jnp.float32))


def _inputs(cfg, rows, seed):
  kx, kc = jax.random.split(jax.random.key(seed))
  dtype = jnp.dtype(cfg.dtype)
  x = jax.random.normal(kx, rows + (cfg.model_dim,), jnp.float32).astype(dtype)
  ct = jax.random.normal(kc, x.shape, jnp.float32).astype(dtype)
  return x, ct


def moe_benches(cfg, engine, modes, seed=0):
  """fwd / fwd_bwd of MoELayer(cfg, engine) on x [T/S, S, M]."""
  layer = moe_layer(cfg, engine, seed)
  graphdef, params, rest = nnx.split(layer, nnx.Param, ...)
  if cfg.tokens % cfg.group_size:
    raise ValueError(f"group_size {cfg.group_size} must divide T "
                     f"{cfg.tokens}")
  x, ct = _inputs(cfg, (cfg.groups, cfg.group_size), seed + 1)

  def forward(params, x):
    y, aux = nnx.merge(graphdef, params, rest)(x)
    return y, moe_lib.weighted_sum(aux.losses, AUX_WEIGHTS)

  def loss(params, x, ct):
    y, aux_loss = forward(params, x)
    return readout(y, ct) + aux_loss

  out = []
  for mode in modes:
    if mode == "fwd":
      out.append(Bench(engine, mode, jax.jit(forward), (params, x),
                       cfg.active_flops(mode)))
    else:
      out.append(Bench(engine, mode, jax.jit(jax.value_and_grad(
          loss, argnums=(0, 1))), (params, x, ct), cfg.active_flops(mode)))
  return out


def dense_benches(cfg, modes, seed=0, baseline="tokens"):
  """The FLOP-matched dense FFN.

  baseline 'tokens' (the issue's definition): T*k tokens through one FFN of
  width H. 'width': T tokens through one FFN of width k*H (same FLOPs; used
  by the E sweep, where k changes with E, as one fixed reference).
  """
  if baseline == "tokens":
    rows, width = cfg.tokens * cfg.k, cfg.hidden_dim
  else:
    rows, width = cfg.tokens, cfg.hidden_dim * cfg.k
  ffn = L.DenseFFN(cfg.model_dim, width, activation=cfg.activation,
                   dtype=jnp.dtype(cfg.dtype), param_dtype=jnp.float32,
                   rngs=nnx.Rngs(seed))
  graphdef, params = nnx.split(ffn, nnx.Param)
  x, ct = _inputs(cfg, (rows,), seed + 1)

  def forward(params, x):
    return nnx.merge(graphdef, params)(x)

  def loss(params, x, ct):
    return readout(forward(params, x), ct)

  out = []
  for mode in modes:
    if mode == "fwd":
      out.append(Bench("dense", mode, jax.jit(forward), (params, x),
                       cfg.active_flops(mode)))
    else:
      out.append(Bench("dense", mode, jax.jit(jax.value_and_grad(
          loss, argnums=(0, 1))), (params, x, ct), cfg.active_flops(mode)))
  return out


def part_benches(cfg, engine, seed=0):
  """fwd+bwd of each part of the layer, to see where the time goes.

  router: logits -> token_choice plan -> aux losses (gradient through the
  plan's weights and the losses); dispatch / experts / combine: the
  engine's own pieces on a fixed plan, each differentiated alone with the
  same read-out as the whole layer. A capacity engine (uses_capacity) is
  timed through its dispatch / combine protocol; a dropless one as the XLA
  dropless path (the sort layout and gather, the grouped FFN
  ops.gmm.grouped_ffn at the engine's tile, the weighted combine). The plan
  is an argument, not a constant, so XLA cannot fold any of it away.
  """
  dtype = jnp.dtype(cfg.dtype)
  layer = moe_layer(cfg, engine, seed)
  eng = layer.engine
  w_router = layer.router.w_router_ME[...]
  weights = ops_ffn.ExpertWeights(*layer.experts.weights())
  x, ct = _inputs(cfg, (cfg.groups, cfg.group_size), seed + 1)
  capacity = cfg.capacity if eng.uses_capacity else None
  e, m, g, s, k = (cfg.num_experts, cfg.model_dim, cfg.groups,
                   cfg.group_size, cfg.k)

  def route(x, w_router):
    logits = jnp.einsum("GSM,ME->GSE", x.astype(jnp.float32), w_router)
    return routing.token_choice(logits, k=k, capacity=capacity), logits

  def router_loss(x, w_router):
    plan, logits = route(x, w_router)
    losses = routing.plan_losses(plan, logits)
    return (jnp.sum(jnp.square(plan.weight_GSK)) + losses.load_balance +
            losses.z_loss)

  plan = jax.jit(lambda x, w: route(x, w)[0])(x, w_router)

  def grad(f, num_diff):
    return jax.jit(jax.value_and_grad(f, argnums=tuple(range(num_diff))))

  flops = cfg.active_flops("fwd_bwd")
  benches = [Bench("router", "fwd_bwd", grad(router_loss, 2), (x, w_router),
                   0)]
  key = jax.random.key(seed + 2)
  if not eng.uses_capacity:
    tile = eng.tile
    layout = jax.jit(lambda p: dispatch_lib.dropless_layout(p, tile))(plan)
    token_R = jnp.where(layout.assignment_R < g * s * k,
                        layout.assignment_R // k, g * s)
    r = token_R.shape[0]
    ct_RM = jax.random.normal(key, (r, m)).astype(dtype)

    def disp(x, token_R, row_N):
      return readout(gather_lib.gather_rows(
          x.reshape(g * s, m), token_R, row_N.reshape(g * s, k)), ct_RM)

    def exp(in_RM, w_in, w_out, w_gate, sizes_E):
      return readout(gmm_lib.grouped_ffn(
          in_RM, w_in, w_out, w_gate, sizes_E, tile=tile,
          activation=cfg.activation), ct_RM)

    def comb(out_RM, w_GSK, row_N, assignment_R):
      y = gather_lib.combine_rows(out_RM, w_GSK.reshape(g * s, k),
                                  row_N.reshape(g * s, k), assignment_R)
      return readout(y, ct.reshape(g * s, m))

    benches += [
        Bench("dispatch", "fwd_bwd", grad(disp, 1),
              (x, token_R, layout.row_N), 0),
        Bench("experts", "fwd_bwd", grad(exp, 4),
              (ct_RM, *weights, layout.group_sizes_E), flops),
        Bench("combine", "fwd_bwd", grad(comb, 2),
              (ct_RM, plan.weight_GSK, layout.row_N, layout.assignment_R), 0),
    ]
    return benches
  c = cfg.capacity
  buf = jax.random.normal(key, (e, g, c, m)).astype(dtype)
  # The einsum engine's experts part has always been timed as the plain
  # expert_ffn einsums (the layer itself runs ops.gmm.batched_ffn for every
  # capacity engine); kept so that recorded parts stay comparable.
  ffn = (ops_ffn.expert_ffn if isinstance(eng, engines_lib.EinsumEngine)
         else gmm_lib.batched_ffn)

  def disp(x, plan):
    return readout(eng.dispatch(plan, x)[0], buf)

  def exp(in_EGCM, w_in, w_out, w_gate):
    out = ffn(in_EGCM.reshape(e, g * c, m), w_in, w_out, w_gate,
              activation=cfg.activation)
    return readout(out, buf.reshape(e, g * c, m))

  def comb(out_EGCM, weight_GSK, weight_GEC, plan):
    p = plan.replace(weight_GSK=weight_GSK, weight_GEC=weight_GEC)
    # ctx None: the engine rebuilds what it needs from the plan (the indices
    # engine its slot indices), so the part includes that work.
    return readout(eng.combine(p, out_EGCM, None), ct)

  benches += [
      Bench("dispatch", "fwd_bwd", grad(disp, 1), (x, plan), 0),
      Bench("experts", "fwd_bwd", grad(exp, 4), (buf, *weights), flops),
      Bench("combine", "fwd_bwd", grad(comb, 3),
            (buf, plan.weight_GSK, plan.weight_GEC, plan), 0),
  ]
  return benches


# --- measuring ----------------------------------------------------------------


def memory_stats(compiled):
  """Peak device memory of an executable from XLA's memory analysis."""
  try:
    m = compiled.memory_analysis()
  except Exception:  # pylint: disable=broad-except
    return None
  if m is None:
    return None
  stats = {
      "temp_bytes": int(m.temp_size_in_bytes),
      "argument_bytes": int(m.argument_size_in_bytes),
      "output_bytes": int(m.output_size_in_bytes),
      "alias_bytes": int(m.alias_size_in_bytes),
  }
  # XLA:CPU's peak_memory_in_bytes leaves the temporaries out, so the peak
  # is taken as arguments + outputs - aliased + the temp arena (which XLA
  # sizes for the largest set of temporaries live at once).
  stats["peak_bytes"] = (stats["temp_bytes"] + stats["argument_bytes"] +
                         stats["output_bytes"] - stats["alias_bytes"])
  stats["xla_peak_memory_bytes"] = int(
      getattr(m, "peak_memory_in_bytes", 0) or 0)
  return stats


def compile_bench(b):
  t0 = time.perf_counter()
  b.compiled = b.fn.lower(*b.args).compile()
  b.compile_s = time.perf_counter() - t0
  b.memory = memory_stats(b.compiled)


def measure(benches, repeats, warmup):
  """Compiles, warms up, then times `repeats` interleaved rounds.

  Round r calls every bench once, starting at bench r mod n (a rotating
  order, so no bench always follows the same neighbour). Returns
  {(name, mode): dict(times, cpu_times)} with wall and process-CPU seconds.
  """
  for b in benches:
    compile_bench(b)
    for _ in range(warmup):
      jax.block_until_ready(b.compiled(*b.args))
  times = {(b.name, b.mode): ([], []) for b in benches}
  n = len(benches)
  for r in range(repeats):
    for i in range(n):
      b = benches[(r + i) % n]
      c0, t0 = time.process_time(), time.perf_counter()
      jax.block_until_ready(b.compiled(*b.args))
      t1, c1 = time.perf_counter(), time.process_time()
      times[(b.name, b.mode)][0].append(t1 - t0)
      times[(b.name, b.mode)][1].append(c1 - c0)
  return {key: {"times_s": w, "cpu_s": c} for key, (w, c) in times.items()}


_MATMUL_PEAK = {}


def matmul_peak_gflops(dtype, repeats=5):
  """GFLOP/s of one square dense matmul here (the device's dense rate)."""
  if dtype in _MATMUL_PEAK:
    return _MATMUL_PEAK[dtype]
  n = 2048 if jax.default_backend() == "cpu" else 8192
  a = jax.random.normal(jax.random.key(0), (n, n)).astype(dtype)
  f = jax.jit(lambda a: a @ a).lower(a).compile()
  jax.block_until_ready(f(a))
  best = min(_timed(f, a) for _ in range(repeats))
  _MATMUL_PEAK[dtype] = {"n": n, "seconds": best,
                         "gflops": 2 * n ** 3 / best / 1e9}
  return _MATMUL_PEAK[dtype]


def _timed(f, *args):
  t0 = time.perf_counter()
  jax.block_until_ready(f(*args))
  return time.perf_counter() - t0


def summarize(benches, timing, cfg, sweep, point, baseline="dense"):
  """One record per bench: medians, ratios to the dense bench, rates."""
  peak = matmul_peak_gflops(cfg.dtype)
  records = []
  by_key = {(b.name, b.mode): b for b in benches}
  for b in benches:
    t = timing[(b.name, b.mode)]
    rec = {
        "sweep": sweep, "point": point, "engine": b.name, "mode": b.mode,
        "config": dataclasses.asdict(cfg),
        "median_s": statistics.median(t["times_s"]),
        "min_s": min(t["times_s"]),
        "cpu_median_s": statistics.median(t["cpu_s"]),
        "times_s": t["times_s"], "cpu_s": t["cpu_s"],
        "compile_s": b.compile_s, "memory": b.memory,
    }
    if b.flops:
      rec["gflops"] = b.flops / rec["median_s"] / 1e9
      rec["tflops"] = rec["gflops"] / 1e3
      rec["fraction_of_matmul_peak"] = rec["gflops"] / peak["gflops"]
    base = by_key.get((baseline, b.mode))
    if base is not None and base is not b:
      bt = timing[(baseline, b.mode)]
      rec["ratio"] = rec["median_s"] / statistics.median(bt["times_s"])
      rec["ratio_rounds"] = statistics.median(
          a / d for a, d in zip(t["times_s"], bt["times_s"]))
      rec["ratio_min"] = rec["min_s"] / min(bt["times_s"])
      rec["ratio_cpu"] = rec["cpu_median_s"] / statistics.median(bt["cpu_s"])
      if b.memory and base.memory:
        rec["memory_ratio"] = b.memory["peak_bytes"] / base.memory["peak_bytes"]
        rec["temp_memory_ratio"] = b.memory["temp_bytes"] / max(
            1, base.memory["temp_bytes"])
    records.append(rec)
  return records


def _load():
  try:
    return [round(v, 2) for v in os.getloadavg()]
  except OSError:
    return None


def run_point(cfg, engines, modes, sweep, point, *, dense_baseline="tokens",
              seed=0):
  """Measures dense + engines at one config; prints and returns records."""
  benches = dense_benches(cfg, modes, seed, dense_baseline)
  for engine in engines:
    if engine == "dense":  # the baseline, always measured
      continue
    if is_engine(engine, engines_lib.PallasEngine) and (
        not pallas_available()):
      continue
    if einsum_too_big(cfg, engine):
      print(f"  (skipping {engine} at {cfg.describe()}: its [G,S,E,C] mask "
            f"would be {cfg.einsum_mask_bytes() / 2 ** 30:.1f} GiB)")
      continue
    benches += moe_benches(cfg, engine, modes, seed)
  load_before = _load()
  timing = measure(benches, _REPEATS.value, _WARMUP.value)
  records = summarize(benches, timing, cfg, sweep, point)
  for r in records:
    r["load_before"], r["load_after"] = load_before, _load()
    r["dense_baseline"] = dense_baseline
  print_table(f"[{sweep}] {point}: {cfg.describe()}  load {load_before}",
              records)
  return records


# --- training step ----------------------------------------------------------


def train_records(seed=0):
  """Tokens/s of the MoE DecoderLM train step vs its FLOP-matched dense twin."""
  v, m, n_layers = _TRAIN_VOCAB.value, _TRAIN_MODEL_DIM.value, (
      _TRAIN_LAYERS.value)
  heads, h, l, b = (_TRAIN_HEADS.value, _TRAIN_MLP_DIM.value,
                    _TRAIN_SEQ_LEN.value, _TRAIN_BATCH.value)
  every, e, k = _TRAIN_MOE_EVERY.value, _TRAIN_EXPERTS.value, _TRAIN_K.value
  act = _TRAIN_ACTIVATION.value
  dtype = jnp.dtype(resolve_dtype(_DTYPE.value))
  dense_width = models.flop_matched_dense_mlp_dim(h, k, moe_every=every,
                                                  mlp_dim=h)
  group = _TRAIN_GROUP.value or l

  def build(engine):
    if engine == "dense":
      return models.DecoderLM(v, m, n_layers, heads, dense_width,
                              moe_every=0, activation=act, dtype=dtype,
                              rngs=nnx.Rngs(seed))
    return models.DecoderLM(
        v, m, n_layers, heads, h, moe_every=every, activation=act,
        dtype=dtype, moe={
            "router": {"name": "token_choice", "k": k},
            "engine": {"name": engine},
            "experts": {"num_experts": e},
            "capacity_factor": _TRAIN_CF.value, "group_size": group},
        rngs=nnx.Rngs(seed))

  tx = optax.adamw(1e-3, weight_decay=0.1)
  tokens = jax.random.randint(jax.random.key(seed + 1), (b, l + 1), 0, v)
  batch = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:]}

  def make(engine):
    model = build(engine)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    def loss_fn(params, batch):
      logits, aux = nnx.merge(graphdef, params, rest)(batch["inputs"])
      ce = optax.softmax_cross_entropy_with_integer_labels(
          logits, batch["targets"]).mean()
      if aux is None:  # the dense twin has no MoE layer, so no aux losses
        return ce
      return ce + tfm.total_aux_loss(aux, AUX_WEIGHTS)

    def step(state, batch):
      params, opt_state = state
      loss, grads = jax.value_and_grad(loss_fn)(params, batch)
      updates, opt_state = tx.update(grads, opt_state, params)
      return (optax.apply_updates(params, updates), opt_state), loss

    state = (params, tx.init(params))
    counts = models.count_params(model)
    return model, jax.jit(step, donate_argnums=(0,)), state, counts

  names = ["dense"] + [e for e in _TRAIN_ENGINES.value if e != "dense"]
  built = {name: make(name) for name in names}
  states = {name: built[name][2] for name in names}
  compiled = {}
  compile_s = {}
  memory = {}
  for name in names:
    t0 = time.perf_counter()
    compiled[name] = built[name][1].lower(states[name], batch).compile()
    compile_s[name] = time.perf_counter() - t0
    memory[name] = memory_stats(compiled[name])
    for _ in range(max(1, _WARMUP.value)):
      states[name], loss = compiled[name](states[name], batch)
      jax.block_until_ready(loss)
  times = {name: [] for name in names}
  load_before = _load()
  for r in range(_REPEATS.value):
    for i in range(len(names)):
      name = names[(r + i) % len(names)]
      t0 = time.perf_counter()
      states[name], loss = compiled[name](states[name], batch)
      jax.block_until_ready(loss)
      times[name].append(time.perf_counter() - t0)
  records = []
  dense_med = statistics.median(times["dense"])
  for name in names:
    med = statistics.median(times[name])
    model = built[name][0]
    flops_tok = models.flops_per_token(model, seq_len=l)
    rec = {
        "sweep": "train", "point": name, "engine": name, "mode": "train_step",
        "config": dict(vocab=v, model_dim=m, layers=n_layers, heads=heads,
                       mlp_dim=h, dense_mlp_dim=dense_width, seq_len=l,
                       batch=b, moe_every=every, experts=e, k=k,
                       capacity_factor=_TRAIN_CF.value, group_size=group,
                       activation=act, dtype=str(dtype)),
        "median_s": med, "min_s": min(times[name]), "times_s": times[name],
        "tokens_per_s": b * l / med, "compile_s": compile_s[name],
        "memory": memory[name], "params": built[name][3],
        "flops_per_token": flops_tok,
        "load_before": load_before, "load_after": _load(),
    }
    if name != "dense":
      rec["tokens_per_s_ratio"] = dense_med / med
      rec["ratio"] = med / dense_med
      rec["ratio_rounds"] = statistics.median(
          a / d for a, d in zip(times[name], times["dense"]))
    records.append(rec)
  print_table(f"[train] DecoderLM V={v} M={m} layers={n_layers} L={l} B={b} "
              f"E={e} k={k} every={every} H={h} dense_width={dense_width} "
              f"load {load_before}", records)
  return records


# --- sweeps -----------------------------------------------------------------


def _ints(values):
  return [int(v) for v in values]


def sweep_reference():
  return run_point(reference_config(), _ENGINES.value, _MODES.value,
                   "reference", "reference")


def sweep_tokens():
  out = []
  for t in _ints(_SWEEP_TOKENS.value):
    cfg = reference_config(tokens=t, group_size=min(_GROUP_SIZE.value, t))
    out += run_point(cfg, _SWEEP_ENGINES.value, _SWEEP_MODES.value, "T",
                     f"T={t}")
  return out


def e_sweep_config(e):
  base = reference_config()
  if _E_MODE.value == "fixed_k":
    return dataclasses.replace(base, num_experts=e)
  # Fine-grained: m = E / E0 experts per original one, each H / m wide,
  # k * m of them active.
  e0, h0, k0 = base.num_experts, base.hidden_dim, base.k
  h = h0 * e0 // e
  k = k0 * e // e0
  if h * e != h0 * e0 or k * e0 != k0 * e or k < 1 or k > e:
    raise ValueError(f"E={e} does not split H={h0}, k={k0} of E={e0} evenly")
  return dataclasses.replace(base, num_experts=e, hidden_dim=h, k=k)


def sweep_experts():
  out = []
  for e in _ints(_SWEEP_EXPERTS.value):
    cfg = e_sweep_config(e)
    out += run_point(cfg, _SWEEP_ENGINES.value, _SWEEP_MODES.value, "E",
                     f"E={e}", dense_baseline="width")
  return out


def sweep_groups():
  out = []
  for s in _ints(_SWEEP_GROUPS.value):
    cfg = reference_config(group_size=s)
    out += run_point(cfg, ["einsum"], _SWEEP_MODES.value, "group", f"S={s}")
  return out


def sweep_k():
  out = []
  for k in _ints(_SWEEP_K.value):
    cfg = reference_config(k=k)
    out += run_point(cfg, _ENGINES.value, _SWEEP_MODES.value, "k", f"k={k}")
  return out


def sweep_tiles():
  out = []
  for tile in _ints(_SWEEP_TILES.value):
    cfg = reference_config(tile=tile)
    out += run_point(cfg, ["dropless"], _SWEEP_MODES.value, "tile",
                     f"tile={tile}")
  return out


def sweep_parts():
  out = []
  cfg = reference_config()
  for engine in [e for e in _ENGINES.value if e in ("einsum", "indices",
                                                     "dropless")]:
    if einsum_too_big(cfg, engine):
      continue
    benches = (dense_benches(cfg, ["fwd_bwd"]) + moe_benches(
        cfg, engine, ["fwd_bwd"]) + part_benches(cfg, engine))
    load_before = _load()
    timing = measure(benches, _REPEATS.value, _WARMUP.value)
    records = summarize(benches, timing, cfg, "parts", engine)
    for r in records:
      r["load_before"], r["load_after"] = load_before, _load()
      r["dense_baseline"] = "tokens"
    print_table(f"[parts] {engine}: {cfg.describe()}  load {load_before}",
                records)
    out += records
  return out


SWEEP_FNS = {"reference": sweep_reference, "T": sweep_tokens,
             "E": sweep_experts, "group": sweep_groups, "k": sweep_k,
             "tile": sweep_tiles, "parts": sweep_parts, "train": train_records}


# --- targets ------------------------------------------------------------------


def _find(records, **match):
  return [r for r in records
          if all(r.get(k) == v for k, v in match.items())]


def evaluate_targets(records):
  """The issue's CPU targets, from whatever records exist. Each entry:
  name, value, threshold, met (None when the data is missing)."""
  out = []

  def add(name, value, threshold, met, detail=""):
    out.append({"target": name, "value": value, "threshold": threshold,
                "met": met, "detail": detail})

  ref = {r["engine"]: r for r in _find(records, sweep="reference",
                                       mode="fwd_bwd")}
  engines = [e for e in ref if e != "dense"]
  fast = [e for e in engines if e != "einsum"]
  if "indices" in ref:
    v = ref["indices"]["ratio"]
    add("indices fwd+bwd <= 1.05x dense", v, 1.05, v <= 1.05)
  if "dropless" in ref:
    v = ref["dropless"]["ratio"]
    add("dropless fwd+bwd <= 1.10x dense", v, 1.10, v <= 1.10)
  if fast:
    best = min(fast, key=lambda e: ref[e]["ratio"])
    v = ref[best]["ratio"]
    add(f"best engine ({best}) beats flaxformer scatter (< "
        f"{FLAXFORMER_SCATTER_RATIO}x dense)", v, FLAXFORMER_SCATTER_RATIO,
        v < FLAXFORMER_SCATTER_RATIO, "peer ratio quoted from the issue, not "
        "re-run here")
    speedup = FLAXFORMER_MASKED_RATIO / v
    add(f"best engine ({best}) >= 1.9x faster than flaxformer masked",
        speedup, 1.9, speedup >= 1.9, "peer ratio quoted from the issue")
    mem = ref[best].get("memory_ratio")
    if mem is not None:
      add(f"peak memory of best engine ({best}) <= 1.3x dense", mem, 1.3,
          mem <= 1.3, f"temp-only ratio "
          f"{ref[best].get('temp_memory_ratio', float('nan')):.3f}")
    if "einsum" in ref:
      s = ref["einsum"]["config"]["group_size"]
      sp = ref["einsum"]["median_s"] / ref[best]["median_s"]
      add(f"best engine ({best}) >= 4x faster than einsum at S={s}", sp, 4.0,
          sp >= 4.0)
  einsum_ratios = {r["config"]["group_size"]: r["ratio"]
                   for r in _find(records, engine="einsum", mode="fwd_bwd")
                   if "ratio" in r and r["sweep"] in ("reference", "group")}
  if einsum_ratios:
    s_best = min(einsum_ratios, key=einsum_ratios.get)
    v = einsum_ratios[s_best]
    add("einsum no slower than flaxformer masked (<= "
        f"{FLAXFORMER_MASKED_RATIO}x dense), best group size S={s_best}", v,
        FLAXFORMER_MASKED_RATIO, v <= FLAXFORMER_MASKED_RATIO,
        "; ".join(f"S={s}: {x:.2f}x" for s, x in sorted(
            einsum_ratios.items())))
  t_recs = _find(records, sweep="T", mode="fwd_bwd")
  for engine in sorted({r["engine"] for r in t_recs} - {"dense"}):
    pts = sorted((r["config"]["tokens"], r["median_s"])
                 for r in t_recs if r["engine"] == engine)
    steps = [b[1] / a[1] for a, b in zip(pts, pts[1:])]
    if steps:
      add(f"{engine} linear in T (each doubling <= 2.15x)", max(steps), 2.15,
          max(steps) <= 2.15, ", ".join(f"{s:.2f}" for s in steps))
  e_recs = _find(records, sweep="E", mode="fwd_bwd")
  for engine in sorted({r["engine"] for r in e_recs} - {"dense"}):
    pts = sorted((r["config"]["num_experts"], r["median_s"])
                 for r in e_recs if r["engine"] == engine)
    if len(pts) > 1:
      spread = max(p[1] for p in pts) / min(p[1] for p in pts)
      add(f"{engine} flat in E {pts[0][0]}..{pts[-1][0]} (max/min <= 1.25x)",
          spread, 1.25, spread <= 1.25,
          ", ".join(f"E={e}: {t:.2f}s" for e, t in pts))
  for r in _find(records, sweep="train"):
    if "tokens_per_s_ratio" in r:
      v = r["tokens_per_s_ratio"]
      add(f"MoE LM train step ({r['engine']}) >= 0.85x dense tokens/s", v,
          0.85, v >= 0.85)
  return out


# --- output -------------------------------------------------------------------


def _fmt(v, spec):
  return format(v, spec) if isinstance(v, (int, float)) else "-"


def print_table(title, records):
  print(f"\n{title}")
  head = (f"{'engine':>10} {'mode':>10} {'median ms':>10} {'min ms':>9} "
          f"{'ratio':>6} {'r/round':>7} {'r(cpu)':>6} {'GFLOP/s':>8} "
          f"{'%mm':>5} {'peak MB':>8} {'mem r':>6}")
  print(head)
  for r in records:
    mem = r.get("memory") or {}
    extra = ""
    if "tokens_per_s" in r:
      extra = f"  {r['tokens_per_s']:.0f} tokens/s"
    print(f"{r['engine']:>10} {r['mode']:>10} {r['median_s'] * 1e3:10.1f} "
          f"{r['min_s'] * 1e3:9.1f} {_fmt(r.get('ratio'), '6.3f'):>6} "
          f"{_fmt(r.get('ratio_rounds'), '7.3f'):>7} "
          f"{_fmt(r.get('ratio_cpu'), '6.3f'):>6} "
          f"{_fmt(r.get('gflops'), '8.1f'):>8} "
          f"{_fmt(100 * r['fraction_of_matmul_peak'] if 'fraction_of_matmul_peak' in r else None, '5.1f'):>5} "
          f"{_fmt(mem.get('peak_bytes', 0) / 2 ** 20 if mem else None, '8.1f'):>8} "
          f"{_fmt(r.get('memory_ratio'), '6.3f'):>6}{extra}")
  sys.stdout.flush()


def print_targets(targets):
  print("\nTargets")
  for t in targets:
    met = {True: "MET", False: "NOT MET", None: "?"}[t["met"]]
    print(f"  {met:>7}  {t['target']}: {t['value']:.3f} (threshold "
          f"{t['threshold']}) {t['detail']}")


def environment():
  dev = jax.devices()[0]
  return {
      "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
      "jax": jax.__version__, "backend": jax.default_backend(),
      "device_kind": dev.device_kind, "num_devices": jax.device_count(),
      "cpu_count": os.cpu_count(), "platform": platform.platform(),
      "processor": platform.processor(), "python": platform.python_version(),
      "xla_flags": os.environ.get("XLA_FLAGS", ""),
      "argv": sys.argv,
  }


def run(sweeps):
  unknown = sorted(set(sweeps) - set(SWEEPS))
  if unknown:
    raise app.UsageError(f"unknown sweeps {unknown}; allowed: {list(SWEEPS)}")
  check_engine_flags()
  env = environment()
  env["load_start"] = _load()
  dtype = resolve_dtype(_DTYPE.value)
  env["matmul_peak"] = matmul_peak_gflops(dtype)
  print(f"{env['date']}  jax {env['jax']} on {env['backend']} "
        f"({env['device_kind']}), load {env['load_start']}, dense matmul "
        f"{env['matmul_peak']['gflops']:.1f} GFLOP/s ({dtype}, "
        f"n={env['matmul_peak']['n']})")
  records = []
  for sweep in sweeps:
    records += SWEEP_FNS[sweep]()
  env["load_end"] = _load()
  env["max_rss_mb"] = resource.getrusage(
      resource.RUSAGE_SELF).ru_maxrss / 1024
  targets = evaluate_targets(records)
  print_targets(targets)
  return {"environment": env, "records": records, "targets": targets}


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {argv[1:]}")
  result = run(list(_SWEEPS.value))
  if _OUTPUT.value:
    with open(_OUTPUT.value, "w") as f:
      json.dump(result, f, indent=1, default=str)
    print(f"\nwrote {_OUTPUT.value}")


if __name__ == "__main__":
  app.run(main)
