"""No host memory growth over a long run of small steps (about a minute of
training, so it runs only with MOEJAX_SLOW_TESTS=1):

  MOEJAX_SLOW_TESTS=1 .venv/bin/pytest -q tests/reliability/test_memory_growth.py

It runs experiments/memory_growth.py for 6,000 steps (metrics every step,
checkpoints and evals every 500) in a fresh process and bounds the growth
of the resident set and of the live Python objects after a warm-up of
2,000 steps (four checkpoint + eval cycles). docs/reliability.md has the
measurements behind the limits.

The RSS rate is a least-squares fit over the samples from step 2,000 to
6,000 (every 100 steps, 45 in all), not the difference of two samples: RSS
grows in steps of 1-5 MiB right after some checkpoint + eval cycles, so
the old two-point rate over steps 1,000-2,000 measured 0.3 to 7.8 MiB per
1,000 steps in three runs on one machine (two over its limit of 4). The
fit measured 0.8-2.5 MiB per 1,000 steps in four runs (standard errors
0.1-0.4); the limit, 8, is 3x the highest. What it catches: a native leak
of 8 KiB or more per step, or of 4 MiB or more per checkpoint + eval
cycle. Python-level leaks show in the object count first.
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(__file__)))
# The limit on the fitted steady-state RSS rate: 3x the highest measured.
MAX_MIB_PER_1000_STEPS = 8.0


@pytest.mark.slow
@pytest.mark.skipif(not os.environ.get("MOEJAX_SLOW_TESTS"),
                    reason="slow (about 30-90 s); set MOEJAX_SLOW_TESTS=1")
def test_host_memory_is_flat_over_6000_steps(tmp_path):
  out = tmp_path / "memory.json"
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             MOEJAX_DATA_DIR=os.environ.get("MOEJAX_DATA_DIR",
                                            str(tmp_path / "data")))
  proc = subprocess.run(
      [sys.executable, "-m", "experiments.memory_growth", "--steps=6000",
       "--fit_from=2000", "--fit_every=100", f"--workdir={tmp_path / 'w'}",
       f"--json={out}"],
      cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
  assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
  print(proc.stdout)
  result = json.loads(out.read_text())
  assert result["last_step"] == 6000
  # Every 100 steps from 2,000 (41), plus the table's samples there.
  assert result["fit_from_step"] == 2000 and result["fit_samples"] >= 41
  # Flat after warm-up: the fitted rate under MAX_MIB_PER_1000_STEPS
  # (measured 1.6-2.5; see the module docstring for the margin).
  assert result["fit_mib_per_1000_steps"] < MAX_MIB_PER_1000_STEPS, result
  # No steady build-up of Python objects (measured: +30 per checkpoint +
  # eval cycle, about +260 from step 1,250 to 6,000).
  assert result["steady_object_growth"] < 2000, result
  # Everything, warm-up included, stays small next to the ~600 MiB process
  # (measured: +25 to +30 MiB from step 200 to 6,000).
  assert result["rss_growth_mib"] < 64, result


def test_script_refuses_a_workdir_it_did_not_make(tmp_path):
  sys.path.insert(0, REPO)
  from experiments import memory_growth  # pylint: disable=g-import-not-at-top
  real = tmp_path / "a_real_run"
  real.mkdir()
  (real / "checkpoints").mkdir()
  with pytest.raises(ValueError, match="not made by this script"):
    memory_growth.prepare_workdir(str(real))
  assert (real / "checkpoints").is_dir()  # nothing was deleted
  scratch = tmp_path / "scratch"
  memory_growth.prepare_workdir(str(scratch))  # new: made and marked
  (scratch / "metrics.jsonl").write_text("{}")
  memory_growth.prepare_workdir(str(scratch))  # its own: emptied
  assert not (scratch / "metrics.jsonl").exists()
  with pytest.raises(ValueError, match=r"--baseline_step=2001"):
    memory_growth.check_args(2000, 500, 2001)


def test_the_rate_is_a_least_squares_fit_over_the_samples():
  sys.path.insert(0, REPO)
  from experiments import memory_growth  # pylint: disable=g-import-not-at-top
  # 2 MiB per 1000 steps with one 4 MiB jump half-way.
  points = [(x, 600.0 + 0.002 * x + (4.0 if x >= 4000 else 0.0))
            for x in range(2000, 6001, 100)]
  slope, stderr = memory_growth.least_squares(points)
  x, y = np.array(points).T
  assert slope == pytest.approx(np.polyfit(x, y, 1)[0], rel=1e-9)
  assert 1000 * slope == pytest.approx(3.46, abs=0.01)
  assert 0 < 1000 * stderr < 0.3
  assert memory_growth.least_squares([(0, 1.0), (10, 2.0)]) == (0.1, None)
  steps = memory_growth.sample_steps(6000, 500, 200, fit_every=100,
                                     fit_from=2000)
  assert len([s for s in steps if s >= 2000 and s % 100 == 0]) == 41
