r"""Training-step speed of the router study's runs, measured together.

The second table of docs/router_study.md compares the survey's families
with top-2 at (near) equal active FLOPs; the tokens/s a training run logs
depends on whatever else the shared machine was doing at that moment. This
measures every run's jitted training step (the study's model, batch 16 x
128 tokens, built from experiments/configs/router_study.py exactly as the
training app builds it) in interleaved rounds: each round times every
variant once for `--steps` steps, in an order rotated by one each round.
The flags --rounds, --steps and --output are benchmark_scale's. It
reports the median step time, tokens/s, the spread over the rounds
(max - min, relative to the median), the ratio to `--baseline` per round
(median and range), and the load average before and after.

  nice -n 10 python -m experiments.benchmark_families \
      --output=benchmarks/2026-12-01-cpu/families.json
  python -m experiments.benchmark_families --routers=top2,dense --rounds=1

See BENCHMARKS.md, section "Router study families".
"""

import importlib.util
import json
import os
import statistics

from absl import app
from absl import flags

from experiments import benchmark_scale as scale

_ROUTERS = flags.DEFINE_list(
    "routers", ["top2", "dense", "top2_global", "top_p", "null_experts",
                "evomoe", "stablemoe", "lory", "smear", "mod", "moa",
                "switchhead"],
    "router_study.py runs to time (its `router=` values).")
_SIZE = flags.DEFINE_string("size", "s500", "router_study.py size.")
_BASELINE = flags.DEFINE_string("baseline", "top2",
                                "The run the ratios divide by.")


def study_config(router, size):
  """router_study.py's config for `router=<router>,size=<size>`."""
  path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs",
                      "router_study.py")
  spec = importlib.util.spec_from_file_location("router_study_bench", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(f"router={router},size={size}")


def main(argv):
  del argv
  os.environ.setdefault("MOEJAX_DATA_DIR", "/tmp/moejax_data")
  routers = list(_ROUTERS.value)
  if _BASELINE.value not in routers:
    raise app.UsageError(f"--baseline={_BASELINE.value!r} is not in "
                         f"--routers={routers}")
  load_before = scale.loadavg()
  variants = {r: scale._prepared(study_config(r, _SIZE.value))  # pylint: disable=protected-access
              for r in routers}
  raw = scale.interleaved(variants, scale.timed_steps, scale._ROUNDS.value)  # pylint: disable=protected-access
  tokens = 16 * 128
  base = raw[_BASELINE.value]
  rows = {}
  for name, times in raw.items():
    row = scale.summary(times)
    row["tokens_per_s"] = tokens / row["median"]
    ratios = [b / t for b, t in zip(base, times)]  # > 1: faster than base
    row[f"speed_vs_{_BASELINE.value}"] = dict(
        median=statistics.median(ratios), min=min(ratios), max=max(ratios))
    rows[name] = row
  results = dict(size=_SIZE.value, rounds=scale._ROUNDS.value,  # pylint: disable=protected-access
                 steps_per_round=scale._STEPS.value,  # pylint: disable=protected-access
                 load_before=load_before, load_after=scale.loadavg(),
                 runs=rows)
  print(f"{'run':14s} {'ms/step':>8s} {'tokens/s':>9s} {'spread':>7s} "
        f"{'vs ' + _BASELINE.value:>14s}")
  for name, row in rows.items():
    r = row[f"speed_vs_{_BASELINE.value}"]
    print(f"{name:14s} {1e3 * row['median']:8.1f} {row['tokens_per_s']:9,.0f}"
          f" {row['spread']:7.1%} {r['median']:5.2f}x "
          f"({r['min']:.2f}-{r['max']:.2f})")
  print(f"load average {results['load_before']} -> {results['load_after']}")
  if scale._OUTPUT.value:  # pylint: disable=protected-access
    os.makedirs(os.path.dirname(os.path.abspath(scale._OUTPUT.value)), exist_ok=True)
    with open(scale._OUTPUT.value, "w") as f:
      json.dump(results, f, indent=1)


if __name__ == "__main__":
  app.run(main)
