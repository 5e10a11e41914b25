r"""GPU/TPU benchmark of the moejax.pallas kernels against XLA, in one run.

For each shape (16k tokens by default) it measures, after compilation and
warm-up, the median over `--repeats` timed calls:

* GMM forward+backward (out = x @ W[e]; d_x; d_W) of the Pallas kernels, in
  TFLOP/s of useful FLOPs (3 * 2 * T*k * M * H), against
  - a dense bfloat16 matmul [T*k, M] x [M, H] forward+backward (exactly the
    same FLOPs), run in the same process: target >= 0.7x its throughput at
    the Mixtral-like shape;
  - jax.lax.ragged_dot forward+backward on the same rows and group sizes:
    target >= 3x faster.
* permute (tokens -> expert-sorted, tile-padded rows) and unpermute (fused
  weighted combine) forward and backward, as effective bandwidth (bytes each
  pass must read and write, see `_permute_bytes`) over the device's copy
  bandwidth measured in the same run (a jitted copy of a 2 GiB buffer):
  target >= 0.6.

Routing is top-k of random logits (near-uniform load, as a trained balanced
router gives); group sizes are padded to the tile as the dropless engine
does. Results: a printed Markdown table (paste into BENCHMARKS.md) and
`--output` JSON.

One command on a GPU machine (jax 0.10.x or 0.11.x, CUDA):

  python -m experiments.benchmark_pallas --output=/tmp/pallas_bench.json

Options: --shapes=mixtral,deepseek,qwen3 --tokens=16384 --tune (tries a few
Triton block configs per shape and reports the best) --repeats=20.
A CPU smoke run of the script itself (interpret mode, tiny shapes):

  python -m experiments.benchmark_pallas --shapes=tiny --tokens=64 \
      --backend=triton_interpret --repeats=2 --copy_mib=16
"""

import datetime
import functools
import json
import statistics
import time

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np

from moejax import pallas
from moejax import routing
from moejax.layers import dispatch as dispatch_lib

SHAPES = {
    # name: (M, H, E, k)
    "mixtral": (4096, 14336, 8, 2),
    "deepseek": (7168, 2048, 256, 8),
    "qwen3": (2048, 768, 128, 8),
    "tiny": (64, 96, 4, 2),
}

# Triton block configs tried with --tune: (blocks, tgmm_blocks, warps, stages).
TRITON_CONFIGS = [
    ((128, 64, 128), (128, 128, 128), 8, 3),
    ((128, 64, 256), (128, 128, 128), 8, 3),
    ((128, 128, 128), (128, 128, 128), 8, 3),
    ((128, 64, 128), (128, 128, 128), 4, 4),
    ((64, 64, 128), (128, 64, 128), 4, 4),
    ((128, 32, 128), (64, 128, 128), 4, 5),
]

FLAGS = flags.FLAGS
flags.DEFINE_list("shapes", ["mixtral", "deepseek", "qwen3"],
                  f"shapes to run, from {list(SHAPES)}")
flags.DEFINE_integer("tokens", 16384, "tokens T per step")
flags.DEFINE_integer("tile", 128, "dropless tile (rows per group alignment)")
flags.DEFINE_string("backend", "auto", "moejax.pallas backend")
flags.DEFINE_string("dtype", "bfloat16", "compute dtype")
flags.DEFINE_integer("repeats", 20, "timed calls per measurement")
flags.DEFINE_integer("warmup", 3, "untimed calls after compilation")
flags.DEFINE_bool("tune", False, "try TRITON_CONFIGS for the GMM")
flags.DEFINE_bool("ragged_dot", True, "also time jax.lax.ragged_dot")
flags.DEFINE_integer("copy_mib", 2048, "buffer size of the copy reference")
flags.DEFINE_string("output", None, "JSON output path")


def _time(fn, *args):
  """Median and min seconds of fn(*args) (already jitted) over repeats."""
  jax.block_until_ready(fn(*args))  # compile
  for _ in range(FLAGS.warmup):
    jax.block_until_ready(fn(*args))
  times = []
  for _ in range(FLAGS.repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - t0)
  return statistics.median(times), min(times)


def _safe(fn):
  """Runs fn(); an exception (e.g. out of memory) becomes {'error': ...}."""
  try:
    return fn()
  except Exception as e:  # pylint: disable=broad-except
    return {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"}


def _routing(tokens, num_experts, k, tile, seed=0):
  logits = jax.random.normal(jax.random.key(seed), (1, tokens, num_experts))
  plan = routing.token_choice(logits, k=k, capacity=None)
  layout = dispatch_lib.dropless_layout(plan, tile)
  return plan, layout


def _fwd_bwd(matmul):
  """jit(lhs, rhs, d_out -> (out, d_lhs, d_rhs)): forward + backward."""
  def run(lhs, rhs, d_out):
    out, vjp = jax.vjp(matmul, lhs, rhs)
    return (out,) + vjp(d_out)
  return jax.jit(run)


def bench_gmm(name, m, h, e, k, dtype, backend):
  t, tile = FLAGS.tokens, FLAGS.tile
  _, layout = _routing(t, e, k, tile)
  sizes = layout.group_sizes_E
  r = layout.assignment_R.shape[0]
  keys = jax.random.split(jax.random.key(1), 3)
  # Real rows hold data, padding rows zeros, as after the permute.
  real = (layout.assignment_R < t * k)[:, None]
  lhs = (jax.random.normal(keys[0], (r, m), dtype) * real).astype(dtype)
  rhs = (jax.random.normal(keys[1], (e, m, h), dtype) / np.sqrt(m)).astype(
      dtype)
  d_out = jax.random.normal(keys[2], (r, h), dtype)
  flops = 3 * 2 * t * k * m * h
  res = {"shape": name, "M": m, "H": h, "E": e, "k": k, "tokens": t,
         "rows_padded": int(r), "tflop_fwd_bwd": flops / 1e12}

  def tflops(sec):
    return flops / sec / 1e12

  configs = TRITON_CONFIGS if (FLAGS.tune and pallas.resolve_backend(
      backend).kind == "triton") else [None]
  best = None
  for cfg in configs:
    kw = {} if cfg is None else dict(blocks=cfg[0], tgmm_blocks=cfg[1],
                                     num_warps=cfg[2], num_stages=cfg[3])
    fn = _fwd_bwd(functools.partial(pallas.gmm, group_sizes_E=sizes,
                                    tile=tile, backend=backend, **kw))
    out = _safe(lambda: _time(fn, lhs, rhs, d_out))  # pylint: disable=cell-var-from-loop
    if isinstance(out, dict):
      res.setdefault("pallas_errors", []).append([cfg, out["error"]])
      continue
    if best is None or out[0] < best[0]:
      best = (out[0], out[1], cfg)
  if best is not None:
    res.update(pallas_s=best[0], pallas_min_s=best[1],
               pallas_tflops=tflops(best[0]), pallas_config=best[2])

  # Dense matmul with the same FLOPs: [T*k, M] x [M, H], forward + backward.
  x_dense = lhs[:t * k] if r >= t * k else jnp.resize(lhs, (t * k, m))
  w_dense = rhs[0]
  dense = _fwd_bwd(jnp.dot)   # bf16 in/out; cuBLAS accumulates in f32
  d_dense = d_out[:t * k] if r >= t * k else jnp.resize(d_out, (t * k, h))
  out = _safe(lambda: _time(dense, x_dense, w_dense, d_dense))
  if isinstance(out, dict):
    res["dense_error"] = out["error"]
  else:
    res.update(dense_s=out[0], dense_tflops=tflops(out[0]))
  if FLAGS.ragged_dot:
    rd = _fwd_bwd(lambda a, b: jax.lax.ragged_dot(a, b, sizes))
    out = _safe(lambda: _time(rd, lhs, rhs, d_out))
    if isinstance(out, dict):
      res["ragged_dot_error"] = out["error"]
    else:
      res.update(ragged_dot_s=out[0], ragged_dot_tflops=tflops(out[0]))
  if "pallas_s" in res and "dense_s" in res:
    res["pallas_over_dense"] = res["pallas_tflops"] / res["dense_tflops"]
  if "pallas_s" in res and "ragged_dot_s" in res:
    res["speedup_vs_ragged_dot"] = res["ragged_dot_s"] / res["pallas_s"]
  return res


def _permute_bytes(t, k, r, m, itemsize):
  """Bytes each pass must move (index and weight traffic ignored).

  permute fwd: read T*k token rows, write R rows (padding rows written as 0).
  unpermute fwd: read T*k rows, write T rows.
  permute bwd (a combine): read T*k rows, write T rows.
  unpermute bwd: read T*k rows of d_y, read R rows of out (for d_w), write R.
  """
  row = m * itemsize
  return {"permute_fwd": (t * k + r) * row,
          "unpermute_fwd": (t * k + t) * row,
          "permute_bwd": (t * k + t) * row,
          "unpermute_bwd": (t * k + 2 * r) * row}


def bench_copy(dtype):
  n = FLAGS.copy_mib * 2 ** 20 // jnp.dtype(dtype).itemsize
  buf = jnp.ones((n // 1024, 1024), dtype)
  copy = jax.jit(lambda a: a * jnp.ones((), a.dtype) + jnp.zeros((), a.dtype))
  med, _ = _time(copy, buf)
  return 2 * buf.size * buf.dtype.itemsize / med   # read + write


def bench_permute(name, m, e, k, dtype, backend, copy_bw):
  t, tile = FLAGS.tokens, FLAGS.tile
  plan, layout = _routing(t, e, k, tile)
  r = layout.assignment_R.shape[0]
  row_NK = layout.row_N.reshape(t, k)
  w_NK = plan.weight_GSK.reshape(t, k)
  x = jax.random.normal(jax.random.key(2), (t, m), dtype)
  rows = jax.random.normal(jax.random.key(3), (r, m), dtype)
  d_rows = jax.random.normal(jax.random.key(4), (r, m), dtype)
  d_y = jax.random.normal(jax.random.key(5), (t, m), dtype)
  asg = layout.assignment_R
  perm = functools.partial(pallas.permute, row_NK=row_NK, assignment_R=asg,
                           backend=backend)
  unperm = functools.partial(pallas.unpermute, row_NK=row_NK,
                             assignment_R=asg, backend=backend)
  fns = {
      "permute_fwd": (jax.jit(perm), (x,)),
      "unpermute_fwd": (jax.jit(lambda o, w: unperm(o, w)), (rows, w_NK)),
      "permute_bwd": (jax.jit(lambda x, d: jax.vjp(perm, x)[1](d)[0]),
                      (x, d_rows)),
      "unpermute_bwd": (jax.jit(lambda o, w, d: jax.vjp(
          lambda o, w: unperm(o, w), o, w)[1](d)), (rows, w_NK, d_y)),
  }
  nbytes = _permute_bytes(t, k, r, m, jnp.dtype(dtype).itemsize)
  res = {"shape": name, "M": m, "E": e, "k": k, "tokens": t, "rows_padded":
         int(r), "copy_GBps": copy_bw / 1e9}
  for key, (fn, args) in fns.items():
    out = _safe(lambda: _time(fn, *args))  # pylint: disable=cell-var-from-loop
    if isinstance(out, dict):
      res[key + "_error"] = out["error"]
      continue
    bw = nbytes[key] / out[0]
    res.update({key + "_s": out[0], key + "_GBps": bw / 1e9,
                key + "_frac_of_copy": bw / copy_bw})
  return res


def _fmt(v, spec, suffix=""):
  return format(v, spec) + suffix if isinstance(v, (int, float)) else "n/a"


def markdown(gmm_rows, perm_rows, device):
  lines = [f"Device: {device}; jax {jax.__version__}; "
           f"{datetime.date.today().isoformat()}; tokens {FLAGS.tokens}, "
           f"tile {FLAGS.tile}, {FLAGS.dtype}, backend {FLAGS.backend}.", "",
           "| shape (M, H, E, k) | Pallas GMM TFLOP/s | dense TFLOP/s | "
           "Pallas/dense | ragged_dot TFLOP/s | speedup vs ragged_dot | "
           "GMM config |",
           "| --- | --- | --- | --- | --- | --- | --- |"]
  for g in gmm_rows:
    lines.append(
        f"| {g['shape']} ({g['M']}, {g['H']}, {g['E']}, {g['k']}) | "
        f"{_fmt(g.get('pallas_tflops'), '.1f')} | "
        f"{_fmt(g.get('dense_tflops'), '.1f')} | "
        f"{_fmt(g.get('pallas_over_dense'), '.2f')} | "
        f"{_fmt(g.get('ragged_dot_tflops'), '.1f')} | "
        f"{_fmt(g.get('speedup_vs_ragged_dot'), '.1f', 'x')} | "
        f"{g.get('pallas_config') or 'default'} |")
  lines += ["", "| shape | pass | GB/s | fraction of copy |",
            "| --- | --- | --- | --- |"]
  for p in perm_rows:
    for key in ("permute_fwd", "unpermute_fwd", "permute_bwd",
                "unpermute_bwd"):
      lines.append(f"| {p['shape']} | {key} | "
                   f"{_fmt(p.get(key + '_GBps'), '.0f')} | "
                   f"{_fmt(p.get(key + '_frac_of_copy'), '.2f')} |")
  if perm_rows:
    lines.append(f"\nCopy bandwidth (read+write): "
                 f"{perm_rows[0]['copy_GBps']:.0f} GB/s")
  return "\n".join(lines)


def main(argv):
  del argv
  unknown = set(FLAGS.shapes) - set(SHAPES)
  if unknown:
    raise ValueError(f"unknown shapes {sorted(unknown)}; allowed: "
                     f"{list(SHAPES)}")
  dtype = jnp.dtype(FLAGS.dtype)
  backend = pallas.resolve_backend(FLAGS.backend)
  if backend.kind == "xla":
    print("warning: backend resolves to 'xla' (no GPU/TPU): timing the XLA "
          "fallback, not the kernels; pass --backend=triton_interpret for a "
          "smoke run")
  device = f"{jax.devices()[0].device_kind} ({jax.devices()[0].platform})"
  gmm_rows, perm_rows = [], []
  copy_bw = bench_copy(dtype)
  for name in FLAGS.shapes:
    m, h, e, k = SHAPES[name]
    print(f"== {name}: M={m} H={h} E={e} k={k} T={FLAGS.tokens}", flush=True)
    gmm_rows.append(bench_gmm(name, m, h, e, k, dtype, backend))
    print(json.dumps(gmm_rows[-1]), flush=True)
    perm_rows.append(bench_permute(name, m, e, k, dtype, backend, copy_bw))
    print(json.dumps(perm_rows[-1]), flush=True)
  table = markdown(gmm_rows, perm_rows, device)
  print(table)
  if FLAGS.output:
    with open(FLAGS.output, "w") as f:
      json.dump({"device": device, "jax": jax.__version__,
                 "date": datetime.date.today().isoformat(),
                 "flags": {k: FLAGS[k].value for k in (
                     "shapes", "tokens", "tile", "backend", "dtype",
                     "repeats", "tune")},
                 "gmm": gmm_rows, "permute": perm_rows, "markdown": table},
                f, indent=1)


if __name__ == "__main__":
  app.run(main)
