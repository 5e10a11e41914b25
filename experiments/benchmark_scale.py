r"""Benchmarks of the scale features (issue 17), as ratios from one run.

* compile: the train step's compile time (jit lower + compile) against
  depth (4, 16, 32 layers), scanned (model.scan_layers) against unrolled;
* memory: XLA's memory analysis of the compiled train step (temporary and
  argument bytes) per remat policy, on the default LM config and a deeper
  one;
* micro: step time with 1, 2 and 4 micro-batches at equal global batch;
* bf16: step time and the loss after N steps, bfloat16 compute over
  float32 master weights against float32.

Timed things run in interleaved rounds (every round runs each variant
once, in a rotating order); the median, the spread (max - min over the
rounds, relative to the median) and the load average before and after are
reported. Every variant trains on the same batches of the stdlib corpus
(`--max_files` files). Results: a printed table and a JSON file.

  nice -n 10 python -m experiments.benchmark_scale --output=/tmp/scale.json
  python -m experiments.benchmark_scale --parts=compile --depths=4,16 \
      --rounds=1                                          # a quick look

See BENCHMARKS.md, section "Scale (issue 17)".
"""

import json
import os
import statistics
import time

from absl import app
from absl import flags
import jax
import ml_collections
import numpy as np

from moejax import data as data_lib
from moejax.train import config as config_lib
from moejax.train import loop
from moejax.train import optim
from moejax.train import state as state_lib
from moejax.train import step as step_lib

_PARTS = flags.DEFINE_list("parts", ["compile", "memory", "micro", "bf16"],
                           "What to measure.")
_DEPTHS = flags.DEFINE_list("depths", ["4", "16", "32"],
                            "Depths for the compile-time part.")
_ROUNDS = flags.DEFINE_integer("rounds", 3, "Interleaved rounds.")
_STEPS = flags.DEFINE_integer("steps", 10, "Timed steps per round and "
                              "variant (micro, bf16).")
_LOSS_STEPS = flags.DEFINE_integer("loss_steps", 60,
                                   "Steps for the bf16 vs f32 loss.")
_MAX_FILES = flags.DEFINE_integer("max_files", 8, "stdlib corpus files.")
_OUTPUT = flags.DEFINE_string("output", "", "JSON file for the results.")


def lm_config(num_layers=4, scan=False, remat="none", dtype="float32",
              micro_batches=1):
  """The default LM config (lm_stdlib 'small': M=128, mlp 256, E=8 top-2
  every other layer, seq 128, batch 16) on one device, with the scale
  fields set."""
  c = config_lib.base_config()
  c.data = ml_collections.ConfigDict(dict(
      dataset="stdlib_bytes", seq_len=128, train_split="train",
      max_files=_MAX_FILES.value, shuffle_buffer_size=64))
  c.model = ml_collections.ConfigDict(dict(
      name="decoder_lm", vocab_size=257, model_dim=128, num_layers=num_layers,
      num_heads=4, mlp_dim=256, moe_every=2, activation="swiglu",
      tie_embeddings=True, scan_layers=scan, remat=remat, dtype=dtype,
      param_dtype="float32"))
  c.moe = config_lib.moe_config(
      router=dict(name="token_choice", k=2, renormalize=True),
      experts=dict(num_experts=8, hidden_dim=256), capacity_factor=1.25)
  c.batch_size, c.micro_batches = 16, micro_batches
  c.num_train_steps = 1000
  c.mesh = ml_collections.ConfigDict(dict(data=1, fsdp=1, expert=1,
                                          tensor=1))
  return c


def build(c):
  """(jitted train step, state) of config c on one device."""
  mesh = state_lib.make_train_mesh(c.mesh, devices=jax.devices()[:1])
  schedule = optim.make_schedule(learning_rate=3e-3, total_steps=1000,
                                 warmup_steps=10)
  tx = optim.make_optimizer(schedule)
  graphdef, state, model = state_lib.create_train_state(
      loop.model_factory(c), tx, mesh)
  task = loop.make_task(c, model)
  step = step_lib.make_train_step(
      graphdef, task, tx, schedule, loop._config_dict(c.aux_loss_weights),  # pylint: disable=protected-access
      state_shardings=state_lib.state_shardings(state),
      micro_batches=c.micro_batches)
  return step, state


_BATCHES = {}


def batches(n):
  """The first n batches of the corpus (the same for every variant)."""
  if n not in _BATCHES:
    c = lm_config()
    ds, _ = loop.make_datasets(c)
    it = iter(ds)
    _BATCHES[n] = [jax.tree.map(np.asarray, next(it)) for _ in range(n)]
  return _BATCHES[n]


def loadavg():
  with open("/proc/loadavg") as f:
    return float(f.read().split()[0])


def summary(times):
  med = statistics.median(times)
  return dict(median=med, min=min(times), spread=(max(times) - min(times))
              / med if med else 0.0, rounds=len(times))


def interleaved(variants, measure, rounds):
  """{name: [value per round]}: each round measures every variant once, the
  order rotated by one each round."""
  names = list(variants)
  out = {n: [] for n in names}
  for r in range(rounds):
    order = names[r % len(names):] + names[:r % len(names)]
    for name in order:
      out[name].append(measure(variants[name]))
  return out


def compile_seconds(c):
  step, state = build(c)
  batch = batches(1)[0]
  start = time.perf_counter()
  step.lower(state, batch).compile()
  return time.perf_counter() - start


def part_compile():
  variants = {f"{'scan' if scan else 'unrolled'}/{d}": lm_config(
      int(d), scan=scan) for d in _DEPTHS.value for scan in (False, True)}
  raw = interleaved(variants, compile_seconds, _ROUNDS.value)
  rows = {name: summary(t) for name, t in raw.items()}
  for d in _DEPTHS.value:
    rows[f"ratio unrolled/scan at {d}"] = (
        rows[f"unrolled/{d}"]["median"] / rows[f"scan/{d}"]["median"])
  return rows


def part_memory():
  """The default config (4 layers, unrolled) and a deeper one (16 layers,
  scanned), per remat policy: compile only, nothing runs."""
  rows = {}
  for depth, scan in ((4, False), (16, True)):
    name = f"{depth} layers {'scanned' if scan else 'unrolled'}"
    for remat in ("none", "full", "save_dots", "save_moe_outputs"):
      step, state = build(lm_config(depth, scan=scan, remat=remat))
      m = step.lower(state, batches(1)[0]).compile().memory_analysis()
      rows[f"{name}/{remat}"] = dict(
          temp_mb=m.temp_size_in_bytes / 2**20,
          argument_mb=m.argument_size_in_bytes / 2**20,
          output_mb=m.output_size_in_bytes / 2**20)
    none = rows[f"{name}/none"]["temp_mb"]
    for remat in ("full", "save_dots", "save_moe_outputs"):
      rows[f"{name}/{remat}"]["temp_vs_none"] = (
          rows[f"{name}/{remat}"]["temp_mb"] / none)
  return rows


def timed_steps(built):
  step, state_box = built
  data = batches(_STEPS.value + 1)
  state, metrics = step(state_box[0], data[0])  # the compiled one, untimed
  jax.block_until_ready(metrics)
  start = time.perf_counter()
  for batch in data[1:]:
    state, metrics = step(state, batch)
  jax.block_until_ready(metrics)
  state_box[0] = state
  return (time.perf_counter() - start) / _STEPS.value


def _prepared(c):
  step, state = build(c)
  return step, [state]


def part_micro():
  variants = {f"micro_batches={k}": _prepared(lm_config(micro_batches=k))
              for k in (1, 2, 4)}
  raw = interleaved(variants, timed_steps, _ROUNDS.value)
  rows = {name: summary(t) for name, t in raw.items()}
  base = rows["micro_batches=1"]["median"]
  for k in (2, 4):
    rows[f"micro_batches={k}"]["vs_1"] = rows[f"micro_batches={k}"][
        "median"] / base
  return rows


def part_bf16():
  variants = {dtype: _prepared(lm_config(dtype=dtype))
              for dtype in ("float32", "bfloat16")}
  raw = interleaved(variants, timed_steps, _ROUNDS.value)
  rows = {name: summary(t) for name, t in raw.items()}
  rows["bfloat16 vs float32 step time"] = (
      rows["bfloat16"]["median"] / rows["float32"]["median"])
  for dtype in ("float32", "bfloat16"):  # fresh states, the same batches
    step, state = build(lm_config(dtype=dtype))
    losses = []
    for batch in batches(_LOSS_STEPS.value):
      state, metrics = step(state, batch)
      losses.append(float(metrics["ce_loss"]))
    rows[dtype]["loss_after_n"] = float(np.mean(losses[-5:]))
    rows[dtype]["n"] = _LOSS_STEPS.value
  return rows


PARTS = {"compile": part_compile, "memory": part_memory, "micro": part_micro,
         "bf16": part_bf16}


def main(argv):
  del argv
  os.environ.setdefault("MOEJAX_DATA_DIR", "/tmp/moejax_data")
  results = dict(backend=jax.default_backend(), devices=1,
                 load_before=loadavg())
  for part in _PARTS.value:
    start = time.perf_counter()
    results[part] = PARTS[part]()
    results[part]["seconds"] = time.perf_counter() - start
    print(f"== {part}", flush=True)
    print(json.dumps(results[part], indent=1, default=float), flush=True)
  results["load_after"] = loadavg()
  print(f"load average {results['load_before']} -> {results['load_after']}")
  if _OUTPUT.value:
    with open(_OUTPUT.value, "w") as f:
      json.dump(results, f, indent=1, default=float)


if __name__ == "__main__":
  app.run(main)
