r"""from_pretrained's load time and peak host memory, and a forward pass
against transformers on torch (CPU), as ratios (BENCHMARKS.md).

  # load only (moejax's venv; writes a random ~--size_mb checkpoint to /tmp)
  .venv/bin/python -m experiments.benchmark_pretrained --size_mb=400
  # + the forward against transformers (torch lives only in the side venv)
  .venv/bin/python -m experiments.benchmark_pretrained \
      --torch_python=/work/hfvenv/bin/python --output=/tmp/pretrained.json

Load: the checkpoint (a Mixtral config, random float32 tensors written with
safetensors under transformers' names) is loaded by a fresh child process
per round; it reports wall time and its peak resident memory above what it
held after its imports (VmHWM), both over the checkpoint's
size on disk. On CPU the loaded model itself lives in host memory, so 1.0x
is the floor; the goal is <= 1.3x.

Forward: one small Mixtral checkpoint, read by both sides (moejax
from_pretrained, transformers from_pretrained), forward of [B, L] ids
(float32, no grad); every round runs one moejax child and one torch child,
alternating which goes first, each timing --iters forwards after a warm-up
(compilation excluded). Reported: tokens/s of each, median ratio over rounds
and its spread, and the load average. torch is imported only in its child,
from --torch_python; it is never a moejax dependency.
"""

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

from absl import app
from absl import flags
import numpy as np

_SIZE_MB = flags.DEFINE_integer("size_mb", 400, "Load checkpoint size.")
_ROUNDS = flags.DEFINE_integer("rounds", 3, "Interleaved rounds.")
_ITERS = flags.DEFINE_integer("iters", 10, "Timed forwards per round.")
_BATCH = flags.DEFINE_integer("batch", 4, "Forward batch B.")
_LENGTH = flags.DEFINE_integer("length", 256, "Forward length L.")
_TORCH_PYTHON = flags.DEFINE_string(
    "torch_python", None, "A python with torch + transformers; None skips "
    "the forward comparison.")
_OUTPUT = flags.DEFINE_string("output", None, "Write the results as JSON.")
_CHILD = flags.DEFINE_string("child", None, "(internal) load:<dir> or "
                             "forward:<dir>.")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def mixtral_config(*, model_dim, hidden, experts, layers, vocab, heads=8,
                   kv_heads=8):
  return {"architectures": ["MixtralForCausalLM"], "model_type": "mixtral",
          "vocab_size": vocab, "hidden_size": model_dim,
          "intermediate_size": hidden, "num_hidden_layers": layers,
          "num_attention_heads": heads, "num_key_value_heads": kv_heads,
          "head_dim": model_dim // heads, "hidden_act": "silu",
          "rms_norm_eps": 1e-5, "tie_word_embeddings": False,
          "sliding_window": None, "num_local_experts": experts,
          "num_experts_per_tok": 2, "max_position_embeddings": 4096,
          "rope_parameters": {"rope_type": "default", "rope_theta": 1e6},
          "dtype": "float32"}


def write_checkpoint(path, config, seed=0):
  """Random float32 tensors with transformers' names and shapes for
  `config` (from moejax's own tensor map), plus config.json."""
  from safetensors.numpy import save_file  # pylint: disable=g-import-not-at-top
  from moejax.models.hf import config as config_lib  # pylint: disable=g-import-not-at-top
  from moejax.models.hf import mapping  # pylint: disable=g-import-not-at-top
  from moejax.models.hf import load as load_lib  # pylint: disable=g-import-not-at-top
  from flax import nnx  # pylint: disable=g-import-not-at-top
  from moejax.models.hf import decoder  # pylint: disable=g-import-not-at-top
  spec = config_lib.parse_config(config)
  model = nnx.eval_shape(lambda: decoder.HFDecoder(spec, rngs=nnx.Rngs(0)))
  rng = np.random.default_rng(seed)
  tensors = {}
  for entry in mapping.tensor_map(spec):
    stand_ins = [np.broadcast_to(np.zeros((), np.float32),
                                 load_lib.variable_at(model, p).shape)
                 for p in entry.paths]
    for name, x in zip(entry.hf_names, entry.to_hf(stand_ins)):
      scale = 1.0 if "norm" in name else 0.05
      tensors[name] = (1.0 if "norm" in name else 0.0) + scale * \
          rng.standard_normal(x.shape, dtype=np.float32)
  os.makedirs(path, exist_ok=True)
  save_file(tensors, os.path.join(path, "model.safetensors"),
            metadata={"format": "pt"})
  with open(os.path.join(path, "config.json"), "w") as f:
    json.dump(config, f)
  return sum(os.path.getsize(os.path.join(path, n)) for n in os.listdir(path)
             if n.endswith(".safetensors"))


def _maxrss_bytes():
  """This process's peak resident memory (VmHWM). Not getrusage's
  ru_maxrss: Linux carries that across exec from the parent, which has just
  held the whole checkpoint while writing it."""
  with open("/proc/self/status") as f:
    for line in f:
      if line.startswith("VmHWM:"):
        return int(line.split()[1]) * 1024
  raise RuntimeError("no VmHWM in /proc/self/status")


def child_load(path):
  import jax  # pylint: disable=g-import-not-at-top
  from flax import nnx  # pylint: disable=g-import-not-at-top
  from moejax.models import from_pretrained  # pylint: disable=g-import-not-at-top
  jax.numpy.zeros(1).block_until_ready()  # backend up before the baseline
  base = _maxrss_bytes()
  t0 = time.perf_counter()
  model = from_pretrained(path)
  jax.block_until_ready(jax.tree.leaves(nnx.state(model)))
  seconds = time.perf_counter() - t0
  print(json.dumps({"seconds": seconds,
                    "peak_bytes": _maxrss_bytes() - base}))


def child_forward(path, batch, length, iters):
  from flax import nnx  # pylint: disable=g-import-not-at-top
  from moejax.models import from_pretrained  # pylint: disable=g-import-not-at-top
  model = from_pretrained(path)
  ids = np.random.default_rng(0).integers(
      0, model.spec.vocab_size, (batch, length)).astype(np.int32)
  fwd = nnx.jit(lambda m, x: m(x)[0])
  fwd(model, ids).block_until_ready()
  fwd(model, ids).block_until_ready()
  t0 = time.perf_counter()
  for _ in range(iters):
    fwd(model, ids).block_until_ready()
  print(json.dumps({"seconds": (time.perf_counter() - t0) / iters}))


TORCH_CHILD = r"""
import json, sys, time, numpy as np, torch, transformers
path, b, l, iters = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
m = transformers.AutoModelForCausalLM.from_pretrained(
    path, dtype=torch.float32, attn_implementation="sdpa").eval()
ids = torch.tensor(np.random.default_rng(0).integers(
    0, m.config.vocab_size, (b, l)).astype(np.int64))
with torch.no_grad():
  m(input_ids=ids); m(input_ids=ids)
  t0 = time.perf_counter()
  for _ in range(iters):
    m(input_ids=ids)
print(json.dumps({"seconds": (time.perf_counter() - t0) / iters,
                  "threads": torch.get_num_threads()}))
"""


def _run(cmd):
  env = dict(os.environ, PYTHONPATH=REPO)
  out = subprocess.run(cmd, capture_output=True, text=True, env=env,
                       check=False)
  if out.returncode:
    raise RuntimeError(f"{cmd[:3]} failed:\n{out.stderr[-3000:]}")
  return json.loads(out.stdout.strip().splitlines()[-1])


def _spread(xs):
  return {"median": statistics.median(xs), "min": min(xs), "max": max(xs)}


def bench_load(tmp):
  path = os.path.join(tmp, "load")
  # Mixtral at M=1024: ~118 MB of float32 per layer.
  layers = max(1, round(_SIZE_MB.value / 118))
  size = write_checkpoint(path, mixtral_config(
      model_dim=1024, hidden=1024, experts=8, layers=layers, vocab=4096))
  rounds = [_run([sys.executable, "-m", "experiments.benchmark_pretrained",
                  f"--child=load:{path}"]) for _ in range(_ROUNDS.value)]
  mem = [r["peak_bytes"] / size for r in rounds]
  sec = [r["seconds"] for r in rounds]
  return {"checkpoint_bytes": size, "layers": layers,
          "peak_over_size": _spread(mem), "seconds": _spread(sec),
          "seconds_per_gb": _spread([s / (size / 1e9) for s in sec]),
          "loadavg": open("/proc/loadavg").read().split()[:3]}


def bench_forward(tmp):
  path = os.path.join(tmp, "forward")
  write_checkpoint(path, mixtral_config(model_dim=256, hidden=512, experts=8,
                                        layers=4, vocab=1024, heads=8,
                                        kv_heads=2))
  b, l, it = _BATCH.value, _LENGTH.value, _ITERS.value
  jax_cmd = [sys.executable, "-m", "experiments.benchmark_pretrained",
             f"--child=forward:{path}", f"--batch={b}", f"--length={l}",
             f"--iters={it}"]
  torch_cmd = [_TORCH_PYTHON.value, "-c", TORCH_CHILD, path, str(b), str(l),
               str(it)]
  return {"batch": b, "length": l, "iters": it,
          **interleaved_rounds(jax_cmd, torch_cmd, b * l, _ROUNDS.value)}


def interleaved_rounds(jax_cmd, torch_cmd, tokens, rounds):
  """Runs one moejax and one torch child per round, alternating which goes
  first; each prints {"seconds": ...} for `tokens` tokens. Returns the
  tokens/s of each side, their per-round ratio and the 1-min load average,
  each as {median, min, max}."""
  ratios, jax_tps, torch_tps, loads = [], [], [], []
  for r in range(rounds):
    order = [("jax", jax_cmd), ("torch", torch_cmd)]
    if r % 2:
      order.reverse()
    got = {name: _run(cmd) for name, cmd in order}
    loads.append(float(open("/proc/loadavg").read().split()[0]))
    jax_tps.append(tokens / got["jax"]["seconds"])
    torch_tps.append(tokens / got["torch"]["seconds"])
    ratios.append(jax_tps[-1] / torch_tps[-1])
  return {"moejax_tokens_per_s": _spread(jax_tps),
          "torch_tokens_per_s": _spread(torch_tps),
          "ratio_moejax_over_torch": _spread(ratios),
          "loadavg_1min": _spread(loads)}


def main(argv):
  del argv
  if _CHILD.value:
    kind, path = _CHILD.value.split(":", 1)
    if kind == "load":
      child_load(path)
    else:
      child_forward(path, _BATCH.value, _LENGTH.value, _ITERS.value)
    return
  with tempfile.TemporaryDirectory(dir="/tmp") as tmp:
    results = {"load": bench_load(tmp)}
    print(json.dumps(results, indent=1), flush=True)
    if _TORCH_PYTHON.value:
      results["forward"] = bench_forward(tmp)
  print(json.dumps(results, indent=1))
  if _OUTPUT.value:
    with open(_OUTPUT.value, "w") as f:
      json.dump(results, f, indent=1)


if __name__ == "__main__":
  app.run(main)
