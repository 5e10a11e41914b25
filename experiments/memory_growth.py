r"""Host memory over a long run of small steps: does the loop leak?

  python -m experiments.memory_growth --steps=2000 --workdir=/tmp/memgrowth

Trains the smoke LM (experiments/configs/lm_stdlib.py:size=smoke, 1 CPU
device) for --steps steps with everything a real run does: metrics fetched
and written every step (JSONL, TensorBoard), checkpoints and evals every
--every steps, the progress bar. It samples the process's resident set size
(VmRSS) and the number of live Python objects at a few steps and prints a
table with the growth from --baseline_step (after compilation) to the last
step, and the steady-state growth from the end of the second checkpoint and
eval cycle (which load code and warm caches once) to the last step.

The steady-state rate is also a least-squares line through RSS samples
taken every --fit_every steps from --fit_from on, with its standard error:
RSS grows in steps of 1-5 MiB right after some checkpoint + eval cycles,
so the difference of two samples 1,000 steps apart swings from 0 to 8 MiB
between runs, while a fit over a few thousand steps varies much less (see
docs/reliability.md). With --json it also writes the samples to that
file. docs/reliability.md records a measurement;
tests/reliability/test_memory_growth.py runs this (slow):

  python -m experiments.memory_growth --steps=6000 --fit_from=2000 \
      --fit_every=100 --workdir=/tmp/memgrowth
"""

import gc
import json
import math
import os
import shutil
import sys
import time

from absl import app
from absl import flags
from absl import logging

_STEPS = flags.DEFINE_integer("steps", 2000, "Training steps.")
_EVERY = flags.DEFINE_integer("every", 500, "Checkpoint and eval interval.")
_BASELINE = flags.DEFINE_integer(
    "baseline_step", 200, "Growth is measured from this step.")
_WORKDIR = flags.DEFINE_string(
    "workdir", None, "Scratch workdir: must not exist, or be one this script "
    "made before (it is emptied then).", required=True)
_JSON = flags.DEFINE_string("json", None, "Also write the samples here.")
_FIT_EVERY = flags.DEFINE_integer(
    "fit_every", 50, "From --fit_from on, sample every this many steps for "
    "the least-squares growth rate.")
_FIT_FROM = flags.DEFINE_integer(
    "fit_from", None, "First step of the fit (default: 2 * --every, after "
    "the first two checkpoint + eval cycles).")


def rss_mib():
  """This process's resident set size in MiB (Linux /proc)."""
  with open("/proc/self/status") as f:
    for line in f:
      if line.startswith("VmRSS:"):
        return int(line.split()[1]) / 1024
  raise RuntimeError("no VmRSS in /proc/self/status")


def sample_steps(steps, every, baseline, fit_every=50, fit_from=None):
  """The steps at which memory is sampled: a few for the table, and every
  `fit_every` steps from `fit_start` on for the fit."""
  points = {1, baseline, steps}
  points.update(range(every, steps + 1, every))
  points.update(range(baseline, steps + 1, max(1, (steps - baseline) // 8)))
  points.update(range(fit_start(steps, every, fit_from), steps + 1,
                      max(1, fit_every)))
  return sorted(p for p in points if 1 <= p <= steps)


def fit_start(steps, every, fit_from=None):
  """The first step of the fit: `fit_from`, by default after the first two
  checkpoint + eval cycles, which load code and warm caches once (or
  half-way, in a run too short for either)."""
  start = 2 * every if fit_from is None else fit_from
  return start if 1 <= start < steps else max(1, steps // 2)


def least_squares(points):
  """(slope, its standard error) of the line through (x, y) `points`; the
  error is None with fewer than 3 points."""
  n = len(points)
  mean_x = sum(x for x, _ in points) / n
  mean_y = sum(y for _, y in points) / n
  sxx = sum((x - mean_x) ** 2 for x, _ in points)
  if not sxx:
    return 0.0, None
  slope = sum((x - mean_x) * (y - mean_y) for x, y in points) / sxx
  if n < 3:
    return slope, None
  residual = sum((y - mean_y - slope * (x - mean_x)) ** 2 for x, y in points)
  return slope, math.sqrt(residual / (n - 2) / sxx)


# Marks a workdir this script made, so that a rerun may empty it.
_MARKER = ".memory_growth_workdir"


def prepare_workdir(workdir):
  """Empties a workdir this script made before, creates a new one; refuses
  any other existing, non-empty directory (it could hold a real run)."""
  if os.path.isdir(workdir) and os.listdir(workdir):
    if not os.path.exists(os.path.join(workdir, _MARKER)):
      raise ValueError(
          f"--workdir={workdir} exists and was not made by this script; "
          f"refusing to empty it. Give a new directory.")
    shutil.rmtree(workdir)
  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, _MARKER), "w") as f:
    f.write("scratch workdir of experiments/memory_growth.py\n")


def check_args(steps, every, baseline):
  """ValueError naming the flag unless 1 <= baseline_step <= steps and
  every >= 1."""
  if steps < 1 or every < 1:
    raise ValueError(f"--steps={steps} and --every={every} must be >= 1")
  if not 1 <= baseline < steps:
    raise ValueError(f"--baseline_step={baseline} must be in [1, --steps) "
                     f"= [1, {steps})")


def make_config(steps, every):
  """The smoke LM config with checkpoints and evals every `every` steps."""
  from experiments.configs import lm_stdlib  # pylint: disable=g-import-not-at-top
  c = lm_stdlib.get_config("size=smoke")
  c.num_train_steps = steps
  c.checkpoint_every = every
  c.eval_every = every
  c.log_every = 1
  c.optimizer.warmup_steps = 10
  return c


def measure(workdir, steps, every, baseline, stream=None, fit_every=50,
            fit_from=None):
  """Runs the loop; returns {'samples': [{step, rss_mib, objects}], ...}."""
  from moejax import train  # pylint: disable=g-import-not-at-top
  check_args(steps, every, baseline)
  prepare_workdir(workdir)
  wanted = set(sample_steps(steps, every, baseline, fit_every, fit_from))
  samples = []

  def on_log(step, metrics):
    del metrics
    if step in wanted:
      gc.collect()
      samples.append(dict(step=step, rss_mib=round(rss_mib(), 1),
                          objects=len(gc.get_objects())))

  start = time.time()
  with open(os.devnull, "w") as devnull:
    train.train_and_evaluate(make_config(steps, every), workdir,
                             stream=stream or devnull, on_log=on_log)
  base = next(s for s in samples if s["step"] >= baseline)
  # Steady state: after the first two checkpoint + eval cycles, which load
  # code and warm caches once.
  steady = next((s for s in samples if s["step"] > 2 * every), base)
  last = samples[-1]
  span = max(1, last["step"] - steady["step"])
  first_fit = fit_start(steps, every, fit_from)
  fitted = [(s["step"], s["rss_mib"]) for s in samples
            if s["step"] >= first_fit]
  slope, stderr = least_squares(fitted)
  return dict(samples=samples, seconds=round(time.time() - start, 1),
              rss_at_step_1_mib=samples[0]["rss_mib"],
              fit_from_step=first_fit, fit_samples=len(fitted),
              fit_mib_per_1000_steps=round(1000 * slope, 2),
              fit_stderr_mib_per_1000_steps=(
                  None if stderr is None else round(1000 * stderr, 2)),
              baseline_step=base["step"], last_step=last["step"],
              rss_growth_mib=round(last["rss_mib"] - base["rss_mib"], 1),
              object_growth=last["objects"] - base["objects"],
              steady_step=steady["step"],
              steady_rss_growth_mib=round(
                  last["rss_mib"] - steady["rss_mib"], 1),
              steady_mib_per_1000_steps=round(
                  1000 * (last["rss_mib"] - steady["rss_mib"]) / span, 2),
              steady_object_growth=last["objects"] - steady["objects"])


def format_table(result):
  """The samples and the growth figures of `measure`'s result, as text."""
  lines = ["  step   RSS (MiB)   Python objects"]
  for s in result["samples"]:
    lines.append(f"{s['step']:>6}  {s['rss_mib']:>10.1f}  {s['objects']:>15,}")
  lines.append(
      f"growth from step {result['baseline_step']} to "
      f"{result['last_step']}: {result['rss_growth_mib']:+.1f} MiB RSS, "
      f"{result['object_growth']:+,} objects ({result['seconds']} s)")
  lines.append(
      f"steady state, step {result['steady_step']} to {result['last_step']}:"
      f" {result['steady_rss_growth_mib']:+.1f} MiB RSS "
      f"({result['steady_mib_per_1000_steps']:+.2f} MiB per 1000 steps), "
      f"{result['steady_object_growth']:+,} objects")
  stderr = result["fit_stderr_mib_per_1000_steps"]
  lines.append(
      f"least-squares fit over {result['fit_samples']} samples from step "
      f"{result['fit_from_step']}: {result['fit_mib_per_1000_steps']:+.2f} "
      f"MiB per 1000 steps"
      + ("" if stderr is None else f" (standard error {stderr:.2f})"))
  return "\n".join(lines)


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)
  try:
    check_args(_STEPS.value, _EVERY.value, _BASELINE.value)
  except ValueError as e:
    raise app.UsageError(str(e)) from None
  result = measure(_WORKDIR.value, _STEPS.value, _EVERY.value,
                   _BASELINE.value, fit_every=_FIT_EVERY.value,
                   fit_from=_FIT_FROM.value)
  print(format_table(result))
  if _JSON.value:
    with open(_JSON.value, "w") as f:
      json.dump(result, f, indent=2)
  sys.stdout.flush()


if __name__ == "__main__":
  app.run(main)
