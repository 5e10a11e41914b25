"""Smoke runs of the generate and route_stats apps on a fixture checkpoint."""

import os
import subprocess
import sys


ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), os.pardir,
                                    os.pardir))
OLMOE = os.path.join(ROOT, "tests", "models", "fixtures", "olmoe")


def _run(*args):
  env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu")
  env.pop("XLA_FLAGS", None)  # one device is enough
  return subprocess.run([sys.executable, "-m", *args], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=600)


def test_generate_app_prints_the_prompt_and_the_new_tokens():
  out = _run("experiments.generate", f"--checkpoint={OLMOE}",
             "--prompt=def main():", "--max_new_tokens=5")
  assert out.returncode == 0, out.stderr[-2000:]
  assert out.stdout.startswith("def main():")
  assert "[5 tokens in" in out.stdout


def test_route_stats_app_writes_the_table_and_figures(tmp_path):
  text = tmp_path / "text.txt"
  text.write_text("import os\n\ndef main(argv):\n  return len(argv)\n" * 20)
  out = _run("experiments.route_stats", f"--checkpoint={OLMOE}",
             f"--text={text}", f"--out_dir={tmp_path / 'out'}",
             "--seq_len=16", "--rows=3", "--max_new_tokens=4")
  assert out.returncode == 0, out.stderr[-2000:]
  files = set(os.listdir(tmp_path / "out"))
  assert {"load.png", "coactivation.png", "shift.png", "route_stats.md",
          "stats.json"} <= files
  table = (tmp_path / "out" / "route_stats.md").read_text()
  assert "| 0 | 8 |" in table and "| 1 | 8 |" in table  # 2 MoE layers, E=8


def test_a_missing_checkpoint_is_one_clear_error(tmp_path):
  out = _run("experiments.generate", f"--checkpoint={tmp_path / 'nope'}",
             "--prompt=x")
  assert out.returncode != 0
  assert "is not a directory" in out.stderr
  assert "Traceback" not in out.stderr


def test_generate_app_reads_a_training_workdir(tmp_path):
  # A 1-step smoke run of the default LM, then bytes in, bytes out.
  import importlib.util  # pylint: disable=g-import-not-at-top
  from moejax import train  # pylint: disable=g-import-not-at-top
  path = os.path.join(ROOT, "experiments", "configs", "lm_stdlib.py")
  spec = importlib.util.spec_from_file_location("lm_stdlib", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  c = module.get_config("size=smoke")
  c.data.data_dir = str(tmp_path / "data")
  c.num_train_steps, c.eval_every = 1, 0
  c.optimizer.warmup_steps = 0
  with open(os.devnull, "w") as null:
    train.train_and_evaluate(c, str(tmp_path / "run"), stream=null)
  out = _run("experiments.generate", f"--checkpoint={tmp_path / 'run'}",
             "--prompt=import ", "--max_new_tokens=4")
  assert out.returncode == 0, out.stderr[-2000:]
  assert out.stdout.startswith("import ") and "[4 tokens in" in out.stdout
