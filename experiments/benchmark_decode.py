r"""Decoding with the KV cache: speed against transformers, flat per-step
time, and cache memory against its formula (BENCHMARKS.md).

  .venv/bin/python -m experiments.benchmark_decode \
      --torch_python=/work/hfvenv/bin/python --output=/tmp/decode.json

One small random Mixtral checkpoint (experiments/benchmark_pretrained's
writer) is read by both sides. Every round runs one moejax child and one
torch child, alternating which goes first; each decodes --new tokens
greedily from a [B, L] prompt after a warm-up of the same shapes
(compilation excluded): moejax.inference.generate against transformers'
generate (use_cache=True, greedy). Reported per side: new tokens/s and
per-token latency, their median ratio over rounds with the spread, and the
load average. torch runs only in its child, from --torch_python.

Flat steps (moejax only): the time of one jitted decode step with a cache of
--cache_len slots at several positions, against a full recompute (no cache)
of the same lengths: the cached step stays flat, the recompute grows.

Cache memory: the bytes of live device arrays added by init_cache, against
layers * B * T * (2 * K * D * itemsize + 4) (keys, values, slot positions).
"""

import json
import os
import statistics
import sys
import tempfile
import time

from absl import app
from absl import flags
import numpy as np

from experiments import benchmark_pretrained as bp

# --rounds, --torch_python, --output and --child are benchmark_pretrained's
# flags (imported above), shared by this app.
_ROUNDS, _TORCH_PYTHON, _OUTPUT, _CHILD = (bp._ROUNDS, bp._TORCH_PYTHON,  # pylint: disable=protected-access
                                           bp._OUTPUT, bp._CHILD)  # pylint: disable=protected-access
_BATCH = flags.DEFINE_integer("decode_batch", 1, "Prompts decoded together.")
_PROMPT = flags.DEFINE_integer("prompt", 32, "Prompt length L.")
_NEW = flags.DEFINE_integer("new", 64, "New tokens per generate call.")
_CACHE_LEN = flags.DEFINE_integer("cache_len", 1024, "Cache slots of the "
                                  "flat-step measurement.")


def child_decode(path, batch, prompt, new):
  from moejax import inference  # pylint: disable=g-import-not-at-top
  from moejax.models import from_pretrained  # pylint: disable=g-import-not-at-top
  model = from_pretrained(path)
  ids = np.random.default_rng(0).integers(
      3, model.spec.vocab_size, (batch, prompt)).astype(np.int32)
  inference.generate(model, ids, max_new_tokens=new)  # compiles
  t0 = time.perf_counter()
  out = inference.generate(model, ids, max_new_tokens=new)
  np.asarray(out)
  seconds = time.perf_counter() - t0
  print(json.dumps({"seconds": seconds}))


TORCH_CHILD = r"""
import json, sys, time, numpy as np, torch, transformers
path, b, l, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
m = transformers.AutoModelForCausalLM.from_pretrained(
    path, dtype=torch.float32, attn_implementation="sdpa").eval()
ids = torch.tensor(np.random.default_rng(0).integers(
    3, m.config.vocab_size, (b, l)).astype(np.int64))
kw = dict(max_new_tokens=n, min_new_tokens=n, do_sample=False,
          use_cache=True, pad_token_id=0)
with torch.no_grad():
  m.generate(ids, **kw)
  t0 = time.perf_counter()
  m.generate(ids, **kw)
print(json.dumps({"seconds": time.perf_counter() - t0,
                  "threads": torch.get_num_threads()}))
"""


def bench_vs_torch(path):
  b, l, n = _BATCH.value, _PROMPT.value, _NEW.value
  jax_cmd = [sys.executable, "-m", "experiments.benchmark_decode",
             f"--child=decode:{path}", f"--decode_batch={b}", f"--prompt={l}",
             f"--new={n}"]
  torch_cmd = [_TORCH_PYTHON.value, "-c", TORCH_CHILD, path, str(b), str(l),
               str(n)]
  rounds = bp.interleaved_rounds(jax_cmd, torch_cmd, b * n, _ROUNDS.value)
  # Per-token latency: the fastest round has the smallest latency.
  ms = lambda tps: {"median": 1e3 * b / tps["median"],
                    "min": 1e3 * b / tps["max"], "max": 1e3 * b / tps["min"]}
  return {"batch": b, "prompt": l, "new": n, **rounds,
          "moejax_ms_per_token": ms(rounds["moejax_tokens_per_s"]),
          "torch_ms_per_token": ms(rounds["torch_tokens_per_s"])}


def bench_flat_steps(path):
  """Cached decode step vs full recompute, at growing positions."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from flax import nnx  # pylint: disable=g-import-not-at-top
  from moejax.models import from_pretrained  # pylint: disable=g-import-not-at-top
  model = from_pretrained(path)
  b, t = _BATCH.value, _CACHE_LEN.value
  step = nnx.jit(lambda m, tok, pos, c: m(tok, positions_BL=pos, cache=c))
  full = nnx.jit(lambda m, ids: m(ids)[0])
  rng = np.random.default_rng(0)
  rows = []
  for length in sorted({64, t // 4, t // 2, t - 1}):
    cache = model.init_cache(b, t)
    ids = rng.integers(3, model.spec.vocab_size, (b, length)).astype(np.int32)
    _, _, cache = step(model, ids, jnp.broadcast_to(
        jnp.arange(length, dtype=jnp.int32), (b, length)), cache)
    tok = ids[:, -1:]
    pos = jnp.full((b, 1), length, jnp.int32)
    jax.block_until_ready(step(model, tok, pos, cache)[0])  # compiled
    times = []
    for _ in range(10):
      t0 = time.perf_counter()
      jax.block_until_ready(step(model, tok, pos, cache)[0])
      times.append(time.perf_counter() - t0)
    ids1 = np.concatenate([ids, tok], axis=1)
    full(model, ids1).block_until_ready()
    recompute = []
    for _ in range(3):
      t0 = time.perf_counter()
      full(model, ids1).block_until_ready()
      recompute.append(time.perf_counter() - t0)
    rows.append({"position": length,
                 "cached_step_ms": 1e3 * statistics.median(times),
                 "recompute_ms": 1e3 * statistics.median(recompute)})
  return rows


def bench_cache_memory(path):
  import jax  # pylint: disable=g-import-not-at-top
  from moejax.models import from_pretrained  # pylint: disable=g-import-not-at-top
  model = from_pretrained(path)
  b, t = 4, _CACHE_LEN.value
  live = lambda: sum(x.nbytes for x in jax.live_arrays())
  before = live()
  cache = model.init_cache(b, t)
  jax.block_until_ready(cache)
  measured = live() - before
  att = model.spec.attention
  formula = len(model.blocks) * b * t * (
      2 * att.num_kv_heads * att.head_dim * 4 + 4)
  return {"batch": b, "slots": t, "measured_bytes": measured,
          "formula_bytes": formula, "ratio": measured / formula}


def main(argv):
  del argv
  if _CHILD.value:
    child_decode(_CHILD.value.split(":", 1)[1], _BATCH.value, _PROMPT.value,
                 _NEW.value)
    return
  with tempfile.TemporaryDirectory(dir="/tmp") as tmp:
    path = os.path.join(tmp, "decode")
    bp.write_checkpoint(path, bp.mixtral_config(
        model_dim=256, hidden=512, experts=8, layers=4, vocab=1024, heads=8,
        kv_heads=2))
    results = {"cache_memory": bench_cache_memory(path),
               "flat_steps": bench_flat_steps(path)}
    print(json.dumps(results, indent=1), flush=True)
    if _TORCH_PYTHON.value:
      results["vs_torch"] = bench_vs_torch(path)
  print(json.dumps(results, indent=1))
  if _OUTPUT.value:
    with open(_OUTPUT.value, "w") as f:
      json.dump(results, f, indent=1)


if __name__ == "__main__":
  app.run(main)
